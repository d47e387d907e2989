"""The JIT fallback of bcdcore/compiled.py: when the prebuilt `bcdcore._C` is missing, the CPU ops are built
once with torch.utils.cpp_extension.load into $BCD_EXT_CACHE (from the checkout's csrc/, or the sources an
installed package ships), match `reference`, and later processes import the cached build without compiling; a failed build is remembered and not retried, and the engine falls back to
`reference`. Each case runs in a fresh process in which the prebuilt modules cannot be imported. The sdist carries
csrc/, and a package installed from it (without its extensions) JIT-builds from the sources it ships."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
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
    from bcdcore.ops import compiled
    info.update(compiled.info())
    info["csrc"] = str(compiled.CSRC)
    gen = torch.Generator().manual_seed(int(sys.argv[1]))
    x, g, a = (torch.randn(10_007, generator=gen) for _ in range(3))
    want, got = x.clone(), x.clone()
    ref = ops.prox_sgd_step_(want, g, a, lr=0.1, lam=0.3, backend="reference")
    res = ops.prox_sgd_step_(got, g, a, lr=0.1, lam=0.3, backend="cpu")
    info["max_diff"] = (got - want).abs().max().item()
    info["norm_diff"] = max(abs(r.item() - s.item()) / s.item() for r, s in zip(res, ref))
print(json.dumps(info))
"""


def _probe(cache: Path, pythonpath: Path = REPO, **env: str) -> tuple[dict, str]:
    full = dict(os.environ, BCD_EXT_CACHE=str(cache), BCD_NO_CUDA="1", PYTHONPATH=str(pythonpath),
                OMP_NUM_THREADS="1", **env)
    full.pop("BCD_NO_JIT", None)
    full["PATH"] = os.path.dirname(sys.executable) + os.pathsep + full.get("PATH", "")  # the venv's ninja
    seed = str(int.from_bytes(os.urandom(4), "little"))
    proc = subprocess.run([sys.executable, "-c", PROBE, seed], capture_output=True, text=True, env=full,
                          cwd=cache.parent, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_failed_jit_build_is_remembered_and_the_engine_falls_back(tmp_path):
    cache = tmp_path / "ext"
    info, err = _probe(cache, CXX="false")  # a compiler that always fails
    assert info["backends"] == ["reference"], info
    from bcdcore.ops.compiled import CSRC
    assert CSRC == REPO / "csrc"  # in a checkout the JIT build compiles its csrc/
    (failed,) = cache.rglob("FAILED")
    assert failed.read_text().strip()
    info, err = _probe(cache, CXX="false")
    assert info["backends"] == ["reference"]
    assert "compiling" not in err  # not retried: the FAILED file says why


def _csrc_files() -> list[str]:
    return sorted(p.name for pat in ("*.h", "*.cpp", "*.cu") for p in (REPO / "csrc").glob(pat))


@pytest.fixture(scope="module")
def installed_sdist(tmp_path_factory) -> tuple[Path, Path]:
    """(the sdist, a folder the sdist is installed into with pip --target), built with BCD_NO_EXT=1: the package
    as a user gets it when the extensions are not compiled at install time."""
    tmp = tmp_path_factory.mktemp("sdist")
    env = dict(os.environ, BCD_NO_EXT="1")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    # egg_info --egg-base keeps the metadata out of the checkout
    proc = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp), "sdist",
                           "--dist-dir", str(tmp / "dist")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sdist,) = (tmp / "dist").glob("*.tar.gz")
    target = tmp / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", "--target", str(target), str(sdist)], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sdist, target


def test_sdist_ships_the_sources_and_the_install_keeps_them(installed_sdist):
    sdist, target = installed_sdist
    with tarfile.open(sdist) as tar:
        names = {Path(n).relative_to(Path(n).parts[0]).as_posix() for n in tar.getnames() if len(Path(n).parts) > 1}
    for f in _csrc_files():
        assert f"csrc/{f}" in names, f"{f} is missing from the sdist"
    shipped = sorted(p.name for p in (target / "bcdcore" / "_csrc").iterdir() if p.suffix in (".h", ".cpp", ".cu"))
    assert shipped == _csrc_files()
    assert not list((target / "bcdcore").glob("_C*.so")), "BCD_NO_EXT=1 installs no compiled module"


@pytest.mark.slow
def test_jit_build_from_an_installed_package_once_then_cached(installed_sdist, tmp_path):
    """An install without a checkout next to it: the JIT fallback compiles the sources shipped in the package
    once, matches `reference`, and the next process imports the cached build without compiling. (One build
    for the whole file: each takes about 35 s on 2 cores.)"""
    _, target = installed_sdist
    cache = tmp_path / "ext"
    info, err = _probe(cache, pythonpath=target)
    assert info["cpu_build"] == "jit" and "cpu" in info["backends"], (info, err[-2000:])
    assert "compiling the cpu fused ops once" in err
    assert Path(info["csrc"]) == target / "bcdcore" / "_csrc"
    assert info["max_diff"] <= 1e-6 and info["norm_diff"] <= 1e-5
    assert list(cache.rglob("*.so")), "the build is cached"
    again, err = _probe(cache, pythonpath=target)
    assert again["cpu_build"] == "jit" and "compiling" not in err  # imported from the cache
    assert again["max_diff"] <= 1e-6
