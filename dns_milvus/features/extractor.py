"""Frames -> DnS region features ``[T, 9, D]``: preprocessing, backbone, region pooling, PCA-whitening.

Preprocessing follows the DnS/ViSiL release: each frame's shorter side is resized to
``image_size * 256 / 224`` (256 for the default 224) with bicubic interpolation, the centre
``image_size x image_size`` square is cropped, and RGB 0..255 values are normalised with the
backbone's mean/std. (Ours anti-aliases when shrinking, which the release's OpenCV resize does
not; ``center_crop=False`` squeezes the whole frame into the square instead of cropping.)

Frames go through the network ``chunk_size`` at a time under ``torch.inference_mode`` so that
memory stays bounded for any video length; results are returned on the CPU as float32.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dns_milvus.device import resolve_device
from dns_milvus.errors import InvalidInputError
from dns_milvus.features.backbones import Backbone, build_backbone, check_backbone
from dns_milvus.features.pca import PCAWhitening
from dns_milvus.features.region_pooling import RegionPooling
from dns_milvus.video.decode import VideoSource, iter_frames
from dns_milvus.video.frames import check_frames

#: Float elements resized at once (64 MiB of float32): bounds memory for 4K frames in a large chunk.
_RESIZE_BUDGET = 16 * 1024 * 1024


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
        chunk_size: int = 32,
        image_size: int = 224,
        *,
        center_crop: bool = True,
        pca_components: int | None = 512,
    ) -> None:
        super().__init__()
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise InvalidInputError(f"chunk_size must be a positive integer, got {chunk_size!r}")
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
        self.chunk_size = chunk_size
        self.image_size = image_size
        self.center_crop = center_crop
        # The release's 256/224 resize-then-crop ratio, scaled to the chosen input size.
        self.resize_size = round(image_size * 256 / 224)
        self.register_buffer("pixel_mean", torch.tensor(network.input_mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("pixel_std", torch.tensor(network.input_std).view(1, 3, 1, 1) * 255)
        self.device = resolve_device(device)
        self.to(self.device)
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

    def preprocess(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 frames ``[N, H, W, 3]`` -> normalised float ``[N, 3, S, S]`` on the extractor's device."""
        height, width = frames.shape[1:3]
        out_h, out_w = self._target_size(height, width)
        per_step = max(1, _RESIZE_BUDGET // (3 * height * width))
        resized = []
        for start in range(0, len(frames), per_step):
            x = torch.from_numpy(np.ascontiguousarray(frames[start : start + per_step])).to(self.device)
            x = x.permute(0, 3, 1, 2).float()
            if (out_h, out_w) != (height, width):
                x = F.interpolate(x, size=(out_h, out_w), mode="bicubic", align_corners=False, antialias=True)
                x = x.clamp_(0, 255)  # bicubic overshoots; the release's uint8 resize saturates the same way
            top, left = (out_h - self.image_size) // 2, (out_w - self.image_size) // 2
            resized.append(x[:, :, top : top + self.image_size, left : left + self.image_size])
        x = torch.cat(resized) if len(resized) > 1 else resized[0]
        return (x - self.pixel_mean) / self.pixel_std

    # -- extraction ----------------------------------------------------------------------------------

    def region_vectors(self, x: torch.Tensor, *, whiten: bool = True) -> torch.Tensor:
        """Normalised input ``[N, 3, S, S]`` -> region vectors ``[N, R, D]`` (on the extractor's device);
        ``whiten=False`` keeps the backbone's L2-normalised vectors (before PCA-whitening)."""
        regions = self.pooling(self.backbone(x))
        return self.pca(regions) if self.pca is not None and whiten else regions

    def forward(self, frames: np.ndarray) -> torch.Tensor:
        """RGB frames ``uint8 [T, H, W, 3]`` -> region features ``float32 [T, R, D]`` on the CPU."""
        frames = check_frames(frames)
        return self._extract_chunks(
            frames[start : start + self.chunk_size] for start in range(0, len(frames), self.chunk_size)
        )

    def extract_video(
        self, path: VideoSource, fps: float = 1.0, max_frames: int | None = None, *, whiten: bool = True
    ) -> torch.Tensor:
        """Decode a video at ``fps`` (streaming, ``chunk_size`` frames in memory) and extract ``[T, R, D]``.

        Gives the same features as ``self(read_frames(path, fps, max_frames))``. ``whiten=False``
        returns the vectors before PCA-whitening (``self.pca`` applied to them gives the same result).
        """
        chunks = self._chunked(iter_frames(path, fps=fps, max_frames=max_frames))
        return self._extract_chunks(chunks, whiten=whiten)

    def _chunked(self, frames: Iterable[np.ndarray]) -> Iterable[np.ndarray]:
        buffer: list[np.ndarray] = []
        for frame in frames:
            buffer.append(frame)
            if len(buffer) == self.chunk_size:
                yield np.stack(buffer)
                buffer = []
        if buffer:
            yield np.stack(buffer)

    def _extract_chunks(self, chunks: Iterable[np.ndarray], *, whiten: bool = True) -> torch.Tensor:
        outputs = []
        with torch.inference_mode():
            for chunk in chunks:
                outputs.append(self.region_vectors(self.preprocess(chunk), whiten=whiten).float().cpu())
        if not outputs:
            raise InvalidInputError("no frames to extract features from")
        return torch.cat(outputs)
