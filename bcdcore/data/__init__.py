"""Datasets as split tensors: types, seeded splits, the embedded datasets, image files and trees, text,
tabular data, minibatch streams, and the one registry (`load_data`, `LOADERS`, `register`)."""
from bcdcore.data.registry import LOADERS, Loader, load_data, register
from bcdcore.data.types import DataBundle, Split, TokenShape, data_root, default_data_root

__all__ = ["LOADERS", "Loader", "load_data", "register", "DataBundle", "Split", "TokenShape", "data_root",
           "default_data_root"]
