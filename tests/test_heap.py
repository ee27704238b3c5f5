"""The huge-page heap for CPU fits (advpurify/heap.py): same outputs, and it does take effect."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from advpurify import heap

# A tiny DIP fit in a fresh process (the heap settings are process-wide): its outputs' bytes,
# and how much of the process's memory is backed by huge pages afterwards.
FIT = """
import hashlib, json, torch
from pathlib import Path
from advpurify.purifiers.dip import DipSettings, fit
torch.set_num_threads(1)
images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
settings = DipSettings.from_preset("fast", channels=8, scales=3, input_depth=8, iterations=30)
out = fit(images, [3, 4], settings).images
rollup = Path("/proc/self/smaps_rollup")
huge = 0
if rollup.exists():
    huge = int(rollup.read_text().split("AnonHugePages:")[1].split()[0])
print(json.dumps({"sha": hashlib.sha256(out.numpy().tobytes()).hexdigest(), "huge_kb": huge}))
"""


def run_fit(mode: str) -> dict:
    env = {**os.environ, heap.ENV: mode}
    done = subprocess.run(
        [sys.executable, "-c", FIT], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_outputs_are_bit_identical_with_and_without_the_tuned_heap() -> None:
    tuned, default = run_fit(heap.ON), run_fit(heap.OFF)
    assert tuned["sha"] == default["sha"]
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if platform.libc_ver()[0] == "glibc" and thp.exists() and "[madvise]" in thp.read_text():
        # Only on request: the fit's heap is backed by huge pages, the default one is not.
        assert tuned["huge_kb"] > default["huge_kb"] == 0


def test_off_unless_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_libc():
        raise AssertionError("the allocator was touched")

    monkeypatch.setattr(heap, "_libc", no_libc)
    for value in (None, "default", "no", "LARGE-PAGES-PLEASE"):
        if value is None:
            monkeypatch.delenv(heap.ENV, raising=False)
        else:
            monkeypatch.setenv(heap.ENV, value)
        assert heap.reserve(1 << 20) is False


# A command run through the CLI's runner, printing what ADVPURIFY_HEAP it sees.
PROBE = """
import os, typer
import advpurify.cli as cli
probe = typer.Typer()

@probe.command()
def show() -> None:
    print(os.environ.get("ADVPURIFY_HEAP"))

cli._run(lambda: probe)
"""


def test_the_commands_ask_for_it_unless_the_user_said_otherwise() -> None:
    environ = {k: v for k, v in os.environ.items() if k != heap.ENV}
    for env, expected in (({}, heap.ON), ({heap.ENV: "default"}, "default")):
        done = subprocess.run(
            [sys.executable, "-c", PROBE],
            env={**environ, **env},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.stdout.strip() == expected, done.stderr[-1000:]
