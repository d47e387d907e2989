"""`text_classifier`: embeddings block (mean of the word embeddings of the non-padding tokens), one block per
hidden width (Linear + ReLU), head (Linear).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from bcdcore.recipe import ModelConfig


class BagOfEmbeddings(nn.Module):
    """Mean of the embeddings of the non-padding tokens (id 0 is padding): (N, T) ids -> (N, n_embd)."""

    def __init__(self, vocab_size: int, n_embd: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, n_embd, padding_idx=0)
        nn.init.normal_(self.embedding.weight, std=0.1)
        with torch.no_grad():
            self.embedding.weight[0].zero_()

    def forward(self, idx: Tensor) -> Tensor:
        mask = (idx != 0).unsqueeze(-1).to(self.embedding.weight.dtype)
        return (self.embedding(idx) * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def text_blocks(cfg: ModelConfig, input_shape: tuple[int, ...], n_outputs: int,
                 vocab_size: int) -> list[nn.Module]:
    if len(input_shape) != 1:
        raise ValueError(f"model.name = 'text_classifier' needs token sequences (T,); dataset gives "
                         f"{tuple(input_shape)}")
    blocks: list[nn.Module] = [BagOfEmbeddings(vocab_size, cfg.n_embd)]
    width_in = cfg.n_embd
    for width in cfg.widths:
        blocks.append(nn.Sequential(nn.Linear(width_in, width), nn.ReLU()))
        width_in = width
    blocks.append(nn.Sequential(nn.Linear(width_in, n_outputs)))
    return blocks
