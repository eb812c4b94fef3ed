"""Dual learning of the students (``label_weight`` > 0): the distillation weight's decay, copy labels
from groups, the label loss, config checks, and a tiny training run whose checkpoints load in a
``ModelSet``.

The data are synthetic and small: copy groups of noisy versions of random region features, and
a "teacher" similarity matrix that is right about most pairs and wrong about a few (two groups
merged, one copy missed), as a teacher trained on little data is.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dns_milvus.engine.modelset import ModelSet
from dns_milvus.errors import InvalidInputError
from dns_milvus.models import (
    CoarseGrainedStudent,
    FineGrainedStudent,
    SelectorNetwork,
    load_checkpoint,
    save_checkpoint,
)
from dns_milvus.train import run_stage
from dns_milvus.train.config import ConfigError, StudentsConfig, load_config
from dns_milvus.train.data import FeatureSet, write_features
from dns_milvus.train.distill import (
    DUAL_SETTINGS,
    DistillationTask,
    DualLearning,
    copy_labels,
    distill_weight,
    group_mates,
)
from dns_milvus.train.losses import copy_label_loss
from dns_milvus.train.mining import MinedPairs, mine_pairs
from dns_milvus.train.scoring import pair_similarities
from dns_milvus.train.trainer import load_training_checkpoint

DIMS = 32
REGIONS = 9
SMALL_COARSE = {
    "transformer_heads": 4,
    "transformer_feedforward_dims": 64,
    "netvlad_clusters": 2,
    "netvlad_outdims": None,
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Features, copy groups and pairs mined from a partly wrong teacher."""
    rng = np.random.default_rng(0)
    videos: dict[str, np.ndarray] = {}
    groups: list[list[str]] = []
    for g in range(5):
        source = rng.standard_normal((5, REGIONS, DIMS)).astype(np.float32)
        names = [f"g{g}_{k}" for k in range(3)]
        for k, name in enumerate(names):
            videos[name] = source + (0.3 * k) * rng.standard_normal(source.shape).astype(np.float32)
        groups.append(names)
    for k in range(3):  # videos of no group
        videos[f"other{k}"] = rng.standard_normal((5, REGIONS, DIMS)).astype(np.float32)
    ids = sorted(videos)
    group_of = {v: i for i, g in enumerate(groups) for v in g}
    same = np.array([[group_of.get(a, -1) == group_of.get(b, -2) for b in ids] for a in ids])
    sims = np.where(same, 0.8, -0.3) + 0.05 * rng.standard_normal((len(ids), len(ids)))
    index = {v: i for i, v in enumerate(ids)}
    for a in groups[0]:  # the teacher's mistakes: groups 0 and 1 look alike ...
        for b in groups[1]:
            sims[index[a], index[b]] = sims[index[b], index[a]] = 0.7
    for b in groups[2][:2]:  # ... and it misses the strongest copy of group 2
        sims[index["g2_2"], index[b]] = sims[index[b], index["g2_2"]] = 0.0
    pairs = mine_pairs(sims.astype(np.float32), ids, threshold=0.5, negatives_per_kind=3)

    root = tmp_path_factory.mktemp("dual")
    (root / "groups.json").write_text(json.dumps(groups))
    return {
        "features": write_features(root / "features.h5", videos),
        "pairs": pairs.save(root / "pairs.h5"),
        "groups": root / "groups.json",
        "root": root,
    }


# -- the schedule, the labels, the loss -----------------------------------------------------------


def test_distillation_weight_decays_from_one_to_the_floor():
    for decay in ("linear", "cosine"):
        weights = [distill_weight(e, 11, decay=decay, floor=0.1) for e in range(11)]
        assert weights[0] == 1.0 and weights[-1] == pytest.approx(0.1)
        assert all(a > b for a, b in itertools.pairwise(weights))
        assert weights[5] == pytest.approx(0.55)  # both pass the midpoint halfway
    linear = [distill_weight(e, 11, decay="linear", floor=0.1) for e in range(11)]
    assert linear[1] - linear[2] == pytest.approx(0.09)  # constant steps
    cosine = [distill_weight(e, 11, decay="cosine", floor=0.1) for e in range(11)]
    assert all(c > line for c, line in zip(cosine[1:5], linear[1:5], strict=True))  # slow start
    assert cosine[1] == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 10)) / 2)
    assert distill_weight(0, 1) == 1.0  # one epoch: distillation at full weight
    assert distill_weight(20, 11, floor=0.1) == pytest.approx(0.1)  # past the last epoch: the floor
    with pytest.raises(InvalidInputError, match="unknown distillation decay"):
        distill_weight(0, 10, decay="step")


def test_copy_labels_come_from_the_groups():
    pairs = MinedPairs(
        ids=["a", "a2", "b", "b2", "c", "lone"],
        anchor=np.array([0, 0, 0, 2, 2, 5, 1]),
        target=np.array([1, 2, 5, 3, 4, 0, 3]),
        similarity=np.zeros(7, np.float32),
        positive=np.ones(7, bool),
    )
    # "b2" and "c" share a video with b's group: groups sharing a video are merged
    labels = copy_labels(pairs, [["a", "a2"], ["b", "b2"], ["b2", "c"]])
    assert labels.tolist() == [True, False, False, True, True, False, False]
    with pytest.raises(InvalidInputError, match="name none of the 6 videos"):
        copy_labels(pairs, [["x", "y"]])
    # the exploration branch's own pairs: each video's copies, by position
    mates = group_mates(pairs.ids, [["a", "a2"], ["b", "b2"], ["b2", "c"]])
    assert [m.tolist() for m in mates] == [[1], [0], [3, 4], [2, 4], [2, 3], []]


def test_label_loss_pulls_copies_to_one_and_pushes_others_below_the_margin():
    sims = torch.tensor([1.0, 0.5, -0.2, 0.3])
    copies = torch.tensor([True, True, False, False])
    # copies: |1 - s| = 0, 0.5; others above 0 only: 0, 0.3
    assert float(copy_label_loss(sims, copies, 0.0)) == pytest.approx((0 + 0.5 + 0 + 0.3) / 4)
    # a margin of -1 on the fine scale is an L1 target of -1 for non-copies
    assert float(copy_label_loss(sims, copies, -1.0)) == pytest.approx((0 + 0.5 + 0.8 + 1.3) / 4)
    # a copy margin below 1: copies above it are left alone (no drive into the Hardtanh ceiling)
    assert float(copy_label_loss(sims, copies, 0.0, positive=0.6)) == pytest.approx((0 + 0.1 + 0 + 0.3) / 4)
    s = torch.tensor([0.2, 0.4], requires_grad=True)
    copy_label_loss(s, torch.tensor([True, False]), 0.0).backward()
    assert s.grad.tolist() == [-0.5, 0.5]  # up for the copy, down for the other


def test_dual_learning_configs_are_checked(data):
    base = {
        "output": str(data["root"] / "never"),
        "features": str(data["features"]),
        "pairs": str(data["pairs"]),
    }
    assert not StudentsConfig().dual, "off by default"
    with pytest.raises(ConfigError, match=r"label_weight > 0 needs students\.groups"):
        load_config("students", {**base, "label_weight": 1.0})
    with pytest.raises(ConfigError, match="only read by dual learning"):
        load_config("students", {**base, "groups": str(data["groups"])})
    dual = {**base, "groups": str(data["groups"]), "label_weight": 1.0}
    with pytest.raises(ConfigError, match=r"students\.groups: .* does not exist"):
        load_config("students", {**dual, "groups": str(data["root"] / "missing.json")})
    with pytest.raises(ConfigError, match=r"students\.distill_decay: expected one of"):
        load_config("students", {**dual, "distill_decay": "step"})
    with pytest.raises(ConfigError, match=r"students\.distill_floor"):
        load_config("students", {**dual, "distill_floor": 1.5})
    with pytest.raises(ConfigError, match=r"students\.label_weight: expected a non-negative"):
        load_config("students", {**base, "label_weight": -1.0})
    with pytest.raises(ConfigError, match=r"students\.label_negative < students\.label_positive"):
        load_config("students", {**dual, "label_negative": 0.5, "label_positive": 0.5})
    assert load_config("students", {**dual, "distill_decay": "cosine"}).dual


# -- training ---------------------------------------------------------------------------------------


def _run(data: dict[str, Path], out: Path, **settings) -> dict[str, Path]:
    config = {
        "output": str(out),
        "features": str(data["features"]),
        "pairs": str(data["pairs"]),
        "students": ["coarse", "fine_binarization"],
        "epochs": 8,
        "batch_size": 8,
        "lr_coarse": 3e-3,
        "lr_fine": 3e-3,
        "augmentation": False,
        "itq_vectors": 2000,
        "progress": False,
        **SMALL_COARSE,
        **settings,
    }
    return run_stage("students", config).outputs


def _history(checkpoint: Path) -> list[dict]:
    return json.loads(checkpoint.with_name(checkpoint.stem + "_summary.json").read_text())["history"]


@pytest.fixture(scope="module")
def runs(data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("runs")
    return {
        "pure": _run(data, root / "pure", students=["coarse"]),
        "dual": _run(data, root / "dual", groups=str(data["groups"]), label_weight=1.0, distill_floor=0.1),
    }


def test_dual_training_lowers_its_losses_and_exports_release_checkpoints(runs, tmp_path):
    outputs = runs["dual"]
    for name in ("cg_student", "fg_bin_student"):
        history = _history(outputs[name])
        weights = [h["distill_weight"] for h in history]
        assert weights[0] == 1.0 and weights[-1] == pytest.approx(0.1)
        assert history[-1]["label"] < history[0]["label"]
        assert history[-1]["label"] + history[-1]["distillation"] < (
            history[0]["label"] + history[0]["distillation"]
        )
        assert load_training_checkpoint(outputs[name])["config"]["label_weight"] == 1.0

    # one network each, in the release layout: a ModelSet loads and indexes with them
    coarse = load_checkpoint(outputs["cg_student"], expected="cg_student")
    fine = load_checkpoint(outputs["fg_bin_student"], expected="fg_bin_student")
    assert isinstance(coarse, CoarseGrainedStudent) and isinstance(fine, FineGrainedStudent)
    state = torch.load(outputs["cg_student"], map_location="cpu", weights_only=False)
    assert set(state["model"]) == set(coarse.state_dict())
    selector = save_checkpoint(SelectorNetwork(dims=DIMS).eval(), tmp_path / "selector.pth")
    models = ModelSet.from_checkpoints(outputs["cg_student"], outputs["fg_bin_student"], selector)
    features = [np.asarray(torch.randn(5, REGIONS, DIMS)) for _ in range(2)]
    records = models.index_features(features)
    assert records[0].coarse.shape == (coarse.output_dim,)
    assert records[0].fine.shape == (5, REGIONS, DIMS // 8)  # packed bits


def test_labels_correct_the_teachers_false_copies(data, runs):
    pairs = MinedPairs.load(data["pairs"])
    copies = copy_labels(pairs, json.loads(data["groups"].read_text()))
    false_copies, true_copies = pairs.positive & ~copies, pairs.positive & copies
    assert false_copies.sum() >= 10  # the teacher merged two groups
    features = FeatureSet.open(data["features"])
    queries, targets = [pairs.ids[i] for i in pairs.anchor], [pairs.ids[i] for i in pairs.target]
    gaps = {}
    for name, outputs in runs.items():
        sims = pair_similarities(load_checkpoint(outputs["cg_student"]), features, queries, targets)
        gaps[name] = sims[true_copies].mean() - sims[false_copies].mean()
    # pure distillation learns the teacher's mistake; the labels pull those pairs apart
    assert gaps["pure"] < 0.25 and gaps["dual"] > gaps["pure"] + 0.3


def test_each_anchor_also_meets_a_labelled_copy(data):
    features, pairs = FeatureSet.open(data["features"]), MinedPairs.load(data["pairs"])
    groups = json.loads(data["groups"].read_text())
    student = CoarseGrainedStudent(dims=DIMS, **SMALL_COARSE)
    for mates in (True, False):
        config = StudentsConfig(epochs=4, groups=str(data["groups"]), label_weight=1.0, label_mates=mates)
        dual = DualLearning.from_config(config, pairs, groups)
        task = DistillationTask(
            "cg", student, features, pairs, batch_size=8, device=torch.device("cpu"), dual=dual
        )
        batch = next(iter(task.batches(1, np.random.default_rng(0))))
        b = len(batch.targets) // 2
        assert batch.distill_weight == pytest.approx(1 - 0.95 / 3)
        assert len(batch.videos) == 3 * b + len(batch.mate_of or [])
        assert (len(batch.mate_of or []) == b) is mates  # every anchor of the fixture has a group
        assert set(task.losses(batch)) == {"loss", "distillation", "label", "distill_weight"}


def test_pure_distillation_is_unchanged_by_the_option(runs):
    history = _history(runs["pure"]["cg_student"])
    assert set(history[0]) == {"epoch", "loss", "distillation", "seconds"}
    assert all(h["loss"] == h["distillation"] for h in history)
    # the stored settings name no dual-learning key, as checkpoints made before the option
    stored = load_training_checkpoint(runs["pure"]["cg_student"])["config"]
    assert not set(DUAL_SETTINGS) & set(stored)
