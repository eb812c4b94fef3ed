"""Stage configurations: one dataclass per training stage, read from JSON or TOML and checked up front.

Every stage's config is validated before any long work starts: unknown or mistyped keys, values
out of range, and missing input files all raise ``ConfigError`` naming the key and what it expects.
Paths inside a config file are resolved relative to that file's directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from dns_milvus.errors import InvalidInputError
from dns_milvus.scoring import SELECTOR_TARGETS


class ConfigError(InvalidInputError):
    """A training configuration that is malformed, out of range, or names missing data."""


StudentKind = Literal["coarse", "fine_attention", "fine_binarization"]
STUDENT_KINDS: tuple[str, ...] = typing.get_args(StudentKind)


@dataclass
class StageConfig:
    """Settings every stage shares."""

    output: str = "runs/stage"  # directory the stage writes its files into
    seed: int = 0
    device: str = "auto"  # "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
    progress: bool = True  # tqdm progress bars
    resume: bool = True  # continue from the checkpoint in `output` if there is one

    #: Config keys holding paths of inputs that must exist before the stage starts.
    _input_paths: typing.ClassVar[tuple[str, ...]] = ()
    #: Config keys holding paths (resolved relative to the config file, need not exist).
    _path_keys: typing.ClassVar[tuple[str, ...]] = ("output",)

    def validate(self) -> None:
        """Raise ``ConfigError`` if a value is out of range or an input file is missing."""
        for key in self._input_paths:
            value = getattr(self, key)
            if value is not None and not Path(value).exists():
                raise ConfigError(f"{self.stage_name()}.{key}: {value} does not exist")
        if not self.device or not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ConfigError(
                f"{self.stage_name()}.device: expected 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}"
            )

    @classmethod
    def stage_name(cls) -> str:
        return next((k for k, v in STAGE_CONFIGS.items() if v is cls), cls.__name__)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def _positive(self, *keys: str, allow_zero: bool = False) -> None:
        for key in keys:
            value = getattr(self, key)
            if value is None:
                continue
            bad = value < 0 if allow_zero else value <= 0
            if bad or (isinstance(value, float) and not math.isfinite(value)):
                kind = "non-negative" if allow_zero else "positive"
                raise ConfigError(f"{self.stage_name()}.{key}: expected a {kind} number, got {value}")


@dataclass
class ValidationConfig:
    """A labelled set scored by mean average precision after each epoch.

    ``ground_truth`` is a JSON file: ``{query id: [relevant ids]}``, or the FIVR form
    ``{query id: {"ND": [...], "DS": [...], ...}}`` (then ``labels`` picks the relevant ones).
    ``database`` defaults to every video of ``features``.
    """

    features: str = ""
    ground_truth: str = ""
    labels: list[str] = field(default_factory=lambda: ["ND", "DS"])
    database: list[str] | None = None

    _path_keys: typing.ClassVar[tuple[str, ...]] = ("features", "ground_truth")


@dataclass
class PCAConfig(StageConfig):
    """PCA-whitening fitted on sampled raw (un-whitened) backbone region vectors."""

    features: str | None = None  # raw backbone region features (HDF5 / npz / npy dir)
    videos: list[str] | None = None  # or video files (or directories of them) to decode
    backbone: str = "efficientnet-lite0"
    backbone_weights: str | None = None
    fps: float = 1.0
    dims: int = 512
    max_vectors: int = 1_000_000
    max_frames: int | None = 300

    _input_paths = ("features", "backbone_weights")
    _path_keys = ("output", "features", "videos", "backbone_weights")

    def validate(self) -> None:
        super().validate()
        if (self.features is None) == (self.videos is None):
            raise ConfigError("pca: give exactly one of 'features' (raw region features) or 'videos'")
        if self.videos is not None:
            _check_videos(self.videos, "pca.videos")
        self._positive("dims", "max_vectors", "fps", "max_frames")


@dataclass
class ITQConfig(StageConfig):
    """ITQ projection of the binarization layer, fitted on sampled whitened region vectors."""

    features: str = ""
    bits: int | None = None  # default: the feature dimension
    max_vectors: int = 1_000_000
    n_iter: int = 50

    _input_paths = ("features",)
    _path_keys = ("output", "features")

    def validate(self) -> None:
        super().validate()
        _require(self, "features")
        self._positive("bits", "max_vectors")
        self._positive("n_iter", allow_zero=True)


@dataclass
class TeacherConfig(StageConfig):
    """The ViSiL teacher, trained with triplets (paper 4.3: 2000 triplets/epoch, 200 epochs, batch 4).

    Labelled mode: ``features`` + ``groups`` (copy groups; every other video is a negative).
    Self-supervised mode: ``videos`` (+ ``pca``): each video and ``copies_per_video`` transformed
    copies of it form a group; features are extracted once and cached in ``output``.
    """

    features: str | None = None
    groups: str | None = None
    videos: list[str] | None = None
    pca: str | None = None
    backbone: str = "efficientnet-lite0"
    backbone_weights: str | None = None
    fps: float = 1.0
    max_frames: int | None = 120
    copies_per_video: int = 3
    transform_ops: int = 2
    epochs: int = 200
    triplets_per_epoch: int = 2000
    batch_size: int = 4
    lr: float = 1e-5
    weight_decay: float = 0.0
    margin: float = 0.5
    reg_weight: float = 0.1  # r: weight of the similarity regularisation loss
    window: int = 64  # W: frames of each training snippet
    # Hard negatives: JSON {video id: scene id}; this share of triplets takes its negative from the
    # anchor's scene (another segment of the same clip) when the scene has one outside the group.
    scenes: str | None = None
    hard_negative_rate: float = 0.0
    validation: ValidationConfig | None = None

    _input_paths = ("features", "groups", "pca", "backbone_weights", "scenes")
    _path_keys = ("output", "features", "groups", "videos", "pca", "backbone_weights", "scenes")

    @property
    def self_supervised(self) -> bool:
        return self.videos is not None

    def validate(self) -> None:
        super().validate()
        if self.self_supervised:
            if self.features is not None or self.groups is not None:
                raise ConfigError(
                    "teacher: give either 'videos' (self-supervised) or 'features' + 'groups' "
                    "(labelled), not both"
                )
            _check_videos(self.videos, "teacher.videos")
        elif self.features is None or self.groups is None:
            raise ConfigError(
                "teacher: labelled training needs 'features' and 'groups'; self-supervised "
                "training needs 'videos'"
            )
        self._positive(
            "epochs",
            "triplets_per_epoch",
            "batch_size",
            "lr",
            "window",
            "fps",
            "max_frames",
            "copies_per_video",
        )
        self._positive("weight_decay", "margin", "reg_weight", "transform_ops", allow_zero=True)
        if not 0.0 <= self.hard_negative_rate <= 1.0:
            raise ConfigError(f"teacher.hard_negative_rate must lie in [0, 1], got {self.hard_negative_rate}")
        _check_validation(self.validation, "teacher")


@dataclass
class MiningConfig(StageConfig):
    """Teacher similarities of all corpus pairs, then the paper's cluster-based pair mining."""

    features: str = ""
    teacher: str = ""  # checkpoint of the teacher (or of a trained student, for iterative distillation)
    threshold: float = 0.5  # edges of the video graph: teacher similarity above this
    negatives_per_kind: int = 50  # most similar of other clusters, and of no cluster
    chunk_size: int = 16  # videos per block of the all-pairs computation
    max_frames: int | None = None

    _input_paths = ("features", "teacher")
    _path_keys = ("output", "features", "teacher")

    def validate(self) -> None:
        super().validate()
        _require(self, "features", "teacher")
        self._positive("negatives_per_kind", "chunk_size", "max_frames")
        if not math.isfinite(self.threshold):
            raise ConfigError(f"mine.threshold: expected a finite similarity, got {self.threshold}")


@dataclass
class StudentsConfig(StageConfig):
    """Students distilled from the mined pairs (paper 4.3: batch 64 pairs, 300 epochs, Adam).

    ``iterations`` > 1 runs iterative distillation: after each round the ``next_teacher`` student
    re-scores the pairs and the students of the next round learn from it.
    """

    features: str = ""
    pairs: str = ""  # the mining stage's output file
    students: list[str] = field(default_factory=lambda: ["coarse", "fine_attention", "fine_binarization"])
    epochs: int = 300
    batch_size: int = 64  # pairs: half positive, half negative
    lr_coarse: float = 1e-5
    lr_fine: float = 1e-4
    weight_decay: float = 0.0
    reg_weight: float = 1e-3
    augmentation: bool = True
    augmentation_p: float = 0.1
    max_frames: int = 300
    itq: str | None = None  # ITQ file for the binarization layer; None: fitted here
    itq_vectors: int = 1_000_000
    bits: int | None = None
    binarization_sigma: float = 1e-6
    iterations: int = 1
    next_teacher: str = "fine_attention"
    # coarse-student architecture and size (release defaults)
    coarse_transformer: bool = True
    coarse_netvlad: bool = True
    transformer_heads: int = 8
    transformer_feedforward_dims: int = 2048
    transformer_layers: int = 1
    netvlad_clusters: int = 64
    netvlad_outdims: int | None = 1024  # None: no reduction layer (clusters x dims outputs)
    validation: ValidationConfig | None = None
    # Dual learning (DL-DKD): label_weight > 0 adds an exploration loss on the copy groups' labels
    # and decays the distillation weight from 1 to distill_floor over the epochs.
    groups: str | None = None  # copy groups (as the teacher's `groups`): group mates are copies
    label_weight: float = 0.0  # 0: pure distillation
    label_positive: float = 0.5  # copies are pulled above this similarity (teacher's [-1, 1] scale)
    label_negative: float = 0.0  # non-copies are pushed below this similarity (teacher's [-1, 1] scale)
    label_mates: bool = False  # each triplet's anchor also meets a group mate (a labelled copy)
    distill_decay: Literal["linear", "cosine"] = "linear"
    distill_floor: float = 0.05  # distillation weight of the last epoch

    _input_paths = ("features", "pairs", "itq", "groups")
    _path_keys = ("output", "features", "pairs", "itq", "groups")

    @property
    def dual(self) -> bool:
        """Whether the students learn the copy labels besides the teacher (dual learning)."""
        return self.label_weight > 0

    def validate(self) -> None:
        super().validate()
        _require(self, "features", "pairs")
        unknown = [s for s in self.students if s not in STUDENT_KINDS]
        if unknown or not self.students:
            raise ConfigError(
                f"students.students: expected a non-empty list of {list(STUDENT_KINDS)}, got {self.students}"
            )
        if len(set(self.students)) != len(self.students):
            raise ConfigError(f"students.students: {self.students} names a student twice")
        if self.iterations > 1 and self.next_teacher not in self.students:
            raise ConfigError(
                f"students.next_teacher: {self.next_teacher!r} must be one of the trained "
                f"students {self.students} when iterations > 1"
            )
        if self.next_teacher == "coarse":
            raise ConfigError("students.next_teacher: the next teacher must be a fine-grained student")
        self._positive(
            "epochs",
            "batch_size",
            "lr_coarse",
            "lr_fine",
            "max_frames",
            "itq_vectors",
            "bits",
            "binarization_sigma",
            "iterations",
            "transformer_heads",
            "transformer_feedforward_dims",
            "transformer_layers",
            "netvlad_clusters",
            "netvlad_outdims",
        )
        self._positive("weight_decay", "reg_weight", "label_weight", allow_zero=True)
        if self.dual and not self.groups:
            raise ConfigError("students.label_weight > 0 needs students.groups (the copy groups' labels)")
        if self.groups and not self.dual:
            raise ConfigError(
                "students.groups is only read by dual learning: set students.label_weight > 0 or drop groups"
            )
        if not 0 <= self.distill_floor <= 1:
            raise ConfigError(
                f"students.distill_floor: expected a weight in [0, 1], got {self.distill_floor}"
            )
        if not -1 <= self.label_negative < self.label_positive <= 1:
            raise ConfigError(
                "students.label_negative < students.label_positive: expected two similarities "
                f"-1 <= negative < positive <= 1, got {self.label_negative} and {self.label_positive}"
            )
        if not 0 <= self.augmentation_p <= 1 / 3:
            raise ConfigError(
                f"students.augmentation_p: expected 0..1/3 (three augmentations), got {self.augmentation_p}"
            )
        if self.batch_size < 2 or self.batch_size % 2:
            raise ConfigError(
                f"students.batch_size: expected an even number >= 2 of pairs, got {self.batch_size}"
            )
        _check_validation(self.validation, "students")


@dataclass
class SelectorConfig(StageConfig):
    """The selector (paper 4.3: batch 64, 100 epochs, 5000 pairs a class an epoch, Adam 1e-4)."""

    features: str = ""
    pairs: str = ""  # the mining stage's output file: the pairs to label
    coarse: str = ""  # trained coarse student checkpoint
    fine: str = ""  # trained fine student checkpoint
    threshold: float = 0.2  # label 1 where the target exceeds it (merged scale)
    # "disagreement": how far the fine score moves the pair (paper); "copy": its higher merged score
    target: str = "disagreement"
    merge: str | None = None  # JSON of the model set's score merge (dns_milvus.scoring); None: release
    epochs: int = 100
    batch_size: int = 64
    pairs_per_class: int = 5000
    lr: float = 1e-4
    weight_decay: float = 0.0
    hidden_size: int = 100
    # > 0: a fourth input, the match of the query with the best of the target's segments
    # (SelectorNetwork(segments=...)); 0: the release's three inputs
    segments: int = 0
    val_fraction: float = 0.03
    max_frames: int = 300

    _input_paths = ("features", "pairs", "coarse", "fine", "merge")
    _path_keys = ("output", "features", "pairs", "coarse", "fine", "merge")

    def validate(self) -> None:
        super().validate()
        _require(self, "features", "pairs", "coarse", "fine")
        self._positive("epochs", "batch_size", "pairs_per_class", "lr", "hidden_size", "max_frames")
        self._positive("weight_decay", "segments", allow_zero=True)
        if not 0 < self.threshold < 1:
            raise ConfigError(f"selector.threshold: expected a merged score in (0, 1), got {self.threshold}")
        if self.target not in SELECTOR_TARGETS:
            raise ConfigError(
                f"selector.target: expected one of {list(SELECTOR_TARGETS)}, got {self.target!r}"
            )
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"selector.val_fraction: expected 0 <= fraction < 1, got {self.val_fraction}")


STAGE_CONFIGS: dict[str, type[StageConfig]] = {
    "pca": PCAConfig,
    "itq": ITQConfig,
    "teacher": TeacherConfig,
    "mine": MiningConfig,
    "students": StudentsConfig,
    "selector": SelectorConfig,
}


def load_config(stage: str, source: StageConfig | Mapping[str, Any] | str | Path) -> StageConfig:
    """Build and validate the config of ``stage`` from a dataclass, a mapping, or a JSON/TOML file.

    A file may hold the stage's keys at the top level or under a ``[stage]`` table / ``"stage"`` key.
    """
    if stage not in STAGE_CONFIGS:
        raise ConfigError(f"unknown training stage {stage!r}; expected one of {list(STAGE_CONFIGS)}")
    cls = STAGE_CONFIGS[stage]
    if isinstance(source, StageConfig):
        if not isinstance(source, cls):
            raise ConfigError(f"stage {stage!r} expects a {cls.__name__}, got {type(source).__name__}")
        source.validate()
        return source
    base: Path | None = None
    if isinstance(source, (str, Path)):
        path = Path(source)
        data = _read_config_file(path)
        base = path.parent
        if isinstance(data.get(stage), Mapping):
            data = data[stage]
    elif isinstance(source, Mapping):
        data = dict(source)
    else:
        raise ConfigError(
            f"a config must be a {cls.__name__}, a mapping or a file path, got {type(source).__name__}"
        )
    config = _build(cls, data, stage, base)
    config.validate()
    return config


def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix == ".toml":
            data = _toml_loads(text)
        else:
            raise ConfigError(f"config file {path}: expected a .json or .toml file")
    except (json.JSONDecodeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"config file {path} cannot be parsed: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table/object of settings")
    return data


def _toml_loads(text: str) -> dict[str, Any]:
    try:
        import tomllib  # Python >= 3.11
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise ConfigError(
                "TOML configs need Python >= 3.11 or the 'tomli' package; use a JSON config instead"
            ) from None
    return tomllib.loads(text)


def _build(cls: type, data: Mapping[str, Any], where: str, base: Path | None) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {unknown}; known settings are {sorted(fields)}")
    kwargs = {}
    path_keys = getattr(cls, "_path_keys", ())
    for key, value in data.items():
        value = _coerce(value, hints[key], f"{where}.{key}", base)
        if key in path_keys and base is not None and value is not None:
            value = [str(base / v) for v in value] if isinstance(value, list) else str(base / value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _coerce(value: Any, hint: Any, where: str, base: Path | None) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(value, option, where, base)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(
            errors[0]
            if len(errors) == 1
            else f"{where}: {value!r} matches none of {[getattr(o, '__name__', str(o)) for o in options]}"
        )
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return [_coerce(v, args[0], f"{where}[{i}]", base) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table of settings, got {type(value).__name__}")
        return _build(hint, value, where, base)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, Path):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _require(config: StageConfig, *keys: str) -> None:
    for key in keys:
        if not getattr(config, key):
            raise ConfigError(f"{config.stage_name()}.{key} is required")


def _check_videos(videos: list[str] | None, where: str) -> None:
    if not videos:
        raise ConfigError(f"{where}: expected a non-empty list of video files or directories")
    missing = [v for v in videos if not Path(v).exists()]
    if missing:
        raise ConfigError(f"{where}: {missing} do not exist")


def _check_validation(validation: ValidationConfig | None, stage: str) -> None:
    if validation is None:
        return
    for key in ("features", "ground_truth"):
        value = getattr(validation, key)
        if not value or not Path(value).exists():
            raise ConfigError(f"{stage}.validation.{key}: {value or '(empty)'} does not exist")
