"""Start-up cost of the command line: what one ``dns-milvus`` call pays before and after its work.

Three calls, each in fresh processes (min / median of ``--repeats``):

- ``dns-milvus --help``;
- ``dns-milvus search --id ...`` on the demo index (``dns-milvus demo``: 16 videos in Milvus Lite);
- the same on a big Milvus Lite index (``--big-rows``, 100k by default) of synthetic videos
  indexed by the bundled model set (pool records replicated as in ``bench_query_latency``).

Two measurements of each: the wall time of the real command (``python -m dns_milvus.cli``,
from the fork of the interpreter to its exit), and, in a separate process, the split of one
call into phases: interpreter start, imports (torch, pymilvus, the project), model-set load,
feature extractor, Milvus connect (opening the collection), search (its first call into
Milvus included), and the whole call. The split wraps the project's own functions with timers
and then runs the command's ``main``; phases that run at the same time overlap.

``--baseline DIR`` measures another checkout of the project (e.g. a ``git worktree`` of the
previous commit) the same way, interleaved with this one, call by call, and prints both side
by side. The indexes are built once under ``--workdir`` and reused (the 100k index takes
about 15 minutes and 4.3 GB on 2 busy cores; ``--big-rows 0`` skips it).

    python benchmarks/bench_startup.py [--big-rows 100000] [--baseline /tmp/startup-base]
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    DEFAULT_FRAMES,
    base_parser,
    frame_counts,
    parse_frames,
    print_table,
    random_features,
    write_report,
)

NAME = "startup"
REPO = Path(__file__).resolve().parent.parent
DEMO_COLLECTION = "demo"
DEMO_QUERY = "bikes~copy1"
BIG_COLLECTION = "videos"
BIG_QUERY = "video000000"
#: Distinct synthetic videos behind the big index (each replicated under many ids).
BIG_POOL = 64
#: Phases of the split, in call order.
PHASES = (
    "python_start",
    "import_torch",
    "import_pymilvus",
    "import_project",
    "model_set_load",
    "extractor",
    "milvus_connect",
    "search",
    "total",
    "teardown",
)
TARGETS_S = {"help": 0.2, "search_demo": 1.8, "search_big": 3.0}


# -- the indexes ----------------------------------------------------------------------------------


def build_demo_index(directory: Path) -> dict[str, Any]:
    """The demo's index (``dns-milvus demo --workdir DIR``), built once."""
    if not (directory / "demo.db").exists():
        print(f"building the demo index in {directory} (about a minute)", flush=True)
        subprocess.run(
            [sys.executable, "-m", "dns_milvus.cli", "demo", "--workdir", str(directory), "--json"],
            check=True,
            stdout=subprocess.DEVNULL,
            cwd=REPO,
        )
    return {
        "uri": str(directory / "demo.db"),
        "store": str(directory / "objects"),
        "collection": DEMO_COLLECTION,
    }


def build_big_index(directory: Path, rows: int, frames: tuple[int, int], seed: int) -> dict[str, Any]:
    """A Milvus Lite index of ``rows`` synthetic videos indexed by the bundled model set, built
    once (a marker file remembers its size) under an IVF_FLAT index as ``IndexConfig.for_rows``
    picks it."""
    import numpy as np
    from bench_query_latency import fill

    from dns_milvus.config import DEFAULT_MODEL_SET
    from dns_milvus.engine import DnSIndex, ModelSet
    from dns_milvus.milvus import IndexConfig, release_lite

    marker = directory / "built.json"
    wanted = {"rows": rows, "frames": list(frames), "seed": seed}
    paths = {
        "uri": str(directory / "index.db"),
        "store": str(directory / "objects"),
        "collection": BIG_COLLECTION,
    }
    if marker.is_file() and json.loads(marker.read_text()).get("options") == wanted:
        return {**paths, **json.loads(marker.read_text())}
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    print(f"building a {rows}-video Milvus Lite index in {directory}", flush=True)
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    models = ModelSet.load(DEFAULT_MODEL_SET, device="cpu")
    pool = models.index_features([random_features(rng, int(t)) for t in frame_counts(rng, BIG_POOL, frames)])
    index = DnSIndex(
        paths["uri"],
        models=models,
        store=f"file://{paths['store']}?fsync=false",
        collection=BIG_COLLECTION,
        index=IndexConfig("FLAT"),
    )
    with index:
        filled = fill(index, pool, 0, rows, rng)
        config = IndexConfig.for_rows(rows, backend="lite")
        index_started = time.perf_counter()
        index.collection.set_index(config)
        filled["index"] = {"kind": config.kind, **config.build_params()}
        filled["index_build_s"] = round(time.perf_counter() - index_started, 1)
    release_lite(Path(paths["uri"]))
    built = {"options": wanted, "build_s": round(time.perf_counter() - started, 1), "fill": filled}
    marker.write_text(json.dumps(built, indent=2) + "\n")
    print(f"built in {built['build_s']:.0f} s: {filled}", flush=True)
    return {**paths, **built}


# -- measuring ------------------------------------------------------------------------------------


def scenarios(demo: dict[str, Any], big: dict[str, Any] | None) -> dict[str, list[str]]:
    """The calls measured, by name: their command-line arguments."""

    def search(index: dict[str, Any], query: str) -> list[str]:
        where = ["--uri", index["uri"], "--store", index["store"], "--collection", index["collection"]]
        return ["search", "--id", query, *where, "-k", "10"]

    calls = {"help": ["--help"], "search_demo": search(demo, DEMO_QUERY)}
    if big is not None:
        calls["search_big"] = search(big, BIG_QUERY)
    return calls


def _environment(tree: Path) -> dict[str, str]:
    """The checkout ``tree`` first on the path (ahead of the installed project)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree)
    return env


def run_cli(tree: Path, argv: list[str], scratch: Path) -> tuple[float, float]:
    """Wall time of ``python -m dns_milvus.cli ARGV`` with ``tree``'s code, fork to exit, and the
    CPU time (user + system) of the process: on a box other work keeps busy, the wall time
    stretches with the load much more than the CPU time does."""
    started = time.perf_counter()
    with subprocess.Popen(
        [sys.executable, "-m", "dns_milvus.cli", *argv],
        cwd=scratch,
        env=_environment(tree),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    ) as process:
        assert process.stderr is not None
        errors = process.stderr.read()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{tree}: dns-milvus {' '.join(argv)} failed: {errors[-2000:].decode()}")
    return elapsed, usage.ru_utime + usage.ru_stime


def run_probe(tree: Path, argv: list[str], scratch: Path) -> dict[str, Any]:
    """The phases of one call with ``tree``'s code (``_startup_probe.py``)."""
    out = scratch / "probe.json"
    probe = Path(__file__).resolve().parent / "_startup_probe.py"
    started = time.time()
    done = subprocess.run(
        [sys.executable, str(probe), repr(started), str(out), "--", *argv],
        cwd=scratch,
        env=_environment(tree),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0 or not out.is_file():
        raise RuntimeError(f"{tree}: probe of dns-milvus {' '.join(argv)} failed: {done.stderr[-2000:]}")
    ended = time.time()
    report = json.loads(out.read_text())
    out.unlink()
    report["phases_s"]["teardown"] = round(ended - report["ended"], 4)  # exit handlers, finalisation
    return report


def min_median(values: list[float]) -> dict[str, Any]:
    return {"min": round(min(values), 3), "median": round(statistics.median(values), 3), "runs": values}


def measure(
    trees: dict[str, Path], calls: dict[str, list[str]], repeats: int, scratch: Path
) -> dict[str, Any]:
    """Each call on each tree: one warm-up, then ``repeats`` rounds, the trees interleaved in each."""
    results: dict[str, Any] = {}
    for call, argv in calls.items():
        for tree in trees.values():  # fills the page cache with the index's files
            run_cli(tree, argv, scratch)
        runs: dict[str, dict[str, dict[str, list[float]]]] = {
            label: {"wall_s": {}, "cpu_s": {}} for label in trees
        }
        loads: list[float] = []
        modules: dict[str, list[str]] = {}  # which of torch, pymilvus ... the call imported
        for _ in range(repeats):
            for label, tree in trees.items():
                loads.append(os.getloadavg()[0])
                wall, cpu = run_cli(tree, argv, scratch)
                probe = run_probe(tree, argv, scratch)
                modules[label] = probe["modules"]
                walls = {"command": wall, **probe["phases_s"]}
                cpus = {"command": cpu, **probe["phases_cpu_s"]}
                for phase in ("command", *PHASES):
                    runs[label]["wall_s"].setdefault(phase, []).append(round(walls.get(phase, 0.0), 4))
                    runs[label]["cpu_s"].setdefault(phase, []).append(round(cpus.get(phase, 0.0), 4))
        results[call] = {
            "argv": argv,
            "load_average_1m": {"min": min(loads), "max": max(loads)},
            **{
                label: {
                    "imported": modules[label],
                    **{
                        kind: {phase: min_median(values) for phase, values in by_phase.items()}
                        for kind, by_phase in runs[label].items()
                    },
                }
                for label in trees
            },
        }
        print_call(call, results[call], list(trees))
    return results


#: How the tables name the rows.
ROW_NAMES = {
    "command": "the real command",
    "total": "total (to the end of main)",
    "teardown": "teardown (exit handlers, finalisation)",
}


def print_call(call: str, result: dict[str, Any], labels: list[str]) -> None:
    load = result["load_average_1m"]
    shown = " ".join(result["argv"][:3])
    print(f"\n{call}: dns-milvus {shown} ...  (load average {load['min']:.1f}-{load['max']:.1f})")
    headers = ["phase"] + [f"{label} wall min / median" for label in labels]
    if len(labels) == 2:
        headers.append("speed-up")
    headers += [f"{label} CPU median" for label in labels]
    rows = []
    for phase in ("command", *PHASES):
        cells: list[object] = [ROW_NAMES.get(phase, phase)]
        walls = [result[label]["wall_s"][phase] for label in labels]
        cells += [f"{w['min']:.3f} / {w['median']:.3f}" for w in walls]
        if len(labels) == 2:
            cells.append(f"{walls[0]['median'] / walls[1]['median']:.2f}x" if walls[1]["median"] else "-")
        cells += [f"{result[label]['cpu_s'][phase]['median']:.3f}" for label in labels]
        rows.append(cells)
    print_table(headers, rows)
    print(
        "(seconds; CPU: the real command's user + system time, and each phase's own thread time: "
        "none before the interpreter runs, none in total/teardown but the command's)"
    )
    for label in labels:
        print(f"{label} imported: {', '.join(result[label]['imported']) or 'neither torch nor pymilvus'}")
    target = TARGETS_S.get(call)
    if target is not None:
        best = result[labels[-1]]["wall_s"]["command"]["median"]
        print(f"target {target:g} s: median wall {best:.2f} s ({'met' if best <= target else 'NOT met'})")


# -- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0], NAME)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per call and checkout")
    parser.add_argument(
        "--big-rows", type=int, default=100_000, help="videos in the big Milvus Lite index (0: skip it)"
    )
    parser.add_argument(
        "--big-frames", type=parse_frames, default=DEFAULT_FRAMES, help="frames of its synthetic videos"
    )
    parser.add_argument(
        "--baseline", type=Path, default=None, help="another checkout of the project, measured the same way"
    )
    parser.add_argument(
        "--calls",
        default=",".join(TARGETS_S),
        help="which calls to measure (comma list of help, search_demo, search_big)",
    )
    parser.set_defaults(workdir=Path(os.environ.get("TMPDIR", "/tmp")) / "dns-startup-bench")
    args = parser.parse_args(argv)
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    demo = build_demo_index(work / "demo")
    big = (
        build_big_index(work / f"big-{args.big_rows}", args.big_rows, args.big_frames, args.seed)
        if args.big_rows
        else None
    )
    scratch = work / "cwd"  # no dns-milvus.toml here
    scratch.mkdir(exist_ok=True)
    trees = {"current": REPO}
    if args.baseline is not None:
        trees = {"baseline": args.baseline.resolve(), **trees}
    wanted = {name.strip() for name in args.calls.split(",") if name.strip()}
    calls = {name: argv for name, argv in scenarios(demo, big).items() if name in wanted}
    results = measure(trees, calls, args.repeats, scratch)
    body = {
        "trees": {label: str(path) for label, path in trees.items()},
        "targets_s": TARGETS_S,
        "big_index": None
        if big is None
        else {"rows": args.big_rows, **{k: big[k] for k in ("build_s", "fill")}},
        "calls": results,
    }
    write_report(args.out, NAME, args, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
