"""benchmarks/gpu_check.sh on a machine without an NVIDIA GPU: it says so and exits 0."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def _gpu_listed() -> bool:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    return out.returncode == 0 and bool(out.stdout.strip())


def test_gpu_check_without_a_gpu_says_so_and_exits_0(tmp_path: Path) -> None:
    if _gpu_listed():
        pytest.skip("this machine has an NVIDIA GPU: the check would install CUDA torch and run")
    out = tmp_path / "gpu_check.json"
    venv = tmp_path / "venv"
    done = subprocess.run(
        ["bash", str(SCRIPT)],
        env={"PATH": "/usr/bin:/bin", "GPU_CHECK_OUT": str(out), "GPU_CHECK_VENV": str(venv)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "no NVIDIA GPU" in done.stdout
    assert json.loads(out.read_text()) == {
        "gpu": False,
        "checked": False,
        "reason": "no NVIDIA GPU (nvidia-smi missing or lists none)",
    }
    assert not venv.exists()  # nothing installed
