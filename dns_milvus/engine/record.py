"""What DnS keeps of one indexed video, without the networks that made it (no torch here, so a
search by an indexed id can handle records without importing it)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAYLOAD_PACKED = "packed_bits"
PAYLOAD_FLOAT16 = "float16"


@dataclass
class VideoRecord:
    """Everything DnS keeps of one video: the coarse vector, the selector's self-similarity
    and the fine-grained tensor (packed bits or float16)."""

    coarse: np.ndarray  # float32 [dim], L2-normalised
    self_sim: float
    fine: np.ndarray  # uint8 [T, R, L/8] or float16 [T, R, D]
    payload_kind: str
    video_id: str | None = None
    #: uint8 [S, dim/8]: sign bits of the coarse student's vectors of S consecutive segments, for
    #: a selector with a segment-match input (``SelectorNetwork(segments=S)``); None otherwise.
    segments: np.ndarray | None = None

    @property
    def n_frames(self) -> int:
        return int(self.fine.shape[0])
