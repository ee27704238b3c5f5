"""Training the Context Encoder with the published recipe (Pathak et al. 2016, ``train.lua``).

- Data: random square crops (random scale: the crop side is a uniform fraction ``min_crop..1`` of
  the image's shorter side), random horizontal flips, resized to 128 x 128, from any folder of
  images (:mod:`advpurify.train.crops`: one seed per sample, decoded by ``DataLoader`` workers
  into pinned memory). Files that do not decode are skipped with a warning.
- Loss: ``0.999 * L2 + 0.001 * adversarial``; the L2 term weights the 4-pixel overlap border
  around the hole 10x; the discriminator sees the 64 x 64 centre (real or inpainted).
- Adam, beta1 0.5, lr 2e-4 for D and 10x that for G (``methods.md``).
- CUDA when present, with autocast (bf16 where supported, else fp16 with loss scaling).
- :class:`Trainer`: :meth:`Trainer.train_step` is one discriminator + generator update and
  returns the losses as device tensors (no host sync per step); :meth:`Trainer.run` loops,
  writes checkpoints atomically every ``checkpoint_every`` steps and at the end, and stops
  cleanly between steps when ``should_stop()`` says so (the CLI wires Ctrl-C and SIGTERM to
  it, and owns the progress bar). ``resume`` continues from the saved step with optimiser,
  scaler and RNG states and the same crops, so an interrupted run ends with the same weights
  as an uninterrupted one (on the same device).
- Sample grids (context, inpainted, real) written as PNG every ``sample_every`` steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from advpurify.devices import resolve_device
from advpurify.errors import load_error
from advpurify.files import atomic_output, check_output_outside
from advpurify.images import find_images, save_image
from advpurify.models.context_encoder import (
    CENTER,
    CENTER_START,
    OVERLAP,
    SIZES,
    build_discriminator,
    build_generator,
    fill_hole,
)
from advpurify.train.crops import CropDataset, SampleRange, TrainError

CHECKPOINT_FORMAT = "advpurify-context-encoder-train-1"
PREVIEW_COUNT = 8


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
    workers: int = 2


# What decides which crops the run trains on, step by step: a resume with other values would
# not continue the run but start another stream of samples midway. (The rates may change.)
SAMPLE_STREAM = {"seed": "--seed", "batch_size": "--batch-size", "min_crop": "--min-crop"}


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _refuse_another_sample_stream(
    output: Path, stored: dict[str, str], config: TrainConfig
) -> None:
    for field, option in SAMPLE_STREAM.items():
        now = getattr(config, field)
        if field in stored and _number(stored[field]) != now:  # stored as text: "1" is 1.0
            raise TrainError(
                f"{output}: trained with {option} {stored[field]}, not {now}: --resume "
                "continues a run with its own samples (use another -o for a new run)"
            )


@dataclasses.dataclass
class TrainResult:
    output: Path
    start_step: int
    step: int
    history: list[dict[str, float]]
    samples: list[Path]
    interrupted: bool = False


StepCallback = Callable[[int, dict[str, torch.Tensor]], None]


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


def _check(config: TrainConfig) -> list[Path]:
    """Every setting and path, before anything is built; returns the training images."""
    if config.size not in SIZES:
        raise TrainError(f"size {config.size!r}: use one of {', '.join(SIZES)}")
    if config.steps < 1 or config.batch_size < 1:
        raise TrainError("steps and batch size must be at least 1")
    if config.workers < 0:
        raise TrainError(f"workers {config.workers}: must be >= 0")
    data = Path(config.data)
    if not data.is_dir():
        raise TrainError(f"{data}: not a folder of images")
    output = Path(config.output)
    # The checkpoint's sample grids are PNG files: inside the data they would become training data.
    check_output_outside(data, sample_folder(output))
    if output.exists() and not config.resume:
        raise TrainError(f"{output} exists: pass --resume to continue it, or choose another path")
    paths = find_images(data)
    if not paths:
        raise TrainError(f"{data}: no image files found")
    return paths


def sample_folder(output: Path) -> Path:
    return output.with_name(output.stem + "-samples")


class Trainer:
    """The GAN of one training run: networks, optimisers, data, and the step counter."""

    def __init__(self, config: TrainConfig, warn: Callable[[str], None] | None = None) -> None:
        paths = _check(config)
        self.config = config
        self.warn = warn or _warn
        self.output = Path(config.output)
        state = None
        if config.resume and not self.output.exists():
            self.warn(f"{self.output}: no checkpoint there to resume, a new run starts")
        if config.resume and self.output.exists():
            state = load_checkpoint(self.output)
            if state["size"] != config.size:  # before building networks of the wrong size
                raise TrainError(
                    f"{self.output}: trained with --size {state['size']}, not {config.size}"
                )
            _refuse_another_sample_stream(self.output, state.get("config", {}), config)
        self.device = resolve_device(config.device)
        self.amp_dtype = _autocast_dtype(self.device, config.amp)
        torch.manual_seed(config.seed)
        self.netG = build_generator(config.size).to(self.device)
        self.netD = build_discriminator(config.size).to(self.device)
        betas = (config.beta1, 0.999)
        lr_g = config.lr * config.g_lr_mult
        self.optG = torch.optim.Adam(self.netG.parameters(), lr=lr_g, betas=betas)
        self.optD = torch.optim.Adam(self.netD.parameters(), lr=config.lr, betas=betas)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.crops = CropDataset(paths, config.seed, config.min_crop)
        # A fixed batch for the sample grids, from its own seed (not the training samples').
        self.preview = CropDataset(paths, config.seed + 1, config.min_crop, cache_mb=0).batch(
            0, PREVIEW_COUNT
        )
        self.weights = l2_weights(config.overlap_weight, self.device)
        self.start_step = self.step = 0
        if state is not None:
            self._restore(state)
        self.netG.train()
        self.netD.train()
        self._warned: set[str] = set()

    def _restore(self, state: dict[str, Any]) -> None:
        self.netG.load_state_dict(state["G"])
        self.netD.load_state_dict(state["D"])
        self.optG.load_state_dict(state["optG"])
        self.optD.load_state_dict(state["optD"])
        # The moments carry on; the rates and betas are this run's (--lr, --g-lr-mult, --beta1):
        # load_state_dict would bring back the saved ones while the config records the new.
        betas = (self.config.beta1, 0.999)
        rates = ((self.optG, self.config.lr * self.config.g_lr_mult), (self.optD, self.config.lr))
        for optimizer, lr in rates:
            for group in optimizer.param_groups:
                group["lr"], group["betas"] = lr, betas
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        self.start_step = self.step = int(state["step"])

    # ------------------------------------------------------------------ data
    def batches(self) -> Iterator[torch.Tensor]:
        """The remaining steps' batches, decoded by workers into pinned memory."""
        size = self.config.batch_size
        loader = DataLoader(
            self.crops,
            batch_size=size,
            sampler=SampleRange(self.step * size, self.config.steps * size),
            num_workers=self.config.workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            prefetch_factor=4 if self.config.workers else None,
            worker_init_fn=_leave_signals_to_the_main_process,
        )
        for crops, skipped in loader:
            for message in {line for text in skipped for line in text.splitlines()}:
                if message not in self._warned:
                    self._warned.add(message)
                    self.warn(message)
            yield crops

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def train_step(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        """One discriminator and one generator update on a batch of [0, 1] crops.

        Returns the losses as detached device tensors: reading them is the caller's choice
        (each ``.item()`` waits for the GPU).
        """
        real = crops.to(self.device, non_blocking=True) * 2 - 1
        real_centre = centre_of(real)
        with self._autocast():
            fake = self.netG(fill_hole(real))
            # Discriminator: real centres -> 1, inpainted centres -> 0.
            d_real = self.netD(real_centre)
            d_fake = self.netD(fake.detach())
            loss_d = F.binary_cross_entropy_with_logits(
                d_real.float(), torch.ones_like(d_real, dtype=torch.float32)
            ) + F.binary_cross_entropy_with_logits(
                d_fake.float(), torch.zeros_like(d_fake, dtype=torch.float32)
            )
        self.optD.zero_grad(set_to_none=True)
        self.scaler.scale(loss_d).backward()
        self.scaler.step(self.optD)

        with self._autocast():
            d_fake = self.netD(fake)
            adv = F.binary_cross_entropy_with_logits(
                d_fake.float(), torch.ones_like(d_fake, dtype=torch.float32)
            )
            l2 = (self.weights * (fake.float() - real_centre) ** 2).mean()
            loss_g = (1 - self.config.wtl2) * adv + self.config.wtl2 * l2
        self.optG.zero_grad(set_to_none=True)
        self.scaler.scale(loss_g).backward()
        self.scaler.step(self.optG)
        self.scaler.update()
        self.step += 1
        return {"l2": l2.detach(), "adv": adv.detach(), "d": loss_d.detach()}

    # ------------------------------------------------------------------ outputs
    def snapshot(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "size": self.config.size,
            "G": self.netG.state_dict(),
            "D": self.netD.state_dict(),
            "optG": self.optG.state_dict(),
            "optD": self.optD.state_dict(),
            "scaler": self.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "config": {k: str(v) for k, v in dataclasses.asdict(self.config).items()},
        }

    def save(self) -> None:
        save_checkpoint(self.output, self.snapshot())

    def write_samples(self) -> Path:
        target = sample_folder(self.output) / f"step-{self.step:07d}.png"
        return write_samples(self.netG, self.preview, target)

    # ------------------------------------------------------------------ the loop
    def run(
        self,
        on_step: StepCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> TrainResult:
        """Train up to ``config.steps``; stop early, checkpointed, when ``should_stop()``."""
        config = self.config
        start = self.step
        losses: list[dict[str, torch.Tensor]] = []
        samples: list[Path] = []
        interrupted = False
        batches = self.batches()
        try:
            for crops in batches:
                step_losses = self.train_step(crops)
                losses.append(step_losses)
                if on_step is not None:
                    on_step(self.step, step_losses)
                last = self.step == config.steps
                if self.step % config.checkpoint_every == 0 or last:
                    self.save()
                if config.sample_every and (self.step % config.sample_every == 0 or last):
                    samples.append(self.write_samples())
                if not last and should_stop is not None and should_stop():
                    self.save()  # between steps: the checkpoint holds a whole step
                    interrupted = True
                    break
        finally:
            batches.close()  # shuts the loader's workers down now, not when collected
        return TrainResult(
            self.output, start, self.step, _history(start, losses), samples, interrupted
        )


def _leave_signals_to_the_main_process(worker_id: int) -> None:
    """In a loader worker: ignore Ctrl-C (the terminal sends it to every process of the job;
    the main process decides when to stop) and die on SIGTERM (a worker inherits whatever
    handler the main process had installed when it forked)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _history(start: int, losses: list[dict[str, torch.Tensor]]) -> list[dict[str, float]]:
    """Per-step losses as floats, read from the device once."""
    if not losses:
        return []
    names = list(losses[0])
    table = torch.stack([torch.stack([step[n].float() for n in names]) for step in losses])
    return [
        {"step": start + i + 1, **dict(zip(names, row, strict=True))}
        for i, row in enumerate(table.cpu().tolist())
    ]


def train(
    config: TrainConfig,
    on_step: StepCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train (or continue training) a context encoder; returns the losses of the steps run."""
    return Trainer(config).run(on_step, should_stop)


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


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)
