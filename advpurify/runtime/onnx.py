"""Export an ``nn.Module`` to ONNX and prove the file computes what the module computes.

Exporter: torch 2.x's ``torch.export``-based exporter (``dynamo=True``, the default since 2.9,
needs ``onnxscript``). It gave the same graph speed on ONNX Runtime as the legacy TorchScript
exporter for GoogLeNet here and is the one PyTorch maintains, so it is tried first; the legacy
exporter remains a fallback for modules ``torch.export`` cannot trace, and the exporter used is
recorded in the file's metadata. The batch axis is dynamic unless a fixed batch is asked for.

Every export is checked twice: ``onnx.checker`` (structure, types, opset), then ONNX Runtime's
output against torch's on the same inputs (max abs difference, top-1 agreement for logits);
past the tolerance the export fails loudly and the file is removed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from advpurify.errors import AdvpurifyError, first_line
from advpurify.files import atomic_output

DEFAULT_OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "output"


class ExportError(AdvpurifyError, RuntimeError):
    """An export that failed, or whose ONNX file disagrees with torch."""


class _Float16(nn.Module):
    """FP16 weights and arithmetic inside, float32 in and out (the project's image convention)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.inner = copy.deepcopy(module).half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.half()).float()


@dataclasses.dataclass(frozen=True)
class ParityReport:
    """How closely ONNX Runtime reproduced torch on ``count`` inputs."""

    count: int
    max_abs_diff: float
    tolerance: float
    top1_agreement: float | None  # fraction of inputs with the same argmax (logits only)
    top1_disagreements: tuple[int, ...] = ()
    source: str = ""
    top1: tuple[int, ...] = ()  # ONNX Runtime's top-1 class per input (logits only)
    reference_top1: tuple[int, ...] = ()  # torch's

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def summary(self) -> str:
        text = (
            f"ORT vs torch on {self.count} {self.source or 'inputs'}: "
            f"max abs diff {self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g})"
        )
        if self.top1_agreement is not None:
            agree = round(self.top1_agreement * self.count)
            text += f", top-1 identical on {agree}/{self.count}"
        return text


def on_cpu(module: nn.Module) -> nn.Module:
    """``module`` itself when it lives on the CPU, else a CPU copy (the caller's stays put)."""
    tensors = [*module.parameters(), *module.buffers()]
    if all(t.device.type == "cpu" for t in tensors):
        return module.eval()
    return copy.deepcopy(module).to("cpu").eval()


def export_onnx(
    module: nn.Module,
    path: Path | str,
    example: torch.Tensor,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    fp16: bool = False,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``module`` (eval mode, CPU) as one self-contained ONNX file, atomically.

    ``example`` is one input batch (its per-sample shape is fixed in the graph; its batch size is
    the fixed batch when ``dynamic_batch`` is false). Returns the path written.
    """
    path = Path(path)
    module = on_cpu(module)
    example = example.detach().to("cpu", torch.float32)
    if fp16:
        module = _Float16(module).eval()
    if dynamic_batch and example.shape[0] < 2:
        # torch.export specialises a batch of 1 to a constant: trace with two samples.
        example = example.expand(2, *example.shape[1:]).contiguous()
    with atomic_output(path) as tmp:
        exporter = _export_to(module, example, tmp, opset=opset, dynamic_batch=dynamic_batch)
        _add_metadata(tmp, {"advpurify.exporter": exporter, **(metadata or {})})
    return path


def _export_to(
    module: nn.Module, example: torch.Tensor, path: Path, *, opset: int, dynamic_batch: bool
) -> str:
    errors = []
    with torch.no_grad():
        try:
            kwargs = {}
            if dynamic_batch:
                kwargs["dynamic_shapes"] = ({0: torch.export.Dim.DYNAMIC},)
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    module,
                    (example,),
                    str(path),
                    dynamo=True,
                    external_data=False,
                    opset_version=opset,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    verbose=False,
                    **kwargs,
                )
            return f"torch.export (torch {torch.__version__})"
        except Exception as error:  # the legacy exporter traces more Python than torch.export
            errors.append(f"torch.export: {first_line(error)}")
        try:
            axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    module,
                    (example,),
                    str(path),
                    dynamo=False,
                    opset_version=min(opset, 20),
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_axes=axes,
                )
            return f"torchscript (torch {torch.__version__})"
        except Exception as error:
            errors.append(f"torchscript: {first_line(error)}")
    raise ExportError(f"{type(module).__name__} could not be exported: " + "; ".join(errors))


def _add_metadata(path: Path, values: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    for key, value in values.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.save(model, str(path))


def read_metadata(path: Path | str) -> dict[str, str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {entry.key: entry.value for entry in model.metadata_props}


def check_model(path: Path | str) -> None:
    """``onnx.checker`` with full shape inference; raises :class:`ExportError` naming the file."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as error:
        raise ExportError(f"{path}: ONNX checker failed: {first_line(error)}") from None


def default_tolerance(reference: torch.Tensor, fp16: bool) -> float:
    """Absolute tolerance scaled to the output's magnitude (fp32: 1e-3, fp16: 3e-2 relative)."""
    scale = max(1.0, float(reference.abs().max()))
    return (3e-2 if fp16 else 1e-3) * scale


def compare_with_torch(
    module: nn.Module,
    path: Path | str,
    inputs: torch.Tensor,
    *,
    logits: bool,
    fp16: bool = False,
    tolerance: float | None = None,
    batch_size: int = 16,
    fixed_batch: int | None = None,
    source: str = "",
    raise_on_failure: bool = True,
) -> ParityReport:
    """Run ``inputs`` through torch (float32 reference) and ONNX Runtime CPU; compare outputs.

    Fails (``ExportError``) when the max abs difference passes ``tolerance``, or when a top-1
    prediction flips where torch's winning margin is wider than twice the tolerance (a real
    disagreement, not a near tie that any rounding may break).
    """
    from advpurify.runtime.ort import ort_session

    session = ort_session(path, "cpu")
    module = on_cpu(module)
    reference, produced = [], []
    step = fixed_batch or batch_size
    with torch.inference_mode():
        for start in range(0, inputs.shape[0], step):
            chunk = inputs[start : start + step].to("cpu", torch.float32).contiguous()
            count = chunk.shape[0]
            if fixed_batch and count < fixed_batch:  # a file with a fixed batch: pad, then drop
                chunk = torch.cat([chunk, chunk[-1:].expand(fixed_batch - count, *chunk.shape[1:])])
            reference.append(module(chunk).float()[:count])
            out = session.run(None, {session.get_inputs()[0].name: chunk.contiguous().numpy()})[0]
            produced.append(torch.from_numpy(np.asarray(out, dtype=np.float32))[:count])
    ref = torch.cat(reference)
    got = torch.cat(produced)
    if ref.shape != got.shape:
        shapes = f"{tuple(got.shape)} != torch {tuple(ref.shape)}"
        raise ExportError(f"{path}: ONNX output shape {shapes}")
    if tolerance is None:
        tolerance = default_tolerance(ref, fp16)
    max_diff = float((ref - got).abs().max()) if ref.numel() else 0.0
    agreement, flips, real_flips = None, (), []
    if logits:
        ref_flat, got_flat = ref.flatten(1), got.flatten(1)
        same = ref_flat.argmax(1) == got_flat.argmax(1)
        agreement = float(same.float().mean())
        flips = tuple(int(i) for i in torch.nonzero(~same).flatten())
        top2 = ref_flat.topk(min(2, ref_flat.shape[1]), dim=1).values
        margin = top2[:, 0] - top2[:, -1]
        real_flips = [i for i in flips if float(margin[i]) > 2 * tolerance]
    report = ParityReport(
        count=int(ref.shape[0]),
        max_abs_diff=max_diff,
        tolerance=float(tolerance),
        top1_agreement=agreement,
        top1_disagreements=flips,
        source=source,
        top1=tuple(got.flatten(1).argmax(1).tolist()) if logits else (),
        reference_top1=tuple(ref.flatten(1).argmax(1).tolist()) if logits else (),
    )
    if raise_on_failure and (not report.passed or real_flips):
        raise ExportError(f"{path}: ONNX output does not match torch: {report.summary()}")
    return report
