"""The video comparator as the fine scorers run it: its precision and a fused first layer.

The scorers never modify the student they are given. They run a copy of its comparator, made
once per student and setting and kept until the student's weights change (moved, reloaded or
trained in place), which differs from the student in two ways:

**The first layer on CPU** (``VideoComparator.first_block``: conv1, 2x2 max-pool, masking,
ReLU) runs as one C loop from :mod:`~dns_milvus.similarity._native` that never writes conv1's
full-resolution output; torch writes that output (32 channels of every frame pair), pools it and
masks it in three passes over memory. Same arithmetic in float32 (differences ~1e-7 from
summation order); without a C compiler torch's layers run.

**The precision** (``precision=`` of the fine scorers):

- ``float32`` (the default): the student's float32 arithmetic.
- ``bfloat16``: conv2 and conv3, the comparator's costly convolutions, run in bfloat16 (oneDNN's
  AVX512-BF16 / AMX kernels on CPU, tensor cores on CUDA); the frame-to-frame matrices, conv1, the
  final 1x1 convolution, Hardtanh and the frame Chamfer stay in float32, so scores are float32.
  They move by about 1e-3 (measured in docs/kernel.md: the activations keep 8 significant bits).
  Refused with ``InvalidInputError`` where the hardware has no native bfloat16 arithmetic:
  emulated, it is several times slower than float32.
- ``auto``: ``bfloat16`` where it is native, else ``float32`` (logged once).
"""

from __future__ import annotations

import copy
import functools
import logging
import threading
import weakref
from pathlib import Path

import torch
from torch import Tensor, nn

from dns_milvus.errors import InvalidInputError
from dns_milvus.models import FineSimilarityNetwork
from dns_milvus.similarity._native import FIRST_BLOCK_CHANNELS, NativeKernel, load_native_kernel

log = logging.getLogger(__name__)

PRECISIONS = ("float32", "bfloat16", "auto")
#: How far bfloat16 scores may move from float32 ones (scores span [-1, 1]): the activations of
#: conv2 and conv3 keep 8 significant bits (relative rounding 2^-9); measured on real footage
#: in docs/kernel.md, where the largest difference is a fraction of this bound.
BFLOAT16_SCORE_TOLERANCE = 4e-3
#: /proc/cpuinfo flags of native bfloat16 arithmetic that oneDNN's convolutions use.
CPU_BFLOAT16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_bfloat16_flags() -> tuple[str, ...]:
    """Which of :data:`CPU_BFLOAT16_FLAGS` this CPU reports (Linux ``/proc/cpuinfo``; elsewhere
    none is detected and bfloat16 is treated as unsupported)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
            break  # every core of one machine reports the same features
    return tuple(flag for flag in CPU_BFLOAT16_FLAGS if flag in flags)


def bfloat16_unsupported_reason(device: torch.device) -> str | None:
    """Why bfloat16 is not native on ``device``, or None where it is."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return None
        return f"{torch.cuda.get_device_name(device)} has no native bfloat16 arithmetic"
    if device.type != "cpu":
        return f"bfloat16 comparators are supported on CPU and CUDA only, not {device.type}"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn) convolutions"
    if not cpu_bfloat16_flags():
        return (
            f"this CPU ({torch.backends.cpu.get_cpu_capability()}) reports none of "
            f"{', '.join(CPU_BFLOAT16_FLAGS)}: bfloat16 convolutions would be emulated, several times "
            "slower than float32"
        )
    return None


_auto_fallback_logged: set[str] = set()


def resolve_precision(precision: str, device: str | torch.device) -> torch.dtype:
    """The comparator dtype for ``precision`` (one of :data:`PRECISIONS`) on ``device``.

    Raises ``InvalidInputError`` for an unknown name, or for ``bfloat16`` where the hardware has no
    native bfloat16 arithmetic; ``auto`` falls back to float32 there, with a log line saying why.
    """
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise InvalidInputError(f"expected a comparator precision in {PRECISIONS}, got {precision!r}")
    if precision == "float32":
        return torch.float32
    device = torch.device(device)
    reason = bfloat16_unsupported_reason(device)
    if reason is None:
        return torch.bfloat16
    if precision == "bfloat16":
        raise InvalidInputError(f"precision 'bfloat16' is not available: {reason}; use 'float32' or 'auto'")
    if reason not in _auto_fallback_logged:
        _auto_fallback_logged.add(reason)
        log.info("fine comparator precision 'auto' uses float32: %s", reason)
    return torch.float32


class _CastInput(nn.Module):
    """Runs ``layer`` on its input cast to ``dtype`` (a no-op when it already is)."""

    def __init__(self, layer: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer = layer
        self.dtype = dtype

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x.to(self.dtype))


class _NativeFirstBlock:
    """``VideoComparator.first_block`` by the fused C loop, for float32 inputs on CPU; its output in
    ``out_dtype`` (bfloat16 feeds a bfloat16 conv2 without another pass)."""

    def __init__(self, head: nn.Module, out_dtype: torch.dtype, kernel: NativeKernel) -> None:
        self.kernel = kernel
        self.out_dtype = out_dtype
        self.weight = head.conv1.weight.detach().float().reshape(FIRST_BLOCK_CHANNELS, 9).contiguous()
        self.bias = head.conv1.bias.detach().float().contiguous()

    def __call__(self, sim: Tensor, query_lengths: Tensor, target_lengths: Tensor) -> Tensor:
        lengths = [lengths.to(torch.int64).contiguous() for lengths in (query_lengths, target_lengths)]
        weights = (self.weight, self.bias, self.out_dtype)
        return self.kernel.first_block(sim.contiguous(), *lengths, *weights, threads=torch.get_num_threads())


def _fuses(conv: nn.Module) -> bool:
    """Whether ``conv`` is the layer the C loop implements: 1 -> 32 channels, 3x3, padding 1."""
    return (
        isinstance(conv, nn.Conv2d)
        and conv.weight.shape == (FIRST_BLOCK_CHANNELS, 1, 3, 3)
        and conv.bias is not None
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


#: Copies of students: student -> {(dtype, native first layer): (weights' state, copy)}.
_copies: weakref.WeakKeyDictionary[nn.Module, dict[tuple[torch.dtype, bool], tuple[tuple, nn.Module]]] = (
    weakref.WeakKeyDictionary()
)
_copies_lock = threading.Lock()


def _state_key(student: nn.Module) -> tuple:
    """Changes whenever a comparator weight is moved, replaced or modified in place."""
    return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in student.visil_head.parameters())


def comparator_student(
    student: FineSimilarityNetwork, dtype: torch.dtype, *, native: bool = True
) -> FineSimilarityNetwork:
    """The student whose ``similarity_from_frame_matrix`` the scorers call: a cached copy whose
    comparator runs conv2 and conv3 in ``dtype`` and, on CPU with ``native`` and the C library
    loaded, its first layer by the fused loop; ``student`` itself when neither applies."""
    head = student.visil_head
    kernel = load_native_kernel() if native and head.conv1.weight.device.type == "cpu" else None
    fused = kernel is not None and _fuses(head.conv1) and head.conv1.weight.dtype == torch.float32
    if dtype == torch.float32 and not fused:
        return student
    key = _state_key(student)
    with _copies_lock:
        cached = _copies.get(student, {}).get((dtype, fused))
        if cached is not None and cached[0] == key:
            return cached[1]  # type: ignore[return-value]
    # copy the comparator only: the student's other weights are shared, never written
    shared = {
        id(t): t
        for name, t in student.state_dict(keep_vars=True).items()
        if not name.startswith("visil_head.")
    }
    clone = copy.deepcopy(student, memo=shared)
    head = clone.visil_head
    if dtype != torch.float32:
        for conv in (head.conv2, head.conv3):
            conv.to(dtype=dtype)
            if conv.weight.device.type == "cpu" and student.visil_head.conv2.weight.is_contiguous(
                memory_format=torch.channels_last
            ):
                conv.to(memory_format=torch.channels_last)
        head.conv2 = _CastInput(head.conv2, dtype)  # conv1's float32 output, rounded once
        head.fconv = _CastInput(head.fconv, torch.float32)  # the score map is never rounded
    if fused:
        assert kernel is not None
        head.first_block = _NativeFirstBlock(head, dtype, kernel)
    with _copies_lock:
        _copies.setdefault(student, {})[(dtype, fused)] = (key, clone)
    return clone
