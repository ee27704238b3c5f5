"""Training the Context Encoder with the published recipe (Pathak et al. 2016, ``train.lua``).

- Data: random square crops (random scale: the crop side is a uniform fraction ``min_crop..1`` of
  the image's shorter side), random horizontal flips, resized to 128 x 128, from any folder of
  images. Files that do not decode are skipped with a warning.
- Loss: ``0.999 * L2 + 0.001 * adversarial``; the L2 term weights the 4-pixel overlap border
  around the hole 10x; the discriminator sees the 64 x 64 centre (real or inpainted).
- Adam, beta1 0.5, lr 2e-4 for D and 10x that for G (``methods.md``).
- CUDA when present, with autocast (bf16 where supported, else fp16 with loss scaling).
- Checkpoints written atomically every ``checkpoint_every`` steps, at the end and on Ctrl-C;
  ``resume`` continues from the saved step with optimiser, scaler and RNG states, so an
  interrupted run ends with the same weights as an uninterrupted one (on the same device).
- Sample grids (context, inpainted, real) written as PNG every ``sample_every`` steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from advpurify.errors import AdvpurifyError, load_error
from advpurify.files import atomic_output, check_output_outside
from advpurify.images import ImageDecodeError, find_images, load_image, save_image
from advpurify.models.context_encoder import (
    CENTER,
    CENTER_START,
    FINE_SIZE,
    OVERLAP,
    SIZES,
    build_discriminator,
    build_generator,
    fill_hole,
)

CHECKPOINT_FORMAT = "advpurify-context-encoder-train-1"


class TrainError(AdvpurifyError):
    """Bad training input: no images, an unreadable or mismatched checkpoint."""


@dataclasses.dataclass
class TrainConfig:
    data: Path
    output: Path
    steps: int = 1000
    size: str = "small"
    batch_size: int = 64
    lr: float = 2e-4
    g_lr_mult: float = 10.0
    beta1: float = 0.5
    wtl2: float = 0.999
    overlap_weight: float = 10.0
    min_crop: float = 0.3
    checkpoint_every: int = 100
    sample_every: int = 100
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    resume: bool = False
    progress: bool = True


@dataclasses.dataclass
class TrainResult:
    output: Path
    start_step: int
    step: int
    history: list[dict[str, float]]
    samples: list[Path]


# ---------------------------------------------------------------------------- data


class CropSampler:
    """Random 128 x 128 crops from a list of image files, drawn from one seeded generator.

    Decoded images are kept in memory (as uint8) up to ``cache_mb``; beyond that they are
    decoded again when drawn. A file that fails to decode is reported once and never drawn again
    (the draw is repeated), so the sequence of crops depends only on the generator state.
    """

    def __init__(
        self,
        paths: list[Path],
        generator: torch.Generator,
        min_crop: float = 0.3,
        cache_mb: float = 2048,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        if not paths:
            raise TrainError("no images to train on")
        self.paths = paths
        self.generator = generator
        self.min_crop = min_crop
        self.cache: dict[int, torch.Tensor] = {}
        self.cache_bytes, self.cache_limit = 0, int(cache_mb * 2**20)
        self.bad: set[int] = set()
        self.warn = warn or (lambda message: warnings.warn(message, stacklevel=2))

    def _image(self, index: int) -> torch.Tensor | None:
        if index in self.cache:
            return self.cache[index]
        try:
            image = load_image(self.paths[index])
        except ImageDecodeError as error:
            self.bad.add(index)
            self.warn(f"skipping {error}")
            if len(self.bad) == len(self.paths):
                raise TrainError(f"none of the {len(self.paths)} images could be read") from None
            return None
        stored = (image * 255).round().to(torch.uint8)
        if self.cache_bytes + stored.numel() <= self.cache_limit:
            self.cache[index] = stored
            self.cache_bytes += stored.numel()
        return stored

    def _draw(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.generator))

    def crop(self) -> torch.Tensor:
        """One crop, ``3 x 128 x 128`` float32 in [0, 1]."""
        while True:
            index = self._draw(len(self.paths))
            if index in self.bad:
                continue
            image = self._image(index)
            if image is not None:
                break
        _, height, width = image.shape
        short = min(height, width)
        fraction = self.min_crop + (1 - self.min_crop) * float(
            torch.rand((), generator=self.generator)
        )
        side = max(1, min(short, round(fraction * short)))
        top = self._draw(height - side + 1)
        left = self._draw(width - side + 1)
        flip = bool(torch.rand((), generator=self.generator) < 0.5)
        patch = image[:, top : top + side, left : left + side].float().div_(255)[None]
        if flip:
            patch = patch.flip(-1)
        shrink = side > FINE_SIZE
        patch = F.interpolate(
            patch,
            size=(FINE_SIZE, FINE_SIZE),
            mode="bilinear",
            align_corners=False,
            antialias=shrink,
        )
        return patch[0].clamp_(0, 1)

    def batch(self, count: int) -> torch.Tensor:
        return torch.stack([self.crop() for _ in range(count)])


# ---------------------------------------------------------------------------- losses


def l2_weights(overlap_weight: float, device: torch.device) -> torch.Tensor:
    """Per-pixel L2 weight over the 64 x 64 centre: ``overlap_weight`` on the 4-pixel border."""
    weights = torch.full((1, 1, CENTER, CENTER), float(overlap_weight), device=device)
    weights[..., OVERLAP : CENTER - OVERLAP, OVERLAP : CENTER - OVERLAP] = 1.0
    return weights


def centre_of(images: torch.Tensor) -> torch.Tensor:
    return images[:, :, CENTER_START : CENTER_START + CENTER, CENTER_START : CENTER_START + CENTER]


# ---------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file beside ``path``, then an atomic rename."""
    with atomic_output(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # zip, pickle and unpickler errors all mean "unreadable"
        raise TrainError(f"{path}: not a readable checkpoint ({load_error(error)})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{path}: not a context encoder training checkpoint")
    return state


# ---------------------------------------------------------------------------- training


def _autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def train(
    config: TrainConfig,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train (or continue training) a context encoder; returns the losses of the steps run."""
    from advpurify.devices import resolve_device

    if config.size not in SIZES:
        raise TrainError(f"size {config.size!r}: use one of {', '.join(SIZES)}")
    if config.steps < 1 or config.batch_size < 1:
        raise TrainError("steps and batch size must be at least 1")
    data = Path(config.data)
    if not data.is_dir():
        raise TrainError(f"{data}: not a folder of images")
    output = Path(config.output)
    # The checkpoint's sample grids are PNG files: inside the data they would become training data.
    check_output_outside(data, output.with_name(output.stem + "-samples"))
    if output.exists() and not config.resume:
        raise TrainError(f"{output} exists: pass --resume to continue it, or choose another path")
    paths = find_images(data)
    if not paths:
        raise TrainError(f"{data}: no image files found")

    device = resolve_device(config.device)
    amp_dtype = _autocast_dtype(device, config.amp)
    torch.manual_seed(config.seed)
    netG = build_generator(config.size).to(device)
    netD = build_discriminator(config.size).to(device)
    betas = (config.beta1, 0.999)
    optG = torch.optim.Adam(netG.parameters(), lr=config.lr * config.g_lr_mult, betas=betas)
    optD = torch.optim.Adam(netD.parameters(), lr=config.lr, betas=betas)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    data_rng = torch.Generator().manual_seed(config.seed)
    sampler = CropSampler(paths, data_rng, config.min_crop, warn=_warn)
    # A fixed batch for the sample grids, from its own generator (does not move data_rng).
    preview = CropSampler(
        paths,
        torch.Generator().manual_seed(config.seed + 1),
        config.min_crop,
        cache_mb=0,
        warn=lambda _m: None,
    ).batch(8)

    start = 0
    if config.resume and output.exists():
        state = load_checkpoint(output)
        if state["size"] != config.size:
            raise TrainError(f"{output}: trained with --size {state['size']}, not {config.size}")
        netG.load_state_dict(state["G"])
        netD.load_state_dict(state["D"])
        optG.load_state_dict(state["optG"])
        optD.load_state_dict(state["optD"])
        scaler.load_state_dict(state["scaler"])
        data_rng.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        start = int(state["step"])
    netG.train()
    netD.train()

    weights = l2_weights(config.overlap_weight, device)
    history: list[dict[str, float]] = []
    samples: list[Path] = []
    sample_dir = output.with_name(output.stem + "-samples")

    def snapshot(step: int) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "size": config.size,
            "G": netG.state_dict(),
            "D": netD.state_dict(),
            "optG": optG.state_dict(),
            "optD": optD.state_dict(),
            "scaler": scaler.state_dict(),
            "data_rng": data_rng.get_state(),
            "torch_rng": torch.get_rng_state(),
            "config": {k: str(v) for k, v in dataclasses.asdict(config).items()},
        }

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=amp_dtype)

    step = start
    progress = _progress(config.progress)
    stop = _StopRequest()
    try:
        with progress, stop:
            task = progress.add_task(
                "context encoder", total=config.steps, completed=start, losses=""
            )
            while step < config.steps:
                real = sampler.batch(config.batch_size).to(device, non_blocking=True) * 2 - 1
                real_centre = centre_of(real)
                with autocast():
                    fake = netG(fill_hole(real))
                    # Discriminator: real centres -> 1, inpainted centres -> 0.
                    d_real = netD(real_centre)
                    d_fake = netD(fake.detach())
                    loss_d = F.binary_cross_entropy_with_logits(
                        d_real.float(), torch.ones_like(d_real, dtype=torch.float32)
                    ) + F.binary_cross_entropy_with_logits(
                        d_fake.float(), torch.zeros_like(d_fake, dtype=torch.float32)
                    )
                optD.zero_grad(set_to_none=True)
                scaler.scale(loss_d).backward()
                scaler.step(optD)

                with autocast():
                    d_fake = netD(fake)
                    adv = F.binary_cross_entropy_with_logits(
                        d_fake.float(), torch.ones_like(d_fake, dtype=torch.float32)
                    )
                    l2 = (weights * (fake.float() - real_centre) ** 2).mean()
                    loss_g = (1 - config.wtl2) * adv + config.wtl2 * l2
                optG.zero_grad(set_to_none=True)
                scaler.scale(loss_g).backward()
                scaler.step(optG)
                scaler.update()
                step += 1

                losses = {"l2": l2.item(), "adv": adv.item(), "d": loss_d.item()}
                history.append({"step": step, **losses})
                progress.update(
                    task,
                    completed=step,
                    losses=f"L2 {losses['l2']:.4f}  adv {losses['adv']:.3f}  D {losses['d']:.3f}",
                )
                if on_step is not None:
                    on_step(step, losses)
                if step % config.checkpoint_every == 0 or step == config.steps:
                    save_checkpoint(output, snapshot(step))
                if config.sample_every and (
                    step % config.sample_every == 0 or step == config.steps
                ):
                    target = sample_dir / f"step-{step:07d}.png"
                    samples.append(write_samples(netG, preview, target))
                if stop.requested and step < config.steps:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        # Only reached between steps (see _StopRequest), so the saved state is consistent.
        if step > start:
            save_checkpoint(output, snapshot(step))
            _warn(f"interrupted at step {step}: checkpoint saved, continue with --resume")
        raise
    return TrainResult(output, start, step, history, samples)


@torch.no_grad()
def write_samples(netG: torch.nn.Module, preview: torch.Tensor, path: Path) -> Path:
    """Rows of (context with the hole filled, inpainted image, real image), as one PNG."""
    from torchvision.utils import make_grid

    was_training = netG.training
    netG.eval()
    device = next(netG.parameters()).device
    real = preview.to(device) * 2 - 1
    context = fill_hole(real)
    inpainted = context.clone()
    fake = netG(context).float()
    s = slice(CENTER_START + OVERLAP, CENTER_START + CENTER - OVERLAP)
    inpainted[:, :, s, s] = fake[:, :, OVERLAP:-OVERLAP, OVERLAP:-OVERLAP]
    netG.train(was_training)
    rows = torch.stack([context, inpainted, real], dim=1).flatten(0, 1)
    grid = make_grid((rows + 1) / 2, nrow=3, padding=2, pad_value=1.0).clamp(0, 1).cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path, fmt="png")
    return path


class _StopRequest:
    """Ctrl-C or SIGTERM (a job scheduler) asks the loop to stop after the current step, so
    that the checkpoint never holds a half-updated step; a second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        _warn("stopping after this step (Ctrl-C again to stop now)")

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _progress(enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[losses]}"),
        disable=not enabled,
    )
