"""The embedded offline datasets: scikit-learn's bundled digits and diabetes, and synthetic regressions
(`toy_regression`, `quadratic`). No files, no network: the quickstart and the tests run on these.
"""
from __future__ import annotations

import functools
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn import datasets as sklearn_datasets

from bcdcore.data.splits import bundle, split_indices, standardize_features
from bcdcore.data.types import DataBundle
from bcdcore.recipe import DataConfig

Loader = Callable[[DataConfig, int], DataBundle]


# ----------------------------------------------------------------------------------------------------------
# Splitting


# ----------------------------------------------------------------------------------------------------------
# Assembly


@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    d = sklearn_datasets.load_digits()
    images, target = d.images.astype(np.float32), d.target.astype(np.int64)
    images.flags.writeable = target.flags.writeable = False  # cached: callers must copy, never mutate
    return images, target


@functools.lru_cache(maxsize=1)
def _diabetes_raw() -> tuple[np.ndarray, np.ndarray]:
    x, y = sklearn_datasets.load_diabetes(return_X_y=True, scaled=False)
    x, y = x.astype(np.float64), y.astype(np.float64)
    x.flags.writeable = y.flags.writeable = False
    return x, y


# ----------------------------------------------------------------------------------------------------------
# Loaders

def load_digits(cfg: DataConfig, seed: int) -> DataBundle:
    images, y = _digits_raw()
    idx = split_indices(len(y), cfg, seed, labels=y)
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
    return bundle("digits", x, y, idx, n_outputs=10)


def load_digits_flat(cfg: DataConfig, seed: int) -> DataBundle:
    images, y = _digits_raw()
    idx = split_indices(len(y), cfg, seed, labels=y)
    x = images.reshape(len(y), -1).astype(np.float64)
    return bundle("digits_flat", standardize_features(x, idx[0]), y, idx, n_outputs=10)


def load_diabetes(cfg: DataConfig, seed: int) -> DataBundle:
    x, y = _diabetes_raw()
    idx = split_indices(len(y), cfg, seed, labels=None)
    y_train = y[idx[0]]
    # standardized targets keep the MSE O(1), so default learning rates work across datasets
    y = (y - y_train.mean()) / y_train.std()
    return bundle("diabetes", standardize_features(x, idx[0]), y, idx, n_outputs=1)


def load_toy_regression(cfg: DataConfig, seed: int) -> DataBundle:
    rng = np.random.default_rng(seed)
    n, d = cfg.n_samples, cfg.n_features
    x = rng.standard_normal((n, d))
    w = rng.standard_normal(d) / np.sqrt(d)  # keeps Var(Xw) ~ 1 whatever n_features is
    y = x @ w + cfg.noise * rng.standard_normal(n)
    idx = split_indices(n, cfg, seed, labels=None)
    return bundle("toy_regression", x, y, idx, n_outputs=1)


def load_quadratic(cfg: DataConfig, seed: int) -> DataBundle:
    rng = np.random.default_rng(seed)
    n, d = cfg.n_samples, cfg.n_features
    z = rng.standard_normal((n, d))
    # mixing makes X^T X non-diagonal, so blocks of w are coupled in the quadratic
    m = np.eye(d) + 0.3 * rng.standard_normal((d, d)) / np.sqrt(d)
    x = z @ m
    w = rng.standard_normal(d) / np.sqrt(d)
    y = x @ w + cfg.noise * rng.standard_normal(n)
    idx = split_indices(n, cfg, seed, labels=None)
    return bundle("quadratic", x, y, idx, n_outputs=1)


# The file-backed datasets register themselves into LOADERS (imported last: that module builds on this one).
