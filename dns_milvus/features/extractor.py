"""Frames -> DnS region features ``[T, 9, D]``: preprocessing, backbone, region pooling, PCA-whitening.

Preprocessing follows the DnS/ViSiL release: each frame's shorter side is resized to
``image_size * 256 / 224`` (256 for the default 224) with bicubic interpolation, the centre
``image_size x image_size`` square is cropped, and RGB 0..255 values are normalised with the
backbone's mean/std. (Ours anti-aliases when shrinking, which the release's OpenCV resize does
not; ``center_crop=False`` squeezes the whole frame into the square instead of cropping.)

Frames go through the network ``chunk_size`` at a time under ``torch.inference_mode`` so that
memory stays bounded for any video length; results are returned on the CPU as float32. By
default a chunk is 8 frames on the CPU, where EfficientNet's depthwise layers are bound by
memory traffic and a larger batch's activations spill the caches (32 frames measured 1.4-1.5x
the CPU time a frame of 8, benchmarks/README.md), and 32 on a GPU.

Many short videos: ``extract_prepared`` runs the frames of several videos (``open_video``)
through the backbone together, ``chunk_size`` frames a call whatever the videos' lengths (one
frame's features do not depend on the others in its batch), decoding each as its frames are
needed. The backbone runs in the channels-last memory layout
(the same float32 arithmetic, in the order oneDNN and cuDNN run fastest); ``precision="bfloat16"``
runs it under bfloat16 autocast (region pooling and PCA stay float32), an opt-in trade of
accuracy for speed measured by ``benchmarks/bench_video_ingest.py``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dns_milvus.device import resolve_device
from dns_milvus.errors import DnSError, InvalidInputError
from dns_milvus.features.backbones import Backbone, build_backbone, check_backbone
from dns_milvus.features.pca import PCAWhitening
from dns_milvus.features.region_pooling import RegionPooling
from dns_milvus.video.decode import VideoSource, iter_frames
from dns_milvus.video.frames import check_frames

#: Float elements resized at once (64 MiB of float32): bounds memory for 4K frames in a large chunk.
_RESIZE_BUDGET = 16 * 1024 * 1024

#: Frames a backbone call by default, by device type (the module docstring says why).
DEFAULT_CHUNK_SIZES = {"cpu": 8}
DEFAULT_GPU_CHUNK_SIZE = 32

#: Backbone arithmetic: float32 (the default), or bfloat16 autocast (opt-in, less accurate).
PRECISIONS = ("float32", "bfloat16")

#: What decoding the rest of a prepared video may raise for that video alone (decoders raise
#: the built-in ones on damaged input).
_VIDEO_ERRORS = (DnSError, OSError, ValueError, RuntimeError)


@dataclass
class PreparedVideo:
    """A video's sampled frames for the backbone, as normalised float ``[n, 3, S, S]`` chunks on
    the CPU: those ``ready`` now, then the ``rest`` as they are read (decoded on the way), so
    that a long video never holds all its frames in memory."""

    ready: list[torch.Tensor]
    rest: Iterator[torch.Tensor] | None = None

    def chunks(self) -> Iterator[torch.Tensor]:
        yield from self.ready
        if self.rest is not None:
            yield from self.rest


class FeatureExtractor(nn.Module):
    """Extract region features ``[T, 9, D]`` (a 3x3 grid of regions per frame) from RGB frames.

    ``backbone`` is a registered name (``"efficientnet-lite0"``, ``"resnet50"``) built with
    ``weights`` (required for ResNet-50: a torchvision state_dict file), or a ``Backbone``
    instance used as given. ``pca`` is a ``PCAWhitening``, the path of a ``{'mean', 'd', 'V'}``
    file (keeping ``pca_components`` components), or None for the raw ``sum(C_i)``-d vectors.
    Every region vector is L2-normalised. Outputs are deterministic for a given device.
    """

    def __init__(
        self,
        backbone: str | nn.Module = "efficientnet-lite0",
        weights: str | os.PathLike | None = None,
        pca: PCAWhitening | str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        chunk_size: int | None = None,
        image_size: int = 224,
        *,
        center_crop: bool = True,
        pca_components: int | None = 512,
        precision: str = "float32",
    ) -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise InvalidInputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise InvalidInputError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 32:
            raise InvalidInputError(f"image_size must be an integer >= 32, got {image_size!r}")
        if isinstance(backbone, str):
            network: Backbone = build_backbone(backbone, weights)
        elif isinstance(backbone, nn.Module):
            if weights is not None:
                raise InvalidInputError(
                    "weights applies to a backbone given by name, not to a module instance"
                )
            network = check_backbone(backbone)
        else:
            raise InvalidInputError(f"backbone must be a name or an nn.Module, got {type(backbone).__name__}")
        self.backbone = network
        self.pooling = RegionPooling()
        if pca is not None and not isinstance(pca, PCAWhitening):
            pca = PCAWhitening.from_release_file(pca, n_components=pca_components)
        if pca is not None and pca.input_dim != network.output_dim:
            raise InvalidInputError(
                f"PCA-whitening expects {pca.input_dim}-d vectors but backbone {type(network).__name__} "
                f"produces {network.output_dim}-d region vectors"
            )
        self.pca = pca
        self.device = resolve_device(device)
        self.chunk_size = (
            chunk_size
            if chunk_size is not None
            else DEFAULT_CHUNK_SIZES.get(self.device.type, DEFAULT_GPU_CHUNK_SIZE)
        )
        self.image_size = image_size
        self.center_crop = center_crop
        # The release's 256/224 resize-then-crop ratio, scaled to the chosen input size.
        self.resize_size = round(image_size * 256 / 224)
        self.register_buffer("pixel_mean", torch.tensor(network.input_mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("pixel_std", torch.tensor(network.input_std).view(1, 3, 1, 1) * 255)
        self.precision = precision
        self.to(self.device)
        self.backbone.to(memory_format=torch.channels_last)
        self.eval()

    @property
    def output_dim(self) -> int:
        """D: the PCA's component count, or the backbone's concatenated channel count without PCA."""
        return self.pca.n_components if self.pca is not None else self.backbone.output_dim

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Always eval mode: the extractor is frozen and batch-norm statistics must never update."""
        return super().train(False)

    # -- preprocessing -------------------------------------------------------------------------------

    def _target_size(self, height: int, width: int) -> tuple[int, int]:
        if not self.center_crop:
            return self.image_size, self.image_size
        scale = self.resize_size / min(height, width)
        return max(self.image_size, round(height * scale)), max(self.image_size, round(width * scale))

    def preprocess(self, frames: np.ndarray, device: str | torch.device | None = None) -> torch.Tensor:
        """uint8 frames ``[N, H, W, 3]`` -> normalised float ``[N, 3, S, S]`` on ``device`` (default:
        the extractor's)."""
        device = self.device if device is None else torch.device(device)
        height, width = frames.shape[1:3]
        out_h, out_w = self._target_size(height, width)
        per_step = max(1, _RESIZE_BUDGET // (3 * height * width))
        resized = []
        for start in range(0, len(frames), per_step):
            x = torch.from_numpy(np.ascontiguousarray(frames[start : start + per_step])).to(device)
            x = x.permute(0, 3, 1, 2).float()
            if (out_h, out_w) != (height, width):
                x = F.interpolate(x, size=(out_h, out_w), mode="bicubic", align_corners=False, antialias=True)
                x = x.clamp_(0, 255)  # bicubic overshoots; the release's uint8 resize saturates the same way
            top, left = (out_h - self.image_size) // 2, (out_w - self.image_size) // 2
            resized.append(x[:, :, top : top + self.image_size, left : left + self.image_size])
        x = torch.cat(resized) if len(resized) > 1 else resized[0]
        return (x - self.pixel_mean.to(device)) / self.pixel_std.to(device)

    # -- extraction ----------------------------------------------------------------------------------

    def region_vectors(self, x: torch.Tensor, *, whiten: bool = True) -> torch.Tensor:
        """Normalised input ``[N, 3, S, S]`` -> region vectors ``[N, R, D]`` (on the extractor's device);
        ``whiten=False`` keeps the backbone's L2-normalised vectors (before PCA-whitening)."""
        regions = self._backbone_regions(x)
        return self.pca(regions) if self.pca is not None and whiten else regions

    def _backbone_regions(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bfloat16"):
            maps = self.backbone(x)
        return self.pooling([m.float() for m in maps])

    def forward(self, frames: np.ndarray) -> torch.Tensor:
        """RGB frames ``uint8 [T, H, W, 3]`` -> region features ``float32 [T, R, D]`` on the CPU."""
        frames = check_frames(frames)
        chunks = (
            self.preprocess(frames[start : start + self.chunk_size])
            for start in range(0, len(frames), self.chunk_size)
        )
        return self._extract_one(PreparedVideo([], chunks))

    def extract_video(
        self, path: VideoSource, fps: float = 1.0, max_frames: int | None = None, *, whiten: bool = True
    ) -> torch.Tensor:
        """Decode a video at ``fps`` (streaming, ``chunk_size`` frames in memory) and extract ``[T, R, D]``.

        Gives the same features as ``self(read_frames(path, fps, max_frames))``. ``whiten=False``
        returns the vectors before PCA-whitening (``self.pca`` applied to them gives the same result).
        """
        return self._extract_one(self.open_video(path, fps, max_frames), whiten=whiten)

    def _extract_one(self, video: PreparedVideo, *, whiten: bool = True) -> torch.Tensor:
        (result,) = self.extract_prepared([video], whiten=whiten)
        if isinstance(result, BaseException):
            raise result
        return result

    # -- many videos -----------------------------------------------------------------------------

    def open_video(self, path: VideoSource, fps: float = 1.0, max_frames: int | None = None) -> PreparedVideo:
        """A video to give ``extract_prepared``: decoded at ``fps`` and preprocessed (on the CPU)
        chunk by chunk as its frames are read, so that nothing is decoded yet and at most one
        chunk of it is in memory. Errors of the file (missing, not a video, no frame, damaged)
        surface when it is read: ``extract_prepared`` gives them as that video's result."""
        frames = iter_frames(path, fps=fps, max_frames=max_frames)
        return PreparedVideo([], (self.preprocess(chunk, device="cpu") for chunk in self._chunked(frames)))

    def extract_prepared(
        self,
        videos: Sequence[PreparedVideo],
        *,
        whiten: bool = True,
        stages: dict[str, float] | None = None,
    ) -> list[torch.Tensor | BaseException]:
        """Region features ``float32 [T, R, D]`` (on the CPU) of each prepared video, or the error
        that stopped its decoding: the frames of all of them go through the backbone
        ``chunk_size`` at a time, across videos.

        ``stages`` (when given) accumulates seconds under ``decode`` (reading the videos' frames:
        decoding and preprocessing), ``backbone`` (network and region pooling) and ``pca``.
        """
        timer = _StageTimer(stages, self.device)
        outputs: list[list[torch.Tensor]] = [[] for _ in videos]
        failed: dict[int, BaseException] = {}
        pending: list[tuple[int, torch.Tensor]] = []  # frames waiting for a full backbone batch
        with torch.inference_mode():
            for number, video in enumerate(videos):
                chunks = video.chunks()
                while True:
                    try:
                        with timer("decode"):
                            chunk = next(chunks, None)
                    except _VIDEO_ERRORS as exc:
                        failed[number] = exc
                        pending = [(n, frames) for n, frames in pending if n != number]
                        break
                    if chunk is None:
                        break
                    pending.append((number, chunk))
                    while sum(len(frames) for _, frames in pending) >= self.chunk_size:
                        pending = self._run_batch(pending, self.chunk_size, outputs, timer, whiten)
            if pending:
                self._run_batch(pending, sum(len(frames) for _, frames in pending), outputs, timer, whiten)
        results: list[torch.Tensor | BaseException] = []
        for number, parts in enumerate(outputs):
            if number in failed:
                results.append(failed[number])
            elif not parts:
                results.append(InvalidInputError("no frames to extract features from"))
            else:  # a copy made outside inference mode: a plain tensor, not a view of the batch
                results.append(torch.cat(parts))
        return results

    def _run_batch(
        self,
        pending: list[tuple[int, torch.Tensor]],
        size: int,
        outputs: list[list[torch.Tensor]],
        timer: _StageTimer,
        whiten: bool,
    ) -> list[tuple[int, torch.Tensor]]:
        """The first ``size`` pending frames through the backbone (and PCA), appended to their
        videos' outputs; returns the frames left pending."""
        taken: list[tuple[int, torch.Tensor]] = []
        left = size
        while left:
            number, frames = pending.pop(0)
            if len(frames) > left:
                pending.insert(0, (number, frames[left:]))
                frames = frames[:left]
            taken.append((number, frames))
            left -= len(frames)
        batch = torch.cat([frames for _, frames in taken]) if len(taken) > 1 else taken[0][1]
        with timer("backbone"):
            regions = self._backbone_regions(batch)
        with timer("pca"):
            if self.pca is not None and whiten:
                regions = self.pca(regions)
            regions = regions.float().cpu()
        start = 0
        for number, frames in taken:
            outputs[number].append(regions[start : start + len(frames)])
            start += len(frames)
        return pending

    def _chunked(self, frames: Iterable[np.ndarray]) -> Iterable[np.ndarray]:
        buffer: list[np.ndarray] = []
        for frame in frames:
            buffer.append(frame)
            if len(buffer) == self.chunk_size:
                yield np.stack(buffer)
                buffer = []
        if buffer:
            yield np.stack(buffer)


class _StageTimer:
    """Adds the wall time of ``with timer(stage):`` blocks to ``stages`` (nothing when None),
    waiting for queued CUDA work at both ends so that each stage gets its own."""

    def __init__(self, stages: dict[str, float] | None, device: torch.device) -> None:
        self.stages = stages
        self.cuda = device.type == "cuda"

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if self.stages is None:
            yield
            return
        if self.cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.stages[stage] = self.stages.get(stage, 0.0) + time.perf_counter() - started
