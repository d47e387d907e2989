"""The JIT fallback of bcdcore/_compiled.py: when the prebuilt `bcdcore._C` is missing, the CPU ops are built
once with torch.utils.cpp_extension.load into $BCD_EXT_CACHE, match `reference`, and later processes import
the cached build without compiling; a failed build is remembered and not retried, and the engine falls back to
`reference`. Each case runs in a fresh process in which the prebuilt modules cannot be imported."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

PROBE = r"""
import json, sys
sys.modules["bcdcore._C"] = None  # as if the package had been installed without compiling
sys.modules["bcdcore._C_cuda"] = None
import torch
from bcdcore import ops
info = {"backends": ops.available_backends()}
if "cpu" in info["backends"]:
    from bcdcore import _compiled
    info.update(_compiled.info())
    gen = torch.Generator().manual_seed(int(sys.argv[1]))
    x, g, a = (torch.randn(10_007, generator=gen) for _ in range(3))
    want, got = x.clone(), x.clone()
    ref = ops.prox_sgd_step_(want, g, a, lr=0.1, lam=0.3, backend="reference")
    res = ops.prox_sgd_step_(got, g, a, lr=0.1, lam=0.3, backend="cpu")
    info["max_diff"] = (got - want).abs().max().item()
    info["norm_diff"] = max(abs(r.item() - s.item()) / s.item() for r, s in zip(res, ref))
print(json.dumps(info))
"""


def _probe(cache: Path, **env: str) -> tuple[dict, str]:
    full = dict(os.environ, BCD_EXT_CACHE=str(cache), BCD_NO_CUDA="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
                **env)
    full.pop("BCD_NO_JIT", None)
    full["PATH"] = os.path.dirname(sys.executable) + os.pathsep + full.get("PATH", "")  # the venv's ninja
    seed = str(int.from_bytes(os.urandom(4), "little"))
    proc = subprocess.run([sys.executable, "-c", PROBE, seed], capture_output=True, text=True, env=full,
                          cwd=cache.parent, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.mark.slow
def test_jit_build_once_then_cached(tmp_path):
    cache = tmp_path / "ext"
    first, err = _probe(cache)
    assert first["cpu_build"] == "jit" and "cpu" in first["backends"], (first, err[-2000:])
    assert "compiling the cpu fused ops once" in err
    assert first["max_diff"] <= 1e-6 and first["norm_diff"] <= 1e-5
    assert list(cache.rglob("*.so")), "the build is cached"
    second, err = _probe(cache)
    assert second["cpu_build"] == "jit" and "compiling" not in err  # imported from the cache
    assert second["max_diff"] <= 1e-6


def test_failed_jit_build_is_remembered_and_the_engine_falls_back(tmp_path):
    cache = tmp_path / "ext"
    info, err = _probe(cache, CXX="false")  # a compiler that always fails
    assert info["backends"] == ["reference"], info
    (failed,) = cache.rglob("FAILED")
    assert failed.read_text().strip()
    info, err = _probe(cache, CXX="false")
    assert info["backends"] == ["reference"]
    assert "compiling" not in err  # not retried: the FAILED file says why
