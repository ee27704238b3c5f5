"""The 1000 ImageNet-1k classes: index order is the sorted WordNet ids.

The synset list and lemmas come from timm (``timm.data.ImageNetInfo``), which ships them as
package data, so nothing here needs the network or the shared test data.
"""

from __future__ import annotations

import re
from functools import lru_cache

NUM_CLASSES = 1000

# A WordNet noun id: "n" and eight digits (n01440764 = tench).
WNID_PATTERN = re.compile(r"n\d{8}")


@lru_cache(maxsize=1)
def _info():
    from timm.data import ImageNetInfo

    return ImageNetInfo("imagenet-1k")


@lru_cache(maxsize=1)
def wnids() -> tuple[str, ...]:
    """The 1000 WordNet ids in class-index order."""
    ids = tuple(_info().label_names())
    if len(ids) != NUM_CLASSES or list(ids) != sorted(ids):
        raise RuntimeError("timm's ImageNet-1k synset list is not the 1000 sorted WordNet ids")
    return ids


@lru_cache(maxsize=1)
def wnid_to_index() -> dict[str, int]:
    return {wnid: index for index, wnid in enumerate(wnids())}


@lru_cache(maxsize=1)
def class_names() -> tuple[str, ...]:
    """A short readable name per class: the first lemma ("tench, Tinca tinca" -> "tench")."""
    info = _info()
    return tuple(info.label_name_to_description(wnid).split(",")[0].strip() for wnid in wnids())


def class_name(index: int) -> str:
    """The readable name of class ``index`` (0-999)."""
    if isinstance(index, bool) or not 0 <= int(index) < NUM_CLASSES or int(index) != index:
        raise IndexError(f"class index {index!r} is outside 0..{NUM_CLASSES - 1}")
    return class_names()[int(index)]
