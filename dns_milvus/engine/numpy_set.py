"""A model set's stage 2 without torch: what a search by an indexed id needs of the set.

A set whose manifest names NumPy inference weights (``"inference"``, written by
``dns_milvus.engine.modelset.write_inference_weights``) can run the selector and the binarization
student's comparison in NumPy (``dns_milvus.inference``). ``DnSIndex`` opened from such a set's
directory on the CPU uses them, and loads the torch networks only when something must be indexed
(a video, features, ingestion). The weights record the SHA-256 of the network files they were
written from: a set whose files changed since is served by torch, never by stale weights.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dns_milvus.engine.manifest import MANIFEST, NETWORK_ENTRIES, manifest_merge, read_manifest
from dns_milvus.engine.record import PAYLOAD_PACKED
from dns_milvus.errors import CheckpointError, DeadlineExceededError, InvalidInputError
from dns_milvus.inference import NumpyStage2
from dns_milvus.scoring import ScoreMerge

if TYPE_CHECKING:
    from dns_milvus.engine.modelset import ModelSet

log = logging.getLogger(__name__)

#: Present where an NVIDIA driver is loaded: "auto" would pick CUDA, so the torch networks run.
NVIDIA_DRIVER = Path("/proc/driver/nvidia/version")
#: Frame pairs (query frames x target frames) of fine work that NumPy takes on; beyond it the torch
#: networks score. NumPy takes ~2 us a frame pair on a 2-core CPU, torch ~0.35 us once its
#: 1.4 s import is paid: this much NumPy work costs about as much as that import.
NUMPY_MAX_FRAME_PAIRS = 2**19


def file_digest(path: Path) -> str:
    """SHA-256 of a network file: ties the NumPy weights to the files they were written from."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def network_digests(directory: Path, manifest: dict) -> dict[str, dict[str, str]]:
    """For each network of the set: its file's name and SHA-256."""
    return {
        entry: {"file": manifest[entry], "sha256": file_digest(directory / manifest[entry])}
        for entry in NETWORK_ENTRIES
    }


@dataclass
class NumpyModelSet:
    """What stage 2 uses of a ``ModelSet`` (its name, tag, merge, payload), with NumPy networks."""

    directory: Path
    name: str
    tag: str
    coarse_dim: int
    merge: ScoreMerge
    networks: NumpyStage2
    #: The device asked for the torch networks, when they are needed (``torch_models``).
    torch_device: str | None = None
    payload_kind: str = PAYLOAD_PACKED
    device: str = "cpu"
    _torch: ModelSet | None = field(default=None, init=False, repr=False, compare=False)
    _torch_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    @classmethod
    def load(cls, directory: str | Path, device: str | None = None) -> NumpyModelSet | None:
        """The set's NumPy stage 2, or None where the torch networks must run: the set has no
        NumPy weights, they were written from other network files, or ``device`` is not the CPU
        (``None``/``"auto"`` on a machine with an NVIDIA driver picks CUDA)."""
        directory = Path(directory)
        manifest = read_manifest(directory)
        if not _serves(manifest, device):
            return None
        path = directory / manifest["inference"]
        try:
            networks = NumpyStage2.load(path)
            fresh = networks.meta.get("sources") == network_digests(directory, manifest)
            tag, coarse_dim = str(networks.meta["tag"]), int(networks.meta["coarse_dim"])
        except (CheckpointError, OSError, KeyError, TypeError, ValueError) as exc:
            log.warning("model set %s: its NumPy inference weights are not used (%r)", directory, exc)
            return None
        if not fresh:
            log.warning(
                "model set %s: %s was written from other network files than those of its manifest; the "
                "torch networks run (write it again with dns_milvus.engine.modelset.write_inference_weights)",
                directory,
                path.name,
            )
            return None
        return cls(
            directory=directory,
            name=manifest.get("name", directory.name),
            tag=tag,
            coarse_dim=coarse_dim,
            merge=manifest_merge(manifest, directory / MANIFEST),
            networks=networks,
            torch_device=device,
        )

    @staticmethod
    def serves(directory: str | Path, device: str | None = None) -> bool:
        """Whether ``load`` would try the set's NumPy weights (they have yet to prove fresh)."""
        return _serves(read_manifest(directory), device)

    def torch_models(self) -> ModelSet:
        """The set's torch networks, loaded on first use (importing torch): what indexing needs."""
        if self._torch is None:
            with self._torch_lock:  # two threads' first videos load it once
                if self._torch is None:
                    from dns_milvus.engine.modelset import ModelSet

                    self._torch = ModelSet.load(self.directory, device=self.torch_device)
        return self._torch

    def check_fine_options(self, precision: str, threads: int | None) -> None:
        """The fine scorers' options this set can honour: float32 arithmetic (NumPy's threads are
        its BLAS library's)."""
        if precision != "float32":
            raise InvalidInputError(
                f"the NumPy stage 2 of model set {self.name!r} computes in float32, not {precision!r}: "
                "load the torch networks (ModelSet.load) for another precision"
            )
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise InvalidInputError(f"threads must be a positive integer or None, got {threads!r}")

    @property
    def selector_segments(self) -> int:
        return self.networks.segments

    def selector_confidence(
        self,
        query_self_sim: float,
        self_sims: np.ndarray,
        coarse_scores: np.ndarray,
        segment_match: np.ndarray | None = None,
    ) -> np.ndarray:
        return self.networks.selector_confidence(query_self_sim, self_sims, coarse_scores, segment_match)

    def fine_similarity(
        self,
        query: np.ndarray,
        targets: Sequence[np.ndarray],
        *,
        deadline: float | None = None,
        precision: str = "float32",
        threads: int | None = None,
    ) -> np.ndarray:
        """Raw fine-student similarities (in [-1, 1]) of packed codes; ``precision`` and
        ``threads`` as ``check_fine_options`` accepts them. Work beyond ``NUMPY_MAX_FRAME_PAIRS``
        goes to the torch networks, which are loaded for it."""
        frame_pairs = int(np.shape(query)[0]) * sum(int(np.shape(t)[0]) for t in targets)
        if frame_pairs > NUMPY_MAX_FRAME_PAIRS:
            return self.torch_models().fine_similarity(
                query, targets, deadline=deadline, precision=precision, threads=threads
            )
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlineExceededError("deadline exceeded before fine-grained scoring; nothing was scored")
        return self.networks.fine_similarity_packed(query, targets)


def _serves(manifest: dict, device: str | None) -> bool:
    """A set's NumPy weights serve where it names them and stage 2 runs on the CPU."""
    on_cpu = device == "cpu" or (device in (None, "auto") and not NVIDIA_DRIVER.exists())
    return on_cpu and bool(manifest.get("inference"))


def open_model_set(directory: str | Path, device: str | None = None) -> NumpyModelSet | ModelSet:
    """The model set in ``directory`` as a search uses it: its NumPy stage 2 where that serves
    (``NumpyModelSet.load``; the torch networks then load on first need), else its torch networks."""
    numpy_set = NumpyModelSet.load(directory, device)
    if numpy_set is not None:
        return numpy_set
    from dns_milvus.engine.modelset import ModelSet

    return ModelSet.load(directory, device=device)
