"""The built-in sample photographs used by ``make demo``."""

from pathlib import Path

from advpurify.images import find_images, load_image
from advpurify.samples import write_sample_photos


def test_sample_photos_are_written_once_and_decode(tmp_path: Path) -> None:
    paths = write_sample_photos(tmp_path)
    assert len(paths) == 8 and find_images(tmp_path) == sorted(paths)
    stamp = {p: p.stat().st_mtime_ns for p in paths}
    write_sample_photos(tmp_path)  # a second call keeps what is there
    assert {p: p.stat().st_mtime_ns for p in paths} == stamp
    for path in paths:
        image = load_image(path)
        assert image.shape[0] == 3 and min(image.shape[1:]) >= 200
