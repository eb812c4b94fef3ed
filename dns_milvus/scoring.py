"""How coarse and fine scores become one ranking: the one home of DnS's score-merge rules.

Search (``dns_milvus.engine.rerank``), evaluation (``dns_milvus.eval``) and training (the
selector's labels, ``dns_milvus.train.selector``) all call these functions, so they cannot drift.

Merges (``ScoreMerge.kind``):

- ``release``: the DnS release's rule. Fine-student similarities are rescaled to [0, 1]
  (:func:`fine_unit`, ``s / 2 + 0.5``) and replace the coarse score of the pairs they were computed
  for. The two students' scales differ, so re-ranked pairs can jump over pairs that kept a coarse
  score for no reason but the scale; release checkpoints keep it for parity.
- ``calibrated``: each student's score goes through a monotone calibration fitted at training time
  (isotonic regression of "is a copy" on the score, :class:`Calibration`), so both read as the
  probability of a copy and mix on one scale.
- ``reorder``: fine scores only reorder the re-ranked candidates among the positions they held in
  the coarse ranking; nothing else moves. Safe without any calibration.

A model set names its merge in ``manifest.json`` (``"merge"``); without one, ``release``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dns_milvus.errors import InvalidInputError

MergeKind = Literal["release", "calibrated", "reorder"]
MERGE_KINDS: tuple[str, ...] = ("release", "calibrated", "reorder")
#: What the selector learns of a pair (:meth:`ScoreMerge.selector_target`).
SelectorTarget = Literal["disagreement", "copy"]
SELECTOR_TARGETS: tuple[str, ...] = ("disagreement", "copy")
#: Keeps a fitted calibration strictly increasing, so it never ties scores it did not tie before.
_SLOPE = 1e-6


def fine_unit(raw: np.ndarray | float) -> np.ndarray:
    """Fine-student similarities in [-1, 1] on the release's [0, 1] scale: ``s / 2 + 0.5``."""
    return np.asarray(raw, dtype=np.float64) / 2.0 + 0.5


def rerank_budget(percentage: float, n_candidates: int) -> int:
    """How many of ``n_candidates`` the fine student scores at ``percentage`` %: ``floor(p/100 * n)``."""
    if not 0 <= percentage <= 100:
        raise InvalidInputError(f"percentage must lie in 0..100, got {percentage}")
    # The epsilon keeps exact products (e.g. 35 % of 20 = 7) from flooring one short in binary floating point.
    return math.floor(percentage / 100.0 * n_candidates + 1e-9)


def segment_codes(vectors: np.ndarray) -> np.ndarray:
    """Segment vectors ``[..., S, D]`` (the coarse student's, one a segment) -> their sign bits,
    uint8 ``[..., S, D/8]`` (little bit order, as the fine codes are packed)."""
    vectors = np.asarray(vectors)
    if vectors.ndim < 2 or vectors.shape[-1] % 8 or vectors.shape[-1] == 0:
        raise InvalidInputError(
            f"expected segment vectors [..., S, D] with D a multiple of 8, got {list(vectors.shape)}"
        )
    return np.packbits(vectors > 0, axis=-1, bitorder="little")


def check_segment_input(segments: int, given: bool) -> None:
    """Refuse a segment match given to a release-layout selector (``segments`` 0), or missing
    for a selector that reads one."""
    if given != bool(segments):
        raise InvalidInputError(
            f"this selector reads segment matches of {segments} segments; pass them"
            if segments
            else "this selector has the release's three inputs; it reads no segment match"
        )


def segment_matches(query_coarse: np.ndarray, codes: Sequence[np.ndarray], chunk: int = 4096) -> np.ndarray:
    """The selector's segment-match input of each target: ``max_s <q, sign(v_s)> / sqrt(D)`` for the
    query's coarse vector ``q`` [D] and the target's segment codes uint8 [S, D/8]
    (:func:`segment_codes`); in [-1, 1] for a unit ``q``. float32 [N].

    Computed by table lookup: ``<q, sign(v)> = 2 * sum(q over set bits) - sum(q)``, and the sum of
    ``q`` over the set bits of one code byte is a row of a [D/8, 256] table built once a query.
    """
    q = np.asarray(query_coarse, dtype=np.float32).reshape(-1)
    width = q.size // 8
    if q.size == 0 or q.size % 8:
        raise InvalidInputError(f"expected a coarse vector [D] with D a multiple of 8, got {q.size} values")
    out = np.empty(len(codes), dtype=np.float32)
    if not len(codes):
        return out
    for i, c in enumerate(codes):
        if (
            not isinstance(c, np.ndarray)
            or c.dtype != np.uint8
            or c.ndim != 2
            or c.shape[1] != width
            or not c.shape[0]
        ):
            shape = list(c.shape) if isinstance(c, np.ndarray) else type(c).__name__
            raise InvalidInputError(f"target {i}: expected segment codes uint8 [S, {width}], got {shape}")
    bits = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little").astype(
        np.float32
    )
    table = q.reshape(width, 8) @ bits.T  # [D/8, 256]: sum of q over the set bits of each byte value
    total, scale = float(q.sum()), 1.0 / math.sqrt(q.size)
    columns = np.arange(width)
    for start in range(0, len(codes), chunk):
        part = codes[start : start + chunk]
        segments = {c.shape[0] for c in part}
        stacked = np.stack(part) if len(segments) == 1 else None
        if stacked is not None:
            sums = table[columns, stacked].sum(-1)  # [n, S]
            out[start : start + len(part)] = (2 * sums.max(-1) - total) * scale
        else:
            for j, c in enumerate(part):
                out[start + j] = (2 * table[columns, c].sum(-1).max() - total) * scale
    return out


def _pool_adjacent_violators(y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blocks of the weighted isotonic (non-decreasing) fit of ``y``: values, weights, last indices."""
    values: list[float] = []
    weights: list[float] = []
    ends: list[int] = []
    for i, (yi, wi) in enumerate(zip(y.tolist(), w.tolist())):
        values.append(yi)
        weights.append(wi)
        ends.append(i)
        while len(values) > 1 and values[-2] >= values[-1]:
            total = weights[-2] + weights[-1]
            values[-2] = (values[-2] * weights[-2] + values[-1] * weights[-1]) / total
            weights[-2] = total
            ends[-2] = ends[-1]
            del values[-1], weights[-1], ends[-1]
    return np.asarray(values), np.asarray(weights), np.asarray(ends)


@dataclass(frozen=True)
class Calibration:
    """A monotone, piecewise-linear map of a score: ``np.interp`` through the knots ``(x, y)``."""

    x: tuple[float, ...]
    y: tuple[float, ...]

    def __post_init__(self) -> None:
        x, y = np.asarray(self.x, dtype=np.float64), np.asarray(self.y, dtype=np.float64)
        if x.ndim != 1 or x.shape != y.shape or len(x) < 2:
            raise InvalidInputError("a calibration needs two or more knots with as many x as y values")
        if not (np.isfinite(x).all() and np.isfinite(y).all()):
            raise InvalidInputError("calibration knots must be finite")
        if np.any(np.diff(x) <= 0) or np.any(np.diff(y) <= 0):
            raise InvalidInputError("calibration knots must be strictly increasing in x and y")

    def __call__(self, scores: np.ndarray | float) -> np.ndarray:
        s = np.asarray(scores, dtype=np.float64)
        x, y = np.asarray(self.x), np.asarray(self.y)
        out = np.interp(s, x, y)
        # Beyond the knots the fit has no evidence: stay at the end values, keeping order only.
        out = np.where(s < x[0], y[0] + (s - x[0]) * _SLOPE, out)
        return np.where(s > x[-1], y[-1] + (s - x[-1]) * _SLOPE, out)

    @classmethod
    def fit(
        cls,
        scores: np.ndarray,
        labels: np.ndarray,
        weights: np.ndarray | None = None,
        *,
        max_knots: int = 48,
    ) -> Calibration:
        """Isotonic regression of ``labels`` (1: a copy) on ``scores``; knots at the blocks' weighted
        mean scores, so the map interpolates between them and stays strictly increasing."""
        s = np.asarray(scores, dtype=np.float64).reshape(-1)
        t = np.asarray(labels, dtype=np.float64).reshape(-1)
        w = np.ones_like(s) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
        if not (len(s) == len(t) == len(w)) or len(s) < 2:
            raise InvalidInputError("calibration needs as many scores, labels and weights, two or more")
        if not (np.isfinite(s).all() and np.isfinite(t).all() and (w > 0).all()):
            raise InvalidInputError("calibration scores and labels must be finite and weights positive")
        if not (t.min() < t.max()):
            raise InvalidInputError("calibration needs both copies and non-copies among its pairs")
        order = np.argsort(s, kind="stable")
        s, t, w = s[order], t[order], w[order]
        values, block_w, ends = _pool_adjacent_violators(t, w)
        starts = np.concatenate([[0], ends[:-1] + 1])
        centers = np.array([np.average(s[a : b + 1], weights=w[a : b + 1]) for a, b in zip(starts, ends)])
        if len(centers) > max_knots:  # keep the knots that carry the most weight, and both ends
            keep = np.sort(np.argsort(-block_w)[: max_knots - 2])
            keep = np.unique(np.concatenate([[0], keep, [len(centers) - 1]]))
            centers, values = centers[keep], values[keep]
        if len(centers) < 2:
            centers = np.array([s[0], s[-1] + 1e-3])
            values = np.array([values[0], values[0]])
        # Blocks may share a mean score when scores tie; spread them, then add the strict slope.
        centers = centers + np.arange(len(centers)) * 1e-9
        values = values + _SLOPE * (centers - centers[0]) + np.arange(len(values)) * 1e-9
        return cls(tuple(float(v) for v in centers), tuple(float(v) for v in values))

    def to_dict(self) -> dict[str, list[float]]:
        return {"x": list(self.x), "y": list(self.y)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Calibration:
        try:
            return cls(tuple(float(v) for v in data["x"]), tuple(float(v) for v in data["y"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInputError(f"a calibration is {{'x': [...], 'y': [...]}}, got {data!r}") from exc


@dataclass(frozen=True)
class ScoreMerge:
    """One model set's rule for mixing coarse scores and fine scores (fine on the [0, 1] scale)."""

    kind: MergeKind = "release"
    coarse: Calibration | None = None
    fine: Calibration | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in MERGE_KINDS:
            raise InvalidInputError(f"unknown score merge {self.kind!r}; expected one of {MERGE_KINDS}")
        if self.kind == "calibrated" and (self.coarse is None or self.fine is None):
            raise InvalidInputError("the calibrated merge needs a coarse and a fine calibration")

    @property
    def calibrated(self) -> bool:
        return self.coarse is not None and self.fine is not None

    def coarse_scale(self, coarse: np.ndarray) -> np.ndarray:
        """Coarse scores as the merged ranking shows them when no fine score is computed."""
        coarse = np.asarray(coarse, dtype=np.float64)
        return self.coarse(coarse) if self.kind == "calibrated" and self.coarse else coarse

    def fine_scale(self, fine: np.ndarray) -> np.ndarray:
        """Fine scores (on [0, 1]) as the merged ranking shows them where they are computed."""
        fine = np.asarray(fine, dtype=np.float64)
        return self.fine(fine) if self.kind == "calibrated" and self.fine else fine

    def merged(self, coarse: np.ndarray, fine: np.ndarray) -> np.ndarray:
        """Scores of one query's candidates: ``fine`` (on [0, 1]) is NaN where it was not computed."""
        coarse = np.asarray(coarse, dtype=np.float64)
        fine = np.asarray(fine, dtype=np.float64)
        if coarse.shape != fine.shape:
            raise InvalidInputError(f"coarse {coarse.shape} and fine {fine.shape} scores must align")
        scored = np.isfinite(fine)
        if self.kind == "reorder":
            out = coarse.copy()
            chosen = np.flatnonzero(scored)
            if len(chosen):
                slots = np.sort(coarse[chosen])[::-1]
                # best fine score takes the best slot; ties keep the coarse order
                by_fine = chosen[np.lexsort((-coarse[chosen], -fine[chosen]))]
                out[by_fine] = slots
            return out
        out = self.coarse_scale(coarse)
        out[scored] = self.fine_scale(fine[scored])
        return out

    def disagreement(self, coarse: np.ndarray, fine: np.ndarray) -> np.ndarray:
        """How far the fine score would move each pair on the merged scale: the selector's target."""
        coarse = np.asarray(coarse, dtype=np.float64)
        fine = np.asarray(fine, dtype=np.float64)
        if self.calibrated:
            assert self.coarse is not None and self.fine is not None
            return np.abs(self.fine(fine) - self.coarse(coarse))
        return np.abs(fine - coarse)

    def selector_target(
        self, coarse: np.ndarray, fine: np.ndarray, target: SelectorTarget = "disagreement"
    ) -> np.ndarray:
        """The value whose excess over the selector's threshold labels a pair worth re-ranking.

        ``disagreement``: how far the fine score would move the pair (paper 4.3). ``copy``: the
        higher of the pair's two merged scores, coarse and fine: a pair either stage would rank
        among the copies. Only those pairs' order decides mAP; a pair both stages put far below the
        copies stays there whichever score it keeps, however far apart the two are.
        """
        if target == "disagreement":
            return self.disagreement(coarse, fine)
        if target != "copy":
            raise InvalidInputError(f"unknown selector target {target!r}; expected one of {SELECTOR_TARGETS}")
        return np.maximum(self.coarse_scale(coarse), self.fine_scale(fine))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        if self.coarse is not None:
            out["coarse_calibration"] = self.coarse.to_dict()
        if self.fine is not None:
            out["fine_calibration"] = self.fine.to_dict()
        if self.details:
            out["details"] = dict(self.details)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | str | None) -> ScoreMerge:
        """From a manifest's ``merge`` entry: a kind name, or ``{"kind", "coarse_calibration", ...}``."""
        if data is None:
            return cls()
        if isinstance(data, str):
            return cls(data)  # type: ignore[arg-type]
        if not isinstance(data, Mapping):
            raise InvalidInputError(f"a score merge is a kind name or an object, got {type(data).__name__}")
        coarse, fine = data.get("coarse_calibration"), data.get("fine_calibration")
        return cls(
            data.get("kind", "release"),
            Calibration.from_dict(coarse) if coarse is not None else None,
            Calibration.from_dict(fine) if fine is not None else None,
            dict(data.get("details", {})),
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> ScoreMerge:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise InvalidInputError(f"cannot read a score merge from {path}: {exc}") from exc


RELEASE_MERGE = ScoreMerge("release")


def fit_merge(
    coarse: np.ndarray,
    fine: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    kind: MergeKind = "calibrated",
    details: Mapping[str, Any] | None = None,
) -> ScoreMerge:
    """A merge with both students' calibrations fitted on the same labelled pairs (fine on [0, 1])."""
    return ScoreMerge(
        kind,
        Calibration.fit(coarse, labels, weights),
        Calibration.fit(fine, labels, weights),
        dict(details or {}),
    )


__all__ = [
    "MERGE_KINDS",
    "RELEASE_MERGE",
    "SELECTOR_TARGETS",
    "Calibration",
    "ScoreMerge",
    "SelectorTarget",
    "fine_unit",
    "fit_merge",
    "rerank_budget",
]
