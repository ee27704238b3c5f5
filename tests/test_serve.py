"""``advpurify serve``: request checks without Ray, then a real local Ray Serve on 127.0.0.1.

One server for the whole session (Ray start-ups are slow): ``randpad`` (stochastic, so seeds
are exercised) with ``efficientnet-lite0`` on torch, small limits so the refusals are cheap.
"""

from __future__ import annotations

import importlib.util
import io
import json
import socket
import struct
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image

from advpurify.errors import AdvpurifyError
from advpurify.images import encode_image, load_image, rgb_profile
from advpurify.models.classifiers import load_classifier
from advpurify.purifiers import create_purifier
from advpurify.serve import app as serve_app
from advpurify.serve.config import ServeConfig
from advpurify.serve.protocol import (
    BodyLimit,
    RequestError,
    check_length,
    flag,
    image_header,
    read_image,
    request_params,
    seed_for,
    top5,
)

# Its own xdist group: with `-n 2 --dist loadgroup` the Ray Data tests hold the other worker's
# Ray, and a server left up here cannot take the CPUs their actors need.
pytestmark = pytest.mark.xdist_group("serve")

TIMEOUT = 120  # seconds per HTTP request: the test never hangs on a stuck server


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` pixels, with no pixel data at all."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def png_bytes(image: torch.Tensor) -> bytes:
    return encode_image(image, "png")


# ------------------------------------------------------------------ request checks, no Ray


def test_huge_header_refused_before_decoding():
    with pytest.raises(RequestError) as caught:
        image_header(png_header(20_000, 20_000), max_pixels=4096 * 4096)
    assert caught.value.status == 413
    assert caught.value.reason == "too many pixels: 400000000 pixels is over the limit of 16777216"
    # Above Pillow's own bomb limit (89M pixels here) but under ours: no contradiction.
    with pytest.raises(RequestError, match="20000 x 10000 = 200000000 is over the limit of 1"):
        image_header(png_header(20_000, 10_000), max_pixels=150_000_000)
    # Under Pillow's own bomb limit, our limit still answers from the header alone.
    with pytest.raises(RequestError, match="5000 x 5000"):
        image_header(png_header(5000, 5000), max_pixels=1000 * 1000)


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [(b"", 400, "empty body"), (b"hello, world", 400, "not an image")],
)
def test_bad_bodies(body, status, reason):
    with pytest.raises(RequestError) as caught:
        read_image(body, max_pixels=10**6)
    assert caught.value.status == status and reason in caught.value.reason


def test_truncated_jpeg(sample_paths):
    data = sample_paths[0].read_bytes()
    with pytest.raises(RequestError, match="truncated"):
        read_image(data[: len(data) // 2], max_pixels=10**7)


def test_read_image_is_the_batch_tools_decoding(sample_paths):
    path = sample_paths[1]
    assert torch.equal(read_image(path.read_bytes(), 10**7), load_image(path))


def test_length_params_and_seed():
    check_length("100", 100)
    with pytest.raises(RequestError) as caught:
        check_length("101", 100)
    assert caught.value.status == 413
    with pytest.raises(RequestError, match="unknown parameter foo"):
        request_params("rescale", {}, {"foo": "1"})
    with pytest.raises(RequestError, match="factor"):
        request_params("rescale", {}, {"factor": "7"})
    with pytest.raises(RequestError, match="expected float"):
        request_params("rescale", {}, {"factor": "big"})
    assert request_params("rescale", {"factor": 0.5}, {"factor": "0.25", "seed": "3"}) == {
        "factor": 0.25,
        "mode": "bilinear",
    }
    assert seed_for(b"abc", {"seed": "42"}) == 42
    assert seed_for(b"abc", {}) == seed_for(b"abc", {}) != seed_for(b"abd", {})
    with pytest.raises(RequestError):
        seed_for(b"abc", {"seed": "x"})


@pytest.mark.parametrize(
    ("text", "value"),
    [("1", True), ("on", True), ("Yes", True), ("0", False), ("off", False), ("", False)],
)
def test_yes_no_query_flags_read_like_method_settings(text, value):
    assert flag({"compare": text}, "compare") is value
    assert flag({}, "compare") is False
    with pytest.raises(RequestError, match="use 1 or 0"):
        flag({"compare": "maybe"}, "compare")


def test_streamed_body_refused_once_over_the_limit():
    body = BodyLimit(10)
    body.add(b"12345")
    body.add(b"67890")
    with pytest.raises(RequestError) as caught:
        body.add(b"x")
    assert caught.value.status == 413 and body.body() == b"1234567890"


def test_replicas_share_the_gpus(monkeypatch):
    config = ServeConfig("rescale", classifier="googlenet", replicas=2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert serve_app.actor_options(config, 2) == {"num_cpus": 1}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert serve_app.actor_options(config, 2) == {"num_cpus": 1, "num_gpus": 0.25}
    one = ServeConfig("rescale", replicas=1)
    assert serve_app.actor_options(one, 1) == {"num_cpus": 1, "num_gpus": 1.0}
    cpu = ServeConfig("rescale", device="cpu")
    assert serve_app.actor_options(cpu, 1) == {"num_cpus": 1}


def test_top5_names_classes():
    logits = torch.zeros(1000)
    logits[[1, 7, 9, 3, 2]] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    answer = top5(logits)
    assert [a["index"] for a in answer] == [1, 7, 9, 3, 2]
    assert answer[0]["wnid"] == "n01443537" and answer[0]["name"] == "goldfish"
    assert answer[0]["probability"] > answer[1]["probability"]


def test_serve_without_ray_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a)
    )
    with pytest.raises(AdvpurifyError, match=r"advpurify\[ray\]"):
        serve_app.require_ray()
    from typer.testing import CliRunner

    from advpurify.cli import app

    result = CliRunner().invoke(app, ["serve", "--method", "rescale"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: advpurify serve needs Ray Serve, not installed: pip install 'advpurify[ray]'"
    ]


def test_config_checked_before_ray_starts():
    with pytest.raises(AdvpurifyError, match="unknown parameter"):
        ServeConfig("rescale", {"x": 1}).checked()
    with pytest.raises(AdvpurifyError, match="factor"):
        ServeConfig("rescale", {"factor": 5.0}).checked()
    assert ServeConfig("rescale", {"factor": 0.25}).checked().params == {
        "factor": 0.25,
        "mode": "bilinear",
    }
    with pytest.raises(AdvpurifyError, match="--max-batch"):
        ServeConfig("rescale", max_batch=0).checked()


def test_what_would_fail_in_a_replica_fails_before_ray_starts(tmp_path, monkeypatch):
    from advpurify.serve.app import preflight

    monkeypatch.setenv("ADVPURIFY_HOME", str(tmp_path / "empty-cache"))
    cases = {
        "unknown classifier 'nosuch'": dict(classifier="nosuch"),
        "unknown backend 'bogus'": dict(classifier="efficientnet-lite0", backend="bogus"),
        "--weights missing.pt: no such file": dict(
            classifier="efficientnet-lite0", weights="missing.pt"
        ),
        "weights deepsim-fc6 not found": dict(method="ppgn"),
        "--host 999.1.1.1: not an address": dict(host="999.1.1.1"),
    }
    for message, values in cases.items():
        config = ServeConfig(**{"method": "rescale", **values}).checked()
        with pytest.raises(AdvpurifyError, match=message):
            preflight(config)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(AdvpurifyError, match=f"--port {port} on 127.0.0.1: cannot listen"):
            preflight(ServeConfig("rescale", port=port, metrics_port=None))
    from typer.testing import CliRunner

    from advpurify.cli import app

    result = CliRunner().invoke(app, ["serve", "-m", "rescale", "--max-body-mb", "nan"])
    assert result.exit_code == 1 and "--max-body-mb nan: must be a finite number" in result.output


# ------------------------------------------------------------------ a real local Ray Serve


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


CONFIG = dict(
    method="randpad",
    classifier="efficientnet-lite0",
    backend="torch",
    device="cpu",
    host="127.0.0.1",
    max_batch=8,
    batch_wait_ms=100.0,  # generous: batching must be seen on a loaded 2-core machine
    max_body_bytes=2 * 2**20,
    max_pixels=2000 * 2000,
    # A session's Ray may be shared (ray_local): leave CPUs to Ray Data tests running beside.
    cpus_per_replica=0.25,
)


@pytest.fixture(scope="session")
def server(request) -> dict:
    """The session's server: reuses a running Ray (a ``ray_local`` fixture) when there is one."""
    pytest.importorskip("ray.serve", reason="the ray extra is not installed")
    try:
        request.getfixturevalue("ray_local")
    except pytest.FixtureLookupError:
        pass
    import ray

    owns_ray = not ray.is_initialized()
    config = ServeConfig(port=free_port(), metrics_port=free_port(), **CONFIG)
    url = serve_app.start(config)
    yield {"url": url, "config": config, "owns_ray": owns_ray}
    serve_app.stop(stop_ray=owns_ray)


@pytest.fixture(scope="session")
def library():
    """The library's own answers: the same purifier and classifier, called in-process."""
    return {
        "purifier": create_purifier("randpad"),
        "classifier": load_classifier("efficientnet-lite0", backend="torch", device="cpu"),
    }


def post(url: str, body: bytes) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, data=body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
        return json.loads(response.read())


def library_png(library, path: Path, seed: int) -> bytes:
    purified = library["purifier"](load_image(path)[None], [seed])[0]
    return encode_image(purified, "png", 95, rgb_profile(path.read_bytes()))


def library_top5(library, image: torch.Tensor):
    with torch.inference_mode():
        return top5(library["classifier"].module(image[None])[0])


def test_stage_is_defended_classifier(library, sample_paths):
    """What the two deployments call, composed, is ``DefendedClassifier``'s forward pass."""
    from advpurify import DefendedClassifier
    from advpurify.serve.stage import logits, purify

    purifier = create_purifier("rescale", factor=0.25)
    image = load_image(sample_paths[6])[None]
    served = logits(library["classifier"], list(purify(purifier, image, [0])))
    with torch.inference_mode():
        expected = DefendedClassifier(purifier, library["classifier"].module)(image)
    torch.testing.assert_close(served, expected, atol=1e-5, rtol=1e-5)


def test_purify_bytes_equal_library(server, library, sample_paths):
    path = sample_paths[2]
    status, headers, body = post(server["url"] + "/purify?seed=1234", path.read_bytes())
    assert status == 200, body
    assert headers["content-type"] == "image/png"
    assert headers["x-advpurify-method"] == "randpad"
    assert json.loads(headers["x-advpurify-parameters"])["mode"] == "bilinear"
    assert float(headers["x-advpurify-seconds"]) > 0
    assert body == library_png(library, path, 1234)
    # Without a seed: derived from the bytes, so the same image gives the same answer.
    status, headers, again = post(server["url"] + "/purify", path.read_bytes())
    seed = int(headers["x-advpurify-seed"])
    assert again == post(server["url"] + "/purify", path.read_bytes())[2]
    assert again == library_png(library, path, seed) != body
    # An image with a colour profile (Adobe RGB): the answer carries it, as purify-batch's does.
    tagged = sample_paths[1]
    status, _, body = post(server["url"] + "/purify?seed=5", tagged.read_bytes())
    assert status == 200 and body == library_png(library, tagged, 5)
    with Image.open(io.BytesIO(body)) as answer:
        assert answer.info["icc_profile"] == rgb_profile(tagged.read_bytes()) is not None


def test_classify_top5_equal_library(server, library, sample_paths):
    path = sample_paths[3]
    status, _, body = post(server["url"] + "/classify?seed=7&compare=1", path.read_bytes())
    assert status == 200, body
    answer = json.loads(body)
    image = load_image(path)
    purified = library["purifier"](image[None], [7])[0]
    for served, expected in (
        (answer["purified"], library_top5(library, purified)),
        (answer["unpurified"], library_top5(library, image)),
    ):
        assert [c["index"] for c in served] == [c["index"] for c in expected]
        assert [c["wnid"] for c in served] == [c["wnid"] for c in expected]
        for got, want in zip(served, expected, strict=True):
            assert got["probability"] == pytest.approx(want["probability"], abs=1e-5)
    assert answer["seed"] == 7 and answer["method"] == "randpad"


def test_bad_requests_are_4xx_and_serving_continues(server, sample_paths):
    good = sample_paths[4].read_bytes()
    bad = {
        "text body": ("/purify", b"this is not an image", 400, "not an image"),
        "truncated JPEG": ("/purify", good[: len(good) // 3], 400, "truncated"),
        "zero bytes": ("/purify", b"", 400, "empty body"),
        "20,000 x 20,000 PNG header": ("/purify", png_header(20_000, 20_000), 413, "pixels"),
        "unknown parameter": ("/purify?sharpness=3", good, 400, "unknown parameter sharpness"),
        "bad seed": ("/classify?seed=minus", good, 400, "seed"),
        "a parameter twice": ("/purify?factor=0.25&factor=0.75", good, 400, "factor given twice"),
        "body over the limit": ("/purify", b"\xff" * (3 * 2**20), 413, "over the limit"),
    }
    for what, (route, body, status, reason) in bad.items():
        got, headers, answer = post(server["url"] + route, body)
        assert got == status, (what, answer)
        assert headers["content-type"] == "application/json", what
        assert reason in json.loads(answer)["error"], (what, answer)
        # The next good request is still served.
        assert post(server["url"] + "/purify?seed=1", good)[0] == 200, what
    # Unknown paths and methods answer in the same one-line JSON.
    got, headers, answer = post(server["url"] + "/nope", good)
    assert (got, json.loads(answer)["error"]) == (404, "POST /nope: Not Found")
    try:
        urllib.request.urlopen(server["url"] + "/purify", timeout=TIMEOUT)
    except urllib.error.HTTPError as error:
        assert error.code == 405 and json.loads(error.read())["status"] == 405
    else:
        raise AssertionError("GET /purify was answered")


def test_concurrent_requests_are_batched(server, library, sample_paths):
    # Equal sizes, so they can share a batch; each keeps its own seed inside the batch.
    image = load_image(sample_paths[5])[:, :96, :128].contiguous()
    data = png_bytes(image)
    before = get_json(server["url"] + "/stats")

    def one(seed: int):
        return post(server["url"] + f"/purify?seed={seed}", data)

    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(one, range(24)))
    stats = get_json(server["url"] + "/stats")
    assert all(status == 200 for status, _, _ in answers)
    new = {
        int(size): count - before["purifier"]["batch_sizes"].get(size, 0)
        for size, count in stats["purifier"]["batch_sizes"].items()
    }
    assert max(size for size, count in new.items() if count > 0) > 1, stats
    for seed, (_, _, body) in enumerate(answers):
        expected = library["purifier"](image[None], [seed])[0]
        assert body == png_bytes(expected), f"seed {seed}: batched output differs"
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda s: post(server["url"] + f"/classify?seed={s}", data), range(8)))
    assert get_json(server["url"] + "/stats")["classifier"]["max_batch_size"] > 1


def test_health_methods_and_metrics(server):
    health = get_json(server["url"] + "/healthz")
    assert health["status"] == "ok" and health["method"] == "randpad"
    assert health["classifier"] == {
        "name": "efficientnet-lite0",
        "backend": "torch",
        "device": "cpu",
    }
    methods = {m["method"]: m for m in get_json(server["url"] + "/methods")}
    assert methods["randpad"]["stochastic"] and "rescale" in methods
    assert [p["name"] for p in methods["rescale"]["parameters"]] == ["factor", "mode"]
    if server["owns_ray"]:  # the metrics port is ours only when this fixture started Ray
        port = server["config"].metrics_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT) as r:
            assert b"ray_" in r.read()


def test_an_image_too_elongated_to_classify_is_refused_alone_before_batching():
    import asyncio

    from advpurify.models.classifiers import ClassifierError, load_classifier, resize_center_crop
    from advpurify.serve.deployments import BatchStats, ClassifierDeployment

    strip = torch.rand(1, 3, 1, 65536)  # resized, 256 x 16.8M: 48 GiB
    with pytest.raises(ClassifierError, match="too elongated"):
        resize_center_crop(strip, 256, 224)
    deployment = ClassifierDeployment.func_or_class.__new__(ClassifierDeployment.func_or_class)
    deployment.stats = BatchStats()
    deployment.classifier = load_classifier("efficientnet-lite0", device="cpu")
    answer = asyncio.run(deployment.classify(strip[0]))
    assert answer["status"] == 413 and "too elongated" in answer["error"]


def test_an_image_that_fails_fails_alone_in_its_batch(monkeypatch):
    import asyncio

    import advpurify.serve.deployments as deployments
    from advpurify.serve.deployments import BatchStats, PurifierDeployment

    deployment = PurifierDeployment.func_or_class.__new__(PurifierDeployment.func_or_class)
    deployment.stats = BatchStats()
    median = create_purifier("median")
    real = deployments.purify

    def purify(purifier, images, seeds):  # a bug that hits one image size only
        if images.shape[-1] == 9:
            raise RuntimeError("a bug")
        return real(purifier, images, seeds)

    batch = PurifierDeployment.func_or_class._purify_batch.__wrapped__  # one batch, no Ray
    monkeypatch.setitem(batch.__globals__, "purify", purify)  # Ray keeps its own globals
    sizes = [(1, 1), (8, 8), (9, 9), (8, 8)]  # too small for the window, fine, a bug, fine
    items = [(median, torch.rand(3, *size), 0) for size in sizes]
    small, good, buggy, good_again = asyncio.run(batch(deployment, items))
    assert isinstance(small, RequestError) and small.status == 422
    assert "too small" in str(small)
    assert isinstance(buggy, RequestError) and buggy.status == 500
    assert good.shape == good_again.shape == (3, 8, 8)


def test_the_servers_pixel_limit_is_the_decoders(monkeypatch):
    import advpurify.serve.protocol as protocol

    seen = {}
    real = protocol.decode_image

    def spy(data, name, max_pixels):
        seen["max_pixels"] = max_pixels
        return real(data, name, max_pixels=max_pixels)

    monkeypatch.setattr(protocol, "decode_image", spy)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG")
    read_image(buffer.getvalue(), max_pixels=100_000_000)
    assert seen["max_pixels"] == 100_000_000  # not load_image's default 64M
    with pytest.raises(RequestError, match="seed='1_0'"):
        seed_for(b"x", {"seed": "1_0"})


def test_sigterm_stops_the_server_as_ctrl_c_does(monkeypatch):
    # No Ray: start/stop stand in, the signal is real.
    import os
    import signal
    import threading
    import types

    stopped: list[bool] = []
    monkeypatch.setattr(serve_app, "start", lambda config: "http://127.0.0.1:1")
    monkeypatch.setattr(serve_app, "stop", lambda: stopped.append(True))
    previous = signal.getsignal(signal.SIGTERM)
    notes: list[str] = []
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        timer.start()
        serve_app.serve_forever(ServeConfig("rescale"), notes.append)
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)
    assert notes[-1] == "stopping" and stopped == [True]

    # Served from another thread (a library caller): no handler is installed there.
    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    # Its own stand-in for the time module: no other thread's sleep is touched.
    monkeypatch.setattr(serve_app, "time", types.SimpleNamespace(sleep=interrupted))
    worker = threading.Thread(target=serve_app.serve_forever, args=(ServeConfig("rescale"), print))
    worker.start()
    worker.join(10)
    assert signal.getsignal(signal.SIGTERM) is previous and stopped == [True, True]
