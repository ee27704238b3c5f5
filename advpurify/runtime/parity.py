"""The one parity check: does a candidate (an ONNX file on a provider, an engine, a compiled
module) compute what the reference computes? Polygraphy's comparator, reduced to what we need.

:func:`compare` runs both on the same inputs (in chunks, padded for a fixed-batch candidate)
and returns a :class:`ParityReport`. The pass rule, the same for every caller: the max abs
difference is within the tolerance (:func:`~advpurify.runtime.precision.default_tolerance` by
default), and, for logits, no top-1 prediction flips where the reference's winning margin is
wider than the tolerance (a real disagreement, not a near tie that any rounding may break).
Flips inside a near tie are reported, not failed. (The flip rule is the stricter half: within
the tolerance a flip can still happen on a margin up to twice the tolerance.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from advpurify.errors import AdvpurifyError
from advpurify.runtime.precision import default_tolerance, ieee_fp32


class ParityError(AdvpurifyError, RuntimeError):
    """A candidate whose outputs differ from the reference's beyond the tolerance."""


@dataclasses.dataclass(frozen=True)
class ParityReport:
    """How closely ``candidate`` reproduced ``reference`` on ``count`` inputs."""

    count: int
    max_abs_diff: float
    tolerance: float
    top1_agreement: float | None  # fraction of inputs with the same argmax (logits only)
    top1_disagreements: tuple[int, ...] = ()
    source: str = ""
    top1: tuple[int, ...] = ()  # the candidate's top-1 class per input (logits only)
    reference_top1: tuple[int, ...] = ()
    real_flips: tuple[int, ...] = ()  # disagreements where the reference's margin is wide
    candidate: str = "ORT"
    reference: str = "torch"

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance and not self.real_flips

    def summary(self) -> str:
        text = (
            f"{self.candidate} vs {self.reference} on {self.count} {self.source or 'inputs'}: "
            f"max abs diff {self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g})"
        )
        if self.top1_agreement is not None:
            agree = round(self.top1_agreement * self.count)
            text += f", top-1 identical on {agree}/{self.count}"
        return text

    def check(self, subject: str, error: type[Exception] = ParityError) -> ParityReport:
        """``self`` when it passed, else raise ``error`` naming ``subject``."""
        if not self.passed:
            raise error(f"{subject}: output does not match {self.reference}: {self.summary()}")
        return self


def report(
    reference: torch.Tensor,
    candidate: torch.Tensor,
    *,
    logits: bool,
    precision: str = "fp32",
    tolerance: float | None = None,
    source: str = "",
    names: tuple[str, str] = ("torch", "ORT"),
) -> ParityReport:
    """The report for two outputs of the same inputs (the pass rule lives here)."""
    ref, got = reference.detach().float().cpu(), candidate.detach().float().cpu()
    if ref.shape != got.shape:
        shapes = f"{tuple(got.shape)} != {names[0]} {tuple(ref.shape)}"
        raise ParityError(f"{names[1]}: output shape {shapes}")
    if tolerance is None:
        tolerance = default_tolerance(ref, precision)
    max_diff = float((ref - got).abs().max()) if ref.numel() else 0.0
    agreement, flips, real_flips = None, (), ()
    top1, reference_top1 = (), ()
    if logits and ref.numel():
        ref_flat, got_flat = ref.flatten(1), got.flatten(1)
        same = ref_flat.argmax(1) == got_flat.argmax(1)
        agreement = float(same.float().mean())
        flips = tuple(int(i) for i in torch.nonzero(~same).flatten())
        top2 = ref_flat.topk(min(2, ref_flat.shape[1]), dim=1).values
        margin = top2[:, 0] - top2[:, -1]
        real_flips = tuple(i for i in flips if float(margin[i]) > tolerance)
        top1 = tuple(got_flat.argmax(1).tolist())
        reference_top1 = tuple(ref_flat.argmax(1).tolist())
    return ParityReport(
        count=int(ref.shape[0]) if ref.dim() else 1,
        max_abs_diff=max_diff,
        tolerance=float(tolerance),
        top1_agreement=agreement,
        top1_disagreements=flips,
        source=source,
        top1=top1,
        reference_top1=reference_top1,
        real_flips=real_flips,
        candidate=names[1],
        reference=names[0],
    )


Runnable = Callable[[torch.Tensor], torch.Tensor]


def _device_of(fn: Runnable) -> torch.device:
    if isinstance(fn, nn.Module):
        tensor = next(iter([*fn.parameters(), *fn.buffers()]), None)
        return tensor.device if tensor is not None else torch.device("cpu")
    return torch.device(getattr(fn, "device", "cpu"))


def outputs(fn: Runnable, inputs: torch.Tensor, step: int, fixed_batch: int | None) -> torch.Tensor:
    """``fn`` on ``inputs`` in chunks of ``step`` (a fixed batch: the last padded, then
    dropped), on ``fn``'s device, float32 on the CPU; torch in IEEE fp32 (no TF32)."""
    device = _device_of(fn)
    chunks = []
    with torch.inference_mode(), ieee_fp32():
        for start in range(0, inputs.shape[0], step):
            chunk = inputs[start : start + step].to(device, torch.float32).contiguous()
            count = chunk.shape[0]
            if fixed_batch and count < fixed_batch:
                pad = chunk[-1:].expand(fixed_batch - count, *chunk.shape[1:])
                chunk = torch.cat([chunk, pad])
            chunks.append(fn(chunk).float()[:count].cpu())
    return torch.cat(chunks)


def compare(
    reference: Runnable,
    candidate: Runnable,
    inputs: torch.Tensor,
    *,
    logits: bool,
    precision: str = "fp32",
    tolerance: float | None = None,
    batch_size: int = 16,
    fixed_batch: int | None = None,
    source: str = "",
    names: tuple[str, str] | None = None,
) -> ParityReport:
    """Run ``reference`` and ``candidate`` (modules, backends, any batch function) on the same
    ``inputs`` and report how closely they agree (``report.passed``; ``report.check``)."""
    step = fixed_batch or batch_size
    if names is None:
        names = ("torch", str(getattr(candidate, "name", "") or type(candidate).__name__))
    ref = outputs(reference, inputs, step, fixed_batch)
    got = outputs(candidate, inputs, step, fixed_batch)
    return report(
        ref,
        got,
        logits=logits,
        precision=precision,
        tolerance=tolerance,
        source=source,
        names=names,
    )
