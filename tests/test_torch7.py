"""Torch7 reading (real fixture files) and the Context Encoder import, cross-checked with OpenCV."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from advpurify.models.context_encoder import (
    MODEL_NAME,
    ContextEncoder,
    convert_t7,
    generator_from_t7,
    load_generator,
)
from advpurify.weights.torch7 import Torch7Error, describe, read_t7

# ------------------------------------------------------------------ a minimal Torch7 writer
# torchfile only reads; these tests need .t7 files of a known network, written in the binary
# format of torch7's File:writeObject (little endian, "V 1" class versions).


class T7Module:
    def __init__(self, cls: str, **fields) -> None:
        self.cls, self.fields = cls, fields


class _Writer:
    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.index = 0

    def _int(self, value: int) -> None:
        self.out.write(struct.pack("<i", value))

    def _long(self, value: int) -> None:
        self.out.write(struct.pack("<q", value))

    def _string(self, text: str) -> None:
        data = text.encode()
        self._int(len(data))
        self.out.write(data)

    def _new_index(self) -> None:
        self.index += 1
        self._int(self.index)

    def _header(self, cls: str) -> None:
        self._int(4)  # TYPE_TORCH
        self._new_index()
        self._string("V 1")
        self._string(cls)

    def write(self, value) -> None:
        if value is None:
            self._int(0)
        elif isinstance(value, bool):
            self._int(5)
            self._int(int(value))
        elif isinstance(value, (int, float)):
            self._int(1)
            self.out.write(struct.pack("<d", float(value)))
        elif isinstance(value, str):
            self._int(2)
            self._string(value)
        elif isinstance(value, np.ndarray):
            kind = {np.dtype(np.float32): "Float", np.dtype(np.float64): "Double"}[value.dtype]
            value = np.ascontiguousarray(value)
            self._header(f"torch.{kind}Tensor")
            self._int(value.ndim)
            for dim in value.shape:
                self._long(dim)
            for stride in value.strides:
                self._long(stride // value.itemsize)
            self._long(1)  # storage offset, 1-based
            self._header(f"torch.{kind}Storage")
            self._long(value.size)
            self.out.write(value.tobytes())
        elif isinstance(value, T7Module):
            self._header(value.cls)
            self.write(value.fields)
        elif isinstance(value, list):
            self.write({i + 1: item for i, item in enumerate(value)})
        elif isinstance(value, dict):
            self._int(3)  # TYPE_TABLE
            self._new_index()
            self._int(len(value))
            for key, item in value.items():
                self.write(key)
                self.write(item)
        else:
            raise TypeError(type(value))


def write_t7(path: Path, value) -> Path:
    writer = _Writer()
    writer.write(value)
    path.write_bytes(writer.out.getvalue())
    return path


def _conv(rng, cin, cout, k, s, p, full=False, bias=False):
    shape = (cin, cout, k, k) if full else (cout, cin, k, k)
    fields = dict(
        nInputPlane=cin,
        nOutputPlane=cout,
        kW=k,
        kH=k,
        dW=s,
        dH=s,
        padW=p,
        padH=p,
        weight=rng.normal(0, 0.1, size=shape).astype(np.float32),
        train=False,
    )
    if full:
        fields.update(adjW=0, adjH=0)
    if bias:
        fields["bias"] = rng.normal(0, 0.1, size=cout).astype(np.float32)
    return T7Module("nn.SpatialFullConvolution" if full else "nn.SpatialConvolution", **fields)


def _bn(rng, n, old_std=False):
    var = rng.uniform(0.5, 2.0, size=n).astype(np.float32)
    fields = dict(
        running_mean=rng.normal(0, 0.2, size=n).astype(np.float32),
        weight=rng.normal(1, 0.1, size=n).astype(np.float32),
        bias=rng.normal(0, 0.1, size=n).astype(np.float32),
        eps=1e-5,
        momentum=0.1,
        affine=True,
        train=False,
    )
    if old_std:
        fields["running_std"] = (1 / np.sqrt(var + 1e-5)).astype(np.float32)
    else:
        fields["running_var"] = var
    return T7Module("nn.SpatialBatchNormalization", **fields)


def reference_netG(nef=8, ngf=8, bottleneck=32, seed=0, old_std=False, bottleneck_bias=True):
    """netG as the reference train.lua builds it: netE nested in an nn.Sequential."""
    rng = np.random.default_rng(seed)

    def lrelu():
        return T7Module("nn.LeakyReLU", negval=0.2, inplace=True, train=False)

    def relu():
        return T7Module("nn.ReLU", inplace=True, train=False)

    encoder = [_conv(rng, 3, nef, 4, 2, 1, bias=True), lrelu()]
    for cin, cout in ((nef, nef), (nef, nef * 2), (nef * 2, nef * 4), (nef * 4, nef * 8)):
        encoder += [_conv(rng, cin, cout, 4, 2, 1), _bn(rng, cout, old_std), lrelu()]
    # A bias on the bottleneck conv exercises the fold into the following batch norm.
    encoder.append(_conv(rng, nef * 8, bottleneck, 4, 1, 0, bias=bottleneck_bias))
    net_e = T7Module("nn.Sequential", modules=encoder, train=False)
    decoder = [net_e, _bn(rng, bottleneck, old_std), lrelu()]
    decoder += [_conv(rng, bottleneck, ngf * 8, 4, 1, 0, full=True), _bn(rng, ngf * 8), relu()]
    for cin, cout in ((ngf * 8, ngf * 4), (ngf * 4, ngf * 2), (ngf * 2, ngf)):
        decoder += [_conv(rng, cin, cout, 4, 2, 1, full=True), _bn(rng, cout), relu()]
    decoder += [_conv(rng, ngf, 3, 4, 2, 1, full=True), T7Module("nn.Tanh", train=False)]
    return T7Module("nn.Sequential", modules=decoder, train=False)


class _OpenCVLeakyReLU:
    """OpenCV's Torch importer parses nn.LeakyReLU but has no layer for it: supply one."""

    def __init__(self, params, blobs) -> None:
        self.slope = float(params["negval"])

    def getMemoryShapes(self, inputs):  # noqa: N802 (OpenCV's name)
        return inputs

    def forward(self, inputs):
        x = inputs[0]
        return [np.where(x > 0, x, x * self.slope).astype(np.float32)]


# ------------------------------------------------------------------ the real fixture files


@pytest.fixture(scope="module")
def t7_dir(data_dir: Path) -> Path:
    return data_dir / "fixtures" / "torch7"


def test_float_tensor_fixture_matches_opencv_and_raw_bytes(t7_dir: Path) -> None:
    path = t7_dir / "floattensor.t7"
    tensor = read_t7(path)
    assert isinstance(tensor, np.ndarray)
    assert tensor.dtype == np.float32 and tensor.shape == (2, 3, 4)
    # OpenCV's independent Torch7 reader gives the same values.
    np.testing.assert_array_equal(tensor, cv2.dnn.readTorchBlob(str(path)))
    # The storage is the file's last 24 floats, in row-major order.
    raw = np.frombuffer(path.read_bytes()[-24 * 4 :], dtype="<f4").reshape(2, 3, 4)
    np.testing.assert_array_equal(tensor, raw)
    assert 0.0 <= tensor.min() and tensor.max() <= 1.0


def test_gmodule_fixture_reads_linear_layer(t7_dir: Path) -> None:
    path = t7_dir / "gmodule_with_linear_identity.t7"
    module = read_t7(path)
    summary = describe(module)
    # mod = nn.gModule({a, b}, {nn.CAddTable(){b, nn.Linear(1, 2)(a)}})
    assert [name for name, _ in summary] == [
        "nn.Identity",
        "nn.Identity",
        "nn.Linear",
        "nn.CAddTable",
    ]
    linear = module.modules[2]
    weight, bias = linear.weight, linear.bias
    assert summary[2][1]["weight"] == (2, 1) and summary[2][1]["bias"] == (2,)
    assert weight.dtype == np.float64 and bias.dtype == np.float64
    # Values read back exactly: each parameter's doubles appear in the file as stored.
    data = path.read_bytes()
    assert data.find(weight.astype("<f8").tobytes()) > 0
    assert data.find(bias.astype("<f8").tobytes()) > 0
    # A Linear(1, 2) as torch computes it, from the values read: out = b + W a.
    layer = torch.nn.Linear(1, 2).double()
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight))
        layer.bias.copy_(torch.from_numpy(bias))
    a, b = torch.tensor([[2.0]], dtype=torch.float64), torch.tensor([[1.0, -1.0]]).double()
    expected = b.numpy() + weight[:, 0] * 2.0 + bias
    np.testing.assert_allclose((b + layer(a)).detach().numpy(), expected, rtol=1e-12)


def test_unreadable_file_is_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.t7"
    bad.write_bytes(b"\x04\x00\x00\x00garbage")
    with pytest.raises(Torch7Error, match="bad.t7: not a readable Torch7 file"):
        read_t7(bad)
    with pytest.raises(Torch7Error, match="no such file"):
        read_t7(tmp_path / "missing.t7")


# ------------------------------------------------------------------ context encoder import


@pytest.mark.parametrize("old_std", [False, True])
def test_generator_import_matches_opencv(tmp_path: Path, old_std: bool) -> None:
    path = write_t7(tmp_path / "netG.t7", reference_netG(old_std=old_std))
    generator = generator_from_t7(read_t7(path), source=str(path))
    assert (generator.nef, generator.ngf, generator.bottleneck) == (8, 8, 32)

    rng = np.random.default_rng(1)
    context = rng.uniform(-1, 1, size=(2, 3, 128, 128)).astype(np.float32)
    with torch.no_grad():
        ours = generator(torch.from_numpy(context)).numpy()
    assert ours.shape == (2, 3, 64, 64)

    cv2.dnn_registerLayer("LeakyReLU", _OpenCVLeakyReLU)
    try:
        net = cv2.dnn.readNetFromTorch(str(path))
        net.setInput(context)
        theirs = net.forward()
    finally:
        cv2.dnn_unregisterLayer("LeakyReLU")
    assert theirs.shape == ours.shape
    np.testing.assert_allclose(ours, theirs, atol=2e-4)
    assert np.abs(ours).max() > 0.05  # a real signal, not saturated zeros


def test_import_writes_cache_and_purifier_uses_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ADVPURIFY_HOME", str(tmp_path / "home"))
    path = write_t7(tmp_path / "imagenet_inpaintCenter.t7", reference_netG(seed=3))
    cached = convert_t7(path)
    assert cached == tmp_path / "home" / "weights" / f"{MODEL_NAME}.safetensors"
    # The command users run does the same.
    from typer.testing import CliRunner

    from advpurify.cli import app

    cached.unlink()
    result = CliRunner().invoke(app, ["weights", "import", MODEL_NAME, str(path)])
    assert result.exit_code == 0, result.output
    assert cached.is_file()
    from safetensors import safe_open

    with safe_open(str(cached), "pt") as handle:
        assert handle.metadata()["file"] == "imagenet_inpaintCenter.t7"

    direct = ContextEncoder(generator_from_t7(read_t7(path))).eval()
    from_cache = ContextEncoder(load_generator(MODEL_NAME)).eval()
    from_t7 = ContextEncoder(load_generator(str(path))).eval()
    images = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        expected = direct(images)
        torch.testing.assert_close(from_cache(images), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(from_t7(images), expected, rtol=0, atol=1e-6)

    from advpurify.purifiers import create_purifier

    purifier = create_purifier("context-encoder")  # the default weights: the imported model
    out = purifier(torch.rand(1, 3, 96, 96))
    assert out.shape == (1, 3, 96, 96)


def test_wrong_architecture_is_refused(tmp_path: Path) -> None:
    net = reference_netG()
    net.fields["modules"] = net.fields["modules"][:-2]  # drop the last deconv and Tanh
    path = write_t7(tmp_path / "short.t7", net)
    with pytest.raises(Torch7Error, match="and 4 full convolutions, a context encoder has 6 and 5"):
        generator_from_t7(read_t7(path), source=str(path))

    net = reference_netG()
    net.fields["modules"][0].fields["modules"][2].fields["dW"] = 1  # a stride the model lacks
    path = write_t7(tmp_path / "stride.t7", net)
    with pytest.raises(Torch7Error, match="kernel/stride/padding"):
        generator_from_t7(read_t7(path), source=str(path))
