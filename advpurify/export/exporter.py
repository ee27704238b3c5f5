"""``advpurify export``: a registered model, or purifier + classifier fused, to ONNX or TensorRT.

Every export is checked before it is kept: ``onnx.checker``, then ONNX Runtime against torch on
check inputs (real photographs from ``check_images`` when given, else deterministic synthetic
images), then, for ``.engine`` targets, the TensorRT engine against torch as well.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from advpurify.errors import AdvpurifyError
from advpurify.models.registry import Exportable, get_exportable
from advpurify.runtime.onnx import (
    DEFAULT_OPSET,
    ExportError,
    ParityReport,
    check_model,
    compare_with_torch,
    export_onnx,
    read_metadata,
)

ENGINE_SUFFIXES = (".engine", ".plan")


@dataclasses.dataclass
class ExportResult:
    path: Path
    parity: ParityReport
    exporter: str
    seconds: float
    engine_parity: ParityReport | None = None
    onnx_path: Path | None = None

    def lines(self) -> list[str]:
        out = [
            f"wrote {self.path} ({self.path.stat().st_size / 1e6:.1f} MB, "
            f"exporter {self.exporter}, {self.seconds:.1f} s)",
            self.parity.summary(),
        ]
        if self.engine_parity is not None:
            out.append(self.engine_parity.summary().replace("ORT", "TensorRT", 1))
        return out


def fit(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Scale a ``3 x H x W`` image to cover ``height x width`` (antialiased), centre-crop it."""
    h, w = image.shape[-2:]
    scale = max(height / h, width / w)
    size = (max(height, math.ceil(h * scale - 1e-6)), max(width, math.ceil(w * scale - 1e-6)))
    if size != (h, w):
        image = F.interpolate(
            image[None], size=size, mode="bilinear", align_corners=False, antialias=True
        )[0].clamp(0, 1)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return image[:, top : top + height, left : left + width].contiguous()


def synthetic_images(count: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Smooth random colour fields (structure at several scales), deterministic in ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.zeros(count, 3, height, width)
    for cells, weight in ((4, 0.5), (16, 0.3), (64, 0.2)):
        coarse = torch.rand(count, 3, cells, cells, generator=gen)
        out += weight * F.interpolate(
            coarse, size=(height, width), mode="bicubic", align_corners=False
        )
    return out.clamp(0, 1)


def check_inputs(
    entry: Exportable | None,
    sample_shape: tuple[int, ...],
    check_images: Path | None,
    count: int,
) -> tuple[torch.Tensor, str]:
    """``(inputs, description)`` to compare ONNX Runtime with torch on."""
    is_image = entry is None or entry.images
    if is_image and check_images is not None:
        from advpurify.images import find_images, load_image

        paths = find_images(check_images)[:count]
        if not paths:
            raise AdvpurifyError(f"--check-images {check_images}: no images found")
        _, height, width = sample_shape
        batch = torch.stack([fit(load_image(p), height, width) for p in paths])
        return batch, f"real images from {check_images}"
    if is_image:
        _, height, width = sample_shape
        return synthetic_images(count, height, width), "synthetic images (--check-images DIR: real)"
    low, high = entry.input_range
    gen = torch.Generator().manual_seed(0)
    values = low + (high - low) * torch.rand(count, *sample_shape, generator=gen)
    return values, f"random inputs in [{low:g}, {high:g}]"


def _export_checked(
    module: nn.Module,
    reference: nn.Module,
    output: Path,
    *,
    inputs: torch.Tensor,
    source: str,
    logits: bool,
    opset: int,
    batch: int | None,
    fp16: bool,
    metadata: dict[str, str],
    notify: Callable[[str], None],
) -> ExportResult:
    started = time.perf_counter()
    output = Path(output)
    engine_target = output.suffix in ENGINE_SUFFIXES
    if engine_target:
        from advpurify.runtime.backends import require

        require("tensorrt")  # fail before a long export, naming what is missing
    with tempfile.TemporaryDirectory(prefix="advpurify-export-") as scratch:
        onnx_path = Path(scratch) / (output.stem + ".onnx") if engine_target else output
        example = inputs[: (batch or 2)]
        if batch and example.shape[0] < batch:
            example = example[:1].expand(batch, *example.shape[1:]).contiguous()
        notify(
            f"exporting to ONNX (opset {opset}, batch {batch or 'dynamic'}, "
            f"{'fp16' if fp16 and not engine_target else 'fp32'})"
        )
        # A TensorRT FP16 engine is built from the fp32 graph: TensorRT picks its FP16 kernels.
        export_onnx(
            module,
            onnx_path,
            example,
            opset=opset,
            dynamic_batch=batch is None,
            fp16=fp16 and not engine_target,
            metadata=metadata,
        )
        try:
            check_model(onnx_path)
            parity = compare_with_torch(
                reference,
                onnx_path,
                inputs,
                logits=logits,
                fp16=fp16 and not engine_target,
                fixed_batch=batch,
                source=source,
            )
        except BaseException:
            onnx_path.unlink(missing_ok=True)
            raise
        exporter = read_metadata(onnx_path).get("advpurify.exporter", "?")
        if not engine_target:
            return ExportResult(output, parity, exporter, time.perf_counter() - started)
        engine_parity = _build_and_check_engine(
            reference,
            onnx_path,
            output,
            inputs,
            source=source,
            logits=logits,
            fp16=fp16,
            batch=batch,
            notify=notify,
        )
        elapsed = time.perf_counter() - started
        return ExportResult(output, parity, exporter, elapsed, engine_parity=engine_parity)


def _build_and_check_engine(
    reference: nn.Module,
    onnx_path: Path,
    output: Path,
    inputs: torch.Tensor,
    *,
    source: str,
    logits: bool,
    fp16: bool,
    batch: int | None,
    notify: Callable[[str], None],
) -> ParityReport:
    """Build the TensorRT engine from the checked ONNX file and compare it with torch."""
    from advpurify.runtime.backends import TensorRTBackend
    from advpurify.runtime.tensorrt import build_engine

    notify(f"building the TensorRT engine ({'fp16' if fp16 else 'fp32'})")
    build_engine(onnx_path, output, fp16=fp16, max_batch=batch or 128, opt_batch=batch or 16)
    backend = TensorRTBackend(
        output, precision="fp16" if fp16 else "fp32", notify=notify, max_batch=batch or 128
    )
    if batch:  # a fixed-batch engine takes exactly ``batch`` inputs per call
        repeats = math.ceil(batch / inputs.shape[0])
        inputs = inputs.repeat(repeats, *[1] * (inputs.dim() - 1))
        inputs = inputs[: inputs.shape[0] - inputs.shape[0] % batch]
    with torch.inference_mode():
        ref = torch.cat([reference(c) for c in inputs.split(batch or 16)])
        got = torch.cat([backend.run(c.cuda()).cpu() for c in inputs.split(batch or 16)])
    from advpurify.runtime.onnx import default_tolerance

    tolerance = default_tolerance(ref, fp16=fp16)
    diff = float((ref - got).abs().max())
    agreement = float((ref.argmax(1) == got.argmax(1)).float().mean()) if logits else None
    engine_parity = ParityReport(int(ref.shape[0]), diff, tolerance, agreement, source=source)
    if not engine_parity.passed:
        output.unlink(missing_ok=True)
        raise ExportError(
            f"{output}: TensorRT output does not match torch: {engine_parity.summary()}"
        )
    return engine_parity


def export_model(
    name: str,
    output: Path | str,
    *,
    weights: str | None = None,
    opset: int = DEFAULT_OPSET,
    batch: int | None = None,
    fp16: bool = False,
    check_images: Path | None = None,
    check_count: int = 16,
    notify: Callable[[str], None] = lambda _m: None,
) -> ExportResult:
    """Export registered model ``name`` (preprocessing inside) to ``output`` (.onnx or .engine)."""
    entry = get_exportable(name)
    module = entry.build(weights)
    inputs, source = check_inputs(entry, entry.sample_shape, check_images, check_count)
    metadata = {
        "advpurify.model": name,
        "advpurify.weights": str(weights or "default"),
        "advpurify.input": "x".join(map(str, entry.sample_shape)),
    }
    if entry.images:
        metadata["advpurify.input_range"] = "RGB [0, 1]"
    return _export_checked(
        module,
        module,
        Path(output),
        inputs=inputs,
        source=source,
        logits=entry.output == "logits",
        opset=opset,
        batch=batch,
        fp16=fp16,
        metadata=metadata,
        notify=notify,
    )


def export_fused(
    purifier: str,
    classifier: str,
    output: Path | str,
    *,
    params: Mapping[str, Any] | None = None,
    weights: str | None = None,
    size: int = 224,
    opset: int = DEFAULT_OPSET,
    batch: int | None = None,
    fp16: bool = False,
    check_images: Path | None = None,
    check_count: int = 16,
    notify: Callable[[str], None] = lambda _m: None,
) -> ExportResult:
    """One graph: ``purifier`` (with ``params``) then ``classifier``, on ``size x size`` input."""
    from advpurify.export.fused import build_purifier, fused_pair

    method = build_purifier(purifier, params)  # refuses non-exportable methods first
    entry = get_exportable(classifier)
    if entry.output != "logits":
        raise AdvpurifyError(f"--classifier {classifier}: not a classifier")
    net = entry.build(weights)
    to_export, reference = fused_pair(method, net)
    sample = (3, size, size)
    inputs, source = check_inputs(entry, sample, check_images, check_count)
    metadata = {
        "advpurify.model": f"{purifier}+{classifier}",
        "advpurify.purifier": repr(method),
        "advpurify.weights": str(weights or "default"),
        "advpurify.input": "x".join(map(str, sample)),
        "advpurify.input_range": "RGB [0, 1]",
    }
    return _export_checked(
        to_export,
        reference,
        Path(output),
        inputs=inputs,
        source=source,
        logits=True,
        opset=opset,
        batch=batch,
        fp16=fp16,
        metadata=metadata,
        notify=notify,
    )
