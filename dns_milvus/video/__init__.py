"""Video decoding (PyAV), writing, and near-duplicate copy transforms on frame arrays."""

from dns_milvus.video.decode import (
    FrameLimitWarning,
    VideoInfo,
    VideoSource,
    frames_from_images,
    iter_frames,
    probe,
    read_frames,
)
from dns_milvus.video.encode import write_video
from dns_milvus.video.frames import check_frames
from dns_milvus.video.transforms import TRANSFORMS, camera_pan, random_copy

__all__ = [
    "TRANSFORMS",
    "FrameLimitWarning",
    "VideoInfo",
    "VideoSource",
    "camera_pan",
    "check_frames",
    "frames_from_images",
    "iter_frames",
    "probe",
    "random_copy",
    "read_frames",
    "write_video",
]
