"""bcdcore: proximal block coordinate descent engine (recipe -> run -> run directory).

`bcdcore.train(recipe, model=None, data=None, runs_dir=...)` and `bcdcore.load_run(path)` are the Python API
(bcdcore.api); they are imported on first use, so `import bcdcore` stays fast (no torch)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["train", "load_run", "RunResult"]

if TYPE_CHECKING:
    from bcdcore.api import RunResult, load_run, train


def __getattr__(name: str) -> Any:
    if name in __all__:
        from bcdcore import api

        return getattr(api, name)
    raise AttributeError(f"module 'bcdcore' has no attribute {name!r}")
