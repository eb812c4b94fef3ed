"""PNG plots of evaluation results (matplotlib, imported on first use, Agg canvas, no global state).

- :func:`plot_tradeoff`: mAP against the percentage re-ranked, one line per selection method
  (the form of the DnS paper's selector comparison figure);
- :func:`plot_pr_curves`: interpolated precision-recall curves;
- :func:`plot_map_vs_k`: mAP against the number of ANN candidates K (the Milvus protocol).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dns_milvus.errors import InvalidInputError


def plot_tradeoff(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    task: str | None = None,
    title: str | None = None,
) -> Path:
    """Rows of :func:`dns_tradeoff` -> PNG of mAP vs percentage re-ranked, one line per method."""
    task = _single_task(rows, task)
    figure, axes = _figure()
    for method, points in _series(rows, task, "method", "percentage").items():
        axes.plot(*zip(*points, strict=True), marker="o", markersize=3, label=method)
    axes.set_xlabel("videos re-ranked by the fine-grained student (%)")
    axes.set_ylabel(f"mAP ({task})")
    return _save(figure, axes, path, title)


def plot_map_vs_k(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    task: str | None = None,
    title: str | None = None,
) -> Path:
    """Rows of :func:`milvus_protocol` -> PNG of mAP vs K, one line per method and percentage."""
    task = _single_task(rows, task)
    figure, axes = _figure()
    labelled = [{**row, "series": f"{row['method']}, {row['percentage']:g}%"} for row in rows]
    for series, points in _series(labelled, task, "series", "k").items():
        axes.plot(*zip(*points, strict=True), marker="o", markersize=3, label=series)
    if len({row["k"] for row in rows}) > 1 and min(row["k"] for row in rows) > 0:
        axes.set_xscale("log")
    axes.set_xlabel("ANN candidates K")
    axes.set_ylabel(f"mAP ({task})")
    return _save(figure, axes, path, title)


def plot_pr_curves(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
) -> Path:
    """``{label: (recall, precision)}`` (e.g. from :func:`mean_interpolated_pr_curve`) -> PNG."""
    if not curves:
        raise InvalidInputError("no PR curve to plot")
    figure, axes = _figure()
    for label, (recall, precision) in curves.items():
        recall, precision = np.asarray(recall), np.asarray(precision)
        if recall.shape != precision.shape or recall.ndim != 1:
            raise InvalidInputError(f"curve {label!r}: expected 1-D recall and precision of equal length")
        axes.plot(recall, precision, marker="o", markersize=3, label=label)
    axes.set_xlim(0.0, 1.0)
    axes.set_ylim(0.0, 1.05)
    axes.set_xlabel("recall")
    axes.set_ylabel("precision")
    return _save(figure, axes, path, title)


def _figure() -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    axes.grid(True, linestyle=":")
    return figure, axes


def _save(figure: Any, axes: Any, path: str | os.PathLike[str], title: str | None) -> Path:
    if title:
        axes.set_title(title)
    axes.legend(loc="best", fontsize="small")
    figure.tight_layout()
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise InvalidInputError(f"plots are written as PNG; got {path.name}")
    figure.savefig(path, format="png")
    return path


def _single_task(rows: Sequence[Mapping[str, Any]], task: str | None) -> str:
    if not rows:
        raise InvalidInputError("no rows to plot")
    tasks = sorted({row["task"] for row in rows})
    if task is None:
        if len(tasks) != 1:
            raise InvalidInputError(f"rows hold tasks {tasks}; name the one to plot")
        return tasks[0]
    if task not in tasks:
        raise InvalidInputError(f"no rows for task {task!r}; rows hold {tasks}")
    return task


def _series(
    rows: Sequence[Mapping[str, Any]], task: str, label_key: str, x_key: str
) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if row["task"] == task:
            series.setdefault(str(row[label_key]), []).append((float(row[x_key]), float(row["mAP"])))
    return {label: sorted(points) for label, points in series.items()}
