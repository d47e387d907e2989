"""File-backed datasets: tiny datasets written in the real on-disk formats, read through the real loaders.

Shapes, labels, split sizes, no leakage between splits (official test files kept whole, validation carved
from the training file), statistics fitted on the training split only, and one-line errors for missing files.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_env
from zoo_files import match_rows, write_california, write_cifar, write_image_tree, write_imdb, write_mnist, write_svhn

from bcdcore.data import DataBundle, TokenShape, data_root, default_data_root, load_data
from bcdcore.data.images import AugmentedImages
from bcdcore.data.text import stdlib_corpus, tokenize
from bcdcore.recipe import CLASSIFICATION, DATASETS, LANGUAGE_MODEL, REGRESSION, DataConfig, RecipeError

FILE_DATASETS = sorted(n for n, spec in DATASETS.items() if spec.files)


def load(name: str, root: Path, seed: int = 0, **options) -> DataBundle:
    return load_data(DataConfig(name=name, root=str(root), **options), seed)


def assert_train_val_partition(b: DataBundle, raw_x: np.ndarray, raw_y: np.ndarray, channels: int,
                               n_val: int) -> tuple[np.ndarray, np.ndarray]:
    """train + val rows are distinct rows of the training file, none lost, labels carried along."""
    tr = match_rows(b.train.x, raw_x, channels)
    va = match_rows(b.val.x, raw_x, channels)
    assert len(va) == n_val and len(tr) + len(va) == len(raw_x)
    assert len(set(tr)) == len(tr) and len(set(va)) == len(va) and not set(tr) & set(va)
    np.testing.assert_array_equal(b.train.y.numpy(), raw_y[tr])
    np.testing.assert_array_equal(b.val.y.numpy(), raw_y[va])
    return tr, va


def assert_official_test(b: DataBundle, raw_x: np.ndarray, raw_y: np.ndarray, channels: int) -> None:
    """The test split is the test file, whole and in order."""
    np.testing.assert_array_equal(match_rows(b.test.x, raw_x, channels), np.arange(len(raw_x)))
    np.testing.assert_array_equal(b.test.y.numpy(), raw_y)


def assert_normalised_on_train(b: DataBundle) -> None:
    x = b.train.x.as_subclass(torch.Tensor).double() if isinstance(b.train.x, AugmentedImages) else b.train.x.double()
    dims = (0, 2, 3) if x.dim() == 4 else (0, 1)
    torch.testing.assert_close(x.mean(dims), torch.zeros_like(x.mean(dims)), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(dims, correction=0), torch.ones_like(x.mean(dims)), atol=1e-4, rtol=0)
    assert b.test.x.double().mean().abs() > 1e-4  # the test rows use the train statistics, not their own


# ----------------------------------------------------------------------------------------------------------
# MNIST family

def test_mnist_idx_files(tmp_path):
    raw = write_mnist(tmp_path, n_train=60, n_test=20)
    b = load("mnist", tmp_path, val_fraction=0.2, test_fraction=0.3)  # test_fraction: the official split wins
    assert (b.task, b.input_shape, b.n_outputs) == (CLASSIFICATION, (1, 28, 28), 10)
    assert [len(b.train), len(b.val), len(b.test)] == [48, 12, 20]
    assert b.train.x.dtype == torch.float32 and b.train.y.dtype == torch.int64
    tr, va = assert_train_val_partition(b, raw["x_train"], raw["y_train"], 1, 12)
    assert_official_test(b, raw["x_test"], raw["y_test"], 1)
    # one mean/std from the training rows' pixels
    pixels = raw["x_train"][tr].astype(np.float64) / 255
    mean, std = pixels.mean(), pixels.std()
    expected = (raw["x_test"].astype(np.float64) / 255 - mean) / std
    np.testing.assert_allclose(b.test.x[:, 0].numpy(), expected, atol=1e-4)
    # stratified validation: 60 images, 6 per class -> 12 validation images, about 1 or 2 per class
    assert np.bincount(b.val.y.numpy(), minlength=10).max() <= 2


def test_mnist_gz_files_load_like_the_unpacked_ones(tmp_path):
    write_mnist(tmp_path / "plain", seed=3)
    write_mnist(tmp_path / "packed", seed=3, gz=True)
    assert not list((tmp_path / "packed" / "MNIST" / "raw").glob("*-ubyte"))
    a, b = load("mnist", tmp_path / "plain", seed=5), load("mnist", tmp_path / "packed", seed=5)
    for sa, sb in zip((a.train, a.val, a.test), (b.train, b.val, b.test)):
        assert torch.equal(sa.x, sb.x) and torch.equal(sa.y, sb.y)
    assert len(list((tmp_path / "packed" / "MNIST" / "raw").glob("*-ubyte"))) == 4  # unpacked next to them


def test_mnist_variants(tmp_path):
    raw = write_mnist(tmp_path, per_class_train=8, n_test=20)
    flat = load("mnist_flat", tmp_path, val_fraction=0.25)
    assert flat.input_shape == (784,) and flat.train.x.shape == (60, 784) and len(flat.test) == 20
    big = load("mnist", tmp_path, image_size=32, channels=3)
    assert big.input_shape == (3, 32, 32) and torch.equal(big.train.x[:, 0], big.train.x[:, 2])
    # mini_mnist: per_class training images of each class, drawn from the training file, stratified
    mini = load("mini_mnist", tmp_path, per_class=5, val_fraction=0.2)
    assert [len(mini.train), len(mini.val), len(mini.test)] == [40, 10, 20]
    counts = np.bincount(np.concatenate([mini.train.y.numpy(), mini.val.y.numpy()]), minlength=10)
    assert counts.tolist() == [5] * 10 and np.bincount(mini.val.y.numpy(), minlength=10).tolist() == [1] * 10
    tr = match_rows(mini.train.x, raw["x_train"])
    va = match_rows(mini.val.x, raw["x_train"])
    assert not set(tr) & set(va) and len(set(tr)) == 40
    assert_official_test(mini, raw["x_test"], raw["y_test"], 1)
    other = load("mini_mnist", tmp_path, per_class=5, seed=1)
    assert set(match_rows(other.train.x, raw["x_train"])) != set(tr)  # the subset is seeded
    # mnist_8ch: mini_mnist with the image in 8 identical channels
    eight = load("mnist_8ch", tmp_path, per_class=5, val_fraction=0.2)
    assert eight.input_shape == (8, 28, 28) and eight.train.x.shape == (40, 8, 28, 28)
    assert torch.equal(eight.train.x[:, 7], eight.train.x[:, 0])
    torch.testing.assert_close(eight.train.x[:, :1], mini.train.x)
    with pytest.raises(RecipeError, match=r"data.per_class = 9: class \d of 'mini_mnist' has only 8 training images"):
        load("mini_mnist", tmp_path, per_class=9)


def test_fashion_mnist_reads_its_own_folder(tmp_path):
    raw = write_mnist(tmp_path, folder="FashionMNIST", gz=True, n_train=40, n_test=10)
    b = load("fashion_mnist", tmp_path, val_fraction=0.25)
    assert [len(b.train), len(b.val), len(b.test)] == [30, 10, 10] and b.n_outputs == 10
    assert_train_val_partition(b, raw["x_train"], raw["y_train"], 1, 10)
    assert_official_test(b, raw["x_test"], raw["y_test"], 1)
    with pytest.raises(RecipeError, match="MNIST/raw"):
        load("mnist", tmp_path)  # FashionMNIST files are not MNIST files


# ----------------------------------------------------------------------------------------------------------
# CIFAR, SVHN

@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_pickle_batches(tmp_path, hundred):
    raw = write_cifar(tmp_path, hundred=hundred, per_batch=8, n_test=10)
    name = "cifar100" if hundred else "cifar10"
    b = load(name, tmp_path, val_fraction=0.25)
    assert (b.input_shape, b.n_outputs) == ((3, 32, 32), 100 if hundred else 10)
    assert [len(b.train), len(b.val), len(b.test)] == [30, 10, 10]
    assert_train_val_partition(b, raw["x_train"], raw["y_train"], 3, 10)
    assert_official_test(b, raw["x_test"], raw["y_test"], 3)
    assert_normalised_on_train(b)
    # the stored layout is R plane, G plane, B plane: channel 0 of a row is its first 1024 bytes
    i = match_rows(b.test.x[:1], raw["x_test"], 3)[0]
    r = raw["x_test"][i, 0].astype(np.float64)
    np.testing.assert_allclose(np.corrcoef(b.test.x[0, 0].numpy().ravel(), r.ravel())[0, 1], 1.0, atol=1e-6)


def test_cifar_augmentation_crops_and_flips_training_batches_only(tmp_path):
    write_cifar(tmp_path, per_batch=8)
    plain = load("cifar10", tmp_path, seed=2)
    aug = load("cifar10", tmp_path, seed=2, augment=True)
    assert isinstance(aug.train.x, AugmentedImages) and not isinstance(aug.val.x, AugmentedImages)
    stored = aug.train.x.as_subclass(torch.Tensor)
    assert torch.equal(stored, plain.train.x) and torch.equal(aug.test.x, plain.test.x)
    idx = torch.arange(len(stored))
    batch = aug.train.x.index_select(0, idx)  # how BatchStream draws a minibatch
    assert type(batch) is torch.Tensor and batch.shape == stored.shape
    padded = torch.nn.functional.pad(stored, (4, 4, 4, 4))
    flips = 0
    for k in range(len(stored)):  # each sample is a 32x32 window of its padded image, maybe mirrored
        found = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (False, True)
                 if torch.equal(batch[k], (lambda w: w.flip(-1) if f else w)(padded[k, :, dy:dy + 32, dx:dx + 32]))]
        assert found, f"sample {k} is not a crop of its image"
        flips += found[0][2]
    assert 0 < flips < len(stored)
    assert not torch.equal(aug.train.x.index_select(0, idx), batch)  # fresh draws every batch
    again = load("cifar10", tmp_path, seed=2, augment=True)
    assert torch.equal(again.train.x.index_select(0, idx), batch)  # ... from a seeded stream
    moved = aug.train.x.to(torch.device("cpu"))
    assert isinstance(moved, AugmentedImages) and len(moved) == len(stored)


def test_svhn_mat_files(tmp_path):
    raw = write_svhn(tmp_path, n_train=30, n_test=12)
    b = load("svhn", tmp_path, val_fraction=0.2)
    assert (b.input_shape, b.n_outputs) == ((3, 32, 32), 10)
    assert [len(b.train), len(b.val), len(b.test)] == [24, 6, 12]
    assert 0 in b.test.y.tolist() and 10 not in b.test.y.tolist()  # the label 10 means the digit 0
    assert_train_val_partition(b, raw["x_train"], raw["y_train"], 3, 6)
    assert_official_test(b, raw["x_test"], raw["y_test"], 3)
    assert_normalised_on_train(b)


# ----------------------------------------------------------------------------------------------------------
# ImageFolder trees

def test_imagenet_class_folders(tmp_path):
    classes = ["n01440764", "n01443537", "n01484850"]
    write_image_tree(tmp_path / "imagenet" / "train", classes, per_class=6)
    write_image_tree(tmp_path / "imagenet" / "val", classes[1:], per_class=2, seed=1)  # val may lack a class
    b = load("imagenet", tmp_path, image_size=16, val_fraction=1 / 6)
    assert (b.input_shape, b.n_outputs) == ((3, 16, 16), 3)
    assert [len(b.train), len(b.val), len(b.test)] == [15, 3, 4]
    assert np.bincount(b.val.y.numpy(), minlength=3).tolist() == [1, 1, 1]  # stratified
    assert sorted(b.test.y.tolist()) == [1, 1, 2, 2]  # val folder labels follow the training classes by name
    assert_normalised_on_train(b)
    default = load("imagenet", tmp_path)
    assert default.input_shape == (3, 64, 64)
    capped = load("imagenet", tmp_path, image_size=8, per_class=2, val_fraction=0.0)
    assert np.bincount(capped.train.y.numpy()).tolist() == [2, 2, 2] and len(capped.test) == 4
    write_image_tree(tmp_path / "imagenet" / "val", ["n99999999"], per_class=1)
    with pytest.raises(RecipeError, match="classes the training tree lacks: n99999999"):
        load("imagenet", tmp_path, image_size=8)


def test_image_tree_too_big_for_memory_is_refused_before_decoding(tmp_path, monkeypatch):
    from bcdcore.data import image_trees

    free = image_trees.available_memory()
    assert free is None or free > 0
    classes = ["n01440764", "n01443537", "n01484850"]
    write_image_tree(tmp_path / "imagenet" / "train", classes, per_class=6)
    write_image_tree(tmp_path / "imagenet" / "val", classes, per_class=1, seed=1)
    # 18 training images x 3 x 16 x 16 values x 10 bytes while loading = 138,240 bytes
    monkeypatch.setattr(image_trees, "available_memory", lambda: 100_000)
    from PIL import Image

    decoded, open_image = [], Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: decoded.append(1) or open_image(*a, **k))
    with pytest.raises(RecipeError) as info:
        load("imagenet", tmp_path, image_size=16)
    message = str(info.value)
    assert "\n" not in message and "18 images" in message and "16x16" in message
    assert "data.per_class" in message and "data.image_size" in message and 'data.storage = "disk"' in message
    assert not decoded  # refused before any image was decoded
    capped = load("imagenet", tmp_path, image_size=16, per_class=2, val_fraction=0.0)  # 6 images fit
    assert len(capped.train) == 6


def test_mini_imagenet_tree_gives_three_disjoint_splits(tmp_path):
    files = write_image_tree(tmp_path / "mini_imagenet" / "train", ["a", "b"], per_class=10,
                             sizes=((84, 84),))
    b = load("mini_imagenet", tmp_path, val_fraction=0.2, test_fraction=0.2)
    assert (b.input_shape, b.n_outputs) == ((3, 84, 84), 2)
    assert [len(b.train), len(b.val), len(b.test)] == [12, 4, 4]
    raw = np.stack([img.transpose(2, 0, 1) for c in ("a", "b") for img in files[c]])
    ids = [match_rows(s.x, raw, 3) for s in (b.train, b.val, b.test)]
    assert sorted(np.concatenate(ids).tolist()) == list(range(20))  # a partition of the 20 images
    for s, i in zip((b.train, b.val, b.test), ids):
        np.testing.assert_array_equal(s.y.numpy(), i // 10)
        assert np.bincount(s.y.numpy(), minlength=2).min() >= 2  # stratified


# ----------------------------------------------------------------------------------------------------------
# IMDb

def test_imdb_tree_vocabulary_from_the_training_split(tmp_path):
    pos = [f"A great movie number {i}.<br />I loved it, didn't you?" for i in range(10)]
    neg = [f"An awful movie number {100 + i}. Bad bad BAD." for i in range(10)]
    write_imdb(tmp_path, {"train": {"pos": pos, "neg": neg},
                          "test": {"pos": ["great zzztestonly"], "neg": ["awful", "bad " * 50]}})
    b = load("imdb", tmp_path, val_fraction=0.2, seq_len=12, vocab_size=50)
    assert b.task == CLASSIFICATION and b.n_outputs == 2
    assert isinstance(b.input_shape, TokenShape) and b.input_shape == (12,)
    assert b.input_shape.vocab_size == len(b.vocab) == b.vocab_size
    assert [len(b.train), len(b.val), len(b.test)] == [16, 4, 3]
    assert b.train.x.dtype == torch.int64 and b.train.x.shape == (16, 12)
    assert b.vocab[:4] == ("<pad>", "<unk>", "bad", "movie")  # then by count: 3 per neg review, 1 per review
    assert "br" not in b.vocab and "didn't" in b.vocab and "zzztestonly" not in b.vocab
    assert "zzzunsup" not in b.vocab and "zzzvocabfile" not in b.vocab
    # the numbers of the validation reviews never reach the vocabulary (built on our training split only)
    decode = lambda row: [b.vocab[i] for i in row.tolist() if i != 0]  # noqa: E731
    val_numbers = {w for row in b.val.x for w in decode(row) if w.isdigit()}
    assert val_numbers == set() and any(w.isdigit() for row in b.train.x for w in decode(row))
    assert (b.val.x == 1).any()  # ... so they come out as <unk>
    # official test split, in file order (neg first), padded and truncated to seq_len
    assert b.test.y.tolist() == [0, 0, 1]
    assert decode(b.test.x[0]) == ["awful"] and b.test.x[0, 1:].eq(0).all()
    assert decode(b.test.x[1]) == ["bad"] * 12
    assert decode(b.test.x[2]) == ["great", "<unk>"]
    assert sorted(b.train.y.tolist() + b.val.y.tolist()) == [0] * 10 + [1] * 10
    assert tokenize("Don't<br />STOP, 42!") == ["don't", "stop", "42"]
    small = load("imdb", tmp_path, val_fraction=0.2, vocab_size=5)
    assert len(small.vocab) == 5 and small.input_shape == (256,)


# ----------------------------------------------------------------------------------------------------------
# California housing (scikit-learn's cache file)

def test_california_housing_cache_file(tmp_path):
    from sklearn.datasets import fetch_california_housing
    from sklearn.preprocessing import StandardScaler

    write_california(tmp_path, n=50)
    b = load("california_housing", tmp_path, val_fraction=0.2, test_fraction=0.2)
    assert (b.task, b.input_shape, b.n_outputs) == (REGRESSION, (8,), 1)
    assert [len(b.train), len(b.val), len(b.test)] == [30, 10, 10]
    x, y = fetch_california_housing(data_home=str(tmp_path / "california_housing"), download_if_missing=False,
                                    return_X_y=True)
    # undo the per-column standardisation on the union of the splits, then trace every row to sklearn's rows
    splits = (b.train, b.val, b.test)
    z = torch.cat([s.x for s in splits]).double()
    raw = torch.as_tensor(x)
    scale = raw.std(0) / z.std(0)
    dist, idx = torch.cdist(z * scale + (raw.mean(0) - z.mean(0) * scale), raw).min(1)
    assert dist.max() < 1e-3
    assert sorted(idx.tolist()) == list(range(50))  # the three splits partition the rows
    ids = torch.split(idx, [len(s) for s in splits])
    tr = ids[0].numpy()
    scaler = StandardScaler().fit(x[tr])  # fitted on the training rows only
    for s, i in zip(splits, ids):
        np.testing.assert_allclose(s.x.numpy(), scaler.transform(x[i.numpy()]), atol=1e-4)
        np.testing.assert_allclose(s.y.numpy(), (y[i.numpy()] - y[tr].mean()) / y[tr].std(), atol=1e-4)
    assert np.abs(b.test.x.double().mean(0).numpy()).max() > 1e-3


# ----------------------------------------------------------------------------------------------------------
# The standard-library character corpus (no files needed)

def test_stdlib_text_contiguous_splits_and_char_vocab():
    cfg = dict(seq_len=16, corpus_chars=20_000, val_fraction=0.1, test_fraction=0.1)
    b = load_data(DataConfig(name="stdlib_text", **cfg), 0)
    assert b.task == LANGUAGE_MODEL and DATASETS["stdlib_text"].files == ""
    assert isinstance(b.input_shape, TokenShape) and b.input_shape == (16,)
    assert b.n_outputs == len(b.vocab) == b.input_shape.vocab_size and b.vocab[0] == ""
    text = stdlib_corpus(20_000)
    assert len(text) == 20_000 and "import" in text
    chars = b.info["chars"]
    assert (chars["train"], chars["val"], chars["test"]) == (16_000, 2_000, 2_000)
    index = {c: i for i, c in enumerate(b.vocab) if c}
    encode = lambda text: torch.tensor([index.get(c, 0) for c in text])  # noqa: E731
    # train windows start at every position; x -> y is a shift by one character
    assert b.train.x.shape == (16_000 - 16, 16) and torch.equal(b.train.x[:, 1:], b.train.y[:, :-1])
    assert torch.equal(b.train.x[1:, :-1], b.train.x[:-1, 1:])  # window k + 1 is window k moved on by one
    # val/test: disjoint windows, each target character scored once
    assert b.val.x.shape == ((2_000 - 1) // 16, 16)
    assert torch.equal(b.val.x.reshape(-1)[1:], b.val.y.reshape(-1)[:-1])
    # each split is one contiguous stretch of the corpus read as a ring from a seeded offset: train, val, test
    ring = text[b.info["offset"]:] + text[:b.info["offset"]]
    assert torch.equal(torch.cat([b.train.x[:, 0], b.train.y[-1]]), encode(ring[:16_000]))
    n_val = b.val.x.numel()
    assert torch.equal(b.val.x.reshape(-1), encode(ring[16_000:16_000 + n_val]))
    assert torch.equal(b.test.x.reshape(-1), encode(ring[18_000:18_000 + b.test.x.numel()]))
    assert set(ring[:16_000]) == set(b.vocab[1:])  # vocabulary: the training split's characters
    other = load_data(DataConfig(name="stdlib_text", **cfg), 1)
    assert other.info["offset"] != b.info["offset"]
    same = load_data(DataConfig(name="stdlib_text", **cfg), 0)
    assert torch.equal(same.val.x, b.val.x)
    assert 2.0 < b.info["unigram_val_loss"] < 5.0
    with pytest.raises(RecipeError, match="raise data.corpus_chars or lower seq_len"):
        load_data(DataConfig(name="stdlib_text", seq_len=200, corpus_chars=1000, val_fraction=0.1), 0)


# ----------------------------------------------------------------------------------------------------------
# Missing files, the default root

@pytest.mark.parametrize("name", FILE_DATASETS)
def test_missing_files_are_one_line_recipe_errors(tmp_path, name):
    with pytest.raises(RecipeError) as info:
        load(name, tmp_path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"data.name = {name!r}: dataset files not found: expected")
    assert str(tmp_path) in message
    assert ("data.download = true" in message) == (name not in ("imagenet", "mini_imagenet"))


def test_cli_run_without_files_exits_2_and_writes_nothing(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[run]\nname = "x"\ndevice = "cpu"\n[data]\nname = "cifar10"\nroot = "{tmp_path}"\n'
                      f'[model]\nname = "resnet18"\ncifar_stem = true\n')
    proc = subprocess.run([sys.executable, "-m", "bcdcore", "run", str(recipe)], cwd=tmp_path, env=cli_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cifar-10-batches-py" in lines[0] and "data_batch_1" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("BCD_DATA", str(tmp_path / "d"))
    assert default_data_root() == tmp_path / "d" and data_root(DataConfig(name="mnist")) == tmp_path / "d"
    assert data_root(DataConfig(name="mnist", root="~/x")) == Path.home() / "x"
    monkeypatch.delenv("BCD_DATA")
    assert default_data_root() == Path.home() / ".cache" / "bcd" / "data"
    write_mnist(tmp_path / "env")
    monkeypatch.setenv("BCD_DATA", str(tmp_path / "env"))
    assert len(load_data(DataConfig(name="mnist_flat"), 0).test) == 20  # root "" finds the files there
