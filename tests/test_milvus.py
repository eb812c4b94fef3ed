"""The Milvus layer on Milvus Lite and on a real Milvus server (same tests, both backends)."""

from __future__ import annotations

import logging
import os
import secrets
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pymilvus import DataType, MilvusClient

from dns_milvus.errors import BackendUnavailableError, InvalidInputError, NotFoundError
from dns_milvus.ids import MAX_ID_BYTES
from dns_milvus.milvus import (
    Filter,
    IndexConfig,
    ModelSetMismatchError,
    SchemaMismatchError,
    VideoCollection,
    VideoRow,
    backend_kind,
    connect,
    ids_filter,
    metadata_filter,
    redact_uri,
    render_filter,
    render_literal,
)
from dns_milvus.milvus.connection import MilvusLiteDamagedError
from dns_milvus.milvus.index import (
    FLAT_MAX_ROWS,
    IVF_PROBE_FRACTION,
    LITE_SEGMENT_ROWS,
    SERVER_SEGMENT_ROWS,
)
from dns_milvus.milvus.rows import row_to_entity
from dns_milvus.milvus.schema import (
    F_SEGMENTS,
    MAX_SEGMENTS_CHARS,
    PROP_SCHEMA_VERSION,
    collection_properties,
    expected_fields,
)
from tests.fixtures.milvus_server import KEEP_PREFIX, release_lite

DIM = 16
MODEL_SET = "test-set"

HOSTILE_IDS = [
    '" or 1==1 or "',
    "' or 1==1 or '",
    'a"b',
    "a'b",
    "back\\slash",
    'trailing\\"',
    "\\",
    '"]) or video_id != ("',
    "../../etc/passwd",
    "{ids}",
    "vidéo-ünïcødé-视频-🎬",
    "  spaced id  ",
]


def unit_rows(rng: np.random.Generator, n: int, *, prefix: str = "v", metadata=None) -> list[VideoRow]:
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [
        VideoRow(
            video_id=f"{prefix}{i}",
            coarse=vectors[i],
            self_sim=float(i) / max(n, 1),
            fine_key=f"objects/{prefix}{i}.dns",
            n_frames=i + 1,
            payload_kind="packed_bits",
            metadata=metadata(i) if metadata else {},
        )
        for i in range(n)
    ]


@pytest.fixture
def client(milvus_uri: str) -> MilvusClient:
    client = connect(milvus_uri)
    yield client
    client.close()


@pytest.fixture(scope="session")
def shared_server_collection_name() -> str:
    return f"{KEEP_PREFIX}milvus_tests_{secrets.token_hex(4)}"


@pytest.fixture
def coll(
    request: pytest.FixtureRequest, client: MilvusClient, milvus_uri: str, milvus_collection_name: str
) -> VideoCollection:
    """An empty FLAT collection: a new one on Lite; on the server one kept for the session
    and emptied before each test (creating and loading a server collection takes seconds)."""
    if backend_kind(client) == "lite":
        return VideoCollection.create(client, milvus_collection_name, dim=DIM, model_set=MODEL_SET)
    name = request.getfixturevalue("shared_server_collection_name")
    collection = VideoCollection.create(client, name, dim=DIM, model_set=MODEL_SET)
    client.delete(name, filter='video_id != ""')
    remaining = client.query(name, filter="", output_fields=["count(*)"], consistency_level="Strong")
    assert remaining[0]["count(*)"] == 0
    return collection


@pytest.fixture
def lite_coll(milvus_lite_uri: str) -> VideoCollection:
    """An empty collection on Milvus Lite, for checks that end before any request is sent."""
    client = connect(milvus_lite_uri)
    yield VideoCollection.create(client, "checks", dim=DIM, model_set=MODEL_SET)
    client.close()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


# -- filters (no backend) ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('say "hi"', r'"say \"hi\""'),
        ("it's", '"it\'s"'),
        ("back\\slash", r'"back\\slash"'),
        ("line\nbreak\r\ttab", r'"line\nbreak\r\ttab"'),
        ("ünï 🎬", '"ünï 🎬"'),
        (True, "true"),
        (False, "false"),
        (-3, "-3"),
        (np.int64(7), "7"),
        (1.5, "1.5"),
        (["a", 2, False], '["a", 2, false]'),
        ((), "[]"),
    ],
)
def test_render_literal_encodes_values(value: object, expected: str) -> None:
    assert render_literal(value) == expected


@pytest.mark.parametrize(
    "value", ["nul\x00", "bell\x07", "lone \ud800", float("nan"), float("inf"), 2**63, [[1]], None, {"a": 1}]
)
def test_render_literal_refuses_unencodable_values(value: object) -> None:
    with pytest.raises(InvalidInputError):
        render_literal(value)


def test_render_filter_substitutes_only_placeholders_outside_strings() -> None:
    expr = render_filter(
        'video_id in {ids} and fine_key != "{ids}" and n_frames > {n}', {"ids": ['x"y'], "n": 2}
    )
    assert expr == r'video_id in ["x\"y"] and fine_key != "{ids}" and n_frames > 2'


@pytest.mark.parametrize(
    ("template", "params"),
    [
        ("n_frames > {n}", {}),  # unknown placeholder
        ("n_frames > 1", {"n": 1}),  # unused parameter
        ("n_frames > {n", {"n": 1}),  # unterminated placeholder
        ("n_frames > 1}", {}),  # stray brace
        ('fine_key == "open', {}),  # unterminated string
        ("n_frames > {n}", {"bad name": 1}),
    ],
)
def test_render_filter_refuses_malformed_templates(template: str, params: dict) -> None:
    with pytest.raises(InvalidInputError):
        render_filter(template, params)


def test_metadata_filter_validates_keys_and_values() -> None:
    assert metadata_filter(source="a'b").render() == 'metadata["source"] == "a\'b"'
    assert metadata_filter(year=[2020, 2021]).render() == (
        '(metadata["year"] == 2020 or metadata["year"] == 2021)'
    )
    with pytest.raises(InvalidInputError, match="identifiers"):
        metadata_filter(**{'x"] or 1==1 or metadata["x': 1})
    with pytest.raises(InvalidInputError):
        metadata_filter()
    with pytest.raises(InvalidInputError):
        metadata_filter(year=[])


def test_ids_filter_validates_ids() -> None:
    assert ids_filter(['a"b']).render() == r'video_id in ["a\"b"]'
    with pytest.raises(InvalidInputError, match="bytes"):
        ids_filter(["x" * 10_000])
    with pytest.raises(InvalidInputError):
        ids_filter(["tab\tid"])


# -- index config and connection (no backend) ----------------------------------------------------


def test_index_config_for_rows_scales_with_size() -> None:
    assert IndexConfig.for_rows(1_000, backend="server").kind == "FLAT"
    ivf = IndexConfig.for_rows(1_000_000, backend="server")
    assert ivf.kind == "IVF_FLAT" and ivf.nlist == 632 and 16 <= ivf.nprobe <= ivf.nlist
    assert IndexConfig.for_rows(1_000_000, backend="lite", large="HNSW").kind == "HNSW"
    assert IndexConfig("HNSW", ef=64).search_params(limit=500)["params"]["ef"] == 500
    assert IndexConfig("IVF_FLAT", nlist=8, nprobe=64).search_params(10)["params"]["nprobe"] == 8
    with pytest.raises(InvalidInputError):
        IndexConfig("IVF_PQ")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        IndexConfig("IVF_FLAT", nlist=0)


def test_index_config_for_rows_sizes_lite_lists_per_segment() -> None:
    # Lite trains one IVF per segment of <= LITE_SEGMENT_ROWS rows: nlist follows that, not N.
    assert IndexConfig.for_rows(25_000, backend="lite") == IndexConfig.for_rows(25_000, backend="server")
    lite = [IndexConfig.for_rows(n, backend="lite") for n in (100_000, 1_000_000, 50_000_000)]
    assert {(c.kind, c.nlist, c.nprobe) for c in lite} == {("IVF_FLAT", 716, 72)}
    assert 39 * lite[0].nlist <= LITE_SEGMENT_ROWS  # FAISS's minimum training points per list
    assert IndexConfig.for_rows(100_000, backend="server").nlist == 632
    with pytest.raises(InvalidInputError, match="backend"):
        IndexConfig.for_rows(100_000, backend="cloud")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="n_rows"):
        IndexConfig.for_rows(-1, backend="lite")


def test_index_config_for_rows_sizes_server_lists_per_segment() -> None:
    # A server indexes each sealed segment (~SERVER_SEGMENT_ROWS rows) on its own: nlist grows
    # with the rows up to one segment's, then stays; every size probes IVF_PROBE_FRACTION of it.
    sizes = (FLAT_MAX_ROWS, 22_000, SERVER_SEGMENT_ROWS, 100_000, 1_000_000, 50_000_000)
    configs = [IndexConfig.for_rows(n, backend="server") for n in sizes]
    assert [c.nlist for c in configs] == [566, 593, 632, 632, 632, 632]
    assert [c.nprobe for c in configs] == [57, 60, 64, 64, 64, 64]
    for c in configs:
        assert c.kind == "IVF_FLAT" and c.nprobe >= IVF_PROBE_FRACTION * c.nlist
        assert 39 * c.nlist <= SERVER_SEGMENT_ROWS  # FAISS's minimum training points per list
    # At search time the fraction stays the floor at 1M rows; at 100k the probed lists must hold
    # IVF_PROBE_MARGIN x the limit: 95 of 632 lists (15 %).
    assert configs[4].search_params(1000, rows=1_000_000)["params"]["nprobe"] == 64
    assert configs[3].search_params(1000, rows=100_000)["params"]["nprobe"] == 95


def test_ivf_nprobe_grows_with_the_limit() -> None:
    ivf = IndexConfig("IVF_FLAT", nlist=179, nprobe=16)
    assert ivf.search_params(1000)["params"]["nprobe"] == 16  # row count unknown: the configured floor
    assert ivf.search_params(1000, rows=1_000_000)["params"]["nprobe"] == 16
    assert ivf.search_params(1000, rows=20_000)["params"]["nprobe"] == 135  # probed lists hold ~15x the limit
    assert ivf.search_params(1000, rows=2_000)["params"]["nprobe"] == 179
    assert ivf.search_params(10, rows=0)["params"]["nprobe"] == 179


def _unused_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_server_raises_backend_unavailable_without_secrets() -> None:
    port = _unused_port()
    with pytest.raises(BackendUnavailableError) as info:
        connect(f"http://alice:pw-in-uri@127.0.0.1:{port}", token="tok-s3cr3t", timeout=2)
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message
    assert "tok-s3cr3t" not in message and "pw-in-uri" not in message and "alice" not in message


def test_backend_gone_mid_session_raises_backend_unavailable(milvus_lite_uri: str) -> None:
    client = connect(milvus_lite_uri)
    coll = VideoCollection.create(client, "gone", dim=DIM, model_set=MODEL_SET, timeout=5)
    release_lite(milvus_lite_uri)  # stops the in-process Milvus Lite server under the client
    with pytest.raises(BackendUnavailableError, match=r"index\.db"):
        coll.count()
    with pytest.raises(BackendUnavailableError):
        coll.search(np.ones((1, DIM), np.float32), 3)


def test_a_registered_lite_server_that_refuses_connections_is_started_afresh(
    milvus_lite_uri: str, rng
) -> None:
    from milvus_lite.server_manager import server_manager_instance

    client = connect(milvus_lite_uri)
    VideoCollection.create(client, "videos", dim=DIM, model_set=MODEL_SET).upsert(unit_rows(rng, 5))
    client.close()
    # The fault: the path's server is still registered (pymilvus would hand out its port) but
    # no longer listens.
    server = server_manager_instance._servers[os.path.abspath(milvus_lite_uri)][0]
    server.stop(0).wait()
    again = connect(milvus_lite_uri)
    assert VideoCollection.open(again, "videos").count() == 5
    again.close()
    release_lite(milvus_lite_uri)
    assert os.path.abspath(milvus_lite_uri) not in server_manager_instance._servers


def test_connect_refuses_unknown_uris(tmp_path) -> None:
    with pytest.raises(InvalidInputError, match=r"\.db"):
        connect(tmp_path / "not-a-db.txt")
    with pytest.raises(InvalidInputError, match="scheme"):
        connect("ftp://127.0.0.1:19530")
    assert redact_uri("https://u:p@host:443/db?token=x") == "https://host:443/db"


def test_connect_creates_lite_parent_directories(tmp_path) -> None:
    path = tmp_path / "a" / "b" / "index.db"
    client = connect(path)
    try:
        assert path.parent.is_dir()
        VideoCollection.create(client, "c", dim=DIM, model_set=MODEL_SET)
        assert VideoCollection.exists(client, "c")
    finally:
        client.close()


# -- schema ------------------------------------------------------------------------------------


def test_create_and_reopen(coll: VideoCollection, client: MilvusClient, milvus_uri: str) -> None:
    assert (coll.dim, coll.model_set, coll.info.index.kind) == (DIM, MODEL_SET, "FLAT")
    other_client = connect(milvus_uri)
    reopened = VideoCollection.open(other_client, coll.name, dim=DIM, model_set=MODEL_SET)
    assert reopened.info == coll.info
    other_client.close()
    again = VideoCollection.create(client, coll.name, dim=DIM, model_set=MODEL_SET, exist_ok=True)
    assert again.info == coll.info
    with pytest.raises(InvalidInputError, match="already exists"):
        VideoCollection.create(client, coll.name, dim=DIM, model_set=MODEL_SET, exist_ok=False)
    with pytest.raises(SchemaMismatchError, match="16-d"):
        VideoCollection.open(client, coll.name, dim=32)
    with pytest.raises(ModelSetMismatchError, match="other-set"):
        VideoCollection.create(client, coll.name, dim=DIM, model_set="other-set")
    with pytest.raises(NotFoundError):
        VideoCollection.open(client, coll.name + "_missing")
    with pytest.raises(InvalidInputError, match="collection name"):
        VideoCollection.open(client, "bad-name")


def test_foreign_collections_are_refused(client: MilvusClient, milvus_collection_name: str) -> None:
    # Created without an index so the server does not spend seconds loading them.
    plain = milvus_collection_name + "_plain"
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=DIM)
    client.create_collection(plain, schema=schema)
    with pytest.raises(SchemaMismatchError, match="not created by dns-milvus"):
        VideoCollection.open(client, plain)

    altered = milvus_collection_name + "_altered"
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("video_id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID_BYTES)
    schema.add_field("coarse", DataType.FLOAT_VECTOR, dim=DIM)
    schema.add_field("self_sim", DataType.DOUBLE)
    client.create_collection(altered, schema=schema, properties=collection_properties(DIM, MODEL_SET))
    with pytest.raises(SchemaMismatchError) as info:
        VideoCollection.open(client, altered)
    message = str(info.value)
    assert "'self_sim' is DOUBLE, expected FLOAT" in message
    assert "'fine_key' is missing" in message


def test_schema_v1_collection_is_refused_with_how_to_recreate_it(
    client: MilvusClient, milvus_collection_name: str
) -> None:
    """A collection of schema version 1 (every field but the segment codes) is refused when opened
    or created again, with a message that says it predates the codes and how to recover."""
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    for name, (dtype, params) in expected_fields(DIM).items():
        if name != F_SEGMENTS:
            schema.add_field(name, dtype, is_primary=(name == "video_id"), **params)
    version_1 = {**collection_properties(DIM, MODEL_SET), PROP_SCHEMA_VERSION: "1"}
    client.create_collection(milvus_collection_name, schema=schema, properties=version_1)
    for reopen in (
        lambda: VideoCollection.open(client, milvus_collection_name),
        lambda: VideoCollection.create(client, milvus_collection_name, dim=DIM, model_set=MODEL_SET),
    ):
        with pytest.raises(SchemaMismatchError) as info:
            reopen()
        message = str(info.value)
        assert "schema version 1; this release reads version 2" in message
        assert "predates segment codes" in message
        assert "Re-create the collection" in message and "index its videos again" in message
    assert client.has_collection(milvus_collection_name)  # refused, not altered


# -- writes and search -------------------------------------------------------------------------


def test_upsert_then_search_sees_rows_with_numpy_scores(coll: VideoCollection, rng) -> None:
    rows = unit_rows(rng, 60)
    assert coll.upsert(rows) == 60
    queries = rng.standard_normal((3, DIM)).astype(np.float32)
    hits = coll.search(queries, limit=10)
    matrix = np.stack([r.coarse for r in rows])
    for q, per_query in zip(queries, hits, strict=True):
        expected = np.argsort(-(matrix @ q))[:10]
        assert [h.video_id for h in per_query] == [rows[i].video_id for i in expected]
        np.testing.assert_allclose([h.score for h in per_query], (matrix @ q)[expected], rtol=1e-5, atol=1e-6)
    top = hits[0][0]
    source = next(r for r in rows if r.video_id == top.video_id)
    assert (top.fine_key, top.n_frames, top.payload_kind) == (source.fine_key, source.n_frames, "packed_bits")
    assert top.self_sim == pytest.approx(source.self_sim, rel=1e-6)


def test_search_right_after_each_upsert(coll: VideoCollection, rng) -> None:
    for row in unit_rows(rng, 5):
        coll.upsert([row])
        hit = coll.search(row.coarse[None, :], limit=1)[0][0]
        assert hit.video_id == row.video_id
        assert hit.score == pytest.approx(1.0, abs=1e-5)


def test_reupsert_is_idempotent_and_replaces_values(coll: VideoCollection, rng) -> None:
    rows = unit_rows(rng, 10)
    coll.upsert(rows)
    replacement = VideoRow("v3", -rows[3].coarse, 0.25, "objects/v3-new.dns", 42, "float16", {"new": True})
    coll.upsert([replacement])
    coll.upsert([replacement])
    assert coll.count() == 10
    stored = coll.get(["v3"], with_vectors=True)["v3"]
    assert (stored.fine_key, stored.n_frames, stored.payload_kind, stored.metadata) == (
        "objects/v3-new.dns",
        42,
        "float16",
        {"new": True},
    )
    np.testing.assert_allclose(stored.coarse, -rows[3].coarse, rtol=1e-6)
    assert coll.search(-rows[3].coarse[None, :], limit=1)[0][0].video_id == "v3"


def test_metadata_and_id_filters(coll: VideoCollection, rng) -> None:
    sources = ["news", "sports", 'quote"d', "back\\slash", "multi\nline"]
    rows = unit_rows(rng, 20, metadata=lambda i: {"source": sources[i % 5], "year": 2020 + i % 3})
    coll.upsert(rows)
    query = rng.standard_normal((1, DIM)).astype(np.float32)
    for source in sources:
        hits = coll.search(query, limit=20, filter=metadata_filter(source=source))[0]
        assert {h.video_id for h in hits} == {r.video_id for r in rows if r.metadata["source"] == source}
        assert all(h.metadata["source"] == source for h in hits)
    hits = coll.search(query, limit=20, filter=metadata_filter(year=[2020, 2022]) & "n_frames <= 10")[0]
    expected = {r.video_id for r in rows if r.metadata["year"] != 2021 and r.n_frames <= 10}
    assert {h.video_id for h in hits} == expected
    hits = coll.search(query, limit=20, filter="n_frames > {n}", filter_params={"n": 15})[0]
    assert {h.video_id for h in hits} == {"v15", "v16", "v17", "v18", "v19"}
    hits = coll.search(query, limit=20, filter=ids_filter(["v1", "v2", "absent"]))[0]
    assert {h.video_id for h in hits} == {"v1", "v2"}
    with pytest.raises(InvalidInputError, match="filter"):
        coll.search(query, limit=5, filter="n_frames >>> 3")


def test_hostile_ids_cannot_inject(coll: VideoCollection, rng) -> None:
    benign = unit_rows(rng, 5)
    hostile = unit_rows(rng, len(HOSTILE_IDS), prefix="h")
    for row, video_id in zip(hostile, HOSTILE_IDS, strict=True):
        row.video_id = video_id
    coll.upsert(benign + hostile)
    assert coll.count() == len(benign) + len(hostile)
    query = rng.standard_normal((1, DIM)).astype(np.float32)
    for row in hostile:
        assert list(coll.get([row.video_id])) == [row.video_id]
        hits = coll.search(query, limit=50, filter=ids_filter([row.video_id]))[0]
        assert [h.video_id for h in hits] == [row.video_id]
        key_filter = Filter("fine_key == {key}", {"key": row.fine_key})
        hits = coll.search(query, limit=50, filter=key_filter)[0]
        assert [h.video_id for h in hits] == [row.video_id]
    coll.delete([HOSTILE_IDS[0], HOSTILE_IDS[1]])
    assert coll.count() == len(benign) + len(hostile) - 2
    assert set(coll.get([r.video_id for r in benign])) == {r.video_id for r in benign}


def test_invalid_rows_are_refused_and_nothing_is_written(lite_coll: VideoCollection, rng) -> None:
    coll = lite_coll
    good = unit_rows(rng, 3)

    def with_changes(**changes) -> list[VideoRow]:
        row = unit_rows(rng, 1, prefix="bad")[0]
        for key, value in changes.items():
            setattr(row, key, value)
        return [*good, row]

    nan = np.full(DIM, np.nan, dtype=np.float32)
    cases = [
        ("NaN", with_changes(coarse=nan)),
        (r"float32 \[16\]", with_changes(coarse=np.ones(DIM + 1, dtype=np.float32))),
        (r"float32 \[16\]", with_changes(coarse=np.ones(DIM, dtype=np.complex64))),
        ("NaN or Inf", with_changes(coarse=np.full(DIM, 1e300))),  # finite in float64 only
        ("missing", with_changes(coarse=None)),
        ("bytes", with_changes(video_id="x" * 10_000)),
        ("non-empty", with_changes(video_id="")),
        ("self_sim", with_changes(self_sim=float("inf"))),
        ("n_frames", with_changes(n_frames=0)),
        ("payload_kind", with_changes(payload_kind="Packed Bits")),
        ("fine_key", with_changes(fine_key="")),
        ("JSON", with_changes(metadata={"bad": float("nan")})),
        ("model set", with_changes(model_set="other-set")),
        (r"uint8 \[S >= 1, 2\], got int16 \[4, 2\]", with_changes(segments=np.ones((4, 2), np.int16))),
        (r"uint8 \[S >= 1, 2\], got uint8 \[4, 3\]", with_changes(segments=np.ones((4, 3), np.uint8))),
        (r"uint8 \[S >= 1, 2\], got uint8 \[0, 2\]", with_changes(segments=np.ones((0, 2), np.uint8))),
        (r"uint8 \[S >= 1, 2\], got uint8 \[8\]", with_changes(segments=np.ones(8, np.uint8))),
        ("uint8", with_changes(segments=[[1, 2], [3]])),  # ragged
        ("the field holds at most", with_changes(segments=np.ones((MAX_SEGMENTS_CHARS // 2, 2), np.uint8))),
        (r"more than once in one call: \['v0'\]", [*good, good[0]]),
    ]
    for expected, rows in cases:
        with pytest.raises(InvalidInputError, match=expected):
            coll.upsert(rows)
    assert coll.count() == 0


def test_bad_queries_are_refused(lite_coll: VideoCollection, rng) -> None:
    coll = lite_coll
    coll.upsert(unit_rows(rng, 3))
    cases = [
        (np.ones((1, DIM + 1), dtype=np.float32), 5),
        (np.ones(DIM, dtype=np.float32), 5),
        (np.full((2, DIM), np.nan, dtype=np.float32), 5),
        (np.ones((1, DIM), dtype=np.float32), 0),
        (np.ones((1, DIM), dtype=np.float32), 100_000),
    ]
    for vectors, limit in cases:
        with pytest.raises(InvalidInputError):
            coll.search(vectors, limit)
    with pytest.raises(ModelSetMismatchError):
        coll.search(np.ones((1, DIM), dtype=np.float32), 5, model_set="other-set")
    with pytest.raises(InvalidInputError, match="output fields"):
        coll.search(np.ones((1, DIM), dtype=np.float32), 5, output_fields=["coarse"])


def test_get_delete_count(coll: VideoCollection, rng) -> None:
    rows = unit_rows(rng, 12, metadata=lambda i: {"i": i, "tags": ["a", "b"]})
    coll.upsert(rows)
    assert coll.count() == 12
    found = coll.get(["v0", "v5", "v5", "missing"], with_vectors=True)
    assert set(found) == {"v0", "v5"}
    assert found["v5"].metadata == {"i": 5, "tags": ["a", "b"]}
    assert found["v5"].model_set == MODEL_SET and found["v5"].ingested_at > 0
    np.testing.assert_array_equal(found["v5"].coarse, rows[5].coarse)
    assert coll.get(["v0"])["v0"].coarse is None
    coll.delete(["v0", "v5", "missing"])
    assert coll.count() == 10
    assert coll.get(["v0", "v5"]) == {}
    assert "v0" not in {h.video_id for h in coll.search(rows[0].coarse[None, :], limit=12)[0]}
    with pytest.raises(InvalidInputError, match="single string"):
        coll.get("v1")


def test_iter_rows_over_several_pages(coll: VideoCollection, rng) -> None:
    rows = unit_rows(rng, 23)
    coll.upsert(rows)
    seen = list(coll.iter_rows(["fine_key"], batch_size=5))
    assert sorted(r["video_id"] for r in seen) == sorted(r.video_id for r in rows)
    assert all(set(r) == {"video_id", "fine_key"} for r in seen)
    full = {r["video_id"]: r for r in coll.iter_rows(batch_size=10)}
    np.testing.assert_array_equal(full["v7"]["coarse"], rows[7].coarse)
    with pytest.raises(InvalidInputError, match="unknown fields"):
        list(coll.iter_rows(["nope"]))


def test_segment_codes_round_trip(coll: VideoCollection, rng) -> None:
    """Each row's segment codes come back unchanged from a search hit, get and iter_rows; a row
    without codes comes back with None."""
    rows = unit_rows(rng, 6)
    for i, row in enumerate(rows[:3]):  # 1, 2 and 4 segments
        row.segments = rng.integers(0, 256, size=(2**i, DIM // 8), dtype=np.uint8)
    rows[3].segments = np.arange(256, dtype=np.uint8).reshape(128, 2)  # every byte value
    rows[4].segments = rows[3].segments[::16]  # a strided view; v5 has no codes
    coll.upsert(rows)
    expected = {r.video_id: r.segments for r in rows}

    def same(found: np.ndarray | None, video_id: str) -> None:
        if expected[video_id] is None:
            assert found is None
            return
        assert found.dtype == np.uint8 and found.shape == expected[video_id].shape
        np.testing.assert_array_equal(found, expected[video_id])

    hits = coll.search(np.stack([r.coarse for r in rows]), limit=len(rows))
    assert all(len(per_query) == len(rows) for per_query in hits)
    for per_query in hits:
        for hit in per_query:
            same(hit.segments, hit.video_id)
    got = coll.get(list(expected))
    assert set(got) == set(expected)
    for video_id, row in got.items():
        same(row.segments, video_id)
    for row in coll.iter_rows(batch_size=4):
        same(row[F_SEGMENTS], row["video_id"])
    assert {r["video_id"] for r in coll.iter_rows([F_SEGMENTS])} == set(expected)
    # An upsert without codes replaces the codes with none.
    coll.upsert([VideoRow("v0", rows[0].coarse, 0.5, "objects/v0.dns", 3, "packed_bits")])
    assert coll.get(["v0"])["v0"].segments is None


def test_stored_segment_codes_that_do_not_decode_are_reported(lite_coll: VideoCollection, rng) -> None:
    row = unit_rows(rng, 1)[0]
    entity = row_to_entity(row, DIM, MODEL_SET, 1)
    for text in ("not base64!", "AAAA"):  # not base64; 3 bytes, not whole codes of 2 bytes
        lite_coll.client.upsert(lite_coll.name, [{**entity, F_SEGMENTS: text}])
        lite_coll.flush()
        with pytest.raises(InvalidInputError, match="'v0': its stored segment codes are not base64"):
            lite_coll.get(["v0"])


def test_segment_codes_need_a_dimension_of_whole_bytes(milvus_lite_uri: str, rng) -> None:
    client = connect(milvus_lite_uri)
    try:
        coll = VideoCollection.create(client, "odd", dim=12, model_set=MODEL_SET)
        row = VideoRow("v", np.ones(12, np.float32), 0.5, "objects/v.dns", 3, "packed_bits")
        coll.upsert([row])  # without codes, any dimension
        row.segments = np.ones((2, 1), np.uint8)
        with pytest.raises(InvalidInputError, match="multiple of 8; the collection's is 12"):
            coll.upsert([row])
        assert coll.get(["v"])["v"].segments is None
    finally:
        client.close()


def test_optional_hit_fields(coll: VideoCollection, rng) -> None:
    coll.upsert(unit_rows(rng, 2, metadata=lambda i: {"i": i}))
    hit = coll.search(np.ones((1, DIM), np.float32), 1, output_fields=["model_set", "ingested_at"])[0][0]
    assert hit.model_set == MODEL_SET and hit.ingested_at > 0 and hit.metadata == {}


def test_ivf_and_hnsw_indexes(client: MilvusClient, milvus_collection_name: str, rng) -> None:
    ivf = IndexConfig("IVF_FLAT", nlist=4, nprobe=4)
    coll = VideoCollection.create(client, milvus_collection_name, dim=DIM, model_set=MODEL_SET, index=ivf)
    rows = unit_rows(rng, 80)
    coll.upsert(rows)
    coll.flush()
    for row in rows[:5]:  # nprobe == nlist: every list is scanned, so the result is exact
        assert coll.search(row.coarse[None, :], limit=1)[0][0].video_id == row.video_id
    tuned = VideoCollection.open(client, coll.name, index=IndexConfig("IVF_FLAT", nprobe=2)).info.index
    assert (tuned.nlist, tuned.nprobe) == (4, 2)  # build parameters read back, search ones given
    assert VideoCollection.create(client, coll.name, dim=DIM, model_set=MODEL_SET).info.index.nlist == 4
    coll.set_index(IndexConfig("HNSW", m=8, ef_construction=64))
    assert coll.search(rows[7].coarse[None, :], limit=3)[0][0].video_id == "v7"
    reopened = VideoCollection.open(client, coll.name)
    assert reopened.info.index.kind == "HNSW" and reopened.info.index.m == 8
    with pytest.raises(InvalidInputError, match="set_index"):
        VideoCollection.open(client, coll.name, index=IndexConfig("FLAT"))
    assert Filter("n_frames > {n}", {"n": 70}).render() == "n_frames > 70"
    hits = coll.search(rows[0].coarse[None, :], limit=80, filter=Filter("n_frames > {n}", {"n": 70}))[0]
    assert {h.video_id for h in hits} == {f"v{i}" for i in range(70, 80)}


def _wait_until_ivf_is_searched(coll: VideoCollection, query: np.ndarray, client: MilvusClient) -> None:
    """Block until searches use the built IVF index: until then both backends scan the new
    segment exhaustively, which always fills the limit."""
    if coll.backend == "server":  # a loaded segment picks its index up late; reloading takes it at once
        deadline = time.monotonic() + 60
        while client.describe_index(coll.name, "coarse").get("indexed_rows", 0) < coll.count():
            assert time.monotonic() < deadline, "the server did not build the IVF index"
            time.sleep(0.2)
        client.release_collection(coll.name)
        client.load_collection(coll.name)
    deadline = time.monotonic() + 60
    while len(coll.search(query, 1000, search_params={"nprobe": 1})[0]) == 1000:
        assert time.monotonic() < deadline, "searches never used the IVF index"
        time.sleep(0.2)


def test_ivf_search_fills_the_limit_and_warns_once_when_it_cannot(
    client: MilvusClient, milvus_collection_name: str, rng, caplog: pytest.LogCaptureFixture
) -> None:
    # Lists of ~14 rows (nlist ~ 4 sqrt(N)): 16 probed ones return ~220 (Lite) / ~630 (server) hits.
    index = IndexConfig("IVF_FLAT", nlist=219, nprobe=16)
    coll = VideoCollection.create(client, milvus_collection_name, dim=DIM, model_set=MODEL_SET, index=index)
    coll.upsert(unit_rows(rng, 3000))
    coll.flush()
    queries = rng.standard_normal((8, DIM)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="dns_milvus.milvus.collection"):
        _wait_until_ivf_is_searched(coll, queries[:1], client)  # nprobe 1: short, logged
        coll.search(queries, 1000, search_params={"nprobe": 1})
    warnings = [r.getMessage() for r in caplog.records if r.name == "dns_milvus.milvus.collection"]
    assert len(warnings) == 1
    assert "where 1000 were asked and it holds 3000 rows" in warnings[0] and "nprobe" in warnings[0]

    caplog.clear()
    fresh = VideoCollection.open(client, coll.name, index=index)  # nprobe 16 again; warns on its own
    with caplog.at_level(logging.WARNING, logger="dns_milvus.milvus.collection"):
        hits = fresh.search(queries, 1000)
    assert [len(per_query) for per_query in hits] == [1000] * len(queries)
    assert all(len({h.video_id for h in per_query}) == 1000 for per_query in hits)
    assert not [r for r in caplog.records if r.name == "dns_milvus.milvus.collection"]


@pytest.mark.parametrize("damaged", ["index", "data", "manifest"])
def test_damaged_lite_database_raises_with_recovery_steps(milvus_lite_uri: str, damaged: str, rng) -> None:
    path = Path(milvus_lite_uri)
    client = connect(path)
    coll = VideoCollection.create(client, "videos", dim=DIM, model_set=MODEL_SET)
    coll.upsert(unit_rows(rng, 50))
    coll.flush()
    client.close()
    release_lite(path)  # as when the process ends: the next connect() reads the files again
    client = connect(path)
    assert VideoCollection.open(client, "videos").count() == 50
    client.close()
    release_lite(path)

    # What a process killed mid-write leaves: an index file cut to nothing, a data file or the
    # collection's manifest (Milvus Lite would fall back to the previous one: 0 rows) cut short.
    pattern = {"index": "*.idx", "data": "*.parquet", "manifest": "manifest.json"}[damaged]
    files = sorted(path.rglob(pattern))
    assert files, f"no {damaged} files found under {path}"
    for file in files:
        os.truncate(file, 0 if damaged == "index" else file.stat().st_size // 2)
    with pytest.raises(MilvusLiteDamagedError) as info:
        connect(path)
    assert isinstance(info.value, BackendUnavailableError)
    message = str(info.value)
    assert f"{str(path)!r}" in message and "not crash-safe" in message
    assert damaged != "manifest" or ("collection 'videos'" in message and "manifest.json" in message)
    assert "move" in message and "resumable" in message and "dns-milvus repair" in message

    # The recovery the message describes: the damaged database moved aside, the path opens afresh.
    path.rename(path.with_name("index.db.damaged"))
    client = connect(path)
    assert client.list_collections() == []
    client.close()


def test_embedded_server_without_the_milvus_package_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dns_milvus.testing.milvus_server import embedded_server

    monkeypatch.setitem(sys.modules, "milvus", None)  # as if the dev extra were not installed
    server = embedded_server(tmp_path)
    with pytest.raises(BackendUnavailableError, match=r"'milvus' package.*pip install -e \.\[dev\]"):
        server.__enter__()
