"""Image-folder splits that stay on disk (`[data] storage = "disk"` for imagenet and mini_imagenet).

A full ImageNet does not fit in memory, so such a split keeps only its file paths and decodes the rows a
minibatch asks for. It offers what the engine uses of a split's tensor (`len`, `shape`, `dim`, `device`,
`index_select(0, idx)`, slicing, `.to(device)`) and returns ordinary float32 tensors that equal, bit for bit,
the rows the in-memory path would hold for the same normalisation statistics: decode (RGB, shorter side resized
to `size`, centre crop), scale to [0, 1], subtract the mean and divide by the std per channel.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

_POOL: ThreadPoolExecutor | None = None
_AHEAD: ThreadPoolExecutor | None = None
KEEP_AHEAD = 4  # decoded minibatches kept for later per split (each block's stream prefetches its next one)


def _pool() -> ThreadPoolExecutor:
    """One decoding pool per process (PIL releases the GIL while it decodes and resizes)."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="bcd-decode")
    return _POOL


def _ahead() -> ThreadPoolExecutor:
    """One thread that runs prefetches; it waits on the decoding pool, never inside it (no deadlock)."""
    global _AHEAD
    if _AHEAD is None:
        _AHEAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bcd-prefetch")
    return _AHEAD


def decode_image(path: str, size: int) -> np.ndarray:
    """uint8 (3, size, size): RGB, shorter side resized to `size` (antialiased), centre crop."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    with Image.open(path) as img:
        img = TF.center_crop(TF.resize(img.convert("RGB"), size), [size, size])
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def decode_images(paths: Sequence[str], size: int) -> Tensor:
    """uint8 (N, 3, size, size) of `paths`, in order, decoded in parallel."""
    images = list(_pool().map(lambda p: decode_image(p, size), paths))
    return torch.from_numpy(np.stack(images)) if images else torch.zeros((0, 3, size, size), dtype=torch.uint8)


def unit_scale(images: Tensor) -> Tensor:
    """uint8 images as float32 in [0, 1]: the one conversion both storage paths use."""
    return images.to(torch.float32).div_(255.0)


def normalise_(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """(x - mean) / std per channel, in place, rounded as float32: the one normalisation both storage paths use,
    which is what makes their rows equal bit for bit."""
    shape = (1, x.shape[1], 1, 1)
    return x.sub_(mean.float().view(shape)).div_(std.float().view(shape))


def pixel_moments(chunks: Iterable[Tensor], per_channel: bool = True) -> tuple[Tensor, Tensor]:
    """Mean and std (float64, one per channel) of the values of float32 (n, C, H, W) chunks, summed in float64
    chunk by chunk; shared by the in-memory and the on-disk paths so both normalise alike."""
    s1 = s2 = None
    count = 0
    for part in chunks:
        part = part.to(torch.float64)
        a, b = part.sum((0, 2, 3)), part.pow(2).sum((0, 2, 3))
        s1, s2 = (a, b) if s1 is None else (s1 + a, s2 + b)
        count += part.shape[0] * part.shape[2] * part.shape[3]
    if s1 is None:
        raise ValueError("pixel_moments: no images")
    c, count = s1.shape[0], max(count, 1)
    if not per_channel:
        s1, s2, count = s1.sum().expand(c), s2.sum().expand(c), count * c
    mean = s1 / count
    return mean, (s2 / count - mean.pow(2)).clamp_min(1e-12).sqrt()


def file_moments(paths: Sequence[str], size: int, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of the [0, 1] pixel values of `paths`, `chunk` images decoded at a time."""
    return pixel_moments(unit_scale(decode_images(paths[i:i + chunk], size)) for i in range(0, len(paths), chunk))


class ImageFiles:
    """The images of one split as files; rows are decoded and normalised when asked for."""

    def __init__(self, paths: Sequence[str], size: int, mean: Tensor, std: Tensor,
                 device: torch.device | str = "cpu", prefetching: bool = True) -> None:
        self.paths = list(paths)
        self.size = int(size)
        self.mean, self.std = mean.to(torch.float64), std.to(torch.float64)
        self.device = torch.device(device)
        self.prefetching = prefetching
        self._ahead: OrderedDict[tuple[int, ...], Future] = OrderedDict()

    # --- the parts of the Tensor interface the engine uses
    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.paths), 3, self.size, self.size))

    def __len__(self) -> int:
        return len(self.paths)

    def dim(self) -> int:
        return 4

    def to(self, device: torch.device | str) -> "ImageFiles":
        return ImageFiles(self.paths, self.size, self.mean, self.std, device, self.prefetching)

    def index_select(self, dim: int, index: Tensor) -> Tensor:
        if dim != 0:
            raise ValueError("ImageFiles.index_select: only rows (dim 0) can be selected")
        return self.rows(index.cpu().tolist())

    def __getitem__(self, key: slice) -> Tensor:
        if not isinstance(key, slice):
            raise TypeError(f"ImageFiles: index rows with a slice or index_select, not {type(key).__name__}")
        return self.rows(range(len(self.paths))[key])

    def __repr__(self) -> str:
        return f"ImageFiles({len(self.paths)} images, {self.size}x{self.size}, {self.device})"

    # --- decoding
    def rows(self, rows: Sequence[int]) -> Tensor:
        """float32 (len(rows), 3, size, size) on this split's device, normalised (taken from a prefetch of
        exactly these rows when there is one: the same function computed it, so the values are the same)."""
        key = tuple(int(i) for i in rows)
        pending = self._ahead.pop(key, None)
        x = pending.result() if pending is not None else self._decode(key)
        return x.to(self.device)

    def prefetch(self, rows: Sequence[int]) -> None:
        """Start decoding `rows` in the background (BatchStream calls this with its next minibatch), so the
        decoding overlaps the training step that comes before it."""
        key = tuple(int(i) for i in rows)
        if not self.prefetching or key in self._ahead:
            return
        self._ahead[key] = _ahead().submit(self._decode, key)
        while len(self._ahead) > KEEP_AHEAD:
            self._ahead.popitem(last=False)[1].cancel()  # the oldest: that stream moved on without it

    def _decode(self, rows: tuple[int, ...]) -> Tensor:
        return normalise_(unit_scale(decode_images([self.paths[i] for i in rows], self.size)), self.mean, self.std)
