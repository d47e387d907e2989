"""Writers of tiny datasets in the real on-disk formats that torchvision / scikit-learn read.

Each writer returns the raw arrays it wrote, so tests can check what the loaders made of them. Images are
random, hence unique: a split row is traced back to its file row by `match_rows`.
"""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------------------
# MNIST IDX (torchvision.datasets.MNIST: <root>/MNIST/raw/<name>, or the .gz files as downloaded)

def _idx_bytes(array: np.ndarray) -> bytes:
    magic = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)  # 0x08: unsigned byte
    dims = b"".join(struct.pack(">i", d) for d in array.shape)
    return magic + dims + array.astype(np.uint8).tobytes()


def write_mnist(root: Path, folder: str = "MNIST", n_train: int = 60, n_test: int = 20, gz: bool = False,
                seed: int = 0, per_class_train: int | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if per_class_train is not None:
        y_tr = np.repeat(np.arange(10), per_class_train)
        rng.shuffle(y_tr)
        n_train = len(y_tr)
    else:
        y_tr = np.arange(n_train) % 10
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": y_tr.astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        data = _idx_bytes(array)
        if gz:
            with gzip.open(raw / f"{name}.gz", "wb") as f:
                f.write(data)
        else:
            (raw / name).write_bytes(data)
    return {"x_train": arrays["train-images-idx3-ubyte"], "y_train": arrays["train-labels-idx1-ubyte"],
            "x_test": arrays["t10k-images-idx3-ubyte"], "y_test": arrays["t10k-labels-idx1-ubyte"]}


# ----------------------------------------------------------------------------------------------------------
# CIFAR python pickle batches (torchvision.datasets.CIFAR10 / CIFAR100)

def write_cifar(root: Path, hundred: bool = False, per_batch: int = 8, n_test: int = 10,
                seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n_classes = 100 if hundred else 10
    folder = Path(root) / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True, exist_ok=True)
    label_key = "fine_labels" if hundred else "labels"

    def batch(n: int, offset: int) -> tuple[dict, np.ndarray, np.ndarray]:
        x = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)  # R plane, G plane, B plane per row
        y = (np.arange(offset, offset + n) % n_classes).astype(np.int64)
        entry = {"data": x, label_key: y.tolist(), "batch_label": "tiny"}
        if hundred:
            entry["coarse_labels"] = (y // 5).tolist()
        return entry, x, y

    xs, ys = [], []
    train_names = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    count = per_batch * (5 if hundred else 1)
    for i, name in enumerate(train_names):
        entry, x, y = batch(count, i * count)
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
        xs.append(x)
        ys.append(y)
    entry, x_te, y_te = batch(n_test, 0)
    with open(folder / ("test" if hundred else "test_batch"), "wb") as f:
        pickle.dump(entry, f)
    meta = ({"fine_label_names": [f"fine{i}" for i in range(100)],
             "coarse_label_names": [f"coarse{i}" for i in range(20)]} if hundred
            else {"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": per_batch})
    with open(folder / ("meta" if hundred else "batches.meta"), "wb") as f:
        pickle.dump(meta, f)
    to_img = lambda a: a.reshape(-1, 3, 32, 32)  # noqa: E731
    return {"x_train": to_img(np.concatenate(xs)), "y_train": np.concatenate(ys), "x_test": to_img(x_te),
            "y_test": y_te}


# ----------------------------------------------------------------------------------------------------------
# SVHN .mat (torchvision.datasets.SVHN: X (32, 32, 3, N), y (N, 1) with 10 for the digit 0)

def write_svhn(root: Path, n_train: int = 30, n_test: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    folder = Path(root) / "svhn"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        digits = np.arange(n) % 10
        savemat(folder / f"{split}_32x32.mat", {"X": x, "y": np.where(digits == 0, 10, digits).reshape(n, 1)})
        out[f"x_{split}"] = x.transpose(3, 2, 0, 1)  # what torchvision makes of it: (N, C, H, W) ...
        out[f"y_{split}"] = digits
    return out


# ----------------------------------------------------------------------------------------------------------
# ImageFolder trees of PNGs

def write_image_tree(folder: Path, classes: list[str], per_class: int, seed: int = 0,
                     sizes: tuple[tuple[int, int], ...] = ((40, 30), (24, 36), (32, 32))) -> dict[str, list]:
    """<folder>/<class>/<i>.png, RGB, sizes cycling through `sizes` (so resize + crop are exercised)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    files: dict[str, list] = {}
    for c in classes:
        (Path(folder) / c).mkdir(parents=True, exist_ok=True)
        files[c] = []
        for i in range(per_class):
            w, h = sizes[i % len(sizes)]
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            path = Path(folder) / c / f"img{i:03d}.png"
            Image.fromarray(pixels).save(path)
            files[c].append(pixels)
    return files


# ----------------------------------------------------------------------------------------------------------
# aclImdb

def write_imdb(root: Path, reviews: dict[str, dict[str, list[str]]]) -> Path:
    """reviews[split][label] = texts; written as aclImdb/<split>/<label>/<i>_<rating>.txt (plus an unsup
    folder and the vocabulary files of the real archive, which the loader must ignore)."""
    base = Path(root) / "aclImdb"
    for split, by_label in reviews.items():
        for label, texts in by_label.items():
            (base / split / label).mkdir(parents=True, exist_ok=True)
            for i, text in enumerate(texts):
                rating = 8 if label == "pos" else 2
                (base / split / label / f"{i}_{rating}.txt").write_text(text, encoding="utf-8")
    (base / "train" / "unsup").mkdir(parents=True, exist_ok=True)
    (base / "train" / "unsup" / "0_0.txt").write_text("unlabelled zzzunsup text", encoding="utf-8")
    (base / "imdb.vocab").write_text("the\nzzzvocabfile\n", encoding="utf-8")
    return base


# ----------------------------------------------------------------------------------------------------------
# California housing: scikit-learn's cache file (joblib-pickled (N, 9) array, compress=6)

def write_california(root: Path, n: int = 50, seed: int = 0) -> np.ndarray:
    import joblib

    rng = np.random.default_rng(seed)
    # columns as fetch_california_housing caches them: value, income, age, rooms, bedrooms, population,
    # households, latitude, longitude
    households = rng.integers(100, 1000, n).astype(np.float64)
    table = np.column_stack([
        rng.uniform(50_000, 500_000, n), rng.uniform(0.5, 15, n), rng.integers(1, 52, n),
        households * rng.uniform(3, 8, n), households * rng.uniform(0.8, 1.5, n),
        households * rng.uniform(1.5, 4, n), households, rng.uniform(32, 42, n), rng.uniform(-124, -114, n)])
    home = Path(root) / "california_housing"
    home.mkdir(parents=True, exist_ok=True)
    joblib.dump(table, home / "cal_housing_py3.pkz", compress=6)
    return table


# ----------------------------------------------------------------------------------------------------------
# Tracing split rows back to file rows

def _zscore_rows(x: torch.Tensor, channels: int) -> torch.Tensor:
    x = x.reshape(len(x), channels, -1).to(torch.float64)
    x = (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True).clamp_min(1e-9)
    return x.reshape(len(x), -1)


def match_rows(split_x: torch.Tensor, raw: np.ndarray, channels: int = 1) -> np.ndarray:
    """Index into `raw` of each row of `split_x`, for data that went through a per-channel affine map
    (normalisation): rows are compared after z-scoring each channel of each row. Asserts every row matches."""
    if len(split_x) == 0:
        return np.zeros(0, dtype=np.int64)
    a = _zscore_rows(torch.as_tensor(split_x), channels)
    b = _zscore_rows(torch.as_tensor(np.asarray(raw, dtype=np.float64)), channels)
    dist = torch.cdist(a, b)
    best, idx = dist.min(1)
    assert best.max().item() < 1e-3 * a.shape[1] ** 0.5, f"a split row matches no file row ({best.max().item()})"
    return idx.numpy()
