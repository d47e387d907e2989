"""`[data] storage = "disk"` (bcdcore/image_files.py): image-folder splits decoded per minibatch give exactly
the data, the minibatches and the training run that the in-memory splits give, on PNG trees the test writes."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from zoo_files import write_image_tree

from bcdcore.data import load_data
from bcdcore.data.batches import BatchStream, eval_batches
from bcdcore.data.image_files import ImageFiles, file_moments
from bcdcore.measure import fixed_batch
from bcdcore.recipe import DataConfig

CLASSES = ["n01440764", "n01443537", "n01484850"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trees")
    write_image_tree(root / "imagenet" / "train", CLASSES, per_class=8)
    write_image_tree(root / "imagenet" / "val", CLASSES, per_class=2, seed=1)
    write_image_tree(root / "mini_imagenet" / "train", CLASSES[:2], per_class=10, seed=2)
    return root


def _both(name: str, root: Path, **options):
    memory = load_data(DataConfig(name=name, root=str(root), **options), 0)
    disk = load_data(DataConfig(name=name, root=str(root), storage="disk", **options), 0)
    return memory, disk


@pytest.mark.parametrize("name", ["imagenet", "mini_imagenet"])
def test_disk_splits_equal_the_in_memory_splits(name, root):
    memory, disk = _both(name, root, image_size=12, val_fraction=0.25)
    assert (disk.input_shape, disk.n_outputs) == (memory.input_shape, memory.n_outputs)
    for which in ("train", "val", "test"):
        m, d = getattr(memory, which), getattr(disk, which)
        assert isinstance(d.x, ImageFiles) and len(d) == len(m) > 0
        assert d.x.shape == m.x.shape and d.x.dim() == 4
        assert torch.equal(d.y, m.y)
        assert torch.equal(d.x[:], m.x), f"{which}: decoded rows differ from the in-memory ones"
        rows = torch.tensor([len(m) - 1, 0])
        assert torch.equal(d.x.index_select(0, rows), m.x.index_select(0, rows))
        assert torch.equal(d.x[1:3], m.x[1:3])


def test_minibatches_and_the_fixed_measurement_batch_are_the_same(root):
    memory, disk = _both("imagenet", root, image_size=12)
    a, b = BatchStream(memory.train.x, memory.train.y, 5, 7), BatchStream(disk.train.x, disk.train.y, 5, 7)
    for _ in range(6):  # more than one epoch
        (xa, ya), (xb, yb) = a.next(), b.next()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xb.is_contiguous(memory_format=torch.channels_last)
    for size in (4, 256):  # a sample, and the whole split when it is smaller
        (xm, ym), (xd, yd) = fixed_batch(memory.train.x, memory.train.y, size, 3), \
            fixed_batch(disk.train.x, disk.train.y, size, 3)
        assert isinstance(xd, torch.Tensor) and torch.equal(xd, xm) and torch.equal(yd, ym)


def test_each_stream_prefetches_its_next_minibatch_and_takes_it(root, monkeypatch):
    from bcdcore.data import image_files

    _, disk = _both("imagenet", root, image_size=12)
    files = disk.train.x
    synchronous = []
    decode = files._decode
    on_caller = lambda: threading.current_thread() is threading.main_thread()  # noqa: E731
    monkeypatch.setattr(files, "_decode", lambda rows: (on_caller() and synchronous.append(rows)) or decode(rows))
    streams = [BatchStream(files, disk.train.y, 4, seed) for seed in (1, 2)]
    plain = ImageFiles(files.paths, files.size, files.mean, files.std, prefetching=False)
    twins = [BatchStream(plain, disk.train.y, 4, seed) for seed in (1, 2)]
    for _ in range(3):
        for stream, twin in zip(streams, twins):
            expected = tuple(stream.order[stream.position:stream.position + 4].tolist())
            (x, y), (x_plain, y_plain) = stream.next(), twin.next()
            assert torch.equal(x, x_plain) and torch.equal(y, y_plain)
            upcoming = tuple(stream.order[stream.position:stream.position + 4].tolist())
            assert upcoming in files._ahead  # the next minibatch is being decoded already
            assert expected not in files._ahead  # and the one just taken was consumed
    assert len(files._ahead) <= image_files.KEEP_AHEAD
    # 3 minibatches of 5 per epoch for each stream: only each stream's first was decoded on the caller's thread
    assert len(synchronous) == 2


def test_evaluation_batches_prefetch_the_next_one(root):
    memory, disk = _both("imagenet", root, image_size=12)
    files = disk.train.x
    seen = []
    for (xm, ym), (xd, yd) in zip(eval_batches(memory.train.x, memory.train.y, 8),
                                  eval_batches(files, disk.train.y, 8)):
        assert torch.equal(xm, xd) and torch.equal(ym, yd)
        seen.append(set(files._ahead))
    n = len(files)
    assert seen[0] == {tuple(range(8, 16))} and seen[-1] == set()  # taken as they come; none past the end
    assert sum(len(b) for b, _ in eval_batches(files, disk.train.y, 8)) == n


def test_statistics_come_from_the_training_images_only(root):
    memory, disk = _both("imagenet", root, image_size=12)
    mean, std = disk.train.x.mean, disk.train.x.std
    assert torch.equal(file_moments(disk.train.x.paths, 12)[0], mean)
    assert not torch.equal(file_moments(disk.test.x.paths, 12)[0], mean)  # the val tree is another sample
    assert torch.allclose(memory.train.x.mean((0, 2, 3)).double(), torch.zeros(3, dtype=torch.float64), atol=1e-5)
    assert (std > 0).all()


def test_storage_is_checked(root, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[data]\nname = "digits"\nstorage = "disk"\n')
    proc = run_cli("check", str(recipe), cwd=tmp_path)
    assert proc.returncode == 2
    assert "data.storage" in proc.stderr and "does not apply to dataset 'digits'" in proc.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[data]\nname = "imagenet"\nroot = "{root}"\nstorage = "disc"\n')
    proc = run_cli("check", str(bad), cwd=tmp_path)
    assert proc.returncode == 2 and "did you mean 'disk'" in proc.stderr.lower()


def test_a_run_on_disk_storage_equals_the_in_memory_run(root, tmp_path):
    recipe = tmp_path / "cnn_tree.toml"
    recipe.write_text(f"""
[run]
name = "tree"
seed = 0
device = "cpu"
rounds = 3

[data]
name = "imagenet"
root = "{root}"
image_size = 12
batch_size = 6

[model]
name = "cnn"
widths = [4, 8]

[algorithm]
K = 2
lambda = 0.1
lr = 0.05

[eval]
every = 1
""")
    curves = {}
    for storage in ("memory", "disk"):
        proc = run_cli("run", str(recipe), "--quiet", "--set", f'data.storage="{storage}"', "--runs-dir",
                       str(tmp_path / storage), cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        (run_dir,) = (tmp_path / storage).iterdir()
        events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        curves[storage] = [{k: v for k, v in e.items() if k not in ("t", "wall_s")}
                           for e in events if e["kind"] == "metric"]
    assert len(curves["disk"]) == 3 and curves["disk"] == curves["memory"]
    assert np.isfinite(curves["disk"][-1]["val_loss"])
