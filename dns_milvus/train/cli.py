"""``dns-milvus train``: run one training stage from a config file, or build the default model set.

dns-milvus train pca|itq|teacher|mine|students|selector --config stage.toml [--json]
dns-milvus train default [--out DIR] [--quick] [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys

from dns_milvus._cli import run_command
from dns_milvus.train.stages import STAGES, run_stage


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "default":
        from dns_milvus.train.model_set import main as build_main

        return build_main(argv[1:])
    parser = argparse.ArgumentParser(prog="dns-milvus train", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=[*STAGES, "default"], help="the stage to run ('default': whole set)")
    parser.add_argument("--config", required=True, help="JSON or TOML file with the stage's settings")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    return run_command(f"dns-milvus train {args.stage}", lambda: _run(args.stage, args.config, args.json))


def _run(stage: str, config: str, as_json: bool) -> int:
    result = run_stage(stage, config)
    summary = {
        "stage": result.stage,
        "outputs": {k: str(v) for k, v in result.outputs.items()},
        "summary": result.summary,
    }
    if as_json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(f"stage {result.stage} done in {result.summary.get('seconds', '?')} s")
        for role, path in summary["outputs"].items():
            print(f"  {role}: {path}")
    return 0
