"""A cache of exported ONNX files keyed by what the module computes, checked by hash on reuse.

The key hashes the module's class, its structure (``repr``), every parameter and buffer, the
per-sample input shape, the opset, the precision and the torch version: another set of weights,
another input size or another exporter gives another file. Beside each file a ``.sha256`` file
records the file's own digest; a file whose bytes no longer match (truncated, overwritten,
corrupted) is rebuilt, never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from advpurify.files import remove_stale_temporaries_of, sha256_file
from advpurify.paths import cache_home
from advpurify.runtime.onnx import DEFAULT_OPSET, check_model, compare_with_torch, export_onnx

_LOCK = threading.Lock()


def module_digest(module: nn.Module) -> str:
    """sha256 of a module's class, structure and every tensor in its state (hex)."""
    digest = hashlib.sha256()
    digest.update(f"{type(module).__module__}.{type(module).__qualname__}\n".encode())
    digest.update(repr(module).encode())
    for key, tensor in module.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"\n{key}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        if tensor.numel():
            # Raw bytes through a uint8 view: works for every dtype, bfloat16 included.
            digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def record_digest(path: Path) -> str:
    """Write ``path``'s sha256 beside it (after the file is complete) and return it."""
    value = sha256_file(path)
    _sidecar(path).write_text(value + "\n")
    return value


def verified(path: Path) -> bool:
    """True when ``path`` exists and still has the digest recorded when it was written."""
    side = _sidecar(path)
    if not path.is_file() or not side.is_file():
        return False
    return side.read_text().strip() == sha256_file(path)


def discard(path: Path) -> None:
    for item in (path, _sidecar(path)):
        with contextlib.suppress(OSError):
            item.unlink()


def onnx_cache_dir() -> Path:
    return cache_home() / "onnx"


def onnx_key(module: nn.Module, sample_shape: Sequence[int], *, opset: int, fp16: bool) -> str:
    digest = hashlib.sha256()
    digest.update(module_digest(module).encode())
    digest.update(f"|shape={tuple(sample_shape)}|opset={opset}|fp16={fp16}".encode())
    digest.update(f"|torch={torch.__version__}".encode())
    return digest.hexdigest()


def cached_onnx(
    module: nn.Module,
    sample_shape: Sequence[int],
    *,
    name: str = "model",
    opset: int | None = None,
    fp16: bool = False,
    notify=None,
) -> Path:
    """The ONNX file for ``module`` on inputs of ``sample_shape`` (no batch axis; dynamic batch).

    Exported, checked (ONNX checker + parity with torch on two inputs) and cached on first use;
    later calls reuse the file after checking its digest, and rebuild it if the digest is wrong.
    """
    opset = opset or DEFAULT_OPSET
    key = onnx_key(module, sample_shape, opset=opset, fp16=fp16)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    path = onnx_cache_dir() / f"{safe}-{'fp16' if fp16 else 'fp32'}-{key[:20]}.onnx"
    with _LOCK:
        if verified(path):
            return path
        if path.exists():
            if notify:
                notify(f"cached ONNX file {path} does not match its recorded hash: rebuilding")
            discard(path)
        remove_stale_temporaries_of(path)  # left by an export that was killed
        example = torch.rand(2, *sample_shape, generator=torch.Generator().manual_seed(0))
        export_onnx(
            module,
            path,
            example,
            opset=opset,
            fp16=fp16,
            metadata={"advpurify.key": key, "advpurify.name": name},
        )
        try:
            check_model(path)
            compare_with_torch(
                module, path, example, logits=False, fp16=fp16, source="random inputs"
            )
        except BaseException:
            discard(path)
            raise
        record_digest(path)
        return path
