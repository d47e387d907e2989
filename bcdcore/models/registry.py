"""The one registry of models: a name -> a builder of its blocks, and `build_model`.

Every built-in model is listed in BUILDERS, explicitly. A builder takes `(cfg, input_shape, n_outputs, seed,
vocab_size)` and returns the model's blocks (a list of modules, composed in order) or a whole BlockModel (the
ensembles); `register` adds a user's own under a new name. The recipe layer (bcdcore.recipe.MODELS) lists the
same names for validation.
"""
from __future__ import annotations

import math
from typing import Callable, Union

import torch
from torch import nn

from bcdcore.models.blocks import BlockModel, group_blocks
from bcdcore.models.ensembles import ensemble
from bcdcore.models.gpt import nanogpt_blocks
from bcdcore.models.plugin import build_plugin
from bcdcore.models.resnet import RESNET_LAYERS, load_weights_file, resnet_blocks
from bcdcore.models.small import block_linear_blocks, cnn_blocks, mlp_blocks, residual_blocks
from bcdcore.models.text import text_blocks
from bcdcore.recipe import TOKEN_MODELS, ModelConfig
from bcdcore.recipe.plugin_keys import is_plugin

Builder = Callable[[ModelConfig, tuple, int, int, int], Union[list, BlockModel]]


def _flat(input_shape: tuple) -> int:
    return math.prod(input_shape)


BUILDERS: dict[str, Builder] = {
    "mlp": lambda cfg, shape, n_out, seed, vocab: mlp_blocks(cfg, _flat(shape), n_out, nn.ReLU),
    "linear": lambda cfg, shape, n_out, seed, vocab: mlp_blocks(cfg, _flat(shape), n_out, nn.Identity),
    "cnn": lambda cfg, shape, n_out, seed, vocab: cnn_blocks(cfg, shape, n_out),
    "residual_cnn": lambda cfg, shape, n_out, seed, vocab: residual_blocks(cfg, shape, n_out),
    "block_linear": lambda cfg, shape, n_out, seed, vocab: block_linear_blocks(cfg, _flat(shape), n_out),
    "resnet18": lambda cfg, shape, n_out, seed, vocab: resnet_blocks(cfg, shape, n_out),
    "resnet34": lambda cfg, shape, n_out, seed, vocab: resnet_blocks(cfg, shape, n_out),
    "nanogpt": lambda cfg, shape, n_out, seed, vocab: nanogpt_blocks(cfg, shape, n_out, vocab),
    "mlp_ensemble": lambda cfg, shape, n_out, seed, vocab: ensemble(cfg, shape, n_out, seed),
    "cnn_ensemble": lambda cfg, shape, n_out, seed, vocab: ensemble(cfg, shape, n_out, seed),
    "text_classifier": lambda cfg, shape, n_out, seed, vocab: text_blocks(cfg, shape, n_out, vocab),
}


def register(name: str, builder: Builder) -> None:
    """Add a model builder under `name` (a name already taken is refused)."""
    if name in BUILDERS:
        raise ValueError(f"model {name!r} is registered already")
    BUILDERS[name] = builder


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], n_outputs: int, seed: int, *,
                vocab_size: int | None = None) -> BlockModel:
    """Build the model named by `cfg` for inputs of `input_shape` (one sample) with `n_outputs` outputs.

    The weights depend on `seed` only; the global random state is left as it was, so building a model does not
    shift the data order or anything else seeded from it. `cfg.group > 0` merges the blocks into that many
    groups after initialisation, so grouping never changes the weights.

    Token inputs (text datasets) come with their vocabulary size: `vocab_size`, or else the `vocab_size` that
    a `bcdcore.data.TokenShape` input shape carries. Models that embed tokens need it; the others refuse
    token inputs. Builders are looked up in BUILDERS.
    """
    if vocab_size is None:
        vocab_size = int(getattr(input_shape, "vocab_size", 0) or 0)
    input_shape = tuple(int(s) for s in input_shape)
    if n_outputs < 1:
        raise ValueError(f"a model needs at least one output, got n_outputs = {n_outputs}")
    if any(int(width) < 1 for width in cfg.widths):
        raise ValueError(f"model.widths: widths must be >= 1, got {list(cfg.widths)}")
    if cfg.group < 0:
        raise ValueError(f"model.group must be >= 0 (0 = no grouping), got {cfg.group}")
    known = tuple(BUILDERS)
    if is_plugin(cfg.name) and cfg.name not in known:  # "pkg.module:build", "torchvision:resnet50"
        if cfg.group:
            raise ValueError("model.group: use [model] blocks to partition a plugin model (entries may join "
                             "several prefixes with '|'), not group")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_plugin(cfg, input_shape, n_outputs).float()
    if cfg.name not in known:
        raise ValueError(f"model.name: unknown model {cfg.name!r}; known models: {', '.join(known)}")
    token_model = cfg.name in TOKEN_MODELS
    if token_model and vocab_size < 1:
        raise ValueError(f"model.name = {cfg.name!r} embeds token ids; it needs a text dataset (imdb, "
                         f"stdlib_text), whose vocabulary sets the embedding size")
    if vocab_size and not token_model:
        raise ValueError(f"model.name = {cfg.name!r} needs float features but the dataset gives token ids; use "
                         f"'text_classifier' (classification) or 'nanogpt' (language model)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        built = BUILDERS[cfg.name](cfg, input_shape, n_outputs, seed, vocab_size)
    if isinstance(built, BlockModel):
        model = built
    else:
        blocks = group_blocks(built, cfg.group) if cfg.group > 0 else built
        model = BlockModel(blocks, name=cfg.name, input_shape=input_shape, n_outputs=n_outputs)
    # Parameters are fp32 whatever torch's default dtype is (the update kernels assume a known dtype);
    # .float() leaves integer buffers such as BatchNorm's num_batches_tracked alone.
    model = model.float()
    if getattr(cfg, "weights", ""):
        if cfg.name not in RESNET_LAYERS:
            raise ValueError(f"model.weights: loading weights is available for resnet18/34, not {cfg.name!r}")
        load_weights_file(model, cfg.weights)
    return model
