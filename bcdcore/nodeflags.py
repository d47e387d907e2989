"""`bcdcore run --nnodes/--node-rank/--rdzv`: the node flags as recipe overrides ([distributed] nnodes,
node_rank, rdzv_endpoint), validated like the recipe keys, with errors that name the flag. No torch: a bad flag
is refused before anything heavy loads."""
from __future__ import annotations

import json
from pathlib import Path

from bcdcore.recipe import Recipe, RecipeError, load_recipe


def node_overrides(nnodes: int | None, node_rank: int | None, rdzv: str | None) -> list[str]:
    """`run --nnodes/--node-rank/--rdzv` as recipe overrides (validated like the recipe keys)."""
    out = []
    if nnodes is not None:
        out.append(f"distributed.nnodes={nnodes}")
    if node_rank is not None:
        out.append(f"distributed.node_rank={node_rank}")
    if rdzv is not None:
        out.append(f"distributed.rdzv_endpoint={json.dumps(rdzv)}")
    return out


FLAGS = {"distributed.nnodes": "--nnodes", "distributed.node_rank": "--node-rank",
         "distributed.rdzv_endpoint": "--rdzv"}


def load_with_flags(path: Path, overrides: list[str], flags: list[str]) -> Recipe:
    """load_recipe with the node flags applied after `overrides`; an error about a flag names the flag."""
    try:
        return load_recipe(path, [*overrides, *flags])
    except RecipeError as exc:
        message = str(exc)
        for key, flag in FLAGS.items():
            if any(f.startswith(f"{key}=") for f in flags):
                message = message.replace(f"--set {key}:", f"{flag}:")
        raise RecipeError(message) from None


def resume_recipe(run_dir: Path, flags: list[str]) -> Recipe:
    """A multi-node resume's recipe: the run's own, with this node's --node-rank (and rendezvous) applied."""
    return load_with_flags(Path(run_dir) / "recipe.toml", [], flags)
