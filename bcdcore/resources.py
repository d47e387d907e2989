"""Will it fit? The model's memory, estimated before anything is allocated.

A model too large for the machine would otherwise fail deep inside an allocation (a traceback, or the kernel's
OOM killer) after its run directory exists. The model is first built on PyTorch's `meta` device, which records
shapes and allocates nothing, and its parameter bytes times the copies a run keeps are held against the memory
the device has available.
"""
from __future__ import annotations

import dataclasses
import logging
import os

import torch

from bcdcore.recipe import Recipe, RecipeError

log = logging.getLogger("bcdcore.resources")

GB = 1e9
# Copies of the parameters a run keeps: the model itself, its gradients, the round's anchor and next point
# (DESIGN: a bounded number of flat parameter-sized buffers), and the solver's state per parameter.
BASE_COPIES = 4
SOLVER_STATE_COPIES = {"sgd": 0, "momentum": 1, "adam": 2}


def available_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can use on `device` (None when it cannot be told)."""
    if device.type == "cuda":
        try:
            free, _total = torch.cuda.mem_get_info(device)
            return int(free)
        except (RuntimeError, AssertionError):
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def model_parameters_on_meta(recipe: Recipe, input_shape: tuple, n_outputs: int) -> int | None:
    """The model's parameter count, from a build on the meta device (no memory); None if it cannot be built
    there (the real build then says what is wrong)."""
    from bcdcore.models import build_model

    cfg = dataclasses.replace(recipe.model, weights="") if hasattr(recipe.model, "weights") else recipe.model
    try:
        with torch.device("meta"):
            model = build_model(cfg, input_shape, n_outputs, 0)
        return sum(p.numel() for p in model.parameters())
    except Exception as exc:  # noqa: BLE001 - an estimate only; the real build reports recipe errors
        log.debug("meta build failed: %s", exc)
        return None


def check_model_fits(recipe: Recipe, input_shape: tuple, n_outputs: int, device: torch.device) -> None:
    """RecipeError naming the size when the model and the run's copies of it cannot fit on `device`."""
    n = model_parameters_on_meta(recipe, input_shape, n_outputs)
    if n is None:
        return
    state = SOLVER_STATE_COPIES.get(recipe.algorithm.solver, 2)
    copies = BASE_COPIES + state
    what = "weights, gradients, anchor, next" + (f", {state} of solver state" if state else "")
    need = n * 4 * copies  # fp32 parameters
    have = available_bytes(device)
    if have is not None and need > have:
        raise RecipeError(f"{recipe.source}: model: {recipe.model.name} has {n:,} parameters; with the run's "
                          f"{copies} copies ({what}) it needs about "
                          f"{need / GB:.1f} GB, but {device.type} has {have / GB:.1f} GB available; use smaller "
                          f"model.widths (or a smaller model)")


def is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, MemoryError) or "can't allocate memory" in text or "out of memory" in text.lower()
