"""``benchmarks/gpu_check.py`` (``make gpu-check``): its dry run on the CPU, cuts and skips."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(out: Path, *args: str, data: Path | None = None, env: dict | None = None) -> dict:
    command = [sys.executable, str(SCRIPT), str(out), *args]
    if data is not None:
        command += ["--data", str(data)]
    env = {**os.environ, **(env or {})}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "gpu_check.json").read_text())


@pytest.mark.slow
def test_dry_run_runs_every_step(tmp_path, sample_dir):
    result = _run(tmp_path / "out", "--dry-run", "--budget", "1200", data=sample_dir)
    steps = result["steps"]
    assert list(steps) == list(_load_script().STEPS)
    assert {name: step["status"] for name, step in steps.items()} == dict.fromkeys(steps, "ok")
    rows = {
        name: [r for r in step["records"] if r["kind"] == "row"] for name, step in steps.items()
    }
    # Per-method figures come from `advpurify bench --method` rows: the bench JSON row shape.
    for name in ("dip", "ppgn", "context-encoder", "transforms"):
        assert rows[name], name
        for row in rows[name]:
            assert row["p50_ms"] <= row["p95_ms"] and row["images_per_s"] > 0
            assert {"method", "params", "device", "batch_size", "size", "peak_mb"} <= set(row)
    assert {r["method"] for r in rows["transforms"]} == set(_load_script().TRANSFORMS)
    assert {r["variant"] for r in rows["dip"]} >= {"fast default", "paper default"}
    parity = [r for r in steps["classify"]["records"] if r["kind"] == "parity"]
    assert {r["backend"] for r in parity} == {"torch", "ort-cpu"}
    assert all(r["top1_agreement"] == 1.0 for r in parity)
    (compared,) = [r for r in steps["purify-batch"]["records"] if r["kind"] == "purify-batch"]
    assert compared["images"] == 2 and compared["equal_within_tolerance"]
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "step dip: ok" in log and "done in" in log


def test_a_step_past_its_slice_is_cut_and_the_run_goes_on(tmp_path):
    # 8 s are kept back for the final write: a 10 s budget leaves 2 s, too little to start.
    result = _run(tmp_path / "out", "--dry-run", "--only", "transforms", "--budget", "10")
    assert result["steps"]["transforms"]["status"] == "cut"
    # With a few seconds the step starts and is killed part-way (it is made slower than its
    # slice); the JSON is still complete.
    result = _run(
        tmp_path / "out2", "--dry-run", "--only", "dip", "--only", "env", "--budget", "13",
        env={"GPU_CHECK_STEP_DELAY_S": "30"},
    )  # fmt: skip
    statuses = {name: step["status"] for name, step in result["steps"].items()}
    assert statuses["dip"] == "cut" and "seconds" in result
    assert (tmp_path / "out2" / "gpu_check.log").read_text().count("step dip: start") == 1


def test_missing_pytest_is_reported_not_fatal(tmp_path, monkeypatch):
    script = _load_script()
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "pytest" else real(name, *a)
    )
    (tmp_path / "steps").mkdir()
    step = script.Step(tmp_path, "tests", dry_run=True, data=None)
    script.step_tests(step)
    step.rows.close()
    (record,) = [json.loads(line) for line in (tmp_path / "steps" / "tests.jsonl").open()]
    assert record["kind"] == "skipped" and "pytest is not installed" in record["reason"]


def test_a_step_that_fails_as_a_whole_makes_the_run_exit_1(tmp_path):
    # A machine without torch: the step's process cannot even start its work.
    fake = tmp_path / "site"
    fake.mkdir()
    (fake / "torch.py").write_text("raise ImportError('no torch on this machine')\n")
    out = tmp_path / "out"
    command = [sys.executable, str(SCRIPT), str(out), "--dry-run", "--only", "env"]
    env = {**os.environ, "PYTHONPATH": str(fake)}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["steps"]["env"]["status"] == "error"
