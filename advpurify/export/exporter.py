"""``advpurify export``: a registered model, or purifier + classifier fused, to ONNX or TensorRT.

Every export is checked before it is kept: ``onnx.checker``, then ONNX Runtime against torch on
check inputs (real photographs from ``check_images`` when given, else deterministic synthetic
images), then, for ``.engine`` targets, the TensorRT engine against torch as well.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from advpurify import checks
from advpurify.errors import AdvpurifyError
from advpurify.files import atomic_output
from advpurify.models.registry import Exportable, get_exportable
from advpurify.runtime.installed import require, unavailable_reason
from advpurify.runtime.onnx import (
    DEFAULT_OPSET,
    ExportError,
    check_model,
    check_opset,
    compare_with_torch,
    export_onnx,
    read_metadata,
)
from advpurify.runtime.parity import ParityReport, compare
from advpurify.runtime.tensorrt import ENGINE_SUFFIXES, EngineRunner, build_engine


@dataclasses.dataclass
class ExportResult:
    path: Path
    parity: ParityReport
    exporter: str
    seconds: float
    engine_parity: ParityReport | None = None
    onnx_path: Path | None = None
    provider_parity: tuple[ParityReport, ...] = ()  # fp16 files on the GPU providers present

    def lines(self) -> list[str]:
        out = [
            f"wrote {self.path} ({self.path.stat().st_size / 1e6:.1f} MB, "
            f"exporter {self.exporter}, {self.seconds:.1f} s)",
            self.parity.summary(),
        ]
        out += [report.summary() for report in self.provider_parity]
        if self.engine_parity is not None:
            out.append(self.engine_parity.summary())
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
        require("tensorrt")  # fail before a long export, naming what is missing
    checks = {
        "inputs": inputs,
        "logits": logits,
        "fp16": fp16,
        "fixed_batch": batch,
        "source": source,
    }
    with tempfile.TemporaryDirectory(prefix="advpurify-export-") as scratch:
        # Written and checked aside; only a file that passed replaces the target (a failed or
        # interrupted export leaves the previous file as it was).
        onnx_path = Path(scratch) / (output.stem + ".onnx")
        example = inputs[: (batch or 2)]
        if batch and example.shape[0] < batch:
            example = example[:1].expand(batch, *example.shape[1:]).contiguous()
        notify(
            f"exporting to ONNX (opset {opset}, batch {batch or 'dynamic'}, "
            f"{'fp16' if fp16 else 'fp32'})"
        )
        # A TensorRT engine is built strongly typed from this graph: fp16 is the fp16 graph.
        export_onnx(
            module,
            onnx_path,
            example,
            opset=opset,
            dynamic_batch=batch is None,
            fp16=fp16,
            metadata=metadata,
        )
        try:
            check_model(onnx_path)
            # Failures name the output asked for, not this scratch file.
            subject = str(output) if not engine_target else f"{output} (its ONNX graph)"
            parity = compare_with_torch(reference, onnx_path, subject=subject, **checks)
            # fp16 arithmetic differs by provider (ORT CPU casts around fp16 nodes): check the
            # file on each GPU provider present too, the ones that will run it.
            on_gpu = tuple(
                compare_with_torch(
                    reference, onnx_path, provider=provider, subject=subject, **checks
                )
                for provider in ("ort-cuda",)
                if fp16 and not engine_target and unavailable_reason(provider) is None
            )
        except BaseException:
            onnx_path.unlink(missing_ok=True)
            raise
        exporter = read_metadata(onnx_path).get("advpurify.exporter", "?")
        if not engine_target:
            _move_into_place(onnx_path, output)
            seconds = time.perf_counter() - started
            return ExportResult(output, parity, exporter, seconds, provider_parity=on_gpu)
        notify(f"building the TensorRT engine ({'fp16' if fp16 else 'fp32'}, strongly typed)")
        engine = Path(scratch) / output.name
        build_engine(onnx_path, engine, max_batch=batch or 128, opt_batch=batch or 16)
        engine_parity = check_engine(reference, engine, subject=str(output), **checks)
        _move_into_place(engine, output)
        elapsed = time.perf_counter() - started
        return ExportResult(output, parity, exporter, elapsed, engine_parity=engine_parity)


def check_output_suffix(output: Path | str) -> None:
    """The suffix picks what is written: ONNX (.onnx) or a TensorRT engine (.engine, .plan)."""
    suffix = Path(output).suffix
    if suffix != ".onnx" and suffix not in ENGINE_SUFFIXES:
        known = ", ".join([".onnx", *sorted(ENGINE_SUFFIXES)])
        raise AdvpurifyError(f"{output}: name an ONNX file or an engine ({known})")


def _move_into_place(checked: Path, output: Path) -> None:
    """Copy a checked file over ``output`` atomically (the scratch folder may be on another
    file system, where a rename cannot reach)."""
    with atomic_output(output) as tmp:
        shutil.copyfile(checked, tmp)


def check_engine(
    reference: nn.Module,
    engine: Path,
    *,
    inputs: torch.Tensor,
    logits: bool,
    fp16: bool,
    fixed_batch: int | None,
    source: str,
    subject: str | None = None,
) -> ParityReport:
    """The TensorRT engine against torch with the one parity rule; raises ExportError naming
    ``subject`` (default: the engine file)."""
    runner = EngineRunner(engine, torch.device("cuda", torch.cuda.current_device())).activate()
    try:
        report = compare(
            reference,
            runner,
            inputs,
            logits=logits,
            precision="fp16" if fp16 else "fp32",
            fixed_batch=fixed_batch,
            source=source,
            names=("torch", "TensorRT"),
        )
    finally:
        runner.deactivate()
    return report.check(str(engine) if subject is None else subject, ExportError)


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
    check_opset(opset)  # before the model is built
    check_output_suffix(output)
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

    checks.at_least("size", size, 16)  # as the CLI's --size
    check_opset(opset)
    check_output_suffix(output)
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
