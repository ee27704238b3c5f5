"""``advpurify export`` and ``advpurify bench``: thin wrappers over ``advpurify.export`` and
``advpurify.export.bench``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from advpurify.errors import AdvpurifyError


def _note(message: str) -> None:
    print(message, file=sys.stderr)


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


def export_command(
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
    model: list[str] = typer.Option(["googlenet"], "--model", "-m", help="Repeat for several."),
    backend: list[str] = typer.Option(
        ["torch", "ort-cpu"],
        "--backend",
        "-b",
        help="torch, torch-compile, ort-cpu, ort-cuda, ort-trt, tensorrt or auto; repeatable.",
    ),
    batch_size: list[int] = typer.Option([1, 16], "--batch-size", help="Repeatable."),
    precision: list[str] = typer.Option(["fp32"], "--precision", help="fp32 or fp16; repeatable."),
    weights: str | None = typer.Option(
        None, help="'random' times the architecture alone (offline, every model)."
    ),
    warmup: int = typer.Option(3, min=0, help="Untimed batches first."),
    iterations: int = typer.Option(20, min=1, help="Timed batches."),
    threads: int | None = typer.Option(None, help="ONNX Runtime intra-op threads."),
    eval_folder: Path | None = typer.Option(
        None, help="Also time end-to-end classification of this folder vs raw inference."
    ),
    eval_backend: str = typer.Option("ort-cpu", help="Backend of the end-to-end figure."),
    eval_batch_size: int = typer.Option(16, min=1),
    workers: int = typer.Option(2, min=1, help="Decoding threads of the end-to-end figure."),
    json_file: Path | None = typer.Option(None, "--json", help="Write the results as JSON."),
) -> None:
    """Latency (p50, p95 per batch) and images/s per model x backend x batch size x precision."""
    from rich.console import Console
    from rich.table import Table

    from advpurify.export.bench import bench, bench_eval

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
    console.print(table)
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
        json_file.parent.mkdir(parents=True, exist_ok=True)
        json_file.write_text(json.dumps(payload, indent=2) + "\n")
        _note(f"wrote {json_file}")


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
    app.command("bench")(bench_command)
