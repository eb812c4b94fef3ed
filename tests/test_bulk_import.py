"""Bulk import (Parquet files, then Milvus's Import API) into the real Milvus server: objects
first, rows imported and read back; ids already there upserted, never duplicated; a failed
import leaves objects without rows (repair's orphans), never a row without its object; Milvus
Lite refuses with the server's own answer."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pymilvus import MilvusClient

from dns_milvus.engine import DnSIndex, ModelSet
from dns_milvus.milvus.bulk import BulkImportError, BulkImportUnsupportedError, import_rows
from dns_milvus.milvus.rows import VideoRow
from dns_milvus.store import LocalStore, fine_key, fine_key_prefix
from tests.fixtures.engine import random_video


@pytest.fixture
def server_index(milvus_server: str, segment_model_set: ModelSet, tmp_path: Path) -> Iterator[DnSIndex]:
    """A server index whose selector reads segment codes: imports must carry them."""
    index = DnSIndex(milvus_server, models=segment_model_set, store=LocalStore(tmp_path / "objects"),
                     collection=f"t_bulk_{secrets.token_hex(4)}")  # fmt: skip
    yield index
    index.collection.drop()
    index.close()


def _videos(seed: int, n: int, prefix: str = "v") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"{prefix}{i:04d}": random_video(rng, int(rng.integers(2, 9))) for i in range(n)}


def _ids_on_server(index: DnSIndex) -> list[str]:
    """Every row's id as the server returns them: an id imported twice appears twice."""
    client = MilvusClient(index.uri, timeout=30)
    try:
        rows = client.query(index.name, filter='video_id != ""', output_fields=["video_id"], limit=16384,
                            consistency_level="Strong")  # fmt: skip
    finally:
        client.close()
    return sorted(r["video_id"] for r in rows)


@pytest.mark.server
def test_bulk_import_writes_objects_then_imported_rows(server_index: DnSIndex, tmp_path: Path) -> None:
    videos = _videos(0, 40)
    meta = [{"source": vid, "n": i} for i, vid in enumerate(videos)]
    staging = tmp_path / "import"
    server_index.add_many(list(videos), list(videos.values()), meta, import_dir=staging)
    assert _ids_on_server(server_index) == sorted(videos)
    assert list(staging.iterdir()) == []  # files removed once imported
    for (vid, feats), m in zip(videos.items(), meta):
        stored = server_index.load_record(vid)  # row and verified object
        direct = server_index.models.index_features([feats])[0]
        np.testing.assert_array_equal(stored.fine, direct.fine)
        np.testing.assert_allclose(stored.coarse, direct.coarse, atol=1e-5)
        np.testing.assert_array_equal(stored.segments, direct.segments)
        assert server_index.get([vid])[vid]["metadata"] == m
    # Imported rows are indexed and searchable like upserted ones, their segment codes included.
    first = next(iter(videos))
    hits = server_index.search(videos[first], top_k=3, policy="none").hits  # coarse: itself first
    assert hits[0].video_id == first
    hits = server_index.search(first, top_k=11, candidates=11, policy="100%").hits
    assert len(hits) == 11 and all(h.selector_confidence is not None for h in hits)

    # Again, with 10 of the ids and 10 new ones: the known ids are upserted, the new imported.
    more = _videos(1, 10, prefix="w")
    again = {**dict(list(videos.items())[:10]), **more}
    records = server_index.models.index_features(list(again.values()))
    rows = []
    for vid, rec in zip(again, records):
        rows.append(VideoRow(vid, rec.coarse, rec.self_sim, fine_key(server_index.name, vid), rec.n_frames,
                             rec.payload_kind, {"again": True}, segments=rec.segments))  # fmt: skip
    report = import_rows(server_index.collection, rows, staging)
    assert sorted(report.upserted) == sorted(list(videos)[:10])
    assert sorted(report.imported) == sorted(more)
    assert len(report.files) == 1 and len(report.tasks) == 1
    assert _ids_on_server(server_index) == sorted({*videos, *more}), "no id twice"
    assert server_index.get([first])[first]["metadata"] == {"again": True}


@pytest.mark.server
def test_failed_import_leaves_objects_without_rows_then_succeeds(
    server_index: DnSIndex, tmp_path: Path
) -> None:
    """The server cannot read the files where it is told they are: the import fails with the
    server's reason, the objects written first are orphans (no row points at nothing), and the
    same write with the right directory indexes every video."""
    videos = _videos(2, 12)
    staging = tmp_path / "import"
    with pytest.raises(BulkImportError, match="failed import task"):
        server_index.add_many(list(videos), list(videos.values()), import_dir=staging,
                              server_dir=str(tmp_path / "not-there"))  # fmt: skip
    assert _ids_on_server(server_index) == []
    stored = sorted(server_index.store.iter_keys(prefix=fine_key_prefix(server_index.name)))
    assert stored == sorted(fine_key(server_index.name, vid) for vid in videos)
    assert len(server_index.repair().orphan_objects) == len(videos)

    server_index.add_many(list(videos), list(videos.values()), import_dir=staging)
    assert _ids_on_server(server_index) == sorted(videos)
    report = server_index.repair(deep=True)
    assert report.orphan_objects == [] and report.reindex == []


def test_milvus_lite_has_no_import_and_nothing_is_written(model_set: ModelSet, tmp_path: Path) -> None:
    """Milvus Lite answers the Import call UNIMPLEMENTED: the error says so, before any object."""
    index = DnSIndex(str(tmp_path / "lite.db"), models=model_set, store=str(tmp_path / "objects"))
    with index:
        videos = _videos(3, 3)
        with pytest.raises(BulkImportUnsupportedError, match=r"Milvus Lite .* UNIMPLEMENTED") as caught:
            index.add_many(list(videos), list(videos.values()), import_dir=tmp_path / "import")
        assert "upserts" in str(caught.value)
        assert index.count() == 0
        assert list(index.store.iter_keys()) == []
