"""Milvus filter expressions that never splice raw user strings.

A filter is a template with ``{name}`` placeholders plus a mapping of parameter values, the
form Milvus 2.5+ accepts natively (``filter_params``). Milvus Lite 3.x and Milvus 2.3 do not
understand templates, so every filter is rendered here: each value goes through a strict
literal encoder (typed, escaped, validated) and only the encoder's output reaches the
expression. The resulting expression means the same thing on every backend.

The template text itself is trusted expert input (it is Milvus expression syntax written by
the caller); values, ids and metadata keys are not, and are handled only through this module.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dns_milvus.errors import InvalidInputError
from dns_milvus.ids import validate_video_id

#: The escapes that both Milvus Lite's and the Milvus server's expression lexers decode.
#: Other control characters have no escape common to both, so string values holding them
#: are refused rather than sent raw.
_STRING_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

Scalar = str | bool | int | float
FilterValue = Scalar | Sequence[Scalar]


def render_literal(value: object) -> str:
    """Encode one parameter value as a Milvus expression literal.

    Accepts str, bool, int, float (finite), numpy scalars, and flat lists/tuples/1-D arrays of
    those (rendered as ``[a, b, ...]``, the right-hand side of ``in``).
    """
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise InvalidInputError(f"filter list values must be 1-D, got an array of shape {value.shape}")
        value = value.tolist()
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_render_scalar(v) for v in value) + "]"
    return _render_scalar(value)


def _render_scalar(value: object) -> str:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "true" if value else "false"
    if isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise InvalidInputError(f"filter integer {value} is outside the int64 range")
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidInputError(f"filter numbers must be finite, got {value}")
        return repr(value)
    if isinstance(value, str):
        return _render_string(value)
    raise InvalidInputError(
        f"filter values must be str, bool, int, float or a flat list of them, got {type(value).__name__}"
    )


def _render_string(text: str) -> str:
    for ch in text:
        if ch in _STRING_ESCAPES:
            continue
        category = unicodedata.category(ch)
        if category in ("Cc", "Cs"):
            shown = text[:40].encode("unicode_escape", errors="backslashreplace").decode("ascii")
            raise InvalidInputError(
                f"filter string {shown!r} contains a control character or lone surrogate "
                f"(only tab, newline and carriage return are allowed)"
            )
    return '"' + "".join(_STRING_ESCAPES.get(ch, ch) for ch in text) + '"'


def render_filter(template: str, params: Mapping[str, object] | None = None) -> str:
    """Substitute every ``{name}`` placeholder of ``template`` with its encoded parameter.

    Placeholders inside quoted strings of the template are left alone. An unknown
    placeholder, an unused parameter or a stray brace raises ``InvalidInputError``.
    """
    if not isinstance(template, str):
        raise InvalidInputError(f"a filter must be a string expression, got {type(template).__name__}")
    params = dict(params or {})
    for name in params:
        if not isinstance(name, str) or not _IDENTIFIER.match(name):
            raise InvalidInputError(f"filter parameter names must be identifiers, got {name!r}")
    out: list[str] = []
    used: set[str] = set()
    quote: str | None = None
    i, n = 0, len(template)
    while i < n:
        ch = template[i]
        if quote is not None:  # inside a string literal of the template: copy verbatim
            out.append(ch)
            if ch == "\\" and i + 1 < n:
                out.append(template[i + 1])
                i += 2
                continue
            if ch == quote:
                quote = None
            i += 1
            continue
        if ch in "\"'":
            quote = ch
        elif ch == "{":
            end = template.find("}", i)
            name = template[i + 1 : end] if end != -1 else ""
            if not _IDENTIFIER.match(name):
                raise InvalidInputError(
                    f"filter {template!r}: '{{' at column {i} does not open a {{name}} placeholder"
                )
            if name not in params:
                raise InvalidInputError(
                    f"filter {template!r} uses placeholder {{{name}}} but has no such parameter"
                )
            out.append(render_literal(params[name]))
            used.add(name)
            i = end + 1
            continue
        elif ch == "}":
            raise InvalidInputError(f"filter {template!r}: unmatched '}}' at column {i}")
        out.append(ch)
        i += 1
    if quote is not None:
        raise InvalidInputError(f"filter {template!r} has an unterminated string literal")
    unused = sorted(set(params) - used)
    if unused:
        raise InvalidInputError(f"filter {template!r} does not use the parameters {unused}")
    return "".join(out)


@dataclass(frozen=True)
class Filter:
    """A filter template and its parameters; ``render()`` gives the safe expression.

    Combine filters with ``&`` (and) / ``|`` (or); each side is rendered first, so parameter
    names of the two sides never collide.
    """

    template: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def render(self) -> str:
        return render_filter(self.template, self.params)

    def __and__(self, other: Filter | str) -> Filter:
        return Filter(f"({self.render()}) and ({as_filter(other).render()})")

    def __or__(self, other: Filter | str) -> Filter:
        return Filter(f"({self.render()}) or ({as_filter(other).render()})")


def as_filter(expr: Filter | str, params: Mapping[str, Any] | None = None) -> Filter:
    """A ``Filter`` from a template string (trusted syntax) and its parameters, or as is."""
    if isinstance(expr, Filter):
        if params:
            raise InvalidInputError("give filter parameters inside the Filter, not beside it")
        return expr
    if not isinstance(expr, str):
        raise InvalidInputError(f"a filter must be a string or a Filter, got {type(expr).__name__}")
    return Filter(expr, dict(params or {}))


def ids_filter(video_ids: Iterable[str], *, field_name: str = "video_id") -> Filter:
    """Rows whose id is one of ``video_ids`` (each validated as a video id)."""
    if not _IDENTIFIER.match(field_name):
        raise InvalidInputError(f"field names must be identifiers, got {field_name!r}")
    ids = [validate_video_id(v) for v in video_ids]
    return Filter(f"{field_name} in {{ids}}", {"ids": ids})


def metadata_filter(json_field: str = "metadata", /, **equals: FilterValue) -> Filter:
    """Rows whose metadata JSON has ``key == value`` for every keyword given.

    A list value means "any of these": ``metadata_filter(source="a", year=[2020, 2021])``.
    Keys must be identifiers; values are encoded, never spliced. Any-of lists are written as
    ``==`` alternatives because Milvus Lite does not accept ``in`` on JSON paths. Milvus Lite
    evaluates JSON filters row by row (about a second a query at 10k rows); filters on scalar
    fields (``n_frames``, ``payload_kind``, ``ingested_at``) stay fast there.
    """
    if not _IDENTIFIER.match(json_field):
        raise InvalidInputError(f"field names must be identifiers, got {json_field!r}")
    if not equals:
        raise InvalidInputError("metadata_filter needs at least one key=value condition")
    clauses: list[str] = []
    params: dict[str, Any] = {}
    for k, (key, value) in enumerate(equals.items()):
        if not _IDENTIFIER.match(key):
            raise InvalidInputError(f"metadata keys in filters must be identifiers, got {key!r}")
        path = f'{json_field}["{key}"]'
        if isinstance(value, list | tuple | np.ndarray):
            options = list(value)
            if not options:
                raise InvalidInputError(f"metadata_filter: the value list for {key!r} is empty")
            alternatives = []
            for j, option in enumerate(options):
                params[f"m{k}_{j}"] = option
                alternatives.append(f"{path} == {{m{k}_{j}}}")
            clauses.append("(" + " or ".join(alternatives) + ")")
        else:
            params[f"m{k}"] = value
            clauses.append(f"{path} == {{m{k}}}")
    return Filter(" and ".join(clauses), params)
