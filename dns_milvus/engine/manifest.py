"""Reading a model set's ``manifest.json`` (see ``dns_milvus.engine.modelset``): the one place
that parses its entries, for the torch networks and for their NumPy stage 2 alike."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dns_milvus.errors import CheckpointError, InvalidInputError
from dns_milvus.scoring import ScoreMerge

MANIFEST = "manifest.json"
#: Regions a frame of the release's features (a 3x3 grid).
DEFAULT_REGIONS = 9
#: The networks every model set names.
NETWORK_ENTRIES = ("coarse", "fine", "selector")


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of the model set in ``directory``, checked to name its three networks."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a model set: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    missing = [k for k in NETWORK_ENTRIES if k not in manifest]
    if missing:
        raise CheckpointError(f"{path} lacks the entries {missing}")
    return manifest


def manifest_merge(manifest: dict[str, Any], path: Path) -> ScoreMerge:
    try:
        return ScoreMerge.from_dict(manifest.get("merge"))
    except InvalidInputError as exc:
        raise CheckpointError(f"{path}: bad 'merge' entry: {exc}") from exc


def manifest_regions(manifest: dict[str, Any], path: Path) -> int:
    regions = manifest.get("regions", DEFAULT_REGIONS)
    if isinstance(regions, bool) or not isinstance(regions, int) or regions < 1:
        raise CheckpointError(f"{path}: 'regions' must be an integer >= 1, got {regions!r}")
    return regions
