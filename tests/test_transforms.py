"""The input-transformation purifiers on real images, against reference implementations."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from skimage.restoration import denoise_tv_chambolle

from advpurify.export.fused import MedianGraph
from advpurify.images import load_image
from advpurify.purifiers import ParamError, create_purifier, transforms
from advpurify.purifiers.transforms import median_graph

TRANSFORMS = ["rescale", "jpeg", "bitdepth", "median", "tvm", "randpad"]


@pytest.fixture(scope="module")
def batch224(sample_paths) -> torch.Tensor:
    """Six real photographs at 224 x 224."""
    images = [load_image(p)[None] for p in sample_paths[6:12]]
    return torch.cat([F.interpolate(x, size=(224, 224), mode="area") for x in images])


@pytest.mark.parametrize("name", TRANSFORMS)
def test_shape_dtype_range_and_effect(name: str, batch224: torch.Tensor) -> None:
    out = create_purifier(name)(batch224, seeds=range(len(batch224)))
    assert out.shape == batch224.shape and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    change = (out - batch224).abs().mean().item()
    assert 1e-3 < change < 0.2  # it does something, and leaves a recognisable photograph


def test_rescale_default_is_224_112_224(batch224: torch.Tensor) -> None:
    out = create_purifier("rescale")(batch224)
    small = F.interpolate(batch224, size=(112, 112), mode="bilinear", antialias=True)
    back = F.interpolate(small.clamp(0, 1), size=(224, 224), mode="bilinear", antialias=True)
    assert torch.allclose(out, back.clamp(0, 1))


def test_bitdepth_leaves_only_the_allowed_levels(batch224: torch.Tensor) -> None:
    out = create_purifier("bitdepth", bits=2)(batch224)
    assert torch.unique(out).tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1])


def test_median_matches_scipy(batch224: torch.Tensor) -> None:
    out = create_purifier("median", kernel=5)(batch224[:2])
    for image, result in zip(batch224[:2], out, strict=True):
        # torch's "reflect" padding is scipy's "mirror" mode (the edge pixel is not repeated).
        expected = ndimage.median_filter(image.numpy(), size=(1, 5, 5), mode="mirror")
        assert np.allclose(result.numpy(), expected)


def _median_unfold(images: torch.Tensor, k: int) -> torch.Tensor:
    # The definition before issue 15: torch.median over every unfolded window.
    n, c, h, w = images.shape
    windows = F.unfold(F.pad(images, (k // 2,) * 4, mode="reflect"), kernel_size=k)
    return windows.view(n, c, k * k, h, w).median(dim=2).values


@pytest.mark.parametrize("kernel", [3, 5, 7])
@pytest.mark.parametrize("shape", [(2, 3, 37, 53), (1, 3, 3, 4), (3, 3, 64, 64)])
def test_median_fast_path_equals_the_graph(kernel: int, shape: tuple[int, ...]) -> None:
    if min(shape[-2:]) <= kernel // 2:
        pytest.skip("reflect padding needs a side longer than the pad")
    gen = torch.Generator().manual_seed(kernel)
    images = torch.rand(shape, generator=gen)  # not on 8-bit levels: any float works
    images[0, 0, 0, :2] = torch.tensor([0.0, 1.0])
    out = create_purifier("median", kernel=kernel)(images)
    assert torch.equal(out, median_graph(images, kernel))
    assert torch.equal(out, _median_unfold(images, kernel))
    assert torch.equal(MedianGraph(kernel)(images), out)  # the exported form: same values


def _jpeg_before(images: torch.Tensor, quality: int) -> torch.Tensor:
    # The CPU path before issue 15 (float -> uint8 -> BGR views -> float).
    as_bytes = images.clamp(0, 1).mul(255).round().to(torch.uint8)
    out = []
    for image in as_bytes.permute(0, 2, 3, 1).numpy():
        ok, buffer = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
        assert ok
        out.append(cv2.imdecode(buffer, cv2.IMREAD_COLOR)[..., ::-1])
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(images.dtype).div(255)


def test_jpeg_and_bitdepth_unchanged(batch224: torch.Tensor) -> None:
    # Halfway levels (k + 0.5) / 255 and values outside [0, 1] exercise rounding and clamping.
    halves = (torch.arange(3 * 37 * 53).reshape(1, 3, 37, 53) % 256 + 0.5) / 255
    wide = torch.linspace(-0.2, 1.2, 3 * 40 * 30).reshape(1, 3, 40, 30)
    # Calls refuse values outside [0, 1]; the methods themselves still clamp (``purify``).
    for images in (batch224[:3], halves, wide):
        seeds = [0] * images.shape[0]
        for quality in (75, 30):
            jpeg = create_purifier("jpeg", quality=quality)
            assert torch.equal(jpeg.purify(images, seeds), _jpeg_before(images, quality))
        for bits in (1, 3, 8):
            levels = 2**bits - 1
            before = images.clamp(0, 1).mul(levels).round().div(levels)
            bitdepth = create_purifier("bitdepth", bits=bits)
            assert torch.equal(bitdepth.purify(images, seeds), before)
    assert torch.equal(bitdepth(batch224[:3]), bitdepth.purify(batch224[:3], [0] * 3))


def test_tvm_matches_scikit_image(batch224: torch.Tensor) -> None:
    out = create_purifier("tvm", weight=0.08)(batch224[:2])
    for image, result in zip(batch224[:2], out, strict=True):
        expected = denoise_tv_chambolle(
            image.permute(1, 2, 0).numpy(), weight=0.08, channel_axis=-1
        )
        assert np.abs(result.permute(1, 2, 0).numpy() - expected).max() < 1e-4


def test_jpeg_matches_pillow_at_the_same_quality(batch224: torch.Tensor) -> None:
    out = create_purifier("jpeg", quality=60)(batch224[:1])[0]
    pixels = (batch224[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=60)
    with Image.open(buffer) as img:
        expected = np.asarray(img, dtype=np.float32) / 255
    assert np.abs(out.permute(1, 2, 0).numpy() - expected).mean() < 2 / 255


def test_randpad_is_seeded_per_image(batch224: torch.Tensor) -> None:
    purifier = create_purifier("randpad")
    first = purifier(batch224[:3], seeds=[1, 2, 3])
    assert torch.equal(first, purifier(batch224[:3], seeds=[1, 2, 3]))
    # An image's output depends on its own seed only, not on its batch-mates.
    alone = purifier(batch224[1:2], seeds=[2])
    assert torch.equal(first[1:2], alone)
    assert not torch.equal(first[1:2], purifier(batch224[1:2], seeds=[7]))


def test_any_image_size_works() -> None:
    odd = torch.rand(2, 3, 37, 53)
    for name in TRANSFORMS:
        assert create_purifier(name)(odd, seeds=[4, 5]).shape == odd.shape


@pytest.mark.parametrize(
    ("name", "values", "message"),
    [
        ("rescale", {"factor": 2}, "must be <= 1"),
        ("rescale", {"factor": float("nan")}, "finite"),
        ("rescale", {"factor": "0.5"}, "expected float, got str"),  # strings: the CLI's job
        ("rescale", {"factr": 0.5}, "unknown parameter factr"),
        ("rescale", {"mode": "cubic"}, "must be one of"),
        ("jpeg", {"quality": "high"}, "expected int"),
        ("jpeg", {"quality": 0}, "must be >= 1"),
        ("jpeg", {"quality": True}, "expected int"),
        ("median", {"kernel": 4}, "must be odd"),
        ("bitdepth", {"bits": 2.5}, "expected int"),
        ("tvm", {"weight": float("inf")}, "finite"),
        ("nothing", {}, "unknown method"),
    ],
)
def test_bad_parameters_are_refused(name: str, values: dict, message: str) -> None:
    with pytest.raises(ParamError, match=message):
        create_purifier(name, **values)


def test_wrong_input_is_refused() -> None:
    with pytest.raises(ValueError, match="N x 3 x H x W"):
        create_purifier("rescale")(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="float32"):
        create_purifier("rescale")(torch.rand(1, 3, 8, 8, dtype=torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", TRANSFORMS)
def test_cuda_matches_cpu(name: str, batch224: torch.Tensor) -> None:
    cpu = create_purifier(name)(batch224, seeds=range(len(batch224)))
    gpu = create_purifier(name, device="cuda")(batch224.cuda(), seeds=range(len(batch224)))
    assert gpu.is_cuda
    if name == "jpeg":  # one codec (libjpeg 4:2:0) on every device: the same 8-bit levels
        # (the last division by 255 may round 1 ulp apart: CUDA divides by a reciprocal)
        assert torch.equal((gpu.cpu() * 255).round(), (cpu * 255).round())
    else:
        assert (gpu.cpu() - cpu).abs().mean() < 1e-4


def test_median_refuses_an_image_smaller_than_its_window():
    # Width x height, as everywhere else (the tensor is 2 high, 9 wide).
    with pytest.raises(ValueError, match="median kernel 5: a 9 x 2 image is too small"):
        create_purifier("median", kernel=5)(torch.rand(1, 3, 2, 9))
    tiny = torch.rand(1, 3, 2, 2)  # the smallest a 3x3 window can reflect over
    assert create_purifier("median")(tiny).shape == tiny.shape


def _reference():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "transforms_reference.py"
    spec = importlib.util.spec_from_file_location("transforms_reference", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


tv_before = _reference().tv_chambolle_before


@pytest.mark.parametrize("chunk_pixels", [1, 2 * 16 * 16, 3 * 16 * 16, 10**9])
def test_tvm_equals_the_implementation_before_chunking(
    small_real_images: torch.Tensor, monkeypatch: pytest.MonkeyPatch, chunk_pixels: int
) -> None:
    # Channels are denoised a few at a time and leave the working set once converged; every
    # iteration count (so channels that stop on the last step), every chunking (one plane
    # left over included), values outside [0, 1]: the same bits as before.
    monkeypatch.setattr(transforms, "_TV_CHUNK_PIXELS", chunk_pixels)
    images = F.interpolate(small_real_images[:3], size=(16, 16), mode="area")
    images = torch.cat([images, images[:1] * 3 - 1])
    tvm = transforms.tv_chambolle
    for iterations in range(1, 60):
        assert torch.equal(
            tvm(images, 0.1, 2e-4, iterations), tv_before(images, 0.1, 2e-4, iterations)
        )
    assert torch.equal(tvm(images[:1, :1], 0.3), tv_before(images[:1, :1], 0.3))
    assert tvm(images[:, :, :0]).shape == (4, 3, 0, 16)  # empty planes
    assert torch.equal(tvm(images.requires_grad_()), tv_before(images.detach()))  # no autograd
