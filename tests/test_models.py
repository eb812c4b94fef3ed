"""The DnS networks: parity with the plain reference, batch invariance, short videos, input
validation and training paths."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dns_milvus.errors import InvalidInputError
from dns_milvus.models import (
    BinarizationLayer,
    CoarseGrainedStudent,
    FineGrainedStudent,
    SelectorNetwork,
    TeacherEnsemble,
    VideoComparator,
    ViSiLTeacher,
    build_from_state_dict,
)
from dns_milvus.models.pairwise import _chunks
from tests import release_reference as ref

FINE_KINDS = ["fg_att_student", "fg_bin_student", "teacher"]
ALL_KINDS = ["cg_student", *FINE_KINDS, "selector"]
PARITY_TOL = 1e-5
BATCH_TOL = 1e-6


def make_videos(lengths: list[int], dims: int = 512, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(t, 9, dims, generator=gen), dim=-1) for t in lengths]


def pad(videos: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([v.shape[0] for v in videos])
    batch = torch.nn.utils.rnn.pad_sequence(videos, batch_first=True)
    return batch, torch.arange(batch.shape[1])[None, :] < lengths[:, None]


@pytest.fixture(scope="module")
def networks() -> dict[str, tuple[torch.nn.Module, dict[str, torch.Tensor]]]:
    """One network of each kind with random weights of the release layout, and its state_dict."""
    nets = {}
    for seed, kind in enumerate(ALL_KINDS):
        sd = ref.random_state_dict(kind, seed=seed)
        nets[kind] = (build_from_state_dict(sd), sd)
    return nets


# -- parity with the reference (one video / one pair at a time) ------------------------------


@torch.no_grad()
def test_coarse_student_matches_reference(networks) -> None:
    net, sd = networks["cg_student"]
    videos = make_videos([4, 7, 12])
    ours = torch.stack([net.index_video(v) for v in videos])
    expected = torch.stack([ref.cg_index(sd, v) for v in videos])
    assert ours.shape == (3, 1024)
    assert torch.allclose(ours, expected, atol=PARITY_TOL, rtol=0)
    assert torch.allclose(ours.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(net.calculate_video_similarity(ours, ours), expected @ expected.T, atol=PARITY_TOL)


@pytest.mark.parametrize("kind", FINE_KINDS)
@torch.no_grad()
def test_fine_networks_match_reference(networks, kind: str) -> None:
    net, sd = networks[kind]
    lengths = [1, 2, 3, 5, 8, 13]
    videos = make_videos(lengths, seed=1)
    batch, mask = pad(videos)
    indexed = net.index_video(batch, mask)
    for i, video in enumerate(videos):
        expected = ref.fg_index(sd, kind, video)
        assert torch.allclose(indexed[i, : lengths[i]], expected, atol=PARITY_TOL, rtol=0)
        assert not indexed[i, lengths[i] :].any(), "padded frames are zero"
    sims = net.calculate_video_similarity(indexed, indexed, mask, mask)
    assert sims.shape == (6, 6)
    ref_indexed = [ref.fg_index(sd, kind, v) for v in videos]
    expected = torch.tensor(
        [[float(ref.fg_similarity(sd, kind, q, t)) for t in ref_indexed] for q in ref_indexed]
    )
    assert torch.allclose(sims, expected, atol=PARITY_TOL, rtol=0)
    assert sims.abs().max() <= 1.0
    assert sims.std() > 1e-3, "the random weights give varied similarities, not a saturated constant"


@torch.no_grad()
def test_selector_matches_reference(networks) -> None:
    net, sd = networks["selector"]
    videos = make_videos([1, 2, 3, 4, 9, 16], seed=2)
    batch, mask = pad(videos)
    expected = torch.stack([ref.selector_self_similarity(sd, v) for v in videos])
    assert torch.allclose(net.index_video(batch, mask), expected, atol=PARITY_TOL, rtol=0)
    z = torch.rand(32, 3, generator=torch.Generator().manual_seed(3))
    decision = net(z)
    assert decision.shape == (32,)
    assert torch.allclose(decision, ref.selector_mlp(sd, z), atol=PARITY_TOL, rtol=0)
    assert ((decision > 0) & (decision < 1)).all()


# -- batch invariance ------------------------------------------------------------------------

# Odd counts next to a longer batch partner: where the release's pooling reads the padding.
BATCH_LENGTHS = [5, 12, 7, 2, 9, 16]


def _alone_and_batched(net: torch.nn.Module, kind: str, videos: list[torch.Tensor]):
    batch, mask = pad(videos)
    if kind in FINE_KINDS:
        singles = [net.index_video(v) for v in videos]
        alone = torch.tensor(
            [[float(net.calculate_video_similarity(q, t)) for t in singles] for q in singles]
        )
        indexed = net.index_video(batch, mask)
        return alone, net.calculate_video_similarity(indexed, indexed, mask, mask)
    alone = torch.stack([net.index_video(v) for v in videos])
    return alone, net.index_video(batch, mask)


@pytest.mark.parametrize("kind", ALL_KINDS)
@torch.no_grad()
def test_padded_batch_equals_alone(networks, kind: str) -> None:
    net, _ = networks[kind]
    alone, batched = _alone_and_batched(net, kind, make_videos(BATCH_LENGTHS, seed=4))
    assert torch.allclose(batched, alone, atol=BATCH_TOL, rtol=0), (batched - alone).abs().max()


@pytest.mark.parametrize("kind", FINE_KINDS)
@torch.no_grad()
def test_pair_score_independent_of_batch_partners(networks, kind: str) -> None:
    """An odd-length query against an odd-length target, alone and among longer targets."""
    net, _ = networks[kind]
    query, target, long1, long2 = make_videos([7, 5, 20, 11], seed=5)
    q = net.index_video(query)
    alone = net.calculate_video_similarity(q, net.index_video(target))
    for partners, position in (([target, long1], 0), ([long2, target, long1], 1)):
        batch, mask = pad(partners)
        sims = net.calculate_video_similarity(q, net.index_video(batch, mask), None, mask)
        assert abs(float(sims[position]) - float(alone)) <= BATCH_TOL


@torch.no_grad()
def test_comparator_ignores_padding_content(networks) -> None:
    comparator = networks["fg_att_student"][0].visil_head
    gen = torch.Generator().manual_seed(6)
    sims = torch.rand(3, 11, 9, generator=gen) * 2 - 1
    ql, tl = torch.tensor([11, 5, 2]), torch.tensor([9, 7, 3])
    out, oql, otl = comparator(sims, ql, tl)
    assert oql.tolist() == [2, 1, 1] and otl.tolist() == [2, 1, 1]  # floor(floor(len*repeat/2)/2)
    noisy = sims.clone()
    for i in range(3):
        noisy[i, ql[i] :, :] = 100.0
        noisy[i, :, tl[i] :] = -100.0
    assert torch.equal(comparator(noisy, ql, tl)[0], out), (
        "cells outside the lengths never influence the result"
    )
    for i in range(3):
        alone, _, _ = comparator(sims[i : i + 1, : ql[i], : tl[i]])
        assert torch.allclose(out[i, : oql[i], : otl[i]], alone[0], atol=BATCH_TOL, rtol=0)
        assert not out[i, oql[i] :].any() and not out[i, :, otl[i] :].any()
    assert VideoComparator.output_lengths(torch.tensor([1, 2, 3, 4, 5, 7, 8, 9])).tolist() == [
        1,
        1,
        1,
        1,
        1,
        1,
        2,
        2,
    ]


# -- short videos ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", FINE_KINDS)
@pytest.mark.parametrize("frames", [1, 2, 3])
@torch.no_grad()
def test_short_videos_follow_the_repetition_rule(networks, kind: str, frames: int) -> None:
    net, _ = networks[kind]
    short, target = make_videos([frames, 6], seed=7)
    repeated = short.repeat_interleave(math.ceil(4 / frames), dim=0)
    sim = net.calculate_video_similarity(net.index_video(short), net.index_video(target))
    assert sim.ndim == 0 and torch.isfinite(sim)
    sim_repeated = net.calculate_video_similarity(net.index_video(repeated), net.index_video(target))
    assert abs(float(sim) - float(sim_repeated)) <= BATCH_TOL
    both_short = net.calculate_video_similarity(net.index_video(short), net.index_video(short))
    both_repeated = net.calculate_video_similarity(net.index_video(repeated), net.index_video(repeated))
    assert torch.isfinite(both_short) and abs(float(both_short) - float(both_repeated)) <= BATCH_TOL


@pytest.mark.parametrize("frames", [1, 2, 3])
@torch.no_grad()
def test_short_video_self_similarity(networks, frames: int) -> None:
    net, _ = networks["selector"]
    (short,) = make_videos([frames], seed=8)
    repeated = short.repeat_interleave(math.ceil(4 / frames), dim=0)
    value = net.index_video(short)
    assert torch.isfinite(value) and abs(float(value) - float(net.index_video(repeated))) <= BATCH_TOL
    coarse = networks["cg_student"][0].index_video(short)
    assert torch.isfinite(coarse).all() and abs(float(coarse.norm()) - 1.0) < 1e-5


# -- frame matrices: the contract of the packed-bit kernels ----------------------------------


@pytest.mark.parametrize("kind", FINE_KINDS)
@torch.no_grad()
def test_similarity_from_frame_matrix_matches_video_similarity(networks, kind: str) -> None:
    net, _ = networks[kind]
    queries, targets = make_videos([6, 3], seed=9), make_videos([10, 4, 1, 7], seed=10)
    (qb, qm), (tb, tm) = pad(queries), pad(targets)
    qi, ti = net.index_video(qb, qm), net.index_video(tb, tm)
    f2f = net.frame_to_frame_similarity(qi, ti, qm, tm)  # [2, 4, Tq, Tt]
    assert f2f.shape == (2, 4, 6, 10)
    assert not f2f[1, :, 3:].any() and not f2f[:, 1, :, 4:].any(), "cells of padded frames are zero"
    ql = qm.sum(1)[:, None].expand(2, 4).reshape(-1)
    tl = tm.sum(1)[None, :].expand(2, 4).reshape(-1)
    from_matrix = net.similarity_from_frame_matrix(f2f.reshape(8, 6, 10), ql, tl).view(2, 4)
    assert torch.allclose(from_matrix, net.calculate_video_similarity(qi, ti, qm, tm), atol=BATCH_TOL, rtol=0)


@torch.no_grad()
def test_binary_frame_similarity_is_hamming(networks) -> None:
    net, sd = networks["fg_bin_student"]
    bits = sd["binarization.W"].shape[1]
    q, t = (net.index_video(v) for v in make_videos([3, 4], seed=11))
    assert set(q.unique().tolist()) == {-1.0, 1.0}
    hamming = (q[:, :, None, None, :] != t[None, None, :, :, :]).sum(-1).float()  # [Tq, Rq, Tt, Rt]
    expected = (1 - 2 * hamming / bits).amax(-1).mean(1)
    assert torch.allclose(net.frame_to_frame_similarity(q[None], t[None])[0, 0], expected, atol=1e-6, rtol=0)


@torch.no_grad()
def test_chunked_pairs_equal_one_chunk(networks) -> None:
    net, _ = networks["fg_bin_student"]
    videos = make_videos([3, 9, 5, 12, 4, 8, 6], seed=12)
    batch, mask = pad(videos)
    indexed = net.index_video(batch, mask)
    whole = net.calculate_video_similarity(indexed[:2], indexed, mask[:2], mask)
    runs = _chunks(sorted(m.sum().item() for m in mask), 2 * 9 * 81, 40_000)  # Bq=2, Tq=9, R*R=81
    assert len(runs) > 2, "the small budget splits the targets into several chunks"
    net.chunk_elements = 40_000
    try:
        chunked = net.calculate_video_similarity(indexed[:2], indexed, mask[:2], mask)
    finally:
        del net.chunk_elements
    assert torch.allclose(chunked, whole, atol=BATCH_TOL, rtol=0)


# -- layers and shapes -----------------------------------------------------------------------


def test_binarization_codes_and_surrogate() -> None:
    layer = BinarizationLayer(16, bits=8).eval()
    x = torch.randn(5, 16)
    x[0] = 0.0  # projects to exactly 0: must give +1, never 0
    codes = layer(x)
    assert codes.shape == (5, 8) and set(codes.unique().tolist()) <= {-1.0, 1.0}
    assert (codes[0] == 1).all()
    layer.train()
    soft = layer(x[1:])
    assert ((soft > -1.0 - 1e-6) & (soft < 1.0 + 1e-6)).all()
    assert torch.equal(torch.sign(soft), codes[1:]), "the surrogate has the sign of the codes"


@torch.no_grad()
def test_unbatched_inputs_give_unbatched_outputs(networks) -> None:
    video, other = make_videos([5, 6], seed=13)
    cg = networks["cg_student"][0]
    assert cg.index_video(video).shape == (1024,)
    vec = cg.index_video(video)
    assert cg.calculate_video_similarity(vec, torch.stack([vec, vec])).shape == (2,)
    assert abs(float(cg.calculate_video_similarity(vec, vec)) - 1.0) < 1e-5
    fg = networks["fg_bin_student"][0]
    q, t = fg.index_video(video), fg.index_video(other)
    assert q.shape == (5, 9, 512)
    assert fg.calculate_video_similarity(q, t).shape == ()
    assert fg.calculate_video_similarity(q, torch.stack([t[:5], q])).shape == (2,)
    assert fg.calculate_video_similarity(torch.stack([q, q]), t).shape == (2,)
    selector = networks["selector"][0]
    assert selector.index_video(video).shape == ()
    assert selector(torch.tensor([0.1, 0.2, 0.3])).shape == ()
    assert selector(torch.empty(0, 3)).shape == (0,)


# -- input validation ------------------------------------------------------------------------

SHAPE = "[T, R, 512] or [B, T, R, 512]"


def _bad_inputs() -> list[tuple[str, torch.Tensor, torch.Tensor | None, str]]:
    good = torch.rand(2, 4, 9, 512)
    nan, inf = good.clone(), good.clone()
    nan[1, 2, 3, 4] = float("nan")
    inf[0, 0, 0, 0] = float("inf")
    full = torch.ones(2, 4, dtype=torch.bool)
    holes = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    empty_video = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    return [
        ("wrong dim", torch.rand(3, 9, 256), None, f"expected region features {SHAPE}, got [3, 9, 256]"),
        ("wrong rank", torch.rand(9, 512), None, f"expected region features {SHAPE}, got [9, 512]"),
        ("rank 5", torch.rand(1, 2, 3, 9, 512), None, "got [1, 2, 3, 9, 512]"),
        ("no frames", torch.rand(0, 9, 512), None, "at least one frame"),
        ("no frames batched", torch.rand(2, 0, 9, 512), None, "got [2, 0, 9, 512]"),
        ("nan", nan, full, "NaN or Inf"),
        ("inf", inf, None, "NaN or Inf"),
        ("mask shape", good, torch.ones(2, 5, dtype=torch.bool), "expected a frame mask [2, 4]"),
        ("mask rank", good, torch.ones(4, dtype=torch.bool), "got [4]"),
        ("mask values", good, torch.full((2, 4), 2.0), "bool or 0/1"),
        ("mask holes", good, holes, "prefix of real frames"),
        ("mask empty video", good, empty_video, "at least one real frame"),
    ]


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_bad_region_features_are_rejected(networks, kind: str, case) -> None:
    _, x, mask, message = case
    with pytest.raises(InvalidInputError) as err:
        networks[kind][0].index_video(x, mask)
    assert message in str(err.value)


@torch.no_grad()
def test_bad_inputs_of_similarity_functions(networks) -> None:
    fg = networks["fg_bin_student"][0]
    with pytest.raises(InvalidInputError, match=r"indexed query tensors \[T, R, 512\]"):
        fg.calculate_video_similarity(torch.rand(3, 9, 100), torch.rand(3, 9, 512))
    with pytest.raises(InvalidInputError, match=r"frame mask \[2, 3\]"):
        fg.calculate_video_similarity(torch.rand(3, 9, 512), torch.rand(2, 3, 9, 512), None, torch.ones(2, 4))
    with pytest.raises(InvalidInputError, match=r"\[N, Tq, Tt\]"):
        fg.similarity_from_frame_matrix(torch.rand(4, 4))
    with pytest.raises(InvalidInputError, match=r"query lengths \[2\] of integers in 1..5"):
        fg.similarity_from_frame_matrix(torch.rand(2, 5, 6), torch.tensor([5, 0]), torch.tensor([6, 6]))
    with pytest.raises(InvalidInputError, match=r"target lengths \[2\] of integers in 1..6"):
        fg.similarity_from_frame_matrix(torch.rand(2, 5, 6), torch.tensor([5, 5]), torch.tensor([7, 6]))
    with pytest.raises(InvalidInputError, match="target lengths"):
        fg.similarity_from_frame_matrix(torch.rand(2, 5, 6), None, torch.tensor([6.0, 6.0]))
    with pytest.raises(InvalidInputError, match="NaN or Inf"):
        fg.visil_head(torch.full((1, 4, 4), float("nan")))
    cg = networks["cg_student"][0]
    with pytest.raises(
        InvalidInputError, match=r"expected query vectors \[1024\] or \[B, 1024\], got \[2, 512\]"
    ):
        cg.calculate_video_similarity(torch.rand(2, 512), torch.rand(2, 1024))
    with pytest.raises(InvalidInputError, match=r"\[3\] or \[N, 3\], got \[4, 2\]"):
        networks["selector"][0](torch.rand(4, 2))
    with pytest.raises(InvalidInputError, match="either attention or binarization"):
        FineGrainedStudent(attention=True, binarization=True)


@torch.no_grad()
def test_segment_selector_reads_the_segment_match_as_its_fourth_input() -> None:
    selector = SelectorNetwork(dims=32, hidden_size=8, segments=4).eval()
    assert selector.input_size == 4 and selector.mlp.model[0].weight.shape == (8, 4)
    gen = torch.Generator().manual_seed(9)
    target_self, coarse, match = (torch.rand(5, generator=gen) for _ in range(3))
    got = selector.pair_confidence(0.3, target_self, coarse, match)
    expected = selector(torch.stack([torch.full((5,), 0.3), target_self, coarse, match], dim=-1))
    assert torch.equal(got, expected) and got.shape == (5,)
    assert not torch.allclose(got, selector.pair_confidence(0.3, target_self, coarse, -match))
    assert selector(torch.tensor([0.1, 0.2, 0.3, 0.4])).shape == ()


def test_selectors_refuse_a_missing_or_an_extra_segment_match() -> None:
    with_segments = SelectorNetwork(dims=32, hidden_size=8, segments=4).eval()
    release = SelectorNetwork(dims=32, hidden_size=8).eval()
    target_self, coarse, match = torch.rand(5), torch.rand(5), torch.rand(5)
    with pytest.raises(InvalidInputError, match="segment matches of 4 segments; pass them"):
        with_segments.pair_confidence(0.3, target_self, coarse)
    with pytest.raises(InvalidInputError, match="three inputs; it reads no segment match"):
        release.pair_confidence(0.3, target_self, coarse, match)
    with pytest.raises(InvalidInputError, match=r"segment_match\) \[4\] or \[N, 4\], got \[5, 3\]"):
        with_segments(torch.rand(5, 3))
    with pytest.raises(InvalidInputError, match=r"coarse_sim\) \[3\] or \[N, 3\], got \[5, 4\]"):
        release(torch.rand(5, 4))
    with pytest.raises(InvalidInputError, match="segments must be >= 0"):
        SelectorNetwork(dims=32, segments=-1)


# -- training --------------------------------------------------------------------------------


def test_fine_student_trains_on_aligned_pairs() -> None:
    torch.manual_seed(0)
    net = FineGrainedStudent(dims=32, binarization=True, bits=64)
    videos = make_videos([5, 8, 3, 6], dims=32, seed=14)
    batch, mask = pad(videos)
    net.eval()
    with torch.no_grad():
        indexed = net.index_video(batch, mask)
        expected = net.calculate_video_similarity(indexed[:2], indexed[2:], mask[:2], mask[2:]).diagonal()
        sims, _ = net(indexed[:2], indexed[2:], mask[:2], mask[2:])
    assert torch.allclose(sims, expected, atol=BATCH_TOL, rtol=0)
    net.train()
    indexed = net.index_video(batch, mask)
    assert indexed.requires_grad and (indexed.abs() < 1).any(), "the smooth surrogate during training"
    sims, regularization = net(indexed[:2], indexed[2:], mask[:2], mask[2:])
    assert regularization.ndim == 0 and regularization >= 0
    (sims.sum() + regularization).backward()
    assert net.binarization.W.grad is not None and net.visil_head.conv1.weight.grad.abs().sum() > 0


def test_teacher_and_coarse_student_are_trainable() -> None:
    torch.manual_seed(0)
    teacher = ViSiLTeacher(dims=32).train()
    batch, mask = pad(make_videos([6, 4, 7, 5], dims=32, seed=15))
    indexed = teacher.index_video(batch, mask)
    sims, regularization = teacher(indexed[:2], indexed[2:], mask[:2], mask[2:])
    (sims.sum() + regularization).backward()
    assert teacher.attention.context_vector.weight.grad.abs().sum() > 0
    coarse = CoarseGrainedStudent(dims=32, transformer_heads=4, transformer_feedforward_dims=64,
                                  netvlad_clusters=4, netvlad_outdims=16).train()  # fmt: skip
    vectors = coarse.index_video(batch, mask)
    coarse(vectors[:2], vectors[2:]).sum().backward()
    assert coarse.netvlad.reduction_layer.weight.grad.abs().sum() > 0
    selector = SelectorNetwork(dims=32, hidden_size=8).train()
    selector(torch.rand(6, 3)).sum().backward()
    assert selector.mlp.model[0].weight.grad.abs().sum() > 0


@torch.no_grad()
def test_teacher_ensemble_scores_the_mean_of_its_members() -> None:
    torch.manual_seed(3)
    members = [ViSiLTeacher(dims=32).eval() for _ in range(3)]
    ensemble = TeacherEnsemble.of(members)
    batch, mask = pad(make_videos([6, 4, 9, 5], dims=32, seed=21))
    indexed = ensemble.index_video(batch, mask)
    assert indexed.shape == (4, 9, batch.shape[2], 96)
    got = ensemble.calculate_video_similarity(indexed[:2], indexed, mask[:2], mask)
    queries = [m.index_video(batch[:2], mask[:2]) for m in members]
    targets = [m.index_video(batch, mask) for m in members]
    each = torch.stack(
        [m.calculate_video_similarity(q, t, mask[:2], mask) for m, q, t in zip(members, queries, targets)]
    )
    assert torch.allclose(got, each.mean(0), atol=1e-6)
    assert each.std(0).max() > 1e-4, "members of different weights disagree: the mean is none of them"
    lengths = mask.sum(1)
    packed = ensemble.index_packed(torch.cat([batch[i, : int(n)] for i, n in enumerate(lengths)]), lengths)
    assert torch.allclose(packed[: int(lengths[0])], indexed[0, : int(lengths[0])], atol=1e-6)
    with pytest.raises(InvalidInputError, match="96 values a region"):
        ensemble.calculate_video_similarity(indexed[..., :32], indexed, mask, mask)
    with pytest.raises(InvalidInputError, match="share their feature size"):
        TeacherEnsemble.of([ViSiLTeacher(dims=32), ViSiLTeacher(dims=16)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@torch.no_grad()
def test_cuda_matches_cpu(networks) -> None:
    videos = make_videos([5, 12, 2], seed=16)
    batch, mask = pad(videos)
    for kind in ALL_KINDS:
        net, _ = networks[kind]
        gpu = build_from_state_dict({k: v.cuda() for k, v in net.state_dict().items()})
        if kind in FINE_KINDS:
            cpu_out = net.calculate_video_similarity(
                net.index_video(batch, mask), net.index_video(batch, mask), mask, mask
            )
            gi = gpu.index_video(batch.cuda(), mask.cuda())
            gpu_out = gpu.calculate_video_similarity(gi, gi, mask.cuda(), mask.cuda())
        else:
            cpu_out, gpu_out = net.index_video(batch, mask), gpu.index_video(batch.cuda(), mask.cuda())
        assert torch.allclose(gpu_out.cpu(), cpu_out, atol=1e-4, rtol=0), kind
