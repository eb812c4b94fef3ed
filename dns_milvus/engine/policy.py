"""Which candidates the fine-grained student re-ranks: the selection policies of stage 2."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from dns_milvus.errors import InvalidInputError
from dns_milvus.scoring import rerank_budget

PolicyKind = Literal["percent", "count", "threshold", "none", "all"]


@dataclass(frozen=True)
class SelectionPolicy:
    """How many of the selector's highest-confidence candidates go to the fine student.

    - ``percent``: the top ``value`` % of the candidates (``floor(value/100 * n)``, as the
      paper's protocol counts it);
    - ``count``: the top ``value`` candidates;
    - ``threshold``: every candidate whose selector confidence is >= ``value``;
    - ``none``: coarse ranking only; ``all``: every candidate (pure fine-grained re-ranking).
    """

    kind: PolicyKind = "percent"
    value: float = 5.0

    def __post_init__(self) -> None:
        if self.kind not in ("percent", "count", "threshold", "none", "all"):
            raise InvalidInputError(
                f"unknown selection policy {self.kind!r}; expected percent, count, threshold, none or all"
            )
        if not math.isfinite(self.value):
            raise InvalidInputError(f"selection policy value must be finite, got {self.value}")
        if self.kind == "percent" and not 0 <= self.value <= 100:
            raise InvalidInputError(f"percent policy expects 0..100, got {self.value}")
        if self.kind == "count" and (self.value < 0 or self.value != int(self.value)):
            raise InvalidInputError(f"count policy expects a non-negative integer, got {self.value}")
        if self.kind == "threshold" and not 0 <= self.value <= 1:
            raise InvalidInputError(f"threshold policy expects a confidence in 0..1, got {self.value}")

    @classmethod
    def parse(cls, text: str) -> SelectionPolicy:
        """Parse ``5%``, ``percent:5``, ``count:50``, ``threshold:0.6``, ``none`` or ``all``."""
        text = text.strip().lower()
        if text in ("none", "all"):
            return cls(text, 0.0)  # type: ignore[arg-type]
        if text.endswith("%"):
            return cls("percent", _number(text[:-1], text))
        kind, sep, value = text.partition(":")
        if not sep:
            raise InvalidInputError(
                f"cannot parse selection policy {text!r}; "
                "expected e.g. '5%', 'count:50', 'threshold:0.6', 'none'"
            )
        return cls(kind, _number(value, text))  # type: ignore[arg-type]

    @property
    def uses_selector(self) -> bool:
        """Whether the selection depends on the selector's confidences: ``none`` keeps the coarse
        ranking (stage 2 then runs no network), ``all`` re-ranks every candidate whatever the
        selector would say (so hits show no confidence, and candidates need no selector input)."""
        return self.kind not in ("none", "all")

    def select(self, confidences: np.ndarray) -> np.ndarray:
        """Indices of the selected candidates, highest confidence first (ties: lower index first)."""
        n = len(confidences)
        order = np.argsort(-np.asarray(confidences, dtype=np.float64), kind="stable")
        if self.kind == "none":
            return order[:0]
        if self.kind == "all":
            return order
        if self.kind == "percent":
            return order[: rerank_budget(self.value, n)]
        if self.kind == "count":
            return order[: int(self.value)]
        return order[np.asarray(confidences)[order] >= self.value]

    def __str__(self) -> str:
        if self.kind in ("none", "all"):
            return self.kind
        if self.kind == "percent":
            return f"{self.value:g}%"
        return f"{self.kind}:{self.value:g}"


def _number(value: str, text: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise InvalidInputError(
            f"cannot parse selection policy {text!r}: {value!r} is not a number"
        ) from None
