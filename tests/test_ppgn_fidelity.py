"""PPGN as the published code has it: layer lists from its prototxts, the ILSVRC mean image,
Caffe's centre crop, an antialiased input resize and the annealed step size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from advpurify.models.caffe_pixels import MEAN_SIZE, mean_image
from advpurify.models.caffenet import INPUT_SIZE, CaffeNetFc6, build_encoder
from advpurify.models.deepsim import (
    DECONVS,
    FCS,
    NEGATIVE_SLOPE,
    DeePSiMGenerator,
    build_generator,
    center_crop,
)
from advpurify.purifiers import create_purifier
from advpurify.weights.prototxt import read_prototxt


def _layers(path: Path) -> list:
    return read_prototxt(path).all("layer")


def assert_conv_matches(conv: nn.Conv2d | nn.ConvTranspose2d, param, name: str) -> None:
    """The layer's shape is the prototxt's ``convolution_param`` (Caffe's defaults filled in)."""
    assert conv.out_channels == param.get1("num_output"), name
    assert conv.kernel_size == (param.get1("kernel_size"),) * 2, name
    assert conv.stride == (param.get1("stride", 1),) * 2, name
    assert conv.padding == (param.get1("pad", 0),) * 2, name


def test_generator_layers_match_generator_prototxt(data_dir: Path) -> None:
    layers = _layers(data_dir / "ppgn" / "generator.prototxt")
    weighted = [(x.get1("name"), x.get1("type")) for x in layers if x.get1("type") != "ReLU"]
    ours = [(n, "InnerProduct") for n in FCS] + [(d[0], "Deconvolution") for d in DECONVS]
    assert [w for w in weighted if w[1] != "Reshape"] == ours
    assert ("reshape", "Reshape") in weighted

    model = DeePSiMGenerator()
    for layer in layers:
        name, kind = layer.get1("name"), layer.get1("type")
        if kind == "InnerProduct":
            fc = getattr(model, name)
            assert fc.out_features == layer.get1("inner_product_param").get1("num_output")
        elif kind == "Deconvolution":
            assert_conv_matches(getattr(model, name), layer.get1("convolution_param"), name)
        elif kind == "ReLU":
            assert layer.get1("relu_param").get1("negative_slope") == NEGATIVE_SLOPE
        elif kind == "Reshape":
            dims = layer.get1("reshape_param").get1("shape").all("dim")
            assert dims[1:] == [256, 4, 4]
    # A LeakyReLU after every weighted layer but the last (deconv0 is linear).
    relu_inputs = [x.get1("bottom") for x in layers if x.get1("type") == "ReLU"]
    assert relu_inputs == [*FCS, *(d[0] for d in DECONVS[:-1])]


def test_encoder_layers_match_caffenet_prototxt(data_dir: Path) -> None:
    net = read_prototxt(data_dir / "ppgn" / "caffenet.prototxt")
    assert net.get1("input_shape").all("dim")[2:] == [INPUT_SIZE, INPUT_SIZE]
    layers = _layers(data_dir / "ppgn" / "caffenet.prototxt")
    names = [x.get1("name") for x in layers]
    upto_fc6 = names[: names.index("relu6") + 1]
    assert upto_fc6 == [
        "conv1", "relu1", "pool1", "norm1", "conv2", "relu2", "pool2", "norm2", "conv3", "relu3",
        "conv4", "relu4", "conv5", "relu5", "pool5", "fc6", "relu6",
    ]  # fmt: skip
    model = CaffeNetFc6()
    for layer in layers[: len(upto_fc6)]:
        name, kind = layer.get1("name"), layer.get1("type")
        if kind == "Convolution":
            param = layer.get1("convolution_param")
            assert_conv_matches(getattr(model, name), param, name)
            assert getattr(model, name).groups == param.get1("group", 1), name
        elif kind == "Pooling":
            param = layer.get1("pooling_param")
            assert param.get1("pool") == "MAX"
            assert model.pool.kernel_size == param.get1("kernel_size")
            assert model.pool.stride == param.get1("stride")
        elif kind == "LRN":
            param = layer.get1("lrn_param")
            assert model.norm.size == param.get1("local_size")
            assert model.norm.alpha == pytest.approx(param.get1("alpha"))
            assert model.norm.beta == pytest.approx(param.get1("beta"))
        elif kind == "InnerProduct":
            assert model.fc6.out_features == layer.get1("inner_product_param").get1("num_output")


def test_packaged_mean_image_equals_the_mat_file(shared_data: Path) -> None:
    from scipy.io import loadmat

    original = loadmat(shared_data / "ppgn" / "ilsvrc_2012_mean.mat")["image_mean"]
    assert original.shape == (MEAN_SIZE, MEAN_SIZE, 3)
    ours = mean_image().squeeze(0).permute(1, 2, 0).numpy()
    assert np.abs(ours - original).max() <= 0.0625  # float16 storage
    # E sees the 227 centre, cropped at (256 - 227) // 2 = 14 as Caffe's transformer does.
    crop = original[14:241, 14:241]
    encoder_mean = build_encoder("random").mean.squeeze(0).permute(1, 2, 0).numpy()
    assert np.abs(encoder_mean - crop).max() <= 0.0625


def test_mean_image_is_bgr_and_varies() -> None:
    mean = mean_image()
    # The per-channel averages Caffe's examples quote (B 104.0, G 116.7, R 122.7) ...
    torch.testing.assert_close(
        mean.mean((0, 2, 3)), torch.tensor([104.0, 116.7, 122.7]), atol=0.1, rtol=0
    )
    # ... but an image, not a constant: several grey levels across it.
    assert float(mean.amax() - mean.amin()) > 20


def test_generator_crop_is_caffes_centre_crop() -> None:
    images = torch.arange(256.0).expand(1, 3, 256, 256)  # column index as the pixel value
    crop = center_crop(images)
    assert crop.shape[-2:] == (227, 227)
    assert float(crop[0, 0, 0, 0]) == 14.0 and float(crop[0, 0, 0, -1]) == 240.0


def test_encoder_resize_is_antialiased() -> None:
    # A one-pixel checkerboard four times E's input size: averaged, it is flat grey; sampled
    # without antialiasing it would alias into a pattern of its own.
    board = (torch.arange(4 * INPUT_SIZE)[:, None] + torch.arange(4 * INPUT_SIZE)) % 2
    images = board.float().expand(1, 3, -1, -1)
    encoder = build_encoder("random")
    pixels = encoder.preprocess(images) + encoder.mean  # back to 0..255, BGR
    assert float((pixels - 127.5).abs().max()) < 1.0


def _photo(small_real_images: torch.Tensor) -> torch.Tensor:
    return small_real_images[:2]


def test_step_size_anneals_and_each_step_moves_h_by_it(small_real_images) -> None:
    purifier = create_purifier("ppgn", steps=4, weights="random", eps3=0.0)
    assert purifier.settings.lr_end == 0.0  # annealed by default
    assert [purifier.step_size(t) for t in range(4)] == [0.5, 0.375, 0.25, 0.125]
    generator, encoder = purifier.models(torch.device("cpu"))
    images = _photo(small_real_images)
    target = encoder.preprocess(images)
    h = encoder.caffe(target).clamp(0, 30)
    for lr in (0.5, 0.125):
        moved, _, _ = purifier._step(h, target, generator, encoder, None, lr)
        inside = (moved > 0) & (moved < 30)  # not clipped
        step = (moved - h).abs()
        # Normalised by mean |d_h|: the unclipped elements move by lr on average.
        assert float(step[inside].mean()) == pytest.approx(lr, rel=0.25)

    constant = create_purifier("ppgn", steps=4, weights="random", eps3=0.0, lr_end=0.5)
    assert [constant.step_size(t) for t in range(4)] == [0.5] * 4


def test_sampler_run_reports_term_magnitudes(small_real_images) -> None:
    images = _photo(small_real_images)
    purifier = create_purifier("ppgn", steps=3, weights="random", eps3=0.0)
    out = purifier(images, seeds=[1, 2])
    run = purifier.last_run
    assert out.shape == images.shape
    assert run.prior_magnitude.shape == run.data_magnitude.shape == (3, 2)
    assert (run.prior_magnitude > 0).all() and (run.data_magnitude > 0).all()
    # Step 0's prior term, computed here independently: eps1 * mean |E(G(h0)) - h0|.
    generator, encoder = purifier.models(torch.device("cpu"))
    with torch.no_grad():
        h0 = encoder.caffe(encoder.preprocess(images)).clamp(0, 30)
        prior0 = 1e-5 * (encoder.caffe(center_crop(generator.caffe(h0))) - h0).abs().mean(1)
    torch.testing.assert_close(run.prior_magnitude[0], prior0, rtol=1e-4, atol=0)

    no_data = create_purifier("ppgn", steps=2, weights="random", eps3=0.0, data_weight=0.0)
    no_data(images, seeds=[1, 2])
    assert torch.equal(no_data.last_run.data_magnitude, torch.zeros(2, 2))


def test_generator_output_adds_the_mean_image() -> None:
    generator = build_generator("random")
    codes = torch.zeros(1, 4096)
    with torch.no_grad():
        raw = generator.caffe(codes)
        rgb = generator(codes)
    expected = ((raw + mean_image()) / 255).clamp(0, 1).flip(1)
    torch.testing.assert_close(rgb, expected)
