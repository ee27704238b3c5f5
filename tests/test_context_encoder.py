"""The Context Encoder networks and the purifier (centre and tiled), on real photographs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from advpurify.images import load_image
from advpurify.models.context_encoder import (
    HOLE_END,
    HOLE_START,
    MEAN_FILL,
    ContextEncoder,
    build_discriminator,
    build_generator,
    count_parameters,
    fill_hole,
    load_generator,
)
from advpurify.purifiers import ParamError, create_purifier
from advpurify.purifiers.inpaint import hole_box
from advpurify.weights.registry import WeightsError


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A small generator with random (DCGAN-initialised) weights, saved as a training ckpt."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ce") / "small.pt"
    generator = build_generator("small")
    # Non-trivial running statistics, so that eval-mode batch norm is not the identity.
    with torch.no_grad():
        for module in generator.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    torch.save({"G": generator.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def photo(sample_paths: list[Path]) -> torch.Tensor:
    """One real photograph at its native (non-square) resolution."""
    image = load_image(sample_paths[10])
    assert image.shape[1] != image.shape[2]
    return image[None]


class ConstantCentre(nn.Module):
    """A stand-in generator that predicts one flat colour: output pixels show their origin."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value
        self.seen = self.calls = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen += images.shape[0]
        self.calls += 1
        return torch.full((images.shape[0], 3, 64, 64), self.value, device=images.device)


def test_paper_generator_size_and_shapes() -> None:
    generator = build_generator("paper")
    assert 70_500_000 < count_parameters(generator) < 71_500_000  # "about 71 M"
    assert generator.encoder[-1].out_channels == 4000  # the 4000-d bottleneck
    small = build_generator("small").eval()
    with torch.no_grad():
        centre = small(torch.rand(2, 3, 128, 128) * 2 - 1)
        logits = build_discriminator("small").eval()(centre)
    assert centre.shape == (2, 3, 64, 64) and centre.abs().max() <= 1
    assert logits.shape == (2,)


def test_hole_is_mean_colour_and_only_context_matters() -> None:
    context = torch.rand(1, 3, 128, 128) * 2 - 1
    filled = fill_hole(context)
    hole = (..., slice(HOLE_START, HOLE_END), slice(HOLE_START, HOLE_END))
    expected = torch.tensor(MEAN_FILL).view(1, 3, 1, 1).expand(1, 3, 56, 56)
    torch.testing.assert_close(filled[hole], expected)
    outside = torch.ones(128, 128, dtype=torch.bool)
    outside[HOLE_START:HOLE_END, HOLE_START:HOLE_END] = False
    assert torch.equal(filled[..., outside], context[..., outside])

    model = ContextEncoder(build_generator("small")).eval()
    images = torch.rand(1, 3, 128, 128)
    other = images.clone()
    other[hole] = torch.rand(1, 3, 56, 56)  # different hole content, same context
    with torch.no_grad():
        assert torch.equal(model(images), model(other))
        moved = images.clone()
        moved[..., :8, :8] = 1 - moved[..., :8, :8]
        assert not torch.equal(model(images), model(moved))


def test_center_mode_changes_only_the_centre(checkpoint: Path, photo: torch.Tensor) -> None:
    purifier = create_purifier("context-encoder", mode="center", weights=str(checkpoint))
    out = purifier(photo)
    _, _, height, width = photo.shape
    y0, y1, x0, x1 = hole_box(height, width)
    inside = torch.zeros(height, width, dtype=torch.bool)
    inside[y0:y1, x0:x1] = True
    assert torch.equal(out[..., ~inside], photo[..., ~inside])  # bit for bit
    assert (out[..., inside] != photo[..., inside]).float().mean() > 0.99
    # Aspect kept: a square hole, 56/128 of the shorter side, in the middle.
    short = min(height, width)
    assert abs((y1 - y0) / short - 56 / 128) < 0.01 and abs((x1 - x0) / short - 56 / 128) < 0.01
    assert abs((y0 + y1) / 2 - height / 2) <= 2 and abs((x0 + x1) / 2 - width / 2) <= 2

    # At the released model's scale (shorter side 350) the hole is 56/350 of the shorter side,
    # and the context the generator sees is the image at that scale, not the whole image.
    seen = []
    recorder = ContextEncoder(build_generator("small"))
    recorder.generator = ConstantCentre(0.0)
    at_350 = create_purifier("context-encoder", mode="center", weights=str(checkpoint), size=350)
    at_350.model = recorder
    at_350.inpaint = lambda contexts: seen.append(contexts) or torch.zeros(1, 3, 56, 56)
    out_350 = at_350(photo)
    b0, b1, c0, c1 = hole_box(height, width, 350)
    assert abs((b1 - b0) / short - 56 / 350) < 0.01 and abs((c1 - c0) / short - 56 / 350) < 0.01
    scale = 350 / short
    big = torch.nn.functional.interpolate(
        photo, size=(round(height * scale), round(width * scale)), mode="bilinear",
        antialias=scale < 1,
    )  # fmt: skip
    top, left = (big.shape[-2] - 128) // 2, (big.shape[-1] - 128) // 2
    torch.testing.assert_close(seen[0], big[..., top : top + 128, left : left + 128])
    assert torch.equal(out_350[..., :b0, :], photo[..., :b0, :])

    # The pasted centre is the generator's prediction: a flat colour comes back flat.
    purifier.model = ContextEncoder(build_generator("small"))
    purifier.model.generator = ConstantCentre(0.0)  # tanh space 0 -> 0.5 in [0, 1]
    flat = purifier(photo)
    torch.testing.assert_close(flat[..., inside], torch.full_like(flat[..., inside], 0.5))


def test_tiled_mode_regenerates_every_pixel(checkpoint: Path, photo: torch.Tensor) -> None:
    purifier = create_purifier("context-encoder", mode="tiled", weights=str(checkpoint), size=128)
    out = purifier(photo)
    assert out.shape == photo.shape
    assert bool((out != photo).all())

    # Every output pixel is a blend of inpainted holes only: with a generator that predicts one
    # flat colour, the whole image becomes exactly that colour (no pixel of the input survives,
    # and the tent-weighted blend covers the whole image).
    constant = ConstantCentre(0.25)
    purifier.model = constant  # replaces the [0, 1] wrapper: predictions come out as they are
    flat = purifier(photo)
    assert float((flat - 0.25).abs().max()) < 1e-6
    # All windows of all images went through the generator together, in one call.
    constant.seen = constant.calls = 0
    purifier(torch.cat([photo, photo.flip(-1)]))
    scale = 128 / min(photo.shape[-2:])
    per_axis = [
        len(range(0, n - 56 + 1, 28)) + ((n - 56) % 28 > 0)
        for n in (round(photo.shape[-2] * scale), round(photo.shape[-1] * scale))
    ]
    assert constant.seen == 2 * per_axis[0] * per_axis[1] and constant.calls == 1


def test_batch_independence_and_gradients(checkpoint: Path, small_real_images) -> None:
    for mode in ("center", "tiled"):
        size = 64 if mode == "tiled" else 128  # the centre's crop is 128 x 128
        purifier = create_purifier(
            "context-encoder", mode=mode, weights=str(checkpoint), batch=3, size=size
        )
        together = purifier(small_real_images)
        alone = torch.cat([purifier(img[None]) for img in small_real_images])
        torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)

        images = small_real_images.clone().requires_grad_(True)
        purifier(images).sum().backward()
        assert images.grad is not None and images.grad.abs().sum() > 0


def test_the_centre_hole_is_never_rounded_away(checkpoint: Path) -> None:
    tiny = torch.rand(1, 3, 2, 2)
    out = create_purifier("context-encoder", weights=str(checkpoint))(tiny)
    assert out.shape == tiny.shape and not torch.equal(out, tiny)  # one pixel inpainted
    big = create_purifier("context-encoder", weights=str(checkpoint), size=4096)
    assert big(torch.rand(1, 3, 64, 64)).shape == (1, 3, 64, 64)
    with pytest.raises(ParamError, match="size=56: mode=center needs at least 128"):
        create_purifier("context-encoder", weights=str(checkpoint), size=56)


def test_bad_parameters_and_weights(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ADVPURIFY_HOME", str(tmp_path / "home"))
    with pytest.raises(ParamError, match="center, tiled"):
        create_purifier("context-encoder", mode="everything")
    with pytest.raises(WeightsError, match="weights context-encoder-imagenet not found") as error:
        create_purifier("context-encoder")
    # The hint names both forms of the setting: batch's -p and experiment's --param.
    assert "`-p weights=ce.pt`" in str(error.value)
    assert "`--param context-encoder.weights=ce.pt` in experiment" in str(error.value)
    with pytest.raises(WeightsError, match="no such weights file"):
        create_purifier("context-encoder", weights=str(tmp_path / "nothing.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="junk.pt: not a readable checkpoint"):
        create_purifier("context-encoder", weights=str(junk))


def test_safetensors_weights(checkpoint: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = torch.load(checkpoint, weights_only=True)["G"]
    path = tmp_path / "g.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    images = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        a = ContextEncoder(load_generator(str(path)))(images)
        b = ContextEncoder(load_generator(str(checkpoint)))(images)
    assert torch.equal(a, b)
    # Runs and cached stages are keyed by the weights' content, whatever file holds them.
    digests = {
        create_purifier("context-encoder", weights=str(p)).config()["generator_sha256"]
        for p in (path, checkpoint)
    }
    assert len(digests) == 1


def test_onnx_export_parity(
    checkpoint: Path, tmp_path: Path, monkeypatch, small_real_images
) -> None:
    """The generator exports to ONNX; ONNX Runtime reproduces torch, inside the purifier too."""
    from advpurify.models.registry import get_exportable
    from advpurify.runtime.onnx import compare_with_torch
    from advpurify.runtime.onnx_cache import cached_onnx

    monkeypatch.setenv("ADVPURIFY_HOME", str(tmp_path / "home"))
    entry = get_exportable("context-encoder")
    assert entry.sample_shape == (3, 128, 128) and entry.output == "image"

    # The purifier on the ort-cpu backend exports the generator (parity-checked, cached) ...
    on_ort = create_purifier(
        "context-encoder", mode="tiled", weights=str(checkpoint), size=64, backend="ort-cpu"
    )
    on_torch = create_purifier("context-encoder", mode="tiled", weights=str(checkpoint), size=64)
    torch.testing.assert_close(
        on_ort(small_real_images), on_torch(small_real_images), rtol=0, atol=1e-4
    )
    # ... and the exported file matches torch on real photographs, not only random inputs.
    model = entry.build(str(checkpoint))
    path = cached_onnx(model, entry.sample_shape, name="context-encoder")
    assert path.parent == tmp_path / "home" / "onnx"
    inputs = torch.nn.functional.interpolate(small_real_images, size=(128, 128), mode="bilinear")
    report = compare_with_torch(model, path, inputs, logits=False, tolerance=1e-4)
    assert report.passed and report.count == 4


@pytest.mark.gpu
def test_cuda_matches_cpu(checkpoint: Path, small_real_images) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    for mode in ("center", "tiled"):
        size = 64 if mode == "tiled" else 128  # the centre's crop is 128 x 128
        on_cpu = create_purifier("context-encoder", mode=mode, weights=str(checkpoint), size=size)
        on_gpu = create_purifier(
            "context-encoder", mode=mode, weights=str(checkpoint), size=size, device="cuda"
        )
        out = on_gpu(small_real_images.cuda())
        assert out.device.type == "cuda"
        torch.testing.assert_close(out.cpu(), on_cpu(small_real_images), rtol=0, atol=2e-3)
