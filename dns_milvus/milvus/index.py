"""ANN index choice for the coarse vectors, and the matching search parameters.

FLAT is exact and fastest to build; below a few tens of thousands of rows it is also fast
enough to search. Larger collections use IVF_FLAT (nlist ~ 4 sqrt(N)) or HNSW. All three run
on Milvus Lite 3.x (FAISS) and on the Milvus server; the metric is always inner product
(the coarse vectors are L2-normalised, so IP is the cosine similarity DnS ranks by).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from dns_milvus.errors import InvalidInputError
from dns_milvus.milvus._checks import require_int

IndexKind = Literal["FLAT", "IVF_FLAT", "HNSW"]
METRIC = "IP"

#: Below this many rows an exact FLAT index is the default.
FLAT_MAX_ROWS = 20_000


@dataclass(frozen=True)
class IndexConfig:
    """How the coarse-vector field is indexed and searched.

    ``nlist``/``nprobe`` apply to IVF_FLAT, ``m``/``ef_construction``/``ef`` to HNSW; HNSW's
    ``ef`` is raised to the requested limit when smaller (Milvus requires ef >= limit).
    """

    kind: IndexKind = "FLAT"
    nlist: int = 1024
    nprobe: int = 64
    m: int = 16
    ef_construction: int = 200
    ef: int = 128

    def __post_init__(self) -> None:
        if self.kind not in ("FLAT", "IVF_FLAT", "HNSW"):
            raise InvalidInputError(f"index kind must be FLAT, IVF_FLAT or HNSW, got {self.kind!r}")
        require_int(self.nlist, "IndexConfig.nlist", 1, 65536)
        require_int(self.nprobe, "IndexConfig.nprobe", 1, 65536)
        require_int(self.m, "IndexConfig.m", 2, 2048)
        require_int(self.ef_construction, "IndexConfig.ef_construction", 1, 2**31 - 1)
        require_int(self.ef, "IndexConfig.ef", 1, 2**31 - 1)

    @classmethod
    def for_rows(cls, n_rows: int, *, large: Literal["IVF_FLAT", "HNSW"] = "IVF_FLAT") -> IndexConfig:
        """A sensible index for a collection expected to hold ``n_rows`` rows."""
        if n_rows < FLAT_MAX_ROWS:
            return cls("FLAT")
        if large == "HNSW":
            return cls("HNSW")
        nlist = min(65536, max(16, round(4 * math.sqrt(n_rows))))
        # Scanning ~1/16 of the lists keeps stage-1 recall high at a fraction of FLAT's cost.
        nprobe = min(nlist, max(16, nlist // 16))
        return cls("IVF_FLAT", nlist=nlist, nprobe=nprobe)

    def build_params(self) -> dict[str, Any]:
        """The index's build-time parameters."""
        if self.kind == "IVF_FLAT":
            return {"nlist": self.nlist}
        if self.kind == "HNSW":
            return {"M": self.m, "efConstruction": self.ef_construction}
        return {}

    def index_params(self) -> dict[str, Any]:
        """Parameters for ``IndexParams.add_index(params=...)``.

        pymilvus sends each key as its own pair, which the server reads but Milvus Lite
        ignores (it reads only a JSON ``params`` pair); the server also accepts that pair, so
        both forms are sent.
        """
        build = self.build_params()
        return {**build, "params": build} if build else {}

    def search_params(self, limit: int) -> dict[str, Any]:
        """Query-time parameters for a search returning ``limit`` hits."""
        if self.kind == "IVF_FLAT":
            params: dict[str, Any] = {"nprobe": min(self.nprobe, self.nlist)}
        elif self.kind == "HNSW":
            params = {"ef": max(self.ef, limit)}
        else:
            params = {}
        return {"metric_type": METRIC, "params": params}

    @classmethod
    def from_description(cls, description: Mapping[str, Any]) -> IndexConfig:
        """The config of an existing index, from ``MilvusClient.describe_index``.

        Build parameters the backend does not report keep their defaults; search-time
        parameters (nprobe, ef) are not stored by Milvus and keep their defaults too.
        """
        kind = str(description.get("index_type", "")).upper()
        if kind not in ("FLAT", "IVF_FLAT", "HNSW"):
            raise InvalidInputError(
                f"the coarse vectors use a {kind or 'missing'} index; expected FLAT, IVF_FLAT or HNSW"
            )
        params = dict(description.get("params") or {})
        params.update({k: v for k, v in description.items() if k in ("nlist", "M", "efConstruction")})
        defaults = cls()
        nlist = int(params.get("nlist", defaults.nlist))
        return cls(
            kind,  # type: ignore[arg-type]
            nlist=nlist,
            nprobe=min(defaults.nprobe, nlist),
            m=int(params.get("M", defaults.m)),
            ef_construction=int(params.get("efConstruction", defaults.ef_construction)),
        )
