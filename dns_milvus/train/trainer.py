"""The training loop every stage shares: epochs of batches, checkpoints, exact resume, summaries.

A stage describes its work as a :class:`TrainingTask` (the network, the batches of an epoch, the
losses of a batch, optional validation); :func:`fit` runs it. After every epoch the checkpoint
``<output>/<name>.pth`` is rewritten atomically (``save_checkpoint``) in the release layout
``{'model', 'args'}``, so ``load_checkpoint`` reads it as it is, plus
what resuming needs (``optimizer``, ``epoch``, ``global_step``, ``rng``, ``history``,
``config``). A run started again with the same settings continues from it and ends with the same
weights as an uninterrupted run: an epoch's batches are drawn from a generator seeded by
``(seed, epoch)``, and torch's global RNG (dropout) is restored from the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dns_milvus.errors import CheckpointError
from dns_milvus.models import save_checkpoint
from dns_milvus.train.config import ConfigError

#: Settings that may change between a run and its resumption without changing the result.
RESUMABLE_CHANGES = frozenset({"epochs", "progress", "resume", "device", "output"})


class TrainingTask:
    """What a stage plugs into :func:`fit`. Subclasses set ``name`` and ``model`` and override
    :meth:`batches` and :meth:`losses`."""

    name: str = "model"
    model: torch.nn.Module

    def release_args(self) -> dict[str, Any]:
        """Release ``args`` besides the network's constructor options (e.g. ``student_type``)."""
        return {}

    def batches(self, epoch: int, rng: np.random.Generator) -> Iterable[Any]:
        """The batches of one epoch; all randomness must come from ``rng``."""
        raise NotImplementedError

    def losses(self, batch: Any) -> dict[str, torch.Tensor]:
        """Losses of one batch; the optimiser minimises ``'loss'``, the others are reported."""
        raise NotImplementedError

    def validate(self) -> dict[str, float]:
        """Metrics after an epoch (e.g. ``{'mAP': ...}``); the model is in eval mode."""
        return {}


@dataclass
class TrainingResult:
    """What :func:`fit` produced: the checkpoint, the summary file and the per-epoch history."""

    checkpoint: Path
    summary: Path
    history: list[dict[str, float]]
    resumed_from_epoch: int = 0
    best: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None: CUDA when available, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def fit(
    task: TrainingTask,
    *,
    output: str | Path,
    epochs: int,
    lr: float,
    seed: int,
    weight_decay: float = 0.0,
    config: Mapping[str, Any] | None = None,
    resume: bool = True,
    progress: bool = True,
    monitor: str | None = None,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> TrainingResult:
    """Train ``task.model`` with Adam for ``epochs`` epochs, resuming from ``output`` if possible.

    ``config`` (the stage's settings) is stored in the checkpoint; resuming with settings that
    differ in anything but ``RESUMABLE_CHANGES`` is refused. A setting the checkpoint predates
    resumes when it holds its value in ``defaults`` (what training did before it existed). With
    ``monitor`` (a metric name from ``task.validate``), the best epoch's weights are also kept in
    ``<name>_best.pth``.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    ckpt_path = output / f"{task.name}.pth"
    model = task.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    config = dict(config or {})
    args = {**task.release_args(), **model.config()}  # what save_checkpoint stores as 'args'

    start_epoch, global_step, history = 0, 0, []
    if resume and ckpt_path.is_file():
        state = _load_training_state(ckpt_path)
        _check_resumable(state, args, config, ckpt_path, defaults or {})
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, global_step = int(state["epoch"]), int(state["global_step"])
        history = list(state["history"])
        _set_rng_state(state["rng"])
    else:
        torch.manual_seed(seed)  # dropout and other torch randomness of a fresh run
    resumed_from = start_epoch

    device = next(model.parameters()).device
    for epoch in range(start_epoch, epochs):
        started = time.perf_counter()
        rng = np.random.default_rng([seed, epoch])
        model.train()
        totals: dict[str, float] = {}
        n_batches = 0
        bar = tqdm(
            task.batches(epoch, rng),
            desc=f"{task.name} {epoch + 1}/{epochs}",
            unit="batch",
            disable=not progress,
            leave=False,
            dynamic_ncols=True,
        )
        for batch in bar:
            optimizer.zero_grad(set_to_none=True)
            losses = task.losses(batch)
            losses["loss"].backward()
            optimizer.step()
            global_step += 1
            n_batches += 1
            for key, value in losses.items():
                totals[key] = totals.get(key, 0.0) + float(value.detach())
            bar.set_postfix(loss=f"{totals['loss'] / n_batches:.4f}")
        if n_batches == 0:
            raise ConfigError(
                f"{task.name}: epoch {epoch + 1} produced no training batch; "
                "the training data is too small for the batch size"
            )
        record = {"epoch": epoch + 1, **{k: v / n_batches for k, v in totals.items()}}
        model.eval()
        with torch.no_grad():
            record.update(task.validate())
        record["seconds"] = round(time.perf_counter() - started, 3)
        history.append(record)
        save_checkpoint(
            model,
            ckpt_path,
            args,
            optimizer=optimizer.state_dict(),
            epoch=epoch + 1,
            global_step=global_step,
            rng=_get_rng_state(device),
            history=history,
            config=_plain(config),
        )
        if monitor is not None and _is_best(history, monitor):
            save_checkpoint(model, output / f"{task.name}_best.pth", args)
        if progress:
            tqdm.write(
                f"{task.name} epoch {epoch + 1}/{epochs}: "
                + ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k not in ("epoch", "seconds"))
            )
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record)

    model.eval()
    best = _best_record(history, monitor) if monitor else {}
    summary = write_summary(
        output / f"{task.name}_summary.json",
        {
            "stage": task.name,
            "epochs": epochs,
            "resumed_from_epoch": resumed_from,
            "seed": seed,
            "checkpoint": ckpt_path.name,
            "final": history[-1] if history else {},
            "best": best,
            "history": history,
            "config": _plain(config),
        },
    )
    return TrainingResult(ckpt_path, summary, history, resumed_from, best)


def fit_stage(
    task: TrainingTask,
    config: Any,
    *,
    output: str | Path,
    monitor: str | None,
    lr: float | None = None,
    settings: Mapping[str, Any] | None = None,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainingResult:
    """:func:`fit` with a training stage's config (``epochs``, ``lr`` unless given, ``seed``,
    ``weight_decay``, ``resume``, ``progress``); ``settings`` (default ``config.to_dict()``) is
    what the checkpoint stores to check resumption against."""
    return fit(
        task,
        output=output,
        epochs=config.epochs,
        lr=config.lr if lr is None else lr,
        seed=config.seed,
        weight_decay=config.weight_decay,
        config=config.to_dict() if settings is None else settings,
        resume=config.resume,
        progress=config.progress,
        monitor=monitor,
        on_epoch_end=on_epoch_end,
        defaults={f.name: f.default for f in fields(config) if f.default is not MISSING},
    )


def write_summary(path: Path, summary: Mapping[str, Any]) -> Path:
    path.write_text(json.dumps(_plain(summary), indent=2, sort_keys=False) + "\n")
    return path


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint safely (tensors, plain containers and ``argparse.Namespace`` only)."""
    return _load_training_state(Path(path))


def _load_training_state(path: Path) -> dict[str, Any]:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise CheckpointError(f"cannot read training checkpoint {path}: {exc}") from exc
    needed = {"model", "args", "optimizer", "epoch", "global_step", "rng", "history"}
    if not isinstance(state, dict) or not needed <= set(state):
        raise CheckpointError(f"{path} is not a training checkpoint: expected the keys {sorted(needed)}")
    return state


def _check_resumable(
    state: Mapping[str, Any],
    args: Mapping[str, Any],
    config: Mapping[str, Any],
    path: Path,
    defaults: Mapping[str, Any],
) -> None:
    if vars(state["args"]) != dict(args):
        raise ConfigError(
            f"{path} holds a network built with other options ({vars(state['args'])}); "
            "use another output directory or set resume = false to start over"
        )
    saved = dict(state.get("config") or {})
    for k in set(config) - set(saved):  # settings added since the checkpoint: their defaults
        if k in defaults:
            saved[k] = _plain(defaults[k])
    changed = sorted(
        k
        for k in set(saved) | set(config)
        if k not in RESUMABLE_CHANGES and saved.get(k) != _plain(config.get(k))
    )
    if changed:
        raise ConfigError(
            f"{path} was trained with other settings ({', '.join(changed)} changed); "
            "use another output directory or set resume = false to start over"
        )


def _get_rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state_to_plain(np.random.get_state()),
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(_numpy_state_from_plain(state["numpy"]))
    random.setstate(_python_state(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _numpy_state_to_plain(state: tuple) -> list:
    # weights_only loading accepts tensors and plain containers, not numpy arrays
    name, keys, pos, has_gauss, cached = state
    return [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)]


def _numpy_state_from_plain(state: list) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)


def _python_state(state: Any) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def _is_best(history: list[dict[str, float]], metric: str) -> bool:
    values = [h[metric] for h in history if metric in h]
    return bool(values) and metric in history[-1] and history[-1][metric] >= max(values)


def _best_record(history: list[dict[str, float]], metric: str) -> dict[str, Any]:
    scored = [h for h in history if metric in h]
    return max(scored, key=lambda h: h[metric]) if scored else {}


def _plain(value: Any) -> Any:
    """JSON-friendly copy of configs and summaries (paths as strings, tuples as lists)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value
