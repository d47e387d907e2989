"""Datasets read from files under `[data] root`, through torchvision's and scikit-learn's own loaders.

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
import re
import shutil
import sysconfig
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bcdcore.data import (_SPLIT_STREAM, DataBundle, Split, TokenShape, _register, _split_indices, _take,
                          data_root)
from bcdcore.image_files import ImageFiles, decode_images, file_moments, normalise_, pixel_moments, unit_scale
from bcdcore.recipe import CLASSIFICATION, LANGUAGE_MODEL, REGRESSION, DataConfig, RecipeError

__all__ = ["AugmentedImages", "stdlib_corpus", "tokenize", "unigram_cross_entropy"]

_SUBSET_STREAM = 2  # per-class subsets (mini_mnist, per_class caps): their own seeded stream
_AUGMENT_STREAM = 3  # training-time augmentation draws
_TEXT_STREAM = 4  # the position of the stdlib_text splits

MINI_MNIST_PER_CLASS = 500  # the seed sandbox's 5k-image mini_mnist
IMAGENET_SIZE, MINI_IMAGENET_SIZE = 64, 84
STATS_IMAGES = 10_000  # storage = "disk": training images sampled for the normalisation statistics
IMDB_SEQ_LEN, TEXT_SEQ_LEN = 256, 128
PAD, UNK = 0, 1  # imdb token ids


# ----------------------------------------------------------------------------------------------------------
# Messages

def _missing(cfg: DataConfig, where: Path, expected: Sequence[str], downloadable: bool = True) -> RecipeError:
    listed = ", ".join(expected[:8]) + (f" (+{len(expected) - 8} more)" if len(expected) > 8 else "")
    fix = ("put them there, set data.root to the folder that holds them, or set data.download = true"
           if downloadable else
           "put them there or set data.root to the folder that holds them (it cannot be downloaded for you)")
    return RecipeError(f"data.name = {cfg.name!r}: dataset files not found: expected {listed} in {where}; {fix}")


def _failed(cfg: DataConfig, where: Path, exc: BaseException) -> RecipeError:
    what = "download into" if cfg.download else "reading"
    detail = " ".join(str(exc).split())[:300] or type(exc).__name__
    return RecipeError(f"data.name = {cfg.name!r}: {what} {where} failed ({type(exc).__name__}: {detail}); "
                       f"check the files there (or the network with data.download = true)")


# ----------------------------------------------------------------------------------------------------------
# Splitting and assembly

def _carve(pool: np.ndarray, labels: np.ndarray | None, cfg: DataConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices: a seeded val_fraction of `pool` (stratified when labels are given)."""
    n_val = int(round(cfg.val_fraction * len(pool)))
    if len(pool) - n_val < 1:
        raise RecipeError(f"data.name = {cfg.name!r}: {len(pool)} training samples; val_fraction = "
                          f"{cfg.val_fraction} leaves none for training")
    rng = np.random.default_rng((seed, _SPLIT_STREAM))
    state = int(rng.integers(0, 2**31 - 1))
    train, val = _take(np.asarray(pool), n_val, labels, state, rng)
    return np.sort(train), np.sort(val)


def _per_class(labels: np.ndarray, pool: np.ndarray, count: int, cfg: DataConfig, seed: int,
               strict: bool) -> np.ndarray:
    """A seeded choice of `count` indices of each class from `pool` (all of a smaller class unless strict)."""
    rng = np.random.default_rng((seed, _SUBSET_STREAM))
    keep = []
    for c in np.unique(labels[pool]):
        members = pool[labels[pool] == c]
        if len(members) < count and strict:
            raise RecipeError(f"data.per_class = {count}: class {int(c)} of {cfg.name!r} has only "
                              f"{len(members)} training images; use at most {len(members)}")
        keep.append(rng.choice(members, size=min(count, len(members)), replace=False))
    return np.sort(np.concatenate(keep)) if keep else pool[:0]


def _normalise_images(x: torch.Tensor, train_idx: np.ndarray, per_channel: bool) -> torch.Tensor:
    """(x - mean) / std with the statistics of the training rows only; x float32 (N, C, H, W), in place."""
    rows = torch.as_tensor(train_idx, dtype=torch.long)
    mean, std = pixel_moments((x.index_select(0, chunk) for chunk in torch.split(rows, 4096)), per_channel)
    return normalise_(x, mean, std)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if size <= 0 or (x.shape[-2], x.shape[-1]) == (size, size):
        return x
    down = size < x.shape[-1]
    return torch.cat([F.interpolate(part, size=(size, size), mode="bilinear", align_corners=False, antialias=down)
                      for part in torch.split(x, 4096)])


def _image_bundle(cfg: DataConfig, x_train: torch.Tensor, y_train: np.ndarray, x_test: torch.Tensor,
                  y_test: np.ndarray, idx: tuple[np.ndarray, np.ndarray], n_classes: int, *,
                  per_channel: bool, image_size: int = 0, channels: int = 0, flat: bool = False,
                  augment: bool = False, seed: int = 0) -> DataBundle:
    """Images (uint8 N, C, H, W) of the official train file cut into train/val by `idx`, and the test file:
    scaled to [0, 1], normalised with train statistics, resized, channel-repeated, flattened."""
    train_idx, val_idx = idx
    x_all = unit_scale(torch.cat([x_train, x_test]))
    x_all = _resize(x_all, image_size)
    _normalise_images(x_all, train_idx, per_channel)
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
            int(np.random.default_rng((seed, _AUGMENT_STREAM)).integers(0, 2**62)))
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
                raise _failed(cfg, raw, exc) from None
    if not cfg.download and not all((raw / n).is_file() for n in _MNIST_RAW):
        raise _missing(cfg, raw, [n + "[.gz]" for n in _MNIST_RAW if not (raw / n).is_file()])
    try:
        train = cls(str(root), train=True, download=cfg.download)
        test = cls(str(root), train=False, download=False)
    except Exception as exc:  # corrupt files, failed download
        raise _failed(cfg, raw, exc) from None
    return (train.data.unsqueeze(1), train.targets.numpy(), test.data.unsqueeze(1), test.targets.numpy(),
            len(train.classes))


def _load_mnist_family(cfg: DataConfig, seed: int, *, fashion: bool = False, per_class: int = 0,
                       channels: int = 0, image_size: int = 0, flat: bool = False) -> DataBundle:
    x_tr, y_tr, x_te, y_te, n_classes = _mnist_arrays(cfg, fashion)
    if per_class:  # keep only the chosen training images (the official test file stays whole)
        pool = _per_class(y_tr, np.arange(len(y_tr)), per_class, cfg, seed, strict=True)
        x_tr, y_tr = x_tr[torch.as_tensor(pool)], y_tr[pool]
    idx = _carve(np.arange(len(y_tr)), y_tr, cfg, seed)
    return _image_bundle(cfg, x_tr, y_tr, x_te, y_te, idx, n_classes, per_channel=False,
                         image_size=image_size, channels=channels, flat=flat)


@_register("mnist")
def _load_mnist(cfg: DataConfig, seed: int) -> DataBundle:
    return _load_mnist_family(cfg, seed, channels=cfg.channels, image_size=cfg.image_size)


@_register("mini_mnist")
def _load_mini_mnist(cfg: DataConfig, seed: int) -> DataBundle:
    return _load_mnist_family(cfg, seed, per_class=cfg.per_class or MINI_MNIST_PER_CLASS,
                              channels=cfg.channels, image_size=cfg.image_size)


@_register("mnist_8ch")
def _load_mnist_8ch(cfg: DataConfig, seed: int) -> DataBundle:
    return _load_mnist_family(cfg, seed, per_class=cfg.per_class or MINI_MNIST_PER_CLASS, channels=8)


@_register("mnist_flat")
def _load_mnist_flat(cfg: DataConfig, seed: int) -> DataBundle:
    return _load_mnist_family(cfg, seed, flat=True)


@_register("fashion_mnist")
def _load_fashion_mnist(cfg: DataConfig, seed: int) -> DataBundle:
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
        raise _missing(cfg, folder, [n for n in expected if not (folder / n).is_file()])
    cls = stock if cfg.download else _without_checksums(stock)
    try:
        train = cls(str(root), train=True, download=cfg.download)
        test = cls(str(root), train=False, download=False)
    except Exception as exc:
        raise _failed(cfg, folder, exc) from None
    x_tr = torch.from_numpy(np.ascontiguousarray(train.data.transpose(0, 3, 1, 2)))
    x_te = torch.from_numpy(np.ascontiguousarray(test.data.transpose(0, 3, 1, 2)))
    y_tr, y_te = np.asarray(train.targets, dtype=np.int64), np.asarray(test.targets, dtype=np.int64)
    idx = _carve(np.arange(len(y_tr)), y_tr, cfg, seed)
    return _image_bundle(cfg, x_tr, y_tr, x_te, y_te, idx, len(train.classes), per_channel=True,
                         augment=cfg.augment, seed=seed)


@_register("cifar10")
def _load_cifar10(cfg: DataConfig, seed: int) -> DataBundle:
    return _load_cifar(cfg, seed, hundred=False)


@_register("cifar100")
def _load_cifar100(cfg: DataConfig, seed: int) -> DataBundle:
    return _load_cifar(cfg, seed, hundred=True)


# ----------------------------------------------------------------------------------------------------------
# SVHN (torchvision.datasets.SVHN: MATLAB .mat files)

@_register("svhn")
def _load_svhn(cfg: DataConfig, seed: int) -> DataBundle:
    from torchvision.datasets import SVHN

    folder = data_root(cfg) / "svhn"
    expected = ["train_32x32.mat", "test_32x32.mat"]
    if not cfg.download and not all((folder / n).is_file() for n in expected):
        raise _missing(cfg, folder, [n for n in expected if not (folder / n).is_file()])
    cls = SVHN if cfg.download else type("SVHNFiles", (SVHN,), {
        "_check_integrity": lambda self: (Path(self.root) / self.filename).is_file()})
    try:
        train = cls(str(folder), split="train", download=cfg.download)
        test = cls(str(folder), split="test", download=cfg.download)
    except Exception as exc:
        raise _failed(cfg, folder, exc) from None
    x_tr, x_te = torch.from_numpy(np.ascontiguousarray(train.data)), torch.from_numpy(np.ascontiguousarray(test.data))
    y_tr, y_te = train.labels.astype(np.int64), test.labels.astype(np.int64)
    idx = _carve(np.arange(len(y_tr)), y_tr, cfg, seed)
    return _image_bundle(cfg, x_tr, y_tr, x_te, y_te, idx, 10, per_channel=True)


# ----------------------------------------------------------------------------------------------------------
# ImageNet-style class-folder trees (torchvision.datasets.ImageFolder)

# Peak bytes per image value while a tree loads: the decoded uint8 images and their stacked copy (2), the float32
# tensor of train + test (4) and the float32 split copies taken from it (4).
_LOAD_BYTES_PER_VALUE = 10


def available_memory() -> int | None:
    """Bytes of memory the system can still give (MemAvailable), or None where that cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_fits_in_memory(cfg: DataConfig, folder: Path, n_images: int, size: int) -> None:
    """Image trees are held in memory: refuse, before decoding anything, a tree that cannot fit (a full
    ImageNet at 64x64 needs about 150 GiB while it loads) rather than be killed by the kernel halfway."""
    need = n_images * 3 * size * size * _LOAD_BYTES_PER_VALUE
    free = available_memory()
    if free is not None and need > free:
        gib = 2 ** 30
        raise RecipeError(f"data.name = {cfg.name!r}: {n_images:,} images of {folder} at {size}x{size} need about "
                          f"{need / gib:.1f} GiB of memory to load, {free / gib:.1f} GiB is available; set "
                          f"data.storage = \"disk\" (decode per minibatch) or lower data.per_class or "
                          f"data.image_size")


def _list_tree(cfg: DataConfig, folder: Path, cap: int, seed: int,
               classes: list[str] | None = None) -> tuple[list[str], np.ndarray, list[str]]:
    """The image files of a class-folder tree (at most `cap` per class, seeded) and their labels by class name
    (in the order of `classes` when given: the training tree's)."""
    from torchvision.datasets import ImageFolder

    try:
        tree = ImageFolder(str(folder))
    except (FileNotFoundError, OSError) as exc:
        raise RecipeError(f"data.name = {cfg.name!r}: {folder} is not a class-folder tree of images "
                          f"(<class>/<image>): {' '.join(str(exc).split())}") from None
    names = tree.classes
    if classes is not None:
        unknown = sorted(set(names) - set(classes))
        if unknown:
            raise RecipeError(f"data.name = {cfg.name!r}: {folder} has classes the training tree lacks: "
                              f"{', '.join(unknown[:5])}")
        order = {c: i for i, c in enumerate(classes)}
        remap = np.array([order[c] for c in names], dtype=np.int64)
    else:
        classes, remap = list(names), np.arange(len(names), dtype=np.int64)
    paths = [p for p, _ in tree.samples]
    labels = remap[np.array([t for _, t in tree.samples], dtype=np.int64)]
    keep = np.arange(len(paths))
    if cap:
        keep = _per_class(labels, keep, cap, cfg, seed, strict=False)
    return [paths[i] for i in keep], labels[keep], classes


def _decode_tree(cfg: DataConfig, folder: Path, paths: list[str], size: int) -> torch.Tensor:
    """uint8 (N, 3, size, size) of a tree's images, refused up front when they cannot fit in memory."""
    _check_fits_in_memory(cfg, folder, len(paths), size)
    try:
        return decode_images(paths, size)
    except OSError as exc:
        raise _failed(cfg, folder, exc) from None


def _files_bundle(cfg: DataConfig, train: tuple[list[str], np.ndarray], val: tuple[list[str], np.ndarray],
                  test: tuple[list[str], np.ndarray], n_classes: int, size: int, seed: int) -> DataBundle:
    """Splits that stay on disk (`storage = "disk"`): paths and labels, normalised with the per-channel
    statistics of (a seeded sample of at most STATS_IMAGES of) the training images."""
    paths = train[0]
    if len(paths) > STATS_IMAGES:
        pick = np.random.default_rng((seed, _SUBSET_STREAM)).choice(len(paths), STATS_IMAGES, replace=False)
        paths = [paths[i] for i in np.sort(pick)]
    try:
        mean, std = file_moments(paths, size)
    except OSError as exc:
        raise _failed(cfg, Path(paths[0]).parent.parent, exc) from None
    split = lambda part: Split(ImageFiles(part[0], size, mean, std),  # noqa: E731
                               torch.as_tensor(part[1], dtype=torch.int64))
    return DataBundle(name=cfg.name, task=CLASSIFICATION, input_shape=(3, size, size), n_outputs=n_classes,
                      train=split(train), val=split(val), test=split(test))


def _pick(part: tuple[list[str], np.ndarray], idx: np.ndarray) -> tuple[list[str], np.ndarray]:
    return [part[0][i] for i in idx], part[1][idx]


@_register("imagenet")
def _load_imagenet(cfg: DataConfig, seed: int) -> DataBundle:
    base = data_root(cfg) / "imagenet"
    if not (base / "train").is_dir() or not (base / "val").is_dir():
        if cfg.download:
            raise RecipeError(f"data.name = 'imagenet': cannot be downloaded (its licence requires an account); "
                              f"put the class-folder trees train/<class>/<image> and val/<class>/<image> in {base}")
        raise _missing(cfg, base, ["train/<class>/<image>", "val/<class>/<image> (val sorted into class folders)"],
                       downloadable=False)
    size = cfg.image_size or IMAGENET_SIZE
    tr_paths, y_tr, classes = _list_tree(cfg, base / "train", cfg.per_class, seed)
    te_paths, y_te, _ = _list_tree(cfg, base / "val", 0, seed, classes=classes)
    idx = _carve(np.arange(len(y_tr)), y_tr, cfg, seed)
    if cfg.storage == "disk":
        tree = (tr_paths, y_tr)
        return _files_bundle(cfg, _pick(tree, idx[0]), _pick(tree, idx[1]), (te_paths, y_te), len(classes),
                             size, seed)
    x_tr = _decode_tree(cfg, base / "train", tr_paths, size)
    x_te = _decode_tree(cfg, base / "val", te_paths, size)
    return _image_bundle(cfg, x_tr, y_tr, x_te, y_te, idx, len(classes), per_channel=True)


@_register("mini_imagenet")
def _load_mini_imagenet(cfg: DataConfig, seed: int) -> DataBundle:
    folder = data_root(cfg) / "mini_imagenet" / "train"
    if not folder.is_dir():
        if cfg.download:
            raise RecipeError(f"data.name = 'mini_imagenet': cannot be downloaded; put the class-folder tree "
                              f"<class>/<image> in {folder}")
        raise _missing(cfg, folder, ["<class>/<image> (one folder per class)"], downloadable=False)
    size = cfg.image_size or MINI_IMAGENET_SIZE
    paths, y, classes = _list_tree(cfg, folder, cfg.per_class, seed)
    train_idx, val_idx, test_idx = _split_indices(len(y), cfg, seed, labels=y)
    if cfg.storage == "disk":
        tree = (paths, y)
        return _files_bundle(cfg, _pick(tree, train_idx), _pick(tree, val_idx), _pick(tree, test_idx),
                             len(classes), size, seed)
    x = _decode_tree(cfg, folder, paths, size)
    # no official test split: all three come from the one tree (the test rows ride in the "test file" slot)
    bundle = _image_bundle(cfg, x[torch.as_tensor(np.concatenate([train_idx, val_idx]))],
                           y[np.concatenate([train_idx, val_idx])], x[torch.as_tensor(test_idx)], y[test_idx],
                           (np.arange(len(train_idx)), np.arange(len(train_idx), len(train_idx) + len(val_idx))),
                           len(classes), per_channel=True)
    return bundle


# ----------------------------------------------------------------------------------------------------------
# IMDb reviews (the aclImdb folder layout)

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text: str) -> list[str]:
    """Lower-case words (letters and digits, with an inner apostrophe: "don't"); HTML line breaks dropped."""
    return _WORD.findall(text.lower().replace("<br />", " "))


def _read_imdb(folder: Path) -> tuple[list[str], np.ndarray]:
    texts, labels = [], []
    for label, sub in ((0, "neg"), (1, "pos")):
        for path in sorted((folder / sub).glob("*.txt")):
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
            labels.append(label)
    return texts, np.asarray(labels, dtype=np.int64)


@_register("imdb")
def _load_imdb(cfg: DataConfig, seed: int) -> DataBundle:
    base = data_root(cfg) / "aclImdb"
    expected = [f"{s}/{c}/*.txt" for s in ("train", "test") for c in ("pos", "neg")]
    if not all(any((base / e.rsplit("/", 1)[0]).glob("*.txt")) for e in expected):
        if cfg.download:
            try:  # the tarball is plain HTTP; torchvision's helper fetches and unpacks it
                from torchvision.datasets.utils import download_and_extract_archive

                download_and_extract_archive("https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz",
                                             str(base.parent), md5="7c2ac02c03563afcf9b574c7e56c153a")
            except Exception as exc:
                raise _failed(cfg, base.parent, exc) from None
        else:
            raise _missing(cfg, base, [e for e in expected if not any((base / e.rsplit("/", 1)[0]).glob("*.txt"))])
    texts_tr, y_tr = _read_imdb(base / "train")
    texts_te, y_te = _read_imdb(base / "test")
    train_idx, val_idx = _carve(np.arange(len(y_tr)), y_tr, cfg, seed)
    tokens_tr = [tokenize(t) for t in texts_tr]
    counts = Counter(w for i in train_idx for w in tokens_tr[i])  # vocabulary from our training split only
    words = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:cfg.vocab_size - 2]
    vocab = ("<pad>", "<unk>", *(w for w, _ in words))
    ids = {w: i for i, w in enumerate(vocab)}
    seq_len = cfg.seq_len or IMDB_SEQ_LEN

    def encode(docs: list[list[str]]) -> torch.Tensor:
        out = np.full((len(docs), seq_len), PAD, dtype=np.int64)
        for row, doc in enumerate(docs):
            seq = [ids.get(w, UNK) for w in doc[:seq_len]]
            out[row, :len(seq)] = seq
        return torch.from_numpy(out)

    x_tr = encode(tokens_tr)
    x_te = encode([tokenize(t) for t in texts_te])
    rows = lambda i: torch.as_tensor(i, dtype=torch.long)  # noqa: E731
    return DataBundle(
        name=cfg.name, task=CLASSIFICATION, input_shape=TokenShape((seq_len,), len(vocab)), n_outputs=2,
        train=Split(x_tr[rows(train_idx)], torch.as_tensor(y_tr[train_idx])),
        val=Split(x_tr[rows(val_idx)], torch.as_tensor(y_tr[val_idx])),
        test=Split(x_te, torch.as_tensor(y_te)), vocab=vocab)


# ----------------------------------------------------------------------------------------------------------
# California housing (scikit-learn's fetch_california_housing and its cache file)

@_register("california_housing")
def _load_california_housing(cfg: DataConfig, seed: int) -> DataBundle:
    from sklearn.datasets import fetch_california_housing
    from sklearn.preprocessing import StandardScaler

    home = data_root(cfg) / "california_housing"
    if not cfg.download and not (home / "cal_housing_py3.pkz").is_file():
        raise _missing(cfg, home, ["cal_housing_py3.pkz (scikit-learn's cache file of fetch_california_housing)"])
    try:
        x, y = fetch_california_housing(data_home=str(home), download_if_missing=cfg.download, return_X_y=True)
    except Exception as exc:
        raise _failed(cfg, home, exc) from None
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    idx = _split_indices(len(y), cfg, seed, labels=None)
    x = StandardScaler().fit(x[idx[0]]).transform(x)
    y = (y - y[idx[0]].mean()) / y[idx[0]].std()  # standardized with train statistics, like diabetes
    splits = [Split(torch.as_tensor(x[i], dtype=torch.float32), torch.as_tensor(y[i], dtype=torch.float32))
              for i in idx]
    return DataBundle(name=cfg.name, task=REGRESSION, input_shape=(x.shape[1],), n_outputs=1,
                      train=splits[0], val=splits[1], test=splits[2])


# ----------------------------------------------------------------------------------------------------------
# Character-level text from the Python standard library's sources (offline everywhere)

def stdlib_corpus(max_chars: int) -> str:
    """The first `max_chars` characters of the standard library's top-level modules (Lib/*.py, sorted by
    file name, joined by blank lines). Deterministic for a given Python version."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(lib.glob("*.py"))
    if not files:
        raise RecipeError(f"data.name = 'stdlib_text': no standard-library sources (*.py) in {lib}; this Python "
                          f"ships without them (install its stdlib sources, e.g. the libpython3-stdlib package)")
    parts, total = [], 0
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text) + 2
        if total >= max_chars:
            break
    return "\n\n".join(parts)[:max_chars]


def unigram_cross_entropy(train_ids: np.ndarray, eval_ids: np.ndarray, vocab_size: int) -> float:
    """Mean cross-entropy (nats/token) of `eval_ids` under the training split's token frequencies (add-one
    smoothed): the loss of the best model that ignores context."""
    counts = np.bincount(train_ids, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[eval_ids].mean()) if len(eval_ids) else float("nan")


@_register("stdlib_text")
def _load_stdlib_text(cfg: DataConfig, seed: int) -> DataBundle:
    text = stdlib_corpus(cfg.corpus_chars)
    seq_len = cfg.seq_len or TEXT_SEQ_LEN
    n = len(text)
    n_val, n_test = int(round(cfg.val_fraction * n)), int(round(cfg.test_fraction * n))
    n_train = n - n_val - n_test
    # Contiguous splits by position: the corpus read as a ring from a seeded offset gives train, then val,
    # then test, each one unbroken stretch of text (so no window straddles two splits).
    start = int(np.random.default_rng((seed, _TEXT_STREAM)).integers(0, n))
    ring = text[start:] + text[:start]
    parts = (ring[:n_train], ring[n_train:n_train + n_val], ring[n_train + n_val:])
    for name, part in zip(("train", "val", "test"), parts):
        # train needs one window; val/test may be empty (fraction 0) but not silently too short for one
        if len(part) < seq_len + 1 and (name == "train" or len(part) > 0):
            raise RecipeError(f"data.seq_len = {seq_len}: the {name} split of stdlib_text has {len(part)} "
                              f"characters, fewer than seq_len + 1; raise data.corpus_chars or lower seq_len")
    chars = sorted(set(parts[0]))
    vocab = ("", *chars)  # id 0: a character the training split never shows
    codes = np.array([ord(c) for c in chars], dtype=np.int64)

    def encode(part: str) -> np.ndarray:
        points = np.frombuffer(part.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        pos = np.searchsorted(codes, points).clip(0, max(0, len(codes) - 1))
        return np.where(codes[pos] == points, pos + 1, 0) if len(codes) else np.zeros_like(points)

    ids = [encode(p) for p in parts]

    def windows(t: np.ndarray, every_position: bool) -> Split:
        tt = torch.from_numpy(t)
        if len(tt) < seq_len + 1:
            return Split(torch.zeros((0, seq_len), dtype=torch.int64), torch.zeros((0, seq_len), dtype=torch.int64))
        if every_position:  # overlapping windows at every offset: views of the one 1-D tensor
            return Split(tt[:-1].unfold(0, seq_len, 1), tt[1:].unfold(0, seq_len, 1))
        m = (len(tt) - 1) // seq_len  # disjoint windows: every target character is scored exactly once
        return Split(tt[:m * seq_len].view(m, seq_len), tt[1:m * seq_len + 1].view(m, seq_len))

    train, val, test = windows(ids[0], True), windows(ids[1], False), windows(ids[2], False)
    info = {"unigram_val_loss": unigram_cross_entropy(ids[0], val.y.reshape(-1).numpy(), len(vocab)),
            "unigram_test_loss": unigram_cross_entropy(ids[0], test.y.reshape(-1).numpy(), len(vocab)),
            "chars": {"train": len(parts[0]), "val": len(parts[1]), "test": len(parts[2])}, "offset": start}
    return DataBundle(name=cfg.name, task=LANGUAGE_MODEL, input_shape=TokenShape((seq_len,), len(vocab)),
                      n_outputs=len(vocab), train=train, val=val, test=test, vocab=vocab, info=info)


def augmentation_generator(x: torch.Tensor) -> torch.Generator | None:
    """The generator behind a training split's random crops and flips (None for plain tensors): its state
    goes into checkpoints so a resumed run augments exactly as an uninterrupted one."""
    return x._generator if isinstance(x, AugmentedImages) else None
