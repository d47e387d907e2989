"""Models whose layers are grouped into blocks.

Block coordinate descent updates one block of parameters at a time, so every model here is a `BlockModel`: an
ordered `nn.ModuleList` of blocks whose composition is the whole network. Every parameter (and every buffer,
e.g. BatchNorm statistics) lives in exactly one block, so the algorithm can slice the parameters by block and
buffers move with the block that owns them.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
from torch import Tensor, nn


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
        check_blocks(self.blocks)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def extra_repr(self) -> str:
        return f"name={self.name!r}, input_shape={self.input_shape}, n_outputs={self.n_outputs}"


def check_blocks(blocks: nn.ModuleList) -> None:
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


# ----------------------------------------------------------------------------------------------------------
# Builders: each returns the list of blocks for one model name


# ----------------------------------------------------------------------------------------------------------
# Public API


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
