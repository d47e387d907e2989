"""Recipe -> everything a run needs (device, data, model with blocks, trainer, backend, measurements), with
every recipe problem raised as a RecipeError before anything is written; and evaluation of a split.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from bcdcore import ops
from bcdcore.algorithm import BlockwiseTrainer, EntireTrainer
from bcdcore.data import DataBundle, Split, load_data
from bcdcore.data.batches import BatchStream, eval_batches, stream_seed
from bcdcore.measure import load_unit
from bcdcore.models import build_model
from bcdcore.models.plugin import PartitionedModel, check_forward
from bcdcore.params import FlatParams
from bcdcore.recipe import CLASSIFICATION, Recipe, RecipeError, check_block_lists, per_block
from bcdcore.resources import check_model_fits, is_out_of_memory

if TYPE_CHECKING:  # the communicator imports torch.distributed; only its type is named here
    from bcdcore.run.distributed import Comm

# distinct seed streams derived from the one run seed
SEED_MODEL, SEED_ACTIVE, SEED_ENTIRE_STREAM = 1, 2, 3


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RecipeError(f"run.device = {name!r} but no CUDA device is available here; use \"auto\" or \"cpu\"")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RecipeError(f"run.device = {name!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def _token_cross_entropy(out, y):
    """Language model: logits (N, T, V) against next tokens (N, T); mean cross-entropy over all tokens."""
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def loss_function(task: str):
    from bcdcore.recipe import LANGUAGE_MODEL

    if task == CLASSIFICATION:
        return F.cross_entropy
    if task == LANGUAGE_MODEL:
        return _token_cross_entropy
    return lambda out, y: F.mse_loss(out.squeeze(-1), y)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, task: str, batch_size: int, device: torch.device) -> dict:
    """Mean loss, in eval mode, over a split, and the accuracy: of samples for classification, of tokens
    (the share of next tokens predicted exactly) for a language model. A language model's loss is the mean
    token cross-entropy (every window has the same length, so the mean over windows is the mean over tokens)."""
    if len(split) == 0:
        return {}
    from bcdcore.recipe import LANGUAGE_MODEL

    model.eval()
    loss_fn = loss_function(task)
    scored = task in (CLASSIFICATION, LANGUAGE_MODEL)
    total, correct, counted = 0.0, 0, 0
    for xb, yb in eval_batches(split.x, split.y, batch_size):
        xb, yb = xb.to(device), yb.to(device)
        out = model(xb)
        total += loss_fn(out, yb).item() * len(xb)
        if scored:
            correct += (out.argmax(-1) == yb).sum().item()
            counted += yb.numel()
    result = {"loss": total / len(split)}
    if scored:
        result["acc"] = correct / counted
    return result


@dataclass
class Prepared:
    recipe: Recipe
    device: torch.device
    data: DataBundle
    model: nn.Module
    params: FlatParams
    trainer: BlockwiseTrainer | EntireTrainer
    backend: str
    lams: list[float]
    gammas: list[float]
    measurements: list  # (MeasureConfig, Measurement) pairs


def prepare(recipe: Recipe, comm: "Comm | None" = None) -> Prepared:
    """Build everything a run needs. Recipe problems raise RecipeError; nothing is written to disk.
    `comm` (bcdcore.run.distributed.Comm) makes the trainer one rank of a distributed run."""
    device = resolve_device(recipe.run.device)
    try:
        data = load_data(recipe.data, recipe.run.seed)
    except (MemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        raise RecipeError(f"{recipe.source}: data: {recipe.data.name} does not fit in memory; use fewer "
                          "samples (data.n_samples, data.per_class) or smaller images") from None
    if len(data.train) == 0:
        raise RecipeError(f"{recipe.source}: data: the training split is empty; lower val_fraction/test_fraction")
    check_model_fits(recipe, data.input_shape, data.n_outputs, device)  # before allocating: one line, in GB
    try:
        model = build_model(recipe.model, data.input_shape, data.n_outputs,
                            stream_seed(recipe.run.seed, SEED_MODEL))
    except ValueError as exc:
        raise RecipeError(f"{recipe.source}: model: {exc}") from None
    except (MemoryError, RuntimeError) as exc:
        if not is_out_of_memory(exc):
            raise
        raise RecipeError(f"{recipe.source}: model: {recipe.model.name} does not fit in memory; use smaller "
                          "model.widths") from None
    model.to(device)
    if isinstance(model, PartitionedModel):  # a plugin's forward is checked before anything is written
        check_forward(model, data.train.x[:2].to(device), data.task, data.n_outputs, recipe.model.name)
    n_blocks = len(model.blocks)
    check_block_lists(recipe, n_blocks)
    # Last of the recipe checks: a fallback notice must not come before a recipe error.
    try:
        backend = ops.resolve_backend(recipe.run.ops_backend, device)
    except ValueError as exc:
        raise RecipeError(f"{recipe.source}: run.ops_backend: {exc}") from None
    measurements = []
    for m in recipe.measure:
        try:
            measurements.append((m, load_unit(m.unit)))
        except ValueError as exc:
            raise RecipeError(f"{recipe.source}: measure.unit: {exc}") from None
    params = FlatParams(model, model.blocks)
    for split in (data.train, data.val, data.test):
        split.x, split.y = split.x.to(device), split.y.to(device)
    a = recipe.algorithm
    lams, gammas = per_block(a.lam, n_blocks), per_block(a.gamma, n_blocks)
    loss_fn = loss_function(data.task)
    seed = recipe.run.seed
    if a.mode == "entire":
        # rank 0 draws the 1-process stream; every other rank its own seeded shard of minibatches
        which = SEED_ENTIRE_STREAM if comm is None or comm.rank == 0 else 1000 + comm.rank
        stream = BatchStream(data.train.x, data.train.y, recipe.data.batch_size, stream_seed(seed, which))
        trainer = EntireTrainer(model, params, loss_fn, stream, a, backend, comm=comm)
    else:
        streams = [BatchStream(data.train.x, data.train.y, recipe.data.batch_size, stream_seed(seed, 100 + i))
                   for i in range(n_blocks)]
        trainer = BlockwiseTrainer(model, params, loss_fn, streams, a, lams, gammas, backend,
                                   stream_seed(seed, SEED_ACTIVE), comm=comm)
    return Prepared(recipe, device, data, model, params, trainer, backend, lams, gammas, measurements)
