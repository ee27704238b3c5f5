"""``advpurify train ...``: training commands (the Context Encoder).

The command owns what belongs to a terminal: the progress bar, and Ctrl-C / SIGTERM, which ask
the trainer to stop after the current step (a second Ctrl-C stops at once).
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any

import typer

from advpurify import checks
from advpurify.files import check_writable_file

LOSS_REFRESH = 10  # steps between loss readouts: each one waits for the GPU

train_app = typer.Typer(
    help="Train the generative models the purifiers use.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@train_app.command("context-encoder")
def context_encoder(
    data: Path = typer.Option(
        ..., "--data", help="Folder of training images (searched recursively)."
    ),
    output: Path = typer.Option(..., "--output", "-o", help="Checkpoint file to write (.pt)."),
    steps: int = typer.Option(1000, "--steps", help="Total optimisation steps."),
    size: str = typer.Option("small", "--size", help="Network size: small or paper (71M)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Crops per step."),
    lr: float = typer.Option(2e-4, "--lr", help="Adam learning rate of the discriminator."),
    g_lr_mult: float = typer.Option(10.0, "--g-lr-mult", help="Generator lr = lr x this."),
    min_crop: float = typer.Option(
        0.3, "--min-crop", help="Smallest crop side, as a fraction of the shorter image side."
    ),
    checkpoint_every: int = typer.Option(100, "--checkpoint-every", help="Steps between saves."),
    sample_every: int = typer.Option(
        100,
        "--sample-every",
        help="Steps between sample grids (PNG beside the checkpoint); 0: none.",
    ),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    amp: bool = typer.Option(True, "--amp/--no-amp", help="Mixed precision (CUDA only)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint at -o."),
    workers: int = typer.Option(2, "--workers", help="Processes decoding crops (0: in-process)."),
) -> None:
    """Train a Context Encoder (Pathak et al. 2016) with the published recipe."""
    from advpurify.train.context_encoder import TrainConfig, Trainer

    checks.at_least("--steps", steps, 1)
    checks.seed("--seed", seed)
    checks.at_least("--batch-size", batch_size, 1)
    checks.positive("--lr", lr)
    checks.positive("--g-lr-mult", g_lr_mult)
    checks.in_range("--min-crop", min_crop, 0.01, 1.0)
    checks.at_least("--checkpoint-every", checkpoint_every, 1)
    checks.at_least("--sample-every", sample_every, 0)
    check_writable_file(output, "checkpoint")
    checks.at_least("--workers", workers, 0)
    trainer = Trainer(
        TrainConfig(
            data=data,
            output=output,
            steps=steps,
            size=size,
            batch_size=batch_size,
            lr=lr,
            g_lr_mult=g_lr_mult,
            min_crop=min_crop,
            checkpoint_every=checkpoint_every,
            sample_every=sample_every,
            seed=seed,
            device=device,
            amp=amp,
            resume=resume,
            workers=workers,
        )
    )
    progress = _progress(sys.stderr.isatty())
    with progress, StopRequest() as stop:
        task = progress.add_task("context encoder", total=steps, completed=trainer.step, losses="")

        def show(step: int, losses: dict[str, Any]) -> None:
            fields = {}
            if step % LOSS_REFRESH == 0 or step == steps:
                values = {k: float(v) for k, v in losses.items()}
                fields["losses"] = (
                    f"L2 {values['l2']:.4f}  adv {values['adv']:.3f}  D {values['d']:.3f}"
                )
            progress.update(task, completed=step, **fields)

        result = trainer.run(on_step=show, should_stop=lambda: stop.requested)
    if result.interrupted:
        _warn(f"interrupted at step {result.step}: checkpoint saved, continue with --resume")
        raise typer.Exit(130)
    if result.history:
        last = result.history[-1]
        typer.echo(
            f"steps {result.start_step + 1}..{result.step}: L2 {last['l2']:.4f}, "
            f"adv {last['adv']:.3f}, D {last['d']:.3f}; checkpoint {result.output}"
        )
    else:
        typer.echo(f"already at step {result.step}: nothing to do ({result.output})")
    if result.samples:
        typer.echo(f"samples: {result.samples[-1].parent}")


class StopRequest:
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

    def __enter__(self) -> StopRequest:
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
    from rich.console import Console
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
        console=Console(stderr=True),
        disable=not enabled,
    )


def register(app: typer.Typer) -> None:
    app.add_typer(train_app, name="train")
