"""The library as a user meets it: ``import advpurify`` and the README's example, run as written."""

from __future__ import annotations

import contextlib
import io
import re

import pytest
import torch

import advpurify

ROBIN = "n01558993_robin.JPEG"  # ImageNet class 15 ("robin"), a clear photograph


def docstring_example() -> str:
    """The code block of ``advpurify``'s module docstring (the README's library example)."""
    block = advpurify.__doc__.split("::\n", 1)[1].split("\n\n``", 1)[0]
    lines = [line[4:] if line.startswith("    ") else line for line in block.splitlines()]
    return "\n".join(lines).strip()


def test_readme_example_runs_as_written_on_a_real_photograph(sample_dir):
    code = docstring_example()
    assert 'advpurify.create_purifier("rescale"' in code and "DefendedClassifier" in code
    code = code.replace('"photo.jpg"', repr(str(sample_dir / ROBIN)))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "advpurify-example", "exec"), {})
    assert printed.getvalue().strip() == "robin"


def test_defended_prediction_of_a_real_photograph(sample_dir):
    purifier = advpurify.create_purifier("rescale", factor=0.5)
    classifier = advpurify.load_classifier("efficientnet-lite0")
    model = advpurify.DefendedClassifier(purifier, classifier)
    assert isinstance(classifier, torch.nn.Module) and isinstance(model, torch.nn.Module)
    image = advpurify.load_image(sample_dir / ROBIN)[None]
    with torch.no_grad():
        logits = model(image)
        plain = classifier(image)
        by_hand = classifier(purifier(image))
    assert logits.shape == (1, 1000)
    assert int(logits.argmax()) == int(plain.argmax()) == 15
    torch.testing.assert_close(logits, by_hand)  # exactly classifier(purifier(x))
    assert not torch.allclose(logits, plain)  # and the purifier did change the input


def test_list_purifiers_and_typed_settings():
    names = advpurify.list_purifiers()
    assert names == sorted(names)
    assert {"rescale", "jpeg", "randpad", "dip", "ppgn", "context-encoder"} <= set(names)
    jpeg = advpurify.create_purifier("jpeg", quality=50)
    assert jpeg.settings.quality == 50 and jpeg.config() == {
        "method": "jpeg",
        "params": {"quality": 50},
    }
    with pytest.raises(dataclasses_frozen()):
        jpeg.settings.quality = 10  # settings never change under a purifier
    with pytest.raises(AttributeError):
        jpeg.quality  # noqa: B018  (settings are read from .settings, typed, not by attribute)
    with pytest.raises(advpurify.ParamError, match=re.escape("expected int, got str")):
        advpurify.create_purifier("jpeg", quality="50")


def dataclasses_frozen() -> type[Exception]:
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_stochastic_methods_require_seeds():
    randpad = advpurify.create_purifier("randpad")
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="randpad is stochastic: pass one seed per image"):
        randpad(images)
    first = randpad(images, seeds=[7, 8])
    assert torch.equal(first, randpad(images, seeds=[7, 8]))
    # An image's output follows its own seed, not its position in the batch.
    assert torch.equal(randpad(images.flip(0), seeds=[8, 7]), first.flip(0))
    with pytest.raises(ValueError, match="stochastic"):
        advpurify.DefendedClassifier(randpad, torch.nn.Flatten())
