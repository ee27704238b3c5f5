"""``purify-batch --engine ray``: same bytes as local, bad files, a dying actor, a killed driver.

Every test that runs Ray shares the one local Ray of the session fixture ``ray_local``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from advpurify.cli import app
from advpurify.errors import AdvpurifyError
from advpurify.images import load_image
from advpurify.pipeline.batch import MANIFEST, PipelineOptions, execute, plan_run
from advpurify.pipeline.ray_engine import RayOptions, check_shared_folders, execute_ray
from advpurify.purifiers import create_purifier
from advpurify.purifiers.base import Purifier, Settings, setting

BIN = Path(sys.executable).parent
TINY_DIP = {"preset": "fast", "iterations": 3, "channels": 8, "skip_channels": 2}
TINY_DIP |= {"scales": 3, "input_depth": 8}

pytestmark = pytest.mark.xdist_group("ray")  # with --dist loadgroup: one Ray start, not two


def _outputs(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix in (".png", ".jpg", ".webp")
    }


@pytest.fixture(scope="module")
def photos(tmp_path_factory, sample_paths: list[Path]) -> Path:
    """Twelve real photographs (several sizes) in a nested tree, plus two bad files."""
    root = tmp_path_factory.mktemp("ray-input") / "photos"
    for k, path in enumerate(sample_paths[:12]):
        target = root / ("a" if k % 2 else "b") / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    (root / "bad").mkdir()
    (root / "bad" / "empty.png").write_bytes(b"")
    data = sample_paths[0].read_bytes()
    (root / "bad" / "truncated.jpg").write_bytes(data[: len(data) // 3])
    return root


@pytest.fixture(scope="module")
def small_photos(tmp_path_factory, sample_paths: list[Path]) -> Path:
    """Four photographs shrunk to two sizes: enough for DIP and for the fault tests."""
    root = tmp_path_factory.mktemp("ray-small") / "small"
    root.mkdir()
    for k, path in enumerate(sample_paths[-4:]):
        with Image.open(path) as image:
            image.convert("RGB").resize((40 + 8 * (k % 2), 32)).save(root / f"{k}.png")
    return root


def _both_engines(source: Path, tmp: Path, method: str, params: dict, seed: int = 0):
    options = dict(batch_size=4, seed=seed)
    local = execute(
        plan_run(
            source, tmp / "local", create_purifier(method, **params), PipelineOptions(**options)
        )
    )
    on_ray = execute_ray(
        plan_run(source, tmp / "ray", create_purifier(method, **params), PipelineOptions(**options))
    )
    return local, on_ray


@pytest.mark.parametrize(
    ("method", "params", "seed"),
    [("rescale", {}, 0), ("jpeg", {"quality": 30}, 0), ("randpad", {}, 11)],
)
def test_same_bytes_as_the_local_engine(
    ray_local, photos: Path, tmp_path: Path, method: str, params: dict, seed: int
) -> None:
    local, on_ray = _both_engines(photos, tmp_path, method, params, seed)
    assert (on_ray.done, on_ray.failed, on_ray.exit_code) == (local.done, 2, 2) == (12, 2, 2)
    assert _outputs(tmp_path / "ray") == _outputs(tmp_path / "local")
    failed = {Path(r.input).name: r.reason for r in on_ray.failures}
    assert failed == {Path(r.input).name: r.reason for r in local.failures}
    assert "empty file" in failed["empty.png"]
    manifest = [json.loads(x) for x in (tmp_path / "ray" / MANIFEST).read_text().splitlines()]
    assert sorted(r["status"] for r in manifest) == ["done"] * 12 + ["failed"] * 2
    # The same record of what each output was made from as the local engine's (for a resume).
    local_records = (tmp_path / "local" / MANIFEST).read_text().splitlines()
    made_from = {r["name"]: r["source"] for r in map(json.loads, local_records) if r["name"]}
    assert {r["name"]: r["source"] for r in manifest if r["status"] == "done"} == made_from


@pytest.mark.slow
def test_same_bytes_as_the_local_engine_dip(ray_local, small_photos: Path, tmp_path: Path):
    local, on_ray = _both_engines(small_photos, tmp_path, "dip", TINY_DIP, seed=3)
    assert on_ray.done == local.done == 4
    assert _outputs(tmp_path / "ray") == _outputs(tmp_path / "local")


@dataclasses.dataclass(frozen=True)
class _DiesOnceSettings(Settings):
    marker: str = setting("", "file that records the one death")


class _DiesOnce(Purifier):
    """Kills its own process (the Ray actor) on its second batch, once per marker file."""

    name = "test-dies-once"
    Settings = _DiesOnceSettings
    settings: _DiesOnceSettings

    def __init__(self, settings=None, *, device="cpu") -> None:
        super().__init__(settings, device=device)
        self.calls = 0

    def purify(self, images: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        self.calls += 1
        marker = Path(self.settings.marker)
        if self.calls == 2 and not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(1)  # the actor dies as a crashed CUDA driver or an OOM kill would
        return images.flip(-1)


def test_an_actor_that_dies_is_restarted_and_its_images_retried(
    ray_local, small_photos: Path, tmp_path: Path
) -> None:
    ray_local.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    marker = tmp_path / "died"
    purifier = _DiesOnce.from_values(marker=str(marker))
    plan = plan_run(small_photos, tmp_path / "out", purifier, PipelineOptions(batch_size=1))
    summary = execute_ray(plan, ray_options=RayOptions(max_restarts=2))
    assert marker.exists(), "the actor never died: the test proves nothing"
    assert (summary.done, summary.failed) == (4, 0)
    for k in range(4):
        written = load_image(tmp_path / "out" / f"{k}.png")
        assert torch.equal(written, load_image(small_photos / f"{k}.png").flip(-1))


@pytest.mark.slow
def test_killed_driver_leaves_complete_files_and_the_same_command_resumes(
    ray_local, photos: Path, tmp_path: Path
) -> None:
    source = photos / "a"
    reference = tmp_path / "reference"
    execute(plan_run(source, reference, create_purifier("median"), PipelineOptions(batch_size=1)))
    out = tmp_path / "killed"
    address = ray_local.get_runtime_context().gcs_address
    command = [str(BIN / "purify-batch"), str(source), "-m", "median", "-o", str(out)]
    command += ["--batch-size", "1", "--quiet", "--engine", "ray", "--ray-address", address]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = out / MANIFEST
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if manifest.exists() and manifest.read_text().count("\n") >= 1:
            break
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    time.sleep(2)  # the job's workers notice their driver is gone
    partial = _outputs(out)
    assert 1 <= len(partial) < 6, "the run was not killed part-way"
    reference_digest = _outputs(reference)
    for name, digest in partial.items():  # whatever has a final name is the complete image
        assert digest == reference_digest[name]

    resumed = subprocess.run(command, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert _outputs(out) == reference_digest
    assert not [p for p in out.rglob(".*") if p.is_file()]  # no temporary left behind
    statuses = [json.loads(x)["status"] for x in manifest.read_text().splitlines()]
    assert statuses.count("skipped") >= len(partial)


def test_a_folder_the_workers_cannot_see_is_refused(ray_local, tmp_path: Path) -> None:
    source = tmp_path / "in"
    source.mkdir()
    Image.new("RGB", (8, 8)).save(source / "x.png")
    plan = plan_run(source, tmp_path / "out", create_purifier("rescale"))
    source.rename(tmp_path / "elsewhere")  # as a path that exists only on the driver's machine
    with pytest.raises(AdvpurifyError, match="cannot see the input folder.*every node"):
        check_shared_folders(plan)


def _invoke(*args: str):
    return CliRunner().invoke(app, ["batch", *args, "--quiet"])


def test_cli_engine_ray_end_to_end(ray_local, photos: Path, tmp_path: Path) -> None:
    result = _invoke(
        str(photos / "bad"), "-m", "rescale", "-o", str(tmp_path / "o"), "--engine", "ray"
    )
    assert result.exit_code == 2 and "2 failed" in result.stderr


def test_engine_options_are_checked_before_any_work(photos: Path, tmp_path: Path) -> None:
    bad = [
        ["--gpus-per-worker", "1"],
        ["--engine", "spark"],
        ["--engine", "ray", "--concurrency", "0"],
        ["--engine", "ray", "--gpus-per-worker", "-1"],
        ["--engine", "ray", "--device", "cuda"],
        ["--engine", "ray", "--gpus-per-worker", "nan"],
        ["--engine", "ray", "--cpus-per-worker", "inf"],
        ["--seed", "-1"],
        ["--seed", str(2**64)],
    ]
    for extra in bad:
        result = _invoke(str(photos), "-m", "rescale", "-o", str(tmp_path / "o"), *extra)
        assert result.exit_code == 1, (extra, result.output)
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert not tmp_path.joinpath("o").exists()


def test_actors_no_node_could_hold_are_refused_not_waited_for() -> None:
    from advpurify.pipeline.ray_engine import check_resources

    two_cpus = {"CPU": 2.0, "memory": 1e9}
    check_resources(two_cpus, RayOptions(cpus_per_worker=1))
    check_resources(two_cpus, RayOptions(cpus_per_worker=0.5, concurrency=2))
    # The read and write tasks need a CPU of their own: these would wait forever.
    for options in (RayOptions(cpus_per_worker=2), RayOptions(concurrency=2)):
        with pytest.raises(AdvpurifyError, match="has 2 CPUs and the run's read and write"):
            check_resources(two_cpus, options)
    with pytest.raises(AdvpurifyError, match="--gpus-per-worker 1 x --concurrency 1: .* 0 GPUs"):
        check_resources(two_cpus, RayOptions(gpus_per_worker=1))


def test_without_ray_engine_ray_is_one_line_naming_the_extra(
    monkeypatch, photos: Path, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    result = _invoke(str(photos), "-m", "rescale", "-o", str(tmp_path / "o"), "--engine", "ray")
    assert result.exit_code == 1
    assert result.stderr == "error: --engine ray needs Ray: pip install 'advpurify[ray]'\n"
    assert not tmp_path.joinpath("o").exists()


def test_stop_ends_the_run_and_a_rerun_finishes_it(
    ray_local, small_photos: Path, tmp_path: Path
) -> None:
    stop = threading.Event()
    stop.set()  # as the CLI does on Ctrl-C
    plan = plan_run(small_photos, tmp_path / "out", create_purifier("bitdepth"))
    first = execute_ray(plan, None, stop)
    assert first.done == 1
    again = execute_ray(plan_run(small_photos, tmp_path / "out", create_purifier("bitdepth")))
    assert again.done + again.skipped == 4 and again.skipped >= 1
