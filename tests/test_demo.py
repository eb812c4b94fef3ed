"""The README's main job: the offline demo with the bundled model set finds the copies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dns_milvus.cli import main
from dns_milvus.config import DEFAULT_MODEL_SET


def test_bundled_model_set_is_complete() -> None:
    manifest = json.loads((DEFAULT_MODEL_SET / "manifest.json").read_text())
    for key in ("coarse", "fine", "selector", "pca"):
        assert (DEFAULT_MODEL_SET / manifest[key]).is_file(), key
    assert manifest["backbone"] == "efficientnet-lite0"


@pytest.mark.slow
def test_demo_ranks_the_copies_of_each_query_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--workdir", str(tmp_path / "demo"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["queries"] == 3 and report["database_videos"] == 13
    assert report["mAP"] >= 0.9
    for result in report["results"].values():
        top = [h["video_id"] for h in result["hits"][: len(result["relevant"])]]
        assert len(set(top) & set(result["relevant"])) >= len(result["relevant"]) - 1
        assert all(h["stage"] in ("fine", "coarse") for h in result["hits"])
