"""Validation of frame arrays, the common currency of decoding, transforms and feature extraction."""

from __future__ import annotations

import numpy as np

from dns_milvus.errors import InvalidInputError


def check_frames(frames: object, name: str = "frames") -> np.ndarray:
    """Return ``frames`` if it is a non-empty ``uint8 [T, H, W, 3]`` array, else raise InvalidInputError."""
    if not isinstance(frames, np.ndarray):
        raise InvalidInputError(
            f"{name} must be a numpy uint8 array [T, H, W, 3], got {type(frames).__name__}"
        )
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
        raise InvalidInputError(
            f"{name} must be a uint8 array [T, H, W, 3] (RGB), got {frames.dtype} {tuple(frames.shape)}"
        )
    if min(frames.shape[:3]) == 0:
        raise InvalidInputError(
            f"{name} must have at least one frame of at least 1x1 pixels, got {frames.shape}"
        )
    return frames
