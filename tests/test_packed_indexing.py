"""Packed indexing (videos concatenated along frames, no padding) equals indexing each video
alone with ``index_video``, for every network kind and the engine's ``ModelSet``."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from dns_milvus.engine import ModelSet
from dns_milvus.errors import InvalidInputError
from dns_milvus.models import CoarseGrainedStudent, FineGrainedStudent, SelectorNetwork
from dns_milvus.models.packed import length_groups, pad_packed
from dns_milvus.similarity import pack_codes, pack_signs
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
