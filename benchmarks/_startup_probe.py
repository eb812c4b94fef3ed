"""One ``dns-milvus`` call, split into phases (run by ``bench_startup.py`` in a fresh interpreter).

    python _startup_probe.py SPAWN_TIME OUT.json -- CLI ARGS...

Nothing is imported before the command's own imports but the standard library. An import hook
times the imports of torch, pymilvus and every project module, and wraps the project functions
the phases are made of as their modules load; then the command's ``main`` runs. Each phase is
the time spent in its spans minus the spans nested in them (per thread), so a phase is counted
once; spans in other threads (Milvus opened while torch loads) overlap the main thread's. The
same split in CPU time (each thread's own) barely depends on how busy the machine is.
"""

import time

STARTED = time.time()  # first: the interpreter's start-up ends here

import contextlib  # noqa: E402
import functools  # noqa: E402
import importlib.abc  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from collections import defaultdict  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from typing import Any  # noqa: E402

#: Phase of a module's import: top-level packages by name, the project's modules by prefix.
IMPORT_PHASES = {"torch": "import_torch", "pymilvus": "import_pymilvus"}
PROJECT = "dns_milvus"
EXTRACTOR_MODULES = "dns_milvus.features"
#: (module, attribute path, phase): project functions the phases are made of.
CALLS = (
    ("dns_milvus.engine.modelset", "ModelSet.load", "model_set_load"),
    ("dns_milvus.engine.numpy_set", "NumpyModelSet.load", "model_set_load"),
    ("dns_milvus.features.extractor", "FeatureExtractor.__init__", "extractor"),
    ("dns_milvus.milvus.connection", "connect", "milvus_connect"),
    ("dns_milvus.milvus.collection", "VideoCollection.create", "milvus_connect"),
    ("dns_milvus.engine.index", "DnSIndex.search", "search"),
)


class Spans:
    """Exclusive time by phase: a span's time less that of the spans it contains (per thread)."""

    def __init__(self) -> None:
        self.exclusive: dict[str, float] = defaultdict(float)
        self.exclusive_cpu: dict[str, float] = defaultdict(float)  # the thread's CPU time
        self.first_start: dict[str, float] = {}  # time.time() at a phase's first span
        self.local = threading.local()
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def span(self, phase: str) -> Iterator[None]:
        stack = self.local.__dict__.setdefault("stack", [])
        start, start_cpu, wall = time.perf_counter(), time.thread_time(), time.time()
        stack.append([0.0, 0.0])  # time and CPU time of the children
        try:
            yield
        finally:
            inclusive, inclusive_cpu = time.perf_counter() - start, time.thread_time() - start_cpu
            children, children_cpu = stack.pop()
            if stack:
                stack[-1][0] += inclusive
                stack[-1][1] += inclusive_cpu
            with self.lock:
                self.exclusive[phase] += inclusive - children
                self.exclusive_cpu[phase] += inclusive_cpu - children_cpu
                self.first_start[phase] = min(wall, self.first_start.get(phase, wall))


SPANS = Spans()


def _wrap(owner: Any, name: str, phase: str) -> None:
    raw = owner.__dict__[name]
    is_classmethod = isinstance(raw, classmethod)
    function = raw.__func__ if is_classmethod else raw

    @functools.wraps(function)
    def timed(*args: Any, **kwargs: Any) -> Any:
        with SPANS.span(phase):
            return function(*args, **kwargs)

    setattr(owner, name, classmethod(timed) if is_classmethod else timed)


def _patch(module: Any) -> None:
    for module_name, path, phase in CALLS:
        if module.__name__ == module_name:
            *owners, name = path.split(".")
            owner = module
            for part in owners:
                owner = getattr(owner, part, None)
            if owner is not None and name in getattr(owner, "__dict__", {}):  # another version may lack it
                _wrap(owner, name, phase)


def _import_phase(name: str) -> str | None:
    if name in IMPORT_PHASES:
        return IMPORT_PHASES[name]
    if name == EXTRACTOR_MODULES or name.startswith(EXTRACTOR_MODULES + "."):
        return "extractor"
    if name == PROJECT or name.startswith(PROJECT + "."):
        return "import_project"
    return None


class TimedImports(importlib.abc.MetaPathFinder):
    """Times the watched modules' execution and patches the project's when they are loaded."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        phase = _import_phase(name)
        if phase is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        execute = loader.exec_module

        def exec_module(module: Any) -> None:
            with SPANS.span(phase):
                execute(module)
            _patch(module)

        loader.exec_module = exec_module
        return spec


def main() -> None:
    spawned, out = float(sys.argv[1]), sys.argv[2]
    argv = sys.argv[sys.argv.index("--") + 1 :]
    sys.meta_path.insert(0, TimedImports())
    code: Any = 0
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        try:
            from dns_milvus.cli import main as cli_main

            code = cli_main(argv)
        except SystemExit as exc:  # --help
            code = exc.code
    ended = time.time()
    phases = {"python_start": STARTED - spawned, **SPANS.exclusive, "total": ended - spawned}
    cpu = {**SPANS.exclusive_cpu, "main_thread": time.thread_time(), "process": time.process_time()}
    report = {
        "exit_code": code,
        "ended": ended,
        "phases_s": {k: round(v, 4) for k, v in phases.items()},
        "phases_cpu_s": {k: round(v, 4) for k, v in cpu.items()},
        "starts_s": {k: round(v - spawned, 4) for k, v in SPANS.first_start.items()},
        "output_lines": len(printed.getvalue().splitlines()),
        "modules": sorted(m for m in ("torch", "pymilvus", "torch._dynamo", "sympy") if m in sys.modules),
    }
    with open(out, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
