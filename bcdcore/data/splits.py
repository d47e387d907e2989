"""Seeded train/val/test splits shared by every loader (stratified for classification, scalers fitted on
train only), and the one-line errors for missing or unreadable dataset files."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from bcdcore.data.types import DataBundle, Split
from bcdcore.recipe import CLASSIFICATION, DATASETS, DataConfig, RecipeError

# Splits draw from their own stream so that, for synthetic data, changing how the data is generated
# never silently changes which rows land in which split (and vice versa).
SPLIT_STREAM = 1


def split_sizes(n: int, cfg: DataConfig) -> tuple[int, int, int]:
    n_test = int(round(cfg.test_fraction * n))
    n_val = int(round(cfg.val_fraction * n))
    n_train = n - n_test - n_val
    if n_train < 1:
        raise ValueError(f"dataset {cfg.name!r} has {n} samples: val_fraction={cfg.val_fraction} and "
                         f"test_fraction={cfg.test_fraction} leave no training data")
    return n_train, n_val, n_test


def can_stratify(labels: np.ndarray, n_out: int) -> bool:
    # sklearn's stratified split needs every class twice and at least one sample per class on each side;
    # tiny fractions fall back to a plain shuffle instead of erroring.
    counts = np.bincount(labels)
    counts = counts[counts > 0]
    k = len(counts)
    return counts.min() >= 2 and n_out >= k and len(labels) - n_out >= k


def take(idx: np.ndarray, n_out: int, labels: np.ndarray | None, state: int,
          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split ``idx`` into (rest, out) with ``n_out`` samples in ``out``."""
    if n_out == 0:
        return idx, idx[:0]
    if labels is not None and can_stratify(labels[idx], n_out):
        rest, out = train_test_split(idx, test_size=n_out, stratify=labels[idx], random_state=state)
        return np.asarray(rest), np.asarray(out)
    perm = rng.permutation(idx)
    return perm[n_out:], perm[:n_out]


def split_indices(n: int, cfg: DataConfig, seed: int,
                   labels: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) index arrays; stratified when ``labels`` is given."""
    _, n_val, n_test = split_sizes(n, cfg)
    rng = np.random.default_rng((seed, SPLIT_STREAM))
    states = rng.integers(0, 2**31 - 1, size=2)
    rest, test = take(np.arange(n), n_test, labels, int(states[0]), rng)
    train, val = take(rest, n_val, labels, int(states[1]), rng)
    return train, val, test


def bundle(name: str, x: np.ndarray | torch.Tensor, y: np.ndarray, idx: tuple[np.ndarray, ...],
            n_outputs: int) -> DataBundle:
    """Cut the (already scaled) full arrays into the three splits."""
    task = DATASETS[name].task
    x = torch.as_tensor(x)
    y_dtype = torch.int64 if task == CLASSIFICATION else torch.float32
    train, val, test = (Split(x=x[torch.as_tensor(i, dtype=torch.long)].to(torch.float32).contiguous(),
                              y=torch.as_tensor(y[i]).to(y_dtype).contiguous()) for i in idx)
    return DataBundle(name=name, task=task, input_shape=tuple(x.shape[1:]), n_outputs=n_outputs,
                      train=train, val=val, test=test)


def standardize_features(x: np.ndarray, train_idx: np.ndarray) -> np.ndarray:
    return StandardScaler().fit(x[train_idx]).transform(x)


SUBSET_STREAM = 2  # per-class subsets (mini_mnist, per_class caps): their own seeded stream


def missing_files(cfg: DataConfig, where: Path, expected: Sequence[str], downloadable: bool = True) -> RecipeError:
    listed = ", ".join(expected[:8]) + (f" (+{len(expected) - 8} more)" if len(expected) > 8 else "")
    fix = ("put them there, set data.root to the folder that holds them, or set data.download = true"
           if downloadable else
           "put them there or set data.root to the folder that holds them (it cannot be downloaded for you)")
    return RecipeError(f"data.name = {cfg.name!r}: dataset files not found: expected {listed} in {where}; {fix}")


def load_failed(cfg: DataConfig, where: Path, exc: BaseException) -> RecipeError:
    what = "download into" if cfg.download else "reading"
    detail = " ".join(str(exc).split())[:300] or type(exc).__name__
    return RecipeError(f"data.name = {cfg.name!r}: {what} {where} failed ({type(exc).__name__}: {detail}); "
                       f"check the files there (or the network with data.download = true)")


def carve(pool: np.ndarray, labels: np.ndarray | None, cfg: DataConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices: a seeded val_fraction of `pool` (stratified when labels are given)."""
    n_val = int(round(cfg.val_fraction * len(pool)))
    if len(pool) - n_val < 1:
        raise RecipeError(f"data.name = {cfg.name!r}: {len(pool)} training samples; val_fraction = "
                          f"{cfg.val_fraction} leaves none for training")
    rng = np.random.default_rng((seed, SPLIT_STREAM))
    state = int(rng.integers(0, 2**31 - 1))
    train, val = take(np.asarray(pool), n_val, labels, state, rng)
    return np.sort(train), np.sort(val)


def per_class_subset(labels: np.ndarray, pool: np.ndarray, count: int, cfg: DataConfig, seed: int,
               strict: bool) -> np.ndarray:
    """A seeded choice of `count` indices of each class from `pool` (all of a smaller class unless strict)."""
    rng = np.random.default_rng((seed, SUBSET_STREAM))
    keep = []
    for c in np.unique(labels[pool]):
        members = pool[labels[pool] == c]
        if len(members) < count and strict:
            raise RecipeError(f"data.per_class = {count}: class {int(c)} of {cfg.name!r} has only "
                              f"{len(members)} training images; use at most {len(members)}")
        keep.append(rng.choice(members, size=min(count, len(members)), replace=False))
    return np.sort(np.concatenate(keep)) if keep else pool[:0]
