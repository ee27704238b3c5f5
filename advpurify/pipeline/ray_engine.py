"""``purify-batch --engine ray``: the local engine's plan, executed as a Ray Data pipeline.

The plan (images found, finished outputs skipped, settings checked against ``run.json``) is the
local one. The images still to do flow through three Ray Data stages:

1. decode, in CPU tasks (the same :func:`load_image` as locally);
2. purify, in ``map_batches`` on an actor pool: each actor builds the purifier once on its
   device (a GPU when ``gpus_per_worker > 0``) and purifies groups of equal-size images;
3. encode and write, in CPU tasks, with the project's one atomic write.

The driver consumes the last stage as a stream and reports each image to the same
:class:`RunRecorder` as the local engine (``manifest.jsonl``, summary, progress). Ray Data's
streaming executor bounds what is in flight (backpressure on the object store), so memory does
not grow with the folder. Per-image seeds make every output independent of how images were
batched: a Ray run writes the same bytes as a local run.

Inputs and outputs must live on a filesystem that every Ray node sees (a shared mount).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from advpurify.errors import AdvpurifyError
from advpurify.files import atomic_write_bytes
from advpurify.images import (
    allow_pixels,
    check_encodable,
    decode_image_with_profile,
    encode_image,
)
from advpurify.pipeline.local import execute
from advpurify.pipeline.manifest import Record, RunRecorder, RunSummary, failure_reason
from advpurify.pipeline.plan import RUN_FILE, RunPlan, read_source
from advpurify.purifiers.base import Purifier

Engine = Callable[..., RunSummary]  # engine(plan, on_progress=...) -> summary
INSTALL_HINT = "--engine ray needs Ray: pip install 'advpurify[ray]'"
_NO_IMAGE = np.zeros((3, 0, 0), np.float32)  # the image of a row that failed


@dataclasses.dataclass
class RayOptions:
    """How the Ray engine uses the cluster; everything else comes from the plan."""

    address: str = ""  # "" starts a local Ray; "auto" or "ray://host:port" joins a cluster
    gpus_per_worker: float = 0.0  # GPUs of each purifier actor (0.5: two actors share one)
    cpus_per_worker: float = 1.0  # CPUs of each purifier actor (also its torch threads)
    concurrency: int = 1  # purifier actors
    max_restarts: int = 3  # restarts of a purifier actor that died, and retries of its batch

    def check(self) -> None:
        if not math.isfinite(self.gpus_per_worker) or self.gpus_per_worker < 0:
            raise AdvpurifyError(f"--gpus-per-worker {self.gpus_per_worker}: must be >= 0")
        if not math.isfinite(self.cpus_per_worker) or self.cpus_per_worker <= 0:
            raise AdvpurifyError(f"--cpus-per-worker {self.cpus_per_worker}: must be > 0")
        if self.concurrency < 1:
            raise AdvpurifyError(f"--concurrency {self.concurrency}: must be at least 1")

    def actor_device(self, device: str) -> str:
        """The purifier actors' device: a GPU exactly when Ray gives each actor one."""
        if device == "cuda" and self.gpus_per_worker == 0:
            raise AdvpurifyError("--device cuda with --engine ray needs --gpus-per-worker > 0")
        if device == "cpu" and self.gpus_per_worker > 0:
            raise AdvpurifyError("--device cpu contradicts --gpus-per-worker > 0")
        return "cuda" if self.gpus_per_worker > 0 else "cpu"


def select_engine(name: str, ray_options: RayOptions, device: str = "auto") -> Engine:
    """The function that executes a plan: ``execute`` (local) or Ray; options checked first."""
    if name == "local":
        if ray_options != RayOptions():
            raise AdvpurifyError(
                "--ray-address, --gpus-per-worker, --cpus-per-worker and --concurrency "
                "need --engine ray"
            )
        return execute
    if name != "ray":
        raise AdvpurifyError(f"--engine {name!r}: use local or ray")
    ray_options.check()
    ray_options.actor_device(device)
    import_ray()
    return functools.partial(execute_ray, ray_options=ray_options, device=device)


def import_ray():
    """Ray, or a one-line error naming the extra that installs it."""
    try:
        # Lazy: Ray is an optional heavy dependency that only --engine ray needs.
        import ray
        import ray.data  # noqa: F401  (needs pyarrow)
    except ImportError:
        raise AdvpurifyError(INSTALL_HINT) from None
    return ray


def object_store_bytes() -> int:
    """The object store of a Ray started here: 30 % of the memory now available (Ray's own
    rule, which also leaves room for the actors), at most a quarter of all RAM and 80 % of the
    free space of /dev/shm, at least 256 MiB."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    size = min(_available_memory(total) * 3 // 10, total // 4)
    try:
        shm = os.statvfs("/dev/shm")
        size = min(size, int(shm.f_bavail * shm.f_frsize * 0.8))
    except OSError:
        pass
    return max(size, 256 * 2**20)


def _available_memory(total: int) -> int:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return total


def connect(address: str) -> bool:
    """Start or join Ray unless this process is already connected; True when it connected."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    common: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": logging.WARNING,
        "configure_logging": True,
    }
    try:
        if address:
            ray.init(address=address, **common)
        else:
            # "local" starts a fresh Ray even where RAY_ADDRESS or a `ray start` is around.
            ray.init(address="local", object_store_memory=object_store_bytes(), **common)
    except Exception as error:  # noqa: BLE001 - ray.init raises many kinds; one line for all
        where = f"--ray-address {address!r}: cannot connect" if address else "cannot start Ray"
        raise AdvpurifyError(f"{where} ({error})") from None
    return True


def check_resources(cluster: dict[str, float], ray_options: RayOptions) -> None:
    """Refuse purifier actors that the local Ray started here cannot all hold beside the run's
    read and write tasks (one CPU): Ray would wait for them forever. (A cluster joined with
    --ray-address may autoscale: it is left to Ray.)"""
    n = ray_options.concurrency
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    if n * ray_options.cpus_per_worker > cpus - 1:
        raise AdvpurifyError(
            f"--cpus-per-worker {ray_options.cpus_per_worker:g} x --concurrency {n}: this "
            f"machine's Ray has {cpus:g} CPUs and the run's read and write tasks need one, so "
            "the purifier actors could never all start; ask for fewer"
        )
    if n * ray_options.gpus_per_worker > gpus:
        raise AdvpurifyError(
            f"--gpus-per-worker {ray_options.gpus_per_worker:g} x --concurrency {n}: this "
            f"machine's Ray has {gpus:g} GPUs, so the purifier actors could never all start"
        )


def check_shared_folders(plan: RunPlan) -> None:
    """Refuse folders that a live Ray node cannot see: every node must read the input folder
    and find the very ``run.json`` this driver just wrote into the output folder."""
    ray = import_ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    expected = (plan.output_dir / RUN_FILE).read_bytes()

    @ray.remote(num_cpus=0)
    def sees(input_dir: str, run_file: str) -> str | None:
        if not os.path.isdir(input_dir):
            return f"input folder {input_dir}"
        try:
            with open(run_file, "rb") as handle:
                if handle.read() == expected:
                    return None
        except OSError:
            pass
        return f"output folder {os.path.dirname(run_file)}"

    nodes = [node for node in ray.nodes() if node.get("Alive")]
    probes = [
        sees.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ).remote(str(plan.input_dir.resolve()), str((plan.output_dir / RUN_FILE).resolve()))
        for node in nodes
    ]
    for node, missing in zip(nodes, ray.get(probes), strict=True):
        if missing:
            raise AdvpurifyError(
                f"Ray node {node.get('NodeManagerAddress')} cannot see the {missing}: "
                "--engine ray needs input and output on a filesystem every node mounts"
            )


def _decode(row: dict[str, Any], background: str, max_pixels: int, fmt: str) -> dict[str, Any]:
    row["started"] = time.time()  # wall clock: the image's stages run in other processes
    allow_pixels(max_pixels)  # in this worker process, as plan_run did in the driver
    try:
        data, fingerprint = read_source(Path(row["source"]), max_pixels)
        image, profile = decode_image_with_profile(data, row["source"], background, max_pixels)
        check_encodable(image.shape[-1], image.shape[-2], fmt)  # before it is purified
        row["image"] = image.numpy()
        row["error"] = ""
        row["profile"] = profile or b""  # one type per column: no profile is empty bytes
        row["fingerprint"] = json.dumps(fingerprint)
    except Exception as error:  # noqa: BLE001 - a bad file becomes a record
        row["image"], row["error"], row["profile"] = _NO_IMAGE, failure_reason(error), b""
        row["fingerprint"] = ""
    return row


class _PurifyActor:
    """One purifier, built once on this actor's device, over batches of decoded images."""

    def __init__(self, purifier_class: type[Purifier], settings: Any, device: str, threads: int):
        torch.set_num_threads(threads)
        self.purifier = purifier_class(settings, device=device)
        self.batch_size = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, errors = list(batch["image"]), [str(e) for e in batch["error"]]
        seeds = [int(s) for s in batch["seed"]]
        purified = [_NO_IMAGE] * len(images)
        groups: dict[tuple[int, ...], list[int]] = {}
        for k, image in enumerate(images):
            if not errors[k]:
                groups.setdefault(image.shape, []).append(k)
        for members in groups.values():  # images of one size form one purifier call
            try:
                stacked = torch.from_numpy(np.stack([images[k] for k in members]))
                # No no_grad here: DIP and PPGN need autograd inside purify().
                out = self.purifier(stacked.to(self.purifier.device), [seeds[k] for k in members])
                out = out.detach().cpu().numpy()
            except Exception as error:  # noqa: BLE001 - a failed call fails its images only
                for k in members:
                    errors[k] = f"purification failed: {type(error).__name__}: {error}"
                continue
            for j, k in enumerate(members):
                purified[k] = out[j]
        batch["image"] = _object_array(purified)
        batch["error"] = np.array(errors, dtype=object)
        return batch


def _object_array(arrays: list[np.ndarray]) -> np.ndarray:
    column = np.empty(len(arrays), dtype=object)
    column[:] = arrays
    return column


def _write(row: dict[str, Any], fmt: str, quality: int, root: str) -> dict[str, Any]:
    source, target = row["source"], row["target"]
    if row["error"]:
        return _record(source, None, "failed", 0.0, row["error"])
    try:
        image = torch.from_numpy(np.array(row["image"], np.float32))
        profile = bytes(row["profile"]) or None
        atomic_write_bytes(target, encode_image(image, fmt, quality, profile), root=root)
    except Exception as error:  # noqa: BLE001 - one bad write must not stop the run
        return _record(source, None, "failed", 0.0, f"write failed: {error}")
    seconds = round(time.time() - row["started"], 4)
    return _record(source, target, "done", seconds, None, row["fingerprint"])


def _record(
    source: str,
    output: str | None,
    status: str,
    seconds: float,
    reason: str | None,
    fingerprint: str = "",
) -> dict[str, Any]:
    return dict(
        input=source,
        output=output,
        status=status,
        seconds=seconds,
        reason=reason,
        fingerprint=fingerprint,
    )


def execute_ray(
    plan: RunPlan,
    on_progress: Callable[[Record], None] | None = None,
    stop: threading.Event | None = None,
    *,
    ray_options: RayOptions | None = None,
    device: str = "auto",
) -> RunSummary:
    """Purify the plan's images on Ray; the records, manifest and summary are the local ones.

    The arguments before ``*`` are :func:`execute`'s. Setting ``stop`` ends the run at the
    next record: Ray stops the job's tasks, outputs already renamed into place stay, the rest is
    left for a rerun of the same command.
    """
    ray_options = ray_options or RayOptions()
    ray_options.check()
    actor_device = ray_options.actor_device(device)
    ray = import_ray()
    stop = stop or threading.Event()
    started_here = connect(ray_options.address)
    try:
        if started_here and not ray_options.address:
            check_resources(ray.cluster_resources(), ray_options)
        check_shared_folders(plan)
        recorder = RunRecorder(plan, on_progress)
        untouched = 0
        try:
            todo = recorder.pending()
            untouched = len(todo)
            rows = _dataset(ray, plan, ray_options, actor_device, todo).iter_rows() if todo else []
            for row in rows:
                output = row["output"]
                recorder.report(
                    Record(
                        input=row["input"],
                        output=output,
                        status=row["status"],
                        seconds=float(row["seconds"]),
                        reason=row["reason"],
                        name=Path(output).relative_to(plan.output_dir).as_posix()
                        if output
                        else None,
                        source=json.loads(row["fingerprint"]) if row["fingerprint"] else None,
                    )
                )
                untouched -= 1
                if stop.is_set() or recorder.stopping:
                    break
        finally:
            summary = recorder.finish(untouched)
    finally:
        plan.close()
        if started_here:
            ray.shutdown()
    summary.interrupted = stop.is_set()
    return summary


def _dataset(ray, plan: RunPlan, ray_options: RayOptions, device: str, todo: list) -> Any:
    options, purifier = plan.options, plan.purifier
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver draws the project's own progress bar
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    rows = [{"source": str(i.source), "target": str(i.target), "seed": i.seed} for i in todo]
    # About one purifier batch per block: decoded images stream instead of piling up.
    blocks = max(1, -(-len(rows) // options.batch_size))
    tasks = ray.data.TaskPoolStrategy(size=min(options.workers, blocks))
    restarts = ray_options.max_restarts
    with warnings.catch_warnings():
        # Ray 2.60 takes max_restarts / max_task_retries only as remote args, deprecated (to
        # be removed in 2.64: the extra stays below it).
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return (
            ray.data.from_items(rows, override_num_blocks=blocks)
            .map(
                _decode,
                fn_kwargs={
                    "background": options.background,
                    "max_pixels": options.max_image_pixels,
                    "fmt": options.fmt,
                },
                compute=tasks,
            )
            .map_batches(
                _PurifyActor,
                fn_constructor_kwargs={
                    "purifier_class": type(purifier),
                    "settings": purifier.settings,  # a frozen dataclass: the same values
                    "device": device,
                    "threads": max(1, int(ray_options.cpus_per_worker)),
                },
                batch_size=options.batch_size,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=ray_options.concurrency),
                num_cpus=ray_options.cpus_per_worker,
                num_gpus=ray_options.gpus_per_worker,
                # Bounded (Ray Data's default is forever): a purifier that kills its actor
                # on every batch must end the run, not loop.
                max_restarts=restarts,
                max_task_retries=restarts,
            )
            .map(
                _write,
                fn_kwargs={
                    "fmt": options.fmt,
                    "quality": options.encode_quality,
                    "root": str(plan.output_dir),
                },
                compute=tasks,
            )
        )
