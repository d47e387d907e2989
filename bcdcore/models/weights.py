"""`[model] weights`: a local state_dict file, read without running code from it (weights_only=True). Shared by
the built-in ResNets (torchvision layouts) and plugin/torchvision models; no weights are ever downloaded."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor


def read_state_dict(path: str) -> dict[str, Tensor]:
    """The state_dict saved by torch.save at `path` (bare, or under "state_dict"); ValueError, one line, for a
    missing file, bytes torch cannot read as tensors, or something that is not a dict."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"model.weights = {path!r}: no such file; give the path of a saved state_dict (.pt)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure of untrusted bytes is the file's fault, in one line
        raise ValueError(f"model.weights = {path!r}: cannot read it as a torch state_dict "
                         f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"model.weights = {path!r}: expected a state_dict (a dict of tensors), got "
                         f"{type(state).__name__}")
    return state
