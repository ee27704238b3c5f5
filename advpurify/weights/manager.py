"""fetch / import / list: turning a source's file into a cached, converted model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from advpurify.files import sha256_file
from advpurify.weights import cache
from advpurify.weights.download import ChecksumError, download, verify_file
from advpurify.weights.registry import (
    Source,
    WeightsError,
    expand,
    group_of,
    model_names,
    sources_for,
)
from advpurify.weights.state_dicts import read_safetensors

SUFFIX_FORMATS = {
    ".caffemodel": "caffemodel",
    ".pt": "torch",
    ".pth": "torch",
    ".t7": "torch7",
    ".safetensors": "safetensors",
    ".binaryproto": "binaryproto",
    ".npy": "npy",
}


def file_format(path: Path) -> str:
    fmt = SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        known = ", ".join(sorted(SUFFIX_FORMATS))
        raise WeightsError(f"{path}: unknown weight file type {path.suffix!r} (known: {known})")
    return fmt


def _install(source: Source, path: Path) -> Path:
    """Convert (which checks every shape and value) and only then write the cache entry."""
    state = (source.converter or read_safetensors)(path)
    broken = [k for k, t in state.items() if t.is_floating_point() and not t.isfinite().all()]
    if broken:  # a diverged training run's checkpoint: refused before it replaces a good file
        more = f" and {len(broken) - 3} more" if len(broken) > 3 else ""
        raise WeightsError(
            f"{path}: refused, NaN or infinite values in {', '.join(broken[:3])}{more}"
        )
    metadata = {
        "source": source.name,
        "format": source.format,
        "file": path.name,
        "sha256": sha256_file(path),
    }
    return cache.save_state_dict(source.model, state, metadata)


def fetch(
    name: str, *, force: bool = False, progress: bool = True, keep_download: bool = False
) -> list[Path]:
    """Download, verify and convert every model ``name`` stands for; returns the cached files."""
    installed = []
    for model in expand(name):
        if cache.is_cached(model) and not force:
            installed.append(cache.cached_path(model))
            continue
        installed.append(
            _fetch_model(model, progress=progress, keep_download=keep_download, fresh=force)
        )
    return installed


def _fetch_model(model: str, *, progress: bool, keep_download: bool, fresh: bool) -> Path:
    failures = []
    for source in sources_for(model):
        if not source.url:
            continue
        target = cache.downloads_dir() / source.file_name
        if fresh:
            target.unlink(missing_ok=True)  # --force: download again, whatever is kept
        try:
            if target.exists():
                # A finished earlier download: trust it only if it still verifies.
                verify_file(target, size=source.size, sha256=source.sha256, sha1=source.sha1)
            else:
                download(
                    source.url,
                    target,
                    size=source.size,
                    sha256=source.sha256,
                    sha1=source.sha1,
                    progress=progress,
                )
            path = _install(source, target)
        except WeightsError as error:  # unreachable, corrupt or of the wrong shapes: next source
            # A file that fails its checksum, or one with no checksum to vouch for it that does
            # not convert (an error page, a cut transfer), is deleted: the next try downloads.
            unvouched = not (source.sha256 or source.sha1)
            if target.exists() and (isinstance(error, ChecksumError) or unvouched):
                target.unlink()
            failures.append(str(error))
            continue
        if not keep_download:
            target.unlink(missing_ok=True)
        return path
    reasons = "; ".join(failures) or "no source has a URL"
    raise WeightsError(
        f"could not fetch weights {model} ({reasons}); if you have the file, run "
        f"`advpurify weights import {model} FILE`"
    )


def import_file(name: str, path: Path | str, *, verify: bool = True) -> list[tuple[str, Path]]:
    """Install a file the user already has as (one of) the model(s) ``name`` stands for.

    For a group the file's format and contents pick the model (a CaffeNet file is not a valid
    generator). Known sizes and checksums are checked unless ``verify`` is False; layer names
    and shapes are always checked.
    """
    path = Path(path)
    models = expand(name)  # an unknown name first: it is what the user must fix
    if path.is_dir():
        raise WeightsError(f"{path}: is a folder, not a weights file")
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    fmt = file_format(path)
    candidates = [s for m in models for s in sources_for(m) if s.format == fmt]
    if not candidates:
        accepted = sorted({s.format for m in models for s in sources_for(m)})
        raise WeightsError(
            f"{path}: a {fmt} file cannot provide {name} (accepted: {', '.join(accepted)})"
        )
    failures = []
    for source in candidates:
        try:
            if verify:
                verify_file(
                    path, size=source.size, sha256=source.sha256, sha1=source.sha1, label=str(path)
                )
            return [(source.model, _install(source, path))]
        except ChecksumError as error:
            reason = str(error).removeprefix(f"{path}: ")
            failures.append(f"as {source.model}: {reason} (--no-verify imports it anyway)")
        except WeightsError as error:
            failures.append(f"as {source.model}: {str(error).removeprefix(f'{path}: ')}")
    raise WeightsError(f"{path}: not imported: " + "; ".join(failures))


@dataclasses.dataclass(frozen=True)
class Entry:
    model: str
    group: str | None
    cached: bool
    path: Path
    bytes: int | None
    sources: tuple[Source, ...]
    damage: str | None = None  # why the cached file is not whole (None: it is, or none cached)


def entries() -> list[Entry]:
    """Every known model: whether and where it is cached, and where it comes from."""
    result = []
    for model in model_names():
        path = cache.cached_path(model)
        cached = path.is_file()
        result.append(
            Entry(
                model=model,
                group=group_of(model),
                cached=cached,
                path=path,
                bytes=path.stat().st_size if cached else None,
                sources=tuple(sources_for(model)),
                damage=cache.damage(path) if cached else None,
            )
        )
    return result
