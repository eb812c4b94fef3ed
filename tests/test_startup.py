"""A command-line call pays only for what it uses: what a fresh interpreter imports for ``--help``
and for loading a model set, and that the coarse-only policy runs no selector."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest

from dns_milvus.cli import main
from dns_milvus.config import DEFAULT_MODEL_SET
from dns_milvus.engine import DnSIndex, ModelSet
from tests.fixtures.engine import random_video
from tests.fixtures.milvus_server import release_lite

#: torch's compiler stack and the symbolic maths it brings (about 1 s of imports on 2 cores).
COMPILER_MODULES = ("torch._dynamo", "torch._inductor", "torch.fx.experimental.symbolic_shapes", "sympy")


def fresh_python(code: str, *args: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line last."""
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


HELP = """
import contextlib, io, json, sys
from dns_milvus.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
    main(sys.argv[1:])
heavy = ("torch", "pymilvus", "numpy", "milvus_lite", "grpc")
print(json.dumps({"help": out.getvalue(), "imported": [m for m in heavy if m in sys.modules]}))
"""


@pytest.mark.parametrize("argv", [["--help"], ["search", "--help"], ["ingest", "--help"]])
def test_help_imports_neither_torch_nor_milvus(argv: list[str]) -> None:
    got = fresh_python(HELP, *argv)
    assert got["help"].startswith("usage: dns-milvus")
    assert got["imported"] == []


LOAD = """
import json, sys
import torch
from dns_milvus.engine import ModelSet
from dns_milvus.models import load_checkpoint
compiler = json.loads(sys.argv[1])
before = [m for m in compiler if m in sys.modules]
models = [ModelSet.load(path, device="cpu") for path in sys.argv[2:]]
load_checkpoint(sys.argv[2] + "/teacher.pth", expected="teacher")
after_load = [m for m in compiler if m in sys.modules]
features_at_load = "dns_milvus.features" in sys.modules
extractors = [type(m.extractor).__name__ for m in models]
print(json.dumps({"before": before, "after_load": after_load, "features_at_load": features_at_load,
                  "extractors": extractors, "features_after": "dns_milvus.features" in sys.modules}))
"""


def test_loading_model_sets_imports_no_compiler_stack_and_no_extractor(
    model_set_dir: Path, tmp_path: Path
) -> None:
    """The bundled set (with a backbone) and its teacher, and a set at the DnS release's sizes
    (NetVLAD 64 clusters -> 1024-d, attention fine student): built on the meta device without
    torch's compiler; the feature extractor only when first asked for."""
    from dns_milvus.testing.synthetic import write_model_set

    release_size = write_model_set(
        tmp_path / "release", dims=512, bits=512, fine="att", netvlad_clusters=64, coarse_dim=1024
    )
    got = fresh_python(
        LOAD, json.dumps(COMPILER_MODULES), str(DEFAULT_MODEL_SET), str(model_set_dir), str(release_size)
    )
    assert got["before"] == []  # importing torch and the engine does not bring them either
    assert got["after_load"] == []
    assert not got["features_at_load"]
    assert got["extractors"] == ["FeatureExtractor", "NoneType", "NoneType"]
    assert got["features_after"]


# -- policy none: the coarse ranking, without the selector ------------------------------------------


@pytest.fixture
def lite_index(tmp_path: Path) -> Iterator[DnSIndex]:
    """The bundled model set over Milvus Lite and a local store, 12 videos indexed."""
    rng = np.random.default_rng(3)
    index = DnSIndex(
        str(tmp_path / "startup.db"), models=ModelSet.load(DEFAULT_MODEL_SET, device="cpu"),
        store=str(tmp_path / "objects"), collection="startup",
    )  # fmt: skip
    videos = {f"v{i:02d}": random_video(rng, int(rng.integers(4, 10))) for i in range(12)}
    index.add_many(list(videos), list(videos.values()))
    try:
        yield index
    finally:
        index.close()
        release_lite(tmp_path / "startup.db")


def test_policy_none_runs_no_selector(lite_index: DnSIndex) -> None:
    calls: list[int] = []
    hook = lite_index.models.selector.register_forward_hook(lambda *_: calls.append(1))
    try:
        selected = lite_index.search("v03", top_k=11, candidates=11, policy="5%")
        assert len(calls) == 1 and all(h.selector_confidence is not None for h in selected.hits)
        calls.clear()
        coarse = lite_index.search("v03", top_k=11, candidates=11, policy="none")
    finally:
        hook.remove()
    assert calls == []
    assert coarse.n_reranked == 0 and coarse.n_candidates == 11
    assert all(h.stage == "coarse" and h.selector_confidence is None for h in coarse.hits)
    coarse_scores = [h.coarse_score for h in coarse.hits]
    assert coarse_scores == sorted(coarse_scores, reverse=True)  # the coarse ranking
    # the same candidates, scores and ranking as the policy that ran the selector (it chose none)
    assert selected.n_reranked == 0
    assert [(h.video_id, h.score) for h in coarse.hits] == [(h.video_id, h.score) for h in selected.hits]


# -- the command line opens Milvus while torch loads ------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("{tmp}/index.txt", "a Milvus Lite database path must end in .db"),
        ("http://127.0.0.1:{port}", "cannot reach Milvus at http://127.0.0.1:{port}"),
    ],
)
def test_milvus_errors_from_the_background_open_are_the_commands_error(
    uri: str, message: str, tmp_path: Path, model_set_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = _free_port()
    uri, message = (text.format(tmp=tmp_path, port=port) for text in (uri, message))
    code = main(["stats", "--uri", uri, "--models", str(model_set_dir), "--store", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("dns-milvus stats: error: ") and message in err
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_search_by_id_on_the_command_line(
    lite_index: DnSIndex, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command opens the database in a thread while torch loads; its index then connects to
    the same Milvus Lite database and searches it."""
    lite_index.close()
    release_lite(tmp_path / "startup.db")
    argv = ["--uri", str(tmp_path / "startup.db"), "--store", str(tmp_path / "objects")]
    code = main(
        [
            "search",
            "--id",
            "v03",
            "--collection",
            "startup",
            "--models",
            str(DEFAULT_MODEL_SET),
            *argv,
            "--json",
        ]
    )
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert code == 0 and len(hits) == 10 and "v03" not in {h["video_id"] for h in hits}


def test_what_a_command_wrote_is_there_for_the_next_process(tmp_path: Path, model_set_dir: Path) -> None:
    """A command's process ends through the exit handlers (Milvus Lite closes its database in
    one) before its objects are frozen for the interpreter's last collections: rows one process
    ingested and deleted are what the next process reads."""
    rng = np.random.default_rng(5)
    with h5py.File(tmp_path / "features.hdf5", "w") as f:
        for i in range(4):
            f.create_dataset(f"v{i}", data=random_video(rng, 5))
    env = {
        **os.environ,
        "DNS_MILVUS_MODELS": str(model_set_dir),
        "DNS_MILVUS_URI": str(tmp_path / "cli.db"),
        "DNS_MILVUS_STORE": str(tmp_path / "objects"),
        "DNS_MILVUS_DEVICE": "cpu",
    }

    def command(*argv: str) -> dict:
        done = subprocess.run(
            [sys.executable, "-m", "dns_milvus.cli", *argv, "--json"],
            capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path, env=env,
        )  # fmt: skip
        assert done.returncode in (0, 1), done.stderr
        return json.loads(done.stdout)

    assert command("ingest", "--hdf5", "features.hdf5")["added"] == 4
    assert command("delete", "v1") == {"deleted": 1, "requested": 1}
    got = command("get", "v0", "v1", "v2", "v3")
    assert sorted(got["found"]) == ["v0", "v2", "v3"] and got["missing"] == ["v1"]


def test_only_a_large_lite_database_has_torch_imported_while_it_opens(tmp_path: Path) -> None:
    from dns_milvus._cli import LITE_SLOW_OPEN_BYTES, opens_slowly

    database = tmp_path / "index.db"
    (database / "collection").mkdir(parents=True)
    (database / "collection" / "rows").write_bytes(b"x" * 4096)
    assert not opens_slowly(str(database)), "a small database opens faster than torch imports"
    with (database / "collection" / "segment").open("wb") as f:  # sparse: its size, not its blocks
        f.truncate(LITE_SLOW_OPEN_BYTES)
    assert opens_slowly(str(database))
    assert not opens_slowly(str(tmp_path / "missing.db"))
    assert not opens_slowly("http://localhost:19530"), "a server opens in a fraction of a second"
