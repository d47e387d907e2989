"""The compiled backends of `bcdcore.ops` (csrc/): `cpu` (C++, threaded, vectorised) and `cuda`.

Loading order, once per process (bcdcore.ops imports this module lazily and falls back to `reference`, saying
so once, when the import fails):

1. the modules built by setup.py: `bcdcore._C` (CPU) and `bcdcore._C_cuda` (CUDA; imports without a GPU);
2. when the CPU module is missing or does not load (e.g. the package was installed with BCD_NO_EXT=1, or built
   against another torch), one JIT build of csrc/ with torch.utils.cpp_extension.load, cached in a user cache
   directory (``$BCD_EXT_CACHE``, else ``$XDG_CACHE_HOME/bcdcore/ext``, else ``~/.cache/bcdcore/ext``) under a
   key made of the Python and torch versions and a hash of the sources, so later processes import it at once.
   The CUDA sources are JIT-built only when a GPU is visible and a CUDA toolkit is found. A failed JIT build
   is remembered in that cache (a FAILED file) and not retried until the sources change or the file is removed;
   ``BCD_NO_JIT=1`` disables the JIT build altogether;
3. when nothing loads, ImportError with every reason.

`backends()` returns {"cpu": {...}, "cuda": {...}} (whatever loaded), each mapping "sgd", "momentum", "adam",
"damp", "rule_check" and the multi-slice "sgd_multi", "momentum_multi", "adam_multi", "damp_multi" to a function
with exactly the reference's signature. Semantics and tolerances: csrc/README.md.
"""
from __future__ import annotations

import hashlib
import importlib
import logging
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch

from bcdcore import toolchain

log = logging.getLogger(__name__)

CPU_SOURCES = ("fused_cpu.cpp",)
CUDA_SOURCES = ("fused_cuda_bind.cpp", "fused_cuda.cu")


def _find_csrc() -> Path:
    """The folder of the C++/CUDA sources: `bcdcore/_csrc` in an installed package (setup.py's build_py copies
    csrc/ there), else `csrc/` next to the package in a checkout (also what an editable install points at)."""
    pkg = Path(sys.modules["bcdcore"].__file__).resolve().parent
    for cand in (pkg / "_csrc", pkg.parent / "csrc"):
        if (cand / CPU_SOURCES[0]).exists():
            return cand
    return pkg.parent / "csrc"  # named in the "not found" reason of _jit


CSRC = _find_csrc()
# Every header takes part in the cache key: the sources include them, so a change in any is a new build.
_HEADERS = tuple(sorted(p.name for p in CSRC.glob("*.h")))

cpu_module: ModuleType | None = None
cuda_module: ModuleType | None = None
_how: dict[str, str] = {}  # backend -> "prebuilt" | "jit"
_reasons: list[str] = []


def _import_prebuilt(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(f"bcdcore.{name}")
    except ImportError as exc:
        _reasons.append(f"bcdcore.{name} not loaded ({exc})")
        return None


def _cache_root() -> Path:
    env = os.environ.get("BCD_EXT_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "bcdcore" / "ext"


def _digest(files: tuple[str, ...], flags: list[str]) -> str:
    h = hashlib.sha256()
    for f in files + _HEADERS:
        p = CSRC / f
        h.update(f.encode())
        h.update(p.read_bytes() if p.exists() else b"")
    h.update(" ".join(flags).encode())
    h.update(f"{sys.version_info[:2]}-{torch.__version__}-{torch.version.cuda}".encode())
    return h.hexdigest()[:12]


def _jit(kind: str) -> ModuleType | None:
    """One cached JIT build of the `kind` ("cpu" | "cuda") sources; None (with the reason recorded) on failure."""
    if os.environ.get("BCD_NO_JIT") == "1":
        _reasons.append(f"JIT build of the {kind} ops disabled by BCD_NO_JIT=1")
        return None
    sources = CPU_SOURCES if kind == "cpu" else CUDA_SOURCES
    missing = [s for s in sources if not (CSRC / s).exists()]
    if missing:
        _reasons.append(f"JIT build of the {kind} ops impossible: {', '.join(missing)} not found in {CSRC}")
        return None
    flags = list(toolchain.CXX_FLAGS) + (toolchain.openmp_flags() if kind == "cpu" else [])
    key = list(flags)
    if kind == "cuda":  # the GPU architectures built for: the visible devices (or TORCH_CUDA_ARCH_LIST)
        key += list(toolchain.NVCC_FLAGS) + [os.environ.get("TORCH_CUDA_ARCH_LIST", "")]
        key += [str(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())]
    digest = _digest(sources, key)
    name = f"bcdcore_fused_{kind}_{digest}"
    build_dir = _cache_root() / f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}" / name
    failed = build_dir / "FAILED"
    if failed.exists():
        _reasons.append(f"an earlier JIT build of the {kind} ops failed (see {failed}; delete it to retry)")
        return None
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        quiet = logging.getLogger("torch.utils.cpp_extension")  # "No CUDA runtime is found" on CPU machines
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            from torch.utils import cpp_extension
        finally:
            quiet.setLevel(level)

        kwargs: dict = {}
        if kind == "cuda":
            home = toolchain.cuda_home()
            if home is None:
                _reasons.append("JIT build of the cuda ops impossible: no CUDA toolkit found (set CUDA_HOME)")
                return None
            cpp_extension.CUDA_HOME = home
            os.environ.setdefault("CUDA_HOME", home)
            kwargs["extra_cuda_cflags"] = list(toolchain.NVCC_FLAGS)
        if not any(build_dir.glob(f"{name}*.so")):
            log.warning("bcdcore: compiling the %s fused ops once (a minute or two); cached in %s", kind, build_dir)
        module = cpp_extension.load(
            name=name,
            sources=[str(CSRC / s) for s in sources],
            extra_cflags=flags,
            extra_ldflags=(["-fopenmp"] if "-fopenmp" in flags else []) + toolchain.libstdcxx_link_args(),
            build_directory=str(build_dir),
            verbose=os.environ.get("BCD_JIT_VERBOSE") == "1",
            **kwargs,
        )
    except Exception as exc:  # noqa: BLE001 - a compiler failure takes many forms
        msg = f"{type(exc).__name__}: {exc}"
        try:
            failed.write_text(msg + "\n")
        except OSError:
            pass
        _reasons.append(f"JIT build of the {kind} ops failed ({msg.splitlines()[0] if msg else 'no message'})")
        return None
    return module


def _load() -> None:
    global cpu_module, cuda_module
    cpu_module = _import_prebuilt("_C")
    if cpu_module is not None:
        _how["cpu"] = "prebuilt"
    else:
        cpu_module = _jit("cpu")
        if cpu_module is not None:
            _how["cpu"] = "jit"
    if os.environ.get("BCD_NO_CUDA") == "1":
        _reasons.append("cuda ops disabled by BCD_NO_CUDA=1")
        return
    if not torch.version.cuda:
        return
    cuda_module = _import_prebuilt("_C_cuda")
    if cuda_module is not None:
        _how["cuda"] = "prebuilt"
    elif torch.cuda.is_available():
        cuda_module = _jit("cuda")
        if cuda_module is not None:
            _how["cuda"] = "jit"


def _wrap(m: ModuleType) -> dict[str, Callable]:
    """Functions with exactly the reference's signatures around one compiled module."""
    c_sgd, c_mom, c_adam, c_damp, c_rule = m.sgd, m.momentum, m.adam, m.damp, m.rule_check

    def sgd(x, g, a, *, lr, lam, gamma=None, out=None, skip=None):
        return c_sgd(x, g, a, float(lr), float(lam), None if gamma is None else float(gamma), out, skip)

    def momentum(x, g, a, buf, *, lr, lam, momentum, nesterov=False, gamma=None, out=None, skip=None):
        return c_mom(x, g, a, buf, float(lr), float(lam), float(momentum), bool(nesterov),
                     None if gamma is None else float(gamma), out, skip)

    def adam(x, g, a, m, v, *, lr, lam, beta1, beta2, eps, step, gamma=None, out=None, skip=None):
        return c_adam(x, g, a, m, v, float(lr), float(lam), float(beta1), float(beta2), float(eps), int(step),
                      None if gamma is None else float(gamma), out, skip)

    def damp(x, a, *, gamma=None, out=None):
        c_damp(x, a, None if gamma is None else float(gamma), out)

    def rule_check(x, g, a, rule, *, lam, coef, step):
        return c_rule(x, g, a, rule, float(lam), float(coef), int(step))

    c_multi = getattr(m, "multi", None)

    def call_multi(form, x, g, a, s0, s1, bounds, lams, gammas, out, lr=0.0, mu=0.0, nesterov=False, b1=0.0,
                   b2=0.0, eps=0.0, step=1):
        bounds = [(int(lo), int(hi)) for lo, hi in bounds]
        return c_multi(form, x, g, a, s0, s1, [lo for lo, _ in bounds], [hi for _, hi in bounds],
                       [float(v) for v in lams], None if gammas is None else [float(v) for v in gammas], out,
                       float(lr), float(mu), bool(nesterov), float(b1), float(b2), float(eps), int(step))

    def sgd_multi(x, g, a, *, bounds, lr, lams, gammas=None, out=None):
        return call_multi("sgd", x, g, a, None, None, bounds, lams, gammas, out, lr=lr)

    def momentum_multi(x, g, a, buf, *, bounds, lr, lams, momentum, nesterov=False, gammas=None, out=None):
        return call_multi("momentum", x, g, a, buf, None, bounds, lams, gammas, out, lr=lr, mu=momentum,
                          nesterov=nesterov)

    def adam_multi(x, g, a, m, v, *, bounds, lr, lams, beta1, beta2, eps, step, gammas=None, out=None):
        return call_multi("adam", x, g, a, m, v, bounds, lams, gammas, out, lr=lr, b1=beta1, b2=beta2, eps=eps,
                          step=step)

    def damp_multi(x, a, *, bounds, gammas=None, out=None):
        call_multi("damp", x, None, a, None, None, bounds, [], gammas, out)

    ops = {"sgd": sgd, "momentum": momentum, "adam": adam, "damp": damp, "rule_check": rule_check}
    if c_multi is not None:  # a module built before the multi-slice form has none (ops falls back, saying so)
        ops.update(sgd_multi=sgd_multi, momentum_multi=momentum_multi, adam_multi=adam_multi, damp_multi=damp_multi)
    return ops


def backends() -> dict[str, dict[str, Callable]]:
    """{"cpu": {...}, "cuda": {...}} for whatever loaded."""
    out: dict[str, dict[str, Callable]] = {}
    if cpu_module is not None:
        out["cpu"] = _wrap(cpu_module)
    if cuda_module is not None:
        out["cuda"] = _wrap(cuda_module)
    return out


def info() -> dict[str, str]:
    """How each backend was loaded ("prebuilt" | "jit"), the CPU instruction set, and why anything is missing."""
    d = {f"{k}_build": v for k, v in _how.items()}
    if cpu_module is not None:
        d["cpu_isa"] = cpu_module.isa()
    if _reasons:
        d["notes"] = "; ".join(_reasons)
    return d


_load()
if cpu_module is None and cuda_module is None:
    raise ImportError("bcdcore compiled ops unavailable: " + "; ".join(_reasons or ["no reason recorded"]))
