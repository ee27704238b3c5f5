"""The batch pipeline and ``purify-batch``: real images, bad input, resume, kill and resume."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from advpurify.errors import AdvpurifyError
from advpurify.images import find_images, load_image
from advpurify.pipeline.batch import (
    MANIFEST,
    PipelineOptions,
    Shard,
    default_output_dir,
    run_pipeline,
)
from advpurify.purifiers import create_purifier
from advpurify.purifiers.base import Purifier

BIN = Path(sys.executable).parent


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _outputs(root: Path) -> dict[str, str]:
    digest = _tree_digest(root)
    return {k: v for k, v in digest.items() if k.endswith((".png", ".jpg", ".webp"))}


@pytest.fixture(scope="module")
def sample_copy(tmp_path_factory, sample_paths: list[Path]) -> Path:
    """The sample images in a nested tree, plus four bad files."""
    root = tmp_path_factory.mktemp("input") / "photos"
    for k, path in enumerate(sample_paths):
        target = root / ("animals" if k % 2 else "other") / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    (root / "bad").mkdir()
    (root / "bad" / "empty.png").write_bytes(b"")
    (root / "bad" / "text.jpg").write_text("not an image at all\n")
    data = sample_paths[0].read_bytes()
    (root / "bad" / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (root / "bad" / "png-named.jpg").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    return root


def _read_manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]


def test_all_sample_images_through_rescale_with_bad_files(
    sample_copy: Path, tmp_path: Path
) -> None:
    before = _tree_digest(sample_copy)
    out = tmp_path / "out"
    good = [p for p in find_images(sample_copy) if p.parent.name != "bad"]
    summary = run_pipeline(
        sample_copy, out, create_purifier("rescale"), PipelineOptions(batch_size=8)
    )
    assert (summary.done, summary.failed, summary.exit_code) == (len(good), 4, 2)
    assert _tree_digest(sample_copy) == before  # the input folder is never touched
    reasons = {Path(r.input).name: r.reason for r in summary.failures}
    assert set(reasons) == {"empty.png", "text.jpg", "truncated.jpg", "png-named.jpg"}
    assert "empty file" in reasons["empty.png"] and "truncated" in reasons["truncated.jpg"]
    for src in find_images(sample_copy):
        if src.parent.name == "bad":
            continue
        dst = out / src.relative_to(sample_copy).with_suffix(".png")
        with Image.open(src) as a, Image.open(dst) as b:
            assert a.size == b.size  # sizes preserved, tree mirrored
    manifest = _read_manifest(out)
    assert len(manifest) == len(good) + 4
    assert sum(r["status"] == "failed" for r in manifest) == 4
    run = json.loads((out / "run.json").read_text())
    assert run["method"] == "rescale" and run["params"]["factor"] == 0.5


def test_outputs_equal_the_library_call(sample_copy: Path, tmp_path: Path) -> None:
    src = sorted((sample_copy / "animals").iterdir())[0]
    run_pipeline(
        sample_copy / "animals", tmp_path / "o", create_purifier("rescale"), PipelineOptions()
    )
    expected = create_purifier("rescale")(load_image(src)[None])[0]
    written = load_image(tmp_path / "o" / src.with_suffix(".png").name)
    assert torch.equal(written, expected.mul(255).round().div(255))


def test_resume_skips_done_work_and_refuses_other_settings(
    sample_copy: Path, tmp_path: Path, monkeypatch
) -> None:
    import advpurify.pipeline.plan as plan_module

    folder = sample_copy / "other"
    out = tmp_path / "out"
    first = run_pipeline(folder, out, create_purifier("bitdepth"))
    digest = _outputs(out)
    again = run_pipeline(folder, out, create_purifier("bitdepth"))
    assert (again.done, again.skipped) == (0, first.done)
    assert _outputs(out) == digest
    # Inputs copied again (new times, same bytes, as `cp -r` leaves them): nothing is redone,
    # and their digests are read once: the skipped records carry today's times on.
    images = find_images(folder)
    for path in images:
        os.utime(path, ns=(path.stat().st_mtime_ns + 10**9,) * 2)
    hashed = []
    real_hash = plan_module.sha256_file
    monkeypatch.setattr(plan_module, "sha256_file", lambda p: hashed.append(p) or real_hash(p))
    for _ in range(2):
        again = run_pipeline(folder, out, create_purifier("bitdepth"))
        assert (again.done, again.skipped) == (0, first.done)
        assert len(hashed) == len(images)  # the first resume only
    # An input replaced (a new attack, the same names): made again, and only that one.
    Image.open(images[1]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(images[0], "PNG")
    fresh = run_pipeline(folder, out, create_purifier("bitdepth"))
    assert (fresh.done, fresh.skipped) == (1, first.done - 1)
    # A manifest from before fingerprints were kept: an input newer than its output is redone.
    manifest = out / "manifest.jsonl"
    legacy = [json.loads(line) for line in manifest.read_text().splitlines()]
    for record in legacy:
        record.pop("name"), record.pop("source")
    manifest.write_text("".join(json.dumps(record) + "\n" for record in legacy))
    oldest = min(p.stat().st_mtime_ns for p in out.rglob("*.png")) - 10**9
    newest = max(p.stat().st_mtime_ns for p in out.rglob("*.png")) + 10**9
    for path in images:
        os.utime(path, ns=(oldest, oldest))
    os.utime(images[2], ns=(newest, newest))
    legacy_resume = run_pipeline(folder, out, create_purifier("bitdepth"))
    assert (legacy_resume.done, legacy_resume.skipped) == (1, first.done - 1)
    with pytest.raises(AdvpurifyError, match=r"other settings \(params.bits: 3 -> 5\)"):
        run_pipeline(folder, out, create_purifier("bitdepth", bits=5))
    redo = run_pipeline(
        folder, out, create_purifier("bitdepth", bits=5), PipelineOptions(overwrite=True)
    )
    assert redo.done == first.done and _outputs(out) != digest


def test_shards_split_the_work_without_overlap(sample_copy: Path, tmp_path: Path) -> None:
    folder = sample_copy / "other"
    out = tmp_path / "out"
    a = run_pipeline(folder, out, create_purifier("bitdepth"), PipelineOptions(shard=Shard(0, 2)))
    b = run_pipeline(folder, out, create_purifier("bitdepth"), PipelineOptions(shard=Shard(1, 2)))
    total = len(find_images(folder))
    assert a.done + b.done == total and abs(a.done - b.done) <= 1
    assert len(_outputs(out)) == total
    # One shard's --overwrite keeps the other shard's records in the manifest they share.
    run_pipeline(
        folder, out, create_purifier("bitdepth"), PipelineOptions(shard=Shard(0, 2), overwrite=True)
    )
    recorded = {json.loads(line)["name"] for line in (out / "manifest.jsonl").open()}
    assert len(recorded - {None}) == total
    with pytest.raises(AdvpurifyError, match="shard"):
        Shard.parse("2/2")
    assert Shard.parse("3/20") == Shard(3, 20)
    for text in ("1_0/20", " 1/2", "+1/2", "1/2/3", "a/2", "1/", "٣/4"):
        with pytest.raises(AdvpurifyError, match="expected i/n"):
            Shard.parse(text)


def test_folder_checks(sample_copy: Path, tmp_path: Path) -> None:
    with pytest.raises(AdvpurifyError, match="inside the input folder"):
        run_pipeline(sample_copy, sample_copy / "purified", create_purifier("rescale"))
    with pytest.raises(AdvpurifyError, match="inside the input folder"):
        run_pipeline(sample_copy, sample_copy, create_purifier("rescale"))
    with pytest.raises(AdvpurifyError, match="does not exist"):
        run_pipeline(tmp_path / "missing", tmp_path / "out", create_purifier("rescale"))
    assert default_output_dir(sample_copy, "jpeg") == sample_copy.parent / "photos-purified-jpeg"
    link = sample_copy.parent / "link"
    link.symlink_to(sample_copy)  # beside the link as named, not beside its target
    assert default_output_dir(link, "jpeg") == sample_copy.parent / "link-purified-jpeg"


def test_name_collisions_and_output_formats(tmp_path: Path, sample_paths: list[Path]) -> None:
    src = tmp_path / "in"
    src.mkdir()
    image = Image.open(sample_paths[3]).convert("RGB")
    image.save(src / "a.jpg")
    image.save(src / "a.png")
    image.save(src / "b.bmp")
    summary = run_pipeline(
        src, tmp_path / "out", create_purifier("rescale"), PipelineOptions(fmt="webp")
    )
    assert summary.done == 3
    names = sorted(p.name for p in (tmp_path / "out").iterdir() if p.suffix == ".webp")
    assert names == ["a.jpg.webp", "a.png.webp", "b.webp"]


class _FailsOnWideImages(Purifier):
    name = "test-fails-on-wide"

    def purify(self, images: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        if images.shape[-1] > 60:
            raise RuntimeError("simulated device error")
        return images


def test_a_failing_batch_fails_only_its_images(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for k, width in enumerate([40, 40, 80, 40]):
        Image.new("RGB", (width, 30), (k * 40, 0, 0)).save(src / f"{k}.png")
    summary = run_pipeline(src, tmp_path / "out", _FailsOnWideImages(), PipelineOptions())
    assert (summary.done, summary.failed) == (3, 1)
    assert "simulated device error" in summary.failures[0].reason


def test_memory_stays_bounded_on_a_large_folder(tmp_path: Path) -> None:
    # 600 images of 7 different sizes: far more than any queue may hold at once.
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    for k in range(600):
        size = (8 + k % 7, 8)
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(src / f"{k}.png")
    options = PipelineOptions(batch_size=4, workers=2)
    summary = run_pipeline(src, tmp_path / "out", create_purifier("bitdepth"), options)
    assert summary.done == 600
    # Reads ahead (a batch + 2 per reader), partial batches, one batch on the device, writers.
    bound = (
        (options.batch_size + 2 * options.workers) + 2 * options.batch_size + 2 * options.workers
    )
    assert 0 < summary.max_in_flight <= bound


def test_kill_and_resume_gives_identical_outputs(
    full_sample_paths: list[Path], tmp_path: Path
) -> None:
    source = tmp_path / "animals"  # 50 images: enough to kill the run part-way
    source.mkdir()
    for path in full_sample_paths[:50]:
        shutil.copyfile(path, source / path.name)
    reference = tmp_path / "reference"
    run_pipeline(source, reference, create_purifier("median"), PipelineOptions(batch_size=4))

    out = tmp_path / "killed"
    command = [str(BIN / "purify-batch"), str(source), "-m", "median", "-o", str(out)]
    command += ["--batch-size", "4", "--workers", "2", "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = out / MANIFEST
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if manifest.exists() and manifest.read_text().count("\n") >= 8:
            break
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    partial = _outputs(out)
    assert 8 <= len(partial) < 50, "the run was not killed part-way"
    for name in partial:  # whatever is there under a final name is a complete image
        load_image(out / name)

    resumed = subprocess.run(command, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert _outputs(out) == _outputs(reference)
    assert not [p for p in out.rglob(".*") if p.is_file()]  # no temporary left behind


def test_cli_refuses_bad_arguments_before_any_work(sample_copy: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from advpurify.cli import app

    bad = [
        [str(tmp_path / "missing"), "-m", "rescale"],
        [str(sample_copy), "-m", "rescale", "-o", str(sample_copy / "x")],
        [str(sample_copy), "-m", "no-such-method", "-o", str(tmp_path / "a")],
        [str(sample_copy), "-m", "rescale", "-p", "factor=9", "-o", str(tmp_path / "b")],
        [str(sample_copy), "-m", "rescale", "-p", "speed=1", "-o", str(tmp_path / "c")],
        [str(sample_copy), "-m", "rescale", "--batch-size", "0", "-o", str(tmp_path / "d")],
        [str(sample_copy), "-m", "rescale", "--shard", "3/2", "-o", str(tmp_path / "e")],
        # --quality would be ignored by lossless png: refused, not silently dropped
        [str(sample_copy), "-m", "rescale", "--quality", "50", "-o", str(tmp_path / "g")],
        [
            str(sample_copy),
            "-m",
            "rescale",
            "--format",
            "jpg",
            "--quality",
            "0",
            "-o",
            str(tmp_path / "h"),
        ],
    ]
    if not torch.cuda.is_available():
        bad.append(
            [str(sample_copy), "-m", "rescale", "--device", "cuda", "-o", str(tmp_path / "f")]
        )
    for args in bad:
        result = CliRunner().invoke(app, ["batch", *args, "--quiet"])
        assert result.exit_code == 1, (args, result.output)
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert not [p for p in tmp_path.iterdir()]  # refused before any work


def test_console_scripts_exit_codes(sample_copy: Path, tmp_path: Path) -> None:
    def run(program: str, *args: str) -> subprocess.CompletedProcess:
        command = [str(BIN / program), *args, "--quiet"]
        return subprocess.run(command, capture_output=True, text=True)

    refused = run("purify-batch", str(tmp_path / "missing"), "-m", "rescale")
    assert refused.returncode == 1
    assert refused.stderr == f"error: input folder {tmp_path / 'missing'} does not exist\n"

    failed = run(
        "purify-batch", str(sample_copy / "bad"), "-m", "rescale", "-o", str(tmp_path / "o")
    )
    assert failed.returncode == 2 and "4 failed" in failed.stderr

    photos = tmp_path / "photos"
    shutil.copytree(sample_copy / "other", photos)
    alias = run("advpurify", "batch", str(photos), "-m", "bitdepth")
    assert alias.returncode == 0, alias.stderr
    # the default output folder, beside the input
    assert len(_outputs(tmp_path / "photos-purified-bitdepth")) == len(find_images(photos))


def test_methods_command_lists_every_method() -> None:
    env = {**os.environ, "COLUMNS": "250"}
    result = subprocess.run(
        [str(BIN / "advpurify"), "methods"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0
    for name in ["rescale", "jpeg", "bitdepth", "median", "tvm", "randpad"]:
        assert name in result.stdout
    # The flags survive the table (square brackets would be eaten as markup).
    assert "(stochastic, differentiable)" in result.stdout


def test_ctrl_c_while_the_program_starts_is_one_line(tmp_path):
    """Ctrl-C during the imports (the first second or two): one line and 130, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    code = "from _advpurify_entry import purify_batch_main; purify_batch_main()"
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path), "-m", "rescale", "-o", str(tmp_path / "o")],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    time.sleep(0.25)  # the entry point runs first; torch takes far longer to import
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert (process.returncode, stderr) == (130, "interrupted\n")
    assert not (tmp_path / "o").exists()


def test_a_setting_added_as_none_is_a_change_never_silently_equal():
    from advpurify.files import settings_changes

    stored = {"params": {"lr": 0.01}}
    assert settings_changes(stored, {"params": {"lr": 0.01, "new": None}}) == [
        "params.new: (none) -> None"
    ]
    assert settings_changes(stored, {"params": {"lr": 0.01}}) == []


def test_ctrl_c_during_a_long_batch_is_heard_at_once_and_twice_stops_at_once(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (32, 32), (120, 60, 30)).save(src / "a.png")
    out = tmp_path / "out"
    command = [str(BIN / "purify-batch"), str(src), "-m", "dip", "-o", str(out), "--quiet"]
    command += ["-p", "preset=tiny", "-p", "iterations=1000000"]  # hours: only Ctrl-C ends it
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "run.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # inside the fit
    process.send_signal(signal.SIGINT)
    assert process.stderr is not None
    assert process.stderr.readline() == "\n"
    assert process.stderr.readline().startswith("stopping after the batch on the device")
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=60)
    # At once; or, on a machine so loaded the fit had not begun, at the first stop already.
    assert process.returncode == 130
    assert rest == "interrupted\n" or rest.startswith("interrupted: 0 done"), rest
    assert not list(out.glob("*.png"))  # nothing half-written
