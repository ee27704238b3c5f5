"""Backends behind one interface: torch, ONNX Runtime (CPU/CUDA/TensorRT EP), TensorRT."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from advpurify.errors import AdvpurifyError
from advpurify.runtime.backends import OrtBackend, TorchBackend, create_backend, resolve_backend
from advpurify.runtime.installed import (
    AUTO_ORDER,
    BackendError,
    available_backends,
    unavailable_reason,
)
from advpurify.runtime.ort import ort_session

HAS_CUDA = torch.cuda.is_available()
HAS_TRT = HAS_CUDA and importlib.util.find_spec("tensorrt") is not None
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none on this machine)")
needs_trt = pytest.mark.skipif(
    not HAS_TRT, reason="needs a CUDA GPU and TensorRT (pip install 'advpurify[tensorrt]')"
)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ADVPURIFY_HOME", str(tmp_path / "home"))


class Tiny(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x * 2 - 1))).mean((2, 3)))


def test_ort_cpu_matches_torch_on_real_images(small_real_images):
    module = Tiny()
    torch_backend = create_backend("torch", module, device="cpu")
    ort_backend = create_backend("ort-cpu", module, label="tiny")
    described = (ort_backend.name, ort_backend.device, ort_backend.precision)
    assert described == ("ort-cpu", "cpu", "fp32")
    assert (torch_backend.name, torch_backend.device) == ("torch", "cpu")
    expected = torch_backend.run(small_real_images)
    got = ort_backend.run(small_real_images)
    assert got.dtype == torch.float32 and got.shape == (4, 10)
    assert torch.allclose(got, expected, atol=1e-5)
    # A new input size is exported on first sight (one ONNX file per shape), batch is dynamic.
    smaller = torch.nn.functional.interpolate(small_real_images, size=(40, 40))
    assert torch.allclose(ort_backend(smaller[:3]), torch_backend(smaller[:3]), atol=1e-5)
    assert len(ort_backend._runners) == 2


def test_backend_from_an_onnx_file(tmp_path, small_real_images):
    from advpurify.runtime.onnx import export_onnx

    module = Tiny()
    path = export_onnx(module, tmp_path / "tiny.onnx", small_real_images[:2])
    backend = OrtBackend(path, threads=1, optimization="basic")
    assert torch.allclose(backend.run(small_real_images), module(small_real_images), atol=1e-5)
    with pytest.raises(BackendError, match="needs the torch module"):
        create_backend("torch", path)
    with pytest.raises(BackendError, match="not found"):
        OrtBackend(tmp_path / "missing.onnx")


def test_auto_picks_the_best_usable_and_says_so(capsys):
    name, note = resolve_backend("auto")
    assert name in AUTO_ORDER and note.startswith(f"backend auto: using {name}")
    if not HAS_CUDA:
        assert name == "ort-cpu" and "no CUDA GPU" in note
    backend = create_backend("auto", Tiny())
    assert backend.name == name
    assert f"backend auto: using {name}" in capsys.readouterr().err


@pytest.mark.skipif(HAS_CUDA, reason="checks the errors of a machine without a GPU")
@pytest.mark.parametrize("name", ["ort-cuda", "ort-trt", "tensorrt"])
def test_explicit_gpu_backends_without_gpu_fail_in_one_line(name):
    # onnxruntime-gpu lists CUDA and TensorRT providers even here: that must not be trusted.
    with pytest.raises(BackendError) as info:
        create_backend(name, Tiny())
    message = str(info.value)
    assert message.startswith(f"backend {name}: ") and "\n" not in message
    assert "CUDA GPU" in message or "TensorRT is not installed" in message
    assert name not in available_backends()
    with pytest.raises(BackendError):
        ort_session("unused.onnx", name if name != "tensorrt" else "ort-trt")


def test_bad_choices_are_user_errors():
    with pytest.raises(AdvpurifyError, match="unknown backend 'onnx'"):
        create_backend("onnx", Tiny())
    with pytest.raises(AdvpurifyError, match="precision 'int8'"):
        create_backend("ort-cpu", Tiny(), precision="int8")
    if not HAS_CUDA:
        with pytest.raises(BackendError, match="fp16 needs a CUDA GPU"):
            TorchBackend(Tiny(), precision="fp16")
    assert unavailable_reason("ort-cpu") is None and unavailable_reason("torch") is None


def test_ort_fp16_on_cpu(small_real_images):
    module = Tiny()
    backend = create_backend("ort-cpu", module, precision="fp16")
    assert backend.precision == "fp16"
    expected = module(small_real_images)
    assert torch.allclose(backend.run(small_real_images), expected, atol=2e-2)
    assert next(module.parameters()).dtype == torch.float32  # the caller's module is untouched


def test_load_classifier_on_onnx_runtime(small_real_images):
    from advpurify.models.classifiers import load_classifier

    onnx = load_classifier("timm:mobilenetv3_small_050", backend="ort-cpu", weights="random")
    assert onnx.backend == "ort-cpu"
    images = onnx.prepare(small_real_images)  # 224 x 224, the size the file is exported for
    with torch.inference_mode():
        expected = onnx.module(images)
    got = onnx.logits(images, batch_size=3)
    assert got.device.type == "cpu" and got.shape == (4, 1000)
    assert (got - expected).abs().max() < 1e-3
    assert torch.equal(got.argmax(1), expected.argmax(1))
    with pytest.raises(AdvpurifyError, match="unknown backend"):
        load_classifier("timm:mobilenetv3_small_050", backend="onnx", weights="random")


@needs_cuda
def test_ort_cuda_io_binding_keeps_tensors_on_the_gpu(small_real_images):
    module = Tiny()
    backend = create_backend("ort-cuda", module)
    images = small_real_images.cuda()
    got = backend.run(images)
    assert got.is_cuda
    assert torch.allclose(got.cpu(), module(small_real_images), atol=1e-4)


@needs_trt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_engine_matches_torch_and_is_cached(precision, small_real_images):
    from advpurify.runtime.tensorrt import engine_cache_dir

    module = Tiny()
    backend = create_backend("tensorrt", module, precision=precision, max_batch=8)
    got = backend.run(small_real_images.cuda())
    assert got.is_cuda
    tolerance = 1e-3 if precision == "fp32" else 3e-2
    assert torch.allclose(got.cpu(), module(small_real_images), atol=tolerance)
    engines = sorted(engine_cache_dir().glob("*.engine"))
    assert len(engines) == 1
    stamp = engines[0].stat().st_mtime_ns
    create_backend("tensorrt", module, precision=precision, max_batch=8).run(
        small_real_images.cuda()
    )
    assert engines[0].stat().st_mtime_ns == stamp  # the cached engine was reused
    engines[0].write_bytes(b"corrupt" + engines[0].read_bytes()[7:])
    again = create_backend("tensorrt", module, precision=precision, max_batch=8)
    assert torch.allclose(again.run(small_real_images.cuda()).cpu(), got.cpu(), atol=tolerance)


@needs_trt
def test_ort_tensorrt_provider(small_real_images):
    module = Tiny()
    backend = create_backend("ort-trt", module)
    got = backend.run(small_real_images.cuda())
    assert torch.allclose(got.cpu(), module(small_real_images), atol=1e-3)
