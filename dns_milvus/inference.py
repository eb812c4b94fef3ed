"""Stage 2's networks in NumPy: the selector's MLP and the binarization student's comparison of
packed codes, read from an ``.npz`` of their inference weights.

A search by an indexed id gets its query's coarse vector and self-similarity from Milvus and its
packed codes from the object store, so what is left to compute is the selector on three numbers a
pair and the fine student's comparison of packed codes. Both are small enough for NumPy on a
command line, which then never imports torch (over a second of a call's start-up). The torch
networks (``dns_milvus.models``) stay the reference: these functions mirror
``SelectorNetwork.pair_confidence`` and ``fine_similarity_packed`` step for step, in float32.

The ``.npz`` (written by ``dns_milvus.engine.modelset.write_inference_weights``) holds arrays
only, read without pickle: the selector's layers in order (``selector.<i>.<op>.<array>``), the
video comparator's convolutions (``comparator.<conv>.weight|bias``) and one JSON string ``meta``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dns_milvus.errors import CheckpointError, InvalidInputError
from dns_milvus.scoring import check_segment_input

#: Version of the ``.npz`` layout; a file of another version is not used.
FORMAT = 1
#: The selector's layer kinds, in the order of ``SelectorMLP.model`` (dropout is the identity).
SELECTOR_OPS = ("linear", "batchnorm", "relu", "sigmoid")
#: The video comparator's convolutions (``VideoComparator``): 3x3 with one cell of zero padding,
#: then the final 1x1.
COMPARATOR_CONVS = ("conv1", "conv2", "conv3", "fconv")
#: The comparator pools each time axis twice: shorter axes are up-sampled to this many frames.
MIN_COMPARATOR_FRAMES = 4
#: Largest region-score block [Tq*R, n*R] of the Hamming step, in floats (64 MiB).
HAMMING_CHUNK_ELEMENTS = 2**24
#: Frame-matrix cells (pairs x Tq x longest Tt) of one comparator batch: bounds its largest
#: intermediate (conv2's patches, 288 floats a quarter-cell) to ~75 MiB.
BATCH_CELLS = 2**18

Layer = tuple[str, dict[str, np.ndarray]]


def save_inference_weights(
    path: str | Path,
    *,
    selector: Sequence[Layer],
    comparator: Mapping[str, np.ndarray],
    meta: Mapping[str, Any],
) -> Path:
    """Write the ``.npz``: ``selector`` the MLP's layers in order as ``(op, arrays)``,
    ``comparator`` the video comparator's ``<conv>.weight``/``<conv>.bias`` arrays and ``meta``
    what the loader checks (``bits``, and anything the caller adds: JSON values)."""
    arrays: dict[str, np.ndarray] = {"meta": np.array(json.dumps({**meta, "format": FORMAT}, sort_keys=True))}
    for i, (op, params) in enumerate(selector):
        if op not in SELECTOR_OPS:
            raise InvalidInputError(f"selector layer {i}: unknown op {op!r} (known: {SELECTOR_OPS})")
        arrays[f"selector.{i}.{op}"] = np.zeros(0, dtype=np.float32)  # keeps ops without arrays
        arrays.update({f"selector.{i}.{op}.{k}": np.asarray(v, dtype=np.float32) for k, v in params.items()})
    arrays.update({f"comparator.{k}": np.asarray(v, dtype=np.float32) for k, v in comparator.items()})
    path = Path(path)
    with path.open("wb") as f:  # a file object: np.savez would append ".npz" to another name
        np.savez(f, **arrays)
    return path


@dataclass(frozen=True)
class NumpyStage2:
    """The selector's MLP and the binarization student's comparator, as NumPy arrays."""

    selector: tuple[Layer, ...]
    comparator: dict[str, np.ndarray]
    meta: dict[str, Any]

    @classmethod
    def load(cls, path: str | Path) -> NumpyStage2:
        """Read the ``.npz`` (``CheckpointError`` if it is not one of this format)."""
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
            meta = json.loads(str(arrays.pop("meta")))
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"cannot read the NumPy inference weights {path}: {exc}") from exc
        if (
            not isinstance(meta, dict)
            or meta.get("format") != FORMAT
            or not isinstance(meta.get("bits"), int)
        ):
            raise CheckpointError(f"{path}: not NumPy inference weights of format {FORMAT}")
        layers: dict[int, Layer] = {}
        for key, value in arrays.items():
            part, _, rest = key.partition(".")
            if part != "selector":
                continue
            index, op, *name = rest.split(".")
            params = layers.setdefault(int(index), (op, {}))[1]
            if name:
                params[name[0]] = value
        comparator = {
            key.removeprefix("comparator."): v for key, v in arrays.items() if key.startswith("comparator.")
        }
        missing = [
            f"{c}.{p}" for c in COMPARATOR_CONVS for p in ("weight", "bias") if f"{c}.{p}" not in comparator
        ]
        if missing or not layers or sorted(layers) != list(range(len(layers))):
            raise CheckpointError(
                f"{path}: incomplete NumPy inference weights (missing {missing or 'selector'})"
            )
        return cls(tuple(layers[i] for i in range(len(layers))), comparator, meta)

    @property
    def bits(self) -> int:
        return int(self.meta["bits"])

    @property
    def segments(self) -> int:
        """Segments a video whose codes the selector reads (0, or absent: the release's inputs)."""
        return int(self.meta.get("segments", 0))

    # -- the selector ---------------------------------------------------------------------------

    def selector_confidence(
        self,
        query_self: float,
        target_self: np.ndarray,
        coarse: np.ndarray,
        segment_match: np.ndarray | None = None,
    ) -> np.ndarray:
        """``SelectorNetwork.pair_confidence``: float32 [N] from the query's self-similarity, the
        targets' [N], the pairs' coarse similarities [N] and, for a selector with segments, their
        segment matches [N] (input order as the release's, the segment match last)."""
        check_segment_input(self.segments, segment_match is not None)
        target = np.asarray(target_self, dtype=np.float32).reshape(-1)
        columns = [np.full_like(target, query_self), target, np.asarray(coarse, np.float32).reshape(-1)]
        if segment_match is not None:
            columns.append(np.asarray(segment_match, np.float32).reshape(-1))
        x = np.stack(columns, -1)
        for op, p in self.selector:
            if op == "linear":
                x = x @ p["weight"].T + p["bias"] if "bias" in p else x @ p["weight"].T
            elif op == "batchnorm":  # eval mode: the running statistics
                x = (x - p["running_mean"]) / np.sqrt(p["running_var"] + p["eps"]) * p["weight"] + p["bias"]
            elif op == "relu":
                x = np.maximum(x, np.float32(0))
            else:  # sigmoid
                x = np.float32(1) / (np.float32(1) + np.exp(-x))
        return x.reshape(-1).astype(np.float32, copy=False)

    # -- the fine student ------------------------------------------------------------------------

    def fine_similarity_packed(self, query: np.ndarray, targets: Sequence[np.ndarray]) -> np.ndarray:
        """``fine_similarity_packed``: the query's packed codes uint8 [Tq, R, L/8] against each
        target's [Tt_i, R, L/8] -> float32 [B] in [-1, 1]."""
        query = _check_packed(query, "query", None, self.bits // 8)
        targets = [
            _check_packed(t, f"target {i}", query.shape[1], query.shape[2]) for i, t in enumerate(targets)
        ]
        out = np.empty(len(targets), dtype=np.float32)
        if not targets:
            return out
        f2f = _split_frames(
            packed_frame_similarity(query, np.concatenate(targets)), [t.shape[0] for t in targets]
        )
        # Targets by length, in batches cut to their longest: little padding is computed.
        order = sorted(range(len(targets)), key=lambda i: f2f[i].shape[1])
        first = 0
        while first < len(order):
            last = first + 1
            while (
                last < len(order)
                and (last + 1 - first) * query.shape[0] * f2f[order[last]].shape[1] <= BATCH_CELLS
            ):
                last += 1
            batch = order[first:last]
            out[batch] = self.similarity_from_frame_matrices([f2f[i] for i in batch])
            first = last
        return out

    def similarity_from_frame_matrices(self, matrices: Sequence[np.ndarray]) -> np.ndarray:
        """``FineSimilarityNetwork.similarity_from_frame_matrix`` for pairs of one query: frame-to-
        frame matrices [Tq, Tt_i] (the same Tq) -> [B]: the comparator, Hardtanh, frame Chamfer.

        As in ``VideoComparator.compare``, the pairs are zero-padded to the longest target and every
        cell outside a pair's real block is zeroed before a convolution reads it, so a pair's result
        does not depend on the others."""
        sims, tl = zip(*(_upsample(m.T) for m in matrices))  # target axes first: [Tt, Tq]
        sims, ql = zip(*(_upsample(s.T) for s in sims))
        rows, cols = ql[0], np.array(tl)
        x = np.zeros((len(sims), rows, max(tl), 1), dtype=np.float32)  # NHWC
        for i, s in enumerate(sims):
            x[i, :, : s.shape[1], 0] = s
        c = self.comparator
        x = _relu_inside(_max_pool(_conv(x, c["conv1.weight"], c["conv1.bias"])), rows // 2, cols // 2)
        rows, cols = rows // 4, cols // 4
        x = _relu_inside(_max_pool(_conv(x, c["conv2.weight"], c["conv2.bias"])), rows, cols)
        x = np.maximum(_conv(x, c["conv3.weight"], c["conv3.bias"]), np.float32(0))
        x = np.clip(_conv(x, c["fconv.weight"], c["fconv.bias"])[..., 0], -1.0, 1.0)  # Hardtanh
        # frame Chamfer over each pair's real block: max over target frames, mean over query frames
        inside = np.arange(x.shape[2])[None, :] < cols[:, None]
        best = np.where(inside[:, None, :], x, -np.inf).max(axis=2)[:, :rows]
        return (best.sum(axis=1) / np.float32(rows)).astype(np.float32)


def packed_frame_similarity(query: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """``dns_milvus.similarity.packed_frame_similarity``: query uint8 [Tq, R, W] and frames uint8
    [N, R, W] -> float32 [Tq, N], ``mean_o max_p (1 - 2 hamming / L)``. The ±1 products are summed
    in float32, exact for integers of magnitude <= L, then divided as the torch kernels divide."""
    tq, regions, width = query.shape
    bits = 8 * width
    q = _unpack(query).reshape(tq * regions, bits)
    dot_sums = np.empty((frames.shape[0], tq), dtype=np.float32)
    per_chunk = max(1, HAMMING_CHUNK_ELEMENTS // (tq * regions * regions))
    for start in range(0, frames.shape[0], per_chunk):
        chunk = frames[start : start + per_chunk]
        # target regions on the middle axis: the max over them is an element-wise max of slabs
        scores = (_unpack(chunk).reshape(-1, bits) @ q.T).reshape(chunk.shape[0], regions, tq, regions)
        dot_sums[start : start + chunk.shape[0]] = scores.max(axis=1).sum(axis=-1)
    return (dot_sums / np.float32(regions) * np.float32(1.0 / bits)).T


#: Byte -> its 8 codes as ±1 float32 (bit i of a byte is code i, ``dns_milvus.similarity.codes``).
_CODES = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little") * 2.0 - 1.0
_CODES = _CODES.astype(np.float32)


def _unpack(packed: np.ndarray) -> np.ndarray:
    """uint8 [..., W] -> ±1 float32 [..., 8 W] in one table look-up."""
    return _CODES[packed].reshape(*packed.shape[:-1], 8 * packed.shape[-1])


def _split_frames(sim: np.ndarray, lengths: list[int]) -> list[np.ndarray]:
    return np.split(sim, np.cumsum(lengths)[:-1], axis=1)


def _upsample(sim: np.ndarray) -> tuple[np.ndarray, int]:
    """Repeat each row ceil(4 / rows) times when there are fewer than 4 (``upsample_short_videos``)."""
    n = sim.shape[0]
    factor = -(-MIN_COMPARATOR_FRAMES // n) if n < MIN_COMPARATOR_FRAMES else 1
    return (np.repeat(sim, factor, axis=0) if factor > 1 else sim), n * factor


def _conv(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """A stride-1 convolution with ``k // 2`` cells of zero padding, NHWC: [N, H, W, C] x
    [Co, C, k, k] -> [N, H, W, Co], as one matrix product over the patches."""
    out_channels, channels, k, _ = weight.shape
    n, h, w, _ = x.shape
    if k > 1:
        pad = k // 2
        x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        # patches [N, H, W, k, k, C]: each cell's channels stay contiguous in the copy
        x = np.concatenate([x[:, dy : dy + h, dx : dx + w] for dy in range(k) for dx in range(k)], axis=-1)
    patches = x.reshape(n * h * w, k * k * channels)
    kernel = weight.transpose(2, 3, 1, 0).reshape(k * k * channels, out_channels)
    return (patches @ kernel + bias).reshape(n, h, w, out_channels)


def _max_pool(x: np.ndarray) -> np.ndarray:
    """2x2 max-pooling of [N, H, W, C], odd last rows and columns dropped (``max_pool2d(x, 2)``)."""
    n, h, w, c = x.shape
    return x[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _relu_inside(x: np.ndarray, rows: int, cols: np.ndarray) -> np.ndarray:
    """ReLU, and zero outside each pair's first ``rows`` x ``cols[i]`` cells."""
    inside = np.arange(x.shape[2])[None, :] < cols[:, None]
    x = np.where(inside[:, None, :, None], np.maximum(x, np.float32(0)), np.float32(0))
    x[:, rows:] = 0
    return x


def _check_packed(x: object, what: str, regions: int | None, width: int) -> np.ndarray:
    expected = f"packed codes uint8 [T, {regions if regions is not None else 'R'}, {width}]"
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 3 or 0 in x.shape:
        got = f"{x.dtype} {list(x.shape)}" if isinstance(x, np.ndarray) else type(x).__name__
        raise InvalidInputError(f"expected {what} as {expected} with T >= 1, got {got}")
    if x.shape[2] != width or (regions is not None and x.shape[1] != regions):
        raise InvalidInputError(f"expected {what} as {expected}, got {list(x.shape)}")
    return x
