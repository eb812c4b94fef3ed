"""Reading and writing network checkpoints in the layout of the DnS release.

A checkpoint is a torch file holding ``{'model': state_dict, 'args': argparse.Namespace, ...}``
(a bare state_dict is accepted too). Files are read with ``torch.load(weights_only=True)``,
allow-listing only ``argparse.Namespace``, so a file can never run code on load. The kind of
network and its constructor options (sizes, bits, layers, clusters) are read off the
state_dict's keys and shapes; ``args`` only supplies what shapes cannot tell (the number of
attention heads, the input size of a plain fine-grained student).
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dns_milvus.errors import CheckpointError, InvalidInputError
from dns_milvus.models.selector import SelectorNetwork
from dns_milvus.models.students import CoarseGrainedStudent, FineGrainedStudent
from dns_milvus.models.teacher import TeacherEnsemble, ViSiLTeacher

#: Network kinds and how messages name them.
KIND_DESCRIPTIONS: dict[str, str] = {
    "cg_student": "coarse-grained student",
    "fg_att_student": "fine-grained attention student",
    "fg_bin_student": "fine-grained binarization student",
    "fg_student": "fine-grained student without attention or binarization",
    "selector": "selector network",
    "teacher": "ViSiL teacher",
    "teacher_ensemble": "ensemble of ViSiL teachers",
}
NETWORK_KINDS = tuple(KIND_DESCRIPTIONS)

_CLASS_KINDS: dict[type, tuple[str, ...]] = {
    CoarseGrainedStudent: ("cg_student",),
    FineGrainedStudent: ("fg_att_student", "fg_bin_student", "fg_student"),
    SelectorNetwork: ("selector",),
    ViSiLTeacher: ("teacher",),
    TeacherEnsemble: ("teacher_ensemble",),
}

Expected = str | type | tuple[str | type, ...] | list[str | type] | None

# Values (besides tensors and containers) the weights-only unpickler can rebuild.
_PLAIN_TYPES = str | int | float | bool | None


def network_kind(state_dict: Mapping[str, Any]) -> str:
    """The kind of network a state_dict belongs to: one of :data:`NETWORK_KINDS`.

    Raises ``CheckpointError`` for a layout of none of them.
    """
    keys = set(_strip_wrapper_prefix(state_dict))
    modules = {k.split(".", 1)[0] for k in keys}
    if "mlp" in modules:
        return "selector"
    if modules == {"members"} and "members.0.attention.context_vector.weight" in keys:
        return "teacher_ensemble"
    if "binarization.W" in keys:
        return "fg_bin_student"
    if modules & {"netvlad", "transformer"}:
        return "cg_student"
    if "visil_head" in modules:
        if "attention.transform.weight" in keys:
            return "fg_att_student"
        if "attention.context_vector.weight" in keys:
            return "teacher"
        if "attention" not in modules:
            return "fg_student"
    elif modules == {"attention"} and "attention.transform.weight" in keys:
        return "cg_student"  # a coarse student built with attention only
    shown = ", ".join(sorted(keys)[:6]) + (" ..." if len(keys) > 6 else "")
    raise CheckpointError(
        f"unknown network layout: expected the keys of a DnS network ({', '.join(NETWORK_KINDS)}), "
        f"got {{{shown}}}"
    )


def _strip_wrapper_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the ``module.`` prefix that ``nn.DataParallel`` adds to every key."""
    if state_dict and all(isinstance(k, str) and k.startswith("module.") for k in state_dict):
        return {k[len("module.") :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _checked_state_dict(state_dict: Mapping[Any, Any]) -> dict[str, Tensor]:
    """The state_dict without a wrapper prefix, if it maps names to tensors."""
    bad = [k for k, v in state_dict.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad or not state_dict:
        raise CheckpointError(
            "expected a state_dict mapping parameter names to tensors"
            + (f"; entries {bad[:3]} are not tensors" if bad else ", got an empty mapping")
        )
    return _strip_wrapper_prefix(state_dict)


def _arg(args: Mapping[str, Any], name: str, default: Any) -> Any:
    value = args.get(name)
    return default if value is None else value


def _infer_options(kind: str, sd: Mapping[str, Tensor], args: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor options of a network of ``kind`` from its state_dict shapes."""
    if kind == "cg_student":
        dims = next(
            sd[k].shape[-1]
            for k in ("attention.transform.weight", "transformer.norm.weight", "netvlad.centroids")
            if k in sd
        )
        layer_ids = {int(m.group(1)) for k in sd if (m := re.match(r"transformer\.layers\.(\d+)\.", k))}
        options: dict[str, Any] = {
            "dims": int(dims),
            "attention": "attention.transform.weight" in sd,
            "transformer": bool(layer_ids),
            "netvlad": "netvlad.centroids" in sd,
        }
        if layer_ids:
            heads = int(_arg(args, "transformer_heads", 8))
            if dims % heads:
                raise CheckpointError(f"{heads} attention heads do not divide the feature size {dims}")
            options.update(
                transformer_layers=len(layer_ids),
                transformer_heads=heads,
                transformer_feedforward_dims=int(sd["transformer.layers.0.linear1.weight"].shape[0]),
            )
        if "netvlad.centroids" in sd:
            reduction = sd.get("netvlad.reduction_layer.weight")
            options.update(
                netvlad_clusters=int(sd["netvlad.centroids"].shape[0]),
                netvlad_outdims=int(reduction.shape[0]) if reduction is not None else None,
            )
        return options
    if kind == "fg_bin_student":
        dims, bits = sd["binarization.W"].shape
        return {"dims": int(dims), "binarization": True, "bits": int(bits)}
    if kind == "fg_att_student":
        return {"dims": int(sd["attention.transform.weight"].shape[1]), "attention": True}
    if kind == "fg_student":
        return {"dims": int(_arg(args, "dims", 512))}
    if kind == "teacher":
        return {"dims": int(sd["attention.context_vector.weight"].shape[1])}
    if kind == "teacher_ensemble":
        members = {int(m.group(1)) for k in sd if (m := re.match(r"members\.(\d+)\.", k))}
        dims = sd["members.0.attention.context_vector.weight"].shape[1]
        return {"members": len(members), "dims": int(dims)}
    # selector
    linears = sorted(
        int(m.group(1))
        for k, v in sd.items()
        if (m := re.match(r"mlp\.model\.(\d+)\.weight$", k)) and v.ndim == 2
    )
    first = sd.get("mlp.model.0.weight")
    segments = int(_arg(args, "segments", 0)) if first is not None and first.shape[1] == 4 else 0
    if first is None or first.shape[1] != (4 if segments else 3) or len(linears) < 2:
        raise CheckpointError(
            "unknown selector layout: expected an MLP over 3 inputs (mlp.model.0.weight [H, 3]), "
            "or over 4 with args.segments >= 1 (the segment match)"
        )
    return {
        "segments": segments,
        "dims": int(sd["attention.transform.weight"].shape[1]) if "attention.transform.weight" in sd else 512,
        "hidden_size": int(first.shape[0]),
        "num_layers": len(linears) - 2,
    }


_BUILDERS: dict[str, type[nn.Module]] = {
    "cg_student": CoarseGrainedStudent,
    "fg_att_student": FineGrainedStudent,
    "fg_bin_student": FineGrainedStudent,
    "fg_student": FineGrainedStudent,
    "selector": SelectorNetwork,
    "teacher": ViSiLTeacher,
    "teacher_ensemble": TeacherEnsemble,
}


def build_from_state_dict(
    state_dict: Mapping[str, Any], args: Mapping[str, Any] | argparse.Namespace | None = None
) -> nn.Module:
    """Build the network a state_dict belongs to, with its weights, in eval mode.

    Tensors are used as they are (on their device, floats converted to float32).
    """
    sd = _checked_state_dict(state_dict)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    args_map = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    kind = network_kind(sd)
    options = _infer_options(kind, sd, args_map)
    # Built on the meta device: no time spent initialising weights about to be replaced.
    with torch.device("meta"):
        network = _BUILDERS[kind](**options)
    try:
        network.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"unknown {KIND_DESCRIPTIONS[kind]} layout: its keys or shapes do not match the network "
            f"built from them ({options}): {exc}"
        ) from exc
    return network.eval()


def _expected_kinds(expected: Expected) -> tuple[str, ...]:
    if expected is None:
        return NETWORK_KINDS
    items = expected if isinstance(expected, tuple | list) else (expected,)
    kinds: list[str] = []
    for item in items:
        if isinstance(item, str) and item in KIND_DESCRIPTIONS:
            kinds.append(item)
        elif isinstance(item, type) and any(issubclass(item, cls) for cls in _CLASS_KINDS):
            kinds.extend(k for cls, ks in _CLASS_KINDS.items() if issubclass(item, cls) for k in ks)
        else:
            raise InvalidInputError(
                f"expected a network kind ({', '.join(NETWORK_KINDS)}) or network class, got {item!r}"
            )
    return tuple(dict.fromkeys(kinds))


def _read(path: Path, map_location: Any) -> Any:
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _torch_reason(str(exc))
        if "global" in reason.lower():  # a class or function the weights-only unpickler refuses
            raise CheckpointError(
                f"{path} is not a safe checkpoint: it holds Python objects other than tensors, plain "
                f"values and argparse.Namespace ({reason}); refusing to unpickle it: only weights-only "
                "checkpoints are loaded"
            ) from exc
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint (corrupt pickle: {reason})"
        ) from exc
    except Exception as exc:  # torch raises RuntimeError, EOFError, ValueError ... for damaged files
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint (truncated or corrupt: {_torch_reason(str(exc), 1)})"
        ) from exc


#: Sentences of torch's load errors that advise loading the file unsafely (weights_only=False,
#: allow-listing globals) or point at its docs: never repeated to the user.
_TORCH_ADVICE = ("weights_only", "weights only load failed", "safe_globals", "if you trust", "trusted source",
                 "arbitrary code", "check the documentation")  # fmt: skip


def _torch_reason(message: str, sentences: int | None = None) -> str:
    """The informative sentences of a torch load error (the first ``sentences`` of them), without
    its advice to load unsafely."""
    marker = "WeightsUnpickler error:"
    if marker in message:
        message = message.split(marker, 1)[1]
    parts = (part.strip() for part in re.split(r"\n+|(?<=\.)\s+", message))
    kept = [part for part in parts if part and not any(a in part.lower() for a in _TORCH_ADVICE)]
    return " ".join(kept[:sentences]) if kept else "unreadable pickle"


def load_checkpoint(
    path: str | os.PathLike[str], expected: Expected = None, map_location: Any = "cpu"
) -> nn.Module:
    """Load a network from a release-layout checkpoint or a bare state_dict file.

    ``expected`` restricts the kind: a kind name (see :data:`NETWORK_KINDS`), a network class,
    or a tuple of them. Returns the network in eval mode on ``map_location``.
    """
    path = Path(path)
    kinds = _expected_kinds(expected)
    content = _read(path, map_location)
    if isinstance(content, Mapping) and "model" in content:
        state_dict, args = content["model"], content.get("args")
        if not isinstance(state_dict, Mapping):
            raise CheckpointError(
                f"{path}: expected 'model' to hold a state_dict, got {type(state_dict).__name__}"
            )
        if args is not None and not isinstance(args, argparse.Namespace | Mapping):
            raise CheckpointError(
                f"{path}: expected 'args' to be an argparse.Namespace, got {type(args).__name__}"
            )
    elif isinstance(content, Mapping):
        state_dict, args = content, None
    else:
        raise CheckpointError(
            f"{path} holds a {type(content).__name__}; expected a dict with 'model' (a state_dict) "
            "and 'args', or a bare state_dict"
        )
    try:
        kind = network_kind(_checked_state_dict(state_dict))
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    if kind not in kinds:
        wanted = " or ".join(KIND_DESCRIPTIONS[k] for k in kinds)
        raise CheckpointError(f"expected a {wanted} checkpoint, but {path} holds a {KIND_DESCRIPTIONS[kind]}")
    try:
        return build_from_state_dict(
            state_dict, args if isinstance(args, argparse.Namespace | Mapping) else None
        )
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def _check_plain(value: Any, name: str) -> None:
    """Refuse values the weights-only unpickler could not read back."""
    if isinstance(value, _PLAIN_TYPES | Tensor):
        return
    if isinstance(value, list | tuple):
        for item in value:
            _check_plain(item, name)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain(key, name)
            _check_plain(item, name)
        return
    raise InvalidInputError(
        f"checkpoint entry {name!r} must be a tensor, str, number, bool, None or a list/dict of them "
        f"(loadable without unpickling objects), got {type(value).__name__}"
    )


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str],
    args: Mapping[str, Any] | argparse.Namespace | None = None,
    **extra: Any,
) -> Path:
    """Write ``{'model': state_dict, 'args': Namespace, **extra}`` atomically (temp file, then rename).

    ``args`` defaults to the network's constructor options; given ones are stored with those
    options added. ``extra`` entries (an optimiser state, a step count) must be tensors or plain
    values, so the file stays loadable weights-only.
    """
    path = Path(path)
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    config = model.config() if callable(getattr(model, "config", None)) else {}
    stored_args = {**given, **config}
    for name, value in {**stored_args, **extra}.items():
        _check_plain(value, name)
    content = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "args": argparse.Namespace(**stored_args),
        **extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(content, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
