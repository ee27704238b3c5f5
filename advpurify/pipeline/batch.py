"""Batch purification of a folder: the plan (``plan.py``), the records (``manifest.py``) and
the local threaded engine (``local.py``), under the names callers import.

Every image ends in ``manifest.jsonl`` as done, skipped (its output already existed: resume)
or failed (with the reason). See docs/batch.md for the output names, the manifest, the lock,
the pixel budget and the exit codes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from advpurify.pipeline.local import LocalRunner, execute
from advpurify.pipeline.lock import LOCK_FILE, OutputLock
from advpurify.pipeline.manifest import (
    ManifestError,
    ManifestWriter,
    Record,
    RunRecorder,
    RunSummary,
    failure_reason,
)
from advpurify.pipeline.plan import (
    MANIFEST,
    PIXEL_BUDGET,
    RUN_FILE,
    PipelineOptions,
    RunPlan,
    Shard,
    WorkItem,
    check_finite,
    check_finite_assignments,
    check_folders,
    default_output_dir,
    output_paths,
    plan_run,
    prepare_run_file,
    run_config,
)
from advpurify.purifiers.base import Purifier

__all__ = [
    "LOCK_FILE",
    "MANIFEST",
    "PIXEL_BUDGET",
    "RUN_FILE",
    "LocalRunner",
    "ManifestError",
    "ManifestWriter",
    "OutputLock",
    "PipelineOptions",
    "Record",
    "RunPlan",
    "RunRecorder",
    "RunSummary",
    "Shard",
    "WorkItem",
    "check_finite",
    "check_finite_assignments",
    "check_folders",
    "default_output_dir",
    "execute",
    "failure_reason",
    "output_paths",
    "plan_run",
    "prepare_run_file",
    "run_config",
    "run_pipeline",
]


def run_pipeline(
    input_dir: Path | str,
    output_dir: Path | str,
    purifier: Purifier,
    options: PipelineOptions | None = None,
    on_progress: Callable[[Record], None] | None = None,
    stop: threading.Event | None = None,
) -> RunSummary:
    """Purify every image under ``input_dir`` into ``output_dir``; see the module doc."""
    return execute(plan_run(input_dir, output_dir, purifier, options), on_progress, stop)
