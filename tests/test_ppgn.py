"""PPGN: generator G, encoder E and the sampler, with random weights of the true shapes.

The real weights cannot be downloaded on the build machines; these tests check everything
that does not depend on their values. (test_caffe.py checks G and E against OpenCV's Caffe
implementation layer for layer.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from advpurify.models.caffenet import build_encoder
from advpurify.models.deepsim import DECONVS, FCS, build_generator, center_crop
from advpurify.purifiers import create_purifier
from advpurify.weights import WeightsError, WeightsNotFound, cached_path, import_file
from advpurify.weights.caffe import write_caffemodel


@pytest.fixture(scope="module")
def generator():
    return build_generator("random")


@pytest.fixture(scope="module")
def encoder():
    return build_encoder("random")


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ADVPURIFY_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def images(small_real_images) -> torch.Tensor:
    """Two real photographs at a size that is not the networks' own (48 x 64)."""
    return torch.nn.functional.interpolate(small_real_images[:2], size=(48, 64), mode="bilinear")


def test_generator_and_encoder_shapes(generator, encoder, small_real_images):
    assert sum(p.numel() for p in generator.parameters()) == 56_097_891  # "about 56 M"
    assert sum(p.numel() for p in encoder.parameters()) == 40_086_912
    codes = torch.rand(2, 4096) * 8
    with torch.no_grad():
        raw = generator.caffe(codes)
        image = generator(codes)
        features = encoder(small_real_images)  # 64 x 64 in, resized to 227 inside
    assert raw.shape == image.shape == (2, 3, 256, 256)
    assert center_crop(raw).shape == (2, 3, 227, 227)
    assert image.min() >= 0 and image.max() <= 1 and image.std() > 0.01
    assert features.shape == (4, 4096) and features.min() >= 0 and features.max() > 1
    # [0, 1] RGB <-> Caffe BGR: G's forward is the raw output plus the mean, channels flipped.
    expected = ((raw + generator.mean) / 255).clamp(0, 1).flip(1)
    torch.testing.assert_close(image, expected)


def test_gradient_flows_through_e_of_g(generator, encoder):
    codes = (torch.rand(1, 4096) * 8).requires_grad_(True)
    generator.zero_grad()
    encoder.caffe(center_crop(generator.caffe(codes))).sum().backward()
    assert torch.isfinite(codes.grad).all() and codes.grad.abs().sum() > 0
    for name in (*FCS, *(d[0] for d in DECONVS)):
        grad = getattr(generator, name).weight.grad
        assert grad is not None and grad.abs().sum() > 0, name
    generator.zero_grad()
    generator.requires_grad_(True)


def test_needs_seeds_and_is_attacked_through_bpda(images):
    """Stochastic: no seeds, no output (never the batch position); not differentiable: BPDA."""
    from advpurify.attacks import DefendedClassifier

    purifier = create_purifier("ppgn", steps=1, weights="random", eps3=1e-3)
    with pytest.raises(ValueError, match="stochastic: pass one seed per image"):
        purifier(images[:1])
    model = DefendedClassifier(purifier, torch.nn.Flatten(), seeds=[3])
    assert model.backward == "bpda"
    with pytest.raises(ValueError, match="not differentiable"):
        DefendedClassifier(purifier, torch.nn.Flatten(), backward="exact", seeds=[3])


def test_sampler_batched_equals_sequential_and_is_deterministic(images):
    purifier = create_purifier("ppgn", steps=2, weights="random", eps3=1e-3)
    # The same two images twice with different seeds: the noise must come from the seed.
    out = purifier(torch.cat([images, images]), seeds=[11, 12, 13, 14])
    assert out.shape == (4, *images.shape[1:]) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out[:2], out[2:], atol=1e-6)
    one = purifier(images[:1], seeds=[11])
    two = purifier(images[1:], seeds=[12])
    torch.testing.assert_close(torch.cat([one, two]), out[:2], atol=1e-5, rtol=0)
    assert torch.equal(purifier(images[:1], seeds=[11]), one)


def test_runs_under_inference_mode_as_serve_calls_it(images):
    # Built and run first under inference_mode (serve's stage does that): the same images.
    purifier = create_purifier("ppgn", steps=2, weights="random")
    with torch.inference_mode():
        inside = purifier(images, seeds=[1, 2])
    assert torch.equal(inside, purifier(images, seeds=[1, 2]))


def test_data_term_pulls_g_towards_the_input(images):
    purifier = create_purifier(
        "ppgn", steps=2, eps1=0.0, data_weight=1.0, eps3=0.0, weights="random"
    )
    generator, encoder = purifier.models(images.device)
    target = encoder.preprocess(images[:1])

    def error(codes: torch.Tensor) -> float:
        with torch.no_grad():
            return float((center_crop(generator.caffe(codes)) - target).pow(2).mean())

    start = encoder(images[:1])
    assert error(purifier.sample(images[:1], seeds=[0])) < 0.95 * error(start)


def test_missing_weights_name_the_commands(home):
    with pytest.raises(WeightsNotFound) as info:
        create_purifier("ppgn", steps=1)  # at construction: before any batch run starts
    message = str(info.value)
    assert "advpurify weights fetch ppgn" in message and "advpurify weights import" in message


def _as_caffemodel(model, path: Path, types: dict[str, str]) -> Path:
    state = model.state_dict()
    layers = [(n, t, [state[f"{n}.weight"].numpy(), state[f"{n}.bias"].numpy()])
              for n, t in types.items()]  # fmt: skip
    return write_caffemodel(path, layers)


def test_imported_caffe_files_drive_the_purifier(home, tmp_path, generator, encoder, images):
    g_types = {n: "InnerProduct" for n in FCS} | {d[0]: "Deconvolution" for d in DECONVS}
    e_types = {f"conv{i}": "Convolution" for i in range(1, 6)} | {"fc6": "InnerProduct"}
    g_file = _as_caffemodel(generator, tmp_path / "generator.caffemodel", g_types)
    e_file = _as_caffemodel(encoder, tmp_path / "bvlc_reference_caffenet.caffemodel", e_types)
    # The group name is enough: the file's layers say which model it is. The CaffeNet file's
    # SHA-1 is not the published one, so it needs --no-verify (verify=False).
    assert [m for m, _ in import_file("ppgn", g_file)] == ["deepsim-fc6"]
    assert [m for m, _ in import_file("ppgn", e_file, verify=False)] == ["caffenet-fc6"]
    assert cached_path("deepsim-fc6").is_file() and cached_path("caffenet-fc6").is_file()
    e_file.unlink()
    g_file.unlink()
    cached = create_purifier("ppgn", steps=1)(images[:1], seeds=[5])
    random = create_purifier("ppgn", steps=1, weights="random")(images[:1], seeds=[5])
    torch.testing.assert_close(cached, random, atol=1e-5, rtol=0)


def test_pytorch_port_with_other_names_is_matched_by_order(home, tmp_path, encoder):
    # A port saved as nn.Sequential: keys 0.weight, 0.bias, 4.weight ... plus fc7/fc8 after.
    state = encoder.state_dict()
    port = {}
    for index, (name, tensor) in enumerate(state.items()):
        port[f"{index * 2}.{name.rpartition('.')[2]}"] = tensor.clone()
    port["100.weight"], port["100.bias"] = torch.zeros(4096, 4096), torch.zeros(4096)
    torch.save(port, tmp_path / "caffenet.pt")
    assert [m for m, _ in import_file("ppgn", tmp_path / "caffenet.pt")] == ["caffenet-fc6"]
    loaded = build_encoder(None)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    # Same names but one tensor transposed: refused, nothing cached for it.
    port["0.weight"] = port["0.weight"].transpose(0, 1).contiguous()
    cached_path("caffenet-fc6").unlink()
    torch.save(port, tmp_path / "bad.pt")
    with pytest.raises(WeightsError, match=r"0.weight has shape \(3, 96, 11, 11\), expected"):
        import_file("caffenet-fc6", tmp_path / "bad.pt")
    assert not cached_path("caffenet-fc6").exists()


def test_export_parity_of_g_and_e(tmp_path, small_real_images):
    from advpurify.models.registry import get_exportable
    from advpurify.runtime.onnx import check_model, compare_with_torch, export_onnx

    for name, inputs in (
        ("deepsim-fc6", torch.rand(3, 4096, generator=torch.Generator().manual_seed(0)) * 8),
        ("caffenet-fc6", small_real_images),
    ):
        entry = get_exportable(name)
        model = entry.build("random")
        path = export_onnx(model, tmp_path / f"{name}.onnx", inputs[:2])
        check_model(path)
        report = compare_with_torch(model, path, inputs, logits=False, tolerance=1e-3)
        assert report.passed and report.max_abs_diff < 1e-3, report.summary()


def test_feed_forward_ends_on_onnx_runtime_match_torch(home, images):
    params = dict(steps=0, weights="random")  # output = G(E(x)): both ends, nothing else
    on_torch = create_purifier("ppgn", **params)(images, seeds=[1, 2])
    on_ort = create_purifier("ppgn", backend="ort-cpu", **params)(images, seeds=[1, 2])
    torch.testing.assert_close(on_ort, on_torch, atol=2e-3, rtol=0)
