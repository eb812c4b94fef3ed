"""Packed binary codes and the fine-grained similarity kernels (dns_milvus.similarity).

The references are the fine students' own float paths (``frame_to_frame_similarity``,
``calculate_video_similarity``) and a direct count of differing bits.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dns_milvus.errors import DeadlineExceededError, InvalidInputError
from dns_milvus.models import FineGrainedStudent
from dns_milvus.similarity import fine as fine_module
from dns_milvus.similarity import (
    fine_similarity_float,
    fine_similarity_packed,
    pack_codes,
    packed_frame_similarity,
    packed_frame_to_frame,
    prepare_for_inference,
    resolve_backend,
    unpack_codes,
)
from dns_milvus.similarity._native import NativeKernel, load_native_kernel
from dns_milvus.similarity.comparator import comparator_student
from dns_milvus.similarity.hamming import _dot_sums_gemm, gemm_dtype

REGIONS, BITS = 9, 512
#: Target lengths mixing the comparator's short-video cases (1-3 frames) with odd and even ones.
MIXED_LENGTHS = [1, 2, 3, 4, 5, 7, 8, 11, 16, 2, 9, 1]

needs_native = pytest.mark.skipif(load_native_kernel() is None, reason="no C compiler for the native kernel")
BACKENDS = [pytest.param("native", marks=needs_native), "gemm"]


def random_codes(*shape: int, generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=generator).float() * 2 - 1


@pytest.fixture(scope="module")
def bin_student() -> FineGrainedStudent:
    torch.manual_seed(1)
    return FineGrainedStudent(binarization=True, bits=BITS).eval()


@pytest.fixture(scope="module")
def att_student() -> FineGrainedStudent:
    torch.manual_seed(2)
    return FineGrainedStudent(attention=True).eval()


def correlated_codes(base: torch.Tensor, flip: float, frames: int, g: torch.Generator) -> torch.Tensor:
    """Codes of a near-duplicate: frames of ``base`` with a fraction ``flip`` of the bits flipped,
    so that similarities spread over the range instead of sitting near 0."""
    idx = torch.randint(0, base.shape[0], (frames,), generator=g)
    flips = torch.rand(frames, *base.shape[1:], generator=g) < flip
    return torch.where(flips, -base[idx], base[idx])


# -- packing ---------------------------------------------------------------------------------------


def test_pack_bit_order_is_little_endian_within_a_byte() -> None:
    codes = -torch.ones(16)
    codes[10] = 1  # code 8*1 + 2 -> bit 2 of byte 1
    codes[0] = 1  # code 0 -> bit 0 of byte 0
    assert pack_codes(codes).tolist() == [1, 4]
    assert pack_codes(codes.numpy()).tolist() == [1, 4]


def test_pack_unpack_round_trip_and_byte_count() -> None:
    codes = random_codes(5, REGIONS, BITS)
    packed = pack_codes(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, REGIONS, BITS // 8)
    assert packed.numel() == 5 * REGIONS * BITS // 8  # exactly T*R*L/8 bytes a video
    assert torch.equal(unpack_codes(packed), codes)
    assert torch.equal(unpack_codes(packed, bits=BITS, dtype=torch.float16), codes.half())
    # numpy twins give the same bytes and the same codes
    np_packed = pack_codes(codes.numpy())
    assert isinstance(np_packed, np.ndarray) and np.array_equal(np_packed, packed.numpy())
    np_codes = unpack_codes(np_packed)
    assert np_codes.dtype == np.float32 and np.array_equal(np_codes, codes.numpy())


def test_pack_accepts_the_students_codes(bin_student: FineGrainedStudent) -> None:
    codes = bin_student.index_video(torch.randn(3, REGIONS, 512))
    assert torch.equal(unpack_codes(pack_codes(codes)), codes)


@pytest.mark.parametrize(
    ("codes", "message"),
    [
        (torch.zeros(2, 16), "-1 or \\+1"),
        (torch.tensor([1.0, -1.0, float("nan"), 1.0, 1.0, 1.0, 1.0, 1.0]), "-1 or \\+1"),
        (torch.full((8,), 2.0), "-1 or \\+1"),
        (torch.ones(2, 12), "multiple of 8"),
        (torch.ones(0), "multiple of 8"),
        (torch.ones(8, dtype=torch.bool), "dtype"),
        (np.zeros((2, 8)), "-1 or \\+1"),
        (np.ones((2, 9)), "multiple of 8"),
        ([1.0, -1.0] * 4, "torch tensor or numpy array"),
    ],
)
def test_pack_rejects_bad_codes(codes: object, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        pack_codes(codes)


def test_unpack_rejects_bad_packed() -> None:
    with pytest.raises(InvalidInputError, match="uint8"):
        unpack_codes(torch.zeros(2, 8, dtype=torch.int32))
    with pytest.raises(InvalidInputError, match="L = 512"):
        unpack_codes(torch.zeros(2, 8, dtype=torch.uint8), bits=512)


# -- packed frame-to-frame similarity ----------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_f2f_equals_float_einsum_exactly(bin_student: FineGrainedStudent, backend: str) -> None:
    g = torch.Generator().manual_seed(3)
    query = random_codes(6, REGIONS, BITS, generator=g)
    frames = torch.cat([correlated_codes(query, 0.3, 5, g), random_codes(8, REGIONS, BITS, generator=g)])
    sim = packed_frame_similarity(pack_codes(query), pack_codes(frames), backend=backend)
    reference = bin_student.frame_to_frame_similarity(query[None], frames[:, None])[0, :, :, 0].T
    assert sim.dtype == torch.float32 and sim.shape == (6, 13)
    assert torch.equal(sim, reference)
    # and the definition: mean over query regions of max over target regions of 1 - 2 hamming / L
    ham = (query[:, :, None, None, :] != frames[None, None, :, :, :]).sum(-1)  # [Tq, R, N, R]
    direct = (1 - 2 * ham.min(-1).values / BITS).mean(1)
    torch.testing.assert_close(sim, direct.float(), rtol=0, atol=1e-6)


@needs_native
@pytest.mark.parametrize("bits", [64, 512, 2048])  # 2048 bits = 32 words: beyond the AVX2 byte counters
def test_native_kernel_variants_agree(bits: int) -> None:
    kernel = load_native_kernel()
    assert isinstance(kernel, NativeKernel)
    g = torch.Generator().manual_seed(bits)
    query = pack_codes(random_codes(7, 3, bits, generator=g))  # 7: not a multiple of the 4 lanes
    frames = pack_codes(random_codes(11, 3, bits, generator=g))
    q_words, t_words = query.numpy().view("<u8"), frames.numpy().view("<u8")
    expected = _dot_sums_gemm(query, frames)  # sums over query regions of the best dot
    for variant in kernel.variants():
        for threads in (1, 2):
            ham = kernel.min_hamming_sums(q_words, t_words, threads=threads, variant=variant)
            assert torch.equal(torch.from_numpy(3 * bits - 2 * ham).float(), expected), (variant, threads)


@needs_native
def test_native_kernel_builds_into_the_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DNS_MILVUS_CACHE_DIR", str(tmp_path))
    kernel = load_native_kernel.__wrapped__()  # a fresh build, not the process-wide one
    assert kernel is not None and kernel.path.parent == tmp_path / "kernels" and kernel.path.is_file()
    assert load_native_kernel.__wrapped__().path == kernel.path  # the second load reuses the build


def test_native_kernel_can_be_switched_off_or_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DNS_MILVUS_NATIVE_KERNEL", "0")
    assert load_native_kernel.__wrapped__() is None
    monkeypatch.setenv("DNS_MILVUS_NATIVE_KERNEL", "1")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert load_native_kernel.__wrapped__() is None  # no compiler: callers fall back to the GEMM path


def test_gemm_in_float16_is_exact() -> None:
    """CUDA multiplies ±1 codes in float16: every partial sum is an integer below 2048, so exact."""
    g = torch.Generator().manual_seed(4)
    query = pack_codes(random_codes(3, REGIONS, BITS, generator=g))
    frames = pack_codes(random_codes(5, REGIONS, BITS, generator=g))
    assert torch.equal(
        _dot_sums_gemm(query, frames, torch.float16), _dot_sums_gemm(query, frames, torch.float32)
    )
    assert gemm_dtype(torch.device("cuda"), BITS) == torch.float16
    assert gemm_dtype(torch.device("cuda"), 4096) == torch.float32  # partial sums past 2048: not exact
    assert gemm_dtype(torch.device("cpu"), BITS) == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_batch_f2f_skips_padding(bin_student: FineGrainedStudent, backend: str) -> None:
    g = torch.Generator().manual_seed(5)
    query = random_codes(4, REGIONS, BITS, generator=g)
    lengths = [3, 1, 6]
    padded = torch.zeros(3, 6, REGIONS, BITS // 8, dtype=torch.uint8)
    videos = [random_codes(n, REGIONS, BITS, generator=g) for n in lengths]
    for b, v in enumerate(videos):
        padded[b, : lengths[b]] = pack_codes(v)
        padded[b, lengths[b] :] = 255  # garbage in the padding must not leak
    f2f = packed_frame_to_frame(pack_codes(query), padded, torch.tensor(lengths), backend=backend)
    assert f2f.shape == (3, 4, 6)
    for b, v in enumerate(videos):
        alone = bin_student.frame_to_frame_similarity(query, v)[0, 0]
        assert torch.equal(f2f[b, :, : lengths[b]], alone)
        assert not f2f[b, :, lengths[b] :].any()


def test_native_backend_needs_whole_words() -> None:
    assert resolve_backend("auto", torch.device("cpu"), 12) == "gemm"  # 96 bits: not whole 64-bit words
    with pytest.raises(InvalidInputError, match="multiple of 64"):
        resolve_backend("native", torch.device("cpu"), 12)
    with pytest.raises(InvalidInputError, match="back-end"):
        resolve_backend("fast", torch.device("cpu"), 64)


# -- full fine-grained similarity -----------------------------------------------------------------


def mixed_targets(query: torch.Tensor, g: torch.Generator) -> list[torch.Tensor]:
    targets = []
    for k, n in enumerate(MIXED_LENGTHS):
        if k % 2:
            targets.append(correlated_codes(query, 0.05 + 0.1 * k / len(MIXED_LENGTHS), n, g))
        else:
            targets.append(random_codes(n, REGIONS, BITS, generator=g))
    return targets


@pytest.mark.parametrize("query_frames", [9, 2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_similarity_equals_float_path(
    bin_student: FineGrainedStudent, backend: str, query_frames: int
) -> None:
    g = torch.Generator().manual_seed(6)
    query = random_codes(query_frames, REGIONS, BITS, generator=g)
    targets = mixed_targets(query, g)
    out = fine_similarity_packed(
        bin_student, pack_codes(query), [pack_codes(t) for t in targets], backend=backend
    )
    with torch.inference_mode():
        reference = torch.stack([bin_student.calculate_video_similarity(query, t) for t in targets])
    assert out.shape == (len(targets),) and out.dtype == torch.float32
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)
    assert float(out.max() - out.min()) > 1000 * 1e-5  # the scores differ far beyond the tolerance


def test_batching_does_not_change_scores(bin_student: FineGrainedStudent) -> None:
    g = torch.Generator().manual_seed(7)
    query = pack_codes(random_codes(7, REGIONS, BITS, generator=g))
    targets = [pack_codes(t) for t in mixed_targets(unpack_codes(query), g)]
    batched = fine_similarity_packed(bin_student, query, targets, batch_size=5)
    everything = fine_similarity_packed(bin_student, query, targets, batch_size=len(targets))
    one_at_a_time = torch.cat([fine_similarity_packed(bin_student, query, [t]) for t in targets])
    torch.testing.assert_close(batched, one_at_a_time, rtol=0, atol=1e-6)
    torch.testing.assert_close(everything, one_at_a_time, rtol=0, atol=1e-6)


def _comparator_spy(student: FineGrainedStudent, monkeypatch: pytest.MonkeyPatch, before=None) -> list:
    """Record the frame-matrix shape of each comparator call (``before`` runs first), on the
    student the float32 scorers call (the cached copy with the fused first layer)."""
    calls: list[tuple[int, ...]] = []
    student = comparator_student(student, torch.float32)
    real = student.similarity_from_frame_matrix

    def spy(f2f: torch.Tensor, *args: object) -> torch.Tensor:
        calls.append(tuple(f2f.shape))
        if before is not None:
            before()
        return real(f2f, *args)

    monkeypatch.setattr(student, "similarity_from_frame_matrix", spy)
    return calls


def test_comparator_batches_are_bounded_in_frame_matrix_cells(
    bin_student: FineGrainedStudent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long query gets fewer pairs a comparator call, so its memory stays bounded; scores are
    those of the unbounded batching."""
    g = torch.Generator().manual_seed(10)
    query = pack_codes(random_codes(40, REGIONS, BITS, generator=g))
    targets = [pack_codes(random_codes(n, REGIONS, BITS, generator=g)) for n in [3, 9, 12, 5, 30, 16, 7, 2]]
    unbounded = fine_similarity_packed(bin_student, query, targets)
    monkeypatch.setattr(fine_module, "CPU_BATCH_CELLS", 40 * 12 * 2)
    calls = _comparator_spy(bin_student, monkeypatch)
    bounded = fine_similarity_packed(bin_student, query, targets)
    assert all(n == 1 or n * tq * tt <= 40 * 12 * 2 for n, tq, tt in calls), calls
    assert len(calls) > 2 and sum(n for n, _, _ in calls) == len(targets)
    torch.testing.assert_close(bounded, unbounded, rtol=0, atol=1e-6)


def test_a_deadline_stops_scoring_between_comparator_batches(
    bin_student: FineGrainedStudent, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = torch.Generator().manual_seed(11)
    query = pack_codes(random_codes(6, REGIONS, BITS, generator=g))
    targets = [pack_codes(random_codes(n, REGIONS, BITS, generator=g)) for n in [4, 5, 6, 7, 8, 9]]
    deadline = time.monotonic() + 2.0

    def outlive_the_deadline() -> None:  # the first batch runs past the deadline
        while time.monotonic() <= deadline:
            time.sleep(0.01)

    calls = _comparator_spy(bin_student, monkeypatch, before=outlive_the_deadline)
    with pytest.raises(DeadlineExceededError, match="2 of 6 targets scored"):
        fine_similarity_packed(bin_student, query, targets, batch_size=2, deadline=deadline)
    assert len(calls) == 1  # the other two batches never ran
    with pytest.raises(DeadlineExceededError, match="0 of 6"):  # already late: nothing runs
        fine_similarity_float(bin_student, unpack_codes(query), [unpack_codes(t) for t in targets],
                              deadline=time.monotonic() - 1.0)  # fmt: skip
    assert len(calls) == 1


def test_float_path_equals_student_and_packed(
    bin_student: FineGrainedStudent, att_student: FineGrainedStudent
) -> None:
    g = torch.Generator().manual_seed(8)
    features = torch.randn(6, REGIONS, 512, generator=g)
    with torch.inference_mode():
        query = att_student.index_video(features)
        targets = []
        for n in MIXED_LENGTHS:
            frames = features[: max(1, n % 6)]
            targets.append(att_student.index_video(frames + 0.1 * torch.randn(frames.shape, generator=g)))
        reference = torch.stack([att_student.calculate_video_similarity(query, t) for t in targets])
    out = fine_similarity_float(att_student, query, targets, batch_size=4)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)
    # float16 storage: the same as the float32 path on the float16-rounded tensors
    half = fine_similarity_float(att_student, query.half(), [t.half() for t in targets])
    rounded = fine_similarity_float(att_student, query.half().float(), [t.half().float() for t in targets])
    torch.testing.assert_close(half, rounded, rtol=0, atol=1e-6)
    mixed = [t.half() if k % 2 else t for k, t in enumerate(targets)]  # stores of both kinds at once
    mixed_rounded = [t.half().float() if k % 2 else t for k, t in enumerate(targets)]
    torch.testing.assert_close(
        fine_similarity_float(att_student, query, mixed),
        fine_similarity_float(att_student, query, mixed_rounded),
        rtol=0,
        atol=1e-6,
    )
    # the binarization student's ±1 codes give the same scores by either path
    codes_q = random_codes(5, REGIONS, BITS, generator=g)
    codes_t = mixed_targets(codes_q, g)
    packed = fine_similarity_packed(bin_student, pack_codes(codes_q), [pack_codes(t) for t in codes_t])
    torch.testing.assert_close(
        fine_similarity_float(bin_student, codes_q, codes_t), packed, rtol=0, atol=1e-5
    )


def test_channels_last_comparator_keeps_scores(bin_student: FineGrainedStudent) -> None:
    plain = FineGrainedStudent(binarization=True, bits=BITS).eval()
    plain.load_state_dict(bin_student.state_dict())  # the default (NCHW) layout, same values
    weight = plain.visil_head.conv2.weight
    assert not weight.is_contiguous(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(9)
    query = pack_codes(random_codes(8, REGIONS, BITS, generator=g))
    targets = [pack_codes(t) for t in mixed_targets(unpack_codes(query), g)]
    nchw = fine_similarity_packed(plain, query, targets, channels_last=False)
    assert not plain.visil_head.conv2.weight.is_contiguous(memory_format=torch.channels_last)  # opted out
    default = fine_similarity_packed(plain, query, targets)
    assert plain.visil_head.conv2.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(default, nchw, rtol=0, atol=1e-6)
    assert prepare_for_inference(plain) is plain  # idempotent
    for key, value in bin_student.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value)  # the layout changed, not the values


def test_timings_report_both_stages(bin_student: FineGrainedStudent) -> None:
    query = pack_codes(random_codes(5, REGIONS, BITS))
    timings: dict[str, float] = {}
    fine_similarity_packed(bin_student, query, [query, query[:2]], timings=timings)
    assert set(timings) == {"frame_matrices", "comparator"} and all(v > 0 for v in timings.values())


# -- bad inputs ----------------------------------------------------------------------------------------


def test_packed_rejects_bad_inputs(bin_student: FineGrainedStudent, att_student: FineGrainedStudent) -> None:
    query = pack_codes(random_codes(4, REGIONS, BITS))
    target = pack_codes(random_codes(3, REGIONS, BITS))
    cases = [
        ((bin_student, unpack_codes(query), [target]), "dtype torch.float32"),
        ((bin_student, query[0], [target]), "\\[T, R, L/8\\]"),
        ((bin_student, query, [target[:, :5]]), "\\[T, 9, 64\\]"),
        ((bin_student, query, [target[:, :, :32]]), "\\[T, 9, 64\\]"),
        ((bin_student, query[:, :, :32], [target[:, :, :32]]), "512-bit student"),
        ((bin_student, query, []), "at least one target"),
        ((bin_student, query, [target, target[:0]]), "T, R, L/8 >= 1"),
        ((bin_student, query, target), "sequence of per-video tensors"),
        ((bin_student, query, [target.numpy()]), "torch tensor"),
        ((att_student, query, [target]), "binarization student"),
    ]
    for args, message in cases:
        with pytest.raises(InvalidInputError, match=message):
            fine_similarity_packed(*args)
    with pytest.raises(InvalidInputError, match="batch_size"):
        fine_similarity_packed(bin_student, query, [target], batch_size=0)


def test_float_rejects_bad_inputs(att_student: FineGrainedStudent) -> None:
    query = torch.randn(4, REGIONS, 512)
    nan_target = torch.randn(3, REGIONS, 512)
    nan_target[1, 2, 3] = float("nan")
    cases = [
        ((query, [torch.randn(3, 5, 512)]), "\\[T, 9, 512\\]"),
        ((query, [torch.randn(3, REGIONS, 256)]), "\\[T, 9, 512\\]"),
        ((query, [torch.zeros(0, REGIONS, 512)]), "T >= 1"),
        ((query, []), "at least one target"),
        ((query.to(torch.int32), [query]), "float16 or float32"),
        ((query, [nan_target]), "NaN"),
    ]
    for args, message in cases:
        with pytest.raises(InvalidInputError, match=message):
            fine_similarity_float(att_student, *args)
