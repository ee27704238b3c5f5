"""Backends behind one interface: torch, ONNX Runtime (CPU/CUDA/TensorRT EP), TensorRT.

The CPU tests cover the logic of the GPU paths with recording fakes (stream ordering, engine
cache folders, engine batch profiles, library failures); the figures come only from real runs.
The tests marked ``gpu`` skip with the reason on a machine without CUDA (or TensorRT).
"""

from __future__ import annotations

import importlib.util
import sys

import onnx
import pytest
import torch
from torch import nn

from advpurify.errors import AdvpurifyError
from advpurify.runtime import backends as backends_module
from advpurify.runtime.backends import (
    Backend,
    OrtBackend,
    TorchBackend,
    create_backend,
    resolve_backend,
)
from advpurify.runtime.installed import (
    AUTO_ORDER,
    BackendError,
    available_backends,
    canonical,
    load_tensorrt,
    unavailable_reason,
)
from advpurify.runtime.onnx import export_onnx
from advpurify.runtime.ort import (
    binding_runner,
    cuda_provider_options,
    ort_session,
    ort_trt_options,
)
from advpurify.runtime.precision import Float16, Float32LRN, cuda_fp32, ieee_fp32, to_half
from advpurify.runtime.tensorrt import EngineRunner, batch_plan

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


class WithLRN(nn.Module):
    """CaffeNet's first block (conv, ReLU, pool, LRN) on Caffe-scale input (0..255 - mean)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 5, stride=2)
        self.pool = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.norm = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.pool(torch.relu(self.conv(x)))).mean((2, 3)))


def synthetic(count: int = 4, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth [0, 1] images (no shared data needed: the GPU machine has none)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 8, 8, generator=gen)
    return nn.functional.interpolate(coarse, size=(size, size), mode="bilinear").clamp(0, 1)


# ---------------------------------------------------------------- interface and names


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


def test_activate_deactivate_and_context_manager(tmp_path):
    module = Tiny()
    images = synthetic()
    path = export_onnx(module, tmp_path / "tiny.onnx", images[:2])
    backend = OrtBackend(path, threads=1, optimization="basic")
    assert not backend.is_active
    with pytest.raises(BackendError, match="not active"):
        backend.run(images)
    with backend as active:
        assert active is backend and backend.is_active
        assert torch.allclose(backend.run(images), module(images), atol=1e-5)
        assert len(backend._runners) == 1
    assert not backend.is_active and not backend._runners  # sessions released
    with pytest.raises(BackendError, match="not active"):
        backend(images)
    assert torch.allclose(backend.activate().run(images), module(images), atol=1e-5)
    eager = TorchBackend(module)
    with eager:
        assert eager.module is module
    assert eager.module is None
    with pytest.raises(BackendError, match="needs the torch module"):
        create_backend("torch", path)
    with pytest.raises(BackendError, match="not found"):
        OrtBackend(tmp_path / "missing.onnx")


def test_one_alias_table_and_bad_choices():
    assert canonical("onnxruntime", "cpu") == "ort-cpu"
    assert canonical("ort", torch.device("cuda")) == "ort-cuda"
    assert canonical("TRT") == "tensorrt" and canonical("compile") == "torch-compile"
    assert canonical(None) == "auto"
    with pytest.raises(AdvpurifyError, match="unknown backend 'onnx'"):
        create_backend("onnx", Tiny())
    with pytest.raises(AdvpurifyError, match="precision 'int8'"):
        create_backend("ort-cpu", Tiny(), precision="int8")
    with pytest.raises(BackendError, match="not an ONNX Runtime backend"):
        ort_session("unused.onnx", "tensorrt")
    if not HAS_CUDA:
        with pytest.raises(BackendError, match="fp16 needs a CUDA GPU"):
            TorchBackend(Tiny(), precision="fp16")
    assert unavailable_reason("ort-cpu") is None and unavailable_reason("torch") is None


def test_auto_picks_the_best_usable_and_says_so(capsys):
    name, note = resolve_backend("auto", "cpu")
    assert name == AUTO_ORDER["cpu"][0] == "ort-cpu" and note == "backend auto: using ort-cpu"
    if not HAS_CUDA:
        name, note = resolve_backend("auto")
        assert name == "ort-cpu"
    backend = create_backend("auto", Tiny(), device="cpu", sample_shape=(3, 32, 32))
    assert backend.name == "ort-cpu" and backend.is_active
    assert "backend auto: using ort-cpu" in capsys.readouterr().err


def test_auto_falls_back_when_a_backend_fails_to_start(monkeypatch):
    """A library that fails to load (OSError) while a backend starts is not fatal to auto."""

    class Broken(Backend):
        name = "tensorrt"

        def __init__(self, *args, **kwargs) -> None:
            pass

        def _activate(self) -> None:
            raise OSError("libcudart.so.13: cannot open shared object file")

    monkeypatch.setitem(AUTO_ORDER, "cpu", ("tensorrt", "ort-cpu"))
    real = backends_module.unavailable_reason
    monkeypatch.setattr(
        backends_module,
        "unavailable_reason",
        lambda name: None if name == "tensorrt" else real(name),
    )
    monkeypatch.setattr(backends_module, "TensorRTBackend", Broken)
    notes: list[str] = []
    backend = create_backend("auto", Tiny(), device="cpu", notify=notes.append)
    assert backend.name == "ort-cpu"
    assert "tensorrt failed (OSError: libcudart.so.13" in notes[0]
    assert notes[-1].startswith("backend auto: using ort-cpu (tensorrt failed")


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


def test_ort_fp16_on_cpu(small_real_images):
    module = Tiny()
    backend = create_backend("ort-cpu", module, precision="fp16")
    assert backend.precision == "fp16"
    expected = module(small_real_images)
    assert torch.allclose(backend.run(small_real_images), expected, atol=2e-2)
    assert next(module.parameters()).dtype == torch.float32  # the caller's module is untouched


def test_a_provider_that_disagrees_is_refused(monkeypatch, tmp_path):
    """Each new runner is checked on its own provider against the module before use."""
    module = Tiny()
    real = backends_module.cpu_runner
    monkeypatch.setattr(backends_module, "cpu_runner", lambda s: lambda x: real(s)(x) + 0.5)
    with pytest.raises(BackendError, match=r"ort-cpu fp16 vs torch.*max abs diff 0\.5"):
        create_backend("ort-cpu", module, precision="fp16", sample_shape=(3, 32, 32))


# ---------------------------------------------------------------- precision policy (items 7, 8)


def test_fp16_keeps_lrn_in_fp32(tmp_path):
    module = WithLRN()
    half = to_half(module)
    assert isinstance(half.norm, Float32LRN) and half.conv.weight.dtype == torch.float16
    assert isinstance(module.norm, nn.LocalResponseNorm)  # the caller's module is untouched
    # Caffe-scale activations: squares summed over 5 channels pass half's 65504.
    x = torch.full((1, 5, 4, 4), 300.0)
    assert torch.isinf((x.half() ** 2).sum(1)).any()
    out = half.norm(x.half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), module.norm(x), rtol=1e-3, atol=1e-2)
    # In the exported fp16 graph, the LRN's average pool reads float32.
    path = export_onnx(Float16(module), tmp_path / "lrn.onnx", torch.rand(2, 3, 40, 40) * 255)
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    pools = [n for n in inferred.graph.node if n.op_type == "AveragePool"]
    assert pools and all(types.get(n.input[0]) == onnx.TensorProto.FLOAT for n in pools)
    convs = [n for n in inferred.graph.node if n.op_type == "Conv"]
    assert convs and all(types.get(n.output[0]) == onnx.TensorProto.FLOAT16 for n in convs)


def test_fp32_policy_is_ieee_everywhere():
    matmul = torch.backends.cuda.matmul
    before = getattr(matmul, "fp32_precision", None)
    with ieee_fp32():
        if hasattr(matmul, "fp32_precision"):
            assert matmul.fp32_precision == "ieee"
            assert torch.backends.cudnn.conv.fp32_precision == "ieee"
        else:
            assert not matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert getattr(matmul, "fp32_precision", None) == before  # restored
    options = cuda_provider_options(0, 12345)
    assert options["use_tf32"] == "0" and options["user_compute_stream"] == "12345"
    # The same switch turns TF32 on (benchmarks/backend_parity.py measures what it costs).
    with cuda_fp32("tf32"):
        if hasattr(matmul, "fp32_precision"):
            assert matmul.fp32_precision == "tf32"
        else:
            assert matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert getattr(matmul, "fp32_precision", None) == before
    with pytest.raises(ValueError, match="ieee or tf32"), cuda_fp32("fp16"):
        pass


# ---------------------------------------------------------------- ORT CUDA stream order (item 2)


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[str] = []


class FakeIO:
    def __init__(self, name: str, shape, type_: str = "tensor(float)") -> None:
        self.name, self.shape, self.type = name, shape, type_


class FakeSession:
    """Records the I/O binding calls; the output buffer is filled with 2 * input."""

    def __init__(self, log: _Recorder) -> None:
        self.log = log

    def get_inputs(self):
        return [FakeIO("input", ["batch", 3, 8, 8])]

    def get_outputs(self):
        return [FakeIO("output", ["batch", 3, 8, 8])]

    def io_binding(self):
        session = self

        class Binding:
            def bind_input(self, name, device, index, dtype, shape, pointer):
                session.log.calls.append(f"bind_input {device}:{index} {shape}")
                session.input_pointer = pointer

            def bind_output(self, name, device, index, dtype=None, shape=None, pointer=None):
                session.log.calls.append(f"bind_output {device}:{index} {shape}")
                session.output_pointer = pointer

        return Binding()

    def run_with_iobinding(self, binding):
        self.log.calls.append("run")


class FakeOrder:
    handle = 777

    def __init__(self, log: _Recorder) -> None:
        self.log = log

    def before(self) -> None:
        self.log.calls.append("engine stream waits for torch")

    def after(self, tensors) -> None:
        self.log.calls.append(f"torch waits for engine; {len(tensors)} tensors recorded")


def test_cuda_binding_runner_orders_the_engine_stream_with_torch():
    log = _Recorder()
    session = FakeSession(log)
    run = binding_runner(session, torch.device("cpu"), FakeOrder(log))
    x = torch.rand(2, 3, 8, 8)
    out = run(x)
    assert out.shape == (2, 3, 8, 8)
    assert log.calls == [
        "bind_input cuda:0 (2, 3, 8, 8)",
        "bind_output cuda:0 (2, 3, 8, 8)",
        "engine stream waits for torch",
        "run",
        "torch waits for engine; 2 tensors recorded",
    ]
    # ONNX Runtime is handed a real stream: the stream the runner orders, never 0.
    assert cuda_provider_options(0, FakeOrder.handle)["user_compute_stream"] == "777"
    with pytest.raises(ValueError, match="real CUDA stream"):
        cuda_provider_options(0, 0)


# ---------------------------------------------------------------- ort-trt engine cache (item 3)


def test_ort_trt_engine_cache_folder_is_per_onnx_content(tmp_path):
    images = synthetic()
    a = export_onnx(Tiny(seed=0), tmp_path / "a" / "model.onnx", images[:2])
    b = export_onnx(Tiny(seed=1), tmp_path / "b" / "model.onnx", images[:2])
    options = {p: ort_trt_options(p, fp16=False, opt_batch=4, max_batch=8) for p in (a, b)}
    folders = {p: options[p]["trt_engine_cache_path"] for p in (a, b)}
    assert folders[a] != folders[b]  # same file name, other weights: another engine cache
    again = export_onnx(Tiny(seed=0), tmp_path / "c" / "other-name.onnx", images[:2])
    same = ort_trt_options(again, fp16=False, opt_batch=4, max_batch=8)
    assert same["trt_engine_cache_path"] == folders[a]  # the same bytes share one cache
    b.write_bytes(a.read_bytes())  # a re-export over b: its cache folder follows the content
    assert (
        ort_trt_options(b, fp16=False, opt_batch=4, max_batch=8)["trt_engine_cache_path"]
        == (folders[a])
    )
    assert options[a]["trt_profile_max_shapes"] == "input:8x3x64x64"


# ---------------------------------------------------------------- TensorRT (items 1, 4, 5)


def test_tensorrt_11_and_broken_libraries_are_backend_errors(tmp_path, monkeypatch):
    fake = type(sys)("tensorrt")
    fake.__version__ = "11.0.0.1"
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    with pytest.raises(BackendError, match=r"TensorRT 11\.0\.0\.1 is not supported.*<11"):
        load_tensorrt()
    # A wheel whose libraries cannot be loaded raises OSError on import: a BackendError here.
    monkeypatch.delitem(sys.modules, "tensorrt")
    package = tmp_path / "site" / "tensorrt"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "raise OSError('libnvinfer.so.10: cannot open shared object file')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(BackendError, match="TensorRT cannot be loaded: OSError: libnvinfer.so.10"):
        load_tensorrt()


def test_engine_batch_plan_chunks_and_pads():
    assert batch_plan(10, 1, 4) == [(0, 4, 4), (4, 8, 4), (8, 10, 2)]
    assert batch_plan(10, 4, 4) == [(0, 4, 4), (4, 8, 4), (8, 10, 4)]  # fixed batch: padded
    assert batch_plan(1, 2, 8) == [(0, 1, 2)]
    assert batch_plan(3, 1, 128) == [(0, 3, 3)]
    with pytest.raises(BackendError, match="not a range"):
        batch_plan(3, 4, 2)


class FakeContext:
    """A TensorRT execution context that records the shapes it is run with."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []
        self.streams: list[int] = []

    def set_input_shape(self, name, shape) -> None:
        self.shapes.append(tuple(shape))

    def get_tensor_shape(self, name):
        return (self.shapes[-1][0], 10)

    def set_tensor_address(self, name, pointer) -> None:
        pass

    def execute_async_v3(self, stream: int) -> bool:
        self.streams.append(stream)
        return True


def test_user_engine_runs_within_its_own_batch_profile(tmp_path):
    """A fixed-batch-4 engine gets exactly 4 per call (padded), whatever the caller's batch."""
    log = _Recorder()
    runner = EngineRunner(tmp_path / "user.engine", "cpu")
    runner.context, runner.order = FakeContext(), FakeOrder(log)
    runner.input, runner.output = "input", "output"
    runner.in_dtype = runner.out_dtype = torch.float32
    runner.batch_range, runner.sample_shape = (4, 4), (3, 8, 8)
    out = runner(torch.rand(10, 3, 8, 8))
    assert out.shape == (10, 10)
    assert runner.context.shapes == [(4, 3, 8, 8)] * 3
    assert runner.context.streams == [777] * 3 and len(log.calls) == 6
    with pytest.raises(BackendError, match="does not fit the engine"):
        runner(torch.rand(2, 3, 16, 16))
    runner.deactivate()
    with pytest.raises(BackendError, match="not active"):
        runner(torch.rand(2, 3, 8, 8))


# ---------------------------------------------------------------- torch.compile (item 9)


def test_torch_compile_compiles_once_for_every_batch_size_above_one():
    graphs: list[str] = []

    def counting(graph_module, example_inputs):
        graphs.append(str([tuple(t.shape) for t in example_inputs if hasattr(t, "shape")]))
        return graph_module.forward

    torch._dynamo.reset()
    module = Tiny()
    with TorchBackend(module, compile=True, compiler=counting) as backend:
        for batch in (2, 3, 5, 7, 1, 4):
            x = synthetic(batch, 32, seed=batch)
            torch.testing.assert_close(backend.run(x), module(x), atol=1e-5, rtol=1e-5)
    assert len(graphs) <= 2, graphs  # one dynamic-batch graph (+ batch 1, specialised)


def test_load_classifier_on_onnx_runtime(small_real_images):
    from advpurify.models.classifiers import load_classifier

    onnx_clf = load_classifier("timm:mobilenetv3_small_050", backend="ort-cpu", weights="random")
    assert onnx_clf.backend == "ort-cpu" and onnx_clf.runner.is_active
    images = onnx_clf.prepare(small_real_images)  # 224 x 224, the size the file is exported for
    with torch.inference_mode():
        expected = onnx_clf.module(images)
    got = onnx_clf.logits(images, batch_size=3)
    assert got.device.type == "cpu" and got.shape == (4, 1000)
    assert (got - expected).abs().max() < 1e-3
    assert torch.equal(got.argmax(1), expected.argmax(1))
    # Any image size: prepared (resized, cropped) before the backend, as the module does.
    torch.testing.assert_close(onnx_clf.logits(small_real_images), got, atol=1e-4, rtol=0)
    onnx_clf.close()
    assert not onnx_clf.runner.is_active
    with pytest.raises(AdvpurifyError, match="unknown backend"):
        load_classifier("timm:mobilenetv3_small_050", backend="onnx", weights="random")


# ---------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@needs_cuda
def test_auto_on_a_gpu_prefers_the_fastest_usable_backend_on_the_gpu():
    module = Tiny().eval()  # a backend runs inference: BatchNorm with its running statistics
    images = synthetic()
    with torch.no_grad():
        expected = module(images)  # before the backend takes the module to the GPU
    notes: list[str] = []
    expected_order = [name for name in AUTO_ORDER["cuda"] if unavailable_reason(name) is None]
    backend = create_backend(
        "auto", module, device="cuda", sample_shape=(3, 64, 64), notify=notes.append
    )
    # The first usable of TensorRT > ORT CUDA > torch, never a CPU backend with a GPU present.
    assert backend.name in expected_order[: expected_order.index("torch") + 1]
    assert backend.device.startswith("cuda")
    assert notes[-1].startswith(f"backend auto: using {backend.name}")
    for skipped in AUTO_ORDER["cuda"][: AUTO_ORDER["cuda"].index(backend.name)]:
        assert skipped in notes[-1]  # and it says why each faster one was not used
    got = backend.run(images.cuda())
    assert got.is_cuda
    torch.testing.assert_close(got.cpu(), expected, atol=1e-3, rtol=1e-3)
    name, _ = resolve_backend("auto", "cuda")
    assert name == expected_order[0]


@pytest.mark.gpu
@needs_cuda
def test_torch_fp32_on_cuda_is_ieee_not_tf32():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.Flatten(), nn.Linear(64 * 256, 64))
    x = torch.randn(8, 64, 16, 16)
    exact = module.double()(x.double()).float()
    module.float()
    with TorchBackend(module, device="cuda") as backend:
        got = backend.run(x.cuda()).cpu()
    relative = float((got - exact).abs().max() / exact.abs().max())
    assert relative < 1e-4, relative  # TF32 (10-bit mantissa) gives about 1e-3


@pytest.mark.gpu
@needs_cuda
def test_torch_fp16_on_cuda_keeps_lrn_finite_on_caffe_scale_inputs():
    module = WithLRN()
    x = torch.rand(4, 3, 64, 64) * 255 - 120
    reference = module(x)
    with TorchBackend(module, device="cuda", precision="fp16") as backend:
        got = backend.run(x.cuda()).cpu()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, reference, atol=3e-2 * float(reference.abs().max()), rtol=0)


@pytest.mark.gpu
@needs_cuda
def test_stream_order_makes_the_engine_wait_for_torch():
    from advpurify.runtime.streams import StreamOrder

    order = StreamOrder("cuda")
    assert order.handle != 0
    a = torch.randn(4096, 4096, device="cuda")
    x = a @ a  # queued on torch's stream, likely still running
    order.before()
    with torch.cuda.stream(order.stream):
        copy = x.clone()  # on the engine stream: must see the finished product
    order.after([x, copy])
    torch.testing.assert_close(copy, a @ a)


@pytest.mark.gpu
@pytest.mark.skipif(
    not HAS_CUDA or unavailable_reason("ort-cuda") is not None,
    reason="needs a CUDA GPU and onnxruntime-gpu's CUDA provider",
)
def test_ort_cuda_io_binding_keeps_tensors_on_the_gpu():
    module = Tiny()
    images = synthetic()
    backend = create_backend("ort-cuda", module)
    got = backend.run(images.cuda())
    assert got.is_cuda
    assert torch.allclose(got.cpu(), module(images), atol=1e-4)
    # Inputs written by a torch kernel just before the call are what ONNX Runtime reads.
    for _ in range(3):
        fresh = (images.cuda() * 0.5 + 0.25).contiguous()
        assert torch.allclose(backend.run(fresh).cpu(), module(images * 0.5 + 0.25), atol=1e-4)
    backend.deactivate()


@pytest.mark.gpu
@needs_trt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_engine_matches_torch_and_is_cached(precision):
    from advpurify.runtime.installed import engine_cache_dir

    module = Tiny()
    images = synthetic()
    backend = create_backend("tensorrt", module, precision=precision, max_batch=8)
    got = backend.run(images.cuda())
    assert got.is_cuda
    tolerance = 1e-3 if precision == "fp32" else 3e-2
    assert torch.allclose(got.cpu(), module(images), atol=tolerance)
    engines = sorted(engine_cache_dir().glob("*.engine"))
    assert len(engines) == 1
    stamp = engines[0].stat().st_mtime_ns
    create_backend("tensorrt", module, precision=precision, max_batch=8).run(images.cuda())
    assert engines[0].stat().st_mtime_ns == stamp  # the cached engine was reused
    engines[0].write_bytes(b"corrupt" + engines[0].read_bytes()[7:])
    again = create_backend("tensorrt", module, precision=precision, max_batch=8)
    assert torch.allclose(again.run(images.cuda()).cpu(), got.cpu(), atol=tolerance)
    # More inputs than the profile's max batch: run in chunks.
    many = synthetic(20)
    assert torch.allclose(again.run(many.cuda()).cpu(), module(many), atol=tolerance)
    again.deactivate()


@pytest.mark.gpu
@needs_trt
def test_ort_tensorrt_provider():
    module = Tiny()
    images = synthetic()
    backend = create_backend("ort-trt", module)
    got = backend.run(images.cuda())
    assert torch.allclose(got.cpu(), module(images), atol=1e-3)
