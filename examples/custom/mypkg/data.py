"""A synthetic dataset: points on interleaved spirals, one class per arm. Only a training split is returned;
bcdcore carves the seeded validation and test splits from it."""
from __future__ import annotations

import numpy as np
import torch

from bcdcore.data import DataBundle, Split


def load(n_samples: int = 600, classes: int = 3, noise: float = 0.15, extra_features: int = 6,
         seed: int = 0) -> DataBundle:
    """[data] name = "mypkg.data:load"; [data.args] are these keywords; `seed` is the run's seed."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, classes, size=n_samples)
    t = rng.uniform(0.2, 1.0, size=n_samples)
    angle = 2 * np.pi * (label / classes) + 3.0 * t
    xy = np.stack([t * np.cos(angle), t * np.sin(angle)], axis=1) + noise * rng.normal(size=(n_samples, 2))
    distractors = rng.normal(size=(n_samples, extra_features))  # features that carry no information
    x = np.concatenate([xy, distractors], axis=1).astype(np.float32)
    return DataBundle(name="spirals", task="classification", input_shape=(x.shape[1],), n_outputs=classes,
                      train=Split(torch.from_numpy(x), torch.from_numpy(label)))
