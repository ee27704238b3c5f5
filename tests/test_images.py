"""Discovery, decoding of every supported kind of image, encoding and atomic writes."""

from __future__ import annotations

import io
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from advpurify.errors import AdvpurifyError
from advpurify.files import atomic_output, atomic_write_bytes, remove_stale_temporaries
from advpurify.images import (
    ImageDecodeError,
    decode_image,
    decode_image_with_profile,
    encode_image,
    find_images,
    load_image,
    save_image,
    to_uint8,
)


def _pil_bytes(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def test_find_images_is_recursive_sorted_and_skips_hidden(tmp_path: Path) -> None:
    for rel in [
        "b/2.PNG",
        "a.jpg",
        "b/1.webp",
        "c/d/e.TIFF",
        ".hidden/x.png",
        "notes.txt",
        "b/.x.png.abc.partial",
        "z.bmp",
        "y.jpeg",
        "w.tif",
    ]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert found == ["a.jpg", "b/1.webp", "b/2.PNG", "c/d/e.TIFF", "w.tif", "y.jpeg", "z.bmp"]


def test_real_jpeg_decodes_like_pillow(sample_paths: list[Path]) -> None:
    path = sample_paths[0]
    image = load_image(path)
    with Image.open(path) as img:
        expected = np.asarray(img.convert("RGB"), dtype=np.float32) / 255
    assert image.dtype == torch.float32 and image.shape == (3, *expected.shape[:2])
    assert np.array_equal(image.permute(1, 2, 0).numpy(), expected)


def test_grayscale_samples_become_three_equal_channels(sample_paths: list[Path]) -> None:
    gray = []
    for path in sample_paths:
        with Image.open(path) as img:
            if img.mode == "L":
                gray.append(path)
    assert gray  # the fixture set holds a grayscale JPEG (the full sample has four)
    for path in gray:
        image = load_image(path)
        assert image.shape[0] == 3
        assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_16_bit_colour_png_keeps_its_precision(tmp_path: Path) -> None:
    rgb16 = np.zeros((4, 5, 3), dtype=np.uint16)
    rgb16[..., 0] = 1000  # not a multiple of 257: an 8-bit decode would lose it
    rgb16[..., 2] = 65535
    path = tmp_path / "deep.png"
    cv2.imwrite(str(path), cv2.cvtColor(rgb16, cv2.COLOR_RGB2BGR))
    image = load_image(path)
    assert torch.allclose(image[0], torch.full((4, 5), 1000 / 65535))
    assert torch.allclose(image[2], torch.ones(4, 5))
    assert torch.all(image[1] == 0)


def test_16_bit_grayscale_png(tmp_path: Path) -> None:
    gray = np.arange(20, dtype=np.uint16).reshape(4, 5) * 3000
    path = tmp_path / "gray16.png"
    Image.fromarray(gray).save(path)
    image = load_image(path)
    assert torch.allclose(image[1], torch.from_numpy(gray.astype(np.float32) / 65535))


@pytest.mark.parametrize(("background", "value"), [("white", 1.0), ("black", 0.0)])
def test_rgba_is_composited_on_the_chosen_background(background: str, value: float) -> None:
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[1, 1] = (0, 0, 255, 0)  # fully transparent
    data = _pil_bytes(Image.fromarray(rgba, "RGBA"), "PNG")
    image = decode_image(data, "x.png", background=background)
    assert image[:, 0, 0].tolist() == [1.0, 0.0, 0.0]
    assert image[:, 1, 1].tolist() == [value] * 3


def test_palette_with_transparency_cmyk_and_bilevel() -> None:
    palette = Image.new("P", (3, 3), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.info["transparency"] = 0
    image = decode_image(_pil_bytes(palette, "PNG"), "p.png")
    assert image[:, 1, 1].tolist() == pytest.approx([10 / 255, 200 / 255, 30 / 255])

    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    red = decode_image(_pil_bytes(cmyk, "JPEG", quality=100), "c.jpg")
    assert red[0].mean() > 0.95 and red[1].mean() < 0.05

    bilevel = Image.new("1", (4, 4), 1)
    assert torch.all(decode_image(_pil_bytes(bilevel, "BMP"), "b.bmp") == 1)


def test_exif_orientation_is_applied() -> None:
    pixels = np.zeros((2, 4, 3), dtype=np.uint8)
    pixels[0, 0] = 255  # top-left white
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6  # stored rotated: a viewer turns it 90 degrees clockwise
    image = decode_image(_pil_bytes(img, "JPEG", quality=100, exif=exif.tobytes()), "r.jpg")
    assert image.shape == (3, 4, 2)
    assert image[:, 0, 1].min() > 0.8  # the white corner is now at the top right


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillow(orientation: int) -> None:
    # Distinct pixel values, a non-square image: any wrong flip or transpose shows.
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 14
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = orientation
    data = _pil_bytes(img, "PNG", exif=exif.tobytes())
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
    image = decode_image(data, "o.png")
    assert np.array_equal(to_uint8(image), expected)


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.png", b"", "empty file"),
        ("text.jpg", b"this is not an image\n", "not a recognised image"),
    ],
)
def test_bad_files_name_the_file_and_the_reason(
    tmp_path: Path, name: str, content: bytes, reason: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError) as caught:
        load_image(path)
    assert str(path) in str(caught.value) and reason in str(caught.value)


def test_truncated_real_jpeg_is_refused(tmp_path: Path, sample_paths: list[Path]) -> None:
    data = sample_paths[1].read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="truncated"):
        load_image(path)


def test_png_round_trip_is_lossless_and_lossy_formats_honour_quality(
    tmp_path: Path, sample_paths: list[Path]
) -> None:
    image = load_image(sample_paths[2])
    save_image(image, tmp_path / "x.png")
    assert torch.equal(load_image(tmp_path / "x.png"), image)
    for fmt in ("jpg", "webp"):
        low, high = encode_image(image, fmt, 20), encode_image(image, fmt, 95)
        assert len(low) < len(high)
        decoded = decode_image(high, f"x.{fmt}")
        assert (decoded - image).abs().mean() < 0.02


def test_atomic_write_leaves_no_temporary_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.png"
    atomic_write_bytes(target, b"first")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert [p.name for p in target.parent.iterdir()] == ["out.png"]


@pytest.mark.parametrize("stem", ["x" * 251, "é" * 125, "é" * 124 + "xx"])
def test_atomic_write_of_the_longest_names(tmp_path: Path, stem: str) -> None:
    # 254-255 bytes: the temporary's name is cut (here inside a two-byte character, too).
    target = tmp_path / f"{stem}.png"
    atomic_write_bytes(target, b"data")
    assert target.read_bytes() == b"data" and len(list(tmp_path.iterdir())) == 1

    with pytest.raises(KeyboardInterrupt), atomic_output(target) as tmp:
        temporary = tmp.name
        raise KeyboardInterrupt
    (tmp_path / temporary).write_bytes(b"half")  # what a kill -9 mid-write would leave
    assert len(os.fsencode(temporary)) <= 255
    assert remove_stale_temporaries(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_failed_write_cleans_up_and_stale_temporaries_are_removed(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        atomic_write_bytes(tmp_path / "x.png", object())  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
    (tmp_path / ".x.png.abc12345.partial").write_bytes(b"half")  # as mkstemp names them
    (tmp_path / ".notes.partial").write_text("a user file")  # not ours: kept
    assert remove_stale_temporaries(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == [".notes.partial"]


def test_strict_jpeg_decode_gives_pillows_pixels(sample_paths: list[Path]) -> None:
    from advpurify.images import decode_jpeg_rgb

    grey = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56), np.uint8), "L")
    photos = [p.read_bytes() for p in sample_paths] + [_pil_bytes(grey, "JPEG", quality=90)]
    for data in photos:
        with Image.open(io.BytesIO(data)) as img:
            expected = np.asarray(img.convert("RGB"))
        assert np.array_equal(decode_jpeg_rgb(data), expected)
    with pytest.raises(ValueError, match="libjpeg"):
        decode_jpeg_rgb(photos[0][: len(photos[0]) // 2])


def test_atomic_output_keeps_the_usual_mode_when_the_writer_recreates_the_file(
    tmp_path: Path,
) -> None:
    from safetensors.torch import save_file

    target = tmp_path / "w.safetensors"
    with atomic_output(target) as tmp:
        save_file({"a": torch.zeros(2)}, str(tmp))  # replaces the file mkstemp made (0600)
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_write_onto_a_folder_names_the_folder(tmp_path: Path) -> None:
    (tmp_path / "out.json").mkdir()
    with pytest.raises(AdvpurifyError, match=r"out.json is a folder: name a file"):
        atomic_write_bytes(tmp_path / "out.json", b"{}")
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def _rgb_profile(description: str, primaries: list[tuple[float, float, float]]) -> bytes:
    """A minimal ICC v2 RGB matrix/TRC profile (gamma 2.2) with the given D50 primaries."""
    import struct

    def s15(x: float) -> bytes:
        return struct.pack(">i", round(x * 65536))

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ \0\0\0\0" + s15(x) + s15(y) + s15(z)

    text = description.encode() + b"\0"
    desc = b"desc\0\0\0\0" + struct.pack(">I", len(text)) + text + b"\0" * 78
    curve = b"curv\0\0\0\0" + struct.pack(">IH", 1, round(2.2 * 256)) + b"\0\0"
    red, green, blue = (xyz(*p) for p in primaries)
    tags = [(b"desc", desc), (b"cprt", b"text\0\0\0\0none\0"), (b"wtpt", xyz(0.9642, 1, 0.8249))]
    tags += [(b"rXYZ", red), (b"gXYZ", green), (b"bXYZ", blue)]
    tags += [(b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    offset, table, data = 128 + 4 + 12 * len(tags), b"", b""
    for signature, body in tags:
        body += b"\0" * (-len(body) % 4)
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body
    body = struct.pack(">I", len(tags)) + table + data
    header = struct.pack(">I", 128 + len(body)) + b"none" + struct.pack(">I", 0x02100000)
    header += b"mntrRGB XYZ " + b"\0" * 12 + b"acsp" + b"APPL" + b"\0" * 24
    header += s15(0.9642) + s15(1.0) + s15(0.8249) + b"none" + b"\0" * 44
    assert len(header) == 128
    return header + body


DISPLAY_P3 = [(0.5151, 0.2412, -0.0011), (0.2920, 0.6922, 0.0419), (0.1571, 0.0666, 0.7841)]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_an_rgb_colour_profile_is_kept_with_the_values_as_stored(fmt: str) -> None:
    # The values a classifier sees are the stored ones (as every ImageNet pipeline decodes
    # them); the profile goes into the output, so viewers show its colours as the input's.
    icc = _rgb_profile("Display P3 (test)", DISPLAY_P3)
    photo = Image.new("RGB", (16, 16), (200, 120, 60))
    options = {"quality": 100, "lossless": True} if fmt == "WEBP" else {}
    data = _pil_bytes(photo, fmt, icc_profile=icc, **options)
    image, profile = decode_image_with_profile(data, f"p.{fmt.lower()}")
    assert profile == icc
    assert (image[:, 8, 8] * 255).round().tolist() == pytest.approx([200, 120, 60], abs=1)
    for out in ("png", "jpg", "webp"):
        encoded = encode_image(image, out, 95, profile)
        with Image.open(io.BytesIO(encoded)) as written:
            written.load()  # a valid file, whole
            assert written.info["icc_profile"] == icc
        again, kept = decode_image_with_profile(encoded, f"o.{out}")
        assert kept == icc and (again - image).abs().max() < 4 / 255
    # A grey or CMYK profile does not describe the RGB output: left behind.
    cmyk_icc = icc[:16] + b"CMYK" + icc[20:]
    assert decode_image_with_profile(_pil_bytes(photo, "PNG", icc_profile=cmyk_icc))[1] is None


def test_a_profile_larger_than_one_jpeg_segment_is_split() -> None:
    icc = _rgb_profile("big", DISPLAY_P3) + bytes(200_000)  # 4 APP2 segments
    icc = icc[:0] + len(icc).to_bytes(4, "big") + icc[4:]  # the header's size field
    encoded = encode_image(torch.full((3, 8, 8), 0.5), "jpg", 90, icc)
    with Image.open(io.BytesIO(encoded)) as written:
        assert written.info["icc_profile"] == icc


def test_purify_batch_outputs_carry_the_inputs_profile(tmp_path: Path) -> None:
    from advpurify.pipeline.batch import run_pipeline
    from advpurify.purifiers import create_purifier

    icc = _rgb_profile("Display P3 (test)", DISPLAY_P3)
    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (8, 8), (200, 120, 60)).save(src / "p3.png", icc_profile=icc)
    Image.new("RGB", (8, 8), (200, 120, 60)).save(src / "plain.png")
    run_pipeline(src, tmp_path / "out", create_purifier("bitdepth", bits=8))
    with (
        Image.open(tmp_path / "out" / "p3.png") as kept,
        Image.open(tmp_path / "out" / "plain.png") as plain,
    ):
        assert kept.info.get("icc_profile") == icc and "icc_profile" not in plain.info
        assert kept.getpixel((4, 4)) == (200, 120, 60)


@pytest.mark.parametrize(
    ("fmt", "name"), [("GIF", "a.gif"), ("PNG", "a.png"), ("WEBP", "a.webp"), ("TIFF", "a.tif")]
)
def test_animations_and_multi_page_files_are_refused_not_cut_to_a_frame(fmt, name) -> None:
    frames = [Image.new("RGB", (8, 6), colour) for colour in ("black", "white", "red")]
    buffer = io.BytesIO()
    frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:])
    with pytest.raises(ImageDecodeError, match="3 frames .* only single images are read"):
        decode_image(buffer.getvalue(), name)
    single = decode_image(_pil_bytes(frames[1], fmt), name)  # one frame: fine
    assert torch.all(single == 1)


def test_16_bit_detection_reads_the_file_not_its_name(tmp_path: Path) -> None:
    rgb16 = np.full((4, 5, 3), 1000, dtype=np.uint16)
    ok, encoded = cv2.imencode(".png", rgb16)
    assert ok
    image = decode_image(encoded.tobytes(), "misnamed.bmp")  # a 16-bit PNG whatever its name
    assert torch.allclose(image, torch.full_like(image, 1000 / 65535))


def test_more_extensions_are_found_and_the_rest_is_listed(tmp_path: Path) -> None:
    names = ["a.gif", "b.jfif", "c.jpe", "d.ppm", "e.pgm", "f.pnm", "g.png"]
    for name in [*names, "notes.txt", "noext"]:
        (tmp_path / name).write_bytes(b"x")
    left_out: list[Path] = []
    assert [p.name for p in find_images(tmp_path, left_out)] == names
    assert sorted(p.name for p in left_out) == ["noext", "notes.txt"]


def _tiff_pages(*pages: tuple[Image.Image, int]) -> bytes:
    """A TIFF of the given pages, each with its NewSubfileType (1: reduced resolution)."""
    from PIL import TiffImagePlugin

    buffer = io.BytesIO()
    with TiffImagePlugin.AppendingTiffWriter(buffer) as tiff:
        for page, subfile_type in pages:
            page.save(tiff, "TIFF", tiffinfo={254: subfile_type})
            tiff.newFrame()
    return buffer.getvalue()


def test_a_tiffs_thumbnail_pages_are_not_taken_for_the_picture() -> None:
    main = Image.new("RGB", (64, 48), (10, 200, 30))
    thumb = Image.new("RGB", (16, 12), (250, 0, 0))
    for pages in ([(main, 0), (thumb, 1)], [(thumb, 1), (main, 0)]):
        image = decode_image(_tiff_pages(*pages), "scan.tif")
        assert tuple(image.shape) == (3, 48, 64) and image[1].mean() > 0.7  # the main page
    with pytest.raises(ImageDecodeError, match="2 frames"):
        decode_image(_tiff_pages((main, 0), (main, 0)), "two.tif")


def test_broken_frame_chains_fail_as_decode_errors_or_read_like_libtiff() -> None:
    import struct

    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), (10, 200, 30)).save(buffer, "TIFF")
    data = bytearray(buffer.getvalue())
    first = struct.unpack("<I", data[4:8])[0]
    link = first + 2 + 12 * struct.unpack("<H", data[first : first + 2])[0]
    for offset in (9, len(data) - 3, len(data) + 1000):  # the next-page link leads nowhere
        data[link : link + 4] = struct.pack("<I", offset)
        assert tuple(decode_image(bytes(data), "a.tif").shape) == (3, 24, 32)  # page 1 only
    frames = [Image.new("RGB", (32, 24), colour) for colour in ("green", "red")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    gif = buffer.getvalue()
    rng = np.random.default_rng(0)
    for _ in range(120):
        broken = bytearray(gif)
        broken[rng.integers(13, len(gif))] = rng.integers(0, 256)
        try:
            decode_image(bytes(broken), "a.gif")
        except ImageDecodeError:
            pass  # anything else escaping is the failure


def test_a_corrupt_mpo_photo_is_refused_like_a_corrupt_jpeg() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    photo = Image.fromarray(pixels)
    buffer = io.BytesIO()
    photo.save(buffer, "MPO", save_all=True, append_images=[photo.resize((24, 16))], quality=90)
    mpo = buffer.getvalue()
    assert tuple(decode_image(mpo, "camera.jpg").shape) == (3, 64, 96)
    scan = mpo.index(b"\xff\xda")
    broken = mpo[: scan + 200] + b"\xff\xd9" * 30 + mpo[scan + 260 :]
    with pytest.raises(ImageDecodeError, match="corrupt"):
        decode_image(broken, "camera.jpg")


def test_a_profile_too_large_for_a_png_is_not_carried() -> None:
    icc = _rgb_profile("huge", DISPLAY_P3) + bytes(3_000_000)
    photo = Image.new("RGB", (8, 8), (200, 120, 60))
    assert decode_image_with_profile(_pil_bytes(photo, "JPEG", icc_profile=icc), "x.jpg")[1] is None


def test_a_killed_writers_temporary_in_a_shared_cache_is_removed_once_old(tmp_path) -> None:
    from advpurify.files import remove_stale_temporaries_of

    target = tmp_path / "net-fp32-abc.onnx"
    old, young = (
        tmp_path / ".net-fp32-abc.onnx.k3j9x0ab.partial",
        tmp_path / (".net-fp32-abc.onnx.zz11yy22.partial"),
    )
    other = tmp_path / ".other.onnx.k3j9x0ab.partial"
    mine = tmp_path / ".notes.partial"
    for path in (old, young, other, mine):
        path.write_bytes(b"")
    two_hours_ago = os.path.getmtime(old) - 7200
    for path in (old, other, mine):
        os.utime(path, (two_hours_ago, two_hours_ago))
    assert remove_stale_temporaries_of(target) == 1
    assert not old.exists() and young.exists() and other.exists() and mine.exists()
