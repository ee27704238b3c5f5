"""``advpurify export`` and ``advpurify bench``: thin wrappers over ``advpurify.export`` and
``advpurify.export.bench``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from advpurify import checks
from advpurify.cli.options import given
from advpurify.errors import AdvpurifyError
from advpurify.files import check_writable_file

# 4096 images of 3 x 224 x 224 float32 are 2.5 GB of input alone: beyond it, a typo.
MAX_BENCH_BATCH = 4096


def _name_the_method(items: list[str], methods: list[str]) -> list[str]:
    """A bare ``-p name=value`` belongs to the one method benchmarked."""
    if len(methods) != 1:
        return list(items)
    return [i if "." in i.partition("=")[0] else f"{methods[0]}.{i}" for i in items]


def _note(message: str) -> None:
    print(message, file=sys.stderr)


NOISY = 3.0  # p95 over p50: beyond this, other work on the machine shaped the figures


def _note_noise(results) -> None:
    """Say when the timings scattered: on a shared machine they measure the neighbours too."""
    noisy = [r for r in results if r.p50_ms > 0 and r.p95_ms > NOISY * r.p50_ms]
    if noisy:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        _note(
            f"note: p95 is over {NOISY:g}x p50 in {len(noisy)} of {len(results)} rows (load "
            f"average {load:.1f} on {os.cpu_count()} CPUs): the machine was busy; compare "
            "figures from one quiet run"
        )


def _parse_batch(text: str) -> int | None:
    if text.lower() == "dynamic":
        return None
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise AdvpurifyError(f"--batch {text!r}: use dynamic or a positive integer")


def _list_exportable() -> None:
    from rich.console import Console
    from rich.table import Table

    from advpurify.export.fused import refusal
    from advpurify.models.registry import exportable_names, get_exportable
    from advpurify.purifiers import list_purifiers

    table = Table(title="Exportable models")
    for column in ("model", "input", "output", "description"):
        table.add_column(column)
    for name in exportable_names():
        entry = get_exportable(name)
        table.add_row(name, "x".join(map(str, entry.sample_shape)), entry.output, entry.description)
    purifiers = Table(title="Purifiers in a fused graph (--purifier NAME --classifier MODEL)")
    purifiers.add_column("purifier")
    purifiers.add_column("exportable")
    for name in list_purifiers():
        reason = refusal(name)
        purifiers.add_row(name, "yes" if reason is None else f"no: {reason}")
    console = Console()
    console.print(table)
    console.print(purifiers)


PLOT_SUFFIXES = (".png",)  # the figure is written as PNG whatever the name says


def _refuse_unused(ctx: typer.Context, triton: bool, fused: bool) -> None:
    """An option the export would not use is refused, never silently ignored."""
    unused = []
    if not triton:
        unused += given(
            ctx, "triton_layout", "triton_max_batch", "triton_batch_wait_ms", "triton_name"
        )
    if not fused and not triton:
        unused += given(ctx, "size")
    if unused:
        goes_with = (
            "--triton-repo" if not triton and unused[0].startswith("--triton") else "--purifier"
        )
        raise AdvpurifyError(f"{unused[0]} goes with {goes_with}: this export would not use it")


def export_command(
    ctx: typer.Context,
    model: str | None = typer.Argument(None, help="A model from --list (e.g. googlenet)."),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="FILE.onnx, or FILE.engine for a TensorRT engine."
    ),
    opset: int = typer.Option(18, help="ONNX opset."),
    batch: str = typer.Option("dynamic", help="dynamic, or a fixed batch size."),
    fp16: bool = typer.Option(False, "--fp16", help="FP16 weights and arithmetic inside."),
    weights: str | None = typer.Option(
        None, help="Weights: default, a local file, or 'random' (architecture only)."
    ),
    purifier: str | None = typer.Option(
        None, help="Fuse this purifier in front of --classifier (one graph)."
    ),
    param: list[str] = typer.Option([], "--param", "-p", help="Purifier parameter name=value."),
    classifier: str | None = typer.Option(None, help="The classifier of a fused graph."),
    size: int = typer.Option(224, min=16, help="Input side of a fused graph."),
    check_images: Path | None = typer.Option(
        None, help="Folder of real images for the parity check (default: synthetic images)."
    ),
    check_count: int = typer.Option(16, min=1, help="How many inputs the parity check uses."),
    list_models: bool = typer.Option(False, "--list", help="List what can be exported."),
    triton_repo: Path | None = typer.Option(
        None, help="Write a Triton model repository here (with --purifier and --classifier)."
    ),
    triton_layout: str = typer.Option(
        "fused", help="fused (one ONNX graph) or ensemble (purifier + classifier models)."
    ),
    triton_max_batch: int = typer.Option(32, help="Triton's max_batch_size."),
    triton_batch_wait_ms: float = typer.Option(5.0, help="Triton's dynamic batching delay (ms)."),
    triton_name: str | None = typer.Option(
        None,
        help="Model name (default advpurify_METHOD_CLASSIFIER); one per setting keeps several.",
    ),
) -> None:
    """Export a network (preprocessing inside, [0, 1] RGB in) to ONNX or a TensorRT engine.

    Every file is checked: ONNX checker, then ONNX Runtime against torch (max abs difference,
    top-1 agreement); past the tolerance the export fails and nothing is written.
    """
    from advpurify.cli.settings import parse_params
    from advpurify.export.exporter import export_fused, export_model

    if list_models:
        _list_exportable()
        return
    _refuse_unused(ctx, triton=triton_repo is not None, fused=purifier is not None)
    if triton_repo is not None:
        _triton(
            triton_repo,
            purifier,
            classifier or model,
            params=param,
            weights=weights,
            size=size,
            layout=triton_layout,
            max_batch=triton_max_batch,
            batch_wait_ms=triton_batch_wait_ms,
            name=triton_name,
            opset=opset,
            fp16=fp16,
            fixed_batch=_parse_batch(batch),
            output=output,
            check_images=check_images,
            check_count=check_count,
        )
        return
    if output is None:
        raise AdvpurifyError("--output/-o FILE.onnx (or FILE.engine) is required")
    check_writable_file(output, "--output file")
    common = dict(
        opset=opset,
        batch=_parse_batch(batch),
        fp16=fp16,
        weights=weights,
        check_images=check_images,
        check_count=check_count,
        notify=_note,
    )
    if purifier is not None:
        if classifier is None and model is None:
            raise AdvpurifyError("--purifier needs --classifier MODEL")
        if classifier is not None and model is not None and classifier != model:
            raise AdvpurifyError(
                f"MODEL {model!r} and --classifier {classifier!r}: name the classifier once"
            )
        result = export_fused(
            purifier,
            classifier or model,
            output,
            params=parse_params(purifier, param),
            size=size,
            **common,
        )
    else:
        if model is None:
            raise AdvpurifyError("name a MODEL (see --list), or --purifier with --classifier")
        if param or classifier:
            raise AdvpurifyError("--param and --classifier go with --purifier")
        result = export_model(model, output, **common)
    for line in result.lines():
        print(line)


def _triton(
    repo: Path, purifier: str | None, classifier: str | None, *, fixed_batch, output, **options
) -> None:
    from advpurify.cli.settings import parse_params
    from advpurify.export.triton import write_triton_repo

    if purifier is None or classifier is None:
        raise AdvpurifyError("--triton-repo needs --purifier METHOD and --classifier MODEL")
    options["params"] = parse_params(purifier, options["params"])
    if fixed_batch is not None or output is not None:
        raise AdvpurifyError(
            "--triton-repo writes its own files with a dynamic batch: drop --output and --batch"
        )
    result = write_triton_repo(repo, purifier, classifier, notify=_note, **options)
    for line in result.lines():
        print(line)


def bench_command(
    ctx: typer.Context,
    model: list[str] = typer.Option(
        [], "--model", "-m", help="Repeat for several (default googlenet without --method)."
    ),
    method: list[str] = typer.Option(
        [], "--method", help="Time purification methods instead (repeatable; see `methods`)."
    ),
    param: list[str] = typer.Option(
        [], "--param", "-p", help="Method parameter METHOD.name=value (repeatable)."
    ),
    device: list[str] = typer.Option(["cpu"], "--device", help="--method: cpu, cuda or auto."),
    size: list[int] = typer.Option([224], "--size", help="--method: image side; repeatable."),
    classifier: str | None = typer.Option(
        None, help="--method: also time purifier + this classifier, and the classifier alone."
    ),
    backend: list[str] = typer.Option(
        [],
        "--backend",
        "-b",
        help="torch, torch-compile, ort-cpu, ort-cuda, ort-trt, tensorrt or auto; repeatable "
        "(default torch and ort-cpu; with --classifier one backend, default torch).",
    ),
    batch_size: list[int] = typer.Option([1, 16], "--batch-size", help="Repeatable."),
    precision: list[str] = typer.Option(
        ["fp32"], "--precision", help="fp32 or fp16 (--method: bf16/fp16 autocast, CUDA)."
    ),
    weights: str | None = typer.Option(
        None, help="'random' times the architecture alone (offline, every network)."
    ),
    warmup: int = typer.Option(3, min=0, help="Untimed batches first."),
    iterations: int = typer.Option(20, min=1, help="Timed batches."),
    fit_steps: int = typer.Option(
        10, min=1, help="--method: fitting steps per timed call of dip and ppgn."
    ),
    iterations_per_fit: bool = typer.Option(
        False,
        "--iterations-per-fit",
        help="--method: extrapolate dip and ppgn to their configured step count (linear).",
    ),
    random: bool = typer.Option(False, "--random", help="--method: random images, not photos."),
    threads: int | None = typer.Option(None, help="ONNX Runtime intra-op threads."),
    eval_folder: Path | None = typer.Option(
        None, help="Also time end-to-end classification of this folder vs raw inference."
    ),
    eval_backend: str = typer.Option("ort-cpu", help="Backend of the end-to-end figure."),
    eval_batch_size: int = typer.Option(16, min=1),
    workers: int = typer.Option(2, min=1, help="Decoding threads of the end-to-end figure."),
    json_file: Path | None = typer.Option(None, "--json", help="Write the results as JSON."),
    plot: Path | None = typer.Option(
        None, help="--method: images/s against batch size, as FILE.png."
    ),
) -> None:
    """Latency (p50, p95 per batch) and images/s: per model x backend x batch x precision, or
    with --method per purification method x device x batch x image size."""
    # A value given twice would be timed twice: each once, in the order given.
    method, model, backend, device, size, batch_size, precision = (
        list(dict.fromkeys(values))
        for values in (method, model, backend, device, size, batch_size, precision)
    )
    if method:
        if model or eval_folder is not None:
            raise AdvpurifyError("--method and --model/--eval-folder are separate benchmarks")
        unused = given(ctx, "eval_backend", "eval_batch_size", "workers")
        if unused:
            raise AdvpurifyError(f"{unused[0]} goes with --eval-folder: --method would not use it")
        _bench_methods(
            method, param, device, size, classifier, backend, batch_size, precision, weights,
            warmup, iterations, fit_steps, iterations_per_fit, random, threads, json_file, plot,
        )  # fmt: skip
        return
    unused = given(
        ctx, "plot", "classifier", "param", "device", "size", "fit_steps", "iterations_per_fit",
        "random",
    )  # fmt: skip
    if unused:
        raise AdvpurifyError(f"{unused[0]} goes with --method: timing models would not use it")
    if eval_folder is None and (unused := given(ctx, "eval_backend", "eval_batch_size", "workers")):
        raise AdvpurifyError(f"{unused[0]} goes with --eval-folder: this run would not use it")
    _bench_models(
        model or ["googlenet"], backend or ["torch", "ort-cpu"], batch_size, precision, weights,
        warmup, iterations, threads, eval_folder, eval_backend, eval_batch_size, workers,
        json_file,
    )  # fmt: skip


def _bench_methods(
    methods, param, device, size, classifier, backend, batch_size, precision, weights, warmup,
    iterations, fit_steps, extrapolate, random, threads, json_file, plot,
) -> None:  # fmt: skip
    from rich.table import Table

    from advpurify.cli.settings import parse_method_params
    from advpurify.cli.tables import print_table
    from advpurify.export.bench import bench_methods, plot_methods, write_json

    if len(backend) > 1 or len(precision) > 1:
        raise AdvpurifyError("--method takes one --backend (of --classifier) and one --precision")
    if backend and classifier is None:
        raise AdvpurifyError("--backend goes with --classifier when timing methods")
    if weights not in (None, "random") and classifier is None:  # random: every model's
        raise AdvpurifyError("--weights FILE goes with --classifier when timing methods")
    if plot is not None and plot.suffix.lower() not in PLOT_SUFFIXES:
        raise AdvpurifyError(f"--plot {plot}: name a {', '.join(PLOT_SUFFIXES)} file")
    for path, option in ((json_file, "--json file"), (plot, "--plot file")):
        if path is not None:
            check_writable_file(path, option)  # before the timing, not after
    done: list = []
    settings = {"command": "bench --method", "fit_steps": fit_steps, "extrapolated": extrapolate}

    def on_result(r) -> None:
        _note(
            f"{r.label} {r.device} batch {r.batch_size} size {r.size}: {r.images_per_s:.2f} img/s"
        )
        done.append(r)
        if json_file is not None:  # rewritten after every row: a crash keeps what was measured
            write_json(json_file, [row.to_json() for row in done], settings)

    results = bench_methods(
        methods,
        params=parse_method_params(_name_the_method(param, methods), list(methods)),
        devices=device,
        batch_sizes=batch_size,
        sizes=size,
        classifier=classifier,
        backend=backend[0] if backend else "torch",
        weights=weights,
        warmup=warmup,
        iterations=iterations,
        fit_steps=fit_steps,
        extrapolate=extrapolate,
        random=random,
        precision=precision[0],
        threads=threads,
        notify=_note,
        on_result=on_result,
    )
    table = Table(title=f"advpurify bench --method ({'random' if random else 'sample'} images)")
    columns = ("method", "device", "batch", "size", "steps", "p50 ms", "p95 ms", "img/s", "peak MB")
    for column in columns:
        table.add_column(
            column, justify="left" if column in ("method", "steps") else "right", no_wrap=True
        )
    for r in results:
        table.add_row(
            r.label, r.device, str(r.batch_size), str(r.size), r.describe_steps(),
            f"{r.p50_ms:.1f}", f"{r.p95_ms:.1f}", f"{r.images_per_s:.2f}", f"{r.peak_mb:.0f}",
        )  # fmt: skip
    print_table(table)
    _note_noise(results)
    if any(r.fit_steps for r in results):
        how = "extrapolated linearly to the configured count" if extrapolate else "as timed"
        _note(f"dip/ppgn: {fit_steps} fitting steps per timed call, figures {how}")
    if json_file is not None:
        write_json(json_file, [r.to_json() for r in results], settings)
        _note(f"wrote {json_file}")
    if plot is not None:
        plot_methods(results, plot)
        _note(f"wrote {plot}")


def _bench_models(
    model, backend, batch_size, precision, weights, warmup, iterations, threads, eval_folder,
    eval_backend, eval_batch_size, workers, json_file,
) -> None:  # fmt: skip
    from rich.console import Console
    from rich.table import Table

    from advpurify.cli.tables import print_table
    from advpurify.export.bench import bench, bench_eval, write_json

    for size in [*batch_size, eval_batch_size]:
        checks.in_range("--batch-size", size, 1, MAX_BENCH_BATCH)
    if threads is not None:
        checks.at_least("--threads", threads, 1)
    if json_file is not None:
        check_writable_file(json_file, "--json file")
    if eval_folder is not None and not Path(eval_folder).is_dir():
        raise AdvpurifyError(f"--eval-folder {eval_folder}: no such folder")
    console = Console()
    results = bench(
        model,
        backend,
        batch_size,
        precision,
        weights=weights,
        warmup=warmup,
        iterations=iterations,
        threads=threads,
        notify=_note,
        on_result=lambda r: _note(
            f"{r.model} {r.backend} {r.precision} batch {r.batch_size}: {r.images_per_s:.1f} img/s"
        ),
    )
    table = Table(title=f"advpurify bench (weights: {weights or 'default'})")
    for column in ("model", "backend", "device", "prec", "batch", "p50 ms", "p95 ms", "img/s"):
        table.add_column(
            column, justify="left" if column in ("model", "backend") else "right", no_wrap=True
        )
    for r in results:
        table.add_row(
            r.model,
            r.backend,
            r.device,
            r.precision,
            str(r.batch_size),
            f"{r.p50_ms:.1f}",
            f"{r.p95_ms:.1f}",
            f"{r.images_per_s:.1f}",
        )
    print_table(table, console)
    _note_noise(results)
    payload: list[dict] = [r.to_json() for r in results]
    if eval_folder is not None:
        figure = bench_eval(
            eval_folder,
            model[0],
            eval_backend,
            batch_size=eval_batch_size,
            workers=workers,
            weights=weights,
            threads=threads,
            notify=_note,
        )
        top1 = "" if figure.top1 is None else f", top-1 {figure.top1:.0%}"
        console.print(
            f"end-to-end {figure.model} on {figure.backend}, {figure.images} images from "
            f"{eval_folder}: {figure.eval_images_per_s:.1f} img/s vs raw "
            f"{figure.raw_images_per_s:.1f} img/s = {figure.ratio:.2f}{top1}"
        )
        payload.append(figure.to_json())
    if json_file is not None:
        write_json(json_file, payload, {"command": "bench --model"})
        _note(f"wrote {json_file}")


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
    app.command("bench")(bench_command)
