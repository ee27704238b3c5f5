"""The batch tool under hostile input (issue 11): one test per reproduced failure, and a
property test over generated folders. Small synthetic images keep the file fast."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from advpurify.cli import main as cli_main
from advpurify.errors import AdvpurifyError
from advpurify.images import ImageDecodeError, decode_image, load_image
from advpurify.pipeline import local, manifest
from advpurify.pipeline.batch import (
    LOCK_FILE,
    MANIFEST,
    OutputLock,
    PipelineOptions,
    Record,
    run_pipeline,
)
from advpurify.pipeline.manifest import ManifestWriter
from advpurify.purifiers import create_purifier
from advpurify.purifiers.base import Purifier

BIN = Path(sys.executable).parent


def _png(size: tuple[int, int] = (24, 16), seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _jpeg(size: tuple[int, int] = (64, 48), seed: int = 0) -> bytes:
    # Smooth content: a real scan of many MCUs, as a photograph has.
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    base = (np.sin(x / 5.0 + seed) + np.cos(y / 7.0)) * 60 + 128
    pixels = np.stack([base, base[::-1], base[:, ::-1]], axis=2).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _records(out: Path) -> list[dict]:
    text = (out / MANIFEST).read_bytes()
    assert text == b"" or text.endswith(b"\n"), "the manifest ends in half a line"
    return [json.loads(line) for line in text.decode("ascii").splitlines()]


def _digest(root: Path) -> dict[str, str]:
    found = {}
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            key = os.fsencode(path.relative_to(root)).hex()
            found[key] = (
                "link" if path.is_symlink() else hashlib.sha256(path.read_bytes()).hexdigest()
            )
    return found


def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """The installed entry point in this process: exit code and stderr."""
    monkeypatch.setattr(sys, "argv", ["advpurify", *args])
    with pytest.raises(SystemExit) as exited:
        cli_main()
    return exited.value.code, capsys.readouterr().err


def test_failures_are_one_plain_line_each_in_a_log(tmp_path: Path, monkeypatch, capsys) -> None:
    # stderr captured (not a terminal): no markup, no colour codes, no wrapping at 80 columns.
    src = tmp_path / "in"
    src.mkdir()
    (src / "ok.png").write_bytes(_png())
    bad = "x" * 120 + ".png"
    (src / bad).write_bytes(b"hello, not an image")
    out = tmp_path / "out[red]"
    code, err = _cli(monkeypatch, capsys, "batch", str(src), "-m", "bitdepth", "-o", str(out))
    assert code == 2
    lines = err.splitlines()
    failed = [line for line in lines if line.startswith("failed ")]
    assert failed == [f"failed {src / bad}: not a recognised image (file starts with b'hello, n')"]
    assert f"purified into {out}" in lines and f"1 failed: see {out}/manifest.jsonl" in lines
    assert "\x1b[" not in err and "[/red]" not in err


def test_a_setting_given_twice_is_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.png").write_bytes(_png())
    code, err = _cli(
        monkeypatch,
        capsys,
        "batch",
        str(src),
        "-m",
        "rescale",
        "-p",
        "factor=0.5",
        "-p",
        "factor=0.7",
    )
    assert code == 1
    assert err.strip() == "error: -p factor given twice ('0.5' and '0.7'): give it once"
    assert not (tmp_path / "in-purified-rescale").exists()


# 1 ---------------------------------------------------------------------------------------
def test_undecodable_file_name_is_purified_and_recorded_losslessly(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "ok.png").write_bytes(_png())
    latin1 = os.fsencode(src) + b"/caf\xe9.png"
    with open(latin1, "wb") as handle:
        handle.write(_png(seed=1))
    summary = run_pipeline(src, tmp_path / "out", create_purifier("bitdepth"))
    assert (summary.done, summary.failed) == (2, 0)
    inputs = {os.fsencode(record["input"]) for record in _records(tmp_path / "out")}
    assert latin1 in inputs  # the exact bytes come back from the manifest
    assert os.path.exists(os.fsencode(tmp_path / "out") + b"/caf\xe9.png")


# 2 ---------------------------------------------------------------------------------------
def test_input_inside_output_is_refused_and_user_files_are_kept(tmp_path: Path) -> None:
    outer = tmp_path / "io2"
    (outer / "in").mkdir(parents=True)
    (outer / "in" / "p.png").write_bytes(_png())
    before = _digest(outer)
    for overwrite in (False, True):
        with pytest.raises(AdvpurifyError, match="inside the output folder"):
            options = PipelineOptions(overwrite=overwrite)
            run_pipeline(outer / "in", outer, create_purifier("bitdepth"), options)
    assert _digest(outer) == before
    # The stale-temporary cleanup deletes only the names it creates.
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    (src / "p.png").write_bytes(_png())
    out.mkdir()
    (out / ".notes.partial").write_text("mine")
    (out / ".p.png.abcd1234.partial").write_bytes(b"half an image")  # ours, left by a kill
    run_pipeline(src, out, create_purifier("bitdepth"))
    assert (out / ".notes.partial").read_text() == "mine"
    assert not (out / ".p.png.abcd1234.partial").exists()


# 3 ---------------------------------------------------------------------------------------
def test_output_name_collision_is_refused_up_front_with_both_names(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.jpg", "a.png", "a.jpg.png"):
        (src / name).write_bytes(_png())
    with pytest.raises(AdvpurifyError, match=r"a\.jpg and a\.jpg\.png would both be written"):
        run_pipeline(src, tmp_path / "out", create_purifier("bitdepth"))
    assert not (tmp_path / "out").exists()


# 4 ---------------------------------------------------------------------------------------
def test_a_full_disk_stops_the_run_and_every_image_is_counted(tmp_path, monkeypatch) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for k in range(40):
        (src / f"{k:02d}.png").write_bytes(_png(seed=k))
    real_write, writes = local.atomic_write_bytes, []

    def write_until_full(path, data, root=None):
        writes.append(path)
        if len(writes) > 11:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data, root)

    monkeypatch.setattr(local, "atomic_write_bytes", write_until_full)
    options = PipelineOptions(batch_size=4, workers=1)
    summary = run_pipeline(src, tmp_path / "out", create_purifier("bitdepth"), options)
    assert summary.stopped and "disk full" in summary.stopped and summary.exit_code == 1
    assert summary.done == 11 and summary.failed < 29 and summary.untouched > 0
    assert summary.done + summary.failed + summary.skipped + summary.untouched == 40
    records = _records(tmp_path / "out")
    assert len(records) == summary.done + summary.failed  # the untouched are left for a rerun
    monkeypatch.setattr(local, "atomic_write_bytes", real_write)
    again = run_pipeline(src, tmp_path / "out", create_purifier("bitdepth"), options)
    assert (again.skipped, again.done, again.failed) == (11, 29, 0)


def test_the_manifest_never_keeps_half_a_line(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / MANIFEST
    path.write_bytes(b'{"input": "a", "status": "done"}\n{"input": "b", "sta')  # an old crash
    writer = ManifestWriter(path, truncate=False)
    real_write, calls = os.write, []

    def short_then_fail(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, data[: len(data) // 2])  # the disk filled mid-line
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(manifest.os, "write", short_then_fail)
    writer.add(Record("c.png", "c.png", "done"))
    writer.close()
    assert [r["input"] for r in _records(tmp_path)] == ["a", "c.png"]

    writer = ManifestWriter(path, truncate=False)
    monkeypatch.setattr(
        manifest.os, "write", lambda fd, data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full"))
    )
    with pytest.raises(AdvpurifyError, match="cannot record d.png"):
        writer.add(Record("d.png", None, "failed"))
    writer.close()
    assert [r["input"] for r in _records(tmp_path)] == ["a", "c.png"]


# 5 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["run.json", "manifest.jsonl", "run.lock"])
def test_a_control_file_that_is_a_folder_is_refused_up_front(tmp_path: Path, name: str) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "a.png").write_bytes(_png())
    (out / name).mkdir(parents=True)
    for overwrite in (False, True):  # --overwrite could not help: say what would
        with pytest.raises(AdvpurifyError, match=f"{name} is not a file .* remove it"):
            run_pipeline(
                src, out, create_purifier("bitdepth"), PipelineOptions(overwrite=overwrite)
            )


def test_an_attack_output_folder_is_refused_as_a_batch_output(tmp_path: Path) -> None:
    src, out = tmp_path / "in", tmp_path / "adv"
    src.mkdir()
    out.mkdir()
    (src / "a.png").write_bytes(_png())
    (out / MANIFEST).write_text('{"status": "done", "name": "x.png", "label": 3}\n')
    for overwrite in (False, True):
        with pytest.raises(AdvpurifyError, match=r"holds an attack's outputs \(manifest"):
            run_pipeline(
                src, out, create_purifier("bitdepth"), PipelineOptions(overwrite=overwrite)
            )
    assert [p.name for p in out.iterdir()] == [MANIFEST]


def test_symlinks_in_the_output_are_never_written_through(tmp_path: Path) -> None:
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    (src / "top.png").write_bytes(_png())
    (src / "sub" / "p.png").write_bytes(_png(seed=2))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST).symlink_to(victim)
    for overwrite in (False, True):
        with pytest.raises(AdvpurifyError, match="symlink"):
            run_pipeline(
                src, out, create_purifier("bitdepth"), PipelineOptions(overwrite=overwrite)
            )
    assert victim.read_text() == "precious\n"

    pout = tmp_path / "pout"
    pout.mkdir()
    (pout / "sub").symlink_to(src / "sub")  # would land the output inside the input
    before = _digest(src)
    for overwrite in (False, True):
        summary = run_pipeline(
            src, pout, create_purifier("bitdepth"), PipelineOptions(overwrite=overwrite)
        )
        assert summary.done == 1 and summary.failed == 1
        assert "leads outside" in summary.failures[0].reason
    assert _digest(src) == before


# 6 ---------------------------------------------------------------------------------------
def test_decoded_pixels_in_flight_stay_within_the_budget(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for k in range(12):
        (src / f"{k:02d}.png").write_bytes(_png((100, 100), seed=k))  # 10,000 pixels each
    (src / "huge.png").write_bytes(_png((400, 300)))  # 120,000 pixels: above the limit
    options = PipelineOptions(
        batch_size=8, workers=2, pixel_budget=30_000, max_image_pixels=100_000
    )
    summary = run_pipeline(src, tmp_path / "out", create_purifier("bitdepth"), options)
    assert (summary.done, summary.failed) == (12, 1)
    assert "400 x 300 = 120000 pixels is above the per-image limit" in summary.failures[0].reason
    assert 0 < summary.max_pixels_in_flight <= 30_000
    # An image above the budget but within the limit runs alone.
    alone = PipelineOptions(pixel_budget=5_000, max_image_pixels=200_000)
    summary = run_pipeline(src, tmp_path / "out2", create_purifier("bitdepth"), alone)
    assert summary.done == 13 and summary.max_in_flight == 1


def test_load_image_refuses_a_huge_image_from_its_header(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("L", (3000, 2000)).save(path)
    with pytest.raises(ImageDecodeError, match="above the per-image limit"):
        load_image(path, max_pixels=5_000_000)
    assert load_image(path, max_pixels=6_000_000).shape == (3, 2000, 3000)


# 7 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("names", "message"),
    [
        (("a.jpg", "a.png/b.png"), "a.png would be both a file and a folder"),
        (("run.json/b.png",), "inside the run's own run.json"),
        (("manifest.jsonl/x/b.png",), "inside the run's own manifest.jsonl"),
    ],
)
def test_outputs_that_need_a_file_as_a_folder_are_refused_up_front(
    tmp_path: Path, names: tuple[str, ...], message: str
) -> None:
    src = tmp_path / "in"
    for name in names:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(_png())
    with pytest.raises(AdvpurifyError, match=message):
        run_pipeline(src, tmp_path / "out", create_purifier("bitdepth"))
    assert not (tmp_path / "out").exists()


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_max_image_pixels_above_pillows_own_limit_holds(tmp_path: Path, monkeypatch) -> None:
    import warnings

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after
    src = tmp_path / "in"
    src.mkdir()
    (src / "a225mp.png").write_bytes(_png_header_only(15000, 15000))  # above 2x Pillow's limit
    (src / "b95mp.png").write_bytes(_png_header_only(10000, 9500))  # above Pillow's limit
    options = PipelineOptions(max_image_pixels=300_000_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning would raise here
        summary = run_pipeline(src, tmp_path / "out", create_purifier("bitdepth"), options)
    assert summary.failed == 2  # no pixel data in these files, which is what is reported
    assert all("exceeds limit" not in f.reason for f in summary.failures)
    assert all("truncated" in f.reason or "corrupt" in f.reason for f in summary.failures)
    # Far above the default limit (Pillow refuses it itself, at twice its own): the message
    # states ours, not Pillow's.
    (src / "c300mp.png").write_bytes(_png_header_only(20000, 15000))
    summary = run_pipeline(src, tmp_path / "out2", create_purifier("bitdepth"))
    (refused,) = [f for f in summary.failures if "c300mp" in str(f.input)]
    assert "300000000 pixels" in refused.reason and "exceeds limit" not in refused.reason
    assert "above the per-image limit of 67108864" in refused.reason


def test_an_image_too_wide_for_webp_fails_before_it_is_purified(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.zeros((2, 16400, 3), np.uint8)).save(src / "wide.png")
    (src / "ok.png").write_bytes(_png())
    calls = []

    class Counting(Purifier):
        name = "counting"

        def purify(self, images, seeds):
            calls.append(tuple(images.shape))
            return images

    options = PipelineOptions(fmt="webp")
    summary = run_pipeline(src, tmp_path / "out", Counting(), options)
    assert (summary.done, summary.failed) == (1, 1)
    assert summary.failures[0].reason == (
        "16400 x 2 is too large for webp (at most 16383 pixels a side): use --format png"
    )
    assert all(shape[-1] != 16400 for shape in calls)  # never purified


def test_a_png_with_corrupt_image_data_fails(tmp_path: Path) -> None:
    y, x = np.mgrid[0:96, 0:128]
    pixels = np.stack([x * 2, y * 2, x + y], 2).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    middle = int(len(data) * 0.3)  # inside the image data
    data[middle : middle + 8] = np.random.default_rng(7).integers(0, 256, 8, np.uint8).tobytes()
    with Image.open(io.BytesIO(bytes(data))) as img:
        img.load()  # Pillow alone decodes it, to garbage
    with pytest.raises(ImageDecodeError, match="IDAT chunk at byte 33: CRC mismatch"):
        decode_image(bytes(data), "corrupt.png")
    from advpurify.evaluation.classify import Preprocess

    (tmp_path / "corrupt.png").write_bytes(bytes(data))
    assert Preprocess()._fast(tmp_path / "corrupt.png") is None  # eval refuses it too


def test_a_jpeg_with_corrupt_entropy_data_fails(tmp_path: Path) -> None:
    good = _jpeg((256, 192))
    data = bytearray(good)
    middle = len(data) // 2
    data[middle : middle + 300] = np.random.default_rng(1).integers(0, 256, 300, np.uint8).tobytes()
    with Image.open(io.BytesIO(bytes(data))) as img:
        img.load()  # Pillow alone accepts it: libjpeg only warns and fills the rest grey
    with pytest.raises(ImageDecodeError, match="Corrupt JPEG data"):
        decode_image(bytes(data), "corrupt.jpg")
    src = tmp_path / "in"
    src.mkdir()
    (src / "corrupt.jpg").write_bytes(bytes(data))
    (src / "good.jpg").write_bytes(good)
    summary = run_pipeline(src, tmp_path / "out", create_purifier("bitdepth"))
    assert (summary.done, summary.failed) == (1, 1)
    assert not (tmp_path / "out" / "corrupt.png").exists()


# 8 ---------------------------------------------------------------------------------------
def test_non_finite_settings_are_refused_and_never_recorded(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.png").write_bytes(_png())
    for method, name in (("rescale", "factor"), ("randpad", "max_scale"), ("tvm", "eps")):
        with pytest.raises(AdvpurifyError, match="finite"):
            run_pipeline(src, tmp_path / "out", create_purifier(method, **{name: float("nan")}))
    assert not (tmp_path / "out").exists()
    with pytest.raises(AdvpurifyError, match="background 'pink'"):
        run_pipeline(
            src, tmp_path / "out", create_purifier("rescale"), PipelineOptions(background="pink")
        )
    assert not (tmp_path / "out").exists()


# 9, 10 -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    (root / "imgs").mkdir()
    (root / "imgs" / "a.png").write_bytes(_png())
    (root / "empty").mkdir()
    (root / "afile").write_text("a file, not a folder\n")
    (root / "bad.prototxt").write_bytes(b'name: "caf\xe9"\n')
    torch.save({"model": object()}, root / "evil.pt")
    return root


HOSTILE_COMMANDS = [
    ("batch {r}/imgs -m rescale -p factor=nan -o {r}/o", "factor must be a finite number"),
    ("batch {r}/imgs -m rescale --background pink -o {r}/o", "--background 'pink'"),
    ("batch {r}/imgs -m rescale -o {r}/afile/out", "is a file, not a folder"),
    ("batch {r}/empty -m rescale -o {r}/o", "no image files found"),
    ("batch {r}/imgs -m rescale --batch-size x -o {r}/o", "Invalid value for '--batch-size'"),
    ("samples {r}/afile/photos", "is a file, not a folder"),
    ("experiment --data {r}/imgs -o {r}/o --methods ,,", "--methods ',,': names nothing"),
    ("experiment --data {r}/imgs -o {r}/o --adaptive-steps 0", "--adaptive-steps 0"),
    ("experiment --data {r}/imgs -o {r}/o --eot 0 --adaptive", "--eot 0"),
    ("experiment --data {r}/imgs -o {r}/o --grid -5", "--grid -5"),
    ("experiment --data {r}/imgs -o {r}/afile/report", "is a file, not a folder"),
    ("train context-encoder --data {r}/imgs -o {r}/ce.pt --checkpoint-every 0", "--checkpoint"),
    ("train context-encoder --data {r}/imgs -o {r}/ce.pt --lr nan", "--lr nan"),
    ("train context-encoder --data {r}/imgs -o {r}/afile/ce.pt", "is a file, not a folder"),
    ("bench --batch-size 1000000 --weights random", "--batch-size 1000000"),
    ("bench --weights random --json {r}/afile/b.json", "is a file, not a folder"),
    ("export googlenet --weights random -o {r}/imgs", "is a folder; name a file"),
    ("export googlenet --weights random -o {r}/afile/g.onnx", "is a file, not a folder"),
    ("eval {r}/imgs --json {r}/afile/e.json", "is a file, not a folder"),
    ("weights convert {r}/bad.prototxt {r}/evil.pt -o {r}/w.safetensors", "not UTF-8"),
    ("weights convert {r}/bad.prototxt {r}/evil.pt -o {r}/afile/w.st", "not a folder"),
    ("eval {r}/imgs --reference {r}/imgs --weights {r}/evil.pt", "pickled Python objects"),
]


@pytest.mark.parametrize(("command", "reason"), HOSTILE_COMMANDS)
def test_cli_errors_are_one_line_and_come_first(
    hostile: Path, command: str, reason: str, monkeypatch, capsys
) -> None:
    code, err = _cli(monkeypatch, capsys, *command.format(r=hostile).split())
    assert code == 1
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert reason in err
    assert not (hostile / "o").exists() and not (hostile / "ce.pt").exists()


def test_labels_csv_with_undecodable_names_matches_the_files(tmp_path: Path) -> None:
    from advpurify.evaluation.labels import read_labels_csv

    csv_path = tmp_path / "labels.csv"
    csv_path.write_bytes(b"path,label\ncaf\xe9.jpg,5\n")
    labels = read_labels_csv(csv_path)
    assert labels == {os.fsdecode(b"caf\xe9.jpg"): 5}


# 11 --------------------------------------------------------------------------------------
def test_an_interrupted_overwrite_is_finished_by_a_plain_resume(tmp_path: Path) -> None:
    import threading

    src, out, ref = tmp_path / "in", tmp_path / "out", tmp_path / "ref"
    src.mkdir()
    n = 24  # more than a run has in flight when it stops
    for k in range(n):
        (src / f"{k:02d}.png").write_bytes(_png((48, 40), seed=k))
    one = PipelineOptions(batch_size=1, workers=1)
    assert run_pipeline(src, out, create_purifier("rescale"), one).done == n
    old = {p.name: p.read_bytes() for p in out.glob("*.png")}

    # --overwrite with new settings, stopped after 3 images (a Ctrl-C, or a crash).
    stop = threading.Event()

    def after_three(record: Record) -> None:
        if sum(1 for p in out.glob("*.png") if p.read_bytes() != old[p.name]) >= 3:
            stop.set()

    median = create_purifier("median", kernel=5)
    overwrite = PipelineOptions(batch_size=1, workers=1, overwrite=True)
    first = run_pipeline(src, out, median, overwrite, on_progress=after_three, stop=stop)
    assert 3 <= first.done < n and json.loads((out / "run.json").read_text())["overwriting"]

    # The same settings without --overwrite: the old outputs are redone, the new ones kept.
    resumed = run_pipeline(src, out, median, one)
    assert (resumed.done, resumed.skipped) == (n - first.done, first.done)
    assert "overwriting" not in json.loads((out / "run.json").read_text())
    assert run_pipeline(src, ref, median, one).done == n
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == {
        p.name: p.read_bytes() for p in ref.glob("*.png")
    }
    again = run_pipeline(src, out, median, one)  # finished: nothing is redone
    assert (again.done, again.skipped) == (0, n)


def test_fifos_and_devices_fail_alone_without_blocking_or_reading(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.png").write_bytes(_png())
    os.mkfifo(src / "fifo.png")  # opening it for reading would wait for a writer forever
    (src / "zero.png").symlink_to("/dev/zero")  # reading it would never end
    summary = run_pipeline(src, tmp_path / "out", create_purifier("bitdepth"))
    assert (summary.done, summary.failed) == (1, 2)
    reasons = {Path(f.input).name: f.reason for f in summary.failures}
    assert reasons == {n: "not a regular file (a FIFO, device or socket)" for n in reasons}
    assert sorted(reasons) == ["fifo.png", "zero.png"]


def test_a_file_larger_than_any_image_within_the_limit_is_not_read(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    with big.open("wb") as handle:  # sparse: 100 MB that take no disk
        handle.write(_png())
        handle.truncate(100_000_000)
    with pytest.raises(ImageDecodeError, match="100000000 bytes is more than an image"):
        load_image(big, max_pixels=1_000_000)


def test_a_second_run_into_the_same_folder_is_refused(tmp_path: Path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "a.png").write_bytes(_png())
    out.mkdir()
    hold = (
        "import sys, time\n"
        "from advpurify.pipeline.lock import OutputLock\n"
        "OutputLock.acquire(sys.argv[1])\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        with pytest.raises(AdvpurifyError, match=f"in use by another run \\(pid {holder.pid} on"):
            run_pipeline(src, out, create_purifier("bitdepth"))
    finally:
        holder.kill()  # no clean-up: the lock file stays, naming a dead process
        holder.wait()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == holder.pid
    summary = run_pipeline(src, out, create_purifier("bitdepth"))  # nobody holds it: taken over
    assert summary.done == 1 and not (out / LOCK_FILE).exists()


def test_a_lock_taken_but_not_yet_written_is_refused(tmp_path: Path) -> None:
    # The owner between taking the lock and writing its pid: the file is empty, yet held.
    out = tmp_path / "out"
    out.mkdir()
    hold = (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n"
    )
    command = [sys.executable, "-c", hold, str(out / LOCK_FILE)]
    holder = subprocess.Popen(command, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        with pytest.raises(AdvpurifyError, match="in use by another run: wait"):
            OutputLock.acquire(out)
        assert (out / LOCK_FILE).read_bytes() == b""  # not taken over, not rewritten
    finally:
        holder.kill()
        holder.wait()


def test_a_full_disk_at_the_start_names_the_file_and_leaves_no_lock(
    tmp_path: Path, monkeypatch
) -> None:
    import advpurify.files
    import advpurify.pipeline.lock

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "out"
    out.mkdir()
    with monkeypatch.context() as patch:
        patch.setattr(advpurify.pipeline.lock.os, "pwrite", no_space)
        with pytest.raises(OSError, match="No space left") as caught:
            OutputLock.acquire(out)
    assert caught.value.filename == str(out / LOCK_FILE) and list(out.iterdir()) == []

    class FullFile(io.BytesIO):
        def write(self, data):
            no_space()

    real_open = open
    monkeypatch.setattr(
        advpurify.files,
        "open",
        lambda p, mode: FullFile() if "w" in mode else real_open(p, mode),
        raising=False,
    )
    with pytest.raises(OSError) as caught:
        advpurify.files.atomic_write_bytes(out / "run.json", b"{}")
    assert caught.value.filename == str(out / "run.json") and list(out.iterdir()) == []


def test_a_lock_file_from_another_host_is_refused(tmp_path: Path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "a.png").write_bytes(_png())
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere.example"}))
    with pytest.raises(AdvpurifyError, match="in use by a run on elsewhere.example"):
        run_pipeline(src, out, create_purifier("bitdepth"))


CONTENDER = """
import sys
from advpurify.errors import AdvpurifyError
from advpurify.pipeline.lock import OutputLock
print("ready", flush=True)
sys.stdin.readline()  # go: every contender tries at the same instant
try:
    lock = OutputLock.acquire(sys.argv[1])
except AdvpurifyError:
    print("refused", flush=True)
else:
    print("won", flush=True)
    sys.stdin.readline()  # held until every contender has tried
    lock.release()
"""


def test_exactly_one_of_many_simultaneous_runs_takes_the_lock(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for stale in (False, True):
        folder = tmp_path / str(stale)
        folder.mkdir()
        if stale:  # a lock file left by a crash: taken over by exactly one
            stale = {"pid": dead.pid, "host": socket.gethostname()}
            (folder / LOCK_FILE).write_text(json.dumps(stale))
        contenders = [
            subprocess.Popen(
                [sys.executable, "-c", CONTENDER, str(folder)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(4)
        ]
        try:
            for c in contenders:
                assert c.stdout is not None and c.stdout.readline() == "ready\n"
            for c in contenders:
                assert c.stdin is not None
                c.stdin.write("go\n")
                c.stdin.flush()
            results = sorted(c.stdout.readline().strip() for c in contenders)  # type: ignore[union-attr]
            assert results == ["refused", "refused", "refused", "won"], stale
            for c in contenders:
                c.communicate("release\n", timeout=30)
        finally:
            for c in contenders:
                c.kill()
        assert not (folder / LOCK_FILE).exists()


# Ctrl-C ----------------------------------------------------------------------------------
def test_ctrl_c_prints_one_line_and_a_rerun_resumes(tmp_path: Path, full_sample_paths) -> None:
    sample_paths = full_sample_paths  # 40 images: more than the committed fixture set holds
    src = tmp_path / "in"
    src.mkdir()
    for path in sample_paths[:40]:
        (src / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "out"
    command = [str(BIN / "purify-batch"), str(src), "-m", "median", "-o", str(out)]
    command += ["--batch-size", "2", "--workers", "1", "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if (out / MANIFEST).exists() and (out / MANIFEST).read_bytes().count(b"\n") >= 4:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    lines = err.decode().strip().splitlines()
    assert process.returncode == 130, err
    assert len(lines) == 2 and lines[1].startswith("interrupted: "), lines
    assert lines[0] == "stopping after the batch on the device (Ctrl-C again to stop at once)"
    assert lines[1].endswith(" done, rerun the same command to resume")
    done = int(lines[1].split()[1])
    assert 4 <= done < 40 and len(_records(out)) == done
    resumed = subprocess.run(command, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert len(list(out.glob("*.png"))) == 40


# Issue 12, item 9 ------------------------------------------------------------------------
class _SlowDevice(Purifier):
    """Records how many images were already decoded beyond each batch while it "runs"."""

    name = "test-slow-device"

    def __init__(self, decoded: list[int]) -> None:
        super().__init__()
        self.decoded, self.given, self.ahead = decoded, 0, []

    def purify(self, images, seeds):
        self.given += len(images)
        time.sleep(0.3)  # the device is busy: the readers should keep decoding meanwhile
        self.ahead.append(len(self.decoded) - self.given)
        return images


def test_reads_run_a_batch_ahead_while_the_device_works(tmp_path: Path, monkeypatch) -> None:
    src = tmp_path / "in"
    src.mkdir()
    for k in range(40):
        (src / f"{k:02d}.png").write_bytes(_png(seed=k))
    decoded: list[int] = []
    real_load = local.decode_image_with_profile

    def counting_load(*args, **kwargs):
        image = real_load(*args, **kwargs)
        decoded.append(1)
        return image

    monkeypatch.setattr(local, "decode_image_with_profile", counting_load)
    purifier = _SlowDevice(decoded)
    options = PipelineOptions(batch_size=8, workers=2)
    run_pipeline(src, tmp_path / "out", purifier, options)
    assert max(purifier.ahead) >= options.batch_size + 2 * options.workers


# The property ----------------------------------------------------------------------------
ENTRY = st.sampled_from(
    ["good", "jpeg", "corrupt", "truncated", "latin1", "collide", "collide3", "link"]
)


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
@given(entries=st.lists(ENTRY, min_size=1, max_size=7), link_output=st.booleans())
def test_every_planned_image_is_recorded_once_and_nothing_outside_changes(
    entries: list[str], link_output: bool
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src, out, elsewhere = root / "in", root / "out", root / "elsewhere"
        (src / "sub").mkdir(parents=True)
        elsewhere.mkdir()
        (elsewhere / "outside.png").write_bytes(_png(seed=99))
        for k, kind in enumerate(entries):
            folder = src / "sub" if k % 2 else src
            if kind == "good":
                (folder / f"g{k}.png").write_bytes(_png(seed=k))
            elif kind == "jpeg":
                (folder / f"j{k}.jpg").write_bytes(_jpeg(seed=k))
            elif kind == "corrupt":
                (folder / f"c{k}.jpg").write_bytes(b"\xff\xd8\xff" + os.urandom(64))
            elif kind == "truncated":
                (folder / f"t{k}.png").write_bytes(_png(seed=k)[:60])
            elif kind == "latin1":
                with open(os.fsencode(folder) + b"/l%d\xe9.png" % k, "wb") as handle:
                    handle.write(_png(seed=k))
            elif kind in ("collide", "collide3"):
                (folder / f"x{k}.jpg").write_bytes(_jpeg(seed=k))
                (folder / f"x{k}.png").write_bytes(_png(seed=k))
                if kind == "collide3":  # x.jpg -> x.jpg.png, which is also an input's name
                    (folder / f"x{k}.jpg.png").write_bytes(_png(seed=k + 1))
            else:
                (folder / f"s{k}.png").symlink_to(elsewhere / "outside.png")
        if link_output:
            out.mkdir()
            (out / "sub").symlink_to(elsewhere)
        outside = {"in": _digest(src), "elsewhere": _digest(elsewhere)}
        options = PipelineOptions(batch_size=3, workers=2)
        if "collide3" in entries:  # refused up front, naming both inputs: nothing written
            with pytest.raises(AdvpurifyError, match="would both be written"):
                run_pipeline(src, out, create_purifier("bitdepth"), options)
            assert not (out / MANIFEST).exists()
            assert {"in": _digest(src), "elsewhere": _digest(elsewhere)} == outside
            return
        first = run_pipeline(src, out, create_purifier("bitdepth"), options)
        records = _records(out)
        inputs = [os.fsencode(r["input"]) for r in records]
        assert len(inputs) == len(set(inputs)) == first.planned  # each planned image once
        assert {r["status"] for r in records} <= {"done", "failed"}
        assert first.done + first.failed + first.skipped + first.untouched == first.planned
        assert {"in": _digest(src), "elsewhere": _digest(elsewhere)} == outside
        outputs = {k: v for k, v in _digest(out).items() if not bytes.fromhex(k).startswith(b"run")}
        outputs.pop(os.fsencode(MANIFEST).hex())

        again = run_pipeline(src, out, create_purifier("bitdepth"), options)
        assert (again.skipped, again.done, again.failed) == (first.done, 0, first.failed)
        rerun = {k: v for k, v in _digest(out).items() if not bytes.fromhex(k).startswith(b"run")}
        rerun.pop(os.fsencode(MANIFEST).hex())
        assert rerun == outputs  # a rerun changes nothing
        assert {"in": _digest(src), "elsewhere": _digest(elsewhere)} == outside


def test_files_at_output_paths_without_run_json_are_never_taken_for_outputs(tmp_path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "one.png").write_bytes(_png())
    (src / "two.png").write_bytes(_png(seed=1))
    out = tmp_path / "out"
    out.mkdir()
    (out / "one.png").write_text("my own notes")
    with pytest.raises(AdvpurifyError, match=r"one\.png is already there and no run\.json"):
        run_pipeline(src, out, create_purifier("bitdepth"))
    assert (out / "one.png").read_text() == "my own notes" and not (out / "run.json").exists()
    # A finished run whose run.json was deleted: its settings are unknown, so the same.
    done = tmp_path / "done"
    run_pipeline(src, done, create_purifier("bitdepth", bits=3))
    (done / "run.json").unlink()
    with pytest.raises(AdvpurifyError, match="no run.json says which settings"):
        run_pipeline(src, done, create_purifier("bitdepth", bits=1))
    # --overwrite replaces them.
    summary = run_pipeline(src, out, create_purifier("bitdepth"), PipelineOptions(overwrite=True))
    assert (summary.done, summary.skipped) == (2, 0)
    assert Image.open(out / "one.png").size == (24, 16)


def test_a_folder_at_an_output_path_fails_that_image_alone(tmp_path: Path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    (src / "one.png").write_bytes(_png())
    (src / "two.png").write_bytes(_png(seed=1))
    run_pipeline(src, out, create_purifier("bitdepth"))
    (out / "one.png").unlink()
    (out / "one.png").mkdir()  # a resume finds a folder where an output should be
    summary = run_pipeline(src, out, create_purifier("bitdepth"))
    assert (summary.done, summary.skipped, summary.failed) == (0, 1, 1)
    assert "one.png" in summary.failures[0].reason or "one.png" in summary.failures[0].input


def test_an_output_name_too_long_for_the_file_system_fails_that_image_alone(tmp_path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    long = "b" * 251
    (src / f"{long}.png").write_bytes(_png())  # 255 bytes: the longest name a folder holds
    (src / "ok.png").write_bytes(_png(seed=1))
    out = tmp_path / "out"
    summary = run_pipeline(src, out, create_purifier("bitdepth"), PipelineOptions(fmt="webp"))
    assert (summary.done, summary.failed) == (1, 1)  # b...b.webp is 256 bytes
    assert "too long" in summary.failures[0].reason.lower()
    assert (out / "ok.webp").is_file()


def test_control_characters_in_names_print_as_escapes(tmp_path, monkeypatch, capsys) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "bad\nname.png").write_bytes(b"")
    (src / "esc\x1b[2Jclear.png").write_bytes(b"not an image")
    (src / "ok.png").write_bytes(_png())
    code, err = _cli(
        monkeypatch, capsys, "batch", str(src), "-m", "bitdepth", "-o", str(tmp_path / "o")
    )
    assert code == 2 and "\x1b" not in err
    failed = sorted(line for line in err.splitlines() if line.startswith("failed "))
    assert failed == [
        f"failed {src}/bad\\nname.png: empty file (0 bytes)",
        f"failed {src}/esc\\x1b[2Jclear.png: not a recognised image (file starts with b'not an i')",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("samples", ""), "error: argument 2: empty value"),
        (("batch", "IN", "-m", "bitdepth", "-o", ""), "error: -o: empty value"),
        (("batch", "IN", "-m", "bitdepth", "--output="), "error: --output: empty value"),
        (("batch", "", "-m", "bitdepth"), "error: argument 2: empty value"),
    ],
)
def test_an_empty_path_is_refused_not_taken_for_the_current_folder(
    tmp_path, monkeypatch, capsys, args, message
) -> None:
    (tmp_path / "IN").mkdir()
    (tmp_path / "IN" / "p.png").write_bytes(_png())
    monkeypatch.chdir(tmp_path)
    code, err = _cli(monkeypatch, capsys, *args)
    assert code == 1 and err.startswith(message)
    assert sorted(os.listdir(tmp_path)) == ["IN"]  # nothing written here


def test_help_shows_the_default_output_folder(monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["purify-batch", "--help"])
    monkeypatch.setenv("COLUMNS", "200")
    from advpurify.cli import purify_batch_main

    with pytest.raises(SystemExit):
        purify_batch_main()
    assert "INPUT-purified-METHOD" in capsys.readouterr().out  # not eaten as markup


def test_files_left_out_by_extension_are_counted(tmp_path, monkeypatch, capsys) -> None:
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    (src / "p.png").write_bytes(_png())
    (src / "sub" / "notes.txt").write_text("mine")
    code, err = _cli(
        monkeypatch, capsys, "batch", str(src), "-m", "bitdepth", "-o", str(tmp_path / "o"), "-q"
    )
    assert code == 0
    assert "note: 1 file without an image extension left out (e.g. sub/notes.txt)" in err
    (src / "manifest.jsonl").write_text("")  # an attack's own record: no file the user missed
    code, err = _cli(
        monkeypatch, capsys, "batch", str(src), "-m", "bitdepth", "-o", str(tmp_path / "o0"), "-q"
    )
    assert code == 0 and "note: 1 file without" in err  # still only sub/notes.txt
    (src / "manifest.jsonl").unlink()
    # A folder reached through a link is not entered (it might lead into the output), and said.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "q.png").write_bytes(_png())
    (src / "linked").symlink_to(elsewhere)
    code, err = _cli(
        monkeypatch, capsys, "batch", str(src), "-m", "bitdepth", "-o", str(tmp_path / "o1"), "-q"
    )
    assert code == 0
    assert "note: 1 folder reached through a symbolic link not entered (e.g. linked)" in err
    (src / "linked").unlink()
    (src / "p.png").unlink()
    code, err = _cli(
        monkeypatch, capsys, "batch", str(src), "-m", "bitdepth", "-o", str(tmp_path / "o2")
    )
    assert code == 1
    assert "no image files found (1 other files or linked folders, e.g. notes.txt)" in err
    assert ".jfif" in err  # and which extensions count


def test_empty_values_are_allowed_where_they_mean_something() -> None:
    from advpurify.cli import refuse_empty_arguments

    refuse_empty_arguments(["batch", "in", "-m", "rescale", "--ray-address", ""])
    refuse_empty_arguments(["batch", "in", "-m", "rescale", "--ray-address="])
    refuse_empty_arguments(["batch", "in", "-m", "rescale", "-p", "name="])  # -p checks it
    refuse_empty_arguments(["batch", "--", "--odd-name=", ""])  # positional after --
    with pytest.raises(AdvpurifyError, match="--json: empty value"):
        refuse_empty_arguments(["eval", "in", "--json="])
