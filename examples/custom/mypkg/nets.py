"""A plain nn.Module whose layers are grouped in `self.blocks`: the one thing block coordinate descent needs."""
from __future__ import annotations

import math

from torch import Tensor, nn


class TinyNet(nn.Module):
    """An MLP of `depth` hidden layers; each hidden layer is one block, and so is the output layer."""

    def __init__(self, n_inputs: int, n_outputs: int, depth: int = 2, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        size = n_inputs
        for _ in range(depth):
            layers.append(nn.Sequential(nn.Linear(size, width), nn.Tanh()))
            size = width
        layers.append(nn.Linear(size, n_outputs))
        self.blocks = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        for block in self.blocks:
            x = block(x)
        return x


def build(input_shape: tuple[int, ...], n_outputs: int, depth: int = 2, width: int = 32) -> nn.Module:
    """The builder a recipe names: [model] name = "mypkg.nets:build", [model.args] depth/width."""
    return TinyNet(math.prod(input_shape), n_outputs, depth=depth, width=width)
