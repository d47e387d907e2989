"""Datasets as seeded train/val/test splits of CPU tensors, scalers fitted on train only.

This module holds the embedded offline datasets (scikit-learn's bundled digits and diabetes, synthetic
regressions) and the common types; the datasets read from files under `[data] root` (MNIST family, CIFAR,
SVHN, ImageNet folders, IMDb, California housing) and the standard-library text corpus live in
`bcdcore.datasets_real`, which registers its loaders here.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_diabetes, load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from bcdcore.recipe import CLASSIFICATION, DATASETS, DataConfig

__all__ = ["Split", "DataBundle", "TokenShape", "LOADERS", "load_data", "default_data_root", "data_root"]

# Splits draw from their own stream so that, for synthetic data, changing how the data is generated
# never silently changes which rows land in which split (and vice versa).
_SPLIT_STREAM = 1


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
    val: Split
    test: Split
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


Loader = Callable[[DataConfig, int], DataBundle]
LOADERS: dict[str, Loader] = {}


def _register(name: str) -> Callable[[Loader], Loader]:
    def wrap(fn: Loader) -> Loader:
        LOADERS[name] = fn
        return fn
    return wrap


def load_data(cfg: DataConfig, seed: int) -> DataBundle:
    """Build the dataset named by ``cfg.name`` with splits determined by ``seed``."""
    try:
        loader = LOADERS[cfg.name]
    except KeyError:
        raise ValueError(f"unknown dataset {cfg.name!r}; known: {', '.join(sorted(LOADERS))}") from None
    return loader(cfg, seed)


# ----------------------------------------------------------------------------------------------------------
# Splitting

def _split_sizes(n: int, cfg: DataConfig) -> tuple[int, int, int]:
    n_test = int(round(cfg.test_fraction * n))
    n_val = int(round(cfg.val_fraction * n))
    n_train = n - n_test - n_val
    if n_train < 1:
        raise ValueError(f"dataset {cfg.name!r} has {n} samples: val_fraction={cfg.val_fraction} and "
                         f"test_fraction={cfg.test_fraction} leave no training data")
    return n_train, n_val, n_test


def _can_stratify(labels: np.ndarray, n_out: int) -> bool:
    # sklearn's stratified split needs every class twice and at least one sample per class on each side;
    # tiny fractions fall back to a plain shuffle instead of erroring.
    counts = np.bincount(labels)
    counts = counts[counts > 0]
    k = len(counts)
    return counts.min() >= 2 and n_out >= k and len(labels) - n_out >= k


def _take(idx: np.ndarray, n_out: int, labels: np.ndarray | None, state: int,
          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split ``idx`` into (rest, out) with ``n_out`` samples in ``out``."""
    if n_out == 0:
        return idx, idx[:0]
    if labels is not None and _can_stratify(labels[idx], n_out):
        rest, out = train_test_split(idx, test_size=n_out, stratify=labels[idx], random_state=state)
        return np.asarray(rest), np.asarray(out)
    perm = rng.permutation(idx)
    return perm[n_out:], perm[:n_out]


def _split_indices(n: int, cfg: DataConfig, seed: int,
                   labels: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) index arrays; stratified when ``labels`` is given."""
    _, n_val, n_test = _split_sizes(n, cfg)
    rng = np.random.default_rng((seed, _SPLIT_STREAM))
    states = rng.integers(0, 2**31 - 1, size=2)
    rest, test = _take(np.arange(n), n_test, labels, int(states[0]), rng)
    train, val = _take(rest, n_val, labels, int(states[1]), rng)
    return train, val, test


# ----------------------------------------------------------------------------------------------------------
# Assembly

def _bundle(name: str, x: np.ndarray | torch.Tensor, y: np.ndarray, idx: tuple[np.ndarray, ...],
            n_outputs: int) -> DataBundle:
    """Cut the (already scaled) full arrays into the three splits."""
    task = DATASETS[name].task
    x = torch.as_tensor(x)
    y_dtype = torch.int64 if task == CLASSIFICATION else torch.float32
    train, val, test = (Split(x=x[torch.as_tensor(i, dtype=torch.long)].to(torch.float32).contiguous(),
                              y=torch.as_tensor(y[i]).to(y_dtype).contiguous()) for i in idx)
    return DataBundle(name=name, task=task, input_shape=tuple(x.shape[1:]), n_outputs=n_outputs,
                      train=train, val=val, test=test)


def _standardize_features(x: np.ndarray, train_idx: np.ndarray) -> np.ndarray:
    return StandardScaler().fit(x[train_idx]).transform(x)


@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    images, target = d.images.astype(np.float32), d.target.astype(np.int64)
    images.flags.writeable = target.flags.writeable = False  # cached: callers must copy, never mutate
    return images, target


@functools.lru_cache(maxsize=1)
def _diabetes_raw() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_diabetes(return_X_y=True, scaled=False)
    x, y = x.astype(np.float64), y.astype(np.float64)
    x.flags.writeable = y.flags.writeable = False
    return x, y


# ----------------------------------------------------------------------------------------------------------
# Loaders

@_register("digits")
def _load_digits(cfg: DataConfig, seed: int) -> DataBundle:
    images, y = _digits_raw()
    idx = _split_indices(len(y), cfg, seed, labels=y)
    x = torch.from_numpy(images.copy()).unsqueeze(1)  # (N, 1, 8, 8)
    if cfg.image_size > 0 and cfg.image_size != x.shape[-1]:
        x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False)
    train_pixels = x[torch.as_tensor(idx[0], dtype=torch.long)].to(torch.float64)
    mean, std = train_pixels.mean(), train_pixels.std(correction=0)
    x = ((x.to(torch.float64) - mean) / std).to(torch.float32)
    if cfg.channels == 3:
        x = x.repeat(1, 3, 1, 1)
    elif cfg.channels != 1:
        raise ValueError(f"digits: channels must be 1 or 3, got {cfg.channels}")
    return _bundle("digits", x, y, idx, n_outputs=10)


@_register("digits_flat")
def _load_digits_flat(cfg: DataConfig, seed: int) -> DataBundle:
    images, y = _digits_raw()
    idx = _split_indices(len(y), cfg, seed, labels=y)
    x = images.reshape(len(y), -1).astype(np.float64)
    return _bundle("digits_flat", _standardize_features(x, idx[0]), y, idx, n_outputs=10)


@_register("diabetes")
def _load_diabetes(cfg: DataConfig, seed: int) -> DataBundle:
    x, y = _diabetes_raw()
    idx = _split_indices(len(y), cfg, seed, labels=None)
    y_train = y[idx[0]]
    # standardized targets keep the MSE O(1), so default learning rates work across datasets
    y = (y - y_train.mean()) / y_train.std()
    return _bundle("diabetes", _standardize_features(x, idx[0]), y, idx, n_outputs=1)


@_register("toy_regression")
def _load_toy_regression(cfg: DataConfig, seed: int) -> DataBundle:
    rng = np.random.default_rng(seed)
    n, d = cfg.n_samples, cfg.n_features
    x = rng.standard_normal((n, d))
    w = rng.standard_normal(d) / np.sqrt(d)  # keeps Var(Xw) ~ 1 whatever n_features is
    y = x @ w + cfg.noise * rng.standard_normal(n)
    idx = _split_indices(n, cfg, seed, labels=None)
    return _bundle("toy_regression", x, y, idx, n_outputs=1)


@_register("quadratic")
def _load_quadratic(cfg: DataConfig, seed: int) -> DataBundle:
    rng = np.random.default_rng(seed)
    n, d = cfg.n_samples, cfg.n_features
    z = rng.standard_normal((n, d))
    # mixing makes X^T X non-diagonal, so blocks of w are coupled in the quadratic
    m = np.eye(d) + 0.3 * rng.standard_normal((d, d)) / np.sqrt(d)
    x = z @ m
    w = rng.standard_normal(d) / np.sqrt(d)
    y = x @ w + cfg.noise * rng.standard_normal(n)
    idx = _split_indices(n, cfg, seed, labels=None)
    return _bundle("quadratic", x, y, idx, n_outputs=1)


# The file-backed datasets register themselves into LOADERS (imported last: that module builds on this one).
from bcdcore import datasets_real  # noqa: E402,F401
