"""The dns-milvus command line, in-process, on Milvus Lite and a local store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from dns_milvus.cli import main
from dns_milvus.store import LocalStore, fine_key
from tests.fixtures.engine import near_copy, random_video
from tests.fixtures.milvus_server import release_lite


@pytest.fixture
def cli_env(tmp_path: Path, model_set_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DNS_MILVUS_MODELS", str(model_set_dir))
    monkeypatch.setenv("DNS_MILVUS_URI", str(tmp_path / "cli.db"))
    monkeypatch.setenv("DNS_MILVUS_STORE", str(tmp_path / "objects"))
    monkeypatch.setenv("DNS_MILVUS_DEVICE", "cpu")
    rng = np.random.default_rng(0)
    videos = {f"v{i}": random_video(rng, 6) for i in range(6)}
    with h5py.File(tmp_path / "f.hdf5", "w") as f:
        for vid, arr in videos.items():
            f.create_dataset(vid, data=arr)
        f.create_dataset("broken", data=np.zeros((3, 9, 7), np.float32))
    np.save(tmp_path / "query.npy", near_copy(rng, videos["v2"]))
    return tmp_path


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict]:
    code = main([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_ingest_search_get_delete_stats_repair(cli_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, report = run_json(capsys, "ingest", "--hdf5", "f.hdf5")
    assert code == 0 and report["added"] == 6 and set(report["failed"]) == {"broken"}

    code, resp = run_json(capsys, "search", "--features", "query.npy", "--policy", "all", "-k", "3")
    assert code == 0 and len(resp["hits"]) == 3 and resp["n_reranked"] == 6
    scores = [h["score"] for h in resp["hits"]]
    assert scores == sorted(scores, reverse=True)
    assert all(h["stage"] == "fine" and h["score"] == h["fine_score"] for h in resp["hits"])

    code, resp = run_json(capsys, "search", "--id", "v1", "-k", "10")
    assert "v1" not in [h["video_id"] for h in resp["hits"]]

    code, got = run_json(capsys, "get", "v1", "nope")
    assert code == 1 and set(got["found"]) == {"v1"} and got["missing"] == ["nope"]

    code, deleted = run_json(capsys, "delete", "v1")
    assert deleted == {"deleted": 1, "requested": 1}
    _, stats = run_json(capsys, "stats")
    assert stats["videos"] == 5

    code, repair = run_json(capsys, "repair")
    assert code == 0 and repair["orphan_objects"] == [] and repair["rows_missing_object"] == []


def test_tables_are_readable(cli_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ingest", "--hdf5", "f.hdf5"]) == 0
    assert "ingested 6 videos" in capsys.readouterr().out
    assert main(["search", "--features", "query.npy", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["rank", "video_id", "score"]
    assert "policy 5%" in out and "stage1" in out


def test_errors_are_one_line_with_exit_code_2(cli_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["search", "--id", "missing-video"]) == 2
    err = capsys.readouterr().err
    assert "missing-video" in err and "Traceback" not in err
    assert main(["search", "--features", "query.npy", "--policy", "12 apples"]) == 2
    assert "policy" in capsys.readouterr().err
    assert main(["stats", "--models", str(cli_env / "nowhere")]) == 2
    assert "no model set" in capsys.readouterr().err


def test_unreadable_feature_files_are_one_line_errors(
    cli_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.save(cli_env / "pickled.npy", np.array([{"frames": 3}], dtype=object), allow_pickle=True)
    (cli_env / "text.npy").write_text("not an array")
    (cli_env / "empty.npy").write_bytes(b"")
    np.savez(cli_env / "archive.npz", x=np.zeros((2, 9, 512), np.float32))
    for name in ("pickled.npy", "text.npy", "empty.npy", "archive.npz", "absent.npy"):
        assert main(["search", "--features", name]) == 2, name
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and f"--features {name}" in err, err
        assert "Traceback" not in err and "allow_pickle" not in err  # and no advice to unpickle


def test_milvus_errors_reach_stderr_as_our_one_line_only(cli_env: Path) -> None:
    """pymilvus logs a failed call with its traceback; the command line prints one line of its own."""
    assert main(["ingest", "--hdf5", "f.hdf5"]) == 0
    release_lite(cli_env / "cli.db")  # the command in a fresh process opens the file next
    command = ["search", "--features", "query.npy", "--filter", "no_such_field > 1"]
    done = subprocess.run(
        [sys.executable, "-m", "dns_milvus.cli", *command], cwd=cli_env, capture_output=True, text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.startswith("dns-milvus search: error: Milvus refused the filter"), done.stderr
    assert "Traceback" not in done.stderr and "RPC error" not in done.stderr


def test_config_file_and_flag_precedence(cli_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (cli_env / "dns-milvus.toml").write_text('collection = "from_file"\n')
    _, stats = run_json(capsys, "stats")
    assert stats["collection"] == "from_file"
    _, stats = run_json(capsys, "stats", "--collection", "from_flag")
    assert stats["collection"] == "from_flag"
    (cli_env / "dns-milvus.toml").write_text('colection = "typo"\n')
    assert main(["stats"]) == 2
    assert "unknown keys" in capsys.readouterr().err


def test_repair_deep_finds_damage_that_the_same_ingest_heals(
    cli_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_json(capsys, "ingest", "--hdf5", "f.hdf5")[1]["added"] == 6
    objects = sorted((cli_env / "objects").rglob("*.dnsf"))
    objects[0].unlink()
    objects[1].write_bytes(objects[1].read_bytes()[:-7])

    code, cheap = run_json(capsys, "repair")
    assert code == 1 and len(cheap["rows_missing_object"]) == 1 and cheap["rows_damaged_object"] == {}
    code, deep = run_json(capsys, "repair", "--deep")
    assert code == 1 and len(deep["reindex"]) == 2 and deep["deep"]
    assert ["truncated" in why for why in deep["rows_damaged_object"].values()] == [True]
    assert main(["repair", "--deep"]) == 1
    out = capsys.readouterr().out
    assert "rows whose object is damaged: 1" in out and "run the same `dns-milvus ingest` again" in out

    code, report = run_json(capsys, "ingest", "--hdf5", "f.hdf5")
    assert report["added"] == 2 and sorted(report["damaged"]) == deep["reindex"] and report["skipped"] == 4
    code, healed = run_json(capsys, "repair", "--deep")
    assert code == 0 and healed["reindex"] == []


def test_repair_fix_keeps_young_orphans_and_asks_before_deleting_many(
    cli_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_json(capsys, "ingest", "--hdf5", "f.hdf5")[0] == 0
    store = LocalStore(cli_env / "objects")
    ghosts = sorted(fine_key("videos", f"ghost{i}") for i in range(3))
    for key in ghosts:
        store.put(key, b"left over")
    code, kept = run_json(capsys, "repair", "--fix")
    assert code == 0 and kept["young_orphans"] == ghosts and kept["deleted_objects"] == []
    assert main(["repair", "--fix", "--grace-period", "0"]) == 2
    err = capsys.readouterr().err
    assert "refused to delete 3 orphan objects" in err and "--force" in err
    assert all(store.exists(key) for key in ghosts)
    code, forced = run_json(capsys, "repair", "--fix", "--grace-period", "0", "--force")
    assert code == 0 and forced["deleted_objects"] == ghosts
