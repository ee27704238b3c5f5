"""TensorRT engines: built from ONNX files and cached, loaded, and run, with TensorRT's own API.

Build: a strongly typed network (the precision is the ONNX graph's: an fp16 graph from
``export_onnx(fp16=True)``, LocalResponseNorm kept fp32 inside it), one optimisation profile for
the dynamic batch, TF32 cleared (the fp32 policy in ``runtime.precision``), a timing cache shared
by every build. This is the one way TensorRT 11 still builds (it removed the FP16 builder flag
and every other weak-typing flag); TensorRT 10 builds it the same.

An engine is specific to the ONNX graph, the GPU model, the TensorRT version and its batch
range, so the cache key hashes all of them. Each cached engine has its sha256 recorded beside
it; one whose bytes no longer match is rebuilt, never deserialized.

Run (:class:`EngineRunner`): ``set_tensor_address`` + ``execute_async_v3`` on the runner's own
CUDA stream, ordered with torch's (``runtime.streams``), on torch tensors; no Polygraphy runner
and its per-call checks, no host copies. An engine's own batch profile is honoured: a batch
larger than its maximum is run in chunks, a chunk smaller than its minimum is padded (a
fixed-batch engine: every chunk has exactly that batch).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from advpurify.errors import first_line
from advpurify.files import atomic_write_bytes, sha256_file
from advpurify.runtime.installed import BackendError, engine_cache_dir, load_tensorrt, require
from advpurify.runtime.onnx_cache import discard, record_digest, verified
from advpurify.runtime.streams import StreamOrder

ENGINE_SUFFIXES = (".engine", ".plan")


def _input_dims(onnx_path: Path) -> tuple[str, list[int]]:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    first = model.graph.input[0]
    dims = [d.dim_value for d in first.type.tensor_type.shape.dim]
    if not all(dims[1:]):
        raise BackendError(f"{onnx_path}: only the batch axis may be dynamic for TensorRT")
    return first.name, dims


def engine_key(onnx_path: Path, *, opt_batch: int, max_batch: int) -> str:
    trt = load_tensorrt()
    digest = hashlib.sha256()
    digest.update(sha256_file(onnx_path).encode())
    digest.update(f"|gpu={torch.cuda.get_device_name()}|trt={trt.__version__}".encode())
    digest.update(f"|batch=1,{opt_batch},{max_batch}|strongly-typed|no-tf32".encode())
    return digest.hexdigest()


def build_engine(
    onnx_path: Path | str,
    engine_path: Path | str,
    *,
    opt_batch: int = 16,
    max_batch: int = 128,
    timing_cache: Path | None = None,
) -> Path:
    """Build a serialized engine (dynamic batch 1..``max_batch``, tuned for ``opt_batch``; a
    fixed-batch file: that batch) in the ONNX graph's own precision (strongly typed)."""
    require("tensorrt")
    trt = load_tensorrt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    name, dims = _input_dims(onnx_path)
    sample = tuple(dims[1:])
    fixed = dims[0] if dims[0] > 0 else None
    low, opt, high = (fixed, fixed, fixed) if fixed else (1, min(opt_batch, max_batch), max_batch)
    timing_cache = timing_cache or engine_cache_dir() / "timing.cache"
    logger = trt.Logger(trt.Logger.ERROR)
    try:
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendError(f"TensorRT could not parse {onnx_path}: {errors[:300]}")
        config = builder.create_builder_config()
        if hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means IEEE fp32 (runtime.precision)
        profile = builder.create_optimization_profile()
        profile.set_shape(name, (low, *sample), (opt, *sample), (high, *sample))
        config.add_optimization_profile(profile)
        cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(cache_bytes)
        config.set_timing_cache(cache, ignore_mismatch=True)
        data = builder.build_serialized_network(network, config)
    except BackendError:
        raise
    except Exception as error:  # TensorRT raises TypeError/RuntimeError; OSError for libraries
        message = f"TensorRT could not build an engine from {onnx_path}: {first_line(error)}"
        raise BackendError(message) from None
    if data is None:
        raise BackendError(f"TensorRT could not build an engine from {onnx_path} (see its log)")
    atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))
    atomic_write_bytes(engine_path, bytes(data))
    return engine_path


def cached_engine(
    onnx_path: Path | str,
    *,
    opt_batch: int = 16,
    max_batch: int = 128,
    notify: Callable[[str], None] | None = None,
) -> Path:
    """The cached engine for this ONNX file on this GPU/TensorRT/batch range; built if absent."""
    require("tensorrt")
    onnx_path = Path(onnx_path)
    key = engine_key(onnx_path, opt_batch=opt_batch, max_batch=max_batch)
    path = engine_cache_dir() / f"{onnx_path.stem}-{key[:20]}.engine"
    if verified(path):
        return path
    if path.exists() and notify:
        notify(f"cached engine {path} does not match its recorded hash: rebuilding")
    discard(path)
    if notify:
        notify(f"building a TensorRT engine for {onnx_path.name} (once per GPU)")
    build_engine(onnx_path, path, opt_batch=opt_batch, max_batch=max_batch)
    record_digest(path)
    return path


def batch_plan(count: int, low: int, high: int) -> list[tuple[int, int, int]]:
    """``(start, stop, run_size)`` chunks of ``count`` inputs for a batch range
    ``low..high``: at most ``high`` each; one smaller than ``low`` is padded to ``low``."""
    if not 1 <= low <= high:
        raise BackendError(f"engine batch range {low}..{high} is not a range")
    plan = []
    for start in range(0, count, high):
        stop = min(count, start + high)
        plan.append((start, stop, max(low, stop - start)))
    return plan


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}
    if dtype not in table:
        raise BackendError(f"engine tensor type {dtype} is not supported (float32, float16)")
    return table[dtype]


class EngineRunner:
    """One serialized engine and one execution context; ``activate``/``deactivate`` as
    Polygraphy's runners, ``runner(batch) -> output`` on the batch's device."""

    def __init__(self, engine_path: Path | str, device: torch.device | str) -> None:
        self.path = Path(engine_path)
        self.device = torch.device(device)
        self._lock = threading.Lock()  # an execution context runs one call at a time
        self.engine = self.context = self.order = None

    def activate(self) -> EngineRunner:
        if self.context is not None:
            return self
        trt = load_tensorrt()
        try:
            data = self.path.read_bytes()
        except OSError as error:
            raise BackendError(f"{self.path}: cannot be read ({first_line(error)})") from None
        try:
            with torch.cuda.device(self.device):
                self._runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
                engine = self._runtime.deserialize_cuda_engine(data)
                if engine is None:
                    raise BackendError(f"{self.path}: not a TensorRT engine for this GPU/version")
                context = engine.create_execution_context()
        except BackendError:
            raise
        except Exception as error:  # TensorRT's own errors, OSError for its libraries
            message = f"{self.path}: not a TensorRT engine for this GPU/version"
            raise BackendError(f"{message} ({first_line(error)})") from None
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise BackendError(f"{self.path}: one input and one output expected")
        self.input, self.output = inputs[0], outputs[0]
        self.in_dtype = _torch_dtype(trt, engine.get_tensor_dtype(self.input))
        self.out_dtype = _torch_dtype(trt, engine.get_tensor_dtype(self.output))
        shape = tuple(engine.get_tensor_shape(self.input))
        if shape[0] == -1:  # dynamic batch: the engine's own profile (0) bounds it
            low, _opt, high = engine.get_tensor_profile_shape(self.input, 0)
            self.batch_range = (int(low[0]), int(high[0]))
        else:
            self.batch_range = (int(shape[0]), int(shape[0]))
        self.sample_shape = tuple(int(d) for d in shape[1:])
        self.engine, self.context = engine, context
        self.order = StreamOrder(self.device)
        return self

    def deactivate(self) -> None:
        # The context before the engine before the runtime (TensorRT's required order).
        self.context = self.engine = self.order = None
        self._runtime = None

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if self.context is None:
            raise BackendError(f"{self.path}: the engine runner is not active")
        if tuple(batch.shape[1:]) != self.sample_shape:
            raise BackendError(
                f"{self.path}: input {tuple(batch.shape[1:])} does not fit the engine's "
                f"{self.sample_shape}"
            )
        x = batch.detach().to(self.device, self.in_dtype).contiguous()
        outs = []
        with self._lock:
            for start, stop, size in batch_plan(x.shape[0], *self.batch_range):
                chunk = x[start:stop]
                if size > chunk.shape[0]:
                    pad = chunk[-1:].expand(size - chunk.shape[0], *chunk.shape[1:])
                    chunk = torch.cat([chunk, pad])
                outs.append(self._execute(chunk.contiguous())[: stop - start])
        return torch.cat(outs).float().to(batch.device)

    def _execute(self, chunk: torch.Tensor) -> torch.Tensor:
        context = self.context
        context.set_input_shape(self.input, tuple(chunk.shape))
        out = torch.empty(
            tuple(context.get_tensor_shape(self.output)), dtype=self.out_dtype, device=self.device
        )
        context.set_tensor_address(self.input, chunk.data_ptr())
        context.set_tensor_address(self.output, out.data_ptr())
        self.order.before()
        ok = context.execute_async_v3(self.order.handle)
        self.order.after([chunk, out])
        if not ok:
            raise BackendError(f"{self.path}: TensorRT failed to run the batch")
        return out
