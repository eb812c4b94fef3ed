"""A small C kernel for the packed Hamming + region-Chamfer stage on CPU.

Why C: on CPU the exact alternatives available from torch and numpy are a float32 GEMM over
unpacked ±1 codes (about 10x slower here, see docs/kernel.md) or numpy XOR + popcount with
large temporaries (slower still). A fused XOR/popcount/min loop touches each packed word once.

The source is compiled on first use with the system C compiler (``$CC``, else ``cc``) into a
per-user cache directory and loaded with ctypes; ctypes releases the GIL during the call, so
Python threads split the targets between cores. When no compiler is available, or when
``DNS_MILVUS_NATIVE_KERNEL=0``, :func:`load_native_kernel` returns None and callers use the
torch GEMM path, which gives the same numbers.

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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

#: Set to 0 / false / no to never build or load the C kernel (the torch path is used).
ENV_SWITCH = "DNS_MILVUS_NATIVE_KERNEL"
#: Directory for the compiled library (default: $XDG_CACHE_HOME/dns-milvus or ~/.cache/dns-milvus).
ENV_CACHE_DIR = "DNS_MILVUS_CACHE_DIR"

#: Below this many (query frame, target frame) pairs a call runs on one thread: starting
#: threads would cost more than it saves.
_MIN_PAIRS_PER_THREAD = 20_000

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
    """The loaded C library: Hamming distances + region Chamfer over packed 64-bit words."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self._fn = lib.dns_chamfer_min_hamming
        self._fn.restype = ctypes.c_int
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self._fn.argtypes = [ptr, i64, ptr, i64, i64, i64, ptr, i64, ctypes.c_int]
        self._variant = lib.dns_kernel_variant
        self._variant.restype = ctypes.c_int
        self._variant.argtypes = [i64, ctypes.c_int]

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
        threads = max(1, min(threads, (nq * n) // _MIN_PAIRS_PER_THREAD))
        bounds = np.linspace(0, n, threads + 1).astype(np.int64)

        def run(k: int) -> int:
            start, stop = int(bounds[k]), int(bounds[k + 1])
            if stop == start:
                return 0
            return int(
                self._fn(
                    query.ctypes.data,
                    nq,
                    targets[start:].ctypes.data,
                    stop - start,
                    regions,
                    words,
                    out[:, start:].ctypes.data,
                    n,
                    highest,
                )
            )

        if threads == 1:
            codes = [run(0)]
        else:
            with ThreadPoolExecutor(threads) as pool:
                codes = list(pool.map(run, range(threads)))
        if any(codes):
            raise MemoryError("the packed Hamming kernel could not allocate its query buffer")
        return out


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
