"""Models whose layers are grouped into blocks.

Block coordinate descent updates one block of parameters at a time, so every model here is a `BlockModel`: an
ordered `nn.ModuleList` of blocks whose composition is the whole network. Every parameter (and every buffer,
e.g. BatchNorm statistics) lives in exactly one block, so the algorithm can slice the parameters by block and
buffers move with the block that owns them.
"""
from __future__ import annotations

import math
from typing import Iterable, Union

import numpy as np
import torch
from torch import Tensor, nn

from bcdcore.recipe import ModelConfig

__all__ = [
    "BlockModel",
    "ResidualUnit",
    "FeatureSliceBlock",
    "build_model",
    "block_sizes",
    "group_blocks",
]

# What flows between block_linear blocks: the flattened features and the prediction accumulated so far.
LinearState = tuple[Tensor, Tensor]


class BlockModel(nn.Module):
    """A network that is the composition of `blocks`, run in order.

    The model owns nothing besides `blocks`: parameters and buffers outside them would be invisible to the
    per-block update, so the constructor refuses them (and empty blocks, which would be empty coordinates).
    """

    def __init__(self, blocks: Iterable[nn.Module], *, name: str = "", input_shape: tuple[int, ...] = (),
                 n_outputs: int = 1) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        # Plain attributes (not buffers) so they never show up in state_dict or in the parameter store.
        self.name = name
        self.input_shape = tuple(input_shape)
        self.n_outputs = n_outputs
        _check_blocks(self.blocks)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def extra_repr(self) -> str:
        return f"name={self.name!r}, input_shape={self.input_shape}, n_outputs={self.n_outputs}"


def _check_blocks(blocks: nn.ModuleList) -> None:
    seen: set[int] = set()
    for i, block in enumerate(blocks):
        params = list(block.parameters())
        if not params:
            raise ValueError(f"block {i} has no parameters; every block must hold at least one")
        for p in params:
            if id(p) in seen:
                raise ValueError(f"a parameter of block {i} is shared with an earlier block; "
                                 f"every parameter must belong to exactly one block")
            seen.add(id(p))


# ----------------------------------------------------------------------------------------------------------
# Building blocks


def _norm(width: int, batch_norm: bool) -> nn.Module:
    return nn.BatchNorm2d(width) if batch_norm else nn.Identity()


def _conv3x3(c_in: int, c_out: int, stride: int, batch_norm: bool) -> nn.Conv2d:
    # A conv bias followed by BatchNorm is cancelled by the norm's mean subtraction: a wasted coordinate.
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=not batch_norm)


class ResidualUnit(nn.Module):
    """out = relu(shortcut(x) + bn2(conv2(relu(bn1(conv1(x))))))."""

    def __init__(self, c_in: int, c_out: int, batch_norm: bool) -> None:
        super().__init__()
        # A width change goes with a halving of the resolution so the feature map never grows (see build).
        stride = 1 if c_in == c_out else 2
        self.conv1 = _conv3x3(c_in, c_out, stride, batch_norm)
        self.bn1 = _norm(c_out, batch_norm)
        self.conv2 = _conv3x3(c_out, c_out, 1, batch_norm)
        self.bn2 = _norm(c_out, batch_norm)
        self.shortcut: nn.Module
        if stride == 1:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=not batch_norm),
                                          _norm(c_out, batch_norm))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(self.shortcut(x) + out)


class FeatureSliceBlock(nn.Module):
    """One block of a block-linear predictor: adds features[:, start:stop] @ weight to the running prediction.

    Blocks pass (features, partial prediction) along so that they compose like any other blocks, also inside an
    nn.Sequential after grouping. A raw input tensor starts the state, wherever the block sits; the last block
    returns the bare prediction so that running the blocks in order yields the model's output.
    """

    def __init__(self, start: int, stop: int, n_outputs: int, last: bool) -> None:
        super().__init__()
        self.start, self.stop, self.n_outputs, self.last = start, stop, n_outputs, last
        # A single output keeps w_i a vector, so the loss is a quadratic in the plain weight vector w.
        shape = (stop - start,) if n_outputs == 1 else (stop - start, n_outputs)
        self.weight = nn.Parameter(torch.randn(shape) * 0.1)

    def forward(self, state: Union[Tensor, LinearState]) -> Union[Tensor, LinearState]:
        if isinstance(state, Tensor):
            features = state.flatten(1)
            pred = features.new_zeros(features.shape[0], self.n_outputs)
        else:
            features, pred = state
        contribution = features[:, self.start:self.stop] @ self.weight
        pred = pred + contribution.reshape(pred.shape)
        return pred if self.last else (features, pred)

    def extra_repr(self) -> str:
        return f"features=[{self.start}:{self.stop}], n_outputs={self.n_outputs}, last={self.last}"


# ----------------------------------------------------------------------------------------------------------
# Builders: each returns the list of blocks for one model name


def _mlp_blocks(cfg: ModelConfig, d: int, n_outputs: int, activation: type[nn.Module]) -> list[nn.Module]:
    blocks: list[nn.Module] = []
    width_in = d
    for width in cfg.widths:
        layers: list[nn.Module] = [nn.Linear(width_in, width), activation()]
        if not blocks:
            layers.insert(0, nn.Flatten())
        blocks.append(nn.Sequential(*layers))
        width_in = width
    head: list[nn.Module] = [nn.Linear(width_in, n_outputs)]
    if not blocks:
        head.insert(0, nn.Flatten())
    blocks.append(nn.Sequential(*head))
    return blocks


def _image_shape(cfg: ModelConfig, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(f"model.name = {cfg.name!r} needs image inputs (C, H, W); dataset gives shape "
                         f"{tuple(input_shape)}; use an image dataset (e.g. 'digits') or model 'mlp'")
    if not cfg.widths:
        raise ValueError(f"model.widths: {cfg.name} needs at least one width, got []")
    c, h, w = (int(s) for s in input_shape)
    return c, h, w


def _cnn_blocks(cfg: ModelConfig, input_shape: tuple[int, ...], n_outputs: int) -> list[nn.Module]:
    c, h, w = _image_shape(cfg, input_shape)
    blocks: list[nn.Module] = []
    for width in cfg.widths:
        layers: list[nn.Module] = [_conv3x3(c, width, 1, cfg.batch_norm)]
        if cfg.batch_norm:
            layers.append(nn.BatchNorm2d(width))
        layers.append(nn.ReLU())
        # Small inputs (8x8 digits) run out of resolution before deep stacks run out of widths: keep >= 1x1.
        if h >= 2 and w >= 2:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        blocks.append(nn.Sequential(*layers))
        c = width
    blocks.append(nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, n_outputs)))
    return blocks


def _residual_blocks(cfg: ModelConfig, input_shape: tuple[int, ...], n_outputs: int) -> list[nn.Module]:
    c, h, w = _image_shape(cfg, input_shape)
    bn = cfg.batch_norm
    stem: list[nn.Module] = [_conv3x3(c, cfg.widths[0], 1, bn)]
    if bn:
        stem.append(nn.BatchNorm2d(cfg.widths[0]))
    stem.append(nn.ReLU())
    blocks: list[nn.Module] = [nn.Sequential(*stem)]
    c = cfg.widths[0]
    for i, width in enumerate(cfg.widths[1:], start=1):
        # Same arithmetic as the stride-2 convs: (H + 2 - 3) // 2 + 1 == ceil(H / 2).
        h_out, w_out = (h, w) if width == c else (math.ceil(h / 2), math.ceil(w / 2))
        if width * h_out * w_out > c * h * w:
            raise ValueError(
                f"model.widths = {list(cfg.widths)}: residual unit {i} ({c} -> {width} channels at {h}x{w}) would "
                f"grow the feature map from {c * h * w} to {width * h_out * w_out} values per sample; a width "
                f"change halves the resolution, so a width may at most quadruple (at 1x1 it may not grow)")
        blocks.append(ResidualUnit(c, width, bn))
        c, h, w = width, h_out, w_out
    blocks.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, n_outputs)))
    return blocks


def _block_linear_blocks(cfg: ModelConfig, d: int, n_outputs: int) -> list[nn.Module]:
    if cfg.widths:
        sizes = [int(s) for s in cfg.widths]
        if sum(sizes) != d:
            raise ValueError(f"model.widths = {list(cfg.widths)} gives features per block for block_linear and "
                             f"must sum to the {d} input features (sums to {sum(sizes)}); or set widths = [] "
                             f"for {min(4, d)} equal blocks")
    else:
        sizes = [len(part) for part in np.array_split(np.arange(d), min(4, d))]
    bounds = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    return [FeatureSliceBlock(int(bounds[i]), int(bounds[i + 1]), n_outputs, last=i == len(sizes) - 1)
            for i in range(len(sizes))]


# ----------------------------------------------------------------------------------------------------------
# Public API


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], n_outputs: int, seed: int, *,
                vocab_size: int | None = None) -> BlockModel:
    """Build the model named by `cfg` for inputs of `input_shape` (one sample) with `n_outputs` outputs.

    The weights depend on `seed` only; the global random state is left as it was, so building a model does not
    shift the data order or anything else seeded from it. `cfg.group > 0` merges the blocks into that many
    groups after initialisation, so grouping never changes the weights.

    Token inputs (text datasets) come with their vocabulary size: `vocab_size`, or else the `vocab_size` that
    a `bcdcore.data.TokenShape` input shape carries. Models that embed tokens need it; the others refuse
    token inputs. The zoo models (ResNets, nanoGPT, ensembles, text classifier) live in `bcdcore.zoo_models`.
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
    from bcdcore import zoo_models

    known = ("mlp", "linear", "cnn", "residual_cnn", "block_linear") + zoo_models.ZOO_MODELS
    if cfg.name not in known:
        raise ValueError(f"model.name: unknown model {cfg.name!r}; known models: {', '.join(known)}")
    token_model = cfg.name in ("nanogpt", "text_classifier")
    if token_model and vocab_size < 1:
        raise ValueError(f"model.name = {cfg.name!r} embeds token ids; it needs a text dataset (imdb, "
                         f"stdlib_text), whose vocabulary sets the embedding size")
    if vocab_size and not token_model:
        raise ValueError(f"model.name = {cfg.name!r} needs float features but the dataset gives token ids; use "
                         f"'text_classifier' (classification) or 'nanogpt' (language model)")
    d = math.prod(input_shape)
    model: BlockModel | None = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if cfg.name == "mlp":
            blocks = _mlp_blocks(cfg, d, n_outputs, nn.ReLU)
        elif cfg.name == "linear":
            blocks = _mlp_blocks(cfg, d, n_outputs, nn.Identity)
        elif cfg.name == "cnn":
            blocks = _cnn_blocks(cfg, input_shape, n_outputs)
        elif cfg.name == "residual_cnn":
            blocks = _residual_blocks(cfg, input_shape, n_outputs)
        elif cfg.name == "block_linear":
            blocks = _block_linear_blocks(cfg, d, n_outputs)
        else:
            model = zoo_models.build_zoo_model(cfg, input_shape, n_outputs, seed, vocab_size)
    if model is None:
        if cfg.group > 0:
            blocks = group_blocks(blocks, cfg.group)
        model = BlockModel(blocks, name=cfg.name, input_shape=input_shape, n_outputs=n_outputs)
    # Parameters are fp32 whatever torch's default dtype is (the update kernels assume a known dtype);
    # .float() leaves integer buffers such as BatchNorm's num_batches_tracked alone.
    model = model.float()
    if getattr(cfg, "weights", ""):
        if cfg.name not in zoo_models.RESNET_LAYERS:
            raise ValueError(f"model.weights: loading weights is available for resnet18/34, not {cfg.name!r}")
        zoo_models.load_weights_file(model, cfg.weights)
    return model


def block_sizes(model: BlockModel) -> list[int]:
    """Number of parameters in each block, in block order."""
    return [sum(p.numel() for p in block.parameters()) for block in model.blocks]


def group_blocks(blocks: list[nn.Module], k: int) -> list[nn.Module]:
    """Merge consecutive blocks into `k` groups; earlier groups take the extra blocks (numpy.array_split sizes).

    Each group is an nn.Sequential of the original block objects, so parameters and buffers are shared, not
    copied. `k` equal to the number of blocks returns the blocks unchanged.
    """
    blocks = list(blocks)
    n = len(blocks)
    if k < 1:
        raise ValueError(f"model.group must be >= 1 to group blocks (0 = no grouping), got {k}")
    if k > n:
        raise ValueError(f"model.group = {k} is more than the {n} blocks of this model; use at most {n} "
                         f"(or 0 for no grouping)")
    if k == n:
        return blocks
    groups: list[nn.Module] = []
    start = 0
    for size in (len(part) for part in np.array_split(np.arange(n), k)):
        groups.append(nn.Sequential(*blocks[start:start + size]))
        start += size
    return groups
