"""The .caffemodel reader and the Caffe -> torch mapping, checked against OpenCV's own reader."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from advpurify.models.caffenet import build_encoder
from advpurify.models.deepsim import DECONVS, FCS, build_generator
from advpurify.models.deepsim import convert_weights as convert_generator
from advpurify.weights import WeightsError
from advpurify.weights.caffe import (
    CaffeFormatError,
    blobs_state_dict,
    encode_caffemodel,
    read_caffemodel,
    write_caffemodel,
)
from advpurify.weights.caffe_net import CaffeNetwork, convert_caffe
from advpurify.weights.prototxt import parse_prototxt

LENET_LAYERS = {"conv1": [(20, 1, 5, 5), (20,)], "conv2": [(50, 20, 5, 5), (50,)],
                "ip1": [(500, 800), (500,)], "ip2": [(10, 500), (10,)]}  # fmt: skip


@pytest.fixture(scope="module")
def lenet(data_dir: Path) -> tuple[Path, Path]:
    folder = data_dir / "fixtures" / "caffe"
    return folder / "lenet.prototxt", folder / "lenet_iter_10000.caffemodel"


@pytest.fixture(scope="module")
def digits(sample_paths: list[Path]) -> np.ndarray:
    """Eight 28x28 single-channel inputs in [0, 1]: four real photographs, four noise."""
    from PIL import Image

    real = []
    for path in sample_paths[:4]:
        with Image.open(path) as img:
            real.append(np.asarray(img.convert("L").resize((28, 28)), np.float32) / 255.0)
    noise = np.random.default_rng(0).random((4, 28, 28), dtype=np.float32)
    return np.concatenate([np.stack(real), noise])[:, None]


def _opencv(prototxt: Path, caffemodel: Path, x: np.ndarray, output: str) -> np.ndarray:
    net = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
    net.setInput(np.ascontiguousarray(x, dtype=np.float32))
    return net.forward(output)


def test_reads_real_lenet_blobs(lenet):
    model = read_caffemodel(lenet[1])
    assert model.name == "LeNet" and not model.v1
    shapes = {name: [b.data.shape for b in blobs] for name, blobs in model.blobs().items()}
    assert shapes == LENET_LAYERS
    assert all(np.isfinite(b.data).all() for blobs in model.blobs().values() for b in blobs)


@pytest.mark.parametrize("output", ["ip2", "prob"])
def test_lenet_matches_opencv(lenet, digits, output):
    net = CaffeNetwork.from_files(*lenet, outputs=[output])
    with torch.no_grad():
        ours = net(torch.from_numpy(digits)).numpy()
    reference = _opencv(*lenet, digits, output)
    assert ours.shape == reference.shape == (8, 10)
    assert np.abs(ours - reference).max() < 1e-4
    if output == "ip2":
        assert np.abs(reference).max() > 1.0  # the comparison is not between near-zeros


def test_convert_to_safetensors_runs_the_same(lenet, digits, tmp_path):
    count, path = convert_caffe(*lenet, tmp_path / "lenet.safetensors")
    from safetensors.torch import load_file

    state = load_file(str(path))
    assert count == 8 and sorted(state) == sorted(
        f"{name}.{i}" for name in LENET_LAYERS for i in range(2)
    )
    from_caffe = CaffeNetwork.from_files(*lenet, outputs=["ip2"])
    from_safetensors = CaffeNetwork.from_files(lenet[0], path, outputs=["ip2"])
    x = torch.from_numpy(digits)
    with torch.no_grad():
        assert torch.equal(from_caffe(x), from_safetensors(x))


def test_v1_layer_format_reads_the_same(lenet, tmp_path):
    new = read_caffemodel(lenet[1])
    layers = [(layer.name, layer.type, [b.data for b in layer.blobs]) for layer in new.layers
              if layer.type in ("Convolution", "InnerProduct", "Pooling", "ReLU")]  # fmt: skip
    path = write_caffemodel(tmp_path / "lenet_v1.caffemodel", layers, name="LeNet", v1=True)
    old = read_caffemodel(path)
    assert old.v1 and [layer.type for layer in old.layers] == [t for _, t, _ in layers]
    # V1 files carry 4-D legacy shapes (1 x 1 x 500 x 800); the torch network fits them.
    assert old.layer("ip1").blobs[0].data.shape == (1, 1, 500, 800)
    assert old.layer("ip1").blobs[0].legacy
    a, b = blobs_state_dict(new), blobs_state_dict(old)
    assert all(torch.equal(a[k].flatten(), b[k].flatten()) for k in a)
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        ours = CaffeNetwork.from_files(lenet[0], path, outputs=["ip2"])(x)
        reference = CaffeNetwork.from_files(*lenet, outputs=["ip2"])(x)
    assert torch.equal(ours, reference)


def test_malformed_files_are_refused_by_name(lenet, tmp_path):
    data = lenet[1].read_bytes()
    truncated = tmp_path / "truncated.caffemodel"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CaffeFormatError, match="truncated.caffemodel"):
        read_caffemodel(truncated)
    text = tmp_path / "text.caffemodel"
    text.write_bytes(b"this is not a protobuf message at all")
    with pytest.raises(WeightsError, match="text.caffemodel"):
        read_caffemodel(text)


def test_prototxt_parser():
    msg = parse_prototxt(
        """
        name: "net"  # a comment
        input: "data" input_dim: 1 input_dim: 3
        layer { name: "c" type: "Convolution"
          convolution_param { num_output: 8 kernel_size: 3 pad: 1 weight_filler { type: 'x' } }
          include: { phase: TEST } }
        layer < name: "r" type: "ReLU" relu_param { negative_slope: 0.3 } >
        shape { dim: [1, 2, 3] }
        """
    )
    assert msg.get1("name") == "net" and msg.all("input_dim") == [1, 3]
    conv, relu = msg.all("layer")
    assert conv.get1("convolution_param").get1("num_output") == 8
    assert conv.get1("include").get1("phase") == "TEST"
    assert relu.get1("relu_param").get1("negative_slope") == pytest.approx(0.3)
    assert msg.get1("shape").all("dim") == [1, 2, 3]


# ------------------------------------------------------ DeePSiM G and CaffeNet E vs OpenCV

GENERATOR_PROTOTXT = ["input: 'feat'", "input_shape { dim: 1 dim: 4096 }"]
_bottom = "feat"
for _name in FCS:
    GENERATOR_PROTOTXT += [
        f"layer {{ name: '{_name}' type: 'InnerProduct' bottom: '{_bottom}' top: '{_name}' "
        f"inner_product_param {{ num_output: 4096 }} }}",
        f"layer {{ name: 'relu_{_name}' type: 'ReLU' bottom: '{_name}' top: '{_name}' "
        f"relu_param {{ negative_slope: 0.3 }} }}",
    ]
    _bottom = _name
GENERATOR_PROTOTXT.append(
    "layer { name: 'reshape' type: 'Reshape' bottom: 'defc5' top: 'reshape_defc5' "
    "reshape_param { shape { dim: 0 dim: 256 dim: 4 dim: 4 } } }"
)
_bottom = "reshape_defc5"
for _name, _cin, _cout, _k, _s, _p in DECONVS:
    GENERATOR_PROTOTXT.append(
        f"layer {{ name: '{_name}' type: 'Deconvolution' bottom: '{_bottom}' top: '{_name}' "
        f"convolution_param {{ num_output: {_cout} kernel_size: {_k} stride: {_s} pad: {_p} }} }}"
    )
    if _name != "deconv0":
        GENERATOR_PROTOTXT.append(
            f"layer {{ name: 'relu_{_name}' type: 'ReLU' bottom: '{_name}' top: '{_name}' "
            f"relu_param {{ negative_slope: 0.3 }} }}"
        )
    _bottom = _name

CAFFENET_PROTOTXT = """
input: "data"
input_shape { dim: 1 dim: 3 dim: 227 dim: 227 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 96 kernel_size: 11 stride: 4 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "norm1" type: "LRN" bottom: "pool1" top: "norm1"
  lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 } }
layer { name: "conv2" type: "Convolution" bottom: "norm1" top: "conv2"
  convolution_param { num_output: 256 pad: 2 kernel_size: 5 group: 2 } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "norm2" type: "LRN" bottom: "pool2" top: "norm2"
  lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 } }
layer { name: "conv3" type: "Convolution" bottom: "norm2" top: "conv3"
  convolution_param { num_output: 384 pad: 1 kernel_size: 3 } }
layer { name: "relu3" type: "ReLU" bottom: "conv3" top: "conv3" }
layer { name: "conv4" type: "Convolution" bottom: "conv3" top: "conv4"
  convolution_param { num_output: 384 pad: 1 kernel_size: 3 group: 2 } }
layer { name: "relu4" type: "ReLU" bottom: "conv4" top: "conv4" }
layer { name: "conv5" type: "Convolution" bottom: "conv4" top: "conv5"
  convolution_param { num_output: 256 pad: 1 kernel_size: 3 group: 2 } }
layer { name: "relu5" type: "ReLU" bottom: "conv5" top: "conv5" }
layer { name: "pool5" type: "Pooling" bottom: "conv5" top: "pool5"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "fc6" type: "InnerProduct" bottom: "pool5" top: "fc6"
  inner_product_param { num_output: 4096 } }
layer { name: "relu6" type: "ReLU" bottom: "fc6" top: "fc6" }
"""


def _caffe_files(tmp: Path, name: str, prototxt: str, model, types: dict[str, str]):
    """Write ``model``'s random weights as a Caffe prototxt + caffemodel pair."""
    state = model.state_dict()
    layers = []
    for layer, kind in types.items():
        blobs = [state[f"{layer}.weight"].numpy(), state[f"{layer}.bias"].numpy()]
        layers.append((layer, kind, blobs))
    (tmp / f"{name}.prototxt").write_text(prototxt)
    write_caffemodel(tmp / f"{name}.caffemodel", layers, name=name)
    return tmp / f"{name}.prototxt", tmp / f"{name}.caffemodel"


def _close(ours: np.ndarray, reference: np.ndarray) -> None:
    scale = float(np.abs(reference).max())
    assert scale > 1.0, "outputs too small for a meaningful comparison"
    assert float(np.abs(ours - reference).max()) <= 1e-5 * scale + 1e-5


def test_generator_matches_opencv_on_a_caffe_file(tmp_path):
    model = build_generator("random", seed=1)
    types = {name: "InnerProduct" for name in FCS}
    types.update({name: "Deconvolution" for name, *_ in DECONVS})
    prototxt, caffemodel = _caffe_files(
        tmp_path, "generator", "\n".join(GENERATOR_PROTOTXT), model, types
    )
    codes = torch.rand(1, 4096, generator=torch.Generator().manual_seed(0)) * 8
    with torch.no_grad():
        ours = model.caffe(codes).numpy()
        loaded = build_generator(caffemodel)  # through the converter, shape-checked
        again = loaded.caffe(codes).numpy()
        generic = CaffeNetwork.from_files(prototxt, caffemodel)(codes).numpy()
    reference = _opencv(prototxt, caffemodel, codes.numpy(), "deconv0")
    assert ours.shape == reference.shape == (1, 3, 256, 256)
    _close(ours, reference)
    np.testing.assert_array_equal(ours, again)
    _close(generic, reference)


def test_encoder_matches_opencv_on_a_caffe_file(tmp_path, small_real_images):
    model = build_encoder("random", seed=2)
    types = {f"conv{i}": "Convolution" for i in range(1, 6)} | {"fc6": "InnerProduct"}
    prototxt, caffemodel = _caffe_files(tmp_path, "caffenet", CAFFENET_PROTOTXT, model, types)
    images = model.preprocess(small_real_images[:2])  # real photographs, Caffe pixel space
    with torch.no_grad():
        ours = model.caffe(images).numpy()
        again = build_encoder(caffemodel).caffe(images).numpy()
    reference = np.concatenate(
        [_opencv(prototxt, caffemodel, images[i : i + 1].numpy(), "relu6") for i in range(2)]
    )
    assert ours.shape == reference.shape == (2, 4096)
    assert (reference >= 0).all() and (reference > 0).mean() > 0.05
    _close(ours, reference)
    np.testing.assert_array_equal(ours, again)


def test_wrong_layer_shapes_are_refused_with_expected_and_found(tmp_path):
    bad = tmp_path / "bad_generator.caffemodel"
    bad.write_bytes(encode_caffemodel([("deconv0", "Deconvolution", [
        np.zeros((32, 4, 4, 4), np.float32), np.zeros(4, np.float32)])]))  # fmt: skip
    with pytest.raises(WeightsError) as info:
        convert_generator(bad)
    message = str(info.value)
    assert "bad_generator.caffemodel" in message
    assert "defc7.weight, defc7.bias, defc6.weight, defc6.bias and 18 more missing" in message
    assert "deconv0.weight shape (32, 4, 4, 4), expected (32, 3, 4, 4)" in message
    assert "\n" not in message
