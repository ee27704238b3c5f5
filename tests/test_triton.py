"""``advpurify export --triton-repo``: configs parse with Triton's own protobuf schema, the ONNX
files compute what torch computes, the ensemble chains its steps, unfusable methods say why.

A small registered classifier keeps the exports fast; the writer does not care which network
it is (the real classifiers' exports are checked in test_export.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from advpurify.cli import app
from advpurify.errors import AdvpurifyError
from advpurify.export.fused import NotExportableError
from advpurify.export.triton import write_triton_repo
from advpurify.models.registry import register_exportable
from advpurify.models.spec import MODELS
from advpurify.purifiers import create_purifier

model_config_pb2 = pytest.importorskip(
    "tritonclient.grpc.model_config_pb2", reason="tritonclient is not installed"
)
text_format = pytest.importorskip("google.protobuf.text_format")

SIZE = 48


class TinyClassifier(nn.Module):
    """``[0, 1]`` RGB of any size -> 1000 logits: a convolution, a pool, a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():  # the same weights every time, the global RNG untouched
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 8, 3, stride=2)
            self.head = nn.Linear(8, 1000)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.conv(images)).mean((-2, -1))
        return self.head(features)


@pytest.fixture(scope="module", autouse=True)
def tiny_classifier():
    # Its own name: test_export registers a "triton-tiny" of another shape in the same process.
    register_exportable(
        "triton-tiny", lambda _weights: TinyClassifier(), sample_shape=(3, SIZE, SIZE)
    )
    yield
    MODELS.unregister("triton-tiny")


def parse_config(path: Path):
    config = model_config_pb2.ModelConfig()
    text_format.Parse(path.read_text(), config)  # raises on any field Triton does not know
    return config


def run_onnx(path: Path, images: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return torch.from_numpy(np.asarray(session.run(None, {name: images.numpy()})[0]))


def images(count: int = 3) -> torch.Tensor:
    return torch.rand(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def test_fused_repository(tmp_path):
    result = write_triton_repo(
        tmp_path, "rescale", "triton-tiny", params={"factor": 0.25}, size=SIZE, max_batch=16,
        batch_wait_ms=2.5, check_count=4,
    )  # fmt: skip
    name = result.model
    assert result.models == [name] and name == "advpurify_rescale_triton_tiny"
    config = parse_config(tmp_path / name / "config.pbtxt")
    assert config.name == name and config.backend == "onnxruntime"
    assert config.max_batch_size == 16
    assert max(config.dynamic_batching.preferred_batch_size) == 16
    assert config.dynamic_batching.max_queue_delay_microseconds == 2500
    (given,), (produced,) = config.input, config.output
    assert list(given.dims) == [3, SIZE, SIZE] and list(produced.dims) == [1000]
    assert given.data_type == model_config_pb2.TYPE_FP32
    onnx_file = tmp_path / name / "1" / "model.onnx"
    import onnx

    graph = onnx.load(str(onnx_file)).graph
    assert (graph.input[0].name, graph.output[0].name) == (given.name, produced.name)
    x = images()
    with torch.inference_mode():
        expected = TinyClassifier()(create_purifier("rescale", factor=0.25)(x))
    torch.testing.assert_close(run_onnx(onnx_file, x), expected, atol=1e-4, rtol=1e-4)


def test_ensemble_repository(tmp_path):
    result = write_triton_repo(
        tmp_path, "median", "triton-tiny", params={"kernel": 5}, size=SIZE, layout="ensemble",
        check_count=4,
    )  # fmt: skip
    name = result.model
    purifier_name, classifier_name = f"{name}_purifier", f"{name}_classifier"
    assert sorted(result.models) == sorted([name, purifier_name, classifier_name])
    ensemble = parse_config(tmp_path / name / "config.pbtxt")
    assert ensemble.platform == "ensemble" and (tmp_path / name / "1").is_dir()
    first, second = ensemble.ensemble_scheduling.step
    assert (first.model_name, second.model_name) == (purifier_name, classifier_name)
    purifier_config = parse_config(tmp_path / purifier_name / "config.pbtxt")
    classifier_config = parse_config(tmp_path / classifier_name / "config.pbtxt")
    # The chain is connected: ensemble input -> purifier -> classifier -> ensemble output.
    assert dict(first.input_map) == {purifier_config.input[0].name: ensemble.input[0].name}
    assert list(first.output_map.values()) == list(second.input_map.values())
    assert list(second.input_map) == [classifier_config.input[0].name]
    assert dict(second.output_map) == {classifier_config.output[0].name: ensemble.output[0].name}
    assert list(purifier_config.output[0].dims) == [3, SIZE, SIZE]
    assert list(ensemble.output[0].dims) == [1000]
    x = images()
    purified = run_onnx(tmp_path / purifier_name / "1" / "model.onnx", x)
    torch.testing.assert_close(purified, create_purifier("median", kernel=5)(x))
    logits = run_onnx(tmp_path / classifier_name / "1" / "model.onnx", purified)
    with torch.inference_mode():
        torch.testing.assert_close(logits, TinyClassifier()(purified), atol=1e-4, rtol=1e-4)

    # The fused layout for the same pair replaces the ensemble, its two parts included:
    # Triton would otherwise go on loading them.
    notes = []
    write_triton_repo(
        tmp_path, "median", "triton-tiny", params={"kernel": 5}, size=SIZE, check_count=4,
        notify=notes.append,
    )  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    assert f"replacing model {name} in {tmp_path}" in notes
    assert f"removing model {purifier_name} (the fused layout replaces it)" in notes

    # Named freely, a model may be called like another's part: it is never removed or replaced.
    write_triton_repo(tmp_path, "rescale", "triton-tiny", size=SIZE, check_count=2,
                      name="m_purifier")  # fmt: skip
    write_triton_repo(tmp_path, "rescale", "triton-tiny", size=SIZE, check_count=2, name="m")
    with pytest.raises(AdvpurifyError, match="m_purifier is another model, not a part of m"):
        write_triton_repo(
            tmp_path, "rescale", "triton-tiny", size=SIZE, layout="ensemble", name="m"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m", "m_purifier", name])


@pytest.mark.parametrize(("method", "reason"), [("jpeg", "JPEG"), ("randpad", "random")])
def test_unfusable_methods_say_why(tmp_path, method, reason):
    with pytest.raises(NotExportableError, match=reason) as caught:
        write_triton_repo(tmp_path / "repo", method, "triton-tiny", size=SIZE)
    assert f"advpurify serve --method {method}" in str(caught.value)
    assert not (tmp_path / "repo").exists()


def test_cli(tmp_path):
    runner = CliRunner()
    args = ["export", "--triton-repo", str(tmp_path), "--purifier", "bitdepth", "--size", str(SIZE)]
    missing = runner.invoke(app, args)
    assert missing.exit_code == 1 and "--classifier" in missing.output
    done = runner.invoke(app, [*args, "--classifier", "triton-tiny", "--check-count", "2"])
    assert done.exit_code == 0, done.output
    assert "advpurify_bitdepth_triton_tiny" in done.output
    parse_config(tmp_path / "advpurify_bitdepth_triton_tiny" / "config.pbtxt")
    # Written again: the model folder is replaced whole, nothing else is left behind.
    again = runner.invoke(app, [*args, "--classifier", "triton-tiny", "--check-count", "2"])
    assert again.exit_code == 0, again.output
    assert [p.name for p in tmp_path.iterdir()] == ["advpurify_bitdepth_triton_tiny"]
    # Another setting under a name of its own stays beside the first.
    named = runner.invoke(
        app, [*args, "--classifier", "triton-tiny", "--check-count", "2", "-p", "bits=3",
              "--triton-name", "bitdepth3_tiny"],
    )  # fmt: skip
    assert named.exit_code == 0, named.output
    assert parse_config(tmp_path / "bitdepth3_tiny" / "config.pbtxt").name == "bitdepth3_tiny"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "advpurify_bitdepth_triton_tiny", "bitdepth3_tiny"
    ]  # fmt: skip
    for bad in ("../up", ".hidden", "a b", ""):
        refused = runner.invoke(app, [*args, "--classifier", "triton-tiny", "--triton-name", bad])
        assert refused.exit_code == 1 and "--triton-name" in refused.stderr, refused.output
    alone = runner.invoke(app, ["export", "triton-tiny", "--triton-name", "x"])
    assert alone.exit_code == 1 and "--triton-name" in alone.stderr, alone.output
    assert len(list(tmp_path.iterdir())) == 2
