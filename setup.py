"""Package + extension build. The compiled ops (csrc/) are optional: the engine falls back to `reference`."""
from setuptools import find_packages, setup


def get_extensions():
    """C++ (always) and CUDA (when torch has CUDA and a toolkit is found) builds of csrc/; see csrc/README."""
    return []


def get_cmdclass():
    return {}


setup(
    name="bcd-workstation",
    version="0.1.0",
    description="Block coordinate descent workstation: engine (bcdcore) and terminal UI (bcdtui)",
    packages=find_packages(include=["bcdcore", "bcdcore.*", "bcdtui", "bcdtui.*"]),
    python_requires=">=3.11",
    ext_modules=get_extensions(),
    cmdclass=get_cmdclass(),
    entry_points={"console_scripts": ["bcdcore = bcdcore.cli:main", "bcdtui = bcdtui.app:main"]},
)
