"""The sampling / selection / mixture Triton kernels compile for sm_90 (no GPU needed).

Runs tests/_compile_sm90.py in a subprocess with TRITON_INTERPRET unset, so the kernels go through
the real compiler (TTIR -> PTX -> cubin with Triton's bundled ptxas), which rejects things the
interpreter accepts.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton


def _ptxas() -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not _ptxas().exists(), reason="Triton's NVIDIA backend (bundled ptxas) is not installed")
def test_kernels_compile_for_sm90():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "_compile_sm90.py")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    failed = [r for r in results if not r["ok"]]
    assert proc.returncode == 0 and results and not failed, (proc.stderr[-4000:], failed)
    for r in results:
        # One CTA per SM at most: the budget is 65536 registers / (32 * num_warps) threads.
        assert r["registers"] is not None and r["registers"] <= 255, r
