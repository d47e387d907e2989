"""What every loader returns: a `DataBundle` of train/val/test `Split`s (CPU tensors), and where dataset
files live (`[data] root`, else $BCD_DATA, else ~/.cache/bcd/data)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bcdcore.recipe import DataConfig


@dataclass
class Split:
    x: torch.Tensor  # float32 (N, *input_shape); int64 token ids (N, T) for text datasets
    y: torch.Tensor  # int64 (N,) classification; float32 (N,) regression; int64 (N, T) next tokens (language model)

    def __len__(self) -> int:
        return int(self.x.shape[0])


class TokenShape(tuple):
    """The input shape of token inputs, (T,), carrying the vocabulary size: token ids lie in [0, vocab_size).

    It compares and unpacks like the plain tuple; models that embed tokens read `vocab_size` from it, so the
    vocabulary built from the data reaches the model through the same `input_shape` every model receives.
    """

    vocab_size: int

    def __new__(cls, shape, vocab_size: int) -> "TokenShape":
        obj = super().__new__(cls, tuple(int(s) for s in shape))
        obj.vocab_size = int(vocab_size)
        return obj

    def __reduce__(self):
        return (TokenShape, (tuple(self), self.vocab_size))

    def __repr__(self) -> str:
        return f"TokenShape({tuple(self)!r}, vocab_size={self.vocab_size})"


@dataclass
class DataBundle:
    name: str
    task: str
    input_shape: tuple[int, ...]  # one sample; a TokenShape for token inputs
    n_outputs: int  # classes; 1 for regression; the vocabulary size for a language model
    train: Split
    # A plugin loader may leave val and test out (None): the engine carves them from train, seeded
    # (bcdcore.data.plugin); every built-in loader gives all three.
    val: Split | None = None
    test: Split | None = None
    vocab: tuple[str, ...] = ()  # text datasets: token id -> word or character
    info: dict = field(default_factory=dict)  # dataset facts (e.g. stdlib_text's unigram baseline losses)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


def default_data_root() -> Path:
    """Where dataset files live when `[data] root` is "": $BCD_DATA, else ~/.cache/bcd/data."""
    env = os.environ.get("BCD_DATA", "")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bcd" / "data"


def data_root(cfg: DataConfig) -> Path:
    return Path(cfg.root).expanduser() if cfg.root else default_data_root()
