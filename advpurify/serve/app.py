"""Start Ray and Ray Serve, run the application on ``host:port``, stop it again."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from advpurify.devices import resolve_device
from advpurify.errors import AdvpurifyError
from advpurify.models.classifiers import classifier_spec
from advpurify.runtime.installed import BackendError, canonical, unavailable_reason
from advpurify.serve.config import ServeConfig
from advpurify.serve.stage import purifier_for

APP_NAME = "advpurify"
RAY_EXTRA = "pip install 'advpurify[ray]'"


def require_ray() -> None:
    """One line naming the extra when Ray Serve is not installed."""
    for module in ("ray", "fastapi"):
        if importlib.util.find_spec(module) is None:
            raise AdvpurifyError(f"advpurify serve needs Ray Serve, not installed: {RAY_EXTRA}")


def actor_options(config: ServeConfig, deployments: int) -> dict[str, Any]:
    """CPUs per replica as configured; GPUs shared evenly between replicas on CUDA."""
    options: dict[str, Any] = {"num_cpus": config.cpus_per_replica}
    if resolve_device(config.device).type == "cuda":
        total = config.replicas * deployments
        options["num_gpus"] = min(1.0, torch.cuda.device_count() / total)
    return options


def preflight(config: ServeConfig, check_address: bool = True) -> None:
    """What would otherwise fail inside a replica, after Ray has started, as a traceback: the
    device, the purifier with its weights, the classifier's name, backend and weights file,
    and the address to listen on. One-line errors, in about a second."""
    device = resolve_device(config.device)
    # Built on the CPU and on torch: its weights load (missing ones fail) without this process
    # holding a GPU context for the server's life, or building an engine a replica builds again.
    params = dict(config.params)
    if isinstance(params.get("backend"), str) and params["backend"] != "torch":
        reason = unavailable_reason(canonical(params["backend"], device))
        if reason is not None:
            raise BackendError(f"-p backend={params['backend']}: {reason}")
        params["backend"] = "torch"
    purifier_for(config.method, params, "cpu")
    if config.classifier:
        classifier_spec(config.classifier)
        backend = canonical(config.backend, device)
        reason = unavailable_reason(backend)
        if reason is not None:
            raise BackendError(f"--backend {backend}: {reason}")
        if config.weights not in (None, "random") and not Path(config.weights).is_file():
            raise AdvpurifyError(f"--weights {config.weights}: no such file")
    if not check_address:
        return
    _check_address("--port", config.host, config.port)
    if config.metrics_port is not None:  # Ray's metrics agent listens on every interface
        _check_address("--metrics-port", "0.0.0.0", config.metrics_port)


def _check_address(option: str, host: str, port: int) -> None:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as error:
        raise AdvpurifyError(f"--host {host}: not an address here ({error})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            reason = error.strerror or str(error)
            raise AdvpurifyError(f"{option} {port} on {host}: cannot listen ({reason})") from None


def build_application(config: ServeConfig):
    """The Serve application: purifier ingress, bound to the classifier deployment if any."""
    # Ray is an optional heavy dependency: imported only when a server is built.
    from advpurify.serve.deployments import ClassifierDeployment, PurifierDeployment

    deployments = 2 if config.classifier else 1
    common = dict(
        num_replicas=config.replicas,
        # Serve only batches requests a replica has accepted: let it hold two batches' worth.
        max_ongoing_requests=max(8, 2 * config.max_batch),
        ray_actor_options=actor_options(config, deployments),
    )
    classifier = None
    if config.classifier:
        classifier = ClassifierDeployment.options(name="classifier", **common).bind(config)
    return PurifierDeployment.options(name="purifier", **common).bind(config, classifier)


def start(config: ServeConfig, *, start_ray: bool = True) -> str:
    """Run the application (starting Ray and Serve where needed); returns its base URL."""
    require_ray()
    config = config.checked()
    import ray

    # A Ray already running may already serve HTTP on the port: its address is its own.
    preflight(config, check_address=not ray.is_initialized())
    from ray import serve

    if not ray.is_initialized():
        if not start_ray:
            raise AdvpurifyError("Ray is not running")
        cpus = max(os.cpu_count() or 1, 2 * config.replicas + 1)
        kwargs: dict[str, Any] = {}
        if config.metrics_port is not None:
            kwargs["_metrics_export_port"] = config.metrics_port
        ray.init(
            num_cpus=cpus,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            **kwargs,
        )
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_application(config), name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{config.host}:{config.port}"


def stop(*, stop_ray: bool = True) -> None:
    """Delete the application and stop Serve (and Ray, unless the caller keeps it)."""
    import ray
    from ray import serve

    with contextlib.suppress(Exception):
        serve.shutdown()
    if stop_ray:
        ray.shutdown()


@contextlib.contextmanager
def running(config: ServeConfig, *, stop_ray: bool = True) -> Iterator[str]:
    """``with running(config) as url:`` a server for the duration of the block."""
    try:
        yield start(config)
    finally:
        stop(stop_ray=stop_ray)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serve_forever(config: ServeConfig, notify: Callable[[str], None]) -> None:
    """Run until interrupted (Ctrl-C), then stop cleanly."""
    url = start(config)
    # SIGTERM (docker stop, systemd) stops as Ctrl-C does: Serve and Ray shut down cleanly.
    if threading.current_thread() is threading.main_thread():  # signals go to the main thread
        signal.signal(signal.SIGTERM, _interrupt)
    notify(f"serving {config.method} at {url} (POST /purify, /classify; GET /healthz, /methods)")
    if config.metrics_port is not None:
        notify(f"Prometheus metrics at http://{config.host}:{config.metrics_port}/metrics")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        notify("stopping")
    finally:
        stop()
