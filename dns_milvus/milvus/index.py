"""ANN index choice for the coarse vectors, and the matching search parameters.

FLAT is exact and fastest to build; below a few tens of thousands of rows it is also fast
enough to search. Larger collections use IVF_FLAT (nlist ~ 4 sqrt(rows per index), see
``IndexConfig.for_rows``) or HNSW. All three run on Milvus Lite 3.x (FAISS) and on the Milvus
server; the metric is always inner product (the coarse vectors are L2-normalised, so IP is the
cosine similarity DnS ranks by).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from dns_milvus.errors import InvalidInputError
from dns_milvus.milvus._checks import require_int
from dns_milvus.milvus.connection import BackendKind

IndexKind = Literal["FLAT", "IVF_FLAT", "HNSW"]
METRIC = "IP"

#: Below this many rows an exact FLAT index is the default.
FLAT_MAX_ROWS = 20_000
#: Rows in a Milvus Lite segment written when its 128 MiB write buffer fills with 1024-d
#: vectors; Lite builds one IVF index per segment (explicit flushes write smaller ones,
#: compaction merges them up to 100k rows).
LITE_SEGMENT_ROWS = 32_000
#: Rows in a Milvus server segment when it is sealed: a growing segment seals at
#: ``dataCoord.segment.sealProportion`` (0.23) of ``maxSize`` (512 MiB), which the server's row
#: size estimate for this schema puts at ~25k rows of 1024-d vectors (measured: four segments of
#: 24-26k rows at 100k rows; compaction later merges some, to 40-60k). Each segment gets its own
#: IVF index.
SERVER_SEGMENT_ROWS = 25_000
#: IVF returns no more rows than its probed lists hold (~ nprobe / nlist of the rows), and finds
#: fewer of the exact top rows the smaller a share of the lists it probes. At search time nprobe
#: is raised so that the probed lists hold this many times the limit on average. Twice the limit
#: returns the limit's hits (lists vary in size: probing exactly the limit's share fell up to 6 %
#: short on both backends), but recall@1000 against exact search needs more where the limit is a
#: large share of the rows: at 100k clustered 1024-d rows on the server (nlist 632), 0.93 with
#: 10 % of the lists probed, 0.97 with 15 % (95 lists: this margin), 0.98 with 20 %
#: (benchmarks/bench_scale.py).
IVF_PROBE_MARGIN = 15
#: The share of its lists an IVF search probes at least, however many rows there are: the
#: margin above asks for fewer as the collection grows, while each segment's index must still be
#: searched deeply enough to find its part of the top K (benchmarks/bench_scale.py measures the
#: recall at 1M rows).
IVF_PROBE_FRACTION = 0.1


@dataclass(frozen=True)
class IndexConfig:
    """How the coarse-vector field is indexed and searched.

    ``nlist``/``nprobe`` apply to IVF_FLAT, ``m``/``ef_construction``/``ef`` to HNSW. Both are
    floors that ``search_params`` raises with the limit: HNSW's ``ef`` to the limit (Milvus
    requires ef >= limit), IVF's ``nprobe`` until the probed lists hold enough rows.
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
    def for_rows(
        cls, n_rows: int, *, backend: BackendKind, large: Literal["IVF_FLAT", "HNSW"] = "IVF_FLAT"
    ) -> IndexConfig:
        """A sensible index for a collection expected to hold ``n_rows`` rows on ``backend``
        (``connection.backend_kind(client)``).

        IVF_FLAT gets nlist ~ 4 sqrt(R), R the rows each IVF index is trained on, and nprobe
        ``IVF_PROBE_FRACTION`` of nlist. Both backends build one index per segment, so R is
        capped at a segment's rows: ``LITE_SEGMENT_ROWS`` on Lite, ``SERVER_SEGMENT_ROWS`` on a
        server. A query compares with every list centre of every segment, then scans nprobe /
        nlist of the rows, so lists sized for the whole collection are work spent on centres,
        and their training is slow: nlist 4000 for 1M rows trained 4000 centres on each
        25k-row server segment, ~6x the k-means work of nlist 632 (FAISS wants >= 39 training
        points a list). Measured on Lite at 40k clustered 1024-d rows (segments of 33k and 7k):
        recall@1000 against FLAT 0.70 with 4000 lists probing 250, 0.93 with 716 probing 179,
        for about the same dot products a query.
        """
        if backend not in ("lite", "server"):
            raise InvalidInputError(f"backend must be 'lite' or 'server', got {backend!r}")
        n_rows = require_int(n_rows, "n_rows", 0, 2**63 - 1)
        if n_rows < FLAT_MAX_ROWS:
            return cls("FLAT")
        if large == "HNSW":
            return cls("HNSW")
        segment_rows = LITE_SEGMENT_ROWS if backend == "lite" else SERVER_SEGMENT_ROWS
        nlist = min(65536, max(16, round(4 * math.sqrt(min(n_rows, segment_rows)))))
        nprobe = min(nlist, max(16, math.ceil(IVF_PROBE_FRACTION * nlist)))
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

    def search_params(self, limit: int, rows: int | None = None) -> dict[str, Any]:
        """Query-time parameters for a search returning ``limit`` hits from ``rows`` rows.

        With ``rows`` given, IVF's nprobe is raised until the probed lists hold
        ``IVF_PROBE_MARGIN`` x ``limit`` rows on average (all lists when ``rows`` is that small):
        nprobe / nlist of the rows is all an IVF search can return, and searching deeper finds
        more of the exact top ``limit``.
        """
        if self.kind == "IVF_FLAT":
            nprobe = self.nprobe
            if rows is not None:
                nprobe = max(nprobe, math.ceil(IVF_PROBE_MARGIN * limit * self.nlist / max(rows, 1)))
            params: dict[str, Any] = {"nprobe": min(nprobe, self.nlist)}
        elif self.kind == "HNSW":
            params = {"ef": max(self.ef, limit)}
        else:
            params = {}
        return {"metric_type": METRIC, "params": params}

    def fewer_hits_advice(self) -> str:
        """Why this index can return fewer hits than asked, and what to change."""
        if self.kind == "IVF_FLAT":
            return (
                f"IVF_FLAT scans only the nprobe nearest of its {self.nlist} lists (per segment): "
                "open the collection with a larger IndexConfig('IVF_FLAT', nprobe=...), or rebuild "
                "the index with fewer lists (IndexConfig.for_rows) or as FLAT with set_index()"
            )
        if self.kind == "HNSW":
            return (
                f"HNSW's graph walk (ef {self.ef}) did not reach enough rows: open the collection with "
                "a larger IndexConfig('HNSW', ef=...), or rebuild the index as FLAT with set_index()"
            )
        return "a FLAT index scans every row"

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
