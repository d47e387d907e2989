"""Seeded minibatch streams over an in-memory split.

Each block draws from its own stream (seeded by run seed and block index), so what a block sees does not
depend on the schedule, the active set of other blocks, or how blocks are spread over processes.
"""
from __future__ import annotations

import torch
from torch import Tensor


class BatchStream:
    """Epochs of a seeded permutation, cut into batches; the last short batch of an epoch is dropped
    unless the split is smaller than one batch."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, seed: int) -> None:
        self.x, self.y = x, y
        self.n = len(x)
        self.batch_size = min(batch_size, self.n)
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.empty(0, dtype=torch.long)
        self.position = 0

    def draw(self) -> Tensor:
        """The rows of the next minibatch, on the host, advancing the stream (a new epoch's permutation when
        the current one has no full batch left)."""
        if self.position + self.batch_size > len(self.order):
            self.order = torch.randperm(self.n, generator=self.generator)
            self.position = 0
        rows = self.order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return rows

    def next(self) -> tuple[Tensor, Tensor]:
        idx = self.draw().to(self.x.device)
        xb = self.x.index_select(0, idx)
        prefetch = getattr(self.x, "prefetch", None)  # splits decoded from files (bcdcore.image_files)
        if prefetch is not None and self.position + self.batch_size <= len(self.order):
            prefetch(self.order[self.position:self.position + self.batch_size].tolist())
        if xb.dim() == 4:
            # Image batches go out channels-last: convolution, pooling and batch norm run much faster in it
            # (max-pool about 5x on CPU), and the values computed are the same operations.
            xb = xb.contiguous(memory_format=torch.channels_last)
        return xb, self.y.index_select(0, idx)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self.order, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        order, position = state["order"], state["position"]
        # a checkpoint is checked before use: an order that is not a permutation of this split would index
        # outside it many rounds later
        if (not isinstance(order, Tensor) or order.dtype != torch.long or order.dim() != 1
                or len(order) not in (0, self.n)
                or (len(order) and (int(order.min()) < 0 or int(order.max()) >= self.n))):
            raise ValueError(f"a minibatch order that is not a permutation of the {self.n} training samples")
        if not isinstance(position, int) or not 0 <= position <= len(order):
            raise ValueError(f"a minibatch position {position!r} outside its order of {len(order)}")
        self.generator.set_state(state["generator"])
        self.order = order
        self.position = position


def stream_seed(seed: int, stream: int) -> int:
    """Distinct, reproducible seeds per (run seed, stream): a fixed odd multiplier keeps them apart."""
    return (seed * 1_000_003 + stream * 7_919 + 12_345) % (2 ** 63 - 1)


def eval_batches(x: Tensor, y: Tensor, batch_size: int):
    prefetch = getattr(x, "prefetch", None)  # splits decoded from files: decode the next batch meanwhile
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size]
        if prefetch is not None and start + batch_size < len(x):
            prefetch(range(start + batch_size, min(start + 2 * batch_size, len(x))))
        yield xb, y[start:start + batch_size]
