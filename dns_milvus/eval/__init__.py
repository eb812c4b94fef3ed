"""Evaluation: dataset readers, retrieval metrics, the DnS trade-off curves and their plots.

Plots (matplotlib) and HDF5 features (h5py) import their libraries only when used.
"""

from dns_milvus.eval.datasets import (
    ColumnIndex,
    DenseGroundTruth,
    EvalDataset,
    Task,
    read_cc_web_video,
    read_cc_web_video_pickle,
    read_evve,
    read_evve_pickle,
    read_fivr,
    read_fivr_pickle,
    read_svd,
    read_vcdb,
)
from dns_milvus.eval.errors import (
    DatasetFormatError,
    FeatureFileError,
    FeatureNotFoundError,
    UndefinedMetricError,
)
from dns_milvus.eval.features import H5Features
from dns_milvus.eval.metrics import (
    MeanAP,
    average_precision,
    average_precision_from_scores,
    interpolated_pr_curve,
    mean_average_precision,
    mean_interpolated_pr_curve,
    micro_average_precision,
    micro_average_precision_from_pairs,
    rank_by_score,
    tie_block_average_precision,
    trapezoidal_average_precision,
)
from dns_milvus.eval.tradeoff import PairScores, dns_tradeoff, milvus_protocol, write_table

__all__ = [
    "ColumnIndex",
    "DatasetFormatError",
    "DenseGroundTruth",
    "EvalDataset",
    "FeatureFileError",
    "FeatureNotFoundError",
    "H5Features",
    "MeanAP",
    "PairScores",
    "Task",
    "UndefinedMetricError",
    "average_precision",
    "average_precision_from_scores",
    "dns_tradeoff",
    "interpolated_pr_curve",
    "mean_average_precision",
    "mean_interpolated_pr_curve",
    "micro_average_precision",
    "micro_average_precision_from_pairs",
    "milvus_protocol",
    "rank_by_score",
    "read_cc_web_video",
    "read_cc_web_video_pickle",
    "read_evve",
    "read_evve_pickle",
    "read_fivr",
    "read_fivr_pickle",
    "read_svd",
    "read_vcdb",
    "tie_block_average_precision",
    "trapezoidal_average_precision",
    "write_table",
]

# Scoring with a model set and the copy benchmark load torch and the engine: imported on first use.
_LAZY_EXPORTS = {
    "CostReport": "dns_milvus.eval.run",
    "milvus_candidates": "dns_milvus.eval.run",
    "score_dataset": "dns_milvus.eval.run",
    "write_evaluation": "dns_milvus.eval.run",
    "BenchConfig": "dns_milvus.eval.copybench",
    "CopyBench": "dns_milvus.eval.copybench",
    "build_copy_benchmark": "dns_milvus.eval.copybench",
    "load_copy_benchmark": "dns_milvus.eval.copybench",
    "run_copy_benchmark": "dns_milvus.eval.copybench",
}
__all__ += list(_LAZY_EXPORTS)


def __getattr__(name: str) -> object:
    if name in _LAZY_EXPORTS:
        import importlib

        return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
