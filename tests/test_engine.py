"""The engine end to end over real backends: Milvus Lite and a Milvus server, local and S3 stores."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from dns_milvus.engine import DnSIndex, ModelSet, SelectionPolicy
from dns_milvus.errors import (
    CorruptObjectError,
    IncompleteDeleteError,
    InvalidInputError,
    NotFoundError,
    RepairRefusedError,
)
from dns_milvus.ingest import array_source, ingest
from dns_milvus.milvus import VideoRow
from dns_milvus.scoring import segment_matches
from dns_milvus.store import LocalStore, encode_fine_tensor, fine_key, fine_key_prefix, put_verified
from dns_milvus.testing.seaweedfs import SeaweedFSServer
from tests.fixtures.engine import SELECTOR_SEGMENTS, fresh_index, near_copy, random_video


def _fill(index: DnSIndex, n: int = 12, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    videos = {f"v{i:02d}": random_video(rng, int(rng.integers(3, 14))) for i in range(n)}
    index.add_many(list(videos), list(videos.values()), [{"group": i % 3, "name": f"n{i}"} for i in range(n)])
    return videos


def test_scores_equal_direct_network_computation(dns_index: DnSIndex) -> None:
    videos = _fill(dns_index)
    rng = np.random.default_rng(7)
    query = near_copy(rng, videos["v03"])
    resp = dns_index.search(query, top_k=12, candidates=12, policy="100%")  # all, chosen by the selector
    assert len(resp.hits) == 12 and resp.n_reranked == 12

    m = dns_index.models
    with torch.inference_mode():
        q = torch.from_numpy(query)
        q_coarse = m.coarse.index_video(q)
        q_fine = m.fine.index_video(q)
        q_self = m.selector.index_video(q)
        for hit in resp.hits:
            t = torch.from_numpy(videos[hit.video_id])
            coarse = float(q_coarse @ m.coarse.index_video(t))
            fine = float(
                m.fine.calculate_video_similarity(q_fine[None], m.fine.index_video(t)[None]).squeeze()
            )
            z = torch.tensor([[float(q_self), float(m.selector.index_video(t)), coarse]])
            conf = float(m.selector(z).squeeze())
            assert hit.coarse_score == pytest.approx(coarse, abs=1e-5)
            assert hit.fine_score == pytest.approx(fine / 2 + 0.5, abs=1e-5)
            assert hit.selector_confidence == pytest.approx(conf, abs=1e-5)
            assert hit.score == hit.fine_score and hit.stage == "fine"
    scores = [h.score for h in resp.hits]
    assert scores == sorted(scores, reverse=True)
    assert resp.hits[0].video_id == "v03"  # the near copy wins on the fine score


@pytest.mark.parametrize(
    ("policy", "expected"), [("none", 0), ("all", 10), ("25%", 2), ("count:3", 3), ("5%", 0)]
)
def test_policies_select_what_they_promise(dns_index: DnSIndex, policy: str, expected: int) -> None:
    _fill(dns_index, n=11)
    resp = dns_index.search("v00", top_k=10, candidates=10, policy=policy)
    assert resp.n_candidates == 10
    assert resp.n_reranked == expected
    fine_hits = [h for h in resp.hits if h.stage == "fine"]
    assert len(fine_hits) == expected
    if 0 < expected < 10:  # the re-ranked ones are the selector's most confident
        chosen = min(h.selector_confidence for h in fine_hits)
        others = [h.selector_confidence for h in resp.hits if h.stage == "coarse"]
        assert all(chosen >= c for c in others)


def test_threshold_policy(dns_index: DnSIndex) -> None:
    _fill(dns_index)
    full = dns_index.search("v01", top_k=11, candidates=11, policy="100%")  # every confidence
    confidences = sorted(h.selector_confidence for h in full.hits)
    threshold = float(np.median(confidences))
    resp = dns_index.search("v01", top_k=11, candidates=11, policy=SelectionPolicy("threshold", threshold))
    assert {h.video_id for h in resp.hits if h.stage == "fine"} == {
        h.video_id for h in full.hits if h.selector_confidence >= threshold
    }


def test_query_by_id_excludes_itself_and_unknown_id_fails(dns_index: DnSIndex) -> None:
    _fill(dns_index)
    resp = dns_index.search("v05", top_k=20, candidates=20)
    assert "v05" not in {h.video_id for h in resp.hits} and len(resp.hits) == 11
    with_self = dns_index.search("v05", top_k=1, candidates=20, policy="all", exclude_self=False)
    assert with_self.hits[0].video_id == "v05"
    with pytest.raises(NotFoundError, match="nope"):
        dns_index.search("nope")


def test_metadata_filter(dns_index: DnSIndex) -> None:
    _fill(dns_index)
    resp = dns_index.search("v00", top_k=20, candidates=20, filter='metadata["group"] == 1')
    assert {h.video_id for h in resp.hits} == {"v01", "v04", "v07", "v10"}


def test_reingest_is_idempotent_and_delete_removes_row_and_object(dns_index: DnSIndex) -> None:
    videos = _fill(dns_index, n=4)
    dns_index.add("v01", videos["v01"])
    assert dns_index.count() == 4
    key = fine_key(dns_index.name, "v01")
    assert dns_index.store.exists(key)
    assert dns_index.delete(["v01", "unknown"]) == 1
    assert dns_index.count() == 3 and not dns_index.store.exists(key)
    assert "v01" not in dns_index.get(["v01"])


@pytest.mark.parametrize("hostile", ["../../etc/passwd", 'a" or video_id != "', "x'); drop", "ünï/cødé\\"])
def test_hostile_ids_round_trip_safely(dns_index: DnSIndex, hostile: str) -> None:
    rng = np.random.default_rng(3)
    dns_index.add(hostile, random_video(rng, 5))
    dns_index.add("other", random_video(rng, 5))
    assert set(dns_index.get([hostile])) == {hostile}
    key = fine_key(dns_index.name, hostile)
    assert ".." not in key and hostile not in key
    assert dns_index.delete([hostile]) == 1
    assert dns_index.count() == 1


def test_bad_inputs_lose_nothing(dns_index: DnSIndex) -> None:
    videos = _fill(dns_index, n=3)
    rng = np.random.default_rng(4)
    with pytest.raises(InvalidInputError, match="bytes"):
        dns_index.add("x" * 10_000, random_video(rng, 4))
    with pytest.raises(InvalidInputError, match="duplicate"):
        dns_index.add_many(["a", "a"], [random_video(rng, 4)] * 2)
    bad = random_video(rng, 4)
    bad[1, 2, 3] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        dns_index.add("nan", bad)
    with pytest.raises(InvalidInputError, match=r"\[T, 9, 512\]"):
        dns_index.add("wrong", rng.standard_normal((4, 9, 100)).astype(np.float32))
    with pytest.raises(InvalidInputError, match=r"\[T, 9, 512\] with T >= 1, got \[4, 8, 512\]"):
        dns_index.add("eight_regions", random_video(rng, 4, regions=8))
    with pytest.raises(InvalidInputError, match=r"got \[4, 512\]"):
        dns_index.add("frame_level", random_video(rng, 4)[:, 0])
    with pytest.raises(InvalidInputError, match="1e\\+30"):
        dns_index.add("huge", np.full((4, 9, 512), 1e30, np.float32))
    with pytest.raises(InvalidInputError):
        dns_index.add("empty", np.zeros((0, 9, 512), np.float32))
    with pytest.raises(InvalidInputError, match=r"'nan_meta'.*metadata.*NaN"):
        dns_index.add_many(["fine", "nan_meta"], [random_video(rng, 4)] * 2, [{}, {"score": float("nan")}])
    assert dns_index.count() == 3
    assert set(dns_index.get(list(videos))) == set(videos)
    # Nothing of a refused batch was written: no object without its row.
    assert sorted(dns_index.store.iter_keys(fine_key_prefix(dns_index.name))) == sorted(
        fine_key(dns_index.name, v) for v in videos
    )


def test_missing_object_falls_back_to_coarse_with_warning(dns_index: DnSIndex) -> None:
    _fill(dns_index, n=5)
    dns_index.store.delete(fine_key(dns_index.name, "v02"))
    resp = dns_index.search("v00", top_k=4, candidates=4, policy="all")
    hit = next(h for h in resp.hits if h.video_id == "v02")
    assert hit.stage == "coarse-fine-missing" and hit.fine_score is None
    assert hit.score == hit.coarse_score
    assert any("v02" in w for w in resp.warnings)
    assert resp.n_reranked == 3


def test_repair_finds_orphans_and_rows_without_objects(dns_index: DnSIndex) -> None:
    _fill(dns_index, n=4)
    orphan = fine_key(dns_index.name, "ghost")
    dns_index.store.put(orphan, b"left over by a crash")
    dns_index.store.delete(fine_key(dns_index.name, "v03"))
    report = dns_index.repair()
    assert report.orphan_objects == [orphan]
    assert report.rows_missing_object == ["v03"]
    kept = dns_index.repair(fix=True)  # written just now: --fix leaves it
    assert dns_index.store.exists(orphan)
    assert kept.fixed and kept.deleted_objects == [] and kept.young_orphans == [orphan]
    fixed = dns_index.repair(fix=True, grace_period_s=0)
    assert fixed.deleted_objects == [orphan] and not dns_index.store.exists(orphan)
    assert dns_index.repair().orphan_objects == []
    with pytest.raises(InvalidInputError, match="grace_period_s"):
        dns_index.repair(grace_period_s=-1)


def test_repair_beside_a_writer_leaves_the_objects_of_rows_on_their_way(dns_index: DnSIndex) -> None:
    """A writer puts each object before its row; a repair --fix that runs in between must not
    take the objects, or the rows the writer upserts next point at nothing."""
    _fill(dns_index, n=4)
    rng = np.random.default_rng(11)
    ids = [f"w{i}" for i in range(8)]
    records = dns_index.models.index_features([random_video(rng, 5) for _ in ids])
    for vid, record in zip(ids, records):  # the writer's first half: objects, verified
        blob = encode_fine_tensor(record.fine, record.payload_kind)
        put_verified(dns_index.store, fine_key(dns_index.name, vid), blob)
    during = dns_index.repair(fix=True)  # runs while the writer is between its two halves
    assert all(dns_index.store.exists(fine_key(dns_index.name, vid)) for vid in ids)
    assert during.orphan_objects == sorted(fine_key(dns_index.name, v) for v in ids)
    assert during.young_orphans == during.orphan_objects and during.deleted_objects == []
    dns_index.collection.upsert(  # the writer's second half: the rows
        [
            VideoRow(vid, r.coarse, r.self_sim, fine_key(dns_index.name, vid), r.n_frames, r.payload_kind)
            for vid, r in zip(ids, records)
        ]
    )
    after = dns_index.repair(deep=True)
    assert after.rows_missing_object == [] and after.rows_damaged_object == {} and after.orphan_objects == []
    assert dns_index.count() == 12


def _flip(data: bytes, offset: int) -> bytes:
    edited = bytearray(data)
    edited[offset] ^= 0x01
    return bytes(edited)


def test_deep_repair_finds_tampered_objects_and_ingest_heals_them(dns_index: DnSIndex) -> None:
    videos = _fill(dns_index, n=8)
    store = dns_index.store

    def key(vid: str) -> str:
        return fine_key(dns_index.name, vid)

    original = {vid: store.get(key(vid)) for vid in videos}
    garbage = np.random.default_rng(5).integers(0, 256, len(original["v03"]), dtype=np.uint8).tobytes()
    store.put(key("v00"), _flip(original["v00"], len(original["v00"]) - 10))  # a payload bit
    store.put(key("v01"), _flip(original["v01"], 10))  # a header bit (T)
    store.put(key("v02"), original["v02"][:-100])  # truncated
    store.put(key("v03"), garbage)
    store.delete(key("v04"))
    store.put(key("v05"), original["v06"])  # another video's intact object
    tampered = ["v00", "v01", "v02", "v03", "v04", "v05"]

    # Search uses no damaged tensor: those hits keep their coarse score, with a warning each.
    resp = dns_index.search("v07", top_k=7, candidates=7, policy="all")
    stages = {hit.video_id: hit.stage for hit in resp.hits}
    assert {vid for vid, stage in stages.items() if stage != "fine"} == set(tampered)
    assert any("'v05'" in w and "another video" in w for w in resp.warnings)
    with pytest.raises(CorruptObjectError, match="another video"):
        dns_index.load_record("v05")

    cheap = dns_index.repair()  # one listing: sees only the deletion
    assert cheap.rows_missing_object == ["v04"] and cheap.rows_damaged_object == {} and not cheap.deep
    deep = dns_index.repair(deep=True)
    assert deep.deep and deep.rows_missing_object == ["v04"]
    assert set(deep.rows_damaged_object) == {"v00", "v01", "v02", "v03", "v05"}
    assert "checksum mismatch" in deep.rows_damaged_object["v00"]
    assert "checksum mismatch" in deep.rows_damaged_object["v01"]
    assert "truncated" in deep.rows_damaged_object["v02"]
    assert "belongs to another video" in deep.rows_damaged_object["v05"]
    assert deep.reindex == tampered and deep.to_dict()["reindex"] == tampered
    assert deep.orphan_objects == [] and dns_index.repair(fix=True, deep=True).deleted_objects == []

    # repair's advice works: the same ingest again re-indexes exactly the damaged videos.
    report = ingest(dns_index, array_source(videos), progress=False)
    assert sorted(report.added) == tampered and sorted(report.damaged) == tampered
    assert sorted(report.skipped) == ["v06", "v07"] and report.failed == {}
    healed = dns_index.repair(deep=True)
    assert healed.reindex == [] and healed.orphan_objects == []
    resp = dns_index.search("v07", top_k=7, candidates=7, policy="all")
    assert all(hit.stage == "fine" for hit in resp.hits) and resp.warnings == []


def test_repair_refuses_to_delete_most_of_the_store(dns_index: DnSIndex) -> None:
    """Rows gone but objects kept is what a damaged database (a Milvus Lite file whose manifest
    was lost opens empty) looks like to repair: --fix must not delete the whole store."""
    videos = _fill(dns_index, n=10)
    keys = {vid: fine_key(dns_index.name, vid) for vid in videos}
    dns_index.collection.delete(["v00", "v01", "v02"])  # 3 of 10 objects become orphans

    with pytest.raises(RepairRefusedError, match=r"3 of the collection's 10 objects, more than 10%.*--force"):
        dns_index.repair(fix=True, grace_period_s=0)
    assert all(dns_index.store.exists(k) for k in keys.values())
    forced = dns_index.repair(fix=True, grace_period_s=0, force=True)
    assert forced.deleted_objects == sorted(keys[v] for v in ["v00", "v01", "v02"])

    dns_index.collection.delete([f"v{i:02d}" for i in range(3, 10)])  # as if the rows were lost
    young = dns_index.repair(fix=True)  # young orphans: nothing to delete, nothing refused
    assert young.deleted_objects == [] and len(young.young_orphans) == 7
    with pytest.raises(RepairRefusedError, match="has no rows, while the store holds 7 objects") as info:
        dns_index.repair(fix=True, grace_period_s=0)
    assert "nothing was deleted" in str(info.value)
    assert sum(dns_index.store.exists(keys[f"v{i:02d}"]) for i in range(3, 10)) == 7


def test_opening_a_lost_collection_whose_objects_remain_warns(
    dns_index: DnSIndex, caplog: pytest.LogCaptureFixture
) -> None:
    _fill(dns_index, n=2)
    dns_index.collection.drop()  # as a database that lost the collection
    with caplog.at_level(logging.WARNING, logger="dns_milvus.engine.index"):
        reopened = DnSIndex(
            dns_index.uri, models=dns_index.models, store=dns_index.store, collection=dns_index.name
        )
    assert reopened.count() == 0
    reopened.client.close()  # not reopened.close(): the store is the fixture's
    [warning] = [r.getMessage() for r in caplog.records if r.name == "dns_milvus.engine.index"]
    assert "was created empty" in warning and "repair" in warning


def test_repair_keeps_one_orphan_among_many_rows_deletable(dns_index: DnSIndex) -> None:
    _fill(dns_index, n=3)
    dns_index.collection.delete(["v00"])  # 1 of 3 objects: above 10 %, but a single object
    assert dns_index.repair(fix=True, grace_period_s=0).deleted_objects == [fine_key(dns_index.name, "v00")]


@pytest.mark.s3
def test_delete_on_a_read_only_store_says_the_rows_are_gone(
    milvus_lite_uri: str, model_set: ModelSet, s3_server: SeaweedFSServer, s3_bucket: str
) -> None:
    prefix = f"t-{secrets.token_hex(6)}"
    rng = np.random.default_rng(8)
    writer_store = s3_server.open_store(s3_bucket, prefix=prefix)
    with DnSIndex(milvus_lite_uri, models=model_set, store=writer_store, collection="c") as writer:
        writer.add_many(["a", "b"], [random_video(rng, 4), random_video(rng, 4)])
    reader_store = s3_server.open_read_only_store(s3_bucket, prefix=prefix)
    with DnSIndex(milvus_lite_uri, models=model_set, store=reader_store, collection="c") as reader:
        with pytest.raises(IncompleteDeleteError) as info:
            reader.delete(["a", "unknown"])
        message = str(info.value)
        assert "deleted 1 videos" in message and "1 of their objects remain" in message
        assert "AccessDenied" in message and "repair --fix" in message
        assert set(reader.get(["a", "b"])) == {"b"}
        assert reader.repair().orphan_objects == [fine_key("c", "a")]


def test_exhaustive_search_matches_ann_with_all_candidates(dns_index: DnSIndex) -> None:
    _fill(dns_index)
    ann = dns_index.search("v02", top_k=11, candidates=11, policy="25%")
    full = dns_index.exhaustive_search("v02", top_k=11, policy="25%")
    assert [h.video_id for h in ann.hits] == [h.video_id for h in full.hits]
    assert [h.score for h in ann.hits] == pytest.approx([h.score for h in full.hits], abs=1e-5)


def test_batch_search_equals_single_searches(dns_index: DnSIndex) -> None:
    _fill(dns_index)
    batch = dns_index.search_batch(["v01", "v02"], top_k=5, candidates=11, policy="all")
    for q, resp in zip(["v01", "v02"], batch):
        single = dns_index.search(q, top_k=5, candidates=11, policy="all")
        assert [h.video_id for h in resp.hits] == [h.video_id for h in single.hits]


def test_search_arguments_are_checked(dns_index: DnSIndex) -> None:
    _fill(dns_index, n=2)
    with pytest.raises(InvalidInputError, match="top_k"):
        dns_index.search("v00", top_k=0)
    with pytest.raises(InvalidInputError, match="candidates"):
        dns_index.search("v00", candidates=10**7)
    with pytest.raises(InvalidInputError, match="policy"):
        dns_index.search("v00", policy="bogus")
    with pytest.raises(InvalidInputError, match="query must be"):
        dns_index.search(42)  # type: ignore[arg-type]


@pytest.fixture
def segment_index(milvus_uri: str, segment_model_set: ModelSet, tmp_path: Path) -> Iterator[DnSIndex]:
    """A DnS index of a model set whose selector reads segment codes, on each Milvus backend."""
    with fresh_index(milvus_uri, segment_model_set, LocalStore(tmp_path / "objects")) as index:
        yield index


def test_selector_reads_the_segment_codes_stored_in_milvus(segment_index: DnSIndex) -> None:
    """Each row keeps its video's segment codes, and stage 2 (after an ANN search and after the
    exhaustive scan) gives the selector the segment match of the stored codes: its confidences
    equal the model set's on the same inputs computed directly from the videos."""
    models = segment_index.models
    videos = _fill(segment_index, n=10)
    direct = dict(zip(videos, models.index_features(list(videos.values())), strict=True))
    stored = segment_index.collection.get(list(videos))
    for vid, record in direct.items():
        assert record.segments.shape[0] == SELECTOR_SEGMENTS
        np.testing.assert_array_equal(stored[vid].segments, record.segments)
    np.testing.assert_array_equal(segment_index.load_record("v04").segments, direct["v04"].segments)

    query = near_copy(np.random.default_rng(7), videos["v03"])
    q = models.index_features([query])[0]
    ann = segment_index.search(query, top_k=10, candidates=10, policy="100%")
    full = segment_index.exhaustive_search(query, top_k=10, policy="100%")
    for response in (ann, full):
        assert len(response.hits) == 10
        targets = [direct[h.video_id] for h in response.hits]
        coarse = np.array([np.dot(q.coarse, t.coarse) for t in targets], dtype=np.float32)
        self_sims = np.array([t.self_sim for t in targets], dtype=np.float32)
        match = segment_matches(q.coarse, [t.segments for t in targets])
        expected = models.selector_confidence(q.self_sim, self_sims, coarse, match)
        found = [h.selector_confidence for h in response.hits]
        assert None not in found
        np.testing.assert_allclose(found, expected, atol=1e-5)
        # The match is an input that counts: other codes would give other confidences.
        unmatched = models.selector_confidence(q.self_sim, self_sims, coarse, np.zeros_like(match))
        assert not np.allclose(expected, unmatched, atol=1e-4)
    by_id = segment_index.search("v03", top_k=9, candidates=9, policy="100%")
    assert all(h.selector_confidence is not None for h in by_id.hits)


def test_segment_index_refuses_rows_without_the_codes_its_selector_reads(segment_index: DnSIndex) -> None:
    _fill(segment_index, n=3)
    record = segment_index.models.index_features([random_video(np.random.default_rng(3), 5)])[0]
    record.video_id = "bare"
    codes = record.segments
    for segments, found in ((None, 0), (codes[:2], 2)):
        record.segments = segments
        with pytest.raises(
            InvalidInputError, match=f"'bare' has {found} segment codes; .* reads the codes of 4"
        ):
            segment_index.write_records([record])
    assert segment_index.count() == 3
    assert not segment_index.store.exists(fine_key(segment_index.name, "bare"))
    # A row written past the index's checks, without codes: stage 2 refuses rather than guess.
    row = VideoRow(
        "bare", record.coarse, record.self_sim, fine_key(segment_index.name, "bare"), 5, "packed_bits"
    )
    segment_index.collection.upsert([row])
    with pytest.raises(InvalidInputError, match="carry no segment codes"):
        segment_index.search("v00", top_k=3, candidates=10, policy="100%")
