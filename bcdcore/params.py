"""Flat parameter store: every parameter of a block model lives in one contiguous buffer, block after block.

Block i is then the slice [offsets[i], offsets[i+1]) of `flat`, and its gradients the same slice of `grad`,
so the update ops work on one flat slice per block and no per-block copy of the model is ever made.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class FlatParams:
    def __init__(self, model: nn.Module, blocks: nn.ModuleList) -> None:
        self.block_params: list[list[nn.Parameter]] = [list(b.parameters()) for b in blocks]
        owned = [p for ps in self.block_params for p in ps]
        if len({id(p) for p in owned}) != len(owned):
            raise ValueError("a parameter belongs to two blocks; every parameter needs exactly one owner block")
        missing = {id(p) for p in model.parameters()} - {id(p) for p in owned}
        if missing:
            raise ValueError(f"{len(missing)} parameter tensors are outside model.blocks")
        dtypes = {p.dtype for p in owned}
        if len(dtypes) != 1:
            raise ValueError(f"all parameters must share one dtype, got {sorted(map(str, dtypes))}")
        self.sizes = [sum(p.numel() for p in ps) for ps in self.block_params]
        self.offsets = [0]
        for n in self.sizes:
            self.offsets.append(self.offsets[-1] + n)
        first = owned[0]
        self.flat = torch.empty(self.offsets[-1], dtype=first.dtype, device=first.device)
        self.grad = torch.zeros_like(self.flat)
        offset = 0
        # Re-point every parameter (and its .grad) at a view of the flat buffers. Autograd accumulates into an
        # existing .grad in place, so backward writes straight into `grad`.
        for p in owned:
            n = p.numel()
            self.flat[offset:offset + n].copy_(p.detach().reshape(-1))
            p.data = self.flat[offset:offset + n].view_as(p)
            p.grad = self.grad[offset:offset + n].view_as(p)
            offset += n
        self.grad_views = [[p.grad for p in ps] for ps in self.block_params]
        self.block_buffers: list[list[Tensor]] = [list(b.buffers()) for b in blocks]

    @property
    def n_blocks(self) -> int:
        return len(self.sizes)

    def block(self, i: int, t: Tensor | None = None) -> Tensor:
        """Block i's slice of `t` (default: the parameters)."""
        t = self.flat if t is None else t
        return t[self.offsets[i]:self.offsets[i + 1]]

    def set_trainable(self, blocks: set[int] | None) -> None:
        """Only parameters of `blocks` require grad and hold a .grad (None = all): frozen blocks get no
        gradients computed, and their .grad is None while they are frozen."""
        for i, ps in enumerate(self.block_params):
            on = blocks is None or i in blocks
            for p, view in zip(ps, self.grad_views[i]):
                p.requires_grad_(on)
                p.grad = view if on else None

    def grads_in_place(self) -> bool:
        """True while every .grad is still a view of the flat grad buffer (someone may have replaced it)."""
        lo, hi = self.grad.data_ptr(), self.grad.data_ptr() + self.grad.numel() * self.grad.element_size()
        return all(p.grad is not None and lo <= p.grad.data_ptr() < hi for ps in self.block_params for p in ps)

    # buffers (BatchNorm statistics) move with their block
    def snapshot_buffers(self) -> list[list[Tensor]]:
        return [[b.detach().clone() for b in bs] for bs in self.block_buffers]

    def restore_buffers(self, snapshot: list[list[Tensor]], blocks: range | list[int] | None = None) -> None:
        for i in (range(self.n_blocks) if blocks is None else blocks):
            for live, saved in zip(self.block_buffers[i], snapshot[i]):
                live.copy_(saved)
