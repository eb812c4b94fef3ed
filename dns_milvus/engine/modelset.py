"""A model set: the networks that index videos and re-rank candidates, loaded together.

A model set is a directory with ``manifest.json`` naming its files::

    {"name": "dns-effnet-lite0", "coarse": "cg_student.pth", "fine": "fg_bin_student.pth",
     "selector": "selector.pth", "backbone": "efficientnet-lite0", "pca": "pca.pth",
     "fps": 1.0, "regions": 9, "merge": {"kind": "calibrated", ...}}

``backbone``/``pca`` are optional: without them the set indexes region features given
directly (e.g. the DnS release's HDF5 features) but cannot decode video files. The feature
extractor they make is built on first use (``ModelSet.extractor``): a search by indexed id or
by features never pays for the backbone. ``regions``
(default 9, the 3x3 grid of the release and of ``dns_milvus.features``) is the number of
regions a frame the networks were trained on; features with another count are refused.
``merge`` (default ``release``, the DnS release's rule) says how coarse and fine scores mix
(``dns_milvus.scoring``).
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dns_milvus.device import resolve_device
from dns_milvus.engine.manifest import (
    DEFAULT_REGIONS,
    MANIFEST,
    manifest_merge,
    manifest_regions,
    read_manifest,
)
from dns_milvus.engine.numpy_set import network_digests
from dns_milvus.engine.record import PAYLOAD_FLOAT16, PAYLOAD_PACKED, VideoRecord
from dns_milvus.errors import CheckpointError, InvalidInputError
from dns_milvus.inference import COMPARATOR_CONVS, Layer, save_inference_weights
from dns_milvus.models import load_checkpoint
from dns_milvus.scoring import RELEASE_MERGE, ScoreMerge, segment_codes
from dns_milvus.similarity import (
    fine_similarity_float,
    fine_similarity_packed,
    pack_signs,
    prepare_for_inference,
    resolve_precision,
    resolve_threads,
)
from dns_milvus.similarity.comparator import comparator_student

#: Largest |value| accepted in region features. PCA-whitened, L2-normalised features lie within
#: 1; values far beyond any feature's range overflow float32 inside the networks.
MAX_FEATURE_ABS = 1e4
#: File name of the NumPy inference weights ``write_inference_weights`` adds to a set.
INFERENCE_FILE = "inference.npz"


@dataclass
class ModelSet:
    """The coarse student, the fine student and the selector (plus an optional feature extractor,
    made by ``extractor_factory`` when first used)."""

    coarse: torch.nn.Module
    fine: torch.nn.Module
    selector: torch.nn.Module
    name: str = "custom"
    #: Builds the feature extractor (``dns_milvus.features.FeatureExtractor``); None: the set has none.
    extractor_factory: Callable[[], Any] | None = field(default=None, repr=False)
    fps: float = 1.0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tag: str = ""
    #: Regions a frame the networks expect; None accepts any count (the same within a batch).
    regions: int | None = DEFAULT_REGIONS
    #: How coarse and fine scores mix into one ranking.
    merge: ScoreMerge = RELEASE_MERGE
    _extractor: Any | None = field(default=None, init=False, repr=False, compare=False)
    _extractor_lock: threading.Lock = field(
        default_factory=threading.Lock, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        for net in (self.coarse, self.fine, self.selector):
            net.to(self.device).eval()
        for net in (self.fine, self.selector):  # channels-last comparator weights: same values, faster convs
            prepare_for_inference(net)
        if not self.tag:
            self.tag = _state_tag(self.coarse, self.fine, self.selector)

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    def from_checkpoints(
        cls,
        coarse: str | Path,
        fine: str | Path,
        selector: str | Path,
        *,
        name: str = "custom",
        extractor: Any | None = None,
        extractor_factory: Callable[[], Any] | None = None,
        fps: float = 1.0,
        device: str | torch.device | None = None,
        regions: int | None = DEFAULT_REGIONS,
        merge: ScoreMerge = RELEASE_MERGE,
    ) -> ModelSet:
        """Load the three networks from release-layout checkpoint files; the feature extractor is
        ``extractor`` (built) or what ``extractor_factory`` builds when a video is first given."""
        if extractor is not None and extractor_factory is not None:
            raise InvalidInputError("give extractor or extractor_factory, not both")
        dev = resolve_device(device)
        factory = extractor_factory if extractor is None else lambda: extractor
        return cls(
            coarse=load_checkpoint(coarse, expected="cg_student"),
            fine=load_checkpoint(fine, expected=("fg_bin_student", "fg_att_student")),
            selector=load_checkpoint(selector, expected="selector"),
            name=name,
            extractor_factory=factory,
            fps=fps,
            device=dev,
            regions=regions,
            merge=merge,
        )

    @classmethod
    def load(cls, directory: str | Path, *, device: str | torch.device | None = None) -> ModelSet:
        """Load a model-set directory (see the module docstring for ``manifest.json``)."""
        directory = Path(directory)
        manifest = read_manifest(directory)
        manifest_path = directory / MANIFEST
        dev = resolve_device(device)
        return cls.from_checkpoints(
            directory / manifest["coarse"],
            directory / manifest["fine"],
            directory / manifest["selector"],
            name=manifest.get("name", directory.name),
            extractor_factory=_manifest_extractor(manifest, directory, dev),
            fps=float(manifest.get("fps", 1.0)),
            device=dev,
            regions=manifest_regions(manifest, manifest_path),
            merge=manifest_merge(manifest, manifest_path),
        )

    # -- properties ----------------------------------------------------------------------------

    @property
    def extractor(self) -> Any | None:
        """The feature extractor (``dns_milvus.features.FeatureExtractor``), built on first use;
        None for a set without one."""
        if self._extractor is None and self.extractor_factory is not None:
            with self._extractor_lock:  # two threads' first videos build it once
                if self._extractor is None:
                    self._extractor = self.extractor_factory()
        return self._extractor

    @property
    def payload_kind(self) -> str:
        return PAYLOAD_PACKED if getattr(self.fine, "fg_type", "bin") == "bin" else PAYLOAD_FLOAT16

    @property
    def coarse_dim(self) -> int:
        return int(self.coarse.output_dim)

    @property
    def feature_dim(self) -> int:
        return int(self.coarse.dims)

    # -- stage 2 ---------------------------------------------------------------------------------

    def check_fine_options(self, precision: str, threads: int | None) -> None:
        """Refuse fine-scorer options this set cannot honour (``InvalidInputError``): an unknown
        precision, bfloat16 without native hardware support, a bad thread count."""
        resolve_precision(precision, self.device)
        resolve_threads(threads)

    @property
    def selector_segments(self) -> int:
        """Segments a video whose codes the selector reads (0: the release's three inputs)."""
        return int(getattr(self.selector, "segments", 0))

    @torch.inference_mode()
    def selector_confidence(
        self,
        query_self_sim: float,
        self_sims: np.ndarray,
        coarse_scores: np.ndarray,
        segment_match: np.ndarray | None = None,
    ) -> np.ndarray:
        """The selector's probability that each pair (the query with a target of self-similarity
        ``self_sims[i]``, coarse score ``coarse_scores[i]`` and, for a selector with segments,
        segment match ``segment_match[i]``) needs the fine student, float32 [N]."""
        out = self.selector.pair_confidence(
            query_self_sim,
            torch.as_tensor(np.asarray(self_sims, dtype=np.float32)),
            torch.as_tensor(np.asarray(coarse_scores, dtype=np.float32)),
            None if segment_match is None else torch.as_tensor(np.asarray(segment_match, dtype=np.float32)),
        )
        return out.reshape(-1).float().cpu().numpy()

    def fine_similarity(
        self,
        query: np.ndarray,
        targets: Sequence[np.ndarray],
        *,
        deadline: float | None = None,
        precision: str = "float32",
        threads: int | None = None,
    ) -> np.ndarray:
        """Raw fine-student similarities (in [-1, 1]) of the query's fine tensor against each
        target's (packed codes or float16, as the set stores them), float32 [B]; ``deadline``,
        ``precision`` and ``threads`` as the fine scorers of ``dns_milvus.similarity`` take them."""
        fn = fine_similarity_packed if self.payload_kind == PAYLOAD_PACKED else fine_similarity_float
        q = torch.from_numpy(np.require(query, requirements=["C", "W"]))
        ts = [torch.from_numpy(np.require(t, requirements=["C", "W"])) for t in targets]
        scores = fn(
            self.fine, q, ts, device=self.device, deadline=deadline, precision=precision, threads=threads
        )
        return scores.float().cpu().numpy()

    # -- indexing ------------------------------------------------------------------------------

    @torch.inference_mode()
    def index_features(self, features: Sequence[np.ndarray | torch.Tensor]) -> list[VideoRecord]:
        """Index a batch of videos given as region features [T, R, D] each (the same R).

        The videos are packed along the frame axis (``dns_milvus.models.packed``): no padded
        frame goes through the networks' per-frame layers, which are most of the work.
        """
        if len(features) == 0:
            return []
        tensors = []
        for i, f in enumerate(features):
            try:
                tensors.append(self.check_features(f))
            except InvalidInputError as exc:
                raise InvalidInputError(f"video #{i}: {exc}") from None
        regions = {t.shape[1] for t in tensors}
        if len(regions) > 1:
            raise InvalidInputError(
                f"videos indexed together need the same number of regions a frame, got {sorted(regions)}"
            )
        lengths = torch.tensor([t.shape[0] for t in tensors])
        packed = torch.cat(tensors).to(self.device)
        on_device = lengths.to(self.device)
        coarse = self.coarse.index_packed(packed, on_device).float().cpu().numpy()
        # The selector's comparator as the fine scorers run it: on the CPU its first layer fused
        # in C (the same float32 arithmetic, ~1e-7 apart), a cached copy of the selector.
        selector = comparator_student(self.selector, torch.float32)
        self_sim = selector.index_packed(packed, on_device).float().cpu().numpy()
        if self.payload_kind == PAYLOAD_PACKED:  # packed straight from the signs: no float codes
            payloads = pack_signs(self.fine.index_packed_signs(packed, on_device).cpu().numpy())
        else:
            payloads = self.fine.index_packed(packed, on_device).to(torch.float16).cpu().numpy()
        per_video = np.split(payloads, np.cumsum(lengths.tolist())[:-1])
        segments: np.ndarray | list[None] = [None] * len(tensors)
        if self.selector_segments:
            vectors = self.coarse.index_segments_packed(packed, on_device, self.selector_segments)
            segments = segment_codes(vectors.float().cpu().numpy())
        return [
            VideoRecord(
                coarse=np.ascontiguousarray(coarse[i], dtype=np.float32),
                self_sim=float(self_sim[i]),
                fine=fine,
                payload_kind=self.payload_kind,
                segments=segments[i],
            )
            for i, fine in enumerate(per_video)
        ]

    def check_features(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """One video's region features as a float32 tensor [T, R, D], or ``InvalidInputError``
        saying what is wrong: the shape (R must be the set's ``regions``, D its feature size),
        NaN/Inf, or values beyond ``MAX_FEATURE_ABS``. Ingestion checks each video with this
        before indexing a batch, so one bad video cannot fail the others."""
        regions = "R" if self.regions is None else str(self.regions)
        expected = f"region features [T, {regions}, {self.feature_dim}] with T >= 1"
        try:
            t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
        except (TypeError, ValueError, RuntimeError):
            raise InvalidInputError(f"expected {expected}, got {type(x).__name__}") from None
        if not (t.is_floating_point() or t.dtype in _INTEGER_DTYPES):
            raise InvalidInputError(f"expected {expected}, got dtype {t.dtype}")
        t = t.float()
        if (
            t.ndim != 3
            or t.shape[0] == 0
            or t.shape[-1] != self.feature_dim
            or (self.regions is not None and t.shape[1] != self.regions)
        ):
            raise InvalidInputError(f"expected {expected}, got {list(t.shape)}")
        # One pass over the features (ingestion checks every video): NaN propagates through
        # both bounds and an Inf is one of them.
        low, high = (float(bound) for bound in t.aminmax())
        if not (math.isfinite(low) and math.isfinite(high)):
            raise InvalidInputError("region features contain NaN or Inf")
        peak = max(-low, high)
        if peak > MAX_FEATURE_ABS:
            raise InvalidInputError(
                f"region features reach |x| = {peak:.3g}, beyond the accepted {MAX_FEATURE_ABS:g} "
                "(PCA-whitened, L2-normalised features lie within 1): not features of this model set"
            )
        return t

    def extract_video(self, path: str | Path, *, max_frames: int | None = None) -> torch.Tensor:
        """Decode a video file and extract its region features [T, R, D]."""
        if self.extractor_factory is None:
            raise InvalidInputError(
                f"model set {self.name!r} has no feature extractor (no backbone in its manifest); "
                "give region features instead of a video file"
            )
        return self.extractor.extract_video(path, fps=self.fps, max_frames=max_frames)


def _manifest_extractor(
    manifest: dict[str, Any], directory: Path, device: torch.device
) -> Callable[[], Any] | None:
    """What builds the manifest's feature extractor (None without a backbone). Its files are
    checked now, so a broken set fails at load, not at its first video."""
    if not manifest.get("backbone"):
        return None
    files = {key: directory / manifest[key] for key in ("pca", "backbone_weights") if manifest.get(key)}
    for key, path in files.items():
        if not path.is_file():
            raise CheckpointError(f"{directory / 'manifest.json'}: its {key!r} file {path} is missing")
    options = manifest.get("extractor_options", {})
    if not isinstance(options, dict):
        raise CheckpointError(f"{directory / 'manifest.json'}: 'extractor_options' must be an object")

    def build() -> Any:
        from dns_milvus.features import FeatureExtractor

        return FeatureExtractor(
            backbone=manifest["backbone"],
            weights=files.get("backbone_weights"),
            pca=files.get("pca"),
            device=device,
            **options,
        )

    return build


_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _state_tag(*nets: torch.nn.Module) -> str:
    """A short content hash of the networks' weights: rows remember which set indexed them."""
    h = hashlib.sha256()
    for net in nets:
        for key, value in sorted(net.state_dict().items()):
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _selector_layers(mlp: nn.Module) -> list[Layer]:
    """The selector MLP's inference layers for ``dns_milvus.inference`` (dropout is the identity)."""
    layers: list[Layer] = []
    for module in mlp.model:
        if isinstance(module, nn.Linear):
            params = {"weight": module.weight} | ({"bias": module.bias} if module.bias is not None else {})
            layers.append(("linear", {k: _array(v) for k, v in params.items()}))
        elif isinstance(module, nn.BatchNorm1d):
            stats = {"running_mean": module.running_mean, "running_var": module.running_var}
            params = {**stats, "weight": module.weight, "bias": module.bias}
            layers.append(
                ("batchnorm", {k: _array(v) for k, v in params.items()} | {"eps": np.float32(module.eps)})
            )
        elif isinstance(module, nn.ReLU | nn.Sigmoid):
            layers.append((type(module).__name__.lower(), {}))
        elif not isinstance(module, nn.Dropout):
            raise CheckpointError(f"the selector has a {type(module).__name__} layer the NumPy stage 2 lacks")
    return layers


def _array(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().float().cpu().numpy())


def write_inference_weights(directory: str | Path, *, name: str = INFERENCE_FILE) -> Path:
    """Add NumPy inference weights to the model set in ``directory``: the selector's MLP and the
    binarization student's video comparator (``dns_milvus.inference``), with the set's tag and the
    SHA-256 of the network files they come from; the manifest names them (``"inference"``).

    A search by an indexed id then runs without torch (``dns_milvus.engine.numpy_set``). Only a
    set with a binarization fine student has them (its fine tensors are packed codes)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    models = ModelSet.load(directory, device="cpu")
    if models.payload_kind != PAYLOAD_PACKED:
        raise InvalidInputError(
            f"model set {directory}: NumPy inference weights need a binarization fine student, "
            f"its fine student stores {models.payload_kind}"
        )
    head = models.fine.visil_head
    path = save_inference_weights(
        directory / name,
        selector=_selector_layers(models.selector.mlp),
        comparator={
            f"{conv}.{p}": _array(getattr(getattr(head, conv), p))
            for conv in COMPARATOR_CONVS
            for p in ("weight", "bias")
        },
        meta={
            "tag": models.tag,
            "coarse_dim": models.coarse_dim,
            "bits": int(models.fine.index_dims),
            "segments": models.selector_segments,
            "sources": network_digests(directory, manifest),
        },
    )
    manifest["inference"] = path.name
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return path
