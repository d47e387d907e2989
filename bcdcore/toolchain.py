"""What the build of csrc/ needs to know about the machine's toolchain; shared by setup.py and the JIT build in
bcdcore/compiled.py. Standard library only (setup.py imports it before anything is built)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

# The compiler flags of csrc/, for setup.py and the JIT build alike: no fused multiply-add anywhere, so the
# kernels round every operation as the reference does.
CXX_FLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math")
NVCC_FLAGS = ("-O3", "-fmad=false", "-lineinfo")


def openmp_flags() -> list[str]:
    """-fopenmp for the CPU module's compile and link where GCC-style OpenMP is expected (Linux)."""
    return ["-fopenmp"] if sys.platform.startswith("linux") else []


def cuda_home(torch_guess: str | None = None) -> str | None:
    """A CUDA toolkit root that has bin/nvcc, include/cuda_runtime.h and libcudart. CUDA_HOME / CUDA_PATH win
    when set (None when they point elsewhere); else torch's guess, then the nvcc on PATH (whose prefix can be a
    folder such as /usr/local whose `cuda` subfolder is the real root), then /usr/local/cuda."""
    def ok(root: str | None) -> bool:
        if not root:
            return False
        libs = [os.path.join(root, d) for d in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"))]
        return (os.path.exists(os.path.join(root, "bin", "nvcc"))
                and os.path.exists(os.path.join(root, "include", "cuda_runtime.h"))
                and any(os.path.isdir(d) and any(f.startswith("libcudart") for f in os.listdir(d)) for d in libs))

    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        return env if ok(env) else None
    cands = [torch_guess, os.path.join(torch_guess, "cuda")] if torch_guess else []
    nvcc = shutil.which("nvcc")
    if nvcc:
        prefix = os.path.dirname(os.path.dirname(nvcc))
        cands += [os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), prefix, os.path.join(prefix, "cuda")]
    cands.append("/usr/local/cuda")
    return next((c for c in cands if ok(c)), None)


def loaded_libstdcxx() -> str | None:
    """Path of the libstdc++ this process has loaded (after `import torch`: the one torch runs on); Linux only."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1] if len(line.split()) >= 6 else ""
                if "/libstdc++.so" in path:
                    return path
    except OSError:
        pass
    return None


def libstdcxx_link_args(cxx: str | None = None) -> list[str]:
    """Extra link arguments that make the extension use the shared libstdc++ that torch uses.

    Some toolchains (seen: a GCC in /opt/gcc on the GPU machines) ship libstdc++ only as a static archive, so an
    extension would carry its own copy. With -Bsymbolic-functions that copy's uninitialised locale is what
    formats numbers, and the first error message with a number in it (a size mismatch) segfaults. When the
    compiler cannot find a shared libstdc++, link the one already loaded in this process by its path.
    """
    if not sys.platform.startswith("linux"):
        return []
    cxx = cxx or os.environ.get("CXX") or "c++"
    try:
        found = subprocess.run([cxx, "-print-file-name=libstdc++.so"], capture_output=True, text=True,
                               timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return []
    if os.path.isabs(found):
        return []  # the compiler links a shared libstdc++ itself
    lib = loaded_libstdcxx()
    return [lib] if lib else []
