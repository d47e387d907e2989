"""Image folders (ImageNet, mini-ImageNet: `<split>/<class>/<image>`), held in memory after a check that they
fit, or kept on disk and decoded per minibatch (`[data] storage = "disk"`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bcdcore.data.image_files import ImageFiles, decode_images, file_moments
from bcdcore.data.images import image_bundle
from bcdcore.data.splits import SUBSET_STREAM, carve, load_failed, missing_files, per_class_subset, split_indices
from bcdcore.data.types import DataBundle, Split, data_root
from bcdcore.recipe import CLASSIFICATION, DataConfig, RecipeError
from bcdcore.resources import available_bytes

IMAGENET_SIZE, MINI_IMAGENET_SIZE = 64, 84  # default image sizes of the trees
STATS_IMAGES = 10_000  # storage = "disk": training images sampled for the normalisation statistics


# Peak bytes per image value while a tree loads: the decoded uint8 images and their stacked copy (2), the float32
# tensor of train + test (4) and the float32 split copies taken from it (4).
_LOAD_BYTES_PER_VALUE = 10


def available_memory() -> int | None:
    """Bytes of memory the system can still give (MemAvailable), or None where that cannot be read."""
    return available_bytes(torch.device("cpu"))


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
        keep = per_class_subset(labels, keep, cap, cfg, seed, strict=False)
    return [paths[i] for i in keep], labels[keep], classes


def _decode_tree(cfg: DataConfig, folder: Path, paths: list[str], size: int) -> torch.Tensor:
    """uint8 (N, 3, size, size) of a tree's images, refused up front when they cannot fit in memory."""
    _check_fits_in_memory(cfg, folder, len(paths), size)
    try:
        return decode_images(paths, size)
    except OSError as exc:
        raise load_failed(cfg, folder, exc) from None


def _files_bundle(cfg: DataConfig, train: tuple[list[str], np.ndarray], val: tuple[list[str], np.ndarray],
                  test: tuple[list[str], np.ndarray], n_classes: int, size: int, seed: int) -> DataBundle:
    """Splits that stay on disk (`storage = "disk"`): paths and labels, normalised with the per-channel
    statistics of (a seeded sample of at most STATS_IMAGES of) the training images."""
    paths = train[0]
    if len(paths) > STATS_IMAGES:
        pick = np.random.default_rng((seed, SUBSET_STREAM)).choice(len(paths), STATS_IMAGES, replace=False)
        paths = [paths[i] for i in np.sort(pick)]
    try:
        mean, std = file_moments(paths, size)
    except OSError as exc:
        raise load_failed(cfg, Path(paths[0]).parent.parent, exc) from None
    split = lambda part: Split(ImageFiles(part[0], size, mean, std),  # noqa: E731
                               torch.as_tensor(part[1], dtype=torch.int64))
    return DataBundle(name=cfg.name, task=CLASSIFICATION, input_shape=(3, size, size), n_outputs=n_classes,
                      train=split(train), val=split(val), test=split(test))


def _pick(part: tuple[list[str], np.ndarray], idx: np.ndarray) -> tuple[list[str], np.ndarray]:
    return [part[0][i] for i in idx], part[1][idx]


def load_imagenet(cfg: DataConfig, seed: int) -> DataBundle:
    base = data_root(cfg) / "imagenet"
    if not (base / "train").is_dir() or not (base / "val").is_dir():
        if cfg.download:
            raise RecipeError(f"data.name = 'imagenet': cannot be downloaded (its licence requires an account); "
                              f"put the class-folder trees train/<class>/<image> and val/<class>/<image> in {base}")
        raise missing_files(cfg, base, ["train/<class>/<image>", "val/<class>/<image> (val sorted into class folders)"],
                       downloadable=False)
    size = cfg.image_size or IMAGENET_SIZE
    tr_paths, y_tr, classes = _list_tree(cfg, base / "train", cfg.per_class, seed)
    te_paths, y_te, _ = _list_tree(cfg, base / "val", 0, seed, classes=classes)
    idx = carve(np.arange(len(y_tr)), y_tr, cfg, seed)
    if cfg.storage == "disk":
        tree = (tr_paths, y_tr)
        return _files_bundle(cfg, _pick(tree, idx[0]), _pick(tree, idx[1]), (te_paths, y_te), len(classes),
                             size, seed)
    x_tr = _decode_tree(cfg, base / "train", tr_paths, size)
    x_te = _decode_tree(cfg, base / "val", te_paths, size)
    return image_bundle(cfg, x_tr, y_tr, x_te, y_te, idx, len(classes), per_channel=True)


def load_mini_imagenet(cfg: DataConfig, seed: int) -> DataBundle:
    folder = data_root(cfg) / "mini_imagenet" / "train"
    if not folder.is_dir():
        if cfg.download:
            raise RecipeError(f"data.name = 'mini_imagenet': cannot be downloaded; put the class-folder tree "
                              f"<class>/<image> in {folder}")
        raise missing_files(cfg, folder, ["<class>/<image> (one folder per class)"], downloadable=False)
    size = cfg.image_size or MINI_IMAGENET_SIZE
    paths, y, classes = _list_tree(cfg, folder, cfg.per_class, seed)
    train_idx, val_idx, test_idx = split_indices(len(y), cfg, seed, labels=y)
    if cfg.storage == "disk":
        tree = (paths, y)
        return _files_bundle(cfg, _pick(tree, train_idx), _pick(tree, val_idx), _pick(tree, test_idx),
                             len(classes), size, seed)
    x = _decode_tree(cfg, folder, paths, size)
    # no official test split: all three come from the one tree (the test rows ride in the "test file" slot)
    bundle = image_bundle(cfg, x[torch.as_tensor(np.concatenate([train_idx, val_idx]))],
                           y[np.concatenate([train_idx, val_idx])], x[torch.as_tensor(test_idx)], y[test_idx],
                           (np.arange(len(train_idx)), np.arange(len(train_idx), len(train_idx) + len(val_idx))),
                           len(classes), per_channel=True)
    return bundle
