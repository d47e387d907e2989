"""The small models: `mlp` (ReLU), `linear` (identity activations), `cnn`, `residual_cnn` and `block_linear`
(one block per feature slice); each builder returns the list of blocks.
"""
from __future__ import annotations

import math
from typing import Union

import numpy as np
import torch
from torch import Tensor, nn

from bcdcore.recipe import ModelConfig

# What flows between block_linear blocks: the flattened features and the prediction accumulated so far.
LinearState = tuple[Tensor, Tensor]


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


def mlp_blocks(cfg: ModelConfig, d: int, n_outputs: int, activation: type[nn.Module]) -> list[nn.Module]:
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


def image_shape(cfg: ModelConfig, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(f"model.name = {cfg.name!r} needs image inputs (C, H, W); dataset gives shape "
                         f"{tuple(input_shape)}; use an image dataset (e.g. 'digits') or model 'mlp'")
    if not cfg.widths:
        raise ValueError(f"model.widths: {cfg.name} needs at least one width, got []")
    c, h, w = (int(s) for s in input_shape)
    return c, h, w


def cnn_blocks(cfg: ModelConfig, input_shape: tuple[int, ...], n_outputs: int) -> list[nn.Module]:
    c, h, w = image_shape(cfg, input_shape)
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


def residual_blocks(cfg: ModelConfig, input_shape: tuple[int, ...], n_outputs: int) -> list[nn.Module]:
    c, h, w = image_shape(cfg, input_shape)
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


def block_linear_blocks(cfg: ModelConfig, d: int, n_outputs: int) -> list[nn.Module]:
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
