"""Finding, decoding and encoding images, and writing them atomically.

Every image leaves this module as a float32 RGB tensor ``3 x H x W`` with values in ``[0, 1]``,
whatever it was on disk: 8- or 16-bit, grayscale, palette, CMYK, with or without alpha. Alpha is
dropped by compositing onto a background (white by default: transparent regions of logos and
product shots are meant to be seen on white; ``background="black"`` for the other convention).
EXIF orientation is applied, so the tensor is the image as a viewer shows it.
"""

from __future__ import annotations

import io
import itertools
import os
import re
import stat
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import simplejpeg
import torch
from PIL import Image, UnidentifiedImageError

from advpurify.errors import AdvpurifyError
from advpurify.files import atomic_write_bytes

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
    | {".ppm", ".pgm", ".pbm", ".pnm"}
)
OUTPUT_FORMATS = {"png": ".png", "jpg": ".jpg", "webp": ".webp"}
BACKGROUNDS = {"white": 1.0, "black": 0.0}
# The default per-image limit: 2**26 pixels (67.1 million; a 64-megapixel photograph, 9248 x
# 6936 = 64.1 million, fits) decode to 805 MB as float32 RGB. Below Pillow's own
# decompression-bomb warning (89 megapixels).
MAX_IMAGE_PIXELS = 2**26
# Profiles above this are not carried into outputs: Pillow (and so advpurify) refuses a PNG
# whose iCCP chunk inflates to more than 1 MiB. Real profiles are a few kB to a few 100 kB.
MAX_PROFILE_BYTES = 1 << 20


class ImageDecodeError(AdvpurifyError):
    """A file that is not a readable image: names the file and the reason."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def find_images(root: Path | str, left_out: list[Path] | None = None) -> list[Path]:
    """Image files under ``root``, recursively, in a stable order (sorted relative paths).

    Hidden files and folders (a leading dot) are skipped: they include our own temporary files.
    Other files without an image extension, and folders reached through a symbolic link (not
    entered: a link may lead into the output, or round in a loop), are appended to
    ``left_out`` when it is given.
    """
    root = Path(root)
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if left_out is not None:
            left_out += [Path(folder) / d for d in dirs if os.path.islink(os.path.join(folder, d))]
        for name in files:
            if name.startswith("."):
                continue
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(folder) / name)
            elif left_out is not None:
                left_out.append(Path(folder) / name)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def check_background(background: str) -> None:
    if background not in BACKGROUNDS:
        raise AdvpurifyError(f"--background {background!r}: use white or black")


def check_max_pixels(max_pixels: int) -> None:
    if max_pixels < 1:
        raise AdvpurifyError(f"--max-image-pixels {max_pixels}: must be at least 1")


def allow_pixels(max_pixels: int | None) -> None:
    """Raise Pillow's process-wide decompression-bomb limit (a warning above it, an error above
    twice it) to ``max_pixels`` where that is higher, so the per-image limit the user chose is
    the one that holds; never lowered. None: no limit at all."""
    current = Image.MAX_IMAGE_PIXELS
    if current is not None and (max_pixels is None or max_pixels > current):
        Image.MAX_IMAGE_PIXELS = max_pixels


def image_size(path: Path | str) -> tuple[int, int] | None:
    """``(width, height)`` from the file's header alone (nothing decoded); None where it cannot
    be read (decoding the file then reports why)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None  # a FIFO would block the caller, a device never end
        with Image.open(path) as img:
            return img.size
    except Exception:  # noqa: BLE001 - any unreadable file: decoding names the reason
        return None


def read_image_file(path: Path | str, max_pixels: int | None = MAX_IMAGE_PIXELS) -> bytes:
    """The bytes of a regular file (links followed), refused without reading where it is a
    FIFO, device or socket, or larger than any encoding of ``max_pixels`` pixels could be."""
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO with no writer would otherwise wait forever.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        raise ImageDecodeError(path, f"cannot read file ({error.strerror or error})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ImageDecodeError(path, "is a folder, not a file")
        raise ImageDecodeError(path, "not a regular file (a FIFO, device or socket)")
    with os.fdopen(fd, "rb") as handle:
        if max_pixels is not None and info.st_size > _MAX_BYTES_PER_PIXEL * max_pixels + _SLACK:
            raise ImageDecodeError(
                path,
                f"refused: {info.st_size} bytes is more than an image within the per-image "
                f"limit of {max_pixels} pixels can take",
            )
        try:
            return handle.read()
        except OSError as error:
            raise ImageDecodeError(path, f"cannot read file ({error.strerror or error})") from None


# 16-bit RGBA stored raw takes 8 bytes per pixel; the slack covers headers and metadata.
_MAX_BYTES_PER_PIXEL = 8
_SLACK = 64 << 20


def load_image(
    path: Path | str, background: str = "white", max_pixels: int | None = MAX_IMAGE_PIXELS
) -> torch.Tensor:
    """Decode any supported image file into a float32 RGB ``3 x H x W`` tensor in ``[0, 1]``.

    An image above ``max_pixels`` (from its header) is refused before it is decoded.
    """
    path = Path(path)
    return decode_image(read_image_file(path, max_pixels), path, background, max_pixels)


def load_image_with_profile(
    path: Path | str, background: str = "white", max_pixels: int | None = MAX_IMAGE_PIXELS
) -> tuple[torch.Tensor, bytes | None]:
    """:func:`load_image` and the file's RGB colour profile (None: none, or not an RGB one)."""
    path = Path(path)
    data = read_image_file(path, max_pixels)
    return decode_image_with_profile(data, path, background, max_pixels)


def decode_image(
    data: bytes,
    path: Path | str = "<bytes>",
    background: str = "white",
    max_pixels: int | None = MAX_IMAGE_PIXELS,
) -> torch.Tensor:
    """Decode image file bytes into a float32 RGB ``3 x H x W`` tensor in ``[0, 1]``: the values
    as stored, as ImageNet models were trained on them (an embedded colour profile is not
    applied; :func:`decode_image_with_profile` returns it, for the output to carry)."""
    return decode_image_with_profile(data, path, background, max_pixels)[0]


def decode_image_with_profile(
    data: bytes,
    path: Path | str = "<bytes>",
    background: str = "white",
    max_pixels: int | None = MAX_IMAGE_PIXELS,
) -> tuple[torch.Tensor, bytes | None]:
    """:func:`decode_image` and the file's ICC profile where it describes those RGB values."""
    path = Path(path)
    check_background(background)
    if not data:
        raise ImageDecodeError(path, "empty file (0 bytes)")
    allow_pixels(max_pixels)  # Pillow's own refusal (at twice its limit) then means over ours
    try:
        with Image.open(io.BytesIO(data)) as img:
            _check_size(img.size, max_pixels)
            page = _select_frame(img)
            _check_size(img.size, max_pixels)  # the page chosen may be another size
            orientation = img.getexif().get(0x0112, 1)
            profile = _rgb_profile(img)
            if img.format in ("JPEG", "MPO") and img.mode in ("RGB", "L"):
                # Most photographs: one strict decode, Pillow's pixels (decode_jpeg_rgb).
                return _uint8_to_tensor(decode_jpeg_rgb(data), orientation), profile
            if img.format == "PNG":
                check_png_data(data)
            img.load()  # decode everything now, so truncation is caught here
            if img.format in ("JPEG", "MPO"):
                _check_jpeg_data(data, img.mode)
            array = None
            if page == 0 and _more_than_8_bits(img, data):  # OpenCV reads the first page
                array = _decode_deep(data)  # full depth; its colour profile is not applied
            if array is None and img.mode in ("RGB", "L") and "transparency" not in img.info:
                return _uint8_to_tensor(
                    np.asarray(img.convert("RGB") if img.mode == "L" else img), orientation
                ), profile
            if array is None:
                array = _pil_to_float(img)
    except UnidentifiedImageError:
        head = data[:8]
        raise ImageDecodeError(
            path, f"not a recognised image (file starts with {head!r})"
        ) from None
    except _TooLarge as error:
        raise ImageDecodeError(path, f"refused: {error}") from None
    except _MultiFrame as error:
        raise ImageDecodeError(path, str(error)) from None
    except Image.DecompressionBombError as error:
        # Pillow's message names its own limit; the size is the part worth keeping.
        found = re.search(r"\((\d+) pixels\)", str(error))
        size = f"{found.group(1)} pixels" if found else "the image"
        raise ImageDecodeError(
            path,
            f"refused: {size} is above the per-image limit of {max_pixels} pixels",
        ) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageDecodeError(path, f"corrupt or truncated image data ({error})") from None
    rgb = _composite(array, BACKGROUNDS[background])
    rgb = _apply_orientation(rgb, orientation)
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))), profile


class _TooLarge(ValueError):
    pass


class _MultiFrame(ValueError):
    pass


def _select_frame(img: Image.Image) -> int:
    """Seek to the one picture of the file and return its frame index.

    An animation or a multi-page file has no one image to purify: its first frame alone would
    drop the rest silently, so it is refused. A camera's MPO JPEG is one photo with previews
    after it (frame 0 is the photo). A TIFF's reduced-resolution copies and masks
    (NewSubfileType bits 0 and 2) belong to its main page, which may come after a thumbnail.
    """
    if img.format == "MPO":
        return 0
    if img.format == "TIFF":
        pages = _tiff_main_pages(img)
        img.seek(pages[0])
    else:
        try:
            pages = list(range(getattr(img, "n_frames", 1)))
        except Exception as error:  # Pillow walks the frames: a broken chain raises anything
            raise ValueError(f"unreadable frames ({type(error).__name__}: {error})") from None
        finally:
            img.seek(0)
    if len(pages) > 1:
        raise _MultiFrame(
            f"{len(pages)} frames (an animation or a multi-page {img.format} file): only "
            "single images are read; save each frame as a file of its own"
        )
    return pages[0]


def _tiff_main_pages(img: Image.Image) -> list[int]:
    pages: list[int] = []
    for index in itertools.count():
        try:
            img.seek(index)
        except Exception:  # noqa: BLE001 - the end (EOFError) or a broken chain: libtiff, too,
            break  # reads the pages before it
        if not img.tag_v2.get(254, 0) & 0b101:
            pages.append(index)
    return pages or [0]


def rgb_profile(data: bytes) -> bytes | None:
    """The RGB colour profile embedded in image file bytes (None: none, or not an RGB one);
    reads the header only."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return _rgb_profile(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def _rgb_profile(img: Image.Image) -> bytes | None:
    """The embedded ICC profile when it describes the RGB values decoded (not a CMYK or grey
    one, which the conversion to RGB leaves behind)."""
    icc = img.info.get("icc_profile")
    if not icc or len(icc) < 128 or icc[16:20] != b"RGB " or len(icc) > MAX_PROFILE_BYTES:
        return None
    return icc if img.mode in ("RGB", "RGBA", "P", "PA") else None  # 16-bit RGB reads as RGB


def _more_than_8_bits(img: Image.Image, data: bytes) -> bool:
    """16-bit PNG/TIFF samples, which OpenCV decodes in full and Pillow reduces to 8 bits."""
    if img.format == "PNG":
        return len(data) > 24 and data[24] > 8  # IHDR's bit depth, right after the signature
    if img.format == "TIFF":
        bits = img.tag_v2.get(258, 8)  # BitsPerSample
        return max(bits if isinstance(bits, tuple) else (bits,)) > 8
    return False


def _check_size(size: tuple[int, int], max_pixels: int | None) -> None:
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise _TooLarge(
            f"{width} x {height} = {width * height} pixels is above the per-image limit of "
            f"{max_pixels} pixels"
        )


def _check_jpeg_data(data: bytes, mode: str) -> None:
    """Pillow decodes a JPEG whose entropy data is corrupt without complaint (libjpeg only warns
    and fills the rest grey); libjpeg-turbo through simplejpeg with ``strict`` turns those
    warnings into errors. Decoded at 1/8 scale: every coefficient is still read and checked."""
    colorspace = {"L": "GRAY", "CMYK": "CMYK"}.get(mode, "RGB")
    try:
        simplejpeg.decode_jpeg(data, colorspace, strict=True, min_height=1, min_width=1)
    except ValueError as error:
        raise ValueError(f"libjpeg: {error}") from None


def check_png_data(data: bytes) -> None:
    """Raise ``ValueError`` where a PNG chunk's CRC does not match its bytes: Pillow does not
    check the image data's CRCs (nor zlib's checksum), so a flipped byte decodes to garbage."""
    view = memoryview(data)
    offset = 8  # the signature
    while offset + 12 <= len(view):
        length = int.from_bytes(view[offset : offset + 4], "big")
        end = offset + 8 + length
        if end + 4 > len(view):
            return  # truncated: the decoder reports it
        stored = int.from_bytes(view[end : end + 4], "big")
        if zlib.crc32(view[offset + 4 : end]) != stored:
            kind = bytes(view[offset + 4 : offset + 8]).decode("latin-1")
            raise ValueError(f"PNG {kind} chunk at byte {offset}: CRC mismatch")
        if view[offset + 4 : offset + 8] == b"IEND":
            return
        offset = end + 4


def decode_jpeg_rgb(data: bytes) -> np.ndarray:
    """An RGB or grey JPEG as ``H x W x 3`` uint8 in one strict libjpeg-turbo decode: the
    pixels Pillow gives (tested on the sample images), but corrupt entropy data raises
    ``ValueError`` instead of being filled grey. EXIF orientation is not applied."""
    try:
        return simplejpeg.decode_jpeg(data, "RGB", strict=True)
    except ValueError as error:
        raise ValueError(f"libjpeg: {error}") from None


def _uint8_to_tensor(array: np.ndarray, orientation: int) -> torch.Tensor:
    """8-bit ``H x W x 3`` RGB without alpha (most photographs): oriented and laid out as
    ``3 x H x W`` while still 8-bit, then one float32 allocation scaled in place, a quarter of
    the float temporaries of the general path (the same values: one float32 division)."""
    # Writable and C-ordered for torch (Pillow hands out a read-only buffer).
    array = np.require(_apply_orientation(array, orientation), requirements=["C", "W"])
    chw = torch.from_numpy(array).permute(2, 0, 1)
    return torch.empty(chw.shape, dtype=torch.float32).copy_(chw).div_(255.0)


def _pil_to_float(img: Image.Image) -> np.ndarray:
    """H x W x C float32 in [0, 1], C = 3 (RGB) or 4 (RGBA)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        gray = np.asarray(img, dtype=np.float32) / 65535.0
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode == "I":
        gray = np.asarray(img, dtype=np.float32)
        # A 16-bit PGM/PPM is 16-bit whatever its pixels; elsewhere (32-bit TIFF) the range is
        # guessed from the values, then clipped.
        wide = img.format == "PPM" or gray.max(initial=0) > 255
        gray = np.clip(gray / (65535.0 if wide else 255.0), 0.0, 1.0)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode == "F":
        gray = np.asarray(img, dtype=np.float32)
        if not np.isfinite(gray).all():
            raise ValueError("float pixels that are NaN or infinite")
        return np.repeat(np.clip(gray, 0.0, 1.0)[..., None], 3, axis=2)
    has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
    img = img.convert("RGBA" if has_alpha else "RGB")  # CMYK, palette, L, 1 included
    return np.asarray(img, dtype=np.float32) / 255.0


def _decode_deep(data: bytes) -> np.ndarray | None:
    """16-bit PNG/TIFF through OpenCV (full depth); None for 8-bit files (Pillow does those)."""
    buffer = np.frombuffer(data, dtype=np.uint8)
    decoded = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    if decoded is None or decoded.dtype != np.uint16:
        return None
    array = decoded.astype(np.float32) / 65535.0
    if array.ndim == 2:
        return np.repeat(array[..., None], 3, axis=2)
    if array.shape[2] == 4:
        return cv2.cvtColor(array, cv2.COLOR_BGRA2RGBA)
    return cv2.cvtColor(array[..., :3], cv2.COLOR_BGR2RGB)


def _composite(array: np.ndarray, background: float) -> np.ndarray:
    if array.shape[2] == 3:
        return array.astype(np.float32, copy=False)
    alpha = array[..., 3:4]
    return (array[..., :3] * alpha + background * (1.0 - alpha)).astype(np.float32)


_ORIENTATION_OPS = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, -1)[::-1],
    8: lambda a: np.rot90(a, 1),
}


def _apply_orientation(array: np.ndarray, orientation: int) -> np.ndarray:
    # The same transposes as PIL.ImageOps.exif_transpose, applied to the float array.
    op = _ORIENTATION_OPS.get(int(orientation))
    return op(array) if op else array


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """``3 x H x W`` float tensor in [0, 1] -> ``H x W x 3`` uint8 array (rounded, clipped)."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a 3 x H x W image, got shape {tuple(image.shape)}")
    # One temporary, scaled in place: outputs of tens of megapixels are common.
    scaled = image.detach().to("cpu", torch.float32).clamp(0, 1).mul_(255).round_()
    return scaled.to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


# The largest side each output format can hold (WebP's 14-bit sizes; libjpeg's 65500).
MAX_SIDE = {"png": 2**31 - 1, "jpg": 65500, "webp": 16383}


class UnencodableError(AdvpurifyError):
    """An image the output format cannot hold; ``reason`` is the manifest's line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def check_encodable(width: int, height: int, fmt: str) -> None:
    """Raise where an image of this size cannot be written as ``fmt`` (before it is purified)."""
    side = MAX_SIDE[fmt]
    if max(width, height) > side:
        raise UnencodableError(
            f"{width} x {height} is too large for {fmt} (at most {side} pixels a side): "
            "use --format png"
        )


def encode_image(
    image: torch.Tensor, fmt: str = "png", quality: int = 95, profile: bytes | None = None
) -> bytes:
    """Encode a ``3 x H x W`` image; PNG is lossless, JPEG and WebP take ``quality`` (1-100).
    ``profile``: an ICC profile to embed (the input's: the values keep its colours)."""
    if fmt not in OUTPUT_FORMATS:
        raise AdvpurifyError(f"format {fmt!r}: use one of {', '.join(OUTPUT_FORMATS)}")
    check_encodable(image.shape[-1], image.shape[-2], fmt)
    bgr = cv2.cvtColor(to_uint8(image), cv2.COLOR_RGB2BGR)
    if fmt == "png":
        # Level 3: within a few percent of level 9's size at several times its speed.
        params = [cv2.IMWRITE_PNG_COMPRESSION, 3]
    elif fmt == "jpg":
        params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    else:
        params = [cv2.IMWRITE_WEBP_QUALITY, int(quality)]
    ok, buffer = cv2.imencode(OUTPUT_FORMATS[fmt], bgr, params)
    if not ok:
        raise AdvpurifyError(f"could not encode a {tuple(image.shape)} image as {fmt}")
    data = buffer.tobytes()
    if profile:
        width, height = image.shape[-1], image.shape[-2]
        data = _EMBED_PROFILE[fmt](data, profile, width, height)
    return data


# OpenCV writes no colour profile: each format's own container holds one (PNG iCCP chunk,
# JPEG APP2 segments, WebP ICCP chunk in the extended format).
def _png_with_profile(data: bytes, icc: bytes, width: int, height: int) -> bytes:
    body = b"ICC profile\0\0" + zlib.compress(icc)
    chunk = struct.pack(">I", len(body)) + b"iCCP" + body
    chunk += struct.pack(">I", zlib.crc32(b"iCCP" + body))
    end_of_ihdr = 8 + 8 + 13 + 4  # signature, IHDR's length + type, its 13 bytes, its CRC
    return data[:end_of_ihdr] + chunk + data[end_of_ihdr:]


def _jpeg_with_profile(data: bytes, icc: bytes, width: int, height: int) -> bytes:
    size = 65519  # a segment holds 65535 bytes: length (2), "ICC_PROFILE\0" (12), index, count
    parts = [icc[i : i + size] for i in range(0, len(icc), size)]
    if len(parts) > 255:
        raise AdvpurifyError(f"colour profile of {len(icc)} bytes: too large for a JPEG")
    segments = b"".join(
        b"\xff\xe2"
        + struct.pack(">H", 2 + 14 + len(part))
        + b"ICC_PROFILE\0"
        + bytes((k + 1, len(parts)))
        + part
        for k, part in enumerate(parts)
    )
    at = 2  # after SOI, and after a JFIF APP0 segment (it must come first)
    if data[2:4] == b"\xff\xe0":
        at = 4 + struct.unpack(">H", data[4:6])[0]
    return data[:at] + segments + data[at:]


def _webp_with_profile(data: bytes, icc: bytes, width: int, height: int) -> bytes:
    chunks = data[12:]  # after "RIFF", the size, "WEBP"
    iccp = b"ICCP" + struct.pack("<I", len(icc)) + icc + b"\0" * (len(icc) % 2)
    if chunks[:4] == b"VP8X":  # already extended: set its ICC flag, the profile follows it
        header = bytearray(chunks[:18])
        header[8] |= 0x20
        chunks = bytes(header) + iccp + chunks[18:]
    else:
        canvas = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
        vp8x = b"VP8X" + struct.pack("<I", 10) + bytes((0x20, 0, 0, 0)) + canvas
        chunks = vp8x + iccp + chunks
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WEBP" + chunks


_EMBED_PROFILE = {"png": _png_with_profile, "jpg": _jpeg_with_profile, "webp": _webp_with_profile}


def save_image(
    image: torch.Tensor,
    path: Path | str,
    fmt: str | None = None,
    quality: int = 95,
    profile: bytes | None = None,
) -> None:
    """Encode and atomically write one image; the format defaults to the file's extension."""
    path = Path(path)
    if fmt is None:
        jpeg = {".jpg": "jpg", ".jpeg": "jpg", ".jpe": "jpg", ".jfif": "jpg"}
        fmt = {".png": "png", ".webp": "webp", **jpeg}.get(path.suffix.lower(), "png")
    atomic_write_bytes(path, encode_image(image, fmt, quality, profile))
