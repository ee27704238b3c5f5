"""TensorRT engines from ONNX files, built with NVIDIA Polygraphy's loaders and cached.

An engine is specific to the ONNX graph, the GPU model, the TensorRT version and the precision
(and the batch range of its optimisation profile), so the cache key hashes all of them and the
build happens once per combination. A timing cache shared by every build makes rebuilds for a
new profile or precision much faster. Each cached engine has its sha256 recorded beside it; one
whose bytes no longer match is rebuilt, never deserialized.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch

from advpurify.files import atomic_write_bytes, sha256_file
from advpurify.runtime.installed import BackendError, engine_cache_dir, require
from advpurify.runtime.onnx_cache import discard, record_digest, verified


def _input_dims(onnx_path: Path) -> tuple[str, list[int]]:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    first = model.graph.input[0]
    dims = [d.dim_value for d in first.type.tensor_type.shape.dim]
    if not all(dims[1:]):
        raise BackendError(f"{onnx_path}: only the batch axis may be dynamic for TensorRT")
    return first.name, dims


def engine_key(onnx_path: Path, *, fp16: bool, opt_batch: int, max_batch: int) -> str:
    import tensorrt as trt

    digest = hashlib.sha256()
    digest.update(sha256_file(onnx_path).encode())
    digest.update(f"|gpu={torch.cuda.get_device_name()}|trt={trt.__version__}".encode())
    precision = "fp16" if fp16 else "fp32"
    digest.update(f"|precision={precision}|batch=1,{opt_batch},{max_batch}".encode())
    return digest.hexdigest()


def build_engine(
    onnx_path: Path | str,
    engine_path: Path | str,
    *,
    fp16: bool = False,
    opt_batch: int = 16,
    max_batch: int = 128,
    timing_cache: Path | None = None,
) -> Path:
    """Build a serialized engine (dynamic batch 1..``max_batch``, tuned for ``opt_batch``)."""
    require("tensorrt")
    from polygraphy.backend.trt import (
        CreateConfig,
        EngineBytesFromNetwork,
        NetworkFromOnnxPath,
        Profile,
    )

    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    name, dims = _input_dims(onnx_path)
    sample = tuple(dims[1:])
    fixed = dims[0] if dims[0] > 0 else None
    low, opt, high = (fixed, fixed, fixed) if fixed else (1, min(opt_batch, max_batch), max_batch)
    profile = Profile().add(name, min=(low, *sample), opt=(opt, *sample), max=(high, *sample))
    timing_cache = timing_cache or engine_cache_dir() / "timing.cache"
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    config = CreateConfig(
        fp16=fp16,
        profiles=[profile],
        load_timing_cache=str(timing_cache) if timing_cache.is_file() else None,
    )
    build = EngineBytesFromNetwork(
        NetworkFromOnnxPath(str(onnx_path)), config=config, save_timing_cache=str(timing_cache)
    )
    try:
        data = build()
    except Exception as error:
        message = f"TensorRT could not build an engine from {onnx_path}: {error}"
        raise BackendError(message) from None
    if data is None:
        raise BackendError(f"TensorRT could not build an engine from {onnx_path}")
    atomic_write_bytes(engine_path, bytes(data))
    return engine_path


def cached_engine(
    onnx_path: Path | str,
    *,
    fp16: bool = False,
    opt_batch: int = 16,
    max_batch: int = 128,
    notify: Callable[[str], None] | None = None,
) -> Path:
    """The cached engine for this ONNX file on this GPU/TensorRT/precision; built when absent."""
    require("tensorrt")
    onnx_path = Path(onnx_path)
    key = engine_key(onnx_path, fp16=fp16, opt_batch=opt_batch, max_batch=max_batch)
    path = engine_cache_dir() / f"{onnx_path.stem}-{'fp16' if fp16 else 'fp32'}-{key[:20]}.engine"
    if verified(path):
        return path
    if path.exists() and notify:
        notify(f"cached engine {path} does not match its recorded hash: rebuilding")
    discard(path)
    if notify:
        notify(f"building a TensorRT engine for {onnx_path.name} (once per GPU and precision)")
    build_engine(onnx_path, path, fp16=fp16, opt_batch=opt_batch, max_batch=max_batch)
    record_digest(path)
    return path


def load_runner(engine_path: Path | str):
    """An activated Polygraphy ``TrtRunner`` for a serialized engine, with its I/O names."""
    require("tensorrt")
    import tensorrt as trt
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    try:
        engine = EngineFromBytes(BytesFromPath(str(engine_path)))()
    except Exception as error:
        message = f"{engine_path}: not a TensorRT engine for this GPU/version ({error})"
        raise BackendError(message) from None
    if engine is None:
        raise BackendError(f"{engine_path}: not a TensorRT engine for this GPU/version")
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    runner = TrtRunner(engine)
    runner.activate()
    return runner, inputs[0], outputs[0]
