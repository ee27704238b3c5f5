"""Weights registry, cache and downloads, against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.server
import re
import threading
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from advpurify.weights import (
    ChecksumError,
    Source,
    WeightsError,
    WeightsNotFound,
    cached_path,
    download,
    fetch,
    import_file,
    load_state_dict,
    register_source,
    require,
)
from advpurify.weights.caffe import convert_caffemodel, read_caffemodel
from advpurify.weights.registry import unregister_source


class _Server(http.server.ThreadingHTTPServer):
    files: dict[str, bytes]
    log: list[tuple[str, str | None, int]]  # (path, Range header, bytes sent)
    cut_first_after: int | None  # drop the first response after this many body bytes
    ignore_range: bool


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        data = self.server.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        header = self.headers.get("Range")
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", header or "")
        if match and not self.server.ignore_range:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                self.server.log.append((self.path, header, 0))
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = self.server.cut_first_after
        if cut is not None:
            self.server.cut_first_after = None
            body = body[:cut]  # the connection "drops": fewer bytes than announced
        self.wfile.write(body)
        self.wfile.flush()
        self.server.log.append((self.path, header, len(body)))
        if cut is not None:
            self.close_connection = True


@pytest.fixture()
def server():
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.files, srv.log, srv.cut_first_after, srv.ignore_range = {}, [], None, False
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ADVPURIFY_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture()
def lenet_bytes(data_dir: Path) -> bytes:
    return (data_dir / "fixtures" / "caffe" / "lenet_iter_10000.caffemodel").read_bytes()


@pytest.fixture()
def lenet_source(server, lenet_bytes):
    """A real Caffe file served locally, registered like any built-in source."""
    server.files["/lenet.caffemodel"] = lenet_bytes
    url = f"http://127.0.0.1:{server.server_address[1]}/lenet.caffemodel"
    source = register_source(
        Source(
            name="test-lenet",
            format="caffemodel",
            url=url,
            size=len(lenet_bytes),
            sha256=hashlib.sha256(lenet_bytes).hexdigest(),
            converter=convert_caffemodel,
        )
    )
    yield source
    unregister_source(source.name)


def swap_source(source: Source) -> None:
    """Replace the test source (a registered name is never silently overwritten)."""
    unregister_source(source.name)
    register_source(source)


def _leftovers(home: Path) -> list[str]:
    return sorted(p.name for p in home.rglob("*") if p.is_file())


def test_full_download_converts_into_the_cache(home, server, lenet_source):
    with pytest.raises(WeightsNotFound, match="weights test-lenet not found"):
        require("test-lenet")
    [path] = fetch("test-lenet", progress=False)
    assert path == cached_path("test-lenet") == require("test-lenet")
    state = load_state_dict("test-lenet")
    assert state["ip1.0"].shape == (500, 800) and state["conv1.1"].shape == (20,)
    assert server.log == [("/lenet.caffemodel", None, len(server.files["/lenet.caffemodel"]))]
    assert _leftovers(home) == ["test-lenet.safetensors"]  # no .part, raw file removed
    fetch("test-lenet", progress=False)  # cached: nothing downloaded again
    assert len(server.log) == 1


def test_resumes_from_a_partial_file(home, server, lenet_source, lenet_bytes, data_dir):
    part = home / "downloads" / "lenet.caffemodel.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(lenet_bytes[:700_000])
    fetch("test-lenet", progress=False)
    assert server.log == [("/lenet.caffemodel", "bytes=700000-", len(lenet_bytes) - 700_000)]
    reference = read_caffemodel(data_dir / "fixtures" / "caffe" / "lenet_iter_10000.caffemodel")
    expected = torch.from_numpy(reference.layer("ip2").blobs[0].data)
    assert torch.equal(load_state_dict("test-lenet")["ip2.0"], expected)
    assert _leftovers(home) == ["test-lenet.safetensors"]


def test_interrupted_transfer_resumes_by_itself(home, server, lenet_source, lenet_bytes):
    server.cut_first_after = 400_000
    fetch("test-lenet", progress=False)
    assert [entry[1] for entry in server.log] == [None, "bytes=400000-"]
    assert sum(entry[2] for entry in server.log) == len(lenet_bytes)
    assert load_state_dict("test-lenet")["conv2.0"].shape == (50, 20, 5, 5)


def test_checksum_mismatch_is_refused_and_nothing_is_kept(home, server, lenet_source):
    swap_source(
        Source(
            name="test-lenet",
            format="caffemodel",
            url=lenet_source.url,
            sha256="0" * 64,
            converter=lenet_source.converter,
        ),
    )
    with pytest.raises(WeightsError) as info:
        fetch("test-lenet", progress=False)
    message = str(info.value)
    assert f"expected {'0' * 64}" in message and "sha256" in message
    assert hashlib.sha256(server.files["/lenet.caffemodel"]).hexdigest() in message
    assert _leftovers(home) == []  # neither the download, its .part, nor a cache entry


def test_corrupt_partial_is_never_moved_into_the_cache(home, server, lenet_source, lenet_bytes):
    part = home / "downloads" / "lenet.caffemodel.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\0" * 500_000)  # wrong bytes: the resumed file cannot verify
    with pytest.raises(ChecksumError, match="expected"):
        download(
            lenet_source.url,
            home / "downloads" / "lenet.caffemodel",
            size=lenet_source.size,
            sha256=lenet_source.sha256,
            progress=False,
        )
    assert _leftovers(home) == []
    fetch("test-lenet", progress=False)  # the next attempt starts clean and succeeds
    assert server.log[-1] == ("/lenet.caffemodel", None, len(lenet_bytes))
    assert _leftovers(home) == ["test-lenet.safetensors"]


def test_wrong_size_is_refused(home, server, lenet_source, lenet_bytes):
    swap_source(
        Source(name="test-lenet", format="caffemodel", url=lenet_source.url,
               size=len(lenet_bytes) + 1, converter=lenet_source.converter),
    )  # fmt: skip
    with pytest.raises(WeightsError, match=f"size {len(lenet_bytes)} bytes, expected"):
        fetch("test-lenet", progress=False)
    assert not cached_path("test-lenet").exists()


def test_server_ignoring_range_restarts_the_file(home, server, lenet_source, lenet_bytes):
    server.ignore_range = True
    part = home / "downloads" / "lenet.caffemodel.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(lenet_bytes[:1000])
    fetch("test-lenet", progress=False)
    assert server.log == [("/lenet.caffemodel", "bytes=1000-", len(lenet_bytes))]
    assert require("test-lenet").is_file()


def test_unreachable_server_names_the_import_command(home, lenet_source):
    swap_source(
        Source(name="test-lenet", format="caffemodel", url="http://127.0.0.1:9/x.caffemodel",
               converter=lenet_source.converter),
    )  # fmt: skip
    with pytest.raises(WeightsError, match="advpurify weights import test-lenet FILE"):
        fetch("test-lenet", progress=False)


def test_import_checks_checksum_and_shapes(home, tmp_path, lenet_source, lenet_bytes):
    good = tmp_path / "lenet.caffemodel"
    good.write_bytes(lenet_bytes)
    [(model, path)] = import_file("test-lenet", good)
    assert model == "test-lenet" and path.is_file()
    altered = tmp_path / "altered.caffemodel"
    altered.write_bytes(lenet_bytes[:-4] + b"\0\0\0\0")
    with pytest.raises(WeightsError, match="--no-verify"):
        import_file("test-lenet", altered)
    # A PPGN file of the wrong kind: refused before anything reaches the cache.
    with pytest.raises(WeightsError, match="not imported: as deepsim-fc6: refused") as info:
        import_file("ppgn", good)
    assert "as caffenet-fc6: sha1" in str(info.value)
    with pytest.raises(WeightsError, match="as caffenet-fc6: refused"):
        import_file("ppgn", good, verify=False)
    assert not cached_path("deepsim-fc6").exists() and not cached_path("caffenet-fc6").exists()
    torch7 = tmp_path / "model.t7"
    torch7.write_bytes(b"not used")
    with pytest.raises(WeightsError, match="a torch7 file cannot provide ppgn"):
        import_file("ppgn", torch7)


def test_weights_with_nan_or_inf_are_refused_and_the_cached_ones_kept(
    home, tmp_path, lenet_source, lenet_bytes
):
    import struct

    from safetensors.torch import load_file

    good = tmp_path / "lenet.caffemodel"
    good.write_bytes(lenet_bytes)
    [(_, cached)] = import_file("test-lenet", good)
    before = cached.read_bytes()
    # A diverged run's checkpoint: one weight of the real file turned into NaN.
    name, tensor = next(iter(load_file(cached).items()))
    value = struct.pack("<f", tensor.view(-1)[0].item())
    assert lenet_bytes.count(value) == 1
    diverged = tmp_path / "diverged.caffemodel"
    diverged.write_bytes(lenet_bytes.replace(value, struct.pack("<f", float("nan"))))
    with pytest.raises(WeightsError, match=f"NaN or infinite values in {name}"):
        import_file("test-lenet", diverged, verify=False)
    assert cached.read_bytes() == before


def test_missing_ppgn_weights_name_both_commands(home):
    with pytest.raises(WeightsNotFound) as info:
        require("deepsim-fc6")
    message = str(info.value)
    assert "`advpurify weights fetch ppgn`" in message
    assert "`advpurify weights import deepsim-fc6 FILE`" in message


def test_cli_list_import_convert(home, tmp_path, lenet_source, lenet_bytes, data_dir):
    from advpurify.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["weights", "list"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "deepsim-fc6" in result.output and "caffenet-fc6" in result.output
    good = tmp_path / "lenet.caffemodel"
    good.write_bytes(lenet_bytes)
    result = runner.invoke(app, ["weights", "import", "test-lenet", str(good)])
    assert result.exit_code == 0, result.output
    assert cached_path("test-lenet").is_file()
    from advpurify.weights.manager import entries

    def lenet_entry():
        return next(e for e in entries() if e.model == "test-lenet")

    assert lenet_entry().cached and lenet_entry().damage is None
    whole = cached_path("test-lenet").read_bytes()
    cached_path("test-lenet").write_bytes(whole[: len(whole) // 2])  # a disk filled mid-copy
    assert lenet_entry().damage == f"truncated ({len(whole) // 2} of {len(whole)} bytes)"
    assert "damaged" in runner.invoke(app, ["weights", "list"]).output
    cached_path("test-lenet").write_bytes(whole)
    out = tmp_path / "lenet.safetensors"
    caffe = data_dir / "fixtures" / "caffe"
    result = runner.invoke(
        app,
        ["weights", "convert", str(caffe / "lenet.prototxt"),
         str(caffe / "lenet_iter_10000.caffemodel"), "-o", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "8 blobs" in result.output and out.is_file()
    result = runner.invoke(app, ["weights", "fetch", "no-such-weights"])
    assert result.exit_code == 1
    assert "error: unknown weights 'no-such-weights'" in result.output


def test_a_part_larger_than_the_file_is_restarted_when_nothing_else_is_known(
    tmp_path, server, lenet_bytes
):
    from advpurify.weights.download import download

    server.files["/x.bin"] = lenet_bytes
    url = f"http://127.0.0.1:{server.server_address[1]}/x.bin"
    target = tmp_path / "x.bin"
    part = tmp_path / "x.bin.part"
    part.write_bytes(lenet_bytes + b"garbage")  # no size, no checksum to catch it
    download(url, target, progress=False)
    assert target.read_bytes() == lenet_bytes and not part.exists()
    assert [entry[1] for entry in server.log] == [f"bytes={len(lenet_bytes) + 7}-", None]

    (tmp_path / "y.bin.part").write_bytes(lenet_bytes)  # whole: the 416 states its size
    download(url, tmp_path / "y.bin", progress=False)
    assert (tmp_path / "y.bin").read_bytes() == lenet_bytes


def test_a_content_length_that_is_not_a_number_is_ignored(
    tmp_path, server, lenet_bytes, monkeypatch
):
    from advpurify.weights.download import download

    original = _Handler.send_header

    def odd_length(self, key, value):
        original(self, key, "twelve" if key == "Content-Length" else value)

    monkeypatch.setattr(_Handler, "send_header", odd_length)
    server.files["/z.bin"] = lenet_bytes
    url = f"http://127.0.0.1:{server.server_address[1]}/z.bin"
    download(url, tmp_path / "z.bin", size=len(lenet_bytes), progress=False)
    assert (tmp_path / "z.bin").read_bytes() == lenet_bytes


def test_a_bad_download_without_a_checksum_is_not_kept_and_force_downloads_again(
    home, server, lenet_source, lenet_bytes
):
    swap_source(  # no size, no checksum: only the conversion can tell a bad file
        Source(
            name="test-lenet",
            format="caffemodel",
            url=lenet_source.url,
            converter=lenet_source.converter,
        ),
    )
    kept = home / "downloads" / "lenet.caffemodel"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"<html>parked domain</html>")  # a finished download that is not a model
    with pytest.raises(WeightsError, match="not a valid .caffemodel"):
        fetch("test-lenet", progress=False)
    assert not kept.exists()  # not reused by the next attempt
    fetch("test-lenet", progress=False)
    assert server.log[-1] == ("/lenet.caffemodel", None, len(lenet_bytes))

    kept.write_bytes(b"<html>parked domain</html>")
    fetch("test-lenet", progress=False, force=True, keep_download=True)  # --force: fresh bytes
    assert kept.read_bytes() == lenet_bytes


def test_import_says_what_is_wrong_with_the_name_or_the_file(home, tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    noise = tmp_path / "noise.pt"
    noise.write_bytes(bytes(range(7, 250)))
    cases = {
        ("nosuch", folder): "unknown weights 'nosuch'",  # the name first, whatever the file
        ("ppgn", folder): f"{folder}: is a folder, not a weights file",
        ("deepsim-fc6", noise): "not a readable checkpoint (Unsupported operand",
    }
    for (name, path), message in cases.items():
        with pytest.raises(WeightsError, match=re.escape(message)):
            import_file(name, path)


class _RunsCode:
    def __reduce__(self):
        import os

        return (os.system, ("true",))


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_a_pickle_that_would_run_code_is_refused_without_torchs_unsafe_advice(tmp_path, protocol):
    import pickle

    from advpurify.weights.state_dicts import read_state_dict

    evil = tmp_path / "evil.pt"
    if protocol == 2:
        torch.save({"w": _RunsCode()}, evil)  # torch.save's own pickle
    else:
        evil.write_bytes(pickle.dumps({"w": _RunsCode()}, protocol=protocol))
    with pytest.raises(WeightsError) as refused:
        read_state_dict(evil)
    message = str(refused.value)
    assert "could run code" in message and "weights_only" not in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("header", "data", "found"),
    [
        ({"w": {"data_offsets": [0, 4]}}, b"1234", None),
        ({"w": {"data_offsets": [0, 4]}}, b"12", "truncated"),
        ({"w": {"data_offsets": [0, 4]}}, b"12345678", "wrong size"),
        ([], b"", "not a JSON object"),
        ({"w": {"data_offsets": ["0", "4"]}}, b"1234", "not integers"),
        ({"w": 1}, b"", "unreadable header"),
    ],
)
def test_a_damaged_cached_file_is_named_never_a_traceback(tmp_path, header, data, found):
    import json
    import struct

    from advpurify.weights.cache import damage

    text = json.dumps(header).encode()
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    problem = damage(path)
    assert problem is None if found is None else found in problem
