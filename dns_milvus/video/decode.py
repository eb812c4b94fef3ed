"""Video decoding with PyAV: metadata probing and frame sampling by presentation time.

Frames are sampled at a fixed rate in *time*, not by frame index: the sample for time ``t`` is
the frame on screen at ``t`` (the last frame whose presentation timestamp is ``<= t``). This
gives the same frames as index-based sampling on constant-frame-rate files (frames 0, 25, 50,
... of a 25 fps file at 1 fps) and the right ones on variable-frame-rate files, where a frame
index says nothing about time. Frames without a timestamp, or whose timestamp does not
increase, are placed one nominal frame period after the previous frame.

Decoding is streamed: only the sampled frames are converted to RGB arrays and kept, so memory
is bounded by the output, never by the file's native frame rate or length (``iter_frames``
holds one frame at a time).

Sampling also skips work in the decoder: the sampled frames are known from the packets'
timestamps before anything is decoded (one demuxing pass), so a packet whose frame is neither
sampled nor a reference for other frames (most B-frames) is dropped by the decoder
(``skip_frame = NONREF``) instead of being decoded. Reference frames and sampled frames are
decoded as always, so the sampled frames are exactly those of a full decode. Where the
packets do not tell (a packet without a timestamp, two with the same one) or the decoder
outputs frames other than the packets announced, the video is decoded in full instead.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import BinaryIO

import av
import numpy as np

from dns_milvus.errors import InvalidInputError, VideoDecodeError

#: A video file path, or an open binary file object (e.g. ``io.BytesIO``) holding a video.
VideoSource = str | os.PathLike | BinaryIO

#: Frame period assumed when a stream declares no frame rate at all.
_FALLBACK_FPS = Fraction(25)


class FrameLimitWarning(UserWarning):
    """A video had more samples than ``max_frames``; fewer, spread or truncated, were returned."""


@dataclass(frozen=True)
class VideoInfo:
    """Container metadata of a video's first video stream (nothing is decoded to get it)."""

    duration_s: float | None
    fps: float | None
    width: int
    height: int
    n_frames_estimate: int | None
    codec: str


def _describe(source: VideoSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return repr(os.fspath(source))
    return f"<in-memory video {type(source).__name__}>"


def _check_file(source: VideoSource) -> None:
    """Reject missing, non-regular and empty files before FFmpeg sees them (its messages are vague)."""
    if not isinstance(source, (str, os.PathLike)):
        return
    path = os.fspath(source)
    if not os.path.exists(path):
        raise VideoDecodeError(f"video file {path!r} does not exist")
    if not os.path.isfile(path):
        raise VideoDecodeError(f"video path {path!r} is not a regular file")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(f"video file {path!r} is empty (0 bytes)")


def _open(source: VideoSource) -> tuple[av.container.InputContainer, av.video.stream.VideoStream]:
    _check_file(source)
    if isinstance(source, io.IOBase) and source.seekable():
        source.seek(0)  # the same buffer may be read more than once
    target = os.fspath(source) if isinstance(source, os.PathLike) else source
    try:
        container = av.open(target, mode="r")
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise VideoDecodeError(f"{_describe(source)} is not a readable video file: {exc}") from exc
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(f"{_describe(source)} has no video stream")
    return container, container.streams.video[0]


def _stream_rate(stream: av.video.stream.VideoStream) -> Fraction | None:
    # FFmpeg's guess weighs the codec's own timing (e.g. an H.264 SPS) above a demuxer default.
    for rate in (stream.guessed_rate, stream.average_rate, stream.base_rate):
        if rate is not None and rate > 0:
            return Fraction(rate)
    return None


def _stream_duration(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream
) -> Fraction | None:
    if stream.duration is not None and stream.duration > 0 and stream.time_base is not None:
        return Fraction(stream.duration) * Fraction(stream.time_base)
    if container.duration is not None and container.duration > 0:
        return Fraction(container.duration, av.time_base)
    return None


def probe(path: VideoSource) -> VideoInfo:
    """Read a video's metadata (duration, frame rate, size, codec) without decoding frames.

    Raises ``VideoDecodeError`` naming the file when it is missing, empty, not a video
    container, or holds no video stream.
    """
    container, stream = _open(path)
    with container:
        rate = _stream_rate(stream)
        duration = _stream_duration(container, stream)
        if stream.frames:
            n_frames: int | None = int(stream.frames)
        elif duration is not None and rate is not None:
            n_frames = round(duration * rate)
        else:
            n_frames = None
        return VideoInfo(
            duration_s=float(duration) if duration is not None else None,
            fps=float(rate) if rate is not None else None,
            width=int(stream.codec_context.width),
            height=int(stream.codec_context.height),
            n_frames_estimate=n_frames,
            codec=str(stream.codec_context.name),
        )


def _output_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """Size after downscaling (never upscaling) so the longer side is at most ``max_side``."""
    if max_side is None or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _validate_sampling(fps: float | None, max_frames: int | None, max_side: int | None) -> None:
    if fps is not None and not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise InvalidInputError(f"fps must be a positive number (or None for every frame), got {fps!r}")
    for name, value in (("max_frames", max_frames), ("max_side", max_side)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InvalidInputError(f"{name} must be a positive integer or None, got {value!r}")


def _timed_frames(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, period: Fraction
) -> Iterator[tuple[Fraction, av.VideoFrame]]:
    """Decoded frames with their presentation time in seconds.

    A frame without a timestamp, or whose timestamp does not increase, is placed one nominal
    frame ``period`` after the previous frame.
    """
    time_base = Fraction(stream.time_base) if stream.time_base is not None else None
    previous: Fraction | None = None
    for frame in container.decode(stream):
        if frame.pts is not None and time_base is not None:
            time = Fraction(frame.pts) * time_base
            if previous is not None and time <= previous:
                time = previous + period
        else:
            time = Fraction(0) if previous is None else previous + period
        previous = time
        yield time, frame


def _frames_on_screen(
    timed: Iterator[tuple[Fraction, av.VideoFrame]], step: Fraction, period: Fraction
) -> Iterator[av.VideoFrame]:
    """The frame on screen at t0, t0 + step, t0 + 2 step, ... (t0: the first frame's time).

    A frame is on screen from its time until the next frame's; the last one for one ``period``.
    """
    target: Fraction | None = None
    shown: av.VideoFrame | None = None
    shown_time = Fraction(0)
    for time, frame in timed:
        if target is None:
            target = time
        while shown is not None and target < time:
            yield shown
            target += step
        shown, shown_time = frame, time
    while shown is not None and target is not None and target < shown_time + period:
        yield shown
        target += step


class _PlanMismatch(Exception):
    """The decoder gave other frames than the packets announced: decode the video in full."""


def _sample_plan(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    step: Fraction,
    period: Fraction,
) -> list[int] | None:
    """The timestamps of the sampled frames in sampling order (a frame on screen at several
    sampling times repeats), from the packets alone: one demuxing pass, nothing decoded.

    None when the packets cannot tell: no time base, a packet without a timestamp, two packets
    with the same one, or a demuxing error (the full decode then reports it as it always has).
    Packets the demuxer marks as discarded (cut by an edit list) give no frame and are left out.
    """
    if stream.time_base is None:
        return None
    time_base = Fraction(stream.time_base)
    stamps: list[int] = []
    try:
        for packet in container.demux(stream):
            if packet.size == 0 or packet.is_discard:  # the final flush packet; trimmed frames
                continue
            if packet.pts is None:
                return None
            stamps.append(int(packet.pts))
    except av.error.FFmpegError:
        return None
    if not stamps or len(set(stamps)) != len(stamps):
        return None
    stamps.sort()
    return list(_frames_on_screen(((stamp * time_base, stamp) for stamp in stamps), step, period))


def _decode_planned(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, plan: list[int]
) -> Iterator[av.VideoFrame]:
    """The frames of ``plan`` (timestamps from ``_sample_plan``), in order, decoding every other
    packet with ``skip_frame = NONREF``: the decoder drops it unless it is a reference frame.

    Each frame is yielded once the decoder has output a later one, after checking that the output
    timestamps increase and that no planned frame was missed (what the full decode's choice of
    the frame on screen relies on); otherwise ``_PlanMismatch``.
    """
    wanted = set(plan)
    context = stream.codec_context
    position = 0  # index in ``plan`` of the next frame to find
    held: av.VideoFrame | None = None
    held_repeats = 0
    last_pts: int | None = None
    for packet in container.demux(stream):
        # The flush packet (size 0) drains delayed frames: never skip anything there.
        context.skip_frame = "DEFAULT" if packet.size == 0 or packet.pts in wanted else "NONREF"
        for frame in packet.decode():
            if frame.pts is None or (last_pts is not None and frame.pts <= last_pts):
                raise _PlanMismatch
            last_pts = frame.pts
            for _ in range(held_repeats):
                yield held
            held, held_repeats = None, 0
            if frame.pts not in wanted:
                continue
            if position >= len(plan) or frame.pts != plan[position]:
                raise _PlanMismatch  # a planned frame never came out
            held = frame
            while position < len(plan) and plan[position] == frame.pts:
                held_repeats += 1
                position += 1
    if position != len(plan):
        raise _PlanMismatch
    for _ in range(held_repeats):
        yield held


def _sampled_frames(
    path: VideoSource,
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    step: Fraction,
    period: Fraction,
    skip_unsampled: bool,
) -> Iterator[av.VideoFrame]:
    """The frame on screen every ``step`` seconds (``_frames_on_screen`` over every decoded frame),
    decoding only what those frames need when ``skip_unsampled`` and the packets allow it."""
    if not skip_unsampled:
        yield from _frames_on_screen(_timed_frames(container, stream, period), step, period)
        return
    plan = _sample_plan(container, stream, step, period)  # consumes ``container``
    emitted = 0
    if plan is not None:
        try:
            for frame in _reopened(path, lambda c, s: _decode_planned(c, s, plan)):
                yield frame
                emitted += 1
            return
        except _PlanMismatch:
            pass
    # Decode in full; after a mismatch, the frames yielded so far are the first ones of it.
    full = _reopened(path, lambda c, s: _frames_on_screen(_timed_frames(c, s, period), step, period))
    yield from itertools.islice(full, emitted, None)


def _reopened(
    path: VideoSource,
    decode: Callable[[av.container.InputContainer, av.video.stream.VideoStream], Iterator[av.VideoFrame]],
) -> Iterator[av.VideoFrame]:
    """``decode`` on a fresh container of ``path`` (closed when the iteration ends)."""
    container, stream = _open(path)
    with container:
        stream.thread_type = "AUTO"
        yield from decode(container, stream)


def iter_frames(
    path: VideoSource,
    fps: float | None = 1.0,
    max_frames: int | None = None,
    max_side: int | None = None,
    *,
    skip_unsampled: bool = True,
) -> Iterator[np.ndarray]:
    """Yield RGB frames ``uint8 [H, W, 3]`` sampled every ``1 / fps`` seconds of presentation time.

    ``fps=None`` yields every decoded frame (with ``max_frames``: the first ones). ``max_side``
    downscales (never upscales) frames so their longer side is at most that many pixels.
    ``max_frames`` caps the output: when the video would give more samples and its duration is
    known, the sampling interval is stretched so that exactly ``max_frames`` samples spread
    uniformly over the whole video (a copied segment may sit anywhere in it); when the duration
    is unknown, sampling stops after ``max_frames``. Both cases emit a ``FrameLimitWarning``.
    Every yielded frame has the size of the first one. ``skip_unsampled`` (default) lets the
    decoder drop frames that are neither sampled nor referenced by other frames (see the module
    docstring): the same frames, less decoding; False decodes every frame.

    Errors surface when iteration starts (and while it runs): ``VideoDecodeError`` naming the
    file for a missing, empty, corrupt or non-video file, or a stream that yields no frame.
    """
    _validate_sampling(fps, max_frames, max_side)
    container, stream = _open(path)
    with container:
        stream.thread_type = "AUTO"
        period = 1 / (_stream_rate(stream) or _FALLBACK_FPS)
        step: Fraction | None = None if fps is None else 1 / Fraction(fps)
        warn_on_cap = False
        if step is not None and max_frames is not None:
            duration = _stream_duration(container, stream)
            if duration is None:
                warn_on_cap = True
            elif math.floor(duration / step) + 1 > max_frames:
                warnings.warn(
                    f"{_describe(path)} lasts {float(duration):.1f} s, which gives more than max_frames="
                    f"{max_frames} samples at {fps} fps; sampling {max_frames} frames uniformly instead",
                    FrameLimitWarning,
                    stacklevel=2,
                )
                step = duration / max_frames
        if step is None:
            sampled = (frame for _, frame in _timed_frames(container, stream, period))
        else:
            sampled = _sampled_frames(path, container, stream, step, period, skip_unsampled)
        size: tuple[int, int] | None = None
        emitted = 0
        try:
            for frame in sampled:
                if size is None:
                    size = _output_size(frame.width, frame.height, max_side)
                yield frame.to_ndarray(format="rgb24", width=size[0], height=size[1], interpolation="AREA")
                emitted += 1
                if max_frames is not None and emitted >= max_frames:
                    if warn_on_cap:
                        warnings.warn(
                            f"{_describe(path)} has no known duration; stopped after max_frames={max_frames}"
                            " frames",
                            FrameLimitWarning,
                            stacklevel=2,
                        )
                    return
        except av.error.FFmpegError as exc:
            raise VideoDecodeError(
                f"{_describe(path)} is corrupt: decoding failed after {emitted} sampled frames: {exc}"
            ) from exc
        if emitted == 0:
            raise VideoDecodeError(f"{_describe(path)} has a video stream but no decodable frame")


def read_frames(
    path: VideoSource,
    fps: float | None = 1.0,
    max_frames: int | None = None,
    max_side: int | None = None,
    *,
    skip_unsampled: bool = True,
) -> np.ndarray:
    """Decode a video into RGB frames ``uint8 [T, H, W, 3]`` sampled at ``fps`` (see ``iter_frames``)."""
    frames = list(
        iter_frames(path, fps=fps, max_frames=max_frames, max_side=max_side, skip_unsampled=skip_unsampled)
    )
    return np.stack(frames)


def frames_from_images(images: Sequence[str | os.PathLike | np.ndarray]) -> np.ndarray:
    """Stack still images (files PyAV can read, or ``uint8 [H, W, 3]`` arrays) into frames ``[T, H, W, 3]``.

    Images of another size than the first are resized to it, so the result is one array.
    """
    if not images:
        raise InvalidInputError("frames_from_images needs at least one image")
    frames: list[np.ndarray] = []
    for index, image in enumerate(images):
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise InvalidInputError(
                    f"image {index} must be a uint8 array [H, W, 3], got {image.dtype} {tuple(image.shape)}"
                )
            array = image
        else:
            array = read_frames(image, fps=None, max_frames=1)[0]
        if frames and array.shape != frames[0].shape:
            height, width = frames[0].shape[:2]
            array = (
                av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
                .reformat(width=width, height=height, interpolation="AREA")
                .to_ndarray(format="rgb24")
            )
        frames.append(array)
    return np.stack(frames)
