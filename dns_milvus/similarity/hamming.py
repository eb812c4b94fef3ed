"""Frame-to-frame similarity of binary codes straight from their packed form.

For a query frame and a target frame (R regions of L bits each) the binarization student's
frame similarity is the region Chamfer similarity of the region tensor dot divided by L: the
mean over query regions of the max over target regions of ``dot / L``. For ±1 codes
``dot = L - 2 * hamming``, so it is ``1 - 2 * hamming / L`` with the smallest Hamming distance.

Two exact back-ends compute the per-frame-pair sum of the best region dot products, an integer:

- ``native`` (CPU): XOR + popcount in a small C kernel (see ``_native``), targets split between
  threads. Needs L to be a multiple of 64 (whole 64-bit words) and a C compiler.
- ``gemm`` (any device): unpack to ±1 and multiply; float32 on CPU, float16 on CUDA (for L <=
  2048). Both are exact: every partial sum is an integer of magnitude <= L, which float16
  holds exactly up to 2048 and float32 up to 2^24.

Both end in :func:`_similarity_from_dot_sums`, which divides the integer sum the way the float
path does (mean over regions, then 1 / L), so the two paths agree to the last bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dns_milvus.errors import InvalidInputError
from dns_milvus.similarity._native import load_native_kernel
from dns_milvus.similarity.codes import unpack_codes

#: Largest region-score block [Tq*R, n*R] the GEMM path builds at once (floats): 64 MiB in float32.
GEMM_CHUNK_ELEMENTS = 2**24

BACKENDS = ("auto", "native", "gemm")


def _shape(x: Tensor) -> str:
    return "[" + ", ".join(str(int(s)) for s in x.shape) + "]"


def check_packed_video(x: object, what: str, regions: int | None = None, width: int | None = None) -> Tensor:
    """Validate one video's packed codes uint8 ``[T, R, W]`` (T >= 1) and, when given, its R and W."""
    expected = (
        "packed codes uint8 [T, R, L/8]" if regions is None else f"packed codes uint8 [T, {regions}, {width}]"
    )
    if not isinstance(x, Tensor):
        raise InvalidInputError(f"expected {what} as {expected} torch tensor, got {type(x).__name__}")
    if x.dtype != torch.uint8:
        raise InvalidInputError(f"expected {what} as {expected}, got dtype {x.dtype}")
    if x.ndim != 3 or 0 in x.shape:
        raise InvalidInputError(f"expected {what} as {expected} with T, R, L/8 >= 1, got {_shape(x)}")
    if regions is not None and (x.shape[1] != regions or x.shape[2] != width):
        raise InvalidInputError(
            f"expected {what} as {expected} (the query's regions and code bytes), got {_shape(x)}"
        )
    return x


def resolve_backend(backend: str, device: torch.device, width: int) -> str:
    """The back-end that runs for ``backend`` on ``device`` with ``width`` bytes a region."""
    if backend not in BACKENDS:
        raise InvalidInputError(f"expected a Hamming back-end in {BACKENDS}, got {backend!r}")
    native_ok = device.type == "cpu" and width % 8 == 0 and load_native_kernel() is not None
    if backend == "native" and not native_ok:
        raise InvalidInputError(
            "the native Hamming kernel needs CPU tensors, L a multiple of 64 bits and a C compiler"
        )
    if backend == "auto":
        return "native" if native_ok else "gemm"
    return backend


def _similarity_from_dot_sums(dot_sums: Tensor, regions: int, bits: int) -> Tensor:
    """Integer-valued sums over query regions of the best dot product -> frame similarity."""
    return dot_sums.to(torch.float32).div(regions).mul(1.0 / bits)


def _dot_sums_native(query: Tensor, frames: Tensor, variant: str | None = None) -> Tensor:
    kernel = load_native_kernel()
    assert kernel is not None  # resolve_backend checked it
    regions, bits = query.shape[1], 8 * query.shape[2]
    # The bytes reinterpreted as 64-bit words: a popcount of an XOR ignores the bit order.
    q_words = query.contiguous().numpy().view("<u8")
    t_words = frames.contiguous().numpy().view("<u8")
    hamming_sums = kernel.min_hamming_sums(q_words, t_words, threads=torch.get_num_threads(), variant=variant)
    # sum_o (L - 2 h_o) = R*L - 2 sum_o h_o
    return regions * bits - 2 * torch.from_numpy(hamming_sums)


#: float16 holds every integer up to 2048 exactly: partial sums of up to this many ±1 products.
FLOAT16_EXACT_BITS = 2048


def gemm_dtype(device: torch.device, bits: int) -> torch.dtype:
    """float16 where GPUs multiply it fast and every partial sum (<= bits) stays exact; float32
    otherwise (on CPU float16 GEMMs are slow)."""
    return torch.float16 if device.type == "cuda" and bits <= FLOAT16_EXACT_BITS else torch.float32


def _dot_sums_gemm(query: Tensor, frames: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    tq, regions, width = query.shape
    dtype = dtype or gemm_dtype(query.device, 8 * width)
    q = unpack_codes(query, dtype=dtype).reshape(tq * regions, 8 * width)
    per_chunk = max(1, GEMM_CHUNK_ELEMENTS // (tq * regions * regions))
    out = torch.empty(tq, frames.shape[0], dtype=torch.float32, device=query.device)
    for start in range(0, frames.shape[0], per_chunk):
        chunk = frames[start : start + per_chunk]
        t = unpack_codes(chunk, dtype=dtype).reshape(-1, 8 * width)
        scores = (q @ t.T).view(tq, regions, chunk.shape[0], regions)
        out[:, start : start + chunk.shape[0]] = scores.amax(dim=-1).to(torch.float32).sum(dim=1)
    return out


def packed_frame_similarity(query: Tensor, frames: Tensor, *, backend: str = "auto") -> Tensor:
    """Frame similarity of every query frame with every target frame, from packed codes.

    ``query`` uint8 [Tq, R, W] and ``frames`` uint8 [N, R, W] (any number of target frames, e.g.
    the frames of many videos concatenated) -> float32 [Tq, N] with
    ``sim[i, j] = mean_o max_p (1 - 2 * hamming(q[i, o], t[j, p]) / L)``, L = 8 W.
    """
    query = check_packed_video(query, "query")
    frames = check_packed_video(frames, "target frames", query.shape[1], query.shape[2])
    if frames.device != query.device:
        raise InvalidInputError(
            f"query and target frames must be on one device, got {query.device} and {frames.device}"
        )
    regions, width = query.shape[1], query.shape[2]
    if resolve_backend(backend, query.device, width) == "native":
        dot_sums = _dot_sums_native(query, frames)
    else:
        dot_sums = _dot_sums_gemm(query, frames)
    return _similarity_from_dot_sums(dot_sums, regions, 8 * width)


def packed_frame_to_frame(
    query: Tensor, targets: Tensor, target_lengths: Tensor | None = None, *, backend: str = "auto"
) -> Tensor:
    """Frame-to-frame matrices of one query against a padded batch of targets.

    ``query`` uint8 [Tq, R, W], ``targets`` uint8 [B, Tt, R, W] whose first ``target_lengths[b]``
    frames are real (all when omitted) -> float32 [B, Tq, Tt]; cells of padded frames are zero
    and are never computed.
    """
    if not isinstance(targets, Tensor) or targets.ndim != 4 or 0 in targets.shape:
        got = _shape(targets) if isinstance(targets, Tensor) else type(targets).__name__
        raise InvalidInputError(
            f"expected targets as packed codes uint8 [B, Tt, R, L/8] with B, Tt >= 1, got {got}"
        )
    b, tt = targets.shape[0], targets.shape[1]
    if target_lengths is None:
        lengths = torch.full((b,), tt, dtype=torch.long)
    else:
        lengths = torch.as_tensor(target_lengths)
        if lengths.is_floating_point() or lengths.is_complex():
            raise InvalidInputError(f"expected target lengths [{b}] of integers, got dtype {lengths.dtype}")
        lengths = lengths.to(device="cpu", dtype=torch.long)
        if lengths.shape != (b,) or not bool(((lengths >= 1) & (lengths <= tt)).all()):
            raise InvalidInputError(
                f"expected target lengths [{b}] of integers in 1..{tt}, got {lengths.tolist()}"
            )
    mask = torch.arange(tt)[None, :] < lengths[:, None]
    frames = targets[mask.to(targets.device)]  # the real frames only, concatenated
    sim = packed_frame_similarity(query, frames, backend=backend)
    return scatter_frames(sim, lengths, tt)


def scatter_frames(sim: Tensor, lengths: Tensor, padded_length: int) -> Tensor:
    """[Tq, sum(lengths)] of concatenated target frames -> [B, Tq, padded_length], zero-padded."""
    lengths = lengths.to(device=sim.device, dtype=torch.long)
    offsets = torch.cumsum(lengths, 0) - lengths
    steps = torch.arange(padded_length, device=sim.device)
    inside = steps[None, :] < lengths[:, None]  # [B, Tt]
    index = offsets[:, None] + torch.minimum(steps[None, :], lengths[:, None] - 1)
    out = sim[:, index].permute(1, 0, 2)  # [B, Tq, Tt]
    return out.masked_fill(~inside[:, None, :], 0.0)
