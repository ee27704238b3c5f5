"""Pretrained weights: sources, download, cache, converters. Never imports a model.

The small API other modules use::

    from advpurify.weights import Source, register_source, require, load_state_dict

    register_source(Source(name="my-model", format="torch7", url=..., sha256=...,
                           converter=my_convert))  # path -> complete, shape-checked state dict
    state = load_state_dict("my-model")   # raises WeightsNotFound with the commands to run

Models register their sources through their spec (``advpurify.models.spec.register_model``)
when their module is imported. ``require(name)`` returns the cached ``safetensors`` path;
``cached_path(name)`` says where it would be. ``fetch`` / ``import_file`` fill the cache
(``advpurify weights fetch|import``). ``read_state_dict(path)`` reads any weights file.
"""

from advpurify.weights.cache import (
    WeightsNotFound,
    cached_path,
    is_cached,
    load_state_dict,
    require,
    save_state_dict,
    weights_dir,
)
from advpurify.weights.download import ChecksumError, DownloadError, download, verify_file
from advpurify.weights.manager import entries, fetch, import_file
from advpurify.weights.registry import (
    Source,
    WeightsError,
    register_group,
    register_source,
    sources,
    sources_for,
)
from advpurify.weights.state_dicts import read_safetensors, read_state_dict

__all__ = [
    "ChecksumError",
    "DownloadError",
    "Source",
    "WeightsError",
    "WeightsNotFound",
    "cached_path",
    "download",
    "entries",
    "fetch",
    "import_file",
    "is_cached",
    "load_state_dict",
    "read_safetensors",
    "read_state_dict",
    "register_group",
    "register_source",
    "require",
    "save_state_dict",
    "sources",
    "sources_for",
    "verify_file",
    "weights_dir",
]
