"""ONNX Runtime sessions on exactly the execution provider asked for, and running them.

On CUDA (``ort-cuda``, ``ort-trt``) the session runs on a stream of its own, handed to the
provider as ``user_compute_stream`` and ordered with torch's by :class:`StreamOrder`; I/O
binding hands ONNX Runtime the torch tensors' device memory, so nothing crosses to the host.
``ort-trt`` caches its engines in one folder per ONNX file content (sha256): the provider's own
cache key is the file name and tensor names, not the weights, so two ``model.onnx`` files or a
re-export would otherwise reuse a stale engine.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from advpurify.errors import first_line
from advpurify.files import sha256_file
from advpurify.runtime.installed import (
    ORT_PROVIDERS,
    BackendError,
    engine_cache_dir,
    load_tensorrt,
    preload_cuda_libraries,
    require,
)
from advpurify.runtime.precision import ORT_CUDA_FP32

ORT_DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16}


class Order(Protocol):
    """What a CUDA runner needs from :class:`~advpurify.runtime.streams.StreamOrder`."""

    handle: int

    def before(self) -> None: ...

    def after(self, tensors) -> None: ...


def cuda_provider_options(device_index: int, stream: int) -> dict[str, str]:
    """CUDA provider options: torch's device, the runner's own stream, IEEE fp32 (no TF32)."""
    if not stream:
        raise ValueError("ONNX Runtime needs a real CUDA stream (0 makes it use its own)")
    return {
        "device_id": str(device_index),
        "user_compute_stream": str(stream),
        "has_user_compute_stream": "1",
        **ORT_CUDA_FP32,
    }


def ort_trt_options(
    path: Path | str, *, fp16: bool, opt_batch: int, max_batch: int, stream: int | None = None
) -> dict[str, object]:
    """TensorRT provider options; its engine cache folder is keyed by the file's sha256."""
    cache = engine_cache_dir() / "ort-trt" / sha256_file(path)
    options: dict[str, object] = {
        "trt_fp16_enable": bool(fp16),
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(engine_cache_dir() / "ort-trt"),
        **_ort_trt_profile(path, opt_batch, max_batch),
    }
    if stream:
        options["user_compute_stream"] = str(stream)
        options["has_user_compute_stream"] = "1"
    return options


def ort_session(
    path: Path | str,
    backend: str = "ort-cpu",
    *,
    threads: int | None = None,
    optimization: str = "all",
    fp16: bool = False,
    max_batch: int = 128,
    opt_batch: int = 16,
    spin: bool = False,
    stream: int | None = None,
):
    """An ``InferenceSession`` on exactly the provider asked for (checked after creation).

    ``backend``: ort-cpu, ort-cuda or ort-trt. ``stream``: the CUDA stream handle the session
    runs on (CUDA backends; see :class:`~advpurify.runtime.streams.StreamOrder`). ``threads``:
    intra-op threads (default: every core torch uses). ``optimization``: basic, extended or all
    (graph optimisation level). ``spin``: idle intra-op threads busy-wait for the next operator.
    Off by default: on a shared 2-core machine, spinning threads took the cores from reader
    threads and from each other, and GoogLeNet ran 1.5x faster without it (26.8 -> 45.9 img/s,
    batch 16, same run); on a dedicated machine it is worth a few percent.
    """
    if backend not in ORT_PROVIDERS:
        raise BackendError(
            f"{backend!r} is not an ONNX Runtime backend ({', '.join(ORT_PROVIDERS)})"
        )
    require(backend)
    import onnxruntime as ort  # optional heavy dependency

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[optimization]
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers: list = []
    if backend != "ort-cpu":
        preload_cuda_libraries()
        device_index = torch.cuda.current_device()
        if backend == "ort-trt":
            load_tensorrt()  # libnvinfer.so.10 for the provider's dlopen
            trt = ort_trt_options(
                path, fp16=fp16, opt_batch=opt_batch, max_batch=max_batch, stream=stream
            )
            Path(str(trt["trt_engine_cache_path"])).mkdir(parents=True, exist_ok=True)
            providers.append(("TensorrtExecutionProvider", trt))
        providers.append(("CUDAExecutionProvider", cuda_provider_options(device_index, stream)))
    providers.append("CPUExecutionProvider")
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as error:  # onnxruntime raises its own types, and OSError for libraries
        message = f"backend {backend}: onnxruntime could not load {path}: {first_line(error)}"
        raise BackendError(message) from None
    wanted = ORT_PROVIDERS[backend]
    if session.get_providers()[0] != wanted:
        raise BackendError(
            f"backend {backend}: onnxruntime could not create a session on {wanted} "
            f"(got {', '.join(session.get_providers())}; CUDA/cuDNN/TensorRT libraries missing?)"
        )
    return session


def _ort_trt_profile(path: Path | str, opt_batch: int, max_batch: int) -> dict[str, str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    first = model.graph.input[0]
    dims = [d.dim_value for d in first.type.tensor_type.shape.dim][1:]
    if not all(dims):
        return {}

    def shape(batch: int) -> str:
        return f"{first.name}:" + "x".join(str(d) for d in (batch, *dims))

    return {
        "trt_profile_min_shapes": shape(1),
        "trt_profile_opt_shapes": shape(opt_batch),
        "trt_profile_max_shapes": shape(max_batch),
    }


# ---------------------------------------------------------------- running a session


def cpu_runner(session) -> Callable[[torch.Tensor], torch.Tensor]:
    """``run(batch) -> output`` through numpy, on the batch's device."""
    first = session.get_inputs()[0]
    dtype = ORT_DTYPES.get(first.type, torch.float32)
    output = session.get_outputs()[0].name

    def run(batch: torch.Tensor) -> torch.Tensor:
        array = batch.detach().to("cpu", dtype).contiguous().numpy()
        result = session.run([output], {first.name: array})[0]
        return torch.from_numpy(np.asarray(result)).float().to(batch.device)

    return run


def binding_runner(
    session, device: torch.device, order: Order
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``run(batch) -> output`` with I/O binding on ``device``, ordered by ``order``."""
    first, output = session.get_inputs()[0], session.get_outputs()[0]
    in_dtype = ORT_DTYPES.get(first.type, torch.float32)
    out_dtype = ORT_DTYPES.get(output.type, torch.float32)
    rest = output.shape[1:]
    static_rest = all(isinstance(d, int) and d > 0 for d in rest)
    index = device.index or 0

    def run(batch: torch.Tensor) -> torch.Tensor:
        x = batch.detach().to(device, in_dtype).contiguous()
        binding = session.io_binding()
        numpy_in = np.float16 if in_dtype == torch.float16 else np.float32
        binding.bind_input(first.name, "cuda", index, numpy_in, tuple(x.shape), x.data_ptr())
        if static_rest:
            out = torch.empty((x.shape[0], *rest), dtype=out_dtype, device=device)
            numpy_out = np.float16 if out_dtype == torch.float16 else np.float32
            binding.bind_output(
                output.name, "cuda", index, numpy_out, tuple(out.shape), out.data_ptr()
            )
            order.before()
            session.run_with_iobinding(binding)
            order.after([x, out])
        else:
            binding.bind_output(output.name, "cuda", index)
            order.before()
            session.run_with_iobinding(binding)
            order.after([x])
            out = torch.from_numpy(binding.copy_outputs_to_cpu()[0]).to(device)
        return out.float().to(batch.device)

    return run
