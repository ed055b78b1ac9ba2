"""A real install: a fresh virtual environment with only the core dependencies (slow: ~1-2 minutes,
torch comes from the local package index)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_architecture import CORE_SCRIPT

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_fresh_venv_with_core_dependencies_trains_through_the_switch(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    # a wheel built from the tree, as a user gets it (package data included or not)
    res = subprocess.run([str(py), "-m", "pip", "install", "-q", str(ROOT)], capture_output=True, text=True,
                         timeout=1200)
    if res.returncode != 0:
        pytest.skip(f"pip cannot install here: {res.stderr.strip()[-300:]}")
    listed = subprocess.run([str(py), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                            check=True).stdout.lower()
    names = {line.split("==")[0] for line in listed.splitlines()}
    assert {"torch", "numpy", "scipy", "tqdm", "modeopt"} <= names
    assert not names & {"transformers", "torchvision", "matplotlib", "accelerate", "safetensors", "peft", "lightning"}, names
    probe = CORE_SCRIPT + (
        "\nfrom modeopt.modespace.kernels import fused_available\n"
        f"assert fused_available() or {shutil.which('cc') is None and shutil.which('gcc') is None}, "
        "'the C kernels did not build from the installed package'\n"
    )
    out = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]
