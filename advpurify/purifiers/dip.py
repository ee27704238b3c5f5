"""Deep Image Prior purification (Ulyanov et al.): fit a random skip net to each image, stop early.

A batch of N images is fitted as N independent networks in one pass (stacked weights, one
forward, one backward, one Adam step; see ``advpurify.models.skipnet``), with a hand-rolled Adam
over the stacked weights so that finished images can be dropped from the batch. Everything
random about image ``i`` (the network's initial weights, the input code z, the regularisation
noise added to z at every step) is drawn from a generator seeded with ``seeds[i]`` alone, so an
image's result does not depend on its batch-mates. On the CPU (one conv per net inside the
pass) a batch is bit-identical to fitting its images one by one; on CUDA (one grouped conv) it
is the same computation with different float rounding, and DIP fits amplify rounding
differences, so outputs then agree only statistically.

Stopping: a fixed count, or the running-variance rule of Wang et al. (arXiv 2112.06074, ES-WMV):
the variance of the last ``window`` outputs falls while the net fits the image's structure and
rises once it starts fitting noise; an image stops ``patience`` steps after its minimum and
returns the output from that minimum. The divergence guard of the reference code restores an
image's last good weights when its fit PSNR drops by more than ``guard_db``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

from advpurify.models.skipnet import SkipConfig, SkipNet
from advpurify.purifiers.base import (
    ParamError,
    Purifier,
    Settings,
    generators,
    register,
    setting,
)

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's denoising configuration (denoising.ipynb of the reference code).
    "paper": {
        "iterations": 3000,
        "channels": 128,
        "skip_channels": 4,
        "scales": 5,
        "input_depth": 32,
        "lr": 0.01,
        "reg_noise_std": 1.0 / 30.0,
        "ema": 0.99,
    },
    # Sized for two CPU cores at 224 x 224 (benchmarks/dip_accuracy.py, docs/dip-accuracy.png):
    # 16 channels are ~1.8x faster per step than 32; at 550 steps it beats rescale by 10 points
    # top-1 and top-3 on a seeded 30-image subset (FGSM eps=16, efficientnet-lite0).
    "fast": {
        "iterations": 550,
        "channels": 16,
        "skip_channels": 4,
        "scales": 5,
        "input_depth": 32,
        "lr": 0.01,
        "reg_noise_std": 1.0 / 30.0,
        "ema": 0.99,
    },
}

STOP_RULES = ("fixed", "variance")
CONV_MODES = ("auto", "grouped", "split")


@dataclasses.dataclass(frozen=True)
class DipSettings:
    """Everything that shapes a fit. ``from_preset`` fills what is not given from a preset."""

    iterations: int = 3000
    channels: int = 128
    skip_channels: int = 4
    scales: int = 5
    input_depth: int = 32
    lr: float = 0.01
    reg_noise_std: float = 1.0 / 30.0
    ema: float = 0.99
    input_scale: float = 0.1
    stop: str = "fixed"
    window: int = 50
    patience: int = 100
    guard_db: float = 5.0
    parallel: int = 0
    conv: str = "auto"

    def __post_init__(self) -> None:
        if self.stop not in STOP_RULES:
            raise ParamError(f"stop={self.stop!r}: must be one of {', '.join(STOP_RULES)}")
        if self.conv not in CONV_MODES:
            raise ParamError(f"conv={self.conv!r}: must be one of {', '.join(CONV_MODES)}")
        if not 0.0 <= self.ema < 1.0:
            raise ParamError(f"ema={self.ema!r}: must be in [0, 1)")

    @classmethod
    def from_preset(cls, preset: str = "fast", **overrides: Any) -> DipSettings:
        if preset not in PRESETS:
            raise ParamError(f"preset={preset!r}: must be one of {', '.join(PRESETS)}")
        values = dict(PRESETS[preset])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def skip_config(self) -> SkipConfig:
        return SkipConfig.uniform(self.scales, self.channels, self.skip_channels, self.input_depth)


@dataclasses.dataclass(frozen=True)
class DipOptions(Settings):
    """The purifier's settings: a preset, and the values that override it (None: the preset's)."""

    preset: str = setting(
        "fast", "fast (2 CPU cores) or paper (3000 its, 128 ch)", choices=tuple(PRESETS)
    )
    iterations: int | None = setting(None, "fitting steps (maximum for stop=variance)", min=1)
    channels: int | None = setting(None, "channels of every down and up block", min=1)
    skip_channels: int | None = setting(None, "channels of every skip connection", min=0)
    scales: int | None = setting(
        None, "number of scales (sides padded to multiples of 2^scales)", min=1, max=8
    )
    input_depth: int | None = setting(None, "channels of the noise input z", min=1)
    lr: float | None = setting(None, "Adam learning rate", min=0.0)
    reg_noise_std: float | None = setting(
        None, "std of the noise added to z at every step", min=0.0
    )
    ema: float | None = setting(
        None, "exponential averaging of outputs (0: last output)", min=0.0, max=0.9999
    )
    stop: str = setting("fixed", "fixed count, or running variance of outputs", choices=STOP_RULES)
    window: int = setting(50, "stop=variance: outputs in the running variance", min=2)
    patience: int = setting(100, "stop=variance: steps without a new minimum", min=1)
    guard_db: float = setting(
        5.0,
        "restore the last good weights when the fit PSNR drops by more than this (0: off)",
        min=0.0,
    )
    parallel: int = setting(0, "networks fitted at once (0: the whole batch)", min=0)
    conv: str = setting(
        "auto",
        "grouped: one grouped conv for all nets; split: one conv per net; "
        "auto: grouped on CUDA, split on CPU (faster there, and bit-identical to one by one)",
        choices=CONV_MODES,
    )

    def resolve(self) -> DipSettings:
        """The complete fit settings: the preset with this object's values on top."""
        return DipSettings.from_preset(**self.as_dict())


@dataclasses.dataclass
class DipResult:
    images: torch.Tensor
    """N x 3 x H x W purified images, on the input's device."""
    iterations: list[int]
    """Per image: the iteration whose output was returned."""
    restores: list[int]
    """Per image: how many times the divergence guard restored the last good weights."""


StepHook = Callable[[int, list[int], torch.Tensor, torch.Tensor], None]
"""``hook(iteration, image_indices, raw_outputs, smoothed_outputs)``, called after every step
with the outputs (cropped to the images' size) of the images still being fitted."""


def pad_to_multiple(
    images: torch.Tensor, multiple: int, minimum: int = 0
) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Reflect-pad H and W up to multiples of ``multiple``, at least ``minimum``; returns the
    padded images and the box (top, left, height, width) that crops them back. Pads wider than
    the image reflect again; a side of one pixel is replicated."""
    height, width = images.shape[-2:]
    target_h = max(-(-height // multiple) * multiple, minimum)
    target_w = max(-(-width // multiple) * multiple, minimum)
    top, left = (target_h - height) // 2, (target_w - width) // 2
    box = (top, left, height, width)
    pads = [left, target_w - width - left, top, target_h - height - top]
    out = images
    while any(pads):
        h, w = out.shape[-2:]
        if min(h, w) == 1:
            return F.pad(out, pads, mode="replicate"), box
        step = [min(pads[0], w - 1), min(pads[1], w - 1), min(pads[2], h - 1), min(pads[3], h - 1)]
        out = F.pad(out, step, mode="reflect")
        pads = [p - q for p, q in zip(pads, step, strict=True)]
    return out, box


@contextlib.contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    # Same seed, same output: cuDNN must not pick nondeterministic or timing-based algorithms.
    if device.type != "cuda":
        yield
        return
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def fit(
    images: torch.Tensor,
    seeds: Sequence[int],
    settings: DipSettings,
    on_step: StepHook | None = None,
) -> DipResult:
    """Fit one network per image and return the purified images (see the module docstring).

    ``settings.parallel`` > 0 caps how many networks are fitted at once (memory); the batch is
    then fitted in groups of that size, which gives the same per-image results.
    """
    if len(seeds) != images.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for {images.shape[0]} images")
    group = settings.parallel or images.shape[0]
    parts = []
    # Fitting needs autograd even when the caller runs under no_grad or inference_mode.
    with torch.inference_mode(False), torch.enable_grad():
        images = images.detach().clone()
        for start in range(0, images.shape[0], group):
            hook = on_step
            if on_step is not None and start:

                def hook(it, idx, raw, avg, _hook=on_step, _off=start):  # type: ignore[misc]
                    _hook(it, [i + _off for i in idx], raw, avg)

            stop = start + group
            parts.append(_fit_group(images[start:stop], seeds[start:stop], settings, hook))
    return DipResult(
        images=torch.cat([p.images for p in parts]),
        iterations=[i for p in parts for i in p.iterations],
        restores=[r for p in parts for r in p.restores],
    )


class _Adam:
    """Adam (as ``torch.optim.Adam``) over a dict of stacked weights whose rows can be dropped."""

    def __init__(self, params: dict[str, torch.Tensor], lr: float) -> None:
        self.lr, self.beta1, self.beta2, self.eps = lr, 0.9, 0.999, 1e-8
        self.step_count = 0
        self.exp_avg = {k: torch.zeros_like(p) for k, p in params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(p) for k, p in params.items()}

    @torch.no_grad()
    def step(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> None:
        self.step_count += 1
        bias1 = 1 - self.beta1**self.step_count
        bias2_sqrt = math.sqrt(1 - self.beta2**self.step_count)
        for name, param in params.items():
            grad = grads[name]
            exp_avg, exp_avg_sq = self.exp_avg[name], self.exp_avg_sq[name]
            exp_avg.lerp_(grad, 1 - self.beta1)
            exp_avg_sq.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
            denom = (exp_avg_sq.sqrt() / bias2_sqrt).add_(self.eps)
            param.addcdiv_(exp_avg, denom, value=-self.lr / bias1)

    def keep(self, rows: torch.Tensor) -> None:
        self.exp_avg = {k: v[rows] for k, v in self.exp_avg.items()}
        self.exp_avg_sq = {k: v[rows] for k, v in self.exp_avg_sq.items()}


def _fit_group(
    images: torch.Tensor, seeds: Sequence[int], s: DipSettings, on_step: StepHook | None
) -> DipResult:
    device = images.device
    n = images.shape[0]
    config = s.skip_config()
    # At least 2 x 2 pixels at the coarsest scale: BatchNorm needs more than one value.
    multiple = 2**config.scales
    target, (top, left, height, width) = pad_to_multiple(images, multiple, 2 * multiple)
    H, W = target.shape[-2:]

    def crop(x: torch.Tensor) -> torch.Tensor:
        return x[..., top : top + height, left : left + width]

    with _deterministic(device):
        gens = generators(seeds, device)
        # Per image, in this order from its own generator: weights, then z, then step noise.
        net = SkipNet(config, n_nets=n, seeds=gens, device=device)
        net.set_grouped({"auto": None, "grouped": True, "split": False}[s.conv])
        z = torch.stack(
            [torch.rand(s.input_depth, H, W, generator=g, device=device) for g in gens]
        ).mul_(s.input_scale)
        params = {k: p.detach().clone().requires_grad_() for k, p in net.named_parameters()}
        adam = _Adam(params, s.lr)
        snapshot = {k: p.detach().clone() for k, p in params.items()}
        last_psnr = torch.full((n,), -math.inf, device=device)
        restores = torch.zeros(n, dtype=torch.long, device=device)
        active = list(range(n))
        avg: torch.Tensor | None = None
        result = images.new_empty(images.shape)
        stopped_at = [s.iterations] * n
        restores_out = [0] * n
        window = s.window if s.stop == "variance" else 0
        history = torch.empty((n, window, 3, H, W), device=device) if window else None
        best_var = torch.full((n,), math.inf, device=device)
        best_out = torch.empty((n, 3, H, W), device=device) if window else None
        best_it = torch.zeros(n, dtype=torch.long, device=device)

        for it in range(1, s.iterations + 1):
            net_input = z
            if s.reg_noise_std > 0:
                noise = torch.stack(
                    [torch.randn(z.shape[1:], generator=g, device=device) for g in gens]
                )
                net_input = z + s.reg_noise_std * noise
            out = functional_call(net, params, (net_input,))
            err = (out - target).square().flatten(1).mean(1)
            # Sum, not mean: each image gets exactly the gradient it would get alone.
            grads = torch.autograd.grad(err.sum(), list(params.values()))
            out = out.detach()
            with torch.no_grad():
                psnr = -10.0 * torch.log10(err.detach().clamp_min(1e-12))
                bad = psnr < last_psnr - s.guard_db if s.guard_db > 0 else psnr < -math.inf
                any_bad = bool(bad.any())
                good = ~bad
                for name, param in params.items():  # remember weights that fitted well
                    if any_bad:
                        snapshot[name][good] = param[good]
                    else:
                        snapshot[name].copy_(param)
                adam.step(params, dict(zip(params, grads, strict=True)))
                if any_bad:
                    for name, param in params.items():
                        param[bad] = snapshot[name][bad]
                    restores += bad.long()
                last_psnr = torch.where(good, psnr, last_psnr)
                if avg is None:
                    avg = out.clone()
                elif s.ema > 0:
                    mixed = avg * s.ema + out * (1 - s.ema)
                    avg = torch.where(bad.view(-1, 1, 1, 1), avg, mixed)
                else:
                    avg = torch.where(bad.view(-1, 1, 1, 1), avg, out)
                if on_step is not None:
                    on_step(it, list(active), crop(out), crop(avg))

                done = torch.zeros(len(active), dtype=torch.bool, device=device)
                if history is not None and best_out is not None:
                    history[:, (it - 1) % window] = out
                    if it >= window:
                        var = history.var(dim=1, unbiased=False).flatten(1).mean(1)
                        better = var < best_var
                        best_var = torch.where(better, var, best_var)
                        best_it = torch.where(better, it, best_it)
                        best_out[better] = avg[better]
                        done = it - best_it >= s.patience
                if it == s.iterations:
                    done[:] = True
                if not bool(done.any()):
                    continue
                final = best_out if best_out is not None else avg
                for row in done.nonzero().flatten().tolist():
                    index = active[row]
                    result[index] = crop(final[row])
                    stopped_at[index] = int(best_it[row]) if best_out is not None else it
                    restores_out[index] = int(restores[row])
                if bool(done.all()):
                    break
                # Drop finished images from every per-image state, so they cost nothing more.
                rows = (~done).nonzero().flatten()
                keep = rows.tolist()
                active = [active[r] for r in keep]
                gens = [gens[r] for r in keep]
                params = {k: p[rows].detach().requires_grad_() for k, p in params.items()}
                snapshot = {k: p[rows] for k, p in snapshot.items()}
                adam.keep(rows)
                z, target, avg = z[rows], target[rows], avg[rows]
                last_psnr, restores = last_psnr[rows], restores[rows]
                best_var, best_it = best_var[rows], best_it[rows]
                if history is not None and best_out is not None:
                    history, best_out = history[rows], best_out[rows]
    return DipResult(images=result, iterations=stopped_at, restores=restores_out)


@register
class DeepImagePrior(Purifier):
    name = "dip"
    description = (
        "Deep Image Prior: fit a random skip net to each image and keep its early output "
        "(N images fitted as N networks at once)."
    )
    Settings = DipOptions
    settings: DipOptions
    stochastic = True
    differentiable = False

    def purify(self, images: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        return fit(images, seeds, self.settings.resolve()).images
