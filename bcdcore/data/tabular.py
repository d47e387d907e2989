"""Tabular data read from files: scikit-learn's California housing cache, standardised on train only."""
from __future__ import annotations

import numpy as np
import torch

from bcdcore.data.splits import load_failed, missing_files, split_indices
from bcdcore.data.types import DataBundle, Split, data_root
from bcdcore.recipe import REGRESSION, DataConfig


def load_california_housing(cfg: DataConfig, seed: int) -> DataBundle:
    from sklearn.datasets import fetch_california_housing
    from sklearn.preprocessing import StandardScaler

    home = data_root(cfg) / "california_housing"
    if not cfg.download and not (home / "cal_housing_py3.pkz").is_file():
        raise missing_files(cfg, home, ["cal_housing_py3.pkz (scikit-learn's cache file of fetch_california_housing)"])
    try:
        x, y = fetch_california_housing(data_home=str(home), download_if_missing=cfg.download, return_X_y=True)
    except Exception as exc:
        raise load_failed(cfg, home, exc) from None
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    idx = split_indices(len(y), cfg, seed, labels=None)
    x = StandardScaler().fit(x[idx[0]]).transform(x)
    y = (y - y[idx[0]].mean()) / y[idx[0]].std()  # standardized with train statistics, like diabetes
    splits = [Split(torch.as_tensor(x[i], dtype=torch.float32), torch.as_tensor(y[i], dtype=torch.float32))
              for i in idx]
    return DataBundle(name=cfg.name, task=REGRESSION, input_shape=(x.shape[1],), n_outputs=1,
                      train=splits[0], val=splits[1], test=splits[2])
