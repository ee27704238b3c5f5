"""Export an ``nn.Module`` to ONNX and prove the file computes what the module computes.

Exporter: torch 2.x's ``torch.export``-based exporter (``dynamo=True``, the default since 2.9,
needs ``onnxscript``). It gave the same graph speed on ONNX Runtime as the legacy TorchScript
exporter for GoogLeNet here and is the one PyTorch maintains, so it is tried first; the legacy
exporter remains a fallback for modules ``torch.export`` cannot trace, and the exporter used is
recorded in the file's metadata. The batch axis is dynamic unless a fixed batch is asked for.

Every export is checked twice: ``onnx.checker`` (structure, types, opset), then ONNX Runtime's
output against torch's on the same inputs (max abs difference, top-1 agreement for logits);
past the tolerance the export fails loudly and no file is kept.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from advpurify.errors import AdvpurifyError, first_line
from advpurify.files import atomic_output
from advpurify.runtime.ort import binding_runner, cpu_runner, ort_session
from advpurify.runtime.parity import ParityError, ParityReport, compare
from advpurify.runtime.precision import Float16
from advpurify.runtime.streams import StreamOrder

DEFAULT_OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "output"


class ExportError(AdvpurifyError, RuntimeError):
    """An export that failed, or whose ONNX file disagrees with torch."""


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
    check_opset(opset)
    module = on_cpu(module)
    example = example.detach().to("cpu", torch.float32)
    if fp16:
        module = Float16(module).eval()
    if dynamic_batch and example.shape[0] < 2:
        # torch.export specialises a batch of 1 to a constant: trace with two samples.
        example = example.expand(2, *example.shape[1:]).contiguous()
    with atomic_output(path) as tmp:
        exporter = _export_to(module, example, tmp, opset=opset, dynamic_batch=dynamic_batch)
        written = file_opset(tmp)
        if written != opset:
            # torch.export writes its own opset when it cannot convert to the one asked for.
            raise ExportError(f"opset {opset}: the exporter wrote opset {written} instead")
        _add_metadata(tmp, {"advpurify.exporter": exporter, **(metadata or {})})
    return path


MIN_OPSET = 18  # torch.export's exporter writes 18 and above
LEGACY_MAX_OPSET = 20  # the TorchScript exporter's highest


def check_opset(opset: int) -> None:
    """Refuse an opset the exporters cannot write, before any export."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise ExportError(f"opset {opset!r}: use {MIN_OPSET} to {newest} (this onnx's newest)")


def file_opset(path: Path | str) -> int:
    """The default-domain opset an ONNX file declares."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


@contextlib.contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _export_to(
    module: nn.Module, example: torch.Tensor, path: Path, *, opset: int, dynamic_batch: bool
) -> str:
    errors = []
    with torch.no_grad():
        try:
            kwargs = {}
            if dynamic_batch:
                kwargs["dynamic_shapes"] = ({0: torch.export.Dim.DYNAMIC},)
            with (
                warnings.catch_warnings(),
                contextlib.redirect_stdout(io.StringIO()),
                _quiet("onnxscript"),  # its version converter's notes; errors still raise
            ):
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
        if opset > LEGACY_MAX_OPSET:  # the fallback would write another opset than asked for
            raise ExportError(
                f"opset {opset}: {errors[0]}; the TorchScript exporter stops at opset "
                f"{LEGACY_MAX_OPSET}: use --opset {LEGACY_MAX_OPSET} or lower"
            )
        try:
            axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    module,
                    (example,),
                    str(path),
                    dynamo=False,
                    opset_version=opset,
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
    provider: str = "ort-cpu",
    raise_on_failure: bool = True,
    subject: str | None = None,
) -> ParityReport:
    """The ONNX file on ONNX Runtime's ``provider`` against ``module`` (float32 reference).

    The one pass rule of :func:`advpurify.runtime.parity.compare`; a failure raises
    :class:`ExportError` naming ``subject`` (default: the file) unless ``raise_on_failure``
    is false.
    """
    subject = str(path) if subject is None else subject
    session = ort_session(path, provider)
    if provider == "ort-cpu":
        run = cpu_runner(session)
    else:
        device = torch.device("cuda", torch.cuda.current_device())
        run = binding_runner(session, device, StreamOrder(device))
    name = {"ort-cpu": "ORT", "ort-cuda": "ORT CUDA", "ort-trt": "ORT TensorRT"}[provider]
    try:
        result = compare(
            on_cpu(module),
            run,
            inputs,
            logits=logits,
            precision="fp16" if fp16 else "fp32",
            tolerance=tolerance,
            batch_size=batch_size,
            fixed_batch=fixed_batch,
            source=source,
            names=("torch", name),
        )
    except ParityError as error:  # outputs of another shape
        raise ExportError(f"{subject}: {error}") from None
    if raise_on_failure:
        result.check(subject, ExportError)
    return result
