"""Attacks on the real sample images with EfficientNet-Lite0, and BPDA + EOT."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from advpurify.attacks import (
    AttackConfig,
    AttackError,
    attack,
    attack_in_batches,
    eot_seeds,
    loss_gradient,
    through_purifier,
)
from advpurify.evaluation.accuracy import topk_accuracy
from advpurify.evaluation.dataset import load_dataset
from advpurify.evaluation.labels import resolve_labels
from advpurify.models.classifiers import load_classifier
from advpurify.purifiers import Purifier, create_purifier


@pytest.fixture(scope="module")
def lite0():
    return load_classifier("efficientnet-lite0", device="cpu")


@pytest.fixture(scope="module")
def sample(lite0, shared_data):
    """The 100 sample images as 224x224 crops, their labels, and FGSM eps=16 versions."""
    data = load_dataset(shared_data / "imagenet-sample", lite0.prepare, lite0.input_size)
    labels = torch.tensor(resolve_labels(data.paths, data.root).indices)
    clean = data.float_images()
    adversarial = attack_in_batches(
        lite0.module, clean, labels, AttackConfig("fgsm", 16), batch_size=25
    )
    return {"clean": clean, "labels": labels, "adversarial": adversarial}


@pytest.fixture(scope="module")
def correct_subset(lite0, sample):
    """The first 12 images the classifier gets right: a fair start for an attack comparison."""
    predictions = lite0.logits(sample["clean"][:40]).argmax(1)
    keep = (predictions == sample["labels"][:40]).nonzero().flatten()[:12]
    return sample["clean"][keep], sample["labels"][keep]


def test_sample_accuracy_clean_fgsm_and_rescale(lite0, sample):
    """The seed experiment's shape on real data: FGSM hurts, rescaling wins some back."""
    labels = sample["labels"]
    assert len(labels) == 100
    clean = topk_accuracy(lite0.logits(sample["clean"]), labels)
    adversarial = topk_accuracy(lite0.logits(sample["adversarial"]), labels)
    rescale = create_purifier("rescale")
    purified = rescale(sample["adversarial"], list(range(100)))
    rescaled = topk_accuracy(lite0.logits(purified), labels)
    print(f"clean {clean}, fgsm {adversarial}, rescale {rescaled}")
    assert clean["top1"] >= 0.85
    assert adversarial["top1"] <= 0.25
    assert rescaled["top1"] >= adversarial["top1"] + 0.05


def test_fgsm_moves_every_pixel_by_eps_within_bounds(sample):
    clean, adversarial = sample["clean"], sample["adversarial"]
    delta = (adversarial - clean) * 255
    assert delta.abs().max() <= 16 + 1e-3
    assert torch.equal(adversarial, (adversarial * 255).round() / 255)  # 8-bit levels: a PNG
    inside = (clean > 16 / 255 + 1e-4) & (clean < 1 - 16 / 255 - 1e-4)
    assert torch.allclose(delta[inside].abs(), torch.full_like(delta[inside], 16), atol=1e-3)
    assert 0.0 <= adversarial.min() and adversarial.max() <= 1.0


def test_pgd_stays_in_the_ball_and_ignores_batch_mates(lite0, correct_subset):
    images, labels = correct_subset[0][:3], correct_subset[1][:3]
    config = AttackConfig("pgd", eps=4, steps=2)
    together = attack(lite0.module, images, labels, config, seeds=[5, 6, 7])
    alone = attack(lite0.module, images[1:2], labels[1:2], config, seeds=[6])
    torch.testing.assert_close(together[1:2], alone, atol=1.5 / 255, rtol=0)
    assert ((together - images).abs() * 255).max() <= 4 + 1e-3
    other_seed = attack(lite0.module, images[1:2], labels[1:2], config, seeds=[99])
    assert not torch.equal(alone, other_seed)  # the random start follows the seed


def test_targeted_attack_reaches_its_target(lite0, correct_subset):
    images, _ = correct_subset
    images = images[:4]
    goldfish = torch.full((4,), 1)
    config = AttackConfig("pgd", 16, steps=5, targeted=True)
    adv = attack(lite0.module, images, goldfish, config, seeds=[0, 1, 2, 3])
    assert (lite0.logits(adv).argmax(1) == 1).sum() >= 3


@pytest.mark.parametrize(
    "config, match",
    [
        (AttackConfig("fgsm", 0), r"eps=0: must be in \(0, 255\]"),
        (AttackConfig("fgsm", 300), "eps=300"),
        (AttackConfig("fgsm", -1), "eps=-1"),
        (AttackConfig("deepfool", 8), "unknown attack 'deepfool'"),
        (AttackConfig("pgd", 8, eot=0), "eot"),
        (AttackConfig("pgd", 8, steps=0), "steps=0: must be >= 1"),  # not the default 10
        (AttackConfig("ifgsm", 8, steps=0), "steps=0: must be >= 1"),
        (AttackConfig("fgsm", 8, steps=5), "fgsm is one step of size eps: steps apply"),
        (AttackConfig("fgsm", 8, step_size=3, random_start=True), "step size, random start"),
    ],
)
def test_bad_attack_settings(config, match):
    with pytest.raises(AttackError, match=match):
        config.resolved()


def test_attack_defaults():
    assert AttackConfig("fgsm", 16).resolved().steps == 1
    assert AttackConfig("fgsm", 16).resolved().resolved() == AttackConfig("fgsm", 16).resolved()
    ifgsm = AttackConfig("ifgsm", 16).resolved()
    assert (ifgsm.steps, ifgsm.step_size, ifgsm.random_start) == (20, 1.0, False)
    pgd = AttackConfig("pgd", 8).resolved()
    assert (pgd.steps, pgd.step_size, pgd.random_start) == (10, 2.0, True)
    assert AttackConfig("pgd", 8, steps=4).describe() == "PGD eps=8, 4 steps of 5"


class _Recorder(Purifier):
    """A stochastic, non-differentiable test purifier that records the seeds it is given."""

    name = "recorder"
    stochastic = True

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[int]] = []

    def purify(self, images, seeds):
        self.calls.append(list(seeds))
        return (images * 4).round() / 4  # no useful gradient: BPDA must step in


def test_bpda_passes_the_gradient_straight_through():
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    out = through_purifier(create_purifier("jpeg"), x, [0, 1])
    assert torch.allclose(out, create_purifier("jpeg")(x.detach(), [0, 1]))
    weights = torch.randn_like(x)
    (out * weights).sum().backward()
    torch.testing.assert_close(x.grad, weights)


def test_differentiable_purifier_uses_its_true_gradient():
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    weights = torch.randn_like(x)
    (through_purifier(create_purifier("rescale"), x, [0]) * weights).sum().backward()
    assert not torch.allclose(x.grad, weights)  # the resize's own Jacobian, not the identity


def test_eot_draws_fresh_seeds_per_draw_and_step():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    purifier = _Recorder()
    x = torch.rand(2, 3, 8, 8)
    grad = loss_gradient(
        model, x, torch.tensor([1, 2]), purifier=purifier, seeds=[10, 11], eot=3, step=0
    )
    assert grad.shape == x.shape and grad.abs().sum() > 0
    assert len(purifier.calls) == 3
    flat = [s for call in purifier.calls for s in call]
    assert len(set(flat)) == 6 and not {10, 11} & set(flat)  # never the defence's own seeds
    assert eot_seeds([10], 1, 0) != eot_seeds([10], 0, 0)


def test_bpda_attack_through_jpeg_beats_the_unaware_attack(lite0, correct_subset):
    """The point of adaptive evaluation: JPEG only looks robust against an unaware attacker."""
    images, labels = correct_subset
    jpeg = create_purifier("jpeg")
    config = AttackConfig("pgd", eps=4, steps=3)
    seeds = list(range(len(labels)))

    def accuracy_after_jpeg(adv):
        return topk_accuracy(lite0.logits(jpeg(adv, seeds)), labels)["top1"]

    unaware = accuracy_after_jpeg(attack(lite0.module, images, labels, config, seeds=seeds))
    adaptive = accuracy_after_jpeg(
        attack(lite0.module, images, labels, config, purifier=jpeg, seeds=seeds)
    )
    print(f"PGD eps=4 then JPEG: unaware {unaware:.0%}, BPDA {adaptive:.0%}")
    assert adaptive < unaware
    assert adaptive <= unaware - 0.2


def test_eot_attack_through_randpad(lite0, correct_subset):
    """EOT through a stochastic purifier, evaluated with seeds the attacker never saw."""
    images, labels = correct_subset[0][:4], correct_subset[1][:4]
    randpad = create_purifier("randpad")
    config = replace(AttackConfig("pgd", eps=8, steps=2), eot=2)
    adv = attack(lite0.module, images, labels, config, purifier=randpad, seeds=[0, 1, 2, 3])
    defended = lite0.logits(randpad(adv, [100, 101, 102, 103])).argmax(1)
    assert (defended == labels).sum() <= 1


def test_the_fused_update_equals_the_textbook_steps() -> None:
    # attack() updates in place (sign, step, one clamp to the ball, one to [0, 1]); the result
    # must equal the textbook PGD loop bit for bit.
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 14 * 14, 5),
    ).eval()
    images, labels = torch.rand(3, 3, 16, 16), torch.tensor([0, 3, 4])
    config = AttackConfig("pgd", 8.0, steps=4, random_start=False)
    eps, alpha = 8 / 255, config.resolved().step_size / 255
    x = images.clone()
    for _ in range(4):
        grad = torch.zeros_like(x)
        leaf = x.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(leaf), labels, reduction="sum")
        grad += torch.autograd.grad(loss, leaf)[0]
        x = x + alpha * grad.sign()
        x = torch.min(torch.max(x, images - eps), images + eps).clamp(0, 1)
    expected = x.clamp(0, 1).mul(255).round().div(255)
    before = images.clone()
    assert torch.equal(attack(model, images, labels, config), expected)
    assert torch.equal(images, before)  # the in-place steps never touch the caller's batch
