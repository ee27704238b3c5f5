"""The library's entry points refuse bad input plainly instead of returning something wrong."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import advpurify
from advpurify.attacks import AttackConfig, AttackError, attack, attack_in_batches
from advpurify.devices import DeviceError
from advpurify.images import ImageDecodeError, load_image
from advpurify.purifiers import ParamError

CHEAP = ["rescale", "jpeg", "bitdepth", "median", "tvm", "randpad"]


def _classifier(classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes)
    ).eval()


def _seeds(purifier, n: int):
    return list(range(n)) if purifier.stochastic else None


@pytest.mark.parametrize("method", CHEAP)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.5, 1.5])
def test_purifiers_refuse_values_outside_the_unit_range(method, bad):
    purifier = advpurify.create_purifier(method)
    images = torch.rand(1, 3, 16, 16)
    images[0, 0, 3, 3] = bad
    with pytest.raises(ValueError, match=r"images must hold values in \[0, 1\]"):
        purifier(images, _seeds(purifier, 1))


@pytest.mark.parametrize("method", [*CHEAP, "dip"])
def test_an_empty_batch_gives_an_empty_batch(method):
    settings = {"preset": "tiny", "iterations": 3} if method == "dip" else {}
    purifier = advpurify.create_purifier(method, **settings)
    out = purifier(torch.rand(0, 3, 16, 16), [] if purifier.stochastic else None)
    assert out.shape == (0, 3, 16, 16)


def test_edge_inputs_are_checked_or_taken():
    randpad = advpurify.create_purifier("randpad")
    assert randpad(torch.rand(0, 3, 8, 8)).shape == (0, 3, 8, 8)  # no image, no seed needed
    with pytest.raises(ValueError, match="images of 0 x 0 pixels"):
        randpad(torch.rand(1, 3, 0, 0), [0])
    # numpy scalars are taken as settings, as they are as seeds
    assert advpurify.create_purifier("jpeg", quality=np.int64(50)).settings.quality == 50


def test_image_seeds_keep_their_values_and_never_collide_for_other_run_seeds():
    import zlib

    from advpurify.purifiers.base import image_seed

    for seed, key in ((0, "a.jpg"), (7, "sub/b.png"), (2**31 - 1, "c")):
        before = (zlib.crc32(key.encode()) ^ (seed * 0x9E3779B1)) & 0x7FFFFFFF  # the old rule
        assert image_seed(seed, key) == before  # outputs of earlier runs stay reproducible
    seeds = {image_seed(seed, "a.jpg") for seed in (0, 2**31, 2**32, 2**63, 2**64 - 1)}
    assert len(seeds) == 5 and max(seeds) < 2**64
    with pytest.raises(TypeError, match="key: str"):
        image_seed(0, b"a.jpg")
    assert image_seed(np.int64(7), "a.jpg") == image_seed(7, "a.jpg")  # numpy ints, as seeds


def test_outputs_are_contiguous():
    out = advpurify.create_purifier("jpeg")(torch.rand(2, 3, 8, 8))
    assert out.is_contiguous() and out.view(2, -1).shape == (2, 192)


@pytest.mark.parametrize(
    ("seeds", "message"),
    [
        ("12", "expected a sequence of integers"),
        ([1.9, 2.7], "1.9 is not an integer"),
        ([True, False], "True is not an integer"),
        ([-1, 2], "-1 is outside"),
        ([2**64, 2], "is outside"),
        ([1], "1 seeds for a batch of 2 images"),
        (torch.tensor(5), "expected a sequence of integers"),
        (np.array(5), "expected a sequence of integers"),
        ({7: 1, 8: 2}, "expected a sequence of integers"),
    ],
)
def test_seeds_are_integers_one_per_image(seeds, message):
    purifier = advpurify.create_purifier("randpad")
    with pytest.raises(ValueError, match=message):
        purifier(torch.rand(2, 3, 8, 8), seeds)
    ok = purifier(torch.rand(2, 3, 8, 8), [np.int64(1), torch.tensor(2)])
    assert ok.shape == (2, 3, 8, 8)


@pytest.mark.parametrize(("device", "message"), [("gpu", "unknown device"), ("CPU ", "unknown")])
def test_purifier_devices_are_checked(device, message):
    with pytest.raises(DeviceError, match=message):
        advpurify.create_purifier("rescale", device=device)
    assert advpurify.create_purifier("rescale", device="auto").device.type in ("cpu", "cuda")


def test_dip_variance_stop_needs_a_full_window():
    with pytest.raises(ParamError, match="iterations=3 is below window=50"):
        advpurify.create_purifier("dip", preset="tiny", iterations=3, stop="variance")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (AttackConfig("ifgsm", steps=2, step_size=float("inf")), "step size inf"),
        (AttackConfig("pgd", steps=2.5), "steps=2.5"),  # type: ignore[arg-type]
        (AttackConfig("pgd", targeted="no"), "targeted='no'"),  # type: ignore[arg-type]
        (AttackConfig("pgd", eps="16"), "eps='16'"),  # type: ignore[arg-type]
    ],
)
def test_attack_settings_of_the_wrong_type_or_infinite_are_refused(config, message):
    with pytest.raises(AttackError, match=message):
        config.resolved()


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (torch.tensor([-100, 1]), "-100 is not a class"),  # cross-entropy would ignore it
        (torch.tensor([1, 10]), "10 is not a class of a model with 10 outputs"),
        (torch.tensor([1.7, 2.0]), "expected integer class indices"),
    ],
)
def test_attack_labels_are_class_indices_of_the_model(labels, message):
    with pytest.raises(AttackError, match=message):
        attack(_classifier(), torch.rand(2, 3, 8, 8), labels, AttackConfig("fgsm"))


def test_attack_in_batches_checks_its_batch_size_and_needs_no_parameters():
    images, labels = torch.rand(3, 3, 8, 8), torch.tensor([0, 1, 2])
    for size in (0, -1):
        with pytest.raises(AttackError, match=f"batch_size={size}"):
            attack_in_batches(_classifier(), images, labels, AttackConfig(), batch_size=size)
    pool = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten())  # 12 outputs, no parameters
    adv = attack_in_batches(pool, images, labels, AttackConfig(), batch_size=2)
    assert adv.shape == images.shape


def test_models_in_training_mode_are_attacked_in_eval_mode():
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 10),
    )  # fresh: training mode
    images, labels = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    stats = net[1].running_mean.clone()
    together = attack(net, images, labels, AttackConfig("ifgsm", steps=2))
    alone = attack(net, images[:1], labels[:1], AttackConfig("ifgsm", steps=2))
    assert torch.equal(together[:1], alone)  # batch-mates change nothing
    assert torch.equal(net[1].running_mean, stats) and net.training  # left as it was
    defended = advpurify.DefendedClassifier(advpurify.create_purifier("jpeg"), net)
    assert not net.training and torch.allclose(defended(images)[:1], defended(images[:1]))


def test_defended_classifier_ignores_seeds_for_a_deterministic_purifier():
    model = advpurify.DefendedClassifier(
        advpurify.create_purifier("jpeg"), _classifier(), seeds=range(4)
    )
    assert model(torch.rand(2, 3, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("method", ["rescale", "randpad"])
def test_the_exact_gradient_reaches_saturated_pixels(method):
    purifier = advpurify.create_purifier(method)
    images = torch.rand(1, 3, 32, 32) * 0.5
    images[..., :16, :] = 1.0  # a white background, where PGD's clip puts pixels too
    model = advpurify.DefendedClassifier(
        purifier, _classifier(), backward="exact", seeds=[0] if purifier.stochastic else None
    )
    x = images.clone().requires_grad_()
    model(x).sum().backward()
    assert (x.grad[..., 2:14, 2:30] != 0).float().mean() > 0.9


def test_load_image_refuses_folders_and_non_finite_pixels_and_keeps_the_range(tmp_path):
    folder = tmp_path / "photo.png"
    folder.mkdir()
    with pytest.raises(ImageDecodeError, match="is a folder, not a file"):
        load_image(folder)
    floats = np.full((8, 8), 0.5, np.float32)
    floats[0, 0] = np.nan
    Image.fromarray(floats, mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(ImageDecodeError, match="NaN or infinite"):
        load_image(tmp_path / "nan.tif")
    ints = np.full((8, 8), 100, np.int32)
    ints[0, 0], ints[0, 1] = -5000, 10**6
    Image.fromarray(ints, mode="I").save(tmp_path / "int32.tif")
    loaded = load_image(tmp_path / "int32.tif")
    assert 0.0 <= float(loaded.min()) and float(loaded.max()) <= 1.0
    dark = np.full((4, 4), 200, np.uint16)  # 16-bit: 200 / 65535, not 200 / 255
    import cv2

    cv2.imwrite(str(tmp_path / "dark.pgm"), dark)
    cv2.imwrite(str(tmp_path / "dark.png"), dark)
    assert torch.equal(load_image(tmp_path / "dark.pgm"), load_image(tmp_path / "dark.png"))


@pytest.mark.parametrize("setting", ["lr", "reg_noise_std"])
def test_dip_values_that_would_overflow_are_refused_up_front(setting):
    with pytest.raises(ParamError, match=f"parameter {setting}=1e\\+308: must be <= 10"):
        advpurify.create_purifier("dip", **{setting: 1e308})
