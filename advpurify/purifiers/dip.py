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

from advpurify import heap
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
    # For attacks through DIP (BPDA + EOT fits it once per step and draw) and for tests: small
    # enough that an adaptive run on 8 images finishes in minutes on a loaded 2-core machine.
    "tiny": {
        "iterations": 100,
        "channels": 8,
        "skip_channels": 4,
        "scales": 5,
        "input_depth": 16,
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

    # The preset values are declared once, in PRESETS; the defaults are the paper's.
    iterations: int = PRESETS["paper"]["iterations"]
    channels: int = PRESETS["paper"]["channels"]
    skip_channels: int = PRESETS["paper"]["skip_channels"]
    scales: int = PRESETS["paper"]["scales"]
    input_depth: int = PRESETS["paper"]["input_depth"]
    lr: float = PRESETS["paper"]["lr"]
    reg_noise_std: float = PRESETS["paper"]["reg_noise_std"]
    ema: float = PRESETS["paper"]["ema"]
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
        if self.stop == "variance" and self.iterations < self.window:
            # The running variance needs a full window of outputs before any can be chosen.
            raise ParamError(
                f"stop=variance: iterations={self.iterations} is below window={self.window}; "
                "raise iterations or lower window"
            )

    @classmethod
    def from_preset(cls, preset: str = "fast", **overrides: Any) -> DipSettings:
        if preset not in PRESETS:
            raise ParamError(f"preset={preset!r}: must be one of {', '.join(PRESETS)}")
        values = dict(PRESETS[preset])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def skip_config(self) -> SkipConfig:
        return SkipConfig.uniform(self.scales, self.channels, self.skip_channels, self.input_depth)


# Far above any useful value (the paper's net has 128 channels and 3000 steps), below what
# fails every image with an allocation error or runs for ever: refused up front instead.
MAX_WIDTH = 1024
MAX_STEPS = 1_000_000
MAX_PARALLEL = 4096


def _by_preset(name: str, text: str) -> str:
    """Help ``text`` with the value each preset gives ``name`` (the setting's default is None)."""
    each = ", ".join(f"{preset} {values[name]:.4g}" for preset, values in PRESETS.items())
    return f"{text}; by preset: {each}"


@dataclasses.dataclass(frozen=True)
class DipOptions(Settings):
    """The purifier's settings: a preset, and the values that override it (None: the preset's)."""

    preset: str = setting(
        "fast",
        "fast (2 CPU cores), paper (3000 its, 128 ch) or tiny (adaptive attacks, tests)",
        choices=tuple(PRESETS),
    )
    iterations: int | None = setting(
        None,
        _by_preset("iterations", "fitting steps (maximum for stop=variance)"),
        min=1,
        max=MAX_STEPS,
    )
    channels: int | None = setting(
        None, _by_preset("channels", "channels of every down and up block"), min=1, max=MAX_WIDTH
    )
    skip_channels: int | None = setting(
        None,
        _by_preset("skip_channels", "channels of every skip connection"),
        min=0,
        max=MAX_WIDTH,
    )
    scales: int | None = setting(
        None,
        _by_preset("scales", "number of scales (sides padded to multiples of 2^scales)"),
        min=1,
        max=8,
    )
    input_depth: int | None = setting(
        None, _by_preset("input_depth", "channels of the noise input z"), min=1, max=MAX_WIDTH
    )
    # Upper bounds far above any useful value, below float overflow inside Adam and the noise.
    lr: float | None = setting(None, _by_preset("lr", "Adam learning rate"), min=0.0, max=10.0)
    reg_noise_std: float | None = setting(
        None,
        _by_preset("reg_noise_std", "std of the noise added to z at every step"),
        min=0.0,
        max=10.0,
    )
    ema: float | None = setting(
        None,
        _by_preset("ema", "exponential averaging of outputs (0: last output)"),
        min=0.0,
        max=0.9999,
    )
    stop: str = setting("fixed", "fixed count, or running variance of outputs", choices=STOP_RULES)
    window: int = setting(
        50, "stop=variance: outputs in the running variance", min=2, max=MAX_STEPS
    )
    patience: int = setting(100, "stop=variance: steps without a new minimum", min=1, max=MAX_STEPS)
    guard_db: float = setting(
        5.0,
        "restore the last good weights when the fit PSNR drops by more than this (0: off)",
        min=0.0,
    )
    parallel: int = setting(
        0, "networks fitted at once (0: the whole batch)", min=0, max=MAX_PARALLEL
    )
    conv: str = setting(
        "auto",
        "grouped: one grouped conv for all nets; split: one conv per net; "
        "auto: grouped on CUDA, split on CPU (faster there, and bit-identical to one by one)",
        choices=CONV_MODES,
    )

    def validate(self) -> None:
        self.resolve()  # the preset and the overrides together (stop=variance vs iterations)

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


class _FlatParams:
    """The stacked weights of N networks as one ``N x P`` tensor, and views of it by name.

    One buffer makes Adam, the guard's snapshot and dropping finished images one operation each
    over all weights (instead of one per weight tensor), with the same elementwise arithmetic.
    """

    def __init__(self, named: dict[str, torch.Tensor]) -> None:
        self.shapes = {k: p.shape[1:] for k, p in named.items()}
        n = next(iter(named.values())).shape[0]
        self.flat = torch.cat([p.detach().reshape(n, -1) for p in named.values()], dim=1)
        self._views()

    def _views(self) -> None:
        # Views of the buffer that autograd treats as leaves: Adam writes the buffer in place.
        n, offset, self.named = self.flat.shape[0], 0, {}
        for name, shape in self.shapes.items():
            size = math.prod(shape)
            view = self.flat[:, offset : offset + size].view(n, *shape)
            self.named[name] = view.requires_grad_()
            offset += size

    def flat_grad(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        n = self.flat.shape[0]
        return torch.cat([g.reshape(n, -1) for g in grads], dim=1)

    def keep(self, rows: torch.Tensor) -> None:
        self.flat = self.flat[rows]
        self._views()


class _Adam:
    """Adam (as ``torch.optim.Adam``, same arithmetic per element) over one ``N x P`` buffer."""

    def __init__(self, flat: torch.Tensor, lr: float) -> None:
        self.lr, self.beta1, self.beta2, self.eps = lr, 0.9, 0.999, 1e-8
        self.step_count = 0
        self.exp_avg = torch.zeros_like(flat)
        self.exp_avg_sq = torch.zeros_like(flat)

    @torch.no_grad()
    def step(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        self.step_count += 1
        bias1 = 1 - self.beta1**self.step_count
        bias2_sqrt = math.sqrt(1 - self.beta2**self.step_count)
        self.exp_avg.lerp_(grad, 1 - self.beta1)
        self.exp_avg_sq.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        denom = self.exp_avg_sq.sqrt().div_(bias2_sqrt).add_(self.eps)
        param.addcdiv_(self.exp_avg, denom, value=-self.lr / bias1)

    def keep(self, rows: torch.Tensor) -> None:
        self.exp_avg, self.exp_avg_sq = self.exp_avg[rows], self.exp_avg_sq[rows]


@dataclasses.dataclass
class _Fits:
    """Everything per image about the fits still running, dropped in one place (:meth:`keep`)."""

    index: list[int]
    """Position in the batch of each image still being fitted."""
    gens: list[torch.Generator]
    weights: _FlatParams
    adam: _Adam
    snapshot: torch.Tensor
    """Per image: the weights of its last step that passed the divergence guard."""
    z: torch.Tensor
    target: torch.Tensor
    noise: torch.Tensor
    last_psnr: torch.Tensor
    restores: torch.Tensor
    avg: torch.Tensor | None = None
    history: torch.Tensor | None = None
    """stop=variance: the last ``window`` outputs per image (a ring buffer)."""
    best_var: torch.Tensor | None = None
    best_it: torch.Tensor | None = None
    best_out: torch.Tensor | None = None

    def keep(self, rows: torch.Tensor) -> None:
        """Drop every image whose row is not in ``rows``, so finished images cost nothing."""
        kept = rows.tolist()
        self.index = [self.index[r] for r in kept]
        self.gens = [self.gens[r] for r in kept]
        self.weights.keep(rows)
        self.adam.keep(rows)
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, torch.Tensor):
                setattr(self, field.name, value[rows])


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
    if device.type == "cpu":
        # With ADVPURIFY_HEAP=large-pages, activations reuse one huge-page heap from step to
        # step (advpurify/heap.py): the same arithmetic, fewer page faults and TLB misses.
        heap.reserve(_step_bytes(n, H, W, s))

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
        weights = _FlatParams(dict(net.named_parameters()))
        window = s.window if s.stop == "variance" else 0
        fits = _Fits(
            index=list(range(n)),
            gens=gens,
            weights=weights,
            adam=_Adam(weights.flat, s.lr),
            snapshot=weights.flat.clone(),
            z=z,
            target=target,
            noise=torch.empty_like(z),
            last_psnr=torch.full((n,), -math.inf, device=device),
            restores=torch.zeros(n, dtype=torch.long, device=device),
        )
        if window:
            fits.history = torch.empty((n, window, 3, H, W), device=device)
            fits.best_var = torch.full((n,), math.inf, device=device)
            fits.best_out = torch.empty((n, 3, H, W), device=device)
            fits.best_it = torch.zeros(n, dtype=torch.long, device=device)
        result = images.new_empty(images.shape)
        stopped_at = [s.iterations] * n
        restores_out = [0] * n

        for it in range(1, s.iterations + 1):
            out, bad = _step(net, fits, s)
            if on_step is not None:
                assert fits.avg is not None
                on_step(it, list(fits.index), crop(out), crop(fits.avg))
            done = _stopped(fits, it, out, s)
            if done is None:
                continue
            final = fits.best_out if fits.best_out is not None else fits.avg
            assert final is not None
            for row in done.nonzero().flatten().tolist():
                index = fits.index[row]
                result[index] = crop(final[row])
                if fits.best_it is not None:
                    stopped_at[index] = int(fits.best_it[row])
                else:
                    stopped_at[index] = it
                restores_out[index] = int(fits.restores[row])
            if bool(done.all()):
                break
            fits.keep((~done).nonzero().flatten())
    heap.release()  # the step's blocks back to the OS (a no-op unless the heap was tuned)
    return DipResult(images=result, iterations=stopped_at, restores=restores_out)


def _step_bytes(n: int, height: int, width: int, s: DipSettings) -> int:
    """About what one step allocates (measured: ~80 MiB per 224 x 224 image with `fast`)."""
    return n * height * width * 4 * (3 * s.input_depth + 20 * s.channels)


def _step(net: SkipNet, fits: _Fits, s: DipSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """One Adam step of every fit; returns the outputs and which images the guard restored.

    No host synchronisation: the guard's snapshot and restore are selections on the device.
    """
    net_input = fits.z
    if s.reg_noise_std > 0:
        for row, gen in enumerate(fits.gens):
            torch.randn(fits.z.shape[1:], generator=gen, out=fits.noise[row])
        net_input = fits.z + fits.noise.mul_(s.reg_noise_std)
    weights = fits.weights
    out = functional_call(net, weights.named, (net_input,))
    err = (out - fits.target).square().flatten(1).mean(1)
    # Sum, not mean: each image gets exactly the gradient it would get alone.
    grads = torch.autograd.grad(err.sum(), list(weights.named.values()))
    out = out.detach()
    with torch.no_grad():
        psnr = -10.0 * torch.log10(err.detach().clamp_min(1e-12))
        if s.guard_db > 0:
            bad = psnr < fits.last_psnr - s.guard_db
        else:
            bad = torch.zeros_like(psnr, dtype=torch.bool)
        good = ~bad
        rows_bad = bad.view(-1, 1)
        # Remember the weights that fitted well, step, and put back those that did not.
        fits.snapshot = torch.where(rows_bad, fits.snapshot, weights.flat)
        fits.adam.step(weights.flat, weights.flat_grad(grads))
        if s.guard_db > 0:
            weights.flat.copy_(torch.where(rows_bad, fits.snapshot, weights.flat))
        fits.restores += bad.long()
        fits.last_psnr = torch.where(good, psnr, fits.last_psnr)
        if fits.avg is None:
            fits.avg = out.clone()
        elif s.ema > 0:
            mixed = fits.avg * s.ema + out * (1 - s.ema)
            fits.avg = torch.where(bad.view(-1, 1, 1, 1), fits.avg, mixed)
        else:
            fits.avg = torch.where(bad.view(-1, 1, 1, 1), fits.avg, out)
    return out, bad


def _stopped(fits: _Fits, it: int, out: torch.Tensor, s: DipSettings) -> torch.Tensor | None:
    """Which images finish at step ``it`` (None: none of them, known without a host sync)."""
    last = it == s.iterations
    if fits.history is None:
        return torch.ones(len(fits.index), dtype=torch.bool) if last else None
    assert fits.best_var is not None and fits.best_it is not None and fits.best_out is not None
    assert fits.avg is not None
    window = fits.history.shape[1]
    with torch.no_grad():
        fits.history[:, (it - 1) % window] = out
        if it < window:
            return torch.ones(len(fits.index), dtype=torch.bool) if last else None
        var = fits.history.var(dim=1, unbiased=False).flatten(1).mean(1)
        better = var < fits.best_var
        fits.best_var = torch.where(better, var, fits.best_var)
        fits.best_it = torch.where(better, it, fits.best_it)
        fits.best_out[better] = fits.avg[better]
        done = (it - fits.best_it >= s.patience).cpu()
    if last:
        done[:] = True
    return done if bool(done.any()) else None


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

    def config(self) -> dict[str, Any]:
        return {"method": self.name, "params": _record(self.settings)}

    @classmethod
    def current_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        if "parallel" not in params:  # resolved: today's form, or with input_scale beside
            return {k: v for k, v in params.items() if k != "input_scale"}
        # The earlier form: the preset and its overrides (None: the preset's), and parallel.
        names = {field.name for field in dataclasses.fields(DipOptions)}
        try:
            return _record(DipOptions(**{k: v for k, v in params.items() if k in names}))
        except (TypeError, ValueError):
            return params  # not a valid record of any version: compared as it is


def _record(options: DipOptions) -> dict[str, Any]:
    """What a run records of ``options``: the values the fit runs with, not the overrides
    (`-p channels=8` on `tiny`, already 8, is the same fit). `parallel` only schedules the
    networks: with split convolutions (the CPU's) it changes no bit, and with grouped ones no
    more than the batch size does. `input_scale` is no setting."""
    params = dataclasses.asdict(options.resolve())
    for name in ("parallel", "input_scale"):
        del params[name]
    return {"preset": options.preset, **params}
