"""`mlp_ensemble` / `cnn_ensemble`: `members` independent MLPs / CNNs; the blocks are member 0's blocks, then
member 1's, ... Voting "average" returns the mean of the member outputs; "random" returns, per sample, one member's
output: drawn at random in training mode, and in eval mode picked by a hash of the sample itself, so evaluation is
deterministic and does not depend on how samples are batched.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from bcdcore.models.blocks import BlockModel, group_blocks
from bcdcore.models.small import cnn_blocks, image_shape, mlp_blocks
from bcdcore.recipe import ModelConfig


class EnsembleModel(BlockModel):
    """`members` networks side by side; `blocks` is their blocks concatenated (then grouped, if asked), and
    the forward pass runs each member's own chain of blocks and combines the outputs by `voting`."""

    def __init__(self, blocks: list[nn.Module], members: list[list[nn.Module]], voting: str, seed: int, *,
                 name: str, input_shape: tuple[int, ...], n_outputs: int) -> None:
        super().__init__(blocks, name=name, input_shape=input_shape, n_outputs=n_outputs)
        if voting not in ("average", "random"):
            raise ValueError(f"model.voting: unknown voting {voting!r}; use 'average' or 'random'")
        # plain attributes: the member modules are registered once, through self.blocks
        self._members = tuple(tuple(chain) for chain in members)
        self.voting = voting
        self.seed = seed
        self._hash_w: Tensor | None = None  # eval-mode vote hash weights, drawn on first use (not a buffer)
        self._generator = torch.Generator().manual_seed(seed)

    @property
    def n_members(self) -> int:
        return len(self._members)

    def member_outputs(self, x: Tensor) -> Tensor:
        """(members, N, n_outputs)."""
        outs = []
        for chain in self._members:
            h = x
            for block in chain:
                h = block(h)
            outs.append(h)
        return torch.stack(outs)

    def choose(self, x: Tensor) -> Tensor:
        """The member answering for each sample under random voting, (N,) on x's device."""
        n, m = x.shape[0], self.n_members
        if self.training:
            return torch.randint(0, m, (n,), generator=self._generator).to(x.device)
        # eval: a hash of the sample (rounded to 2^-16, then exact integer arithmetic), so batching cannot change
        # it; rounding rather than reinterpreting the float bits keeps it expressible in ONNX (export)
        flat = x.reshape(n, -1)
        bits = torch.round(flat.float() * 65536.0).to(torch.int64) if flat.is_floating_point() else flat.long()
        if self._hash_w is None or self._hash_w.numel() != flat.shape[1]:
            self._hash_w = torch.randint(1, 65521, (flat.shape[1],), generator=torch.Generator().manual_seed(self.seed))
        return ((bits % 65521) * self._hash_w.to(x.device)).sum(1) % m

    def forward(self, x: Tensor) -> Tensor:
        outs = self.member_outputs(x)
        if self.voting == "average" or self.n_members == 1:
            return outs.mean(0)
        pick = self.choose(x)
        return outs[pick, torch.arange(x.shape[0], device=x.device)]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", members={self.n_members}, voting={self.voting!r}"


def ensemble(cfg: ModelConfig, input_shape: tuple[int, ...], n_outputs: int, seed: int) -> EnsembleModel:
    members = []
    for _ in range(cfg.members):
        if cfg.name == "mlp_ensemble":
            members.append(mlp_blocks(cfg, math.prod(input_shape), n_outputs, nn.ReLU))
        else:
            image_shape(cfg, input_shape)
            members.append(cnn_blocks(cfg, input_shape, n_outputs))
    blocks = [b for chain in members for b in chain]
    if cfg.group > 0:
        blocks = group_blocks(blocks, cfg.group)
    return EnsembleModel(blocks, members, cfg.voting, seed, name=cfg.name, input_shape=input_shape,
                         n_outputs=n_outputs)
