"""``advpurify export --triton-repo DIR``: a Triton Inference Server model repository.

Two layouts, both ``[0, 1]`` RGB ``N x 3 x S x S`` in, logits out:

- ``fused``: one ONNX graph, purifier then classifier (``export.fused``), one model.
- ``ensemble``: the purifier and the classifier as two ONNX models, chained by a Triton
  ensemble, so either can be replaced or scaled on its own.

Every ONNX file passes the same checks as ``advpurify export`` (``onnx.checker``, then ONNX
Runtime against torch) before the repository is written. Each model gets a ``config.pbtxt``
(Triton's protobuf text format) with dynamic batching, the maximum batch, and the input and
output names and shapes read back from the ONNX file itself. Methods that cannot be one fixed
graph (DIP, PPGN, JPEG, TVM, randpad) are refused with the reason; ``advpurify serve`` serves
them. A model's folder is built beside the repository's others and renamed into place, so a
crash never leaves half a model where Triton would load it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from advpurify.errors import AdvpurifyError
from advpurify.export.exporter import check_inputs, export_fused
from advpurify.export.fused import (
    NotExportableError,
    PurifierModule,
    build_purifier,
    purifier_graph,
)
from advpurify.files import atomic_write_bytes
from advpurify.models.registry import get_exportable
from advpurify.purifiers.base import Purifier
from advpurify.runtime.onnx import (
    DEFAULT_OPSET,
    ParityReport,
    check_model,
    compare_with_torch,
    export_onnx,
)

LAYOUTS = ("fused", "ensemble")
ONNX_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 6: "TYPE_INT32", 7: "TYPE_INT64"}


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One model input or output as Triton sees it: name, type, shape without the batch axis."""

    name: str
    data_type: str
    dims: tuple[int, ...]


@dataclasses.dataclass
class TritonRepo:
    """What was written: the model to call, every model folder, and the parity reports."""

    root: Path
    model: str
    layout: str
    models: list[str]
    parity: list[ParityReport]

    def lines(self) -> list[str]:
        out = [
            f"wrote Triton model repository {self.root} ({self.layout}): "
            f"call model {self.model!r}; models {', '.join(self.models)}"
        ]
        out += [report.summary() for report in self.parity]
        return out


MODEL_NAME = re.compile(r"[A-Za-z0-9_]{1,100}")


def model_name(purifier: str, classifier: str) -> str:
    """``rescale`` + ``efficientnet-lite0`` -> ``advpurify_rescale_efficientnet_lite0``."""
    return re.sub(r"[^A-Za-z0-9_]", "_", f"advpurify_{purifier}_{classifier}")


def onnx_signature(path: Path) -> tuple[list[Tensor], list[Tensor]]:
    """Inputs and outputs of an ONNX file, first axis (the dynamic batch) dropped."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def tensors(values) -> list[Tensor]:
        out = []
        for value in values:
            kind = value.type.tensor_type
            dims = tuple(int(d.dim_value) if d.dim_value else -1 for d in kind.shape.dim)
            if kind.elem_type not in ONNX_TYPES:
                raise AdvpurifyError(f"{path}: {value.name} has an ONNX type Triton config lacks")
            out.append(Tensor(value.name, ONNX_TYPES[kind.elem_type], dims[1:]))
        return out

    initializers = {i.name for i in graph.initializer}
    return tensors(v for v in graph.input if v.name not in initializers), tensors(graph.output)


def _tensor_block(field: str, tensors: Sequence[Tensor]) -> list[str]:
    lines = [f"{field} ["]
    for index, t in enumerate(tensors):
        comma = "," if index < len(tensors) - 1 else ""
        dims = ", ".join(str(d) for d in t.dims)
        lines.append(f'  {{ name: "{t.name}" data_type: {t.data_type} dims: [ {dims} ] }}{comma}')
    lines.append("]")
    return lines


def _batch_sizes(max_batch: int) -> list[int]:
    sizes = [s for s in (4, 8, 16, 32, 64, 128) if s < max_batch]
    return [*sizes[-2:], max_batch]


def model_config(
    name: str,
    inputs: Sequence[Tensor],
    outputs: Sequence[Tensor],
    *,
    max_batch: int,
    batch_wait_ms: float,
) -> str:
    """``config.pbtxt`` of an ONNX Runtime model with dynamic batching."""
    preferred = ", ".join(str(s) for s in _batch_sizes(max_batch))
    lines = [
        f'name: "{name}"',
        'backend: "onnxruntime"',
        f"max_batch_size: {max_batch}",
        *_tensor_block("input", inputs),
        *_tensor_block("output", outputs),
        "dynamic_batching {",
        f"  preferred_batch_size: [ {preferred} ]",
        f"  max_queue_delay_microseconds: {round(batch_wait_ms * 1000)}",
        "}",
        "instance_group [ { count: 1 kind: KIND_AUTO } ]",
    ]
    return "\n".join(lines) + "\n"


def ensemble_config(
    name: str,
    inputs: Sequence[Tensor],
    outputs: Sequence[Tensor],
    steps: Sequence[tuple[str, Mapping[str, str], Mapping[str, str]]],
    *,
    max_batch: int,
) -> str:
    """``config.pbtxt`` of an ensemble: ``steps`` are (model, input_map, output_map)."""
    lines = [
        f'name: "{name}"',
        'platform: "ensemble"',
        f"max_batch_size: {max_batch}",
        *_tensor_block("input", inputs),
        *_tensor_block("output", outputs),
        "ensemble_scheduling {",
        "  step [",
    ]
    for index, (model, input_map, output_map) in enumerate(steps):
        lines.append("    {")
        lines.append(f'      model_name: "{model}"')
        lines.append("      model_version: -1")
        for field, mapping in (("input_map", input_map), ("output_map", output_map)):
            for key, value in mapping.items():
                lines.append(f'      {field} {{ key: "{key}" value: "{value}" }}')
        lines.append("    }" + ("," if index < len(steps) - 1 else ""))
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


def _export_part(
    module: torch.nn.Module,
    reference: torch.nn.Module,
    path: Path,
    inputs: torch.Tensor,
    *,
    logits: bool,
    source: str,
    opset: int,
    fp16: bool,
    metadata: dict[str, str],
) -> ParityReport:
    export_onnx(module, path, inputs[:2], opset=opset, fp16=fp16, metadata=metadata)
    check_model(path)
    return compare_with_torch(reference, path, inputs, logits=logits, fp16=fp16, source=source)


def write_triton_repo(
    repo: Path | str,
    purifier: str,
    classifier: str,
    *,
    params: Mapping[str, Any] | None = None,
    weights: str | None = None,
    size: int = 224,
    layout: str = "fused",
    max_batch: int = 32,
    batch_wait_ms: float = 5.0,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    check_images: Path | None = None,
    check_count: int = 16,
    name: str | None = None,
    notify: Callable[[str], None] = lambda _m: None,
) -> TritonRepo:
    """Write (or replace) the models for ``purifier`` + ``classifier`` in repository ``repo``,
    called ``name`` (default ``model_name(purifier, classifier)``; give one per setting to keep
    several settings of one pair side by side)."""
    if layout not in LAYOUTS:
        raise AdvpurifyError(f"--triton-layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    if name is not None and not MODEL_NAME.fullmatch(name):
        raise AdvpurifyError(
            f"--triton-name {name!r}: use 1-100 letters, digits and _ (a Triton model folder)"
        )
    if max_batch < 1:
        raise AdvpurifyError(f"--triton-max-batch {max_batch}: must be at least 1")
    if not 0 <= batch_wait_ms <= 10_000:  # as serve's --batch-wait-ms; Triton takes no negative
        raise AdvpurifyError(f"--triton-batch-wait-ms {batch_wait_ms:g}: must be in 0..10000")
    try:
        method = build_purifier(purifier, params)  # refuses, with the reason, before any work
    except NotExportableError as error:
        raise NotExportableError(
            f"{error}; serve it with `advpurify serve --method {purifier}` instead"
        ) from None
    entry = get_exportable(classifier)
    if entry.output != "logits":
        raise AdvpurifyError(f"--classifier {classifier}: not a classifier")
    repo = Path(repo)
    if repo.exists() and not repo.is_dir():
        raise AdvpurifyError(f"--triton-repo {repo}: exists and is not a folder")
    repo.mkdir(parents=True, exist_ok=True)
    name = name or model_name(purifier, classifier)
    # The parts an ensemble of this name chained before: only those are this pair's to replace.
    earlier_parts = _ensemble_parts(repo, name)
    if layout == "ensemble":
        for part in (f"{name}_purifier", f"{name}_classifier"):
            if (repo / part).exists() and part not in earlier_parts:
                raise AdvpurifyError(
                    f"--triton-name {name}: {repo / part} is another model, not a part of "
                    f"{name}; choose another name"
                )
    options = _Options(
        params=params,
        weights=weights,
        size=size,
        opset=opset,
        fp16=fp16,
        check_images=check_images,
        check_count=check_count,
        max_batch=max_batch,
        batch_wait_ms=batch_wait_ms,
        notify=notify,
    )
    with tempfile.TemporaryDirectory(prefix=".advpurify-triton-", dir=repo) as scratch:
        staged = Path(scratch)
        if layout == "fused":
            reports, models = _fused(staged, name, purifier, classifier, options)
        else:
            reports, models = _ensemble(staged, name, method, classifier, options)
        for model in models:
            if (repo / model).exists():
                notify(f"replacing model {model} in {repo}")
            _replace(staged / model, repo / model)
    # The earlier ensemble's parts would still be loaded by Triton beside the fused model.
    for stale in sorted(earlier_parts - set(models)):
        if (repo / stale / "config.pbtxt").is_file():
            notify(f"removing model {stale} (the {layout} layout replaces it)")
            shutil.rmtree(repo / stale)
    return TritonRepo(repo, name, layout, models, reports)


def _ensemble_parts(repo: Path, name: str) -> set[str]:
    """This pair's part models that the ensemble ``name`` in ``repo`` chains (none where there
    is no such ensemble)."""
    config = repo / name / "config.pbtxt"
    if not config.is_file():
        return set()
    text = config.read_text(errors="replace")
    if 'platform: "ensemble"' not in text:
        return set()
    chained = set(re.findall(r'model_name: "([^"]+)"', text))
    return chained & {f"{name}_purifier", f"{name}_classifier"}


@dataclasses.dataclass(frozen=True)
class _Options:
    params: Mapping[str, Any] | None
    weights: str | None
    size: int
    opset: int
    fp16: bool
    check_images: Path | None
    check_count: int
    max_batch: int
    batch_wait_ms: float
    notify: Callable[[str], None]

    def config(self, name: str, inputs: Sequence[Tensor], outputs: Sequence[Tensor]) -> bytes:
        text = model_config(
            name, inputs, outputs, max_batch=self.max_batch, batch_wait_ms=self.batch_wait_ms
        )
        return text.encode()


def _fused(
    staged: Path, name: str, purifier: str, classifier: str, options: _Options
) -> tuple[list[ParityReport], list[str]]:
    path = staged / name / "1" / "model.onnx"
    result = export_fused(
        purifier,
        classifier,
        path,
        params=options.params,
        weights=options.weights,
        size=options.size,
        opset=options.opset,
        fp16=options.fp16,
        check_images=options.check_images,
        check_count=options.check_count,
        notify=options.notify,
    )
    inputs, outputs = onnx_signature(path)
    atomic_write_bytes(staged / name / "config.pbtxt", options.config(name, inputs, outputs))
    return [result.parity], [name]


def _ensemble(
    staged: Path, name: str, method: Purifier, classifier: str, options: _Options
) -> tuple[list[ParityReport], list[str]]:
    weights, opset, fp16, notify = options.weights, options.opset, options.fp16, options.notify
    entry = get_exportable(classifier)
    net = entry.build(weights)
    sample = (3, options.size, options.size)
    inputs, source = check_inputs(entry, sample, options.check_images, options.check_count)
    reference = PurifierModule(method).eval()
    parts = {f"{name}_purifier": "purifier", f"{name}_classifier": "classifier"}
    meta = {"advpurify.purifier": repr(method), "advpurify.weights": str(weights or "default")}
    purifier_model, classifier_model = parts
    notify(f"exporting the purifier {method!r} to ONNX")
    paths = {model: staged / model / "1" / "model.onnx" for model in parts}
    reports = [
        _export_part(
            purifier_graph(method),
            reference,
            paths[purifier_model],
            inputs,
            logits=False,
            source=source,
            opset=opset,
            fp16=fp16,
            metadata={"advpurify.model": method.name, **meta},
        )
    ]
    with torch.inference_mode():
        purified = reference(inputs)  # the classifier is checked on what it will receive
    notify(f"exporting the classifier {classifier} to ONNX")
    reports.append(
        _export_part(
            net,
            net,
            paths[classifier_model],
            purified,
            logits=True,
            source=f"purified {source}",
            opset=opset,
            fp16=fp16,
            metadata={"advpurify.model": classifier, **meta},
        )
    )
    signatures = {model: onnx_signature(path) for model, path in paths.items()}
    for model, (ins, outs) in signatures.items():
        atomic_write_bytes(staged / model / "config.pbtxt", options.config(model, ins, outs))
    (p_in,), (p_out,) = signatures[purifier_model]
    (c_in,), (c_out,) = signatures[classifier_model]
    steps = [
        (purifier_model, {p_in.name: "input"}, {p_out.name: "purified"}),
        (classifier_model, {c_in.name: "purified"}, {c_out.name: "output"}),
    ]
    text = ensemble_config(
        name,
        [dataclasses.replace(p_in, name="input")],
        [dataclasses.replace(c_out, name="output")],
        steps,
        max_batch=options.max_batch,
    )
    (staged / name / "1").mkdir(parents=True)  # Triton wants a version folder, even empty
    atomic_write_bytes(staged / name / "config.pbtxt", text.encode())
    return reports, [name, purifier_model, classifier_model]


def _replace(source: Path, target: Path) -> None:
    """Move a finished model folder into place; an older one is removed only after that."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    source.rename(target)
    if old is not None:
        with contextlib.suppress(OSError):
            shutil.rmtree(old)
