"""Classifiers (googlenet from a file and from a 127.0.0.1 download), preprocessing, labels."""

from __future__ import annotations

import functools
import hashlib
import http.server
import socket
import threading
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models import GoogLeNet_Weights
from torchvision.transforms import v2

from advpurify.errors import AdvpurifyError
from advpurify.evaluation.labels import (
    SOURCE_CLEAN,
    SOURCE_CSV,
    SOURCE_PATH,
    LabelError,
    label_from_path,
    read_labels_csv,
    resolve_labels,
)
from advpurify.models.classifiers import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClassifierError,
    build_classifier,
    load_classifier,
    map_by_order,
    resize_center_crop,
    resize_crop_box,
)
from advpurify.models.imagenet import class_name, wnids
from advpurify.runtime.backends import TorchBackend
from advpurify.runtime.installed import BackendError


@pytest.fixture(scope="module")
def googlenet_state() -> dict[str, torch.Tensor]:
    """A random-init GoogLeNet state dict laid out like torchvision's IMAGENET1K_V1 file."""
    torch.manual_seed(0)
    net = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True)
    return {k: v.clone() for k, v in net.state_dict().items()}


def torchvision_reference(state: dict[str, torch.Tensor], monkeypatch) -> torch.nn.Module:
    """torchvision's own pretrained googlenet, with ``state`` in place of the download."""
    monkeypatch.setattr(GoogLeNet_Weights, "get_state_dict", lambda self, *a, **k: state)
    return torchvision.models.googlenet(weights=GoogLeNet_Weights.IMAGENET1K_V1).eval()


def normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def serve(tmp_path: Path):
    """Serve a folder on 127.0.0.1 in a thread; yields (folder, base_url, stop)."""
    folder = tmp_path / "served"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    stopped = []

    def stop() -> None:
        if not stopped:
            server.shutdown()
            server.server_close()
            stopped.append(True)

    yield folder, f"http://127.0.0.1:{server.server_address[1]}", stop
    stop()


def _publish(folder: Path, state: dict[str, torch.Tensor], name_hash: str | None = None) -> str:
    """Save ``state`` under torchvision's naming scheme ``googlenet-<sha256 prefix>.pth``."""
    tmp = folder / "upload.pth"
    torch.save(state, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    name = f"googlenet-{name_hash or digest[:8]}.pth"
    tmp.rename(folder / name)
    return name


def test_googlenet_from_local_file_matches_torchvision(tmp_path, googlenet_state, monkeypatch):
    path = tmp_path / "googlenet.pth"
    torch.save(googlenet_state, path)
    ours = build_classifier("googlenet", weights=path)
    reference = torchvision_reference(googlenet_state, monkeypatch)
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(normalise(x)), rtol=1e-5, atol=1e-5)


def test_googlenet_downloads_into_torch_home_and_reuses_cache(
    tmp_path, googlenet_state, monkeypatch, serve
):
    folder, base, stop = serve
    name = _publish(folder, googlenet_state)
    torch_home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setattr(GoogLeNet_Weights.IMAGENET1K_V1.value, "url", f"{base}/{name}")

    ours = build_classifier("googlenet")
    assert (torch_home / "hub" / "checkpoints" / name).is_file()
    reference = torchvision_reference(googlenet_state, monkeypatch)
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(normalise(x)), rtol=1e-5, atol=1e-5)

    stop()  # offline now: the cached file must be enough
    again = build_classifier("googlenet")
    with torch.no_grad():
        torch.testing.assert_close(again(x), ours(x))


def test_googlenet_unreachable_names_both_remedies(tmp_path, monkeypatch):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-home"))
    monkeypatch.setattr(
        GoogLeNet_Weights.IMAGENET1K_V1.value,
        "url",
        f"http://127.0.0.1:{port}/googlenet-1378be20.pth",
    )
    with pytest.raises(AdvpurifyError) as info:
        build_classifier("googlenet")
    message = str(info.value)
    assert "\n" not in message
    assert "--weights PATH" in message and "TORCH_HOME" in message and "internet" in message


def test_googlenet_download_with_wrong_hash_is_refused(
    tmp_path, googlenet_state, monkeypatch, serve
):
    folder, base, _ = serve
    name = _publish(folder, googlenet_state, name_hash="00000000")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(GoogLeNet_Weights.IMAGENET1K_V1.value, "url", f"{base}/{name}")
    with pytest.raises(ClassifierError, match="hash"):
        build_classifier("googlenet")


def test_weights_file_of_another_architecture_is_refused(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(ClassifierError, match="bad.pth"):
        build_classifier("googlenet", weights=bad)
    with pytest.raises(ClassifierError, match="tensors"):
        build_classifier("efficientnet-lite0", weights=bad)
    with pytest.raises(AdvpurifyError, match="missing.pth: no such weights file"):
        build_classifier("googlenet", weights=tmp_path / "missing.pth")


def test_map_by_order_checks_shapes():
    target = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    mapped = map_by_order({"x": torch.ones(2, 3), "y": torch.ones(4)}, target, "file")
    assert list(mapped) == ["a", "b"]
    with pytest.raises(ClassifierError, match="shape"):
        map_by_order({"x": torch.ones(3, 2), "y": torch.ones(4)}, target, "file")


def test_unknown_classifier_and_backend():
    with pytest.raises(ClassifierError, match="unknown classifier"):
        build_classifier("no-such-net")
    with pytest.raises(ClassifierError, match="timm has no model"):
        build_classifier("timm:no-such-net")
    with pytest.raises(BackendError, match="unknown backend 'no-such-backend'"):
        load_classifier("googlenet", backend="no-such-backend", weights="random")


def test_preprocessing_matches_torchvision_transforms():
    """Resize 256 (antialiased) + centre crop 224, as torchvision's v2 transforms on tensors."""
    x = torch.rand(1, 3, 300, 411, generator=torch.Generator().manual_seed(3))
    ours = resize_center_crop(x, 256, 224, "bilinear")
    theirs = v2.CenterCrop(224)(v2.Resize(256, antialias=True)(x))
    assert ours.shape == (1, 3, 224, 224)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_classifier_resizes_other_sizes_and_keeps_224(googlenet_state, tmp_path):
    path = tmp_path / "g.pth"
    torch.save(googlenet_state, path)
    clf = load_classifier("googlenet", weights=path)
    big = torch.rand(2, 3, 300, 260, generator=torch.Generator().manual_seed(4))
    crop = clf.prepare(big)
    assert crop.shape == (2, 3, 224, 224)
    assert clf.prepare(crop) is crop
    torch.testing.assert_close(clf.logits(big), clf.logits(crop))
    assert clf.logits(big, batch_size=1).shape == (2, 1000)
    # Inference runs on a runtime backend; the module stays differentiable for attacks.
    assert isinstance(clf.runner, TorchBackend) and clf.backend == "torch"
    x = crop.clone().requires_grad_(True)
    clf.module(x)[:, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not clf.logits(crop).requires_grad


def test_the_one_resize_crop_arithmetic_is_what_folder_classification_uses():
    from advpurify.evaluation.classify import Preprocess

    prepare = Preprocess(256, 224, "bilinear")
    for height, width in [(300, 411), (411, 300), (256, 256), (500, 333), (224, 225)]:
        assert prepare.sizes(height, width) == resize_crop_box(height, width, 256, 224)
        x = torch.rand(1, 3, height, width)
        expected = v2.CenterCrop(224)(v2.Resize(256, antialias=True)(x))
        torch.testing.assert_close(resize_center_crop(x, 256, 224), expected, atol=1e-5, rtol=0)
    assert prepare.sizes(224, 224) == (224, 224, 0, 0)  # an attacked crop is used as is


def test_imagenet_classes_are_sorted_wnids(data_dir):
    assert len(wnids()) == 1000 and list(wnids()) == sorted(wnids())
    rows = (data_dir / "imagenet_classes.tsv").read_text().splitlines()[1:]
    for row in rows[::97]:
        index, wnid, _ = row.split("\t")
        assert wnids()[int(index)] == wnid
    assert class_name(0) == "tench" and class_name(torch.tensor(999)) == "toilet tissue"
    for outside in (1000, -1):  # -1 would otherwise name class 999
        with pytest.raises(IndexError, match=f"class index {outside} is outside 0..999"):
            class_name(outside)


def test_labels_from_file_name_folder_and_csv(tmp_path):
    root = tmp_path / "data"
    a = root / "n01440764_tench.png"
    b = root / "val" / "n01443537" / "x.jpg"
    c = root / "misc" / "photo.jpg"
    assert label_from_path(a, root) == 0
    assert label_from_path(b, root) == 1
    assert label_from_path(c, root) is None
    assert resolve_labels([a, b], root).source == SOURCE_PATH
    assert resolve_labels([c], root) == resolve_labels([c], root)
    assert resolve_labels([c], root).source == SOURCE_CLEAN
    with pytest.raises(LabelError, match="1 of 2"):
        resolve_labels([a, c], root)

    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("path,label\nmisc/photo.jpg,n01443537\nval/n01443537/x.jpg,7\n")
    assert read_labels_csv(csv_path) == {"misc/photo.jpg": 1, "val/n01443537/x.jpg": 7}
    resolved = resolve_labels([c, b], root, csv_path)
    assert resolved.source == SOURCE_CSV and resolved.indices == [1, 7]
    with pytest.raises(LabelError, match="no label for n01440764_tench.png"):
        resolve_labels([a], root, csv_path)


@pytest.mark.parametrize(
    "value, match",
    [
        ("1000", "outside 0..999"),
        ("-1", "outside"),
        ("n99999999", "not one of"),
        ("cat", "neither"),
    ],
)
def test_labels_outside_the_1000_classes_are_refused(tmp_path, value, match):
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(f"a.png,3\nb.png,{value}\n")
    with pytest.raises(LabelError, match=match) as info:
        read_labels_csv(csv_path)
    assert "line 2" in str(info.value)


@pytest.mark.parametrize(
    "content",
    [
        b"\xef\xbb\xbfa.jpg,1\nb.jpg,2\n",  # Excel's "CSV UTF-8": a byte-order mark first
        b"\xef\xbb\xbfpath,label\na.jpg,1\nb.jpg,2\n",
        b"# exported 2026-11-26\npath,label\na.jpg,1\nb.jpg,2\n",  # a header after a comment
    ],
)
def test_labels_csv_with_a_bom_or_a_commented_header(tmp_path, content):
    csv_path = tmp_path / "labels.csv"
    csv_path.write_bytes(content)
    assert read_labels_csv(csv_path) == {"a.jpg": 1, "b.jpg": 2}


def test_labels_csv_header_only_before_the_first_label(tmp_path):
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("a.jpg,1\npath,label\n")
    with pytest.raises(LabelError, match="line 2"):
        read_labels_csv(csv_path)


def test_labels_csv_refuses_a_path_labelled_twice_and_reads_a_negative_first_label(tmp_path):
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("a.jpg,8\nb.jpg,3\na.jpg,9\n")
    with pytest.raises(LabelError, match=r"line 3: a.jpg is labelled twice \(8 and 9\)"):
        read_labels_csv(csv_path)
    csv_path.write_text("a.jpg,8\na.jpg,8\n")  # the same twice: harmless
    assert read_labels_csv(csv_path) == {"a.jpg": 8}
    csv_path.write_text("a.jpg,-1\nb.jpg,2\n")
    with pytest.raises(LabelError, match="line 1"):
        read_labels_csv(csv_path)


def test_random_googlenet_depends_on_its_input_and_stays_out_of_denormals():
    # torchvision's std-0.01 initialisation gave every image the same logits, computed in
    # denormal floats (100x slower on a CPU): a parity check and a benchmark of nothing.
    net = build_classifier("googlenet", weights="random")
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = net(images)
        again = build_classifier("googlenet", weights="random")(images)
    assert (logits[0] - logits[1]).abs().max() > 1e-2
    assert logits.abs().max() > 1e-3 and torch.equal(logits, again)  # the same random weights
