"""``advpurify bench`` and the overlapped folder classification behind its end-to-end figure."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from advpurify.cli import app
from advpurify.evaluation.classify import Preprocess, classify_paths, iter_batches
from advpurify.export.bench import bench, bench_eval, time_batches
from advpurify.images import load_image
from advpurify.models.classifiers import resize_center_crop
from advpurify.models.registry import register_exportable

KEYS = {"model", "backend", "batch_size", "precision", "p50_ms", "p95_ms", "images_per_s"}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ADVPURIFY_HOME", str(tmp_path / "home"))


class TinyClassifier(nn.Module):
    """A small ImageNet-shaped classifier with the ``preprocessing`` a Classifier declares."""

    def __init__(self) -> None:
        super().__init__()
        from advpurify.models.classifiers import Preprocessing

        torch.manual_seed(0)
        self.preprocessing = Preprocessing(256, 224, "bilinear")
        self.conv = nn.Conv2d(3, 16, 8, stride=8)
        self.fc = nn.Linear(16, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


register_exportable("test-bench-tiny", lambda weights: TinyClassifier())


def test_time_batches_excludes_warmup():
    calls = []
    times = time_batches(lambda batch: calls.append(1), torch.zeros(1), warmup=2, iterations=5)
    assert len(times) == 5 and len(calls) == 7 and all(t >= 0 for t in times)


def test_bench_every_combination():
    seen = []
    results = bench(
        ["test-bench-tiny"],
        ["torch", "ort-cpu"],
        [1, 3],
        iterations=3,
        warmup=1,
        on_result=seen.append,
    )
    assert [(r.backend, r.batch_size) for r in results] == [
        ("torch", 1),
        ("torch", 3),
        ("ort-cpu", 1),
        ("ort-cpu", 3),
    ]
    assert seen == results
    for r in results:
        assert r.model == "test-bench-tiny" and r.precision == "fp32" and r.iterations == 3
        assert 0 < r.p50_ms <= r.p95_ms
        assert r.images_per_s > 0
        assert KEYS <= set(r.to_json())


def test_cli_bench_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "--model",
            "test-bench-tiny",
            "--backend",
            "torch",
            "--backend",
            "ort-cpu",
            "--batch-size",
            "2",
            "--weights",
            "random",
            "--iterations",
            "2",
            "--warmup",
            "1",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "img/s" in result.output and "ort-cpu" in result.output
    payload = json.loads(out.read_text())
    rows = payload["results"]
    assert payload["machine"]["versions"]["torch"] == torch.__version__.split("+")[0]
    assert len(rows) == 2 and all(KEYS <= set(row) for row in rows)
    assert {row["backend"] for row in rows} == {"torch", "ort-cpu"}


def test_cli_bench_gpu_backend_without_gpu_is_a_one_line_error():
    if torch.cuda.is_available():
        pytest.skip("checks the error of a machine without a GPU")
    result = CliRunner().invoke(
        app, ["bench", "--model", "test-bench-tiny", "--backend", "ort-cuda", "--iterations", "1"]
    )
    assert result.exit_code == 1
    assert result.output.strip() == (
        "error: backend ort-cuda: no CUDA GPU is available (torch.cuda.is_available() is False)"
    )


def test_fast_preprocessing_matches_the_exact_path(sample_paths):
    from advpurify.models.classifiers import resize_center_crop

    prepare = Preprocess(256, 224, "bilinear")
    for path in sample_paths[:6]:
        fast = prepare(path)
        exact = resize_center_crop(load_image(path)[None], 256, 224, "bilinear")[0]
        assert fast.shape == exact.shape == (3, 224, 224)
        # 8-bit resampling vs float resampling: within rounding, never a different crop.
        assert (fast - exact).abs().mean() < 2 / 255


def test_unusual_files_take_the_exact_path(tmp_path):
    rgba = tmp_path / "alpha.png"
    Image.new("RGBA", (300, 260), (255, 0, 0, 0)).save(rgba)
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (260, 300), (0, 255, 0, 0)).save(cmyk)
    prepare = Preprocess(256, 224)
    assert prepare._fast(rgba) is None and prepare._fast(cmyk) is None
    # Transparent pixels become white, as advpurify.images composites them.
    assert torch.allclose(prepare(rgba), torch.ones(3, 224, 224))
    assert prepare(cmyk).shape == (3, 224, 224)


def test_fast_path_refuses_corrupt_jpegs_and_leaves_16_bit_pngs_to_the_exact_path(tmp_path):
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    smooth = cv2.resize(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8), (320, 240))
    good = tmp_path / "good.jpg"
    Image.fromarray(smooth).save(good, quality=90)
    data = bytearray(good.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 300] = rng.integers(0, 256, 300, np.uint8).tobytes()
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(bytes(data))  # Pillow decodes it without complaint; libjpeg warns
    deep = tmp_path / "deep.png"
    cv2.imwrite(str(deep), rng.integers(0, 65536, (240, 320, 3), dtype=np.uint16))

    prepare = Preprocess(256, 224)
    assert prepare._fast(good) is not None
    assert prepare._fast(corrupt) is None and prepare._fast(deep) is None
    exact = resize_center_crop(load_image(deep)[None], 256, 224, "bilinear")[0]
    assert torch.equal(prepare(deep), exact)  # all 16 bits, as purify-batch reads them
    result = classify_paths([good, corrupt, deep], lambda x: x.mean((2, 3)), prepare)
    assert result.paths == [good, deep]
    assert [f[0] for f in result.failures] == [corrupt] and "Corrupt JPEG" in result.failures[0][1]


def test_iter_batches_keeps_order_and_reports_failures(tmp_path, sample_paths):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    paths = [*sample_paths[:5], broken, *sample_paths[5:7]]
    batches = list(iter_batches(paths, Preprocess(64, 56), batch_size=3, workers=2))
    kept = [p for b in batches for p in b.paths]
    assert kept == [p for p in paths if p != broken]
    assert [b.images.shape[0] for b in batches] == [3, 3, 1]
    failures = [f for b in batches for f in b.failures]
    assert (
        len(failures) == 1
        and failures[0][0] == broken
        and "not a recognised image" in failures[0][1]
    )
    result = classify_paths(paths, lambda x: x.mean((2, 3)), Preprocess(64, 56), batch_size=4)
    assert result.logits.shape == (7, 3) and len(result.failures) == 1


def test_end_to_end_eval_figure(sample_dir):
    figure = bench_eval(sample_dir, "test-bench-tiny", "ort-cpu", batch_size=16, repeats=1)
    assert figure.images == len(list(sample_dir.iterdir())) and figure.failures == 0
    assert figure.eval_images_per_s > 0 and figure.raw_images_per_s > 0
    assert figure.top1 is not None and 0 <= figure.top1 <= 1
    row = figure.to_json()
    assert KEYS <= set(row) and row["backend"] == "ort-cpu end-to-end"


# ------------------------------------------------------------------ bench --method

METHOD_KEYS = {
    "method",
    "params",
    "device",
    "batch_size",
    "size",
    "p50_ms",
    "p95_ms",
    "images_per_s",
    "peak_mb",
}


def test_cli_bench_methods_json_shape_and_plot(tmp_path):
    out, plot = tmp_path / "methods.json", tmp_path / "methods.png"
    result = CliRunner().invoke(
        app,
        ["bench", "--method", "rescale", "--method", "median", "-p", "median.kernel=5",
         "--size", "32", "--size", "48", "--batch-size", "1", "--batch-size", "3",
         "--size", "32", "--method", "rescale",  # a value given twice is timed once
         "--iterations", "4", "--warmup", "1", "--json", str(out), "--plot", str(plot)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    # Off a terminal the table is as wide as it needs: no figure cut to "…" at 80 columns.
    assert "peak MB" in result.stdout and "…" not in result.stdout
    payload = json.loads(out.read_text())
    machine = payload["machine"]
    assert machine["cpu"] and machine["torch_threads"] >= 1 and machine["versions"]["torch"]
    assert "gpu" in machine
    rows = payload["results"]
    assert len(rows) == 2 * 2 * 2
    assert {(r["method"], r["size"], r["batch_size"]) for r in rows} == {
        (m, s, b) for m in ("rescale", "median") for s in (32, 48) for b in (1, 3)
    }
    for row in rows:
        assert METHOD_KEYS <= set(row)
        assert row["device"] == "cpu" and row["stage"] == "purifier"
        assert 0 < row["p50_ms"] <= row["p95_ms"]
        assert row["images_per_s"] > 0 and row["peak_mb"] > 0
    assert {r["params"]["kernel"] for r in rows if r["method"] == "median"} == {5}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sample_batch_is_real_photographs():
    photos = bench_methods_module().sample_batch(9, 40)
    assert photos.shape == (9, 3, 40, 40)
    # Eight distinct photographs, cycled; not noise (neighbouring pixels correlate).
    assert torch.equal(photos[0], photos[8]) and not torch.equal(photos[0], photos[1])
    assert (photos[:, :, 1:] - photos[:, :, :-1]).abs().mean() < 0.1
    noise = bench_methods_module().sample_batch(2, 40, random=True)
    assert (noise[:, :, 1:] - noise[:, :, :-1]).abs().mean() > 0.2


def bench_methods_module():
    import advpurify.export.bench as module

    return module


def test_dip_time_grows_with_its_steps_and_extrapolation_says_so():
    from advpurify.export.bench import bench_methods

    tiny = {"dip": {"channels": 4, "input_depth": 4, "scales": 2, "iterations": 300}}
    # Interleaved, best of three, after a warm-up: a loaded machine cannot reverse a 30x
    # difference in work (each fit also pays a fixed set-up, up to ~25 steps' worth here).
    best = {}
    for _ in range(3):
        for steps in (2, 60):
            (row,) = bench_methods(
                ["dip"], params=tiny, batch_sizes=(1,), sizes=(32,),
                warmup=1, iterations=2, fit_steps=steps,
            )  # fmt: skip
            best[steps] = min(best.get(steps, float("inf")), row.p50_ms)
            assert row.fit_steps == row.steps == steps and not row.extrapolated
    assert best[60] > 2 * best[2], best
    (row,) = bench_methods(
        ["dip"], params=tiny, batch_sizes=(1,), sizes=(32,), warmup=0, iterations=1,
        fit_steps=3, extrapolate=True,
    )  # fmt: skip
    assert row.extrapolated and row.fit_steps == 3 and row.steps == 300
    assert row.describe_steps() == "300 (extrapolated from 3)"


def test_end_to_end_is_at_least_the_classifier_alone():
    from advpurify.export.bench import bench_methods

    tiny = {"dip": {"channels": 8, "input_depth": 4, "scales": 2, "iterations": 300}}
    rows = bench_methods(
        ["dip"], params=tiny, fit_steps=40, batch_sizes=(2,), sizes=(64,),
        classifier="timm:test_efficientnet", backend="torch", weights="random", warmup=1,
        iterations=3,
    )  # fmt: skip
    by_stage = {r.stage: r for r in rows}
    assert set(by_stage) == {"classifier", "purifier", "end-to-end"}
    alone, deployed = by_stage["classifier"], by_stage["end-to-end"]
    assert alone.method == "none" and deployed.method == "dip"
    assert deployed.classifier == alone.classifier == "timm:test_efficientnet"
    assert deployed.backend == "torch"
    # 40 DIP fitting steps cost far more than one pass of a tiny network (so far that a loaded
    # machine's noise cannot hide it): the sum shows it.
    assert deployed.p50_ms >= alone.p50_ms
    assert deployed.images_per_s <= alone.images_per_s


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "nope"], "unknown method 'nope'"),
        (["--method", "dip", "--batch-size", "100000", "--size", "2048"], "dip needs about"),
        (["--method", "rescale", "-p", "dip.iterations=3"], "method 'dip' is not among --methods"),
        (["--method", "rescale", "-p", "rescale.factor=7"], "factor=7.0: must be <= 1"),
        (["--method", "rescale", "--model", "googlenet"], "separate benchmarks"),
        (["--method", "ppgn", "--size", "4"], "at least 8 pixels"),
        # An option of the other benchmark would be silently ignored: refused instead.
        (["--model", "googlenet", "--size", "128"], "--size goes with --method"),
        (["--model", "googlenet", "--device", "cuda"], "--device goes with --method"),
        (["--model", "googlenet", "--fit-steps", "3"], "--fit-steps goes with --method"),
        (["--model", "googlenet", "--workers", "3"], "--workers goes with --eval-folder"),
        (["--method", "rescale", "--eval-batch-size", "3"], "--eval-batch-size goes with"),
    ],
)
def test_bad_method_options_are_one_line_before_timing(args, message, monkeypatch):
    import advpurify.export.bench as module

    def never(*_a, **_k):
        raise AssertionError("timed before checking the options")

    monkeypatch.setattr(module, "time_batches", never)
    result = CliRunner().invoke(app, ["bench", *args])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_cuda_device_without_a_gpu_is_one_line():
    if torch.cuda.is_available():
        pytest.skip("checks the error of a machine without a GPU")
    result = CliRunner().invoke(app, ["bench", "--method", "rescale", "--device", "cuda"])
    assert result.exit_code == 1
    assert result.output.strip() == (
        "error: device 'cuda' requested but CUDA is not available here"
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bench_reports_device_memory_and_matches_the_row_shape():
    from advpurify.export.bench import bench_methods

    rows = bench_methods(
        ["rescale", "tvm"], devices=("cuda",), batch_sizes=(1, 8), sizes=(64,),
        warmup=1, iterations=3,
    )  # fmt: skip
    for row in rows:
        assert row.device == "cuda" and 0 < row.p50_ms <= row.p95_ms
        # torch.cuda.max_memory_allocated: at least the input batch itself.
        assert row.peak_mb >= row.batch_size * 3 * 64 * 64 * 4 / 2**20


def test_end_to_end_folder_predictions_equal_the_exact_path(sample_dir, sample_paths):
    """bench's end-to-end figure classifies with the fast decoder; it must predict as the exact
    path (advpurify.images + resize_center_crop + the module) does, image for image."""
    from advpurify.models.classifiers import resize_center_crop

    figure = bench_eval(sample_dir, "test-bench-tiny", "torch", batch_size=16, repeats=1)
    module = TinyClassifier().eval()
    exact = {}
    with torch.inference_mode():
        for path in sample_paths:
            image = resize_center_crop(load_image(path)[None], 256, 224, "bilinear")
            exact[str(path)] = int(module(image).argmax(1))
    assert figure.images == len(sample_paths) == len(figure.predictions)
    assert figure.predictions == exact


def test_bench_dip_times_every_configuration_in_its_own_process(tmp_path):
    # The script's plumbing (fresh worker processes, interleaved rounds, ratios, JSON) on a
    # tiny net; the figures themselves are for docs/performance.md, not for assertions.
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_dip.py"
    out = tmp_path / "dip.json"
    done = subprocess.run(
        [
            sys.executable,
            str(script),
            "--size",
            "64",
            "--iterations",
            "2",
            "--rounds",
            "1",
            "--batch",
            "2",
            "--preset",
            "tiny",
            "--threads",
            "1",
            "--bf16",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "after vs before, batch 2" in done.stdout and "of torch.mm" in done.stdout
    assert re.search(r"bf16 autocast +[\d.]+ ms .* [\d.]+x eager", done.stdout), done.stdout
    times = json.loads(out.read_text())["times"]
    assert set(times) == {
        f"batch {b}, {c}" for b in (1, 2) for c in ("before", "after", "after, default heap")
    }
    assert all(len(v) == 1 and v[0] > 0 for v in times.values())


def test_bench_decode_checks_identical_tensors_and_prints_the_ratio(sample_dir):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_decode.py"
    done = subprocess.run(
        [sys.executable, str(script), "--data", str(sample_dir), "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "identical tensors" in done.stdout
    assert re.search(r"load_image vs before: [\d.]+x faster", done.stdout)


def test_the_same_pixels_are_prepared_alike_whatever_the_file_format(tmp_path):
    # A 224 x 224 image is the crop already: the exact path (WebP, RGBA, rotated files) must
    # not scale it to 256 and crop, as the fast path (PNG, JPEG) and the classifier do not.
    pixels = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(pixels).save(tmp_path / "a.webp", lossless=True)
    prepare = Preprocess()
    assert prepare._fast(tmp_path / "a.webp") is None  # the exact path, really
    assert torch.equal(prepare(tmp_path / "a.png"), prepare(tmp_path / "a.webp"))


def test_a_table_printed_off_a_terminal_is_never_cut():
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    from advpurify.cli.tables import print_table

    table = Table()
    for i in range(12):
        table.add_column(f"column {i}", no_wrap=True)
    table.add_row(*[f"{1234.5678 * i:.2f}" for i in range(12)])  # wider than 80 columns
    out = StringIO()
    print_table(table, Console(file=out, width=80))
    assert "…" not in out.getvalue() and "13580.25" in out.getvalue()


def test_scattered_timings_are_said_to_be_noisy(capsys):
    from types import SimpleNamespace

    from advpurify.cli.export import _note_noise

    _note_noise([SimpleNamespace(p50_ms=1.0, p95_ms=1.2)])
    assert capsys.readouterr().err == ""
    _note_noise([SimpleNamespace(p50_ms=1.0, p95_ms=5.0), SimpleNamespace(p50_ms=2, p95_ms=2)])
    assert "note: p95 is over 3x p50 in 1 of 2 rows" in capsys.readouterr().err
