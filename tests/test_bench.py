"""``advpurify bench`` and the overlapped folder classification behind its end-to-end figure."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from advpurify.cli import app
from advpurify.evaluation.classify import Preprocess, classify_paths, iter_batches
from advpurify.export.bench import bench, bench_eval, time_batches
from advpurify.images import load_image
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
    rows = json.loads(out.read_text())
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


def test_iter_batches_keeps_order_and_reports_failures(tmp_path, sample_paths):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    paths = [*sample_paths[:5], broken, *sample_paths[5:7]]
    batches = list(iter_batches(paths, Preprocess(64, 56), batch_size=3, workers=2))
    kept = [p for b in batches for p in b.paths]
    assert kept == [p for p in paths if p != broken]
    assert [b.images.shape[0] for b in batches] == [3, 3, 1]
    failures = [f for b in batches for f in b.failures]
    assert len(failures) == 1 and failures[0][0] == broken and "broken.jpg" in failures[0][1]
    result = classify_paths(paths, lambda x: x.mean((2, 3)), Preprocess(64, 56), batch_size=4)
    assert result.logits.shape == (7, 3) and len(result.failures) == 1


def test_end_to_end_eval_figure(sample_dir):
    figure = bench_eval(sample_dir, "test-bench-tiny", "ort-cpu", batch_size=16, repeats=1)
    assert figure.images == 100 and figure.failures == 0
    assert figure.eval_images_per_s > 0 and figure.raw_images_per_s > 0
    assert figure.top1 is not None and 0 <= figure.top1 <= 1
    row = figure.to_json()
    assert KEYS <= set(row) and row["backend"] == "ort-cpu end-to-end"
