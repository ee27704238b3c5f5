"""``advpurify batch`` / ``purify-batch`` and ``advpurify methods``."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from advpurify.cli.settings import parse_params
from advpurify.devices import resolve_device
from advpurify.files import check_writable_folder, display_name, printable
from advpurify.images import MAX_IMAGE_PIXELS
from advpurify.pipeline.batch import (
    PIXEL_BUDGET,
    PipelineOptions,
    Record,
    RunPlan,
    RunSummary,
    Shard,
    check_finite_assignments,
    check_folders,
    default_output_dir,
    plan_run,
)
from advpurify.pipeline.ray_engine import Engine, RayOptions, select_engine
from advpurify.purifiers import create_purifier, list_purifiers, purifier_class, setting_fields

err_console = Console(stderr=True)


def batch(
    input_dir: Path = typer.Argument(..., help="Folder of images (searched recursively)."),
    method: str = typer.Option(..., "--method", "-m", help="Purification method (see `methods`)."),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Output folder (default: a sibling, INPUT-purified-METHOD)."
    ),
    param: list[str] = typer.Option(
        [], "--param", "-p", help="Method parameter name=value (repeatable)."
    ),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    batch_size: int = typer.Option(16, help="Images per purifier call (equal sizes batch)."),
    workers: int = typer.Option(
        min(4, os.cpu_count() or 2), help="Reader threads and writer threads, each."
    ),
    fmt: str = typer.Option("png", "--format", help="png (lossless), jpg or webp."),
    quality: int | None = typer.Option(None, help="Quality for jpg and webp, 1-100 [default: 95]."),
    seed: int = typer.Option(0, help="Seed of stochastic methods (per image, stable)."),
    overwrite: bool = typer.Option(False, help="Redo outputs that exist, even with new settings."),
    shard: str = typer.Option("0/1", help="Process shard i of n (i/n): for many machines."),
    background: str = typer.Option("white", help="Colour transparent pixels become: white|black."),
    max_image_pixels: int = typer.Option(
        MAX_IMAGE_PIXELS, help="An image above this many pixels fails alone, before decoding."
    ),
    pixel_budget: int = typer.Option(
        PIXEL_BUDGET, help="Decoded pixels in flight at once (bounds memory)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    engine: str = typer.Option("local", help="local (this process) or ray (Ray Data, any size)."),
    ray_address: str = typer.Option(
        "", help="Ray: empty starts a local Ray; auto or ray://host:port joins a cluster."
    ),
    gpus_per_worker: float = typer.Option(0.0, help="Ray: GPUs of each purifier actor."),
    cpus_per_worker: float = typer.Option(1.0, help="Ray: CPUs of each purifier actor."),
    concurrency: int = typer.Option(1, help="Ray: purifier actors."),
) -> None:
    """Purify every image in a folder into a mirrored output folder (resumable)."""
    # Ctrl-C from here on only asks the run to stop: raised in this thread while reader threads
    # import modules, it could leave an import lock held and hang the program.
    stop = threading.Event()
    with _first_interrupt_stops(stop):
        output = output or default_output_dir(input_dir, method)
        # Everything is checked before any work: a bad argument never leaves half a run.
        check_folders(input_dir, output)
        ray_options = RayOptions(ray_address, gpus_per_worker, cpus_per_worker, concurrency)
        run = select_engine(engine, ray_options, device)
        options = PipelineOptions(
            batch_size=batch_size,
            workers=workers,
            fmt=fmt,
            quality=quality,
            seed=seed,
            overwrite=overwrite,
            shard=Shard.parse(shard),
            background=background,
            max_image_pixels=max_image_pixels,
            pixel_budget=pixel_budget,
        )
        options.check()
        check_finite_assignments(param)
        # The Ray engine builds its purifiers on the workers; the driver's copy only plans.
        driver_device = resolve_device(device) if engine == "local" else "cpu"
        purifier = create_purifier(method, device=driver_device, **parse_params(method, param))
        plan = plan_run(input_dir, output, purifier, options)
        _note_left_out(plan.left_out, input_dir)
        summary = _run_with_progress(plan, quiet, run, stop)
        _print_summary(summary)
        raise typer.Exit(summary.exit_code)


def _note_left_out(left_out: list[Path], input_dir: Path) -> None:
    folders = [path for path in left_out if path.is_dir()]
    files = [path for path in left_out if not path.is_dir()]
    notes = [
        (files, "file{s} without an image extension left out"),
        (folders, "folder{s} reached through a symbolic link not entered"),
    ]
    for found, what in notes:
        if found:
            example = display_name(found[0].relative_to(input_dir))
            what = what.format(s="" if len(found) == 1 else "s")
            err_console.print(
                f"note: {len(found)} {what} (e.g. {example})", markup=False, soft_wrap=True
            )


@contextlib.contextmanager
def _first_interrupt_stops(stop: threading.Event) -> Iterator[None]:
    """The first Ctrl-C stops after the batch on the device (outputs finish, the manifest stays
    whole); a second one stops at once. The previous handler is back afterwards."""

    def handler(signum, frame) -> None:
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # A DIP or PPGN batch can take minutes: say at once that the stop was heard.
        sys.stderr.write(
            "\nstopping after the batch on the device (Ctrl-C again to stop at once)\n"
        )

    # Signals go to the main thread only; a job started with Ctrl-C ignored keeps ignoring it.
    main = threading.current_thread() is threading.main_thread()
    main = main and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
    previous = signal.getsignal(signal.SIGINT) if main else None
    if main:
        signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


def _run_with_progress(
    plan: RunPlan, quiet: bool, run: Engine, stop: threading.Event
) -> RunSummary:
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]:.1f} img/s"),
        TimeRemainingColumn(),
        console=err_console,
        disable=quiet,
    )
    with progress:
        task = progress.add_task(plan.purifier.name, total=len(plan.pairs), rate=0.0)

        def on_progress(record: Record) -> None:
            if record.status == "failed":
                name, reason = display_name(record.input), printable(record.reason or "")
                # One line whatever the width (logs are grepped), colour only on a terminal.
                line = Text.assemble(("failed", "red"), f" {name}: {reason}")
                progress.console.print(line, soft_wrap=True)
            progress.advance(task)
            elapsed = progress.tasks[0].elapsed or 0.0
            done = progress.tasks[0].completed
            progress.update(task, rate=done / elapsed if elapsed else 0.0)

        return run(plan, on_progress, stop)


def _print_summary(summary: RunSummary) -> None:
    if summary.interrupted:
        finished = summary.done + summary.skipped
        err_console.print(
            f"interrupted: {finished} done, rerun the same command to resume",
            markup=False,
            soft_wrap=True,
        )
        return
    err_console.print(
        f"purified into {display_name(summary.output_dir)}", markup=False, soft_wrap=True
    )
    table = Table()
    for column in ("done", "skipped", "failed", "seconds", "images/s"):
        table.add_column(column, justify="right")
    table.add_row(
        str(summary.done),
        str(summary.skipped),
        str(summary.failed),
        f"{summary.seconds:.1f}",
        f"{summary.images_per_second:.1f}",
    )
    err_console.print(table)
    if summary.stopped:
        err_console.print(
            f"error: stopped early: {summary.stopped}; {summary.untouched} of {summary.planned} "
            "images left untouched: fix it and rerun the same command to resume",
            markup=False,
            soft_wrap=True,
        )
    if summary.failures:
        # Each failure was printed as it happened; the manifest keeps them all.
        manifest = display_name(summary.output_dir / "manifest.jsonl")
        err_console.print(f"{summary.failed} failed: see {manifest}", markup=False, soft_wrap=True)


def methods() -> None:
    """List every purification method with its parameters and defaults."""
    console = Console()
    table = Table(show_lines=True)
    for column in ("method", "parameters (default, range)", "notes"):
        table.add_column(column, overflow="fold")  # a long default is folded, never cut
    for name in list_purifiers():
        cls = purifier_class(name)
        params = "\n".join(
            f"{p.name}={_show(p.default)} {p.type.__name__} {p.describe_range()}  {p.help}".rstrip()
            for p in setting_fields(cls.Settings)
        )
        flags = [
            f
            for f, on in (("stochastic", cls.stochastic), ("differentiable", cls.differentiable))
            if on
        ]
        notes = cls.description + (f"\n({', '.join(flags)})" if flags else "")
        table.add_row(name, params or "-", notes)
    console.print(table)


def _show(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else repr(value)


def samples(
    folder: Path = typer.Argument(..., help="Folder to write the photographs into."),
) -> None:
    """Write real sample photographs (shipped in scikit-image and matplotlib) as PNG files."""
    from advpurify.samples import write_sample_photos

    check_writable_folder(folder)
    paths = write_sample_photos(folder)
    err_console.print(f"{len(paths)} sample photographs in {folder}")


def register(app: typer.Typer) -> None:
    app.command("batch")(batch)
    app.command("methods")(methods)
    app.command("samples")(samples)


def standalone_app() -> typer.Typer:
    """``purify-batch``: the batch command as a program of its own."""
    from advpurify.cli.errors import wrap_commands

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(batch)
    wrap_commands(app)
    return app
