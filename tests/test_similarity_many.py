"""Several queries scored in shared comparator calls (dns_milvus.similarity.many).

The reference is the one-query scorer of each query (``fine_similarity_packed`` /
``fine_similarity_float``): pooling the pairs of many queries must not change a score beyond
float rounding, and a lone query must get exactly its one-query result.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from dns_milvus.errors import DeadlineExceededError, InvalidInputError
from dns_milvus.models import FineGrainedStudent
from dns_milvus.similarity import fine_similarity_float, fine_similarity_packed, pack_codes
from dns_milvus.similarity.many import (
    _comparator_batches,
    fine_similarity_float_many,
    fine_similarity_packed_many,
)
from tests import test_similarity
from tests.test_similarity import BITS, REGIONS

# The kernel tests' students (module-scoped here too).
bin_student = test_similarity.bin_student
att_student = test_similarity.att_student


def packed_video(frames: int, g: torch.Generator) -> torch.Tensor:
    return pack_codes(torch.randint(0, 2, (frames, REGIONS, BITS), generator=g).float() * 2 - 1)


def packed_jobs(g: torch.Generator) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Queries of different lengths (short ones too: the comparator up-samples below 4 frames),
    each with its own number of targets of mixed lengths."""
    query_lengths = [1, 3, 7, 20, 33, 12]
    target_counts = [3, 5, 1, 9, 4, 7]
    queries = [packed_video(n, g) for n in query_lengths]
    targets = [
        [packed_video(int(torch.randint(1, 40, (1,), generator=g)), g) for _ in range(count)]
        for count in target_counts
    ]
    return queries, targets


def test_packed_many_equals_each_query_alone(bin_student: FineGrainedStudent) -> None:
    g = torch.Generator().manual_seed(3)
    queries, targets = packed_jobs(g)
    pooled = fine_similarity_packed_many(bin_student, queries, targets, batch_size=4, threads=1)
    for query, target_list, got in zip(queries, targets, pooled, strict=True):
        assert isinstance(got, torch.Tensor) and got.shape == (len(target_list),)
        expected = fine_similarity_packed(bin_student, query, target_list, threads=1)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_a_lone_query_gets_exactly_its_one_query_scores(bin_student: FineGrainedStudent) -> None:
    g = torch.Generator().manual_seed(4)
    query = packed_video(25, g)
    targets = [packed_video(n, g) for n in (30, 2, 17, 40, 9, 31, 30, 5)]
    (got,) = fine_similarity_packed_many(bin_student, [query], [targets], batch_size=3, threads=1)
    assert torch.equal(got, fine_similarity_packed(bin_student, query, targets, batch_size=3, threads=1))


def test_float_many_equals_each_query_alone(att_student: FineGrainedStudent) -> None:
    g = torch.Generator().manual_seed(5)
    dims = att_student.index_dims

    def video(frames: int) -> torch.Tensor:
        x = torch.randn(frames, REGIONS, dims, generator=g)
        return torch.nn.functional.normalize(x, dim=-1).half()  # float16 as stored

    queries = [video(n) for n in (2, 9, 14)]
    targets = [[video(n) for n in lengths] for lengths in ((5, 1, 12), (3,), (8, 20, 2, 6))]
    pooled = fine_similarity_float_many(att_student, queries, targets, batch_size=3, threads=1)
    for query, target_list, got in zip(queries, targets, pooled, strict=True):
        expected = fine_similarity_float(att_student, query, target_list, threads=1)
        assert isinstance(got, torch.Tensor)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_comparator_batches_mix_queries_of_different_lengths() -> None:
    """Pairs are pooled across queries: one batch holds pairs of several queries whose lengths
    differ, every pair lands in exactly one batch, and no batch exceeds its pairs or cells."""
    rng = np.random.default_rng(0)
    owner = np.repeat(np.arange(8), 5)  # 8 queries, 5 targets each
    query_len = rng.integers(30, 121, 8)[owner]
    target_len = rng.integers(30, 121, owner.size)
    pairs = np.arange(owner.size)
    batches = _comparator_batches(pairs, query_len, target_len, batch_size=8, max_cells=8 * 120 * 120)
    assert sorted(np.concatenate(batches).tolist()) == pairs.tolist()
    assert all(len(b) <= 8 for b in batches)
    assert len(batches) == 5  # 40 pairs in batches of 8: the queries' 5-pair lists share calls
    mixed = [b for b in batches if len(set(owner[b].tolist())) > 1 and len(set(query_len[b].tolist())) > 1]
    assert mixed
    tight = _comparator_batches(pairs, query_len, target_len, batch_size=8, max_cells=2 * 120 * 120)
    assert all(
        len(b) * query_len[b].max() * target_len[b].max() <= 2 * 120 * 120 or len(b) == 1 for b in tight
    )


def test_a_late_query_fails_alone(bin_student: FineGrainedStudent) -> None:
    g = torch.Generator().manual_seed(6)
    queries, targets = packed_jobs(g)
    deadlines = [None, time.monotonic() - 1.0, time.monotonic() + 600.0, None, None, None]
    pooled = fine_similarity_packed_many(
        bin_student, queries, targets, deadlines=deadlines, batch_size=4, threads=1
    )
    assert isinstance(pooled[1], DeadlineExceededError) and "0 of 5 targets" in str(pooled[1])
    for i in (0, 2, 3, 4, 5):
        expected = fine_similarity_packed(bin_student, queries[i], targets[i], threads=1)
        torch.testing.assert_close(pooled[i], expected, rtol=0, atol=1e-5)


def test_many_rejects_bad_inputs(bin_student: FineGrainedStudent, att_student: FineGrainedStudent) -> None:
    g = torch.Generator().manual_seed(7)
    q, t = packed_video(5, g), packed_video(6, g)
    with pytest.raises(InvalidInputError, match="one target list a query"):
        fine_similarity_packed_many(bin_student, [q, q], [[t]])
    with pytest.raises(InvalidInputError, match="at least one query"):
        fine_similarity_packed_many(bin_student, [], [])
    with pytest.raises(InvalidInputError, match="one deadline"):
        fine_similarity_packed_many(bin_student, [q], [[t]], deadlines=[None, None])
    with pytest.raises(InvalidInputError, match="target 0 of query 1"):
        fine_similarity_packed_many(bin_student, [q, q], [[t], [t[:, :4]]])
    with pytest.raises(InvalidInputError, match="at least one target"):
        fine_similarity_packed_many(bin_student, [q], [[]])
    with pytest.raises(InvalidInputError, match="binarization student"):
        fine_similarity_packed_many(att_student, [q], [[t]])
    with pytest.raises(InvalidInputError, match="query 0"):
        fine_similarity_float_many(att_student, [q], [[t]])
