"""The one registry of datasets: a name -> a loader `(DataConfig, seed) -> DataBundle`.

Every built-in dataset is listed here, explicitly; `register` adds a user's own under a new name (the plugin
issue opens it to recipes). The recipe layer (bcdcore.recipe.DATASETS) describes the same names for validation.
"""
from __future__ import annotations

from typing import Callable

from bcdcore.data.embedded import load_diabetes, load_digits, load_digits_flat, load_quadratic, load_toy_regression
from bcdcore.data.image_trees import load_imagenet, load_mini_imagenet
from bcdcore.data.images import (
    load_cifar10,
    load_cifar100,
    load_fashion_mnist,
    load_mini_mnist,
    load_mnist,
    load_mnist_8ch,
    load_mnist_flat,
    load_svhn,
)
from bcdcore.data.plugin import load_plugin
from bcdcore.data.tabular import load_california_housing
from bcdcore.data.text import load_imdb, load_stdlib_text
from bcdcore.data.types import DataBundle
from bcdcore.recipe import DataConfig
from bcdcore.recipe.plugin_keys import is_plugin

Loader = Callable[[DataConfig, int], DataBundle]

LOADERS: dict[str, Loader] = {
    "digits": load_digits,
    "digits_flat": load_digits_flat,
    "diabetes": load_diabetes,
    "toy_regression": load_toy_regression,
    "quadratic": load_quadratic,
    "imagenet": load_imagenet,
    "mini_imagenet": load_mini_imagenet,
    "mnist": load_mnist,
    "mini_mnist": load_mini_mnist,
    "mnist_8ch": load_mnist_8ch,
    "mnist_flat": load_mnist_flat,
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "svhn": load_svhn,
    "california_housing": load_california_housing,
    "imdb": load_imdb,
    "stdlib_text": load_stdlib_text,
}


def register(name: str, loader: Loader) -> None:
    """Add a loader under `name` (a name already taken is refused: built-ins cannot be replaced by accident)."""
    if name in LOADERS:
        raise ValueError(f"dataset {name!r} is registered already")
    LOADERS[name] = loader


def load_data(cfg: DataConfig, seed: int) -> DataBundle:
    """Build the dataset named by ``cfg.name`` with splits determined by ``seed``."""
    if is_plugin(cfg.name) and cfg.name not in LOADERS:  # "pkg.module:load"
        return load_plugin(cfg, seed)
    try:
        loader = LOADERS[cfg.name]
    except KeyError:
        raise ValueError(f"unknown dataset {cfg.name!r}; known: {', '.join(sorted(LOADERS))}") from None
    return loader(cfg, seed)
