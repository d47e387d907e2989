"""What `[data] storage = "disk"` costs: minibatches of an image tree decoded per step, with and without
prefetching, against the in-memory split, under a small training step. One process, side by side.

    .venv/bin/python bench/disk_images.py [--images 768] [--size 64] [--batch 64] [--steps 12] [--passes 3]

Writes a class-folder tree of JPEGs (camera-sized 256x192, so decoding and resizing cost what they cost on real
photos) into a temporary folder, loads it as `imagenet` three ways, and times `steps` minibatches each followed
by one forward + backward pass of a small CNN, the three taking turns. Prints median ms per step and the ratios to the in-memory split.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bcdcore.data import load_data  # noqa: E402
from bcdcore.data.batches import BatchStream  # noqa: E402
from bcdcore.data.image_files import ImageFiles  # noqa: E402
from bcdcore.recipe import DataConfig  # noqa: E402


def write_tree(root: Path, images: int, classes: int = 4) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", images), ("val", max(classes, images // 10))):
        for i in range(count):
            folder = root / "imagenet" / split / f"n{i % classes:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            # smooth colour fields plus noise: compresses like a photo, not like white noise
            base = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
            img = Image.fromarray(base).resize((256, 192), Image.BILINEAR)
            noisy = np.clip(np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (192, 256, 3)), 0, 255)
            Image.fromarray(noisy.astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)


def time_steps(x, y, batch: int, steps: int, model: nn.Module) -> list[float]:
    stream = BatchStream(x, y, batch, seed=1)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        xb, yb = stream.next()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=768)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--passes", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_tree(root, args.images)
        memory = load_data(DataConfig(name="imagenet", root=str(root), image_size=args.size, val_fraction=0.0), 0)
        disk = load_data(DataConfig(name="imagenet", root=str(root), image_size=args.size, val_fraction=0.0,
                                    storage="disk"), 0)
        files = disk.train.x
        plain = ImageFiles(files.paths, files.size, files.mean, files.std, prefetching=False)
        model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                              nn.Linear(32, 4)).to(memory_format=torch.channels_last)
        candidates = {"memory": memory.train.x, "disk, prefetch": files, "disk, no prefetch": plain}
        for name, x in candidates.items():
            time_steps(x, memory.train.y, args.batch, 2, model)  # warm-up
        # runs of `steps` consecutive steps per candidate (prefetching needs its own steps to overlap with),
        # the candidates taking turns `passes` times so that drifting machine noise hits them alike
        times: dict[str, list[float]] = {name: [] for name in candidates}
        for _ in range(args.passes):
            for name, x in candidates.items():
                times[name] += time_steps(x, memory.train.y, args.batch, args.steps, model)
        medians = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"{args.images} JPEGs 256x192 -> {args.size}x{args.size}, batch {args.batch}, {args.passes} x {args.steps} steps, "
          f"{torch.get_num_threads()} torch threads")
    print("| split | ms per step (median) | vs memory |")
    print("|---|---:|---:|")
    for name, ms in medians.items():
        print(f"| {name} | {ms:.1f} | {ms / medians['memory']:.2f}x |")
    print(f"prefetch saves {1 - medians['disk, prefetch'] / medians['disk, no prefetch']:.0%} of a disk step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
