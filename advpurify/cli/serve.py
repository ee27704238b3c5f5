"""``advpurify serve``: a thin wrapper over ``advpurify.serve``."""

from __future__ import annotations

import sys

import typer

from advpurify import checks
from advpurify.cli.settings import parse_params
from advpurify.serve.app import require_ray, serve_forever
from advpurify.serve.config import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_PIXELS, ServeConfig


def serve_command(
    method: str = typer.Option(..., "--method", "-m", help="Purification method (see `methods`)."),
    param: list[str] = typer.Option(
        [], "--param", "-p", help="Method parameter name=value (repeatable); requests may override."
    ),
    classifier: str | None = typer.Option(
        None, help="Also serve POST /classify with this classifier (e.g. efficientnet-lite0)."
    ),
    backend: str = typer.Option("auto", help="Classifier backend: auto, torch, ort-cpu, ..."),
    weights: str | None = typer.Option(None, help="Classifier weights file (default: its own)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="HTTP port."),
    max_batch: int = typer.Option(32, help="Most requests batched into one call."),
    batch_wait_ms: float = typer.Option(5.0, help="How long a batch waits to fill (ms)."),
    replicas: int = typer.Option(1, help="Replicas of each deployment."),
    device: str = typer.Option("auto", help="auto (a GPU when present), cpu or cuda."),
    max_body_mb: float = typer.Option(
        DEFAULT_MAX_BODY_BYTES / 2**20, help="Larger request bodies are refused unread (MiB)."
    ),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, help="Larger images are refused undecoded."),
    metrics_port: int = typer.Option(8080, help="Ray's Prometheus metrics port."),
) -> None:
    """Serve purification (and classification) over HTTP on Ray Serve, batching requests."""
    require_ray()  # before anything else: one line naming the extra
    checks.positive("--max-body-mb", max_body_mb)
    config = ServeConfig(
        method=method,
        params=parse_params(method, param),
        classifier=classifier,
        backend=backend,
        weights=weights,
        device=device,
        host=host,
        port=port,
        max_batch=max_batch,
        batch_wait_ms=batch_wait_ms,
        replicas=replicas,
        max_body_bytes=int(max_body_mb * 2**20),
        max_pixels=max_pixels,
        metrics_port=metrics_port,
    ).checked()
    serve_forever(config, notify=lambda message: print(message, file=sys.stderr))


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
