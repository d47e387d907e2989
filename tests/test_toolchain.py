"""The build side of csrc/: bcdcore/toolchain.py (the CUDA toolkit search and the libstdc++ link fix used by
setup.py and the JIT build), the Makefile's GPU architectures, and the rule that the kernels' per-element math
and dispatch are written once (csrc/fused_math.h, csrc/fused_dispatch.h)."""
from __future__ import annotations

import importlib.machinery
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch  # noqa: F401 - loads the libstdc++ that torch runs on, which loaded_libstdcxx() reports

from bcdcore import toolchain

REPO = Path(__file__).resolve().parents[1]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="libstdc++ handling is Linux-only")


def _fake_compiler(tmp_path: Path, prints: str) -> str:
    """A stand-in for `c++ -print-file-name=libstdc++.so` that prints `prints`."""
    exe = tmp_path / "fake-c++"
    exe.write_text(f"#!/bin/sh\necho '{prints}'\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return str(exe)


@linux_only
def test_loaded_libstdcxx_is_the_one_in_this_process():
    lib = toolchain.loaded_libstdcxx()
    assert lib is not None and Path(lib).is_file() and "libstdc++.so" in Path(lib).name


@linux_only
def test_static_only_compiler_gets_the_loaded_libstdcxx(tmp_path):
    # gcc echoes the bare name back when it has no such file: only a static archive would be linked
    args = toolchain.libstdcxx_link_args(_fake_compiler(tmp_path, "libstdc++.so"))
    assert args == [toolchain.loaded_libstdcxx()]


@linux_only
def test_compiler_with_a_shared_libstdcxx_needs_nothing(tmp_path):
    found = tmp_path / "lib" / "libstdc++.so"
    assert toolchain.libstdcxx_link_args(_fake_compiler(tmp_path, str(found))) == []


def test_missing_compiler_adds_nothing(tmp_path):
    assert toolchain.libstdcxx_link_args(str(tmp_path / "no-such-compiler")) == []


@linux_only
@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf not installed")
def test_built_extensions_link_libstdcxx_dynamically():
    """A static libstdc++ copy inside an extension segfaults on the first error message with a number in it."""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]  # this interpreter's builds only
    built = sorted((REPO / "bcdcore").glob(f"_C*{suffix}"))
    if not built:
        pytest.skip("the extensions are not built in place")
    for so in built:
        dyn = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True, check=True).stdout
        assert "libstdc++.so" in dyn, f"{so.name} carries its own libstdc++"


def _toolkit(root: Path, with_cudart: bool = True) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "nvcc").write_text("")
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("")
    (root / "lib64").mkdir()
    if with_cudart:
        (root / "lib64" / "libcudart.so").write_text("")
    return root


def test_cuda_home_takes_a_complete_toolkit_from_the_environment(tmp_path, monkeypatch):
    root = _toolkit(tmp_path / "cuda")
    monkeypatch.setenv("CUDA_HOME", str(root))
    assert toolchain.cuda_home() == str(root)


def test_cuda_home_rejects_a_toolkit_without_cudart(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", str(_toolkit(tmp_path / "cuda", with_cudart=False)))
    assert toolchain.cuda_home() is None


def test_cuda_home_finds_the_cuda_folder_under_a_prefix(tmp_path, monkeypatch):
    # torch's guess is the nvcc prefix (/usr/local); the real root is its `cuda` folder
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", os.defpath)
    root = _toolkit(tmp_path / "prefix" / "cuda")
    assert toolchain.cuda_home(str(tmp_path / "prefix")) == str(root)


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
@pytest.mark.parametrize("gpu", [True, False])
def test_makefile_sets_the_cuda_arch_only_without_a_gpu(tmp_path, gpu):
    """`make` leaves TORCH_CUDA_ARCH_LIST unset where `nvidia-smi -L` finds a GPU (torch then builds for the
    visible devices) and defaults it to 9.0 where none answers; a value the user set always wins."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: fake'\n" if gpu else "#!/bin/sh\nexit 9\n")
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    env = {k: v for k, v in os.environ.items() if k != "TORCH_CUDA_ARCH_LIST"}
    env["PATH"] = str(tmp_path) + os.pathsep + env.get("PATH", "")
    probe = ["make", "-s", "-f", str(REPO / "Makefile"), "--eval", "arch: ; @echo \"[$$TORCH_CUDA_ARCH_LIST]\"",
             "arch"]
    out = subprocess.run(probe, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("[]" if gpu else "[9.0]")
    env["TORCH_CUDA_ARCH_LIST"] = "8.0"
    out = subprocess.run(probe, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[8.0]"


# Per-element arithmetic and the dtype/form/mode switch: each may appear in csrc/fused_math.h and
# csrc/fused_dispatch.h only; the kernel files load, loop, reduce and store around them.
_WRITTEN_ONCE = {
    "per-element math": re.compile(r"\bsqrt|\b(lr|lam|mu|b1|b2|omb1|omb2|gamma|eps)\s*[-+*/]"
                                   r"|[-+*/]\s*k\.(lr|lam|mu|gamma)\b"),
    "dispatch ladder": re.compile(r"switch\s*\(\s*\w+\.(dtype|form|mode)\s*\)"),
    "dtype traits": re.compile(r"struct\s+Io\b|0x7FC0|__half2float|fp16_ieee_to_fp32"),
}


@pytest.mark.parametrize("kernel", ["fused_cpu_impl.h", "fused_cpu.cpp", "fused_cuda.cu"])
def test_kernels_do_not_restate_the_math_or_the_dispatch(kernel):
    code = "\n".join(line.split("//")[0] for line in (REPO / "csrc" / kernel).read_text().splitlines())
    for what, pattern in _WRITTEN_ONCE.items():
        hits = [m.group(0) for m in pattern.finditer(code)]
        assert not hits, f"csrc/{kernel} restates the {what} ({hits[:3]}): fused_math.h / fused_dispatch.h own it"
