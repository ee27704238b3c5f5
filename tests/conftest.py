"""Shared fixtures: the committed fixture set (``tests/data``) and the whole shared data.

``tests/data`` holds what the suite needs in a fresh clone: a dozen ImageNet sample photographs
(varied classes, one grayscale, one tiny), the class list, the Caffe LeNet and Torch7 fixtures
and PPGN's two prototxts. Tests that need the whole 100-image sample (or the ILSVRC mean image)
ask for ``shared_data`` instead: ``$ADVPURIFY_DATA``, default ``../shared/data`` beside the
project; where it is absent they skip, naming the variable.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from advpurify.paths import shared_data_dir

torch.set_num_threads(2)

TEST_DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The committed fixture set, laid out as the shared data is."""
    return TEST_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The whole shared data (100 sample images, the ILSVRC mean image); skips where absent."""
    path = shared_data_dir()
    if not (path / "imagenet-sample").is_dir():
        pytest.skip(f"needs the full test data: set ADVPURIFY_DATA (nothing at {path})")
    return path


@pytest.fixture(scope="session")
def sample_dir(data_dir: Path) -> Path:
    """A dozen real ImageNet images, WordNet id at the start of each file name."""
    return data_dir / "imagenet-sample"


@pytest.fixture(scope="session")
def sample_paths(sample_dir: Path) -> list[Path]:
    return sorted(p for p in sample_dir.iterdir() if p.is_file())


@pytest.fixture(scope="session")
def full_sample_paths(shared_data: Path) -> list[Path]:
    """All 100 shared ImageNet sample images."""
    return sorted(p for p in (shared_data / "imagenet-sample").iterdir() if p.is_file())


@pytest.fixture(scope="session")
def small_real_images(sample_paths: list[Path]) -> torch.Tensor:
    """Four real photographs, resized to 64x64: a 4 x 3 x 64 x 64 float32 batch in [0, 1]."""
    import numpy as np
    from PIL import Image

    arrays = []
    for path in sample_paths[:4]:
        with Image.open(path) as img:
            img = img.convert("RGB").resize((64, 64), Image.BILINEAR)
            arrays.append(np.asarray(img, dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray (2 CPUs) shared by every test that needs Ray, shut down at the end.

    Its temporary folder (sockets, logs) is a fresh short folder under /tmp, removed after:
    Ray's socket paths must stay under 108 bytes, and parallel sessions must not share one.
    """
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'advpurify[ray]'")
    import logging
    import shutil
    import tempfile

    if ray.is_initialized():  # a test started one by hand: share it, do not stop it
        yield ray
        return
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=512 * 2**20,
        _temp_dir=temp,
        logging_level=logging.WARNING,
    )
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
