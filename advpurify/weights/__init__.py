"""Pretrained weights: sources, download, cache, converters.

The small API other modules use::

    from advpurify.weights import Source, register_source, require, load_state_dict

    register_source(Source(name="my-model", format="torch7", url=..., sha256=...,
                           converter="advpurify.models.mine:convert_weights"))
    state = load_state_dict("my-model")   # raises WeightsNotFound with the commands to run

``require(name)`` returns the cached ``safetensors`` path; ``cached_path(name)`` says where it
would be. ``fetch`` / ``import_file`` fill the cache (``advpurify weights fetch|import``).
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
    "register_group",
    "register_source",
    "require",
    "save_state_dict",
    "sources",
    "sources_for",
    "verify_file",
    "weights_dir",
]
