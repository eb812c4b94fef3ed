"""Writing frame arrays to video files (or in-memory buffers) with PyAV."""

from __future__ import annotations

import os
from fractions import Fraction
from typing import BinaryIO

import av
import numpy as np

from dns_milvus.errors import InvalidInputError
from dns_milvus.video.frames import check_frames


def _pick_codec(preferred: str | None) -> str:
    candidates = [preferred] if preferred else ["libx264", "mpeg4"]
    for name in candidates:
        try:
            av.codec.Codec(name, "w")
        except (av.error.FFmpegError, ValueError):
            continue
        return name
    raise InvalidInputError(f"no usable video encoder among {candidates} in this FFmpeg build")


def write_video(
    frames: np.ndarray,
    path: str | os.PathLike | BinaryIO,
    fps: float = 25.0,
    *,
    bitrate: int | None = None,
    codec: str | None = None,
) -> None:
    """Encode RGB frames ``uint8 [T, H, W, 3]`` to an MP4 file or binary buffer.

    ``codec`` defaults to H.264 (``libx264``), falling back to MPEG-4 part 2 where the FFmpeg
    build has no H.264 encoder. ``bitrate`` (bits per second) lowers quality on purpose, e.g.
    to make a re-encoded copy; None keeps the encoder's default quality. Odd frame sizes are
    padded by one replicated row/column, since 4:2:0 chroma needs even sizes.
    """
    frames = check_frames(frames)
    if not (fps > 0):
        raise InvalidInputError(f"fps must be positive, got {fps!r}")
    height, width = frames.shape[1:3]
    pad_h, pad_w = height % 2, width % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    target = os.fspath(path) if isinstance(path, os.PathLike) else path
    codec_name = _pick_codec(codec)
    # x264's macroblock-tree rate control reads lookahead buffers it never wrote on short clips,
    # so the same frames could encode to different bytes (and decode to different pixels).
    options = {"x264-params": "mbtree=0"} if codec_name == "libx264" else {}
    with av.open(target, mode="w", format="mp4") as container:
        stream = container.add_stream(
            codec_name, rate=Fraction(fps).limit_denominator(10_000), options=options
        )
        stream.width, stream.height = width + pad_w, height + pad_h
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1  # one thread: identical bytes on every machine
        if bitrate is not None:
            stream.bit_rate = int(bitrate)
        for array in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
