"""Image datasets read from files under `[data] root` (MNIST family, CIFAR, SVHN), through torchvision's
loaders, and the training-time augmentation of CIFAR images. (ImageNet trees: image_trees; text: text;
tabular: tabular.)

Every loader returns in-memory CPU tensors (the engine draws minibatches from them) with seeded splits:
the official test split where the dataset has one, a validation split carved from the official training
split (stratified for classification), and scalers / normalisation statistics fitted on our training split
only. With the files missing and `download = false`, a loader raises a one-line RecipeError naming the files
it expects and where; `download = true` lets torchvision / scikit-learn fetch them into the root.

Layout under the root (default $BCD_DATA, else ~/.cache/bcd/data; see `bcdcore.data.default_data_root`):

    MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte      (or the same names + .gz, as downloaded)
    FashionMNIST/raw/...                                         (same names)
    cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}
    cifar-100-python/{train,test,meta}
    svhn/{train,test}_32x32.mat
    imagenet/{train,val}/<class>/<image>                         (val sorted into class folders)
    mini_imagenet/train/<class>/<image>
    aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt
    california_housing/cal_housing_py3.pkz                      (scikit-learn's cache file)

`stdlib_text` needs no files: it reads the Python standard library's own sources.
"""
from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bcdcore.data.image_files import normalise_, pixel_moments, unit_scale
from bcdcore.data.splits import carve, load_failed, missing_files, per_class_subset
from bcdcore.data.types import DataBundle, Split, data_root
from bcdcore.recipe import CLASSIFICATION, DataConfig

AUGMENT_STREAM = 3  # training-time augmentation draws

MINI_MNIST_PER_CLASS = 500  # the seed sandbox's 5k-image mini_mnist


# ----------------------------------------------------------------------------------------------------------
# Messages


# ----------------------------------------------------------------------------------------------------------
# Splitting and assembly


def normalise_images(x: torch.Tensor, train_idx: np.ndarray, per_channel: bool) -> torch.Tensor:
    """(x - mean) / std with the statistics of the training rows only; x float32 (N, C, H, W), in place."""
    rows = torch.as_tensor(train_idx, dtype=torch.long)
    mean, std = pixel_moments((x.index_select(0, chunk) for chunk in torch.split(rows, 4096)), per_channel)
    return normalise_(x, mean, std)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if size <= 0 or (x.shape[-2], x.shape[-1]) == (size, size):
        return x
    down = size < x.shape[-1]
    return torch.cat([F.interpolate(part, size=(size, size), mode="bilinear", align_corners=False, antialias=down)
                      for part in torch.split(x, 4096)])


def image_bundle(cfg: DataConfig, x_train: torch.Tensor, y_train: np.ndarray, x_test: torch.Tensor,
                  y_test: np.ndarray, idx: tuple[np.ndarray, np.ndarray], n_classes: int, *,
                  per_channel: bool, image_size: int = 0, channels: int = 0, flat: bool = False,
                  augment: bool = False, seed: int = 0) -> DataBundle:
    """Images (uint8 N, C, H, W) of the official train file cut into train/val by `idx`, and the test file:
    scaled to [0, 1], normalised with train statistics, resized, channel-repeated, flattened."""
    train_idx, val_idx = idx
    x_all = unit_scale(torch.cat([x_train, x_test]))
    x_all = resize(x_all, image_size)
    normalise_images(x_all, train_idx, per_channel)
    if channels and channels != x_all.shape[1]:
        x_all = x_all.repeat(1, channels // x_all.shape[1], 1, 1)
    if flat:
        x_all = x_all.reshape(len(x_all), -1)
    n_tr = len(x_train)
    x_tr, x_te = x_all[:n_tr], x_all[n_tr:]
    take = lambda x, i: x.index_select(0, torch.as_tensor(i, dtype=torch.long)).contiguous()  # noqa: E731
    train = Split(take(x_tr, train_idx), torch.as_tensor(y_train[train_idx], dtype=torch.int64))
    if augment:
        train.x = AugmentedImages(train.x, pad=4, seed=seed)
    val = Split(take(x_tr, val_idx), torch.as_tensor(y_train[val_idx], dtype=torch.int64))
    test = Split(x_te.clone(), torch.as_tensor(y_test, dtype=torch.int64))  # a copy: x_all can go
    return DataBundle(name=cfg.name, task=CLASSIFICATION, input_shape=tuple(x_all.shape[1:]),
                      n_outputs=n_classes, train=train, val=val, test=test)


# ----------------------------------------------------------------------------------------------------------
# Training-time augmentation for in-memory images

class AugmentedImages(torch.Tensor):
    """Training images whose minibatches come out randomly cropped and flipped.

    The engine draws every training minibatch with `x.index_select(0, idx)`; on this tensor that call returns
    the rows padded by `pad` zero pixels (zero = the training mean after normalisation), cropped back to the
    original size at a random offset, and mirrored left-right with probability 1/2, independently per sample.
    The draws come from a generator seeded by the run seed, so a run is reproducible. Every other operation
    (indexing, slicing, arithmetic) sees the stored, unaugmented images; `.to(device)` keeps the behaviour.
    """

    _pad: int
    _generator: torch.Generator

    @staticmethod
    def __new__(cls, data: torch.Tensor, pad: int = 4, seed: int = 0,
                generator: torch.Generator | None = None) -> "AugmentedImages":
        obj = torch.Tensor._make_subclass(cls, data.detach(), False)
        obj._pad = pad
        obj._generator = generator if generator is not None else torch.Generator().manual_seed(
            int(np.random.default_rng((seed, AUGMENT_STREAM)).integers(0, 2**62)))
        return obj

    def __init__(self, *args, **kwargs) -> None:  # everything happens in __new__
        pass

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        self = args[0] if args else None
        if not isinstance(self, AugmentedImages) or not isinstance(out, torch.Tensor) or out is self:
            return out
        if func in (torch.Tensor.index_select, torch.index_select):
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            if dim == 0 and out.dim() == 4:
                return self.augment(out)
            return out
        if func in (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu, torch.Tensor.contiguous):
            return AugmentedImages(out, self._pad, generator=self._generator)
        return out

    def augment(self, batch: torch.Tensor) -> torch.Tensor:
        n, _, h, w = batch.shape
        pad = self._pad
        oy = torch.randint(0, 2 * pad + 1, (n,), generator=self._generator)
        ox = torch.randint(0, 2 * pad + 1, (n,), generator=self._generator)
        flip = torch.rand(n, generator=self._generator) < 0.5
        cols = ox[:, None] + torch.arange(w)[None, :]  # (n, w)
        cols = torch.where(flip[:, None], cols.flip(1), cols)
        rows = oy[:, None] + torch.arange(h)[None, :]  # (n, h)
        padded = F.pad(batch, (pad, pad, pad, pad))
        dev = batch.device
        i = torch.arange(n, device=dev)[:, None, None, None]
        c = torch.arange(batch.shape[1], device=dev)[None, :, None, None]
        return padded[i, c, rows.to(dev)[:, None, :, None], cols.to(dev)[:, None, None, :]]


# ----------------------------------------------------------------------------------------------------------
# MNIST family (torchvision.datasets.MNIST / FashionMNIST)

_MNIST_RAW = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
              "t10k-labels-idx1-ubyte")


def _mnist_arrays(cfg: DataConfig, fashion: bool) -> tuple[torch.Tensor, np.ndarray, torch.Tensor, np.ndarray, int]:
    from torchvision.datasets import MNIST, FashionMNIST

    cls = FashionMNIST if fashion else MNIST
    root = data_root(cfg)
    raw = root / cls.__name__ / "raw"
    for name in _MNIST_RAW:  # torchvision reads the unpacked files; unpack .gz files put there by hand
        gz = raw / f"{name}.gz"
        if not (raw / name).is_file() and gz.is_file():
            try:
                with gzip.open(gz, "rb") as src, open(raw / f"{name}.part", "wb") as dst:
                    shutil.copyfileobj(src, dst)
                (raw / f"{name}.part").replace(raw / name)
            except OSError as exc:
                raise load_failed(cfg, raw, exc) from None
    if not cfg.download and not all((raw / n).is_file() for n in _MNIST_RAW):
        raise missing_files(cfg, raw, [n + "[.gz]" for n in _MNIST_RAW if not (raw / n).is_file()])
    try:
        train = cls(str(root), train=True, download=cfg.download)
        test = cls(str(root), train=False, download=False)
    except Exception as exc:  # corrupt files, failed download
        raise load_failed(cfg, raw, exc) from None
    return (train.data.unsqueeze(1), train.targets.numpy(), test.data.unsqueeze(1), test.targets.numpy(),
            len(train.classes))


def _load_mnist_family(cfg: DataConfig, seed: int, *, fashion: bool = False, per_class: int = 0,
                       channels: int = 0, image_size: int = 0, flat: bool = False) -> DataBundle:
    x_tr, y_tr, x_te, y_te, n_classes = _mnist_arrays(cfg, fashion)
    if per_class:  # keep only the chosen training images (the official test file stays whole)
        pool = per_class_subset(y_tr, np.arange(len(y_tr)), per_class, cfg, seed, strict=True)
        x_tr, y_tr = x_tr[torch.as_tensor(pool)], y_tr[pool]
    idx = carve(np.arange(len(y_tr)), y_tr, cfg, seed)
    return image_bundle(cfg, x_tr, y_tr, x_te, y_te, idx, n_classes, per_channel=False,
                         image_size=image_size, channels=channels, flat=flat)


def load_mnist(cfg: DataConfig, seed: int) -> DataBundle:
    return _load_mnist_family(cfg, seed, channels=cfg.channels, image_size=cfg.image_size)


def load_mini_mnist(cfg: DataConfig, seed: int) -> DataBundle:
    return _load_mnist_family(cfg, seed, per_class=cfg.per_class or MINI_MNIST_PER_CLASS,
                              channels=cfg.channels, image_size=cfg.image_size)


def load_mnist_8ch(cfg: DataConfig, seed: int) -> DataBundle:
    return _load_mnist_family(cfg, seed, per_class=cfg.per_class or MINI_MNIST_PER_CLASS, channels=8)


def load_mnist_flat(cfg: DataConfig, seed: int) -> DataBundle:
    return _load_mnist_family(cfg, seed, flat=True)


def load_fashion_mnist(cfg: DataConfig, seed: int) -> DataBundle:
    return _load_mnist_family(cfg, seed, fashion=True, channels=cfg.channels, image_size=cfg.image_size)


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10/100 (torchvision.datasets.CIFAR10 / CIFAR100: python pickle batches)

def _without_checksums(cls):
    """The torchvision class with its md5 checks reduced to "the file exists": files that are present are
    parsed by torchvision's own code (a damaged file fails to parse, and says so). Downloads use the stock
    class, which verifies what it fetches."""
    return type(f"{cls.__name__}Files", (cls,), {
        "train_list": [[name, None] for name, _ in cls.train_list],
        "test_list": [[name, None] for name, _ in cls.test_list],
        "meta": {**cls.meta, "md5": None},
    })


def _load_cifar(cfg: DataConfig, seed: int, hundred: bool) -> DataBundle:
    from torchvision.datasets import CIFAR10, CIFAR100

    stock = CIFAR100 if hundred else CIFAR10
    root = data_root(cfg)
    folder = root / stock.base_folder
    expected = [n for n, _ in stock.train_list + stock.test_list] + [stock.meta["filename"]]
    if not cfg.download and not all((folder / n).is_file() for n in expected):
        raise missing_files(cfg, folder, [n for n in expected if not (folder / n).is_file()])
    cls = stock if cfg.download else _without_checksums(stock)
    try:
        train = cls(str(root), train=True, download=cfg.download)
        test = cls(str(root), train=False, download=False)
    except Exception as exc:
        raise load_failed(cfg, folder, exc) from None
    x_tr = torch.from_numpy(np.ascontiguousarray(train.data.transpose(0, 3, 1, 2)))
    x_te = torch.from_numpy(np.ascontiguousarray(test.data.transpose(0, 3, 1, 2)))
    y_tr, y_te = np.asarray(train.targets, dtype=np.int64), np.asarray(test.targets, dtype=np.int64)
    idx = carve(np.arange(len(y_tr)), y_tr, cfg, seed)
    return image_bundle(cfg, x_tr, y_tr, x_te, y_te, idx, len(train.classes), per_channel=True,
                         augment=cfg.augment, seed=seed)


def load_cifar10(cfg: DataConfig, seed: int) -> DataBundle:
    return _load_cifar(cfg, seed, hundred=False)


def load_cifar100(cfg: DataConfig, seed: int) -> DataBundle:
    return _load_cifar(cfg, seed, hundred=True)


# ----------------------------------------------------------------------------------------------------------
# SVHN (torchvision.datasets.SVHN: MATLAB .mat files)

def load_svhn(cfg: DataConfig, seed: int) -> DataBundle:
    from torchvision.datasets import SVHN

    folder = data_root(cfg) / "svhn"
    expected = ["train_32x32.mat", "test_32x32.mat"]
    if not cfg.download and not all((folder / n).is_file() for n in expected):
        raise missing_files(cfg, folder, [n for n in expected if not (folder / n).is_file()])
    cls = SVHN if cfg.download else type("SVHNFiles", (SVHN,), {
        "_check_integrity": lambda self: (Path(self.root) / self.filename).is_file()})
    try:
        train = cls(str(folder), split="train", download=cfg.download)
        test = cls(str(folder), split="test", download=cfg.download)
    except Exception as exc:
        raise load_failed(cfg, folder, exc) from None
    x_tr, x_te = torch.from_numpy(np.ascontiguousarray(train.data)), torch.from_numpy(np.ascontiguousarray(test.data))
    y_tr, y_te = train.labels.astype(np.int64), test.labels.astype(np.int64)
    idx = carve(np.arange(len(y_tr)), y_tr, cfg, seed)
    return image_bundle(cfg, x_tr, y_tr, x_te, y_te, idx, 10, per_channel=True)


# ----------------------------------------------------------------------------------------------------------
# ImageNet-style class-folder trees (torchvision.datasets.ImageFolder)


# ----------------------------------------------------------------------------------------------------------
# IMDb reviews (the aclImdb folder layout)


# ----------------------------------------------------------------------------------------------------------
# California housing (scikit-learn's fetch_california_housing and its cache file)


# ----------------------------------------------------------------------------------------------------------
# Character-level text from the Python standard library's sources (offline everywhere)


def augmentation_generator(x: torch.Tensor) -> torch.Generator | None:
    """The generator behind a training split's random crops and flips (None for plain tensors): its state
    goes into checkpoints so a resumed run augments exactly as an uninterrupted one."""
    return x._generator if isinstance(x, AugmentedImages) else None
