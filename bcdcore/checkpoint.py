"""checkpoint.pt: tensors and plain data only, loaded without running code, checked before it is used.

A checkpoint is read with `torch.load(..., weights_only=True)`, whose unpickler accepts only tensors, numbers,
strings, None, lists, tuples and dicts: a file from elsewhere cannot execute code. What it holds is then held
against a template of what this run would save (same keys, list lengths, tensor shapes and dtypes, number
kinds, ranges), so a truncated, tampered or foreign checkpoint, or a recipe.toml edited beside its checkpoint,
is one line (CheckpointError) before anything in the run or its directory changes.
"""
from __future__ import annotations

import copy
import errno
import io
import math
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from bcdcore.recipe import RecipeError, os_reason
from bcdcore.rundir import write_bytes_atomic

# keys a checkpoint may lack: written only by distributed runs, or by later versions of the engine
OPTIONAL_KEYS = frozenset({"comm", "augment", "flops", "passes"})
# a minibatch stream's permutation is empty until its first draw: its length is checked by its owner
ANY_LENGTH_KEYS = frozenset({"order"})


class CheckpointError(RecipeError):
    """A checkpoint that cannot be used, phrased as the one line the user sees."""


def save_checkpoint(path: Path, state: dict) -> None:
    """Serialise in memory, then write through a temporary file and a rename: a full disk or a kill leaves
    the previous checkpoint whole, and the error is the operating system's (OSError), not torch's."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes_atomic(path, buffer.getbuffer())


def load_checkpoint(path: Path, template: dict | None = None, partial: bool = False) -> dict:
    """The checkpoint's contents, checked against `template` (see `check_like`); CheckpointError if it cannot
    be read or does not fit. Tensors come back on the CPU (generator states must stay there)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint: {os_reason(exc)}") from None
    if size == 0:
        raise CheckpointError(f"{path}: the checkpoint is empty (the run was stopped while writing it?); "
                              "nothing was changed")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols before refusing them
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOENT, errno.EIO):
            raise CheckpointError(f"{path}: cannot read the checkpoint: {os_reason(exc)}") from None
        # torch's archive reader reports a truncated or foreign file as an OSError (EINVAL)
        raise CheckpointError(f"{path}: refused (truncated, or not a checkpoint this engine wrote); nothing "
                              "was changed") from None
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: whatever the unpickler or the archive reader
        # raises (UnpicklingError, EOFError, BadZipFile, struct.error on a few bytes, ...), the file is refused
        if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in str(exc):
            why = "it holds objects other than tensors and plain data, and loading those could run code"
        else:
            why = f"not a checkpoint this engine wrote: {_first_line(exc)}"
        raise CheckpointError(f"{path}: refused unread ({why}); nothing was changed") from None
    if template is not None:
        try:
            check_like(state, template, "checkpoint", partial=partial)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}; was recipe.toml edited or the file replaced? nothing was "
                                  "changed") from None
    return state


def check_like(got: Any, want: Any, where: str, partial: bool = False) -> None:
    """`got` has the shape of `want`: dicts with want's keys (extra keys are ignored; `partial` also allows
    missing ones), lists of the same length, tensors of the same shape and dtype, numbers of the same kind
    and finite unless want's is not. Raises CheckpointError naming the first difference."""
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            raise CheckpointError(f"{where} should be a tensor, got {_kind(got)}")
        if got.shape != want.shape or got.dtype != want.dtype:
            raise CheckpointError(f"{where} has shape {tuple(got.shape)} {_dtype(got)}, this run needs "
                                  f"{tuple(want.shape)} {_dtype(want)}")
        if got.layout != torch.strided or got.is_quantized:
            raise CheckpointError(f"{where} is not a plain dense tensor")
    elif isinstance(want, dict):
        if not isinstance(got, dict):
            raise CheckpointError(f"{where} should be a table, got {_kind(got)}")
        for key, value in want.items():
            if key not in got:
                if partial or key in OPTIONAL_KEYS:
                    continue
                raise CheckpointError(f"{where} lacks {key!r}")
            if key in ANY_LENGTH_KEYS and isinstance(got[key], torch.Tensor) and isinstance(value, torch.Tensor):
                value = torch.empty(got[key].shape, dtype=value.dtype)
            check_like(got[key], value, f"{where}.{key}", partial)
    elif isinstance(want, (list, tuple)):
        if not isinstance(got, (list, tuple)):
            raise CheckpointError(f"{where} should be a list, got {_kind(got)}")
        if len(got) != len(want):
            raise CheckpointError(f"{where} has {len(got)} entries, this run needs {len(want)}")
        for i, (g, w) in enumerate(zip(got, want)):
            check_like(g, w, f"{where}[{i}]", partial)
    elif isinstance(want, bool):
        if not isinstance(got, bool):
            raise CheckpointError(f"{where} should be true or false, got {_kind(got)}")
    elif isinstance(want, int):
        if not isinstance(got, int) or isinstance(got, bool):
            raise CheckpointError(f"{where} should be an integer, got {_kind(got)}")
        if got < 0 <= want:
            raise CheckpointError(f"{where} is negative ({got})")
    elif isinstance(want, float):
        if not isinstance(got, (int, float)) or isinstance(got, bool):
            raise CheckpointError(f"{where} should be a number, got {_kind(got)}")
        if math.isnan(got) and not math.isnan(want):
            raise CheckpointError(f"{where} is nan")
    elif isinstance(want, str):
        if not isinstance(got, str):
            raise CheckpointError(f"{where} should be text, got {_kind(got)}")
    elif want is None:
        if got is not None:
            raise CheckpointError(f"{where} should be empty (None), got {_kind(got)}")


def _kind(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return {dict: "a table", list: "a list", tuple: "a list", str: "text", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "nothing"}.get(type(value), type(value).__name__)


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def clone_state(obj):
    """A copy of a state dict that later in-place updates cannot reach: tensors cloned where they are, dicts,
    lists and tuples rebuilt, immutable scalars shared, anything else deep-copied. About 8x cheaper than
    copy.deepcopy on a trainer's state (a snapshot taken every round by the ranks other than 0)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    kind = type(obj)
    if kind is dict:
        return {k: clone_state(v) for k, v in obj.items()}
    if kind in (list, tuple):
        return kind(clone_state(v) for v in obj)
    if obj is None or kind in (bool, int, float, str, bytes):
        return obj
    return copy.deepcopy(obj)


def to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj
