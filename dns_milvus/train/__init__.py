"""Training of the DnS networks: PCA, ITQ, the ViSiL teacher, pair mining, students, selector.

Every stage runs through ``run_stage(name, config)`` (the command line's ``dns-milvus train``):
the config is validated before any work, training is seeded and resumable, and each stage writes
release-layout checkpoints and a JSON summary into its output directory. ``build_default_model_set``
trains the offline default model set end to end.
"""

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
from dns_milvus.train.model_set import ModelSetPaths, Recipe, build_default_model_set
from dns_milvus.train.stages import STAGES, StageResult, run_stage

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
