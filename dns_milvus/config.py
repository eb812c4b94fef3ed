"""Settings shared by the CLI and the sidecar: flags > environment > config file > defaults.

Environment variables: ``DNS_MILVUS_URI``, ``DNS_MILVUS_TOKEN``, ``DNS_MILVUS_STORE``,
``DNS_MILVUS_COLLECTION``, ``DNS_MILVUS_MODELS``, ``DNS_MILVUS_DEVICE``, ``DNS_MILVUS_RERANKER``
(host:port of a re-ranker sidecar; replicas as host:port,host:port or one DNS name that
resolves to all of them), ``DNS_MILVUS_RERANKER_TOKEN``. The config file is
TOML (``--config`` or ``./dns-milvus.toml``) with the same keys in lower case at top level.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from dns_milvus.errors import InvalidInputError

DEFAULT_CONFIG_FILE = "dns-milvus.toml"
DEFAULT_MODEL_SET = Path(__file__).parent / "assets"
#: ``repair --fix`` leaves orphan objects written less than this long ago (seconds): a writer
#: puts a video's object before its row, so a young orphan may be a row on its way.
DEFAULT_REPAIR_GRACE_S = 15 * 60.0


@dataclass
class Settings:
    uri: str = "./dns-milvus.db"
    token: str | None = None
    store: str = "./dns-objects"
    collection: str = "videos"
    models: str = str(DEFAULT_MODEL_SET)
    device: str = "auto"
    # host:port of a re-ranker sidecar, or its replicas ("h1:p,h2:p", or a list in the config
    # file); None runs stage 2 in-process
    reranker: str | list[str] | None = None
    reranker_token: str | None = None

    def __repr__(self) -> str:  # never print the token
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        for secret in ("token", "reranker_token"):
            if shown[secret]:
                shown[secret] = "***"
        return f"Settings({shown})"

    @classmethod
    def resolve(
        cls, flags: dict[str, Any] | None = None, config_file: str | os.PathLike | None = None
    ) -> Settings:
        values: dict[str, Any] = {}
        values.update(_read_config(config_file))
        for f in fields(cls):
            env = os.environ.get(f"DNS_MILVUS_{f.name.upper()}")
            if env:
                values[f.name] = env
        for key, value in (flags or {}).items():
            if value is not None and key in {f.name for f in fields(cls)}:
                values[key] = value
        return cls(**values)


def _read_config(path: str | os.PathLike | None) -> dict[str, Any]:
    explicit = path is not None
    path = Path(path) if path is not None else Path(DEFAULT_CONFIG_FILE)
    if not path.is_file():
        if explicit:
            raise InvalidInputError(f"config file {path} does not exist")
        return {}
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InvalidInputError(f"cannot read config file {path}: {exc}") from exc
    known = {f.name for f in fields(Settings)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidInputError(f"config file {path}: unknown keys {unknown}; known keys are {sorted(known)}")
    return data
