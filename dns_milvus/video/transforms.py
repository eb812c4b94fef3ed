"""Copy transforms: near-duplicate versions of a video's frames, for training, demos and benchmarks.

Every transform takes and returns RGB frames ``uint8 [T, H, W, 3]`` and never modifies its
input. Each comes in two forms:

- an explicit function whose parameters say exactly what happens (``hflip``, ``crop``, ...),
- a random form in ``TRANSFORMS`` (``name -> f(frames, rng)``) that draws the parameters from a
  ``numpy.random.Generator``, so a seed reproduces the same copy.

``random_copy`` chains several random transforms, the way real copies pile up edits.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dns_milvus.errors import InvalidInputError
from dns_milvus.video.decode import read_frames
from dns_milvus.video.encode import write_video
from dns_milvus.video.frames import check_frames

Transform = Callable[[np.ndarray, np.random.Generator], np.ndarray]

#: Frames handled per torch call in resizing/blurring, to bound float memory on long inputs.
_TORCH_CHUNK = 16

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _torch_map(frames: np.ndarray, fn: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
    """Apply ``fn`` to float [N, 3, H, W] chunks of ``frames`` and return uint8 [T, H', W', 3]."""
    out = []
    for start in range(0, len(frames), _TORCH_CHUNK):
        chunk = torch.from_numpy(np.ascontiguousarray(frames[start : start + _TORCH_CHUNK]))
        result = fn(chunk.permute(0, 3, 1, 2).float())
        out.append(result.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def _check_box(frames: np.ndarray, top: int, left: int, height: int, width: int) -> None:
    full_h, full_w = frames.shape[1:3]
    if height < 1 or width < 1 or top < 0 or left < 0 or top + height > full_h or left + width > full_w:
        raise InvalidInputError(
            f"box (top={top}, left={left}, height={height}, width={width}) must lie inside the "
            f"{full_h}x{full_w} frame and be at least 1x1"
        )


# -- explicit transforms ---------------------------------------------------------------------------


def hflip(frames: np.ndarray) -> np.ndarray:
    """Mirror every frame left-right."""
    return check_frames(frames)[:, :, ::-1].copy()


def resize(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize every frame to ``height x width`` (bilinear, anti-aliased when shrinking)."""
    frames = check_frames(frames)
    if height < 1 or width < 1:
        raise InvalidInputError(f"resize needs a positive height and width, got {height}x{width}")
    return _torch_map(
        frames, lambda x: F.interpolate(x, size=(height, width), mode="bilinear", antialias=True)
    )


def crop(frames: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
    """Keep the ``height x width`` box at (``top``, ``left``) of every frame."""
    frames = check_frames(frames)
    _check_box(frames, top, left, height, width)
    return frames[:, top : top + height, left : left + width].copy()


def color_jitter(
    frames: np.ndarray, brightness: float = 1.0, contrast: float = 1.0, saturation: float = 1.0
) -> np.ndarray:
    """Scale brightness, contrast (around the frame's mean luma), saturation (around luma); 1 = no change."""
    frames = check_frames(frames)
    if min(brightness, contrast, saturation) < 0:
        raise InvalidInputError("color_jitter factors must be >= 0")
    x = frames.astype(np.float32) * brightness
    luma_mean = (x @ _LUMA).mean(axis=(1, 2), keepdims=True)[..., None]
    x = (x - luma_mean) * contrast + luma_mean
    luma = (x @ _LUMA)[..., None]
    x = luma + (x - luma) * saturation
    return _to_uint8(x)


def gaussian_blur(frames: np.ndarray, sigma: float) -> np.ndarray:
    """Blur every frame with a Gaussian of ``sigma`` pixels (separable, edges replicated)."""
    frames = check_frames(frames)
    if not sigma > 0:
        raise InvalidInputError(f"gaussian_blur needs sigma > 0, got {sigma!r}")
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    horizontal = kernel.view(1, 1, 1, -1).repeat(3, 1, 1, 1)
    vertical = kernel.view(1, 1, -1, 1).repeat(3, 1, 1, 1)

    def blur(x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), horizontal, groups=3)
        return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), vertical, groups=3)

    return _torch_map(frames, blur)


def reencode(frames: np.ndarray, bitrate: int, fps: float = 25.0) -> np.ndarray:
    """Encode to an in-memory MP4 at ``bitrate`` bits/s and decode back: real compression artefacts.

    The frame count and size are kept (odd sizes are padded for the encoder and cropped back).
    """
    frames = check_frames(frames)
    buffer = io.BytesIO()
    write_video(frames, buffer, fps=fps, bitrate=bitrate)
    decoded = read_frames(buffer, fps=None)
    height, width = frames.shape[1:3]
    return np.ascontiguousarray(decoded[: len(frames), :height, :width])


def overlay_logo(
    frames: np.ndarray,
    top: int,
    left: int,
    height: int,
    width: int,
    color: Sequence[int] = (255, 255, 255),
    checker: int = 0,
    opacity: float = 1.0,
) -> np.ndarray:
    """Paint a static logo: a filled box, optionally a checkerboard of ``checker``-pixel cells."""
    frames = check_frames(frames)
    _check_box(frames, top, left, height, width)
    if not 0 <= opacity <= 1:
        raise InvalidInputError(f"opacity must lie in [0, 1], got {opacity!r}")
    logo = np.empty((height, width, 3), dtype=np.float32)
    logo[:] = np.asarray(color, dtype=np.float32)
    if checker > 0:
        rows, cols = np.indices((height, width))
        dark = ((rows // checker + cols // checker) % 2).astype(bool)
        logo[dark] = 255 - logo[dark]
    out = frames.copy()
    region = out[:, top : top + height, left : left + width].astype(np.float32)
    out[:, top : top + height, left : left + width] = _to_uint8(region * (1 - opacity) + logo * opacity)
    return out


def overlay_text(
    frames: np.ndarray, rng: np.random.Generator, band_fraction: float = 0.12, at_top: bool = False
) -> np.ndarray:
    """Paint a subtitle-like band: a dark strip with rows of light glyph-sized blocks that change over time.

    Glyphs are drawn as rectangles (no font files needed); a new "line" is drawn every few frames,
    like subtitles changing.
    """
    frames = check_frames(frames)
    if not 0 < band_fraction <= 0.5:
        raise InvalidInputError(f"band_fraction must lie in (0, 0.5], got {band_fraction!r}")
    n, full_h, full_w = frames.shape[:3]
    band_h = max(3, round(full_h * band_fraction))
    band_top = 0 if at_top else full_h - band_h
    glyph_h = max(1, band_h // 2)
    glyph_w = max(1, glyph_h * 2 // 3)
    gap = max(1, glyph_w // 3)
    out = frames.copy()
    band = out[:, band_top : band_top + band_h]
    band[:] = (band.astype(np.float32) * 0.25).astype(np.uint8)
    glyph_top = (band_h - glyph_h) // 2
    n_slots = max(1, (full_w - 2 * gap) // (glyph_w + gap))
    line_length = max(1, round(n_slots * 0.8))
    start = 0
    while start < n:
        span = int(rng.integers(2, 6))
        used = rng.random(n_slots) < 0.85
        used[line_length:] = False
        first_slot = (n_slots - line_length) // 2
        used = np.roll(used, first_slot)
        for slot in np.flatnonzero(used):
            x0 = gap + int(slot) * (glyph_w + gap)
            band[start : start + span, glyph_top : glyph_top + glyph_h, x0 : x0 + glyph_w] = 235
        start += span
    return out


def picture_in_picture(
    frames: np.ndarray, background: np.ndarray, top: int, left: int, height: int, width: int
) -> np.ndarray:
    """Place the video, resized to ``height x width``, at (``top``, ``left``) inside ``background`` footage.

    The result has the background's frame size and the video's frame count; the background
    loops when it is shorter.
    """
    frames = check_frames(frames)
    background = check_frames(background, "background")
    _check_box(background, top, left, height, width)
    index = np.arange(len(frames)) % len(background)
    out = background[index].copy()
    out[:, top : top + height, left : left + width] = resize(frames, height, width)
    return out


def change_speed(frames: np.ndarray, factor: float) -> np.ndarray:
    """Fast forward (``factor > 1``, frames skipped) or slow motion (``factor < 1``, frames repeated).

    The output has ``ceil(T / factor)`` frames: output frame ``i`` is input frame ``floor(i * factor)``.
    """
    frames = check_frames(frames)
    if not (math.isfinite(factor) and factor > 0):
        raise InvalidInputError(f"speed factor must be a positive number, got {factor!r}")
    index = np.floor(np.arange(0, len(frames), factor)).astype(np.int64)
    return frames[np.minimum(index, len(frames) - 1)].copy()


def drop_frames(frames: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Keep the frames where the boolean mask ``keep [T]`` is True (at least one must be)."""
    frames = check_frames(frames)
    keep = np.asarray(keep)
    if keep.dtype != bool or keep.shape != (len(frames),) or not keep.any():
        raise InvalidInputError(f"keep must be a bool mask of shape ({len(frames)},) with a True entry")
    return frames[keep].copy()


def camera_pan(
    image: np.ndarray,
    n_frames: int,
    size: int | tuple[int, int] = 224,
    *,
    zoom: float = 0.6,
    start: tuple[float, float] = (0.0, 0.0),
    end: tuple[float, float] = (1.0, 1.0),
) -> np.ndarray:
    """Turn a still image ``uint8 [H, W, 3]`` into a video ``[n_frames, h, w, 3]`` of a camera pan over it.

    A window with the output's aspect ratio, ``zoom`` times the largest such window, slides in
    a straight line from the relative position ``start`` to ``end`` ((0, 0) = top-left corner,
    (1, 1) = bottom-right) and is resized to ``size`` (an int for square frames, or (h, w)).
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InvalidInputError(
            f"camera_pan needs a uint8 image [H, W, 3], got {getattr(image, 'dtype', type(image))} "
            f"{tuple(getattr(image, 'shape', ()))}"
        )
    if n_frames < 1 or not 0 < zoom <= 1:
        raise InvalidInputError(f"camera_pan needs n_frames >= 1 and 0 < zoom <= 1, got {n_frames}, {zoom}")
    out_h, out_w = (size, size) if isinstance(size, int) else size
    img_h, img_w = image.shape[:2]
    # The largest window of the output's aspect ratio that fits, shrunk by zoom.
    fit = min(img_h / out_h, img_w / out_w)
    win_h = max(1, round(out_h * fit * zoom))
    win_w = max(1, round(out_w * fit * zoom))
    steps = np.linspace(0.0, 1.0, n_frames)
    crops = []
    for s in steps:
        rel_y = start[0] + (end[0] - start[0]) * s
        rel_x = start[1] + (end[1] - start[1]) * s
        y = round(np.clip(rel_y, 0, 1) * (img_h - win_h))
        x = round(np.clip(rel_x, 0, 1) * (img_w - win_w))
        crops.append(image[y : y + win_h, x : x + win_w])
    return resize(np.stack(crops), out_h, out_w)


def synthetic_background(n_frames: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth, slowly drifting colour footage: a stand-in host video for picture-in-picture copies."""
    coarse = rng.integers(0, 256, size=(1, 6, 6, 3), dtype=np.uint8)
    field = resize(coarse, height * 2, width * 2)[0]
    dy, dx = rng.integers(-3, 4, size=2)
    frames = []
    for t in range(n_frames):
        y = int((height // 2 + dy * t) % height)
        x = int((width // 2 + dx * t) % width)
        frames.append(field[y : y + height, x : x + width])
    return np.stack(frames)


# -- random forms: parameters drawn from a Generator ---------------------------------------------


def _random_box(
    rng: np.random.Generator, full_h: int, full_w: int, low: float, high: float
) -> tuple[int, ...]:
    height = max(1, round(full_h * rng.uniform(low, high)))
    width = max(1, round(full_w * rng.uniform(low, high)))
    top = int(rng.integers(0, full_h - height + 1))
    left = int(rng.integers(0, full_w - width + 1))
    return top, left, height, width


def random_reencode(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Re-encode at 0.02-0.1 bits per pixel per frame (at 25 fps): visible blocking and blur."""
    height, width = check_frames(frames).shape[1:3]
    bits_per_pixel = rng.uniform(0.02, 0.1)
    return reencode(frames, bitrate=max(10_000, round(bits_per_pixel * height * width * 25)), fps=25.0)


def random_resize(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Downscale to 40-80% per side (aspect ratio may change by a few per cent)."""
    height, width = check_frames(frames).shape[1:3]
    scale = rng.uniform(0.4, 0.8)
    aspect = rng.uniform(0.95, 1.05)
    return resize(frames, max(8, round(height * scale * aspect)), max(8, round(width * scale / aspect)))


def random_crop(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Keep a box of 65-90% of each side, anywhere in the frame."""
    height, width = check_frames(frames).shape[1:3]
    return crop(frames, *_random_box(rng, height, width, 0.65, 0.9))


def random_hflip(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mirror left-right (no parameters to draw)."""
    return hflip(frames)


def random_color_jitter(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness and contrast x0.6-1.4, saturation x0.3-1.7."""
    return color_jitter(
        frames, rng.uniform(0.6, 1.4), contrast=rng.uniform(0.6, 1.4), saturation=rng.uniform(0.3, 1.7)
    )


def random_blur(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur of 0.8-2.5 pixels at 224-pixel frames, scaled with the frame size."""
    height, width = check_frames(frames).shape[1:3]
    return gaussian_blur(frames, rng.uniform(0.8, 2.5) * min(height, width) / 224)


def random_logo(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 10-25% logo box, solid or checkered, in a random colour and place, 60-100% opaque."""
    height, width = check_frames(frames).shape[1:3]
    top, left, box_h, box_w = _random_box(rng, height, width, 0.1, 0.25)
    color = tuple(int(c) for c in rng.integers(0, 256, size=3))
    checker = int(rng.choice([0, max(2, min(box_h, box_w) // 4)]))
    return overlay_logo(
        frames, top, left, box_h, box_w, color, checker=checker, opacity=rng.uniform(0.6, 1.0)
    )


def random_text(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A subtitle band of 8-15% of the height, at the bottom (or, one time in four, the top)."""
    return overlay_text(frames, rng, band_fraction=rng.uniform(0.08, 0.15), at_top=bool(rng.random() < 0.25))


def random_picture_in_picture(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The video at 35-60% size inside synthetic host footage of the same frame size."""
    n, height, width = check_frames(frames).shape[:3]
    background = synthetic_background(n, height, width, rng)
    scale = rng.uniform(0.35, 0.6)
    box_h, box_w = max(1, round(height * scale)), max(1, round(width * scale))
    top = int(rng.integers(0, height - box_h + 1))
    left = int(rng.integers(0, width - box_w + 1))
    return picture_in_picture(frames, background, top, left, box_h, box_w)


def random_speed(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Fast forward x1.5 or x2, or slow motion x0.5 or x0.75."""
    return change_speed(frames, float(rng.choice([0.5, 0.75, 1.5, 2.0])))


def random_frame_drop(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Drop each frame with a probability of 10-30% (at least one frame stays)."""
    n = len(check_frames(frames))
    keep = rng.random(n) >= rng.uniform(0.1, 0.3)
    if not keep.any():
        keep[int(rng.integers(0, n))] = True
    return drop_frames(frames, keep)


#: Random copy transforms by name, in the order ``random_copy`` applies them: temporal edits,
#: then geometry, photometric changes, overlays, embedding in other footage, and re-encoding last
#: (as when an edited copy is uploaded).
TRANSFORMS: dict[str, Transform] = {
    "speed": random_speed,
    "frame_drop": random_frame_drop,
    "crop": random_crop,
    "hflip": random_hflip,
    "resize": random_resize,
    "color_jitter": random_color_jitter,
    "blur": random_blur,
    "logo": random_logo,
    "text": random_text,
    "picture_in_picture": random_picture_in_picture,
    "reencode": random_reencode,
}


def random_copy(
    frames: np.ndarray,
    rng: np.random.Generator,
    n_ops: int = 3,
    ops: Sequence[str] | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Make a near-duplicate copy with ``n_ops`` distinct random transforms drawn from ``ops`` (default: all).

    Returns the copy and the names of the transforms applied, in the order applied (the order
    of ``TRANSFORMS``). The same generator state gives the same copy.
    """
    frames = check_frames(frames)
    names = list(TRANSFORMS) if ops is None else list(ops)
    unknown = [name for name in names if name not in TRANSFORMS]
    if unknown:
        raise InvalidInputError(f"unknown transforms {unknown}; known: {sorted(TRANSFORMS)}")
    if not 0 <= n_ops <= len(names):
        raise InvalidInputError(f"n_ops must lie in [0, {len(names)}], got {n_ops}")
    chosen = set(rng.choice(names, size=n_ops, replace=False).tolist()) if n_ops else set()
    applied = [name for name in TRANSFORMS if name in chosen]
    for name in applied:
        frames = TRANSFORMS[name](frames, rng)
    return frames, applied
