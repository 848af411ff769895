"""Every csrc/**/*.cu compiles for Hopper (nvcc -c -arch=sm_90) wherever nvcc exists; .cu files take no
torch headers, so this needs no CUDA torch."""
import glob
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("src", SOURCES, ids=[os.path.relpath(s, ROOT) for s in SOURCES])
def test_cu_compiles_for_sm90(src, tmp_path):
    cmd = ["nvcc", "-c", "-arch=sm_90", "-std=c++17", "-O3", "-I", os.path.join(ROOT, "csrc"), src,
           "-o", str(tmp_path / "k.o")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    includes = re.findall(r"#include\s*[<\"]([^>\"]+)", open(src).read())
    assert not [h for h in includes if h.startswith(("torch", "ATen", "c10"))], f"torch headers in {src}"

