"""Resumable experiment stages: per-image PNGs and the configuration they came from.

A stage folder holds ``config.json`` (what produced it), one lossless PNG per image (named by the
image's relative path), ``sources.json`` (per image, the digest of the file and the label it was
made from: a replaced or relabelled image is made again) and ``timing.json`` (seconds spent and
images computed, so a resumed run still reports the true cost per image). A rerun with the same
configuration reuses every image already written; a rerun with a different one is refused (or,
with ``overwrite``, starts over) rather than silently mixing results.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from advpurify.errors import AdvpurifyError
from advpurify.evaluation.dataset import to_float, to_uint8
from advpurify.files import atomic_write_bytes, mirror_names, refuse_other_settings
from advpurify.images import load_image, save_image
from advpurify.purifiers import current_config

IMAGES = "images"


class StageMismatchError(AdvpurifyError):
    """A report folder holds results of a different configuration."""


def _dump(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"


class Stage:
    def __init__(
        self,
        folder: Path,
        config: dict[str, Any],
        overwrite: bool = False,
        sources: Mapping[str, str] | None = None,
        profiles: Mapping[str, bytes | None] | None = None,
    ) -> None:
        """``sources``: per image key, a fingerprint of what its output is made from (the
        input file's digest and its label); an output stored for another fingerprint is
        made again (the file at that path was replaced, or relabelled). ``profiles``: per
        image key, the input's colour profile, embedded in its PNG."""
        self.sources = dict(sources) if sources is not None else None
        self.profiles = dict(profiles) if profiles is not None else {}
        self.folder = Path(folder)
        self.config = json.loads(_dump(config))  # normalised: what a reload gives back
        config_path = self.folder / "config.json"
        if config_path.is_file():
            stored = current_config(json.loads(config_path.read_text()))
            if stored != self.config:
                if not overwrite:
                    refuse_other_settings(self.folder, stored, self.config, StageMismatchError)
                self._clear()
        elif self.folder.is_dir():
            # Files beside a stage that has no config.json are somebody else's, which its
            # images would mix with. (Folders stay out of it: a stage writes only into its own
            # images/, and an adaptive stage holds its purified stage as a sub-folder.)
            foreign = sorted(
                p.name for p in self.folder.iterdir() if not p.is_dir() or p.name == IMAGES
            )
            if foreign:
                raise StageMismatchError(
                    f"{self.folder} holds files no experiment wrote (e.g. {foreign[0]}) and no "
                    "config.json; choose another report folder"
                )
        self.folder.mkdir(parents=True, exist_ok=True)
        if not config_path.is_file():
            atomic_write_bytes(config_path, _dump(self.config).encode())

    def _clear(self) -> None:
        """Remove what this stage wrote; anything else in the folder stays. The record of what
        each image was made from goes first (an image without it is made again) and the
        config last, so a stop midway leaves a stage this check still knows as its own."""
        (self.folder / "sources.json").unlink(missing_ok=True)
        shutil.rmtree(self.folder / IMAGES, ignore_errors=True)
        (self.folder / "timing.json").unlink(missing_ok=True)
        (self.folder / "config.json").unlink(missing_ok=True)

    def paths(self, keys: Sequence[str]) -> list[Path]:
        """Each image's PNG, named as ``purify-batch`` names outputs: ``a.jpg`` -> ``a.png``,
        and ``a.jpg.png`` / ``a.png.png`` where ``a.jpg`` and ``a.png`` are both inputs."""
        return [self.folder / IMAGES / name for name in mirror_names(keys, ".png")]

    def _made_from(self) -> dict[str, Any]:
        path = self.folder / "sources.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def _timing(self) -> dict[str, float]:
        path = self.folder / "timing.json"
        if path.is_file():
            return json.loads(path.read_text())
        return {"seconds": 0.0, "images": 0}

    def seconds_per_image(self) -> float | None:
        timing = self._timing()
        return timing["seconds"] / timing["images"] if timing["images"] else None

    def run(
        self,
        keys: Sequence[str],
        compute: Callable[[list[int]], torch.Tensor],
        batch_size: int,
        progress: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """Every image's output as ``N x 3 x H x W`` uint8: reused from disk or computed.

        ``compute(indices)`` returns the float ``[0, 1]`` outputs for those images; its wall
        time (synchronised on CUDA) is what ``seconds_per_image`` reports.
        """
        outputs: list[torch.Tensor | None] = [None] * len(keys)
        missing = []
        paths = self.paths(keys)
        made_from = self._made_from()
        for i, (key, path) in enumerate(zip(keys, paths, strict=True)):
            current = self.sources is None or made_from.get(key) == self.sources.get(key)
            if current and path.is_file():
                outputs[i] = to_uint8(load_image(path))
            else:
                missing.append(i)
        done = len(keys) - len(missing)
        if progress is not None:
            progress(done, len(keys))
        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            began = time.perf_counter()
            result = compute(chunk)
            if result.is_cuda:
                torch.cuda.synchronize(result.device)
            seconds = time.perf_counter() - began
            result = to_uint8(result.detach().cpu())
            for index, image in zip(chunk, result, strict=True):
                profile = self.profiles.get(keys[index])
                save_image(to_float(image), paths[index], fmt="png", profile=profile)
                outputs[index] = image
            if self.sources is not None:  # after the images: a crash between redoes them
                made_from.update({keys[i]: self.sources.get(keys[i]) for i in chunk})
                atomic_write_bytes(self.folder / "sources.json", _dump(made_from).encode())
            timing = self._timing()
            timing["seconds"] += seconds
            timing["images"] += len(chunk)
            atomic_write_bytes(self.folder / "timing.json", _dump(timing).encode())
            done += len(chunk)
            if progress is not None:
                progress(done, len(keys))
        return torch.stack(outputs)  # type: ignore[arg-type]
