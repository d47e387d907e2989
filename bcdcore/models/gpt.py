"""nanoGPT: embeddings (token + position), one block per transformer layer, head (final LayerNorm + the
vocabulary projection). Weight tying (`tie_weights = true`) is resolved by ownership: the embeddings block owns the
shared matrix, and the head reads it without registering it, so the head block holds only the final LayerNorm. A
step on the head block then leaves the shared matrix alone (it is another block's coordinate); a step on the
embeddings block moves it with the gradient of both its uses.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bcdcore.recipe import ModelConfig


class Embeddings(nn.Module):
    """Token + position embeddings (GPT-2's wte, wpe), then dropout."""

    def __init__(self, vocab_size: int, block_size: int, n_embd: int, dropout: float) -> None:
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence of length {t} is longer than the model's block size {self.block_size}")
        pos = torch.arange(t, device=idx.device)
        return self.drop(self.wte(idx) + self.wpe(pos))


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c)))


class TransformerLayer(nn.Module):
    """Pre-norm GPT-2 layer: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd),
                                 nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class LMHead(nn.Module):
    """Final LayerNorm and the projection to vocabulary logits (N, T, V).

    Tied: the projection is the embeddings block's token matrix, held as a plain (unregistered) reference so
    that it stays a parameter of that block only."""

    def __init__(self, n_embd: int, vocab_size: int, tied_to: Embeddings | None) -> None:
        super().__init__()
        self.ln_f = nn.LayerNorm(n_embd)
        self._tied = (tied_to,) if tied_to is not None else ()
        self.lm_head = None if tied_to is not None else nn.Linear(n_embd, vocab_size, bias=False)

    @property
    def tied(self) -> bool:
        return bool(self._tied)

    def forward(self, x: Tensor) -> Tensor:
        x = self.ln_f(x)
        return F.linear(x, self._tied[0].wte.weight) if self._tied else self.lm_head(x)


def nanogpt_blocks(cfg: ModelConfig, input_shape: tuple[int, ...], n_outputs: int,
                    vocab_size: int) -> list[nn.Module]:
    if len(input_shape) != 1:
        raise ValueError(f"model.name = 'nanogpt' needs token sequences (T,); dataset gives {tuple(input_shape)}")
    if n_outputs != vocab_size:
        raise ValueError(f"model.name = 'nanogpt' predicts the next token: it needs a language-model dataset "
                         f"(n_outputs = vocabulary size), got {n_outputs} outputs for {vocab_size} tokens; "
                         f"use data.name = 'stdlib_text'")
    if cfg.n_embd % cfg.n_head:
        raise ValueError(f"model.n_head = {cfg.n_head} must divide model.n_embd = {cfg.n_embd}")
    emb = Embeddings(vocab_size, int(input_shape[0]), cfg.n_embd, cfg.dropout)
    layers = [TransformerLayer(cfg.n_embd, cfg.n_head, cfg.dropout) for _ in range(cfg.n_layer)]
    head = LMHead(cfg.n_embd, vocab_size, emb if cfg.tie_weights else None)
    blocks: list[nn.Module] = [emb, *layers, head]
    for block in blocks:  # GPT-2 initialisation; residual projections scaled by depth
        for name, m in block.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for name, p in block.named_parameters():
            if name.endswith("c_proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
    return blocks
