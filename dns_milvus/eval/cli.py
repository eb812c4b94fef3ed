"""``dns-milvus eval``: score benchmark datasets with a model set and build/run the copy benchmark.

dns-milvus eval tradeoff --dataset NAME <dataset files> --features F.hdf5 [--models DIR] --out DIR
dns-milvus eval copybench build --out DIR [--footage-dir DIR] [--seed N] [--tiny] [--sources NAME ...]
dns-milvus eval copybench run --bench DIR [--models DIR] [--teacher CKPT] --out DIR
dns-milvus eval compare LABEL=RESULTS_DIR ... --out DIR [--method selector]

Errors the user can fix are printed as one line (exit code 2), without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from dns_milvus._cli import run_command
from dns_milvus.errors import InvalidInputError

DATASETS = ("fivr-200k", "fivr-5k", "cc_web", "svd", "evve", "vcdb", "annotation")

#: The files each dataset is read from: (required options, optional options), or a release pickle.
_DATASET_FILES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "fivr-200k": (("annotation", "database"), ()),
    "fivr-5k": (("annotation", "database", "queries"), ()),
    "cc_web": (("root",), ("excluded",)),
    "svd": (("groundtruth",), ("unlabeled",)),
    "evve": (("annots",), ()),
    "vcdb": (("annots",), ("distractors",)),
    "annotation": (("annotation", "database"), ("queries",)),
}
_PICKLE_DATASETS = ("fivr-200k", "fivr-5k", "cc_web", "evve")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse has already printed
        return int(exc.code or 0)
    return run_command(f"dns-milvus eval {args.command}", lambda: args.func(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dns-milvus eval", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "tradeoff", help="mAP against the share re-ranked, and the cost, on a benchmark dataset"
    )
    p.add_argument("--dataset", required=True, choices=DATASETS)
    files = p.add_argument_group("dataset files (as published with each dataset)")
    files.add_argument("--annotation", help="FIVR-format annotation.json (fivr-200k, fivr-5k, annotation)")
    files.add_argument("--database", help="database id list, one a line (FIVR: youtube_ids.txt)")
    files.add_argument("--queries", help="query id list, one a line (FIVR-5K's 50 queries)")
    files.add_argument("--pickle", help="the DnS release's dataset pickle instead (fivr.pickle, ...)")
    files.add_argument("--root", help="CC_WEB_VIDEO directory (Video_List.txt, Seed.txt, GT/)")
    files.add_argument("--excluded", help="CC_WEB_VIDEO cleaned annotation: JSON {query: [ids]}")
    files.add_argument("--groundtruth", help="SVD test_groundtruth")
    files.add_argument("--unlabeled", help="SVD unlabeled-data-id")
    files.add_argument("--annots", help="EVVE annots/ or VCDB annotation/ directory")
    files.add_argument("--distractors", help="VCDB distractor id list")
    p.add_argument(
        "--features", required=True, help="HDF5 region features, one [T, R, D] dataset per video id"
    )
    _models_option(p)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--percentages", default="0:100:5", help="'0:100:5' (start:stop:step) or '0,5,30,100'")
    p.add_argument("--tasks", help="comma-separated tasks (default: all of the dataset's)")
    p.add_argument("--methods", default="selector,oracle,coarse_top,threshold,random",
                   help="selection methods to compare")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=32, help="videos indexed per network call")
    p.add_argument("--chunk-size", type=int, default=512, help="database videos held in memory at once")
    p.add_argument(
        "--count-missing-as-misses",
        action="store_true",
        help="relevant videos without features count as misses (default: dropped, as in the DnS release)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_tradeoff)

    bench = sub.add_parser("copybench", help="the copy-detection benchmark of held-out real footage")
    bench_sub = bench.add_subparsers(dest="action", required=True)
    p = bench_sub.add_parser("build", help="build the benchmark's videos and ground truth")
    p.add_argument("--out", required=True, help="new directory for the benchmark")
    p.add_argument(
        "--footage-dir",
        help="where 'dns-milvus footage fetch' put the footage (default: $DNS_MILVUS_FOOTAGE or ~/.cache)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--tiny", action="store_true", help="a seconds-long format check, not a quality measurement"
    )
    p.add_argument("--sources", nargs="*", default=[], help="held-out footage sources to use (default: all)")
    p.add_argument("--footage", nargs="*", default=[], help="further video files or directories to use")
    p.add_argument("--photos", nargs="*", default=[], help="further still images or directories to use")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_copybench_build, command="copybench build")
    p = bench_sub.add_parser("run", help="extract, score and evaluate a built benchmark")
    p.add_argument("--bench", required=True, help="directory made by 'copybench build'")
    _models_option(p)
    p.add_argument(
        "--teacher", help="teacher checkpoint to report too (default: the model set manifest's 'teacher')"
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--raw-features",
        help="HDF5 cache of the backbone's features before PCA-whitening, shared by model sets with the "
        "same backbone (each set whitens them with its own PCA)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_copybench_run, command="copybench run")

    p = sub.add_parser("compare", help="plot the trade-off curves of several result directories together")
    p.add_argument("runs", nargs="+", help="LABEL=DIR: a directory written by 'tradeoff' or 'copybench run'")
    p.add_argument("--method", default="selector", help="the selection method to compare (default: selector)")
    p.add_argument("--out", required=True, help="output directory for one PNG a task")
    p.set_defaults(func=cmd_compare, command="compare")
    return parser


def _models_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", help="model-set directory (default: the bundled model set)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")


# -- commands --------------------------------------------------------------------------------------


def cmd_compare(args: argparse.Namespace) -> int:
    from dns_milvus.eval.plots import plot_tradeoff

    rows = []
    for run in args.runs:
        label, sep, directory = run.partition("=")
        if not sep or not label or not directory:
            raise InvalidInputError(f"expected LABEL=DIR, got {run!r}")
        path = Path(directory) / "tradeoff.json"
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise InvalidInputError(f"cannot read {path}: {exc}") from exc
        picked = [{**r, "method": label} for r in found if r.get("method") == args.method]
        if not picked:
            raise InvalidInputError(f"{path} has no rows of the method {args.method!r}")
        rows += picked
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for task in sorted({r["task"] for r in rows}):
        written = plot_tradeoff(rows, out / f"compare_{task}.png", task=task, title=f"{task}: {args.method}")
        print(written)
    return 0


def cmd_tradeoff(args: argparse.Namespace) -> int:
    from dns_milvus.eval.features import H5Features
    from dns_milvus.eval.run import score_dataset, write_evaluation
    from dns_milvus.eval.tradeoff import METHODS

    dataset = load_dataset(args.dataset, args)
    methods = _csv(args.methods)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise InvalidInputError(f"unknown selection methods {unknown}; expected some of {', '.join(METHODS)}")
    tasks = _csv(args.tasks) if args.tasks else None
    for task in tasks or ():
        dataset.task(task)
    percentages = parse_percentages(args.percentages)
    started = time.perf_counter()
    # Opened before the (slower) model set loads, so a wrong path fails at once; the feature
    # size is checked against the model set video by video.
    with H5Features(args.features, regions=None, dim=None) as features:
        models = _load_models(args)
        scores, cost = score_dataset(
            models, features, dataset, batch_size=args.batch_size, chunk_size=args.chunk_size,
            progress=not args.json,
        )  # fmt: skip
    summary = write_evaluation(
        scores, cost, dataset, args.out, percentages=percentages, methods=methods, tasks=tasks,
        count_missing=args.count_missing_as_misses,
    )  # fmt: skip
    summary["seconds"] = time.perf_counter() - started
    _print(args, summary, lambda: summary_text(summary, percentages))
    return 0


def cmd_copybench_build(args: argparse.Namespace) -> int:
    from dns_milvus.eval.copybench import BenchConfig, build_copy_benchmark, summarize

    if args.tiny:
        config = BenchConfig.tiny(args.seed, footage=args.footage, photos=args.photos)
    else:
        config = BenchConfig(seed=args.seed, footage=tuple(args.footage), photos=tuple(args.photos))
    if args.sources:
        config = replace(config, catalog=True, sources=tuple(args.sources))
    started = time.perf_counter()
    bench = build_copy_benchmark(args.out, config, footage_dir=args.footage_dir, progress=not args.json)
    summary = {"out": str(bench.root), "seed": config.seed, **summarize(bench)}
    summary["seconds"] = time.perf_counter() - started

    def text() -> str:
        def counts(values: dict[str, int]) -> str:
            return ", ".join(f"{k} {v}" for k, v in values.items())

        return (
            f"copy benchmark in {summary['out']} (seed {summary['seed']}, {summary['seconds']:.1f} s): "
            f"{summary['videos']} videos, {summary['queries']} queries ({counts(summary['query_kinds'])}), "
            f"{summary['database']} database videos, {summary['frames']} frames\n"
            f"  roles: {counts(summary['roles'])}\n  edits: {counts(summary['edits'])}\n"
            f"  labels: {counts(summary['labels'])}\n  footage: {', '.join(summary['footage'])}\n"
            f"  bench.json sha256: {summary['sha256']}"
        )

    _print(args, summary, text)
    return 0


def cmd_copybench_run(args: argparse.Namespace) -> int:
    from dns_milvus.cli import format_table
    from dns_milvus.config import DEFAULT_MODEL_SET
    from dns_milvus.eval.copybench import (
        copy_report_markdown,
        load_copy_benchmark,
        manifest_teacher,
        run_copy_benchmark,
    )

    load_copy_benchmark(args.bench)  # a wrong directory fails before the (slower) model set loads
    models = _load_models(args)
    teacher = args.teacher or manifest_teacher(args.models or DEFAULT_MODEL_SET)
    started = time.perf_counter()
    summary = run_copy_benchmark(
        args.bench, models, args.out, teacher=teacher, raw_features=args.raw_features, progress=not args.json
    )
    summary["seconds"] = time.perf_counter() - started

    def text() -> str:
        ex = summary["extraction"]
        head = (
            f"features: {ex['videos']} videos, {ex['frames']} frames, {ex['seconds']:.1f} s "
            f"({ex['frames_per_second'] or 0:.1f} frames/s{', cached' if ex['reused'] else ''})\n\n"
        )
        cost = summary["tables"].get("DSVR") or []
        table = format_table(
            [[r["run"], r["mAP"], f"{r['kb_per_video']:.2f}", f"{r['s_per_query']:.5f}"] for r in cost],
            ["run", "mAP (DSVR)", "KB / video", "s / query"],
        )
        report = copy_report_markdown(summary["copy_detection"])
        return f"{head}{report}\n\n{table}\n\nfiles in {args.out}"

    _print(args, summary, text)
    return 0


# -- dataset arguments and output ----------------------------------------------------------------


def load_dataset(name: str, args: argparse.Namespace) -> Any:
    """The ``EvalDataset`` named ``name`` from the file options in ``args``."""
    from dns_milvus.eval import datasets as ds

    if getattr(args, "pickle", None):
        if name not in _PICKLE_DATASETS:
            raise InvalidInputError(f"--pickle is for {', '.join(_PICKLE_DATASETS)}, not {name}")
        if name.startswith("fivr"):
            return ds.read_fivr_pickle(args.pickle, name.split("-")[1])
        return (
            ds.read_cc_web_video_pickle(args.pickle) if name == "cc_web" else ds.read_evve_pickle(args.pickle)
        )
    required, _ = _DATASET_FILES[name]
    absent = [f"--{option}" for option in required if not getattr(args, option, None)]
    if absent:
        alt = " (or --pickle with the DnS release's dataset pickle)" if name in _PICKLE_DATASETS else ""
        raise InvalidInputError(f"dataset {name} needs {' and '.join(absent)}{alt}")
    if name in ("fivr-200k", "fivr-5k", "annotation"):
        label = {"fivr-200k": "FIVR-200K", "fivr-5k": "FIVR-5K"}.get(name, Path(args.annotation).parent.name)
        return ds.read_fivr(
            args.annotation, args.database, queries_path=args.queries, name=label or "annotation"
        )
    if name == "cc_web":
        return ds.read_cc_web_video(args.root, excluded_path=args.excluded)
    if name == "svd":
        return ds.read_svd(args.groundtruth, args.unlabeled)
    if name == "evve":
        return ds.read_evve(args.annots)
    return ds.read_vcdb(args.annots, distractors_path=args.distractors)


def parse_percentages(text: str) -> list[float]:
    """``'0:100:5'`` (start:stop:step, stop included) or ``'0,5,30,100'`` -> percentages."""
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if step <= 0:
                raise ValueError
            values = [start + i * step for i in range(int((stop - start) / step + 1e-9) + 1)]
        else:
            values = [float(v) for v in _csv(text)]
    except ValueError:
        raise InvalidInputError(
            f"--percentages {text!r}: expected 'start:stop:step' or a comma-separated list of numbers"
        ) from None
    if not values or any(not 0 <= v <= 100 for v in values):
        raise InvalidInputError(f"--percentages {text!r}: expected values in 0..100")
    return values


def summary_text(summary: dict[str, Any], percentages: Sequence[float]) -> str:
    """mAP per percentage (rows) and method (columns) for each task, then the cost table."""
    from dns_milvus.cli import format_table

    rows = summary["rows"]
    shown = {float(p) for p in percentages}
    blocks = []
    for task in summary["tasks"]:
        methods = list(dict.fromkeys(r["method"] for r in rows if r["task"] == task))
        grid: dict[float, dict[str, float]] = {}
        for r in rows:
            if r["task"] == task and float(r["percentage"]) in shown:
                grid.setdefault(float(r["percentage"]), {})[r["method"]] = r["mAP"]
        table = [[f"{p:g}%", *(grid[p].get(m) for m in methods)] for p in sorted(grid)]
        blocks.append(
            f"{summary['dataset']} {task}: mAP by share re-ranked\n" + format_table(table, ["p", *methods])
        )
        cost_rows = summary["tables"].get(task) or []
        if cost_rows:
            blocks.append(
                format_table(
                    [
                        [r["run"], r["mAP"], f"{r['kb_per_video']:.2f}", f"{r['s_per_query']:.5f}"]
                        for r in cost_rows
                    ],
                    ["run", f"mAP ({task})", "KB / video", "s / query"],
                )
            )
    cost = summary["cost"]
    blocks.append(
        f"{len(cost['queries'])} queries x {cost['database_videos']} database videos on {cost['device']}; "
        f"missing features: {len(cost['missing_queries'])} queries, {len(cost['missing_database'])} database "
        f"videos; files in {Path(summary['files'][0]).parent}"
    )
    return "\n\n".join(blocks)


def _load_models(args: argparse.Namespace) -> Any:
    from dns_milvus.config import DEFAULT_MODEL_SET
    from dns_milvus.engine import ModelSet

    directory = Path(args.models) if args.models else DEFAULT_MODEL_SET
    return ModelSet.load(directory, device=None if args.device == "auto" else args.device)


def _csv(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _print(args: argparse.Namespace, payload: dict[str, Any], text: Any) -> None:
    if args.json:
        print(json.dumps(payload, indent=2, default=str))
    else:
        print(text())
