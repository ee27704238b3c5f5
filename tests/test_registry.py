"""One registry style (purifiers, models, weight sources): duplicates raise, specs hold facts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torchvision.models import GoogLeNet_Weights

from advpurify.models.classifiers import build_classifier, classifier_spec
from advpurify.models.registry import get_model, list_models
from advpurify.models.spec import MODELS, ModelSpec, register_model
from advpurify.purifiers import PURIFIERS, ParamError, Purifier, create_purifier, list_purifiers
from advpurify.purifiers.base import register
from advpurify.registry import DuplicateNameError, InvalidNameError, Registry, UnknownNameError
from advpurify.weights import WeightsError, register_source, sources_for
from advpurify.weights.manager import entries


def test_registry_refuses_duplicates_and_lists_known_names():
    things: Registry[int] = Registry("thing")
    things.register("a", 1)
    things.register("b", 2)
    with pytest.raises(DuplicateNameError, match="thing 'a' is already registered"):
        things.register("a", 3)
    assert things.get("a") == 1 and things.names() == ["a", "b"]
    with pytest.raises(UnknownNameError, match=r"unknown thing 'c' \(known: a, b\)"):
        things.get("c")


@pytest.mark.parametrize("name", ["", " a", "a b", "a\tb"])
def test_registry_refuses_empty_names_and_names_with_spaces(name):
    things: Registry[int] = Registry("thing")
    with pytest.raises(InvalidNameError, match="must be non-empty, without spaces"):
        things.register(name, 1)
    assert len(things) == 0


def test_a_refused_model_spec_leaves_nothing_registered():
    original = get_model("deepsim-fc6")
    spec = dataclasses.replace(
        original, name="my-net", aliases=("my-alias",), weights_name=original.cache_name
    )
    # The name and alias are free, the weight source's name is not.
    with pytest.raises(DuplicateNameError, match="weight source 'deepsim-fc6-caffe'"):
        register_model(spec)
    assert "my-net" not in list_models() and "my-alias" not in MODELS
    with pytest.raises(DuplicateNameError, match="model 'twice' is given twice"):
        register_model(dataclasses.replace(spec, name="twice", aliases=("twice",), sources=()))
    assert "twice" not in MODELS
    fixed = dataclasses.replace(spec, sources=())
    try:
        assert register_model(fixed) is fixed  # the corrected retry goes through
        assert get_model("my-alias") is fixed
    finally:
        MODELS.unregister("my-net")
        MODELS.unregister("my-alias")


def test_a_second_purifier_with_a_taken_name_raises():
    class Impostor(Purifier):
        name = "rescale"

    with pytest.raises(DuplicateNameError, match="method 'rescale'"):
        register(Impostor)
    assert PURIFIERS.get("rescale") is not Impostor
    assert create_purifier("rescale").name == "rescale"  # the real one is still in place
    with pytest.raises(ParamError, match="unknown method 'nothing'"):
        create_purifier("nothing")
    assert "rescale" in list_purifiers()


def test_a_second_model_or_weight_source_with_a_taken_name_raises():
    spec = get_model("deepsim-fc6")
    with pytest.raises(DuplicateNameError, match="'deepsim-fc6'"):
        register_model(dataclasses.replace(spec, sources=()))
    with pytest.raises(DuplicateNameError, match="'inception-v1'"):  # aliases are names too
        register_model(dataclasses.replace(get_model("googlenet"), name="another"))
    with pytest.raises(DuplicateNameError, match="weight source 'deepsim-fc6-caffe'"):
        register_source(spec.sources[0])
    with pytest.raises(WeightsError, match="unknown weight source"):
        from advpurify.weights.registry import SOURCES

        SOURCES.get("no-such-source")


def test_a_model_spec_carries_its_weights_converter_and_input():
    """Everything about deepsim-fc6 in one place, and the weights cache sees its sources."""
    spec = get_model("deepsim-fc6")
    assert spec.sample_shape == (4096,) and spec.output == "image"
    assert [s.format for s in spec.sources] == ["caffemodel", "torch", "safetensors"]
    assert sources_for("deepsim-fc6") == list(spec.sources)
    assert all(callable(s.converter) for s in spec.sources)
    entry = next(e for e in entries() if e.model == "deepsim-fc6")
    assert entry.group == "ppgn" and entry.sources == spec.sources
    # The spec builds the network it describes: one input of its sample shape in, an image out.
    generator = spec.build("random")
    with torch.no_grad():
        out = generator(torch.rand(1, *spec.sample_shape) * 4)
    assert out.shape == (1, 3, 256, 256) and 0 <= float(out.min()) <= float(out.max()) <= 1
    with pytest.raises(ValueError, match="provides deepsim-fc6, not other"):
        ModelSpec("other", spec.builder, sources=spec.sources)
    assert {"googlenet", "efficientnet-lite0", "context-encoder", "caffenet-fc6"} <= set(
        list_models()
    )


def test_googlenet_spec_preprocessing_is_torchvisions():
    theirs = GoogLeNet_Weights.IMAGENET1K_V1.transforms()
    prep = get_model("googlenet").preprocessing
    assert (prep.resize_size, prep.crop_size) == (theirs.resize_size[0], theirs.crop_size[0])
    assert prep.interpolation == theirs.interpolation.value
    assert prep.mean == tuple(theirs.mean) and prep.std == tuple(theirs.std)


def test_any_timm_name_gets_a_spec_from_its_pretrained_config():
    spec = classifier_spec("timm:mobilenetv3_small_050")
    assert spec.preprocessing.interpolation == "bicubic" and spec.preprocessing.crop_size == 224
    net = build_classifier("timm:mobilenetv3_small_050", weights="random")
    assert net.preprocessing == spec.preprocessing  # the built module uses the spec's
    assert classifier_spec("Inception_V1") is get_model("googlenet")
