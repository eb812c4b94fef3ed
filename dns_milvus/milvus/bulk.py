"""Bulk import of rows into a Milvus server: Parquet files, then the server's Import API.

For loading large collections: the rows are written to Parquet files with pymilvus's
``LocalBulkWriter`` (the ``bulk`` extra), the server reads the files itself (one import task a
file) and builds segments from them, instead of receiving every row through upserts.

Where the files must be: the server reads them through its own storage. A server on local
storage (``common.storageType: local``, as the embedded standalone build of the ``milvus``
package runs) reads paths of its own file system: write the files to a directory it can read
and, if it sees that directory under another path (a container mount), give that path as
``server_dir``. A server on MinIO / S3 reads keys of its bucket: copy the files there and give
their key prefix as ``server_dir``.

An import inserts; it does not replace. So rows whose id already has a row are upserted (as
``VideoCollection.upsert`` does) and only the others are imported, which keeps re-importing the
same rows idempotent. Every imported id is then queried back (waiting while the server loads
the new segments): an import that reports success but whose rows do not all read back raises.
Milvus Lite has no Import API: ``BulkImportUnsupportedError`` says so with the server's answer.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from dns_milvus.errors import BackendUnavailableError, InvalidInputError
from dns_milvus.milvus import schema as s
from dns_milvus.milvus._checks import require_seconds
from dns_milvus.milvus.collection import VideoCollection
from dns_milvus.milvus.connection import MilvusOperationError
from dns_milvus.milvus.filters import ids_filter
from dns_milvus.milvus.rows import VideoRow, now_ms, row_to_entity

#: How long to wait for the server's import tasks (its own default expiry is 900 s).
DEFAULT_IMPORT_TIMEOUT_S = 900.0
#: Parquet bytes a file (the writer's chunk): one import task each.
FILE_CHUNK_BYTES = 256 * 2**20
_POLL_S = 0.5
#: Ids a query looks up (one Strong read each: a few hundred ms on a busy server).
_IDS_PER_QUERY = 2048

log = logging.getLogger(__name__)


class BulkImportUnsupportedError(InvalidInputError):
    """A Milvus backend without the Import API (Milvus Lite)."""


class BulkImportError(MilvusOperationError):
    """An import task the server failed, or an import whose rows are not all there."""


@dataclass
class ImportReport:
    """What ``import_rows`` did: ids imported from files, ids upserted (they had a row)."""

    imported: list[str] = field(default_factory=list)
    upserted: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    tasks: list[int] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def import_rows(
    collection: VideoCollection,
    rows: Sequence[VideoRow],
    directory: str | Path,
    *,
    server_dir: str | None = None,
    timeout: float = DEFAULT_IMPORT_TIMEOUT_S,
    keep_files: bool = False,
) -> ImportReport:
    """Write ``rows`` as Parquet files under ``directory`` and have the server import them.

    Every row is checked first (as ``upsert`` checks it) and nothing is written if one fails.
    ``server_dir``: where the server finds ``directory`` (default: the same path). The files are
    removed once imported unless ``keep_files``. Returns which ids were imported and upserted.
    """
    timeout = require_seconds(timeout, "timeout")
    require_import_api(collection)
    stamp = now_ms()
    entities = [row_to_entity(row, collection.dim, collection.model_set, stamp) for row in rows]
    ids = [e[s.F_ID] for e in entities]
    if len(set(ids)) != len(ids):
        raise InvalidInputError("duplicate video ids in one import")
    report = ImportReport()
    t0 = time.perf_counter()
    existing = present_ids(collection, ids) if _row_count(collection) else set()
    if existing:  # an import would add a second row of these ids
        collection.upsert([row for row in rows if row.video_id in existing])
        report.upserted = [vid for vid in ids if vid in existing]
    report.seconds["upsert"] = time.perf_counter() - t0
    new = [e for e in entities if e[s.F_ID] not in existing]
    if not new:
        return report
    t1 = time.perf_counter()
    local_files, batch_dir = _write_parquet(collection, new, Path(directory))
    report.seconds["write_files"] = time.perf_counter() - t1
    try:
        t2 = time.perf_counter()
        server_files = [_server_path(f, Path(directory), server_dir) for f in local_files]
        report.files = server_files
        report.tasks = [_start_import(collection, f) for f in server_files]
        deadline = time.monotonic() + timeout
        _wait(collection, report.tasks, deadline, timeout)
        report.seconds["import"] = time.perf_counter() - t2
        t3 = time.perf_counter()
        wanted = [e[s.F_ID] for e in new]
        _wait_visible(collection, wanted, deadline, timeout, len(server_files))
        report.seconds["visible"] = time.perf_counter() - t3
        report.imported = wanted
    finally:
        if not keep_files:
            shutil.rmtree(batch_dir, ignore_errors=True)
    return report


def require_import_api(collection: VideoCollection) -> None:
    """Raise ``BulkImportUnsupportedError`` where the backend has no Import API (Milvus Lite
    answers UNIMPLEMENTED; the call names no file, so it imports nothing anywhere)."""
    if collection.backend != "lite":
        return
    try:
        _handler(collection).do_bulk_insert(collection.name, "", [], timeout=collection.timeout)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            raise BulkImportUnsupportedError(
                f"Milvus Lite ({collection.backend} backend of {collection.name!r}) has no bulk import: "
                f"its server answers the Import call with {exc.code().name} ({exc.details()}). Write the "
                "rows with upserts (DnSIndex.add_many without import_dir, or dns-milvus ingest), or "
                "import into a Milvus server"
            ) from None
        raise
    raise BulkImportUnsupportedError(
        f"Milvus Lite accepted an Import call for {collection.name!r} without files; bulk import is "
        "only supported on a Milvus server"
    )


def _row_count(collection: VideoCollection) -> int:
    """Rows in the collection, at Strong consistency: an empty one (the first load of a large
    collection) needs no look-up of each id."""
    with collection._errors("count the rows"):
        rows = collection.client.query(collection.name, filter="", output_fields=["count(*)"],
                                       consistency_level="Strong", timeout=collection.timeout)  # fmt: skip
    return int(rows[0]["count(*)"])


def present_ids(collection: VideoCollection, ids: Sequence[str]) -> set[str]:
    """The ids of ``ids`` that have a row, read at Strong consistency (an import is another
    writer than this session)."""
    found: set[str] = set()
    for start in range(0, len(ids), _IDS_PER_QUERY):
        chunk = list(ids[start : start + _IDS_PER_QUERY])
        with collection._errors(f"look up {len(chunk)} ids"):
            rows = collection.client.query(
                collection.name, filter=ids_filter(chunk).render(), output_fields=[s.F_ID],
                consistency_level="Strong", timeout=collection.timeout,
            )  # fmt: skip
        found.update(row[s.F_ID] for row in rows)
    return found


def _wait_visible(
    collection: VideoCollection, wanted: list[str], deadline: float, timeout: float, files: int
) -> None:
    """Wait until every imported id reads back. A completed task's segments are loaded by the
    server's next check for new segments (Milvus 2.3: ~10 s later), so this polls."""
    missing = list(wanted)
    while True:
        missing = sorted(set(missing) - present_ids(collection, missing))
        if not missing:
            return
        if time.monotonic() > deadline:
            raise BulkImportError(
                f"the server reported the import of {files} files into {collection.name!r} done, but "
                f"{len(missing)} of its {len(wanted)} ids do not read back after {timeout:g} s "
                f"(e.g. {missing[:5]})"
            )
        time.sleep(_POLL_S)


def _write_parquet(
    collection: VideoCollection, entities: list[dict[str, Any]], directory: Path
) -> tuple[list[Path], Path]:
    try:
        from pymilvus.bulk_writer import BulkFileType, LocalBulkWriter
    except ModuleNotFoundError as exc:
        raise InvalidInputError(
            f"bulk import needs pymilvus's bulk writer: pip install 'dns-milvus[bulk]' ({exc})"
        ) from None
    directory.mkdir(parents=True, exist_ok=True)
    writer = LocalBulkWriter(s.build_schema(collection.dim), str(directory), chunk_size=FILE_CHUNK_BYTES,
                             file_type=BulkFileType.PARQUET)  # fmt: skip
    batch_dir = Path(writer.data_path)
    try:
        for entity in entities:  # float32 arrays: the writer's fastest check of a vector
            writer.append_row(entity)
        writer.commit()
    except Exception:
        shutil.rmtree(batch_dir, ignore_errors=True)
        raise
    return [Path(f) for group in writer.batch_files for f in group], batch_dir


def _server_path(local: Path, directory: Path, server_dir: str | None) -> str:
    if server_dir is None:
        return str(local.absolute())
    return f"{server_dir.rstrip('/')}/{local.relative_to(directory).as_posix()}"


def _handler(collection: VideoCollection) -> Any:
    # MilvusClient has no import call; its connection handler has the Import RPC (the same one
    # the deprecated ORM `utility.do_bulk_insert` calls).
    return collection.client._get_connection()


def _start_import(collection: VideoCollection, path: str) -> int:
    with collection._errors(f"start importing {path}"):
        task = _handler(collection).do_bulk_insert(collection.name, "", [path], timeout=collection.timeout)
    return int(task)


def _wait(collection: VideoCollection, tasks: list[int], deadline: float, timeout: float) -> None:
    """Wait until every task is completed (its rows persisted and indexed); raise on a failed one."""
    from pymilvus.client.types import BulkInsertState

    pending = set(tasks)
    while pending:
        for task in sorted(pending):
            with collection._errors(f"read the state of import task {task}"):
                state = _handler(collection).get_bulk_insert_state(task, timeout=collection.timeout)
            if state.state in (BulkInsertState.ImportFailed, BulkInsertState.ImportFailedAndCleaned):
                reason = state.infos.get("failed_reason") or state.state_name
                raise BulkImportError(f"Milvus failed import task {task} of {collection.name!r}: {reason}")
            if state.state == BulkInsertState.ImportCompleted:
                pending.discard(task)
        if not pending:
            return
        if time.monotonic() > deadline:
            raise BackendUnavailableError(
                f"Milvus has not finished importing into {collection.name!r} after {timeout:g} s "
                f"(tasks {sorted(pending)} pending): the rows may still arrive; wait until those tasks "
                "end before importing their ids again (an id imported twice has two rows)"
            )
        time.sleep(_POLL_S)
