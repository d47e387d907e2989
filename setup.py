"""Package + extension build. The compiled ops (csrc/) are optional: the engine falls back to `reference`.

The sources in csrc/ ship twice: in the sdist (MANIFEST.in), so that a wheel or an install can be built from
it, and inside the installed package as `bcdcore/_csrc/` (`build_py` below), so that the JIT fallback of
bcdcore/compiled.py can compile them where the package was installed without its extensions (BCD_NO_EXT=1,
or built against another torch), not only in a checkout.
"""
from __future__ import annotations

import glob
import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

# What the package needs at run time; requirements.txt pins the exact versions the project's machines use.
INSTALL_REQUIRES = [
    "torch>=2.14",
    "torchvision>=0.29",  # the image datasets and the ResNet zoo
    "numpy",
    "pillow",  # image files (bcdcore.image_files imports PIL itself; torchvision also needs it)
    "scikit-learn",  # the bundled tabular datasets
    "rich",
    "textual",  # bcdtui
    "submitit>=1.5",  # `bcdcore sweep --slurm` (imported only there)
    "tree-sitter>=0.25",  # bcdtui's recipe editor highlights TOML when these two are present
    "tree-sitter-toml>=0.6",
    "matplotlib",  # figures of the measurements and `bcdcore plot`
    "onnx",  # model export
    "ninja",  # torch.utils.cpp_extension builds with it: setup.py's build and the run-time JIT fallback
    "psutil",  # bcdtui's system panel: each run's CPU % and RSS
    "nvidia-ml-py",  # bcdtui's system panel: GPU utilisation, memory and power through NVML
]
# The test suite's tools: pip install -e '.[test]'
TEST_REQUIRES = ["pytest", "pytest-asyncio", "hypothesis", "pytest-textual-snapshot"]

CSRC_GLOBS = ("csrc/*.h", "csrc/*.cpp", "csrc/*.cu", "csrc/README.md")


def get_extensions() -> list:
    """C++ (always) and CUDA (when torch has CUDA and a toolkit is found) builds of csrc/; see csrc/README.md.

    Switches: BCD_NO_EXT=1 builds nothing (the engine then JIT-builds once or uses `reference`), BCD_NO_CUDA=1
    skips the CUDA extension, BCD_STRICT_BUILD=1 makes a failed compile fail the build (CI) instead of leaving
    the extension out, TORCH_CUDA_ARCH_LIST picks the GPU architectures (default: the visible GPUs, else the
    architectures this torch was built for), CUDA_HOME the toolkit.
    """
    import os
    import shutil
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bcdcore import toolchain

    def say(msg):
        print(f"bcdcore build: {msg}", file=sys.stderr)

    if os.environ.get("BCD_NO_EXT") == "1":
        say("BCD_NO_EXT=1: not building the compiled ops")
        return []
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        say(f"torch is not importable here ({exc}); not building the compiled ops")
        return []
    if not (os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        say("no C++ compiler found; not building the compiled ops (the engine uses the reference backend)")
        return []

    cxx = list(toolchain.CXX_FLAGS)
    link = toolchain.libstdcxx_link_args()
    if link:
        say(f"the C++ compiler has no shared libstdc++; linking torch's {link[0]}")
    cpu_cxx, cpu_link = cxx + toolchain.openmp_flags(), link + toolchain.openmp_flags()
    exts = [cpp_extension.CppExtension("bcdcore._C", ["csrc/fused_cpu.cpp"],
                                       extra_compile_args={"cxx": cpu_cxx}, extra_link_args=cpu_link)]

    if os.environ.get("BCD_NO_CUDA") == "1":
        say("BCD_NO_CUDA=1: not building the CUDA extension")
    elif not torch.version.cuda:
        say(f"torch {torch.__version__} has no CUDA; building the CPU extension only")
    else:
        home = toolchain.cuda_home(cpp_extension.CUDA_HOME)
        if home is None:
            say("no CUDA toolkit found (set CUDA_HOME to a root with bin/nvcc, include/ and lib64/libcudart); "
                "building the CPU extension only")
        else:
            os.environ["CUDA_HOME"] = home
            cpp_extension.CUDA_HOME = home
            if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
                import re

                archs = sorted({f"{m[1][:-1]}.{m[1][-1]}" for m in map(re.compile(r"sm_(\d{2,})$").match,
                                                                        torch.cuda.get_arch_list()) if m},
                               key=lambda v: tuple(int(p) for p in v.split(".")))
                os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs[:-1] + [archs[-1] + "+PTX"]) if archs \
                    else "9.0+PTX"
                say(f"no GPU visible: building for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
            exts.append(cpp_extension.CUDAExtension(
                "bcdcore._C_cuda", ["csrc/fused_cuda_bind.cpp", "csrc/fused_cuda.cu"],
                extra_compile_args={"cxx": list(cxx), "nvcc": list(toolchain.NVCC_FLAGS)},
                extra_link_args=list(link)))
    return exts


class BuildPyWithSources(build_py):
    """Copies csrc/ into the built package as bcdcore/_csrc/, where bcdcore/compiled.py looks first for the
    sources of its JIT fallback (a checkout has no _csrc and uses csrc/ next to the package)."""

    def run(self) -> None:
        super().run()
        here = os.path.dirname(os.path.abspath(__file__))
        dest = os.path.join(self.build_lib, "bcdcore", "_csrc")
        os.makedirs(dest, exist_ok=True)
        for pattern in CSRC_GLOBS:
            for src in sorted(glob.glob(os.path.join(here, pattern))):
                shutil.copy2(src, os.path.join(dest, os.path.basename(src)))


def get_cmdclass() -> dict:
    """build_py that ships csrc/; torch's BuildExtension (ninja when available), where a failed compile leaves
    that extension out with a warning (the engine then falls back), unless BCD_STRICT_BUILD=1."""
    import sys

    try:
        from torch.utils.cpp_extension import BuildExtension
    except ImportError:
        return {"build_py": BuildPyWithSources}

    class BuildOptionalExtension(BuildExtension):
        failed: set = set()

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - any compiler failure
                if os.environ.get("BCD_STRICT_BUILD") == "1":
                    raise
                self.failed.add(ext.name)
                print(f"bcdcore build: WARNING: building {ext.name} failed ({exc}); installing without it "
                      "(set BCD_STRICT_BUILD=1 to make this an error)", file=sys.stderr)

        def _without_failed(self, method, *args):
            """Run a base method that lists or copies the built files over the extensions that did build."""
            keep = self.extensions
            self.extensions = [e for e in keep if e.name not in self.failed]
            try:
                return method(*args)
            finally:
                self.extensions = keep

        def copy_extensions_to_source(self):
            return self._without_failed(super().copy_extensions_to_source)

        def get_outputs(self):
            return self._without_failed(super().get_outputs)

        def get_output_mapping(self):
            return self._without_failed(super().get_output_mapping)

    return {"build_py": BuildPyWithSources, "build_ext": BuildOptionalExtension.with_options(use_ninja=True)}


setup(
    name="bcd-workstation",
    version="0.1.0",
    description="Block coordinate descent workstation: engine (bcdcore) and terminal UI (bcdtui)",
    packages=find_packages(include=["bcdcore", "bcdcore.*", "bcdtui", "bcdtui.*"]),
    package_data={"bcdtui": ["*.tcss"]},  # the TUI's styles (bcdtui/bcdtui.tcss)
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES},
    ext_modules=get_extensions(),
    cmdclass=get_cmdclass(),
    entry_points={"console_scripts": ["bcdcore = bcdcore.cli:main", "bcdtui = bcdtui.app:main"]},
)
