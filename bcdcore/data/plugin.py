"""Plugin datasets: `[data] name = "pkg.module:load"` calls `load(**args)` (and passes `seed=` when load takes
a `seed` parameter) and checks that it returns a `DataBundle` the engine can train on. A bundle with only a
training split gets the usual seeded validation and test splits carved from it (val_fraction, test_fraction;
stratified for classification), so the same recipe and seed always give the same splits.
"""
from __future__ import annotations

import inspect

import numpy as np
import torch

from bcdcore import plugins
from bcdcore.data.splits import SPLIT_STREAM, take
from bcdcore.data.types import DataBundle, Split
from bcdcore.recipe import CLASSIFICATION, LANGUAGE_MODEL, TASKS, DataConfig

WHERE = "data.name"


def load_plugin(cfg: DataConfig, seed: int) -> DataBundle:
    obj = plugins.import_object(cfg.name, WHERE)
    if isinstance(obj, DataBundle):  # a bundle handed to bcdcore.train
        bundle = obj
    else:
        loader = plugins.resolve(cfg.name, "data", WHERE)
        kwargs = dict(cfg.args)
        if takes_seed(loader) and "seed" not in kwargs:
            kwargs["seed"] = seed
        bundle = plugins.returned(plugins.call(loader, cfg.name, WHERE, "data", **kwargs), DataBundle,
                                  cfg.name, WHERE, "data")
    bundle = checked(bundle, cfg.name)
    return carve_missing(bundle, cfg, seed)


def takes_seed(loader) -> bool:
    try:
        return "seed" in inspect.signature(loader).parameters
    except (TypeError, ValueError):
        return False


def checked(b: DataBundle, path: str) -> DataBundle:
    """The bundle with tensors of the dtypes the engine trains on, or one PluginError line."""
    def bad(message: str) -> plugins.PluginError:
        return plugins.PluginError(f"{WHERE} = {path!r} returned a DataBundle whose {message}")

    if b.task not in TASKS:
        raise bad(f"task {b.task!r} is not one of {', '.join(TASKS)}")
    if not isinstance(b.n_outputs, int) or b.n_outputs < 1:
        raise bad(f"n_outputs {b.n_outputs!r} is not an integer >= 1 (classes, or 1 for regression)")
    splits = {}
    for name in ("train", "val", "test"):
        split = getattr(b, name)
        if split is None and name != "train":
            splits[name] = None
            continue
        if not isinstance(split, Split):
            raise bad(f"{name} is {type(split).__name__}, not a bcdcore.data.Split(x, y)")
        x, y = torch.as_tensor(split.x), torch.as_tensor(split.y)
        if x.ndim < 1 or len(x) != len(y):
            raise bad(f"{name} split has {len(x) if x.ndim else 0} inputs but {len(y)} targets")
        if x.is_floating_point():
            x = x.float()
        if b.task in (CLASSIFICATION, LANGUAGE_MODEL):
            if y.is_floating_point() or y.dtype == torch.bool:
                raise bad(f"{name} targets are {y.dtype}; a {b.task} task needs integer class ids")
            y = y.long()
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= b.n_outputs):
                raise bad(f"{name} targets lie in [{int(y.min())}, {int(y.max())}], outside [0, n_outputs = "
                          f"{b.n_outputs})")
        else:
            y = y.float()
        splits[name] = Split(x.contiguous(), y.contiguous())
    if len(splits["train"]) == 0:
        raise bad("training split is empty")
    shape = tuple(int(s) for s in splits["train"].x.shape[1:])
    return DataBundle(name=b.name or path, task=b.task, input_shape=b.input_shape or shape, n_outputs=b.n_outputs,
                      train=splits["train"], val=splits["val"], test=splits["test"], vocab=tuple(b.vocab),
                      info=dict(b.info))


def carve_missing(b: DataBundle, cfg: DataConfig, seed: int) -> DataBundle:
    """Seeded validation/test splits cut from the training split where the loader gave none."""
    if b.val is not None and b.test is not None:
        return b
    n = len(b.train)
    labels = b.train.y.numpy() if b.task == CLASSIFICATION else None
    rng = np.random.default_rng((seed, SPLIT_STREAM))
    states = rng.integers(0, 2**31 - 1, size=2)
    rest = np.arange(n)
    cut = {}
    if b.test is None:
        rest, cut["test"] = take(rest, int(round(cfg.test_fraction * n)), labels, int(states[0]), rng)
    if b.val is None:
        rest, cut["val"] = take(rest, int(round(cfg.val_fraction * n)), labels, int(states[1]), rng)
    if len(rest) < 1:
        raise plugins.PluginError(f"{WHERE} = {cfg.name!r}: {n} training samples; val_fraction and "
                                  f"test_fraction leave none for training")

    def subset(idx: np.ndarray) -> Split:
        index = torch.as_tensor(np.sort(idx), dtype=torch.long)
        return Split(b.train.x[index].contiguous(), b.train.y[index].contiguous())

    return DataBundle(name=b.name, task=b.task, input_shape=b.input_shape, n_outputs=b.n_outputs,
                      train=subset(rest), val=b.val if "val" not in cut else subset(cut["val"]),
                      test=b.test if "test" not in cut else subset(cut["test"]), vocab=b.vocab, info=b.info)
