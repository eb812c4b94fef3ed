"""Training of the DnS networks: PCA, ITQ, the ViSiL teacher, pair mining, students, selector.

Every stage runs through ``run_stage(name, config)`` (the command line's ``dns-milvus train``):
the config is validated before any work, training is seeded and resumable, and each stage writes
release-layout checkpoints and a JSON summary into its output directory. ``build_default_model_set``
trains the offline default model set end to end.
"""

from typing import TYPE_CHECKING, Any

from dns_milvus.train.config import (
    STAGE_CONFIGS,
    ConfigError,
    ITQConfig,
    MiningConfig,
    PCAConfig,
    SelectorConfig,
    StageConfig,
    StudentsConfig,
    TeacherConfig,
    ValidationConfig,
    load_config,
)
from dns_milvus.train.stages import STAGES, StageResult, run_stage

if TYPE_CHECKING:
    from dns_milvus.train.model_set import ModelSetPaths, Recipe, build_default_model_set

_MODEL_SET_NAMES = ("ModelSetPaths", "Recipe", "build_default_model_set")


def __getattr__(name: str) -> Any:
    # Imported on first use: ``python -m dns_milvus.train.model_set`` must not find the module
    # already imported by its package (runpy warns, and the module would exist twice).
    if name in _MODEL_SET_NAMES:
        from dns_milvus.train import model_set

        return getattr(model_set, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "STAGES",
    "STAGE_CONFIGS",
    "ConfigError",
    "ITQConfig",
    "MiningConfig",
    "ModelSetPaths",
    "PCAConfig",
    "Recipe",
    "SelectorConfig",
    "StageConfig",
    "StageResult",
    "StudentsConfig",
    "TeacherConfig",
    "ValidationConfig",
    "build_default_model_set",
    "load_config",
    "run_stage",
]
