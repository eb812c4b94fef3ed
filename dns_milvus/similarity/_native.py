"""Small C kernels for the fine stage on CPU: packed Hamming + region Chamfer, and the video
comparator's first layer fused (convolution, pooling, masking and ReLU in one pass).

Why C: on CPU the exact alternatives available from torch and numpy are a float32 GEMM over
unpacked ±1 codes (about 10x slower here, see docs/kernel.md) or numpy XOR + popcount with
large temporaries (slower still). A fused XOR/popcount/min loop touches each packed word once.
The comparator's first layer (1 -> 32 channels) does little arithmetic on a large output: torch
writes that full-resolution output, pools it and masks it in separate passes over memory, the
fused loop writes only the pooled quarter.

The source is compiled on first use with the system C compiler (``$CC``, else ``cc``) into a
per-user cache directory and loaded with ctypes; ctypes releases the GIL during the call, so
Python threads split the targets between cores. When no compiler is available, or when
``DNS_MILVUS_NATIVE_KERNEL=0``, :func:`load_native_kernel` returns None and callers use the
torch GEMM path, which gives the same numbers, and torch's layers for the comparator (the same
up to float32 rounding, ~1e-7).

Inside the library the variant is chosen at run time from the CPU's features (AVX-512
VPOPCNTDQ, else AVX2, else POPCNT, else portable C), so one build runs on any machine of the
same architecture.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

#: Set to 0 / false / no to never build or load the C kernel (the torch path is used).
ENV_SWITCH = "DNS_MILVUS_NATIVE_KERNEL"
#: Directory for the compiled library (default: $XDG_CACHE_HOME/dns-milvus or ~/.cache/dns-milvus).
ENV_CACHE_DIR = "DNS_MILVUS_CACHE_DIR"

#: Below this many (query frame, target frame) pairs a call runs on one thread: starting
#: threads would cost more than it saves.
_MIN_PAIRS_PER_THREAD = 20_000
#: The same for the comparator's first layer, in pooled output cells (32 channels each).
_MIN_CELLS_PER_THREAD = 20_000
#: Output channels of the comparator's first convolution, fixed in the C code.
FIRST_BLOCK_CHANNELS = 32

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* For query frame i and target frame j: the sum over query regions o of the smallest Hamming
   distance between region o of frame i and any region of frame j. Codes are W 64-bit words a
   region; q is [nq, R, W], t is [nt, R, W], out[i * ld + j] receives the sum. */
static inline __attribute__((always_inline)) void chamfer_body(
    const uint64_t *q, int64_t nq, const uint64_t *t, int64_t nt, int64_t R, int64_t W,
    int32_t *out, int64_t ld) {
  for (int64_t j = 0; j < nt; ++j) {
    const uint64_t *tf = t + j * R * W;
    for (int64_t i = 0; i < nq; ++i) {
      const uint64_t *qf = q + i * R * W;
      int32_t total = 0;
      for (int64_t o = 0; o < R; ++o) {
        const uint64_t *qv = qf + o * W;
        int32_t best = INT32_MAX;
        for (int64_t p = 0; p < R; ++p) {
          const uint64_t *tv = tf + p * W;
          int32_t h = 0;
          for (int64_t w = 0; w < W; ++w) h += __builtin_popcountll(qv[w] ^ tv[w]);
          if (h < best) best = h;
        }
        total += best;
      }
      out[i * ld + j] = total;
    }
  }
}

/* W = 8 (512-bit codes, the default) gets its own copy with the word loop unrolled. */
static int chamfer_portable(const uint64_t *q, int64_t nq, const uint64_t *t, int64_t nt,
                            int64_t R, int64_t W, int32_t *out, int64_t ld) {
  if (W == 8) chamfer_body(q, nq, t, nt, R, 8, out, ld);
  else chamfer_body(q, nq, t, nt, R, W, out, ld);
  return 0;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

__attribute__((target("popcnt")))
static int chamfer_popcnt(const uint64_t *q, int64_t nq, const uint64_t *t, int64_t nt,
                          int64_t R, int64_t W, int32_t *out, int64_t ld) {
  if (W == 8) chamfer_body(q, nq, t, nt, R, 8, out, ld);
  else chamfer_body(q, nq, t, nt, R, W, out, ld);
  return 0;
}

/* AVX2: each 256-bit lane holds one 64-bit word of four different query frames (same region),
   so a broadcast target word is compared with four frames at once and the per-lane popcount
   (nibble lookup + byte sums) needs no horizontal reduction. Byte counters hold at most
   8 * W <= 248, so W must be <= 31. */
__attribute__((target("avx2")))
static int chamfer_avx2(const uint64_t *q, int64_t nq, const uint64_t *t, int64_t nt,
                        int64_t R, int64_t W, int32_t *out, int64_t ld) {
  const int64_t groups = (nq + 3) / 4;
  const size_t bytes = (size_t)(groups * R * W * 4) * sizeof(uint64_t);
  uint64_t *q4 = (uint64_t *)aligned_alloc(32, bytes);
  if (q4 == NULL) return -1;
  memset(q4, 0, bytes);
  for (int64_t i = 0; i < nq; ++i)
    for (int64_t o = 0; o < R; ++o)
      for (int64_t w = 0; w < W; ++w)
        q4[(((i / 4) * R + o) * W + w) * 4 + (i % 4)] = q[(i * R + o) * W + w];

  const __m256i nibble_counts = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                                 0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low_nibble = _mm256_set1_epi8(0x0f);
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t j = 0; j < nt; ++j) {
    const uint64_t *tf = t + j * R * W;
    for (int64_t g = 0; g < groups; ++g) {
      __m256i total = zero;
      for (int64_t o = 0; o < R; ++o) {
        const __m256i *qv = (const __m256i *)(q4 + (g * R + o) * W * 4);
        __m256i best = _mm256_set1_epi32(INT32_MAX);
        for (int64_t p = 0; p < R; ++p) {
          const uint64_t *tv = tf + p * W;
          __m256i counts = zero;
          for (int64_t w = 0; w < W; ++w) {
            __m256i x = _mm256_xor_si256(_mm256_load_si256(qv + w), _mm256_set1_epi64x((long long)tv[w]));
            __m256i lo = _mm256_and_si256(x, low_nibble);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), low_nibble);
            counts = _mm256_add_epi8(counts, _mm256_add_epi8(_mm256_shuffle_epi8(nibble_counts, lo),
                                                             _mm256_shuffle_epi8(nibble_counts, hi)));
          }
          /* per-lane sums land in the low 32 bits of each 64-bit lane; the high halves stay 0 */
          best = _mm256_min_epu32(best, _mm256_sad_epu8(counts, zero));
        }
        total = _mm256_add_epi64(total, best);
      }
      int64_t lanes[4];
      _mm256_storeu_si256((__m256i *)lanes, total);
      for (int64_t k = 0; k < 4 && g * 4 + k < nq; ++k) out[(g * 4 + k) * ld + j] = (int32_t)lanes[k];
    }
  }
  free(q4);
  return 0;
}

/* AVX-512 with VPOPCNTDQ: each 512-bit register holds one 64-bit word of eight query frames
   (same region); a target word is broadcast, XORed with the eight and counted per 64-bit lane
   by one VPOPCNTQ, so a region pair of eight frame pairs costs W XORs, W popcounts and W adds
   and the counters (64-bit) never overflow. */
static inline __attribute__((always_inline, target("avx512f,avx512vpopcntdq"))) void chamfer_avx512_body(
    const uint64_t *q8, int64_t nq, const uint64_t *t, int64_t nt, int64_t R, int64_t W,
    int32_t *out, int64_t ld) {
  const int64_t groups = (nq + 7) / 8;
  for (int64_t j = 0; j < nt; ++j) {
    const uint64_t *tf = t + j * R * W;
    for (int64_t g = 0; g < groups; ++g) {
      __m512i total = _mm512_setzero_si512();
      for (int64_t o = 0; o < R; ++o) {
        const __m512i *qv = (const __m512i *)(q8 + (g * R + o) * W * 8);
        __m512i best = _mm512_set1_epi64(INT64_MAX);
        for (int64_t p = 0; p < R; ++p) {
          const uint64_t *tv = tf + p * W;
          __m512i counts = _mm512_setzero_si512();
          for (int64_t w = 0; w < W; ++w)
            counts = _mm512_add_epi64(counts, _mm512_popcnt_epi64(_mm512_xor_si512(
                _mm512_load_si512(qv + w), _mm512_set1_epi64((long long)tv[w]))));
          best = _mm512_min_epu64(best, counts);
        }
        total = _mm512_add_epi64(total, best);
      }
      int64_t lanes[8];
      _mm512_storeu_si512((void *)lanes, total);
      for (int64_t k = 0; k < 8 && g * 8 + k < nq; ++k) out[(g * 8 + k) * ld + j] = (int32_t)lanes[k];
    }
  }
}

__attribute__((target("avx512f,avx512vpopcntdq")))
static int chamfer_avx512(const uint64_t *q, int64_t nq, const uint64_t *t, int64_t nt,
                          int64_t R, int64_t W, int32_t *out, int64_t ld) {
  const int64_t groups = (nq + 7) / 8;
  const size_t bytes = (size_t)(groups * R * W * 8) * sizeof(uint64_t);
  uint64_t *q8 = (uint64_t *)aligned_alloc(64, bytes);
  if (q8 == NULL) return -1;
  memset(q8, 0, bytes);
  for (int64_t i = 0; i < nq; ++i)
    for (int64_t o = 0; o < R; ++o)
      for (int64_t w = 0; w < W; ++w)
        q8[(((i / 8) * R + o) * W + w) * 8 + (i % 8)] = q[(i * R + o) * W + w];
  /* 512-bit codes (the default) get their own copy: the eight query words stay in registers */
  if (W == 8) chamfer_avx512_body(q8, nq, t, nt, R, 8, out, ld);
  else chamfer_avx512_body(q8, nq, t, nt, R, W, out, ld);
  free(q8);
  return 0;
}
#endif

/* The fastest variant this CPU runs for W words, at most `highest`:
   3 = AVX-512 VPOPCNTDQ, 2 = AVX2, 1 = POPCNT, 0 = portable C. */
int dns_kernel_variant(int64_t W, int highest) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (highest >= 3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq"))
    return 3;
  if (highest >= 2 && W <= 31 && __builtin_cpu_supports("avx2")) return 2;
  if (highest >= 1 && __builtin_cpu_supports("popcnt")) return 1;
#endif
  (void)W;
  (void)highest;
  return 0;
}

/* The video comparator's first layer, fused (VideoComparator.first_block): a 3x3 convolution
   from 1 to 32 channels in which cells outside each item's real [ql, tl] block and beyond the
   border read as zero, a 2x2 max-pool (floor), zero outside [ql/2, tl/2], ReLU. sim is float32
   [N, H, W], w [32, 9], b [32]; out [N, H/2, W/2, 32] (channels last) is float32 or, with
   out_bf16, bfloat16 rounded to nearest even. conv1's full-resolution output is never stored. */
#define FB_CHANNELS 32

static inline uint16_t fb_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  u += 0x7fffu + ((u >> 16) & 1u); /* finite, non-negative inputs: no NaN handling needed */
  return (uint16_t)(u >> 16);
}

static inline __attribute__((always_inline)) void first_block_body(
    const float *sim, int64_t N, int64_t H, int64_t W, const int64_t *ql, const int64_t *tl,
    const float *w, const float *b, void *out, int out_bf16) {
  const int64_t Ho = H / 2, Wo = W / 2;
  float wt[9][FB_CHANNELS];
  for (int k = 0; k < 9; ++k)
    for (int c = 0; c < FB_CHANNELS; ++c) wt[k][c] = w[c * 9 + k];
  for (int64_t n = 0; n < N; ++n) {
    const float *s = sim + n * H * W;
    const int64_t qn = ql[n], tn = tl[n];
    for (int64_t i = 0; i < Ho; ++i) {
      for (int64_t j = 0; j < Wo; ++j) {
        const int64_t cell = ((n * Ho + i) * Wo + j) * FB_CHANNELS;
        float best[FB_CHANNELS];
        if (i >= qn / 2 || j >= tn / 2) {
          for (int c = 0; c < FB_CHANNELS; ++c) best[c] = 0.0f;
        } else {
          float patch[4][4]; /* the input cells the 2x2 window's four 3x3 neighbourhoods read */
          for (int dy = 0; dy < 4; ++dy)
            for (int dx = 0; dx < 4; ++dx) {
              const int64_t r = 2 * i + dy - 1, col = 2 * j + dx - 1;
              patch[dy][dx] = (r >= 0 && r < qn && col >= 0 && col < tn) ? s[r * W + col] : 0.0f;
            }
          for (int c = 0; c < FB_CHANNELS; ++c) best[c] = 0.0f; /* max with 0 is the ReLU */
          for (int py = 0; py < 2; ++py)
            for (int px = 0; px < 2; ++px) {
              float acc[FB_CHANNELS];
              for (int c = 0; c < FB_CHANNELS; ++c) acc[c] = b[c];
              for (int ky = 0; ky < 3; ++ky)
                for (int kx = 0; kx < 3; ++kx) {
                  const float v = patch[py + ky][px + kx];
                  for (int c = 0; c < FB_CHANNELS; ++c) acc[c] += v * wt[ky * 3 + kx][c];
                }
              for (int c = 0; c < FB_CHANNELS; ++c) best[c] = acc[c] > best[c] ? acc[c] : best[c];
            }
        }
        if (out_bf16) {
          uint16_t *dst = (uint16_t *)out + cell;
          for (int c = 0; c < FB_CHANNELS; ++c) dst[c] = fb_to_bf16(best[c]);
        } else {
          float *dst = (float *)out + cell;
          for (int c = 0; c < FB_CHANNELS; ++c) dst[c] = best[c];
        }
      }
    }
  }
}

static void first_block_portable(const float *sim, int64_t N, int64_t H, int64_t W, const int64_t *ql,
                                 const int64_t *tl, const float *w, const float *b, void *out, int bf16) {
  first_block_body(sim, N, H, W, ql, tl, w, b, out, bf16);
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,fma")))
static void first_block_avx2(const float *sim, int64_t N, int64_t H, int64_t W, const int64_t *ql,
                             const int64_t *tl, const float *w, const float *b, void *out, int bf16) {
  first_block_body(sim, N, H, W, ql, tl, w, b, out, bf16);
}

__attribute__((target("avx512f")))
static void first_block_avx512(const float *sim, int64_t N, int64_t H, int64_t W, const int64_t *ql,
                               const int64_t *tl, const float *w, const float *b, void *out, int bf16) {
  first_block_body(sim, N, H, W, ql, tl, w, b, out, bf16);
}
#endif

/* The first-block code path this CPU runs, at most `highest`: 3 = AVX-512, 2 = AVX2 + FMA,
   0 = portable C (1, POPCNT, has no first-block code of its own). */
int dns_first_block_variant(int highest) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (highest >= 3 && __builtin_cpu_supports("avx512f")) return 3;
  if (highest >= 2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 2;
#endif
  (void)highest;
  return 0;
}

void dns_first_block(const float *sim, int64_t N, int64_t H, int64_t W, const int64_t *ql,
                     const int64_t *tl, const float *w, const float *b, void *out, int out_bf16,
                     int highest) {
#if defined(__x86_64__) && defined(__GNUC__)
  switch (dns_first_block_variant(highest)) {
    case 3: first_block_avx512(sim, N, H, W, ql, tl, w, b, out, out_bf16); return;
    case 2: first_block_avx2(sim, N, H, W, ql, tl, w, b, out, out_bf16); return;
    default: break;
  }
#endif
  first_block_portable(sim, N, H, W, ql, tl, w, b, out, out_bf16);
}

int dns_chamfer_min_hamming(const uint64_t *q, int64_t nq, const uint64_t *t, int64_t nt,
                            int64_t R, int64_t W, int32_t *out, int64_t ld, int highest) {
#if defined(__x86_64__) && defined(__GNUC__)
  switch (dns_kernel_variant(W, highest)) {
    case 3: return chamfer_avx512(q, nq, t, nt, R, W, out, ld);
    case 2: return chamfer_avx2(q, nq, t, nt, R, W, out, ld);
    case 1: return chamfer_popcnt(q, nq, t, nt, R, W, out, ld);
    default: break;
  }
#endif
  return chamfer_portable(q, nq, t, nt, R, W, out, ld);
}
"""

_FLAGS = ("-O3", "-shared", "-fPIC", "-std=gnu11")
_VARIANT_NAMES = {3: "avx512", 2: "avx2", 1: "popcnt", 0: "portable"}
_VARIANT_LEVELS = {name: level for level, name in _VARIANT_NAMES.items()}


class NativeKernel:
    """The loaded C library: Hamming distances + region Chamfer over packed 64-bit words, and the
    video comparator's fused first layer."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self._fn = lib.dns_chamfer_min_hamming
        self._fn.restype = ctypes.c_int
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self._fn.argtypes = [ptr, i64, ptr, i64, i64, i64, ptr, i64, ctypes.c_int]
        self._variant = lib.dns_kernel_variant
        self._variant.restype = ctypes.c_int
        self._variant.argtypes = [i64, ctypes.c_int]
        self._first_block = lib.dns_first_block
        self._first_block.restype = None
        self._first_block.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ctypes.c_int, ctypes.c_int]
        self._first_block_variant = lib.dns_first_block_variant
        self._first_block_variant.restype = ctypes.c_int
        self._first_block_variant.argtypes = [ctypes.c_int]

    @staticmethod
    def variants() -> tuple[str, ...]:
        """Names of the code paths, fastest first."""
        return tuple(_VARIANT_NAMES[level] for level in sorted(_VARIANT_NAMES, reverse=True))

    def variant(self, words: int, highest: str = "avx512") -> str:
        """Which code path runs for regions of ``words`` 64-bit words on this CPU."""
        return _VARIANT_NAMES[int(self._variant(words, _VARIANT_LEVELS[highest]))]

    def min_hamming_sums(
        self, query: np.ndarray, targets: np.ndarray, threads: int = 1, variant: str | None = None
    ) -> np.ndarray:
        """``query`` uint64 [Tq, R, W], ``targets`` uint64 [N, R, W] (C-contiguous) -> int32
        [Tq, N]: for each frame pair, the sum over query regions of the smallest Hamming distance
        to any target region. ``variant`` caps the code path (tests compare them all)."""
        for name, array in (("query", query), ("targets", targets)):
            if array.dtype != np.uint64 or array.ndim != 3 or not array.flags.c_contiguous:
                raise ValueError(
                    f"{name} must be a C-contiguous uint64 array [N, R, W], got {array.dtype} {array.shape}"
                )
        if query.shape[1:] != targets.shape[1:]:
            raise ValueError(f"query {query.shape} and targets {targets.shape} differ in R or W")
        highest = _VARIANT_LEVELS[variant or "avx512"]
        nq, regions, words = query.shape
        n = targets.shape[0]
        out = np.empty((nq, n), dtype=np.int32)

        def run(start: int, stop: int) -> int:
            return int(
                self._fn(
                    query.ctypes.data, nq, targets[start:].ctypes.data, stop - start, regions, words,
                    out[:, start:].ctypes.data, n, highest,
                )
            )  # fmt: skip

        if any(_split(n, min(threads, (nq * n) // _MIN_PAIRS_PER_THREAD), run)):
            raise MemoryError("the packed Hamming kernel could not allocate its query buffer")
        return out

    def first_block_variant(self, highest: str = "avx512") -> str:
        """Which code path of :meth:`first_block` runs on this CPU."""
        return _VARIANT_NAMES[int(self._first_block_variant(_VARIANT_LEVELS[highest]))]

    def first_block(
        self,
        sim: torch.Tensor,
        query_lengths: torch.Tensor,
        target_lengths: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        out_dtype: torch.dtype = torch.float32,
        threads: int = 1,
        variant: str | None = None,
    ) -> torch.Tensor:
        """The video comparator's first layer in one pass (``VideoComparator.first_block``):
        ``sim`` float32 [N, H, W] with real sizes ``query_lengths`` / ``target_lengths`` (int64
        [N]), ``weight`` float32 [32, 9], ``bias`` [32] -> [N, 32, H/2, W/2] in channels-last
        layout, float32 or bfloat16. All tensors on the CPU and contiguous."""
        if out_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"out_dtype must be float32 or bfloat16, got {out_dtype}")
        for name, tensor, dtype, shape in (
            ("sim", sim, torch.float32, None),
            ("query_lengths", query_lengths, torch.int64, (sim.shape[0],)),
            ("target_lengths", target_lengths, torch.int64, (sim.shape[0],)),
            ("weight", weight, torch.float32, (FIRST_BLOCK_CHANNELS, 9)),
            ("bias", bias, torch.float32, (FIRST_BLOCK_CHANNELS,)),
        ):
            if tensor.dtype != dtype or tensor.device.type != "cpu" or not tensor.is_contiguous():
                raise ValueError(f"{name} must be a contiguous {dtype} CPU tensor, got {tensor.dtype}")
            if shape is not None and tuple(tensor.shape) != shape:
                raise ValueError(f"{name} must have the shape {shape}, got {tuple(tensor.shape)}")
        if sim.ndim != 3:
            raise ValueError(f"sim must be [N, H, W], got {tuple(sim.shape)}")
        n, height, width = sim.shape
        out = torch.empty(n, height // 2, width // 2, FIRST_BLOCK_CHANNELS, dtype=out_dtype)
        highest = _VARIANT_LEVELS[variant or "avx512"]
        cells = (height // 2) * (width // 2)

        def run(start: int, stop: int) -> int:
            self._first_block(
                sim[start:].data_ptr(), stop - start, height, width, query_lengths[start:].data_ptr(),
                target_lengths[start:].data_ptr(), weight.data_ptr(), bias.data_ptr(),
                out[start:].data_ptr(), int(out_dtype == torch.bfloat16), highest,
            )  # fmt: skip
            return 0

        _split(n, min(threads, (n * cells) // _MIN_CELLS_PER_THREAD), run)
        return out.permute(0, 3, 1, 2)


def _split(n: int, threads: int, run: Callable[[int, int], int]) -> list[int]:
    """``run(start, stop)`` over ``threads`` (at least one) near-equal ranges of ``range(n)``, in
    Python threads (ctypes releases the GIL during each call); the results in order."""
    threads = max(1, min(threads, n))
    bounds = np.linspace(0, n, threads + 1).astype(np.int64).tolist()
    if threads == 1:
        return [run(0, n)]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(run, bounds[:-1], bounds[1:]))


def _cache_dir() -> Path:
    configured = os.environ.get(ENV_CACHE_DIR)
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dns-milvus"


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        source = Path(tmp) / "packed_chamfer.c"
        source.write_text(_SOURCE)
        built = Path(tmp) / target.name
        subprocess.run(
            [compiler, *_FLAGS, "-o", str(built), str(source)], check=True, capture_output=True, timeout=120
        )
        os.replace(built, target)  # atomic: concurrent builders never load a half-written file


@functools.lru_cache(maxsize=1)
def load_native_kernel() -> NativeKernel | None:
    """The compiled kernel, building it on first use; None when disabled or unavailable."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler found: packed Hamming distances use the torch GEMM path")
        return None
    build_inputs = "\0".join([_SOURCE, compiler, *_FLAGS, platform.machine()])
    key = hashlib.sha256(build_inputs.encode()).hexdigest()[:16]
    suffix = ".dll" if os.name == "nt" else ".so"
    for directory in (_cache_dir(), Path(tempfile.gettempdir()) / "dns-milvus"):
        target = directory / "kernels" / f"packed_chamfer_{key}{suffix}"
        try:
            if not target.exists():
                _build(compiler, target)
            return NativeKernel(ctypes.CDLL(str(target)), target)
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("packed Hamming kernel unavailable in %s (%s); trying the next place", directory, exc)
    log.warning("packed Hamming kernel could not be built: using the torch GEMM path")
    return None
