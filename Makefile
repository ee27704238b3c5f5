# Every target creates .venv and installs the project into it when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup demo test bench gpu-check lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[dev,ray]'
	touch $(STAMP)

setup: $(STAMP)

# The main job on built-in sample photographs (shipped in scikit-image and matplotlib): no
# network. Then the whole experiment on them (pseudo-labels: agreement with clean predictions),
# and one generative purifier, DIP, on two of them (300 fitting steps instead of the default
# 550, to keep the demo short), with its clean | adversarial | perturbation | purified grid.
demo: $(STAMP)
	$(BIN)/advpurify samples demo-output/photos
	$(BIN)/purify-batch demo-output/photos --method rescale -o demo-output/purified-rescale
	$(BIN)/advpurify experiment --data demo-output/photos --classifier efficientnet-lite0 \
		--attack fgsm --eps 16 --methods rescale,jpeg,bitdepth,median,tvm,randpad \
		--adaptive --adaptive-n 4 --adaptive-steps 5 --eot 2 -o demo-output/experiment
	cat demo-output/experiment/report.md
	mkdir -p demo-output/two-photos
	cp demo-output/photos/chelsea.png demo-output/photos/coffee.png demo-output/two-photos/
	$(BIN)/advpurify experiment --data demo-output/two-photos --classifier efficientnet-lite0 \
		--attack fgsm --eps 16 --methods dip --param dip.iterations=300 --grid 2 \
		-o demo-output/experiment-dip
	cat demo-output/experiment-dip/report.md
	@echo "DIP grid (clean | adversarial | perturbation | purified): demo-output/experiment-dip/figures/grid.png"

# Two workers (the CI machine has 2 cores); tests of one Ray group share a worker and its Ray.
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

# On a machine with one NVIDIA GPU, in at most 8 minutes, offline, installing nothing (no .venv:
# the machine's own python with torch): JSON + log in GPU_OUT (docs/gpu.md). DATA: the folder
# of sample images (default $$ADVPURIFY_DATA). On a CPU, after `make setup`,
# `make gpu-check PYTHON=.venv/bin/python GPU_CHECK_ARGS=--dry-run` proves it runs. Exit 1 when a
# step failed as a whole.
GPU_OUT ?= gpu-check-out
GPU_CHECK_ARGS ?=
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py $(GPU_OUT) $(if $(DATA),--data $(DATA)) $(GPU_CHECK_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check advpurify tests benchmarks
	$(BIN)/ruff format --check advpurify tests benchmarks
	$(BIN)/lint-imports --no-cache

clean:
	rm -rf $(VENV) demo-output .pytest_cache
