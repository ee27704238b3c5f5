"""HTTP requests checked before any model runs, and the answers' JSON.

Every refusal is a :class:`RequestError` with a 4xx status and a one-line reason, raised before
the expensive work: the body size before it is read in full, the pixel count from the image
header before anything is decoded, parameters before the purifier is called.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from advpurify.images import ImageDecodeError, allow_pixels, decode_image
from advpurify.models.imagenet import class_names, wnids
from advpurify.purifiers import (
    ParamError,
    list_purifiers,
    parse_bool,
    parse_setting,
    purifier_class,
    setting_fields,
)
from advpurify.purifiers.base import make_settings

# Query parameters that are not method parameters.
RESERVED = frozenset({"seed", "compare"})
SEED_MAX = 0x7FFFFFFF


class RequestError(Exception):
    """A request answered with an error: ``status`` (4xx; 500 where this server failed on it)
    and a one-line ``reason``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def check_length(content_length: str | None, limit: int) -> None:
    """Refuse a declared body size over ``limit`` before reading the body."""
    if content_length is None:
        return
    try:
        declared = int(content_length)
    except ValueError:
        raise RequestError(400, f"Content-Length {content_length!r} is not a number") from None
    if declared > limit:
        raise RequestError(413, f"body of {declared} bytes is over the limit of {limit} bytes")


class BodyLimit:
    """Collects a streamed body, refusing it as soon as it passes ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.chunks: list[bytes] = []
        self.size = 0

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise RequestError(413, f"body is over the limit of {self.limit} bytes")
        self.chunks.append(chunk)

    def body(self) -> bytes:
        return b"".join(self.chunks)


def image_header(body: bytes, max_pixels: int) -> tuple[str, int, int]:
    """``(format, width, height)`` from the header alone; nothing is decoded yet."""
    if not body:
        raise RequestError(400, "empty body: send the image file as the request body")
    allow_pixels(max_pixels)  # Pillow's own bomb limit never below ours: ours is what answers
    try:
        # Image.open reads the header only; pixel data is decoded later, if the size is fine.
        with Image.open(io.BytesIO(body)) as img:
            fmt, (width, height) = img.format or "", img.size
    except Image.DecompressionBombError as error:  # over twice Pillow's limit, so over ours
        found = re.search(r"\((\d+) pixels\)", str(error))
        pixels = f"{found.group(1)} pixels" if found else "the image"
        raise RequestError(
            413, f"too many pixels: {pixels} is over the limit of {max_pixels}"
        ) from None
    except UnidentifiedImageError:
        raise RequestError(
            400, f"not an image (body starts with {body[:8]!r}); send a JPEG, PNG, ... file"
        ) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise RequestError(400, f"unreadable image header ({error})") from None
    if width * height > max_pixels:
        raise RequestError(
            413,
            f"too many pixels: {width} x {height} = {width * height} is over the limit of "
            f"{max_pixels}",
        )
    return fmt, width, height


def read_image(body: bytes, max_pixels: int) -> torch.Tensor:
    """The image as the batch tool reads the same file: float32 ``3 x H x W`` in ``[0, 1]``."""
    fmt, _, _ = image_header(body, max_pixels)
    # The format's usual extension picks the same decoder as for a file (16-bit PNG/TIFF).
    name = Path("request." + (fmt.lower() or "bin"))
    try:
        return decode_image(body, name, max_pixels=max_pixels)
    except ImageDecodeError as error:
        raise RequestError(400, f"not a readable image: {error.reason}") from None


def query_dict(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Query parameters by name; one given twice with two values is refused (as ``-p`` is),
    not silently settled by the last."""
    query: dict[str, str] = {}
    for name, value in items:
        if query.get(name, value) != value:
            raise RequestError(400, f"{name} given twice ({query[name]!r} and {value!r})")
        query[name] = value
    return query


def seed_for(body: bytes, query: Mapping[str, str]) -> int:
    """``seed`` from the query, else one derived from the image bytes (same image, same seed)."""
    text = query.get("seed")
    if text is None:
        return int.from_bytes(hashlib.sha256(body).digest()[:4], "big") & SEED_MAX
    if not (text.isascii() and text.isdigit()):  # int() would also take "1_0" or " 1"
        raise RequestError(400, f"seed={text!r}: expected an integer")
    seed = int(text)
    if not 0 <= seed <= SEED_MAX:
        raise RequestError(400, f"seed={seed}: must be in 0..{SEED_MAX}")
    return seed


def request_params(
    method: str, defaults: Mapping[str, Any], query: Mapping[str, str]
) -> dict[str, Any]:
    """The server's typed settings with the query's method parameters on top, checked."""
    cls = purifier_class(method)
    fields = {info.name: info for info in setting_fields(cls.Settings)}
    overrides = {k: v for k, v in query.items() if k not in RESERVED}
    try:
        typed = {k: parse_setting(fields[k], v) if k in fields else v for k, v in overrides.items()}
        return make_settings(cls, {**defaults, **typed}).as_dict()
    except ParamError as error:
        raise RequestError(400, str(error)) from None


def flag(query: Mapping[str, str], name: str) -> bool:
    """A yes/no query parameter, read as method settings are (absent or empty: no)."""
    value = query.get(name, "0").strip() or "0"
    try:
        return parse_bool(value)
    except ValueError:
        raise RequestError(400, f"{name}={value!r}: use 1 or 0") from None


def top5(logits: torch.Tensor) -> list[dict[str, Any]]:
    """The five most probable classes of one image's logits, most probable first."""
    probabilities = torch.softmax(logits.double(), dim=-1)
    values, indices = probabilities.topk(5)
    return [
        {
            "index": int(i),
            "wnid": wnids()[int(i)],
            "name": class_names()[int(i)],
            "probability": float(p),
        }
        for p, i in zip(values.tolist(), indices.tolist(), strict=True)
    ]


def methods_json() -> list[dict[str, Any]]:
    """Every method with its parameters (``GET /methods``)."""
    out = []
    for name in list_purifiers():
        cls = purifier_class(name)
        out.append(
            {
                "method": name,
                "description": cls.description,
                "stochastic": cls.stochastic,
                "parameters": [
                    {
                        "name": p.name,
                        "type": p.type.__name__,
                        "default": p.default,
                        "range": p.describe_range(),
                        "help": p.help,
                    }
                    for p in setting_fields(cls.Settings)
                ],
            }
        )
    return out
