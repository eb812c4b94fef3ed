"""Packed indexing (videos concatenated along frames, no padding) equals indexing each video
alone with ``index_video``, for every network kind and the engine's ``ModelSet``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from dns_milvus.engine import ModelSet
from dns_milvus.errors import InvalidInputError
from dns_milvus.models import CoarseGrainedStudent, FineGrainedStudent, SelectorNetwork
from dns_milvus.models.packed import length_groups, pad_packed, segment_frames
from dns_milvus.scoring import segment_codes
from dns_milvus.similarity import pack_codes, pack_signs
from dns_milvus.testing.synthetic import write_model_set
from tests.fixtures.engine import random_video

LENGTHS = [1, 2, 3, 4, 7, 19, 33, 5]  # 1-3 frames take the comparator's up-sampling rule


def _videos(lengths: list[int], dims: int, seed: int = 0) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    return [torch.from_numpy(random_video(rng, n)[..., :dims].copy()) for n in lengths]


def _packed(videos: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat(videos), torch.tensor([v.shape[0] for v in videos])


COARSE_VARIANTS = {
    "release": {},
    "no-attention": {"attention": False},
    "no-transformer": {"transformer": False},
    "no-netvlad": {"netvlad": False},
    "netvlad-no-reduction": {"netvlad_clusters": 4, "netvlad_outdims": None},
    "two-layers": {"transformer_layers": 2, "transformer_feedforward_dims": 256},
}


@pytest.mark.parametrize("variant", list(COARSE_VARIANTS))
def test_coarse_packed_equals_each_video_alone(variant: str) -> None:
    torch.manual_seed(0)
    net = CoarseGrainedStudent(**COARSE_VARIANTS[variant]).eval()
    videos = _videos(LENGTHS, 512)
    with torch.inference_mode():
        packed = net.index_packed(*_packed(videos))
        alone = torch.stack([net.index_video(v) for v in videos])
    assert packed.shape == (len(videos), net.output_dim)
    torch.testing.assert_close(packed, alone, atol=2e-5, rtol=1e-4)


def test_coarse_packed_with_a_pre_norm_gelu_layer_equals_the_padded_path() -> None:
    torch.manual_seed(1)
    net = CoarseGrainedStudent(netvlad_clusters=4).eval()
    layer = torch.nn.TransformerEncoderLayer(
        512, 8, 256, activation="gelu", batch_first=True, norm_first=True
    )
    net.transformer.layers[0] = layer.eval()
    videos = _videos(LENGTHS, 512, seed=1)
    x, lengths = _packed(videos)
    with torch.inference_mode():
        padded, mask = pad_packed(x, lengths)
        torch.testing.assert_close(
            net.index_packed(x, lengths), net.index_video(padded, mask), atol=2e-5, rtol=1e-4
        )


def test_selector_packed_equals_each_video_alone() -> None:
    torch.manual_seed(2)
    net = SelectorNetwork().eval()
    videos = _videos(LENGTHS + list(range(8, 30, 3)), 512, seed=2)
    with torch.inference_mode():
        packed = net.index_packed(*_packed(videos))
        alone = torch.stack([net.index_video(v) for v in videos])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["bin", "att", "none"])
def test_fine_packed_equals_each_video_alone(kind: str) -> None:
    torch.manual_seed(3)
    net = FineGrainedStudent(attention=kind == "att", binarization=kind == "bin").eval()
    videos = _videos(LENGTHS, 512, seed=3)
    x, lengths = _packed(videos)
    with torch.inference_mode():
        packed = net.index_packed(x, lengths)
        alone = torch.cat([net.index_video(v) for v in videos])
        torch.testing.assert_close(packed, alone, atol=1e-6, rtol=1e-5)
        if kind == "bin":
            signs = net.index_packed_signs(x, lengths)
            assert torch.equal(signs, packed > 0)
            assert np.array_equal(pack_signs(signs.numpy()), pack_codes(packed.numpy()))
        else:
            with pytest.raises(InvalidInputError, match="binarization"):
                net.index_packed_signs(x, lengths)


def test_model_set_records_equal_indexing_each_video_alone(model_set: ModelSet) -> None:
    rng = np.random.default_rng(4)
    videos = [random_video(rng, n) for n in [3, 40, 1, 12, 25, 2, 60]]
    together = model_set.index_features(videos)
    for video, record in zip(videos, together):
        alone = model_set.index_features([video])[0]
        np.testing.assert_allclose(record.coarse, alone.coarse, atol=2e-5)
        assert record.self_sim == pytest.approx(alone.self_sim, abs=1e-5)
        assert np.array_equal(record.fine, alone.fine)
        assert record.n_frames == video.shape[0]


def test_model_set_refuses_videos_with_different_region_counts(model_set: ModelSet) -> None:
    rng = np.random.default_rng(5)
    with pytest.raises(InvalidInputError, match=r"video #1: expected region features \[T, 9, 512\]"):
        model_set.index_features([random_video(rng, 4), random_video(rng, 4, regions=4)])
    any_regions = dataclasses.replace(model_set, regions=None)
    with pytest.raises(InvalidInputError, match="same number of regions"):
        any_regions.index_features([random_video(rng, 4), random_video(rng, 4, regions=4)])


@pytest.mark.parametrize(
    ("lengths", "match"),
    [
        ([3, 3], "summing to the 7"),
        ([7, 0], "summing"),
        ([-1, 8], "summing"),
        ([[7]], r"lengths \[B\]"),
        ([3.0, 4.0], "integers"),
    ],
)
def test_bad_lengths_are_refused(lengths: list, match: str) -> None:
    net = FineGrainedStudent(binarization=True).eval()
    x = torch.cat(_videos([3, 4], 512))
    with pytest.raises(InvalidInputError, match=match):
        net.index_packed(x, torch.tensor(lengths))


def test_non_finite_and_misshapen_packed_features_are_refused() -> None:
    net = SelectorNetwork().eval()
    x = torch.cat(_videos([3, 4], 512))
    x[2, 1, 5] = float("nan")
    with pytest.raises(InvalidInputError, match="NaN or Inf"):
        net.index_packed(x, torch.tensor([3, 4]))
    with pytest.raises(InvalidInputError, match=r"\[N, R, 512\]"):
        net.index_packed(torch.zeros(7, 256), torch.tensor([3, 4]))


def test_length_groups_cover_every_video_once_sorted_by_length() -> None:
    lengths = torch.tensor([5, 1, 9, 3, 3, 7, 2])
    groups = length_groups(lengths, 3)
    assert [len(g) for g in groups] == [3, 3, 1]
    order = torch.cat(groups)
    assert sorted(order.tolist()) == list(range(7))
    assert lengths[order].tolist() == sorted(lengths.tolist())


def test_pack_signs_refuses_non_boolean_or_ragged_codes() -> None:
    with pytest.raises(InvalidInputError, match="boolean"):
        pack_signs(np.ones((2, 16), dtype=np.float32))
    with pytest.raises(InvalidInputError, match="multiple of 8"):
        pack_signs(np.ones((2, 12), dtype=bool))


# -- segments (the selector's segment match) ------------------------------------------------------


def _segment_rule(n: int, segments: int) -> list[list[int]]:
    """Frames of each segment of an n-frame video: [a*n//S, max((a+1)*n//S, a*n//S + 1))."""
    return [
        list(range(a * n // segments, max((a + 1) * n // segments, a * n // segments + 1)))
        for a in range(segments)
    ]


def test_segment_frames_cut_each_video_into_consecutive_near_equal_parts() -> None:
    index, sizes = segment_frames(torch.tensor([5, 2, 8]), 3)
    # 5 frames: 1 + 2 + 2; 2 frames (fewer than segments): frame 0 twice, then 1; 8 frames: 2 + 3 + 3
    assert index.tolist() == [0, 1, 2, 3, 4, 5, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    assert sizes.tolist() == [1, 2, 2, 1, 1, 1, 2, 3, 3]
    index, sizes = segment_frames(torch.tensor([1, 4]), 4)
    assert index.tolist() == [0, 0, 0, 0, 1, 2, 3, 4] and sizes.tolist() == [1] * 8
    index, sizes = segment_frames(torch.tensor([3, 7]), 1)  # one segment: the whole video
    assert index.tolist() == list(range(10)) and sizes.tolist() == [3, 7]
    for n in range(1, 12):
        parts = _segment_rule(n, 4)
        assert sum(map(len, parts)) == max(n, 4) and all(parts)
        if n >= 4:
            assert [f for part in parts for f in part] == list(range(n))  # every frame once, in order
    for bad in (0, -2):
        with pytest.raises(InvalidInputError, match="segments must be >= 1"):
            segment_frames(torch.tensor([3]), bad)


def test_coarse_segments_equal_indexing_each_segment_alone() -> None:
    torch.manual_seed(6)
    net = CoarseGrainedStudent(
        dims=64,
        transformer_heads=4,
        transformer_feedforward_dims=128,
        netvlad_clusters=8,
        netvlad_outdims=128,
    ).eval()
    lengths, segments = [1, 2, 5, 9, 17, 4], 4
    videos = _videos(lengths, 64, seed=6)
    with torch.inference_mode():
        got = net.index_segments_packed(*_packed(videos), segments)
        assert got.shape == (len(videos), segments, net.output_dim)
        for b, (video, n) in enumerate(zip(videos, lengths)):
            alone = torch.stack([net.index_video(video[frames]) for frames in _segment_rule(n, segments)])
            torch.testing.assert_close(got[b], alone, atol=1e-5, rtol=1e-4)
        whole = net.index_segments_packed(*_packed(videos), 1)[:, 0]
        torch.testing.assert_close(whole, net.index_packed(*_packed(videos)), atol=1e-5, rtol=1e-4)


SEGMENTS = 4


@pytest.fixture(scope="module")
def small_segment_set(tmp_path_factory: pytest.TempPathFactory) -> ModelSet:
    """A small synthetic set (64-dim features) whose selector reads ``SEGMENTS`` segments a video."""
    directory = write_model_set(
        Path(tmp_path_factory.mktemp("segments")), dims=64, coarse_dim=128, selector_segments=SEGMENTS
    )
    return ModelSet.load(directory, device="cpu")


def test_model_set_segment_codes_equal_each_video_alone(small_segment_set: ModelSet) -> None:
    models = small_segment_set
    assert models.selector_segments == SEGMENTS
    lengths = [3, 40, 1, 12, 2, 25]
    videos = _videos(lengths, 64, seed=7)
    records = models.index_features(videos)
    with torch.inference_mode():
        for video, n, record in zip(videos, lengths, records):
            vectors = models.coarse.index_segments_packed(video, torch.tensor([n]), SEGMENTS)[0]
            assert record.segments.dtype == np.uint8
            assert record.segments.shape == (SEGMENTS, models.coarse_dim // 8)
            np.testing.assert_array_equal(record.segments, segment_codes(vectors.numpy()))
            np.testing.assert_array_equal(record.segments, models.index_features([video])[0].segments)


def test_release_layout_model_set_records_carry_no_segment_codes(model_set: ModelSet) -> None:
    assert model_set.selector_segments == 0
    records = model_set.index_features([random_video(np.random.default_rng(8), n) for n in (2, 6)])
    assert [r.segments for r in records] == [None, None]
