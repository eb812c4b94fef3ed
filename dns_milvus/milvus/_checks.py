"""Argument checks shared by the Milvus layer."""

from __future__ import annotations

import math

import numpy as np

from dns_milvus.errors import InvalidInputError


def require_int(value: object, what: str, low: int, high: int) -> int:
    """``value`` as an int if it is an integer (not a bool) in [low, high], else InvalidInputError."""
    is_int = isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)
    if not is_int or not low <= value <= high:  # type: ignore[operator]
        raise InvalidInputError(f"{what} must be an integer in [{low}, {high}], got {value!r}")
    return int(value)


def require_seconds(value: object, what: str) -> float:
    """``value`` as a float if it is a finite positive number of seconds."""
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if not is_number or not (math.isfinite(value) and value > 0):  # type: ignore[arg-type]
        raise InvalidInputError(f"{what} must be a positive number of seconds, got {value!r}")
    return float(value)
