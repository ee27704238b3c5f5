"""Where things live: the shared test data and the per-user cache."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    """Read-only test data: ``$ADVPURIFY_DATA``, else ``../shared/data`` beside the project."""
    env = os.environ.get("ADVPURIFY_DATA")
    return Path(env) if env else PROJECT_ROOT.parent / "shared" / "data"


def cache_home() -> Path:
    """Weights, converted models and engines: ``$ADVPURIFY_HOME``, else the user cache dir."""
    env = os.environ.get("ADVPURIFY_HOME")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "advpurify"
