"""DefendedClassifier: exact gradients, BPDA, EOT, and attacks from torchattacks agreeing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from advpurify.attacks import AttackConfig, DefendedClassifier, attack, eot_seeds
from advpurify.evaluation.labels import resolve_labels
from advpurify.images import load_image
from advpurify.models.classifiers import build_classifier, resize_center_crop
from advpurify.purifiers import create_purifier


def tiny_classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 10)).eval()


def gradient(model, x, labels):
    x = x.clone().requires_grad_(True)
    F.cross_entropy(model(x), labels, reduction="sum").backward()
    return x.grad


def test_exact_backward_is_the_true_gradient():
    clf, rescale = tiny_classifier(), create_purifier("rescale")
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([1, 2])
    ours = gradient(DefendedClassifier(rescale, clf), x, labels)
    by_hand = gradient(lambda z: clf(rescale(z)), x, labels)
    torch.testing.assert_close(ours, by_hand)
    assert DefendedClassifier(rescale, clf).backward == "exact"


def test_bpda_backward_is_the_classifier_gradient_at_the_purified_image():
    clf, jpeg = tiny_classifier(), create_purifier("jpeg", quality=30)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([3, 4])
    model = DefendedClassifier(jpeg, clf)
    assert model.backward == "bpda"
    at_purified = gradient(clf, jpeg(x), labels)
    torch.testing.assert_close(gradient(model, x, labels), at_purified)
    # BPDA may be asked for a differentiable purifier too: identity backward.
    rescale = create_purifier("rescale")
    forced = DefendedClassifier(rescale, clf, backward="bpda")
    torch.testing.assert_close(gradient(forced, x, labels), gradient(clf, rescale(x), labels))


def test_eot_averages_fresh_attacker_draws():
    clf, randpad = tiny_classifier(), create_purifier("randpad")
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    model = DefendedClassifier(randpad, clf, eot=3, seeds=[10, 11])
    with torch.no_grad():
        first = model(x)
        draws = [clf(randpad(x, eot_seeds([10, 11], 0, d))) for d in range(3)]
        torch.testing.assert_close(first, torch.stack(draws).mean(0))
        second = model(x)  # the next call: fresh draws
        assert not torch.allclose(first, second)
        again = DefendedClassifier(randpad, clf, eot=3, seeds=[10, 11])(x)
        torch.testing.assert_close(again, first)  # reproducible from the attacker's seeds
    with pytest.raises(ValueError, match="eot"):
        DefendedClassifier(randpad, clf, eot=0, seeds=[1, 2])
    with pytest.raises(ValueError, match="backward"):
        DefendedClassifier(randpad, clf, backward="identity", seeds=[1, 2])


@pytest.fixture(scope="module")
def lite0_pair(sample_paths):
    """EfficientNet-Lite0 and two real photographs it classifies correctly, as 224 crops."""
    clf = build_classifier("efficientnet-lite0")
    paths = [p for p in sample_paths if "robin" in p.name or "ptarmigan" in p.name]
    images = torch.cat([resize_center_crop(load_image(p)[None], 256, 224) for p in paths])
    labels = torch.tensor(resolve_labels(paths, paths[0].parent).indices)
    return clf, images, labels


@pytest.mark.parametrize("method", ["rescale", "bitdepth"])  # true gradient; BPDA
def test_torchattacks_pgd_on_the_defended_model_matches_our_attack(lite0_pair, method):
    torchattacks = pytest.importorskip("torchattacks")
    clf, images, labels = lite0_pair
    model = DefendedClassifier(create_purifier(method), clf)
    theirs = torchattacks.PGD(model, eps=4 / 255, alpha=1 / 255, steps=3, random_start=False)(
        images, labels
    )
    config = AttackConfig("ifgsm", eps=4, steps=3, step_size=1, random_start=False)
    ours = attack(clf, images, labels, config, purifier=create_purifier(method))
    theirs_8bit = theirs.mul(255).round().div(255)
    assert (ours - theirs_8bit).abs().max() <= 1 / 255 + 1e-6
    assert (ours == theirs_8bit).float().mean() > 0.99  # the same steps, up to float rounding
    with torch.no_grad():
        assert torch.equal(model(ours).argmax(1), model(theirs_8bit).argmax(1))
        assert (model(ours).argmax(1) != labels).any()  # and the attack did something
