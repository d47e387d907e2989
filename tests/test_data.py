"""Tests for bcdcore.data: shapes, seeded splits, train-only scalers, synthetic data."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_diabetes, load_digits
from sklearn.preprocessing import StandardScaler

from bcdcore.data import LOADERS, DataBundle, Split, load_data
from bcdcore.recipe import CLASSIFICATION, DATASETS, REGRESSION, DataConfig

DIGITS = load_digits()
DIAB_X, DIAB_Y = load_diabetes(return_X_y=True, scaled=False)

EXPECTED = {  # name -> (task, input_shape, n_outputs, N with default n_samples)
    "digits": (CLASSIFICATION, (1, 8, 8), 10, 1797),
    "digits_flat": (CLASSIFICATION, (64,), 10, 1797),
    "diabetes": (REGRESSION, (10,), 1, 442),
    "toy_regression": (REGRESSION, (20,), 1, 1000),
    "quadratic": (REGRESSION, (20,), 1, 1000),
}


def splits(b: DataBundle) -> tuple[Split, Split, Split]:
    return b.train, b.val, b.test


def recover_indices(b: DataBundle, raw: np.ndarray, tol: float = 1e-3) -> list[np.ndarray]:
    """Row indices into ``raw`` of every split, undoing any per-feature affine scaling.

    The union of the splits is the whole data set, so the scaling's shift and scale follow from comparing
    the union's per-feature mean/std with the raw data's; then each row is matched to its nearest raw row.
    """
    raw = torch.as_tensor(raw, dtype=torch.float64).reshape(len(raw), -1)
    parts = [s.x.reshape(len(s), -1).to(torch.float64) for s in splits(b)]
    z = torch.cat(parts)
    assert z.shape == raw.shape
    z_std = z.std(0, correction=0)
    scale = torch.where(z_std > 1e-6, raw.std(0, correction=0) / z_std.clamp_min(1e-12), torch.ones_like(z_std))
    rec = z * scale + (raw.mean(0) - z.mean(0) * scale)
    dist = torch.cdist(rec, raw)
    best, idx = dist.min(1)
    assert best.max().item() < tol, f"a split row matches no raw row (distance {best.max().item()})"
    return [p.numpy() for p in torch.split(idx, [len(p) for p in parts])]


# ----------------------------------------------------------------------------------------------------------
# Interface

def test_registry_covers_every_recipe_dataset():
    assert set(LOADERS) == set(DATASETS)
    # the embedded datasets tested here are the ones that need no files (the file-backed ones: test_zoo_data)
    assert set(EXPECTED) == {n for n, spec in DATASETS.items() if not spec.files} - {"stdlib_text"}


def test_unknown_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown dataset 'mnist2'"):
        load_data(DataConfig(name="mnist2"), 0)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shapes_and_dtypes(name):
    task, shape, n_out, n = EXPECTED[name]
    b = load_data(DataConfig(name=name, val_fraction=0.1, test_fraction=0.2), seed=0)
    assert (b.name, b.task, b.input_shape, b.n_outputs) == (name, task, shape, n_out)
    assert b.task == DATASETS[name].task
    assert sum(len(s) for s in splits(b)) == n
    for s in splits(b):
        assert s.x.dtype == torch.float32 and s.x.device.type == "cpu"
        assert tuple(s.x.shape) == (len(s), *shape)
        assert s.y.shape == (len(s),)
        assert s.y.dtype == (torch.int64 if task == CLASSIFICATION else torch.float32)
        assert torch.isfinite(s.x).all() and (task == CLASSIFICATION or torch.isfinite(s.y).all())
    if task == CLASSIFICATION:
        assert set(b.train.y.unique().tolist()) == set(range(10))


# ----------------------------------------------------------------------------------------------------------
# Splits

@pytest.mark.parametrize("name,raw", [("digits", DIGITS.images), ("digits_flat", DIGITS.data), ("diabetes", DIAB_X)])
def test_splits_partition_the_data_with_the_requested_sizes(name, raw):
    n = len(raw)
    b = load_data(DataConfig(name=name, val_fraction=0.15, test_fraction=0.25), seed=3)
    assert (len(b.val), len(b.test)) == (round(0.15 * n), round(0.25 * n))
    assert len(b.train) == n - round(0.15 * n) - round(0.25 * n)
    idx = recover_indices(b, raw)
    # every raw sample lands in exactly one split: no overlap, nothing lost
    assert np.array_equal(np.sort(np.concatenate(idx)), np.arange(n))
    for a in range(3):
        for c in range(a + 1, 3):
            assert not set(idx[a]) & set(idx[c])
    if name != "diabetes":
        for s, i in zip(splits(b), idx):
            assert np.array_equal(s.y.numpy(), DIGITS.target[i])


def test_synthetic_splits_partition_the_generated_rows():
    cfg = DataConfig(name="toy_regression", n_samples=300, n_features=5, val_fraction=0.1, test_fraction=0.3)
    whole = load_data(DataConfig(name="toy_regression", n_samples=300, n_features=5, val_fraction=0.0,
                                 test_fraction=0.0), seed=4).train
    b = load_data(cfg, seed=4)
    assert [len(s) for s in splits(b)] == [180, 30, 90]
    idx = recover_indices(b, whole.x.numpy(), tol=1e-6)
    assert np.array_equal(np.sort(np.concatenate(idx)), np.arange(300))
    for s, i in zip(splits(b), idx):
        assert torch.equal(s.y, whole.y[i])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_same_seed_gives_identical_tensors(name):
    cfg = DataConfig(name=name)
    a, b = load_data(cfg, seed=11), load_data(cfg, seed=11)
    for sa, sb in zip(splits(a), splits(b)):
        assert torch.equal(sa.x, sb.x) and torch.equal(sa.y, sb.y)


@pytest.mark.parametrize("name,raw", [("digits_flat", DIGITS.data), ("diabetes", DIAB_X)])
def test_different_seed_gives_a_different_split(name, raw):
    cfg = DataConfig(name=name)
    i0 = recover_indices(load_data(cfg, seed=0), raw)
    i1 = recover_indices(load_data(cfg, seed=1), raw)
    assert len(i0[2]) == len(i1[2])
    overlap = len(set(i0[2]) & set(i1[2])) / len(i0[2])
    assert overlap < 0.5  # two random 20% test sets share ~20% of their rows


def test_stratification_keeps_class_proportions():
    cfg = DataConfig(name="digits_flat", val_fraction=0.1, test_fraction=0.2)
    b = load_data(cfg, seed=5)
    overall = np.bincount(DIGITS.target, minlength=10)
    for s, frac in ((b.test, 0.2), (b.val, 0.1), (b.train, 0.7)):
        counts = np.bincount(s.y.numpy(), minlength=10)
        # stratified: each class within rounding of its share; an unstratified 10% split is off by ~4
        assert np.abs(counts - frac * overall).max() <= 2, (frac, counts, frac * overall)


def test_empty_splits_when_fractions_are_zero():
    b = load_data(DataConfig(name="digits", val_fraction=0.0, test_fraction=0.2), seed=0)
    assert len(b.val) == 0 and b.val.x.shape == (0, 1, 8, 8) and b.val.y.dtype == torch.int64
    assert len(b.train) + len(b.test) == 1797 and len(b.test) == round(0.2 * 1797)
    b = load_data(DataConfig(name="diabetes", val_fraction=0.0, test_fraction=0.0), seed=0)
    assert len(b.train) == 442 and len(b.val) == len(b.test) == 0
    assert b.test.x.shape == (0, 10) and b.test.y.dtype == torch.float32


def test_tiny_classification_split_falls_back_without_error():
    # 4 validation samples cannot hold all 10 classes; sklearn's stratified split would raise
    b = load_data(DataConfig(name="digits_flat", val_fraction=0.002, test_fraction=0.2), seed=0)
    assert len(b.val) == 4 and len(b.train) + len(b.val) + len(b.test) == 1797


def test_no_training_data_left_is_an_error():
    with pytest.raises(ValueError, match="leave no training data"):
        load_data(DataConfig(name="toy_regression", n_samples=20, val_fraction=0.5, test_fraction=0.5), 0)


def test_global_random_state_is_untouched():
    np_state, torch_state = np.random.get_state(), torch.get_rng_state()
    for name in EXPECTED:
        load_data(DataConfig(name=name), seed=7)
    after = np.random.get_state()
    assert all(np.array_equal(a, c) if isinstance(a, np.ndarray) else a == c for a, c in zip(np_state, after))
    assert torch.equal(torch_state, torch.get_rng_state())


# ----------------------------------------------------------------------------------------------------------
# Scaling

def test_digits_flat_scaler_is_fitted_on_train_only():
    b = load_data(DataConfig(name="digits_flat", val_fraction=0.2, test_fraction=0.3), seed=2)
    idx = recover_indices(b, DIGITS.data)
    scaler = StandardScaler().fit(DIGITS.data[idx[0]])
    for s, i in zip(splits(b), idx):
        np.testing.assert_allclose(s.x.numpy(), scaler.transform(DIGITS.data[i]), atol=1e-5)
    tr = b.train.x.double()
    varying = DIGITS.data[idx[0]].std(0) > 0
    np.testing.assert_allclose(tr.mean(0).numpy(), 0.0, atol=1e-6)
    np.testing.assert_allclose(tr.std(0, correction=0).numpy()[varying], 1.0, atol=1e-5)
    # val/test use the train statistics, so they are not themselves exactly standardized
    assert np.abs(b.test.x.double().mean(0).numpy()).max() > 1e-3


def test_digits_single_mean_std_from_train_pixels():
    b = load_data(DataConfig(name="digits", val_fraction=0.1, test_fraction=0.2), seed=1)
    idx = recover_indices(b, DIGITS.images)
    train_pixels = DIGITS.images[idx[0]]
    mean, std = train_pixels.mean(), train_pixels.std()
    for s, i in zip(splits(b), idx):
        np.testing.assert_allclose(s.x.numpy()[:, 0], (DIGITS.images[i] - mean) / std, atol=1e-5)
    assert abs(b.train.x.double().mean().item()) < 1e-6
    assert abs(b.train.x.double().std(correction=0).item() - 1.0) < 1e-5


def test_digits_resize_and_channel_repeat():
    cfg = DataConfig(name="digits", image_size=16, channels=3)
    b = load_data(cfg, seed=0)
    assert b.input_shape == (3, 16, 16) and b.n_outputs == 10
    for s in splits(b):
        assert tuple(s.x.shape[1:]) == (3, 16, 16)
        assert torch.equal(s.x[:, 0], s.x[:, 1]) and torch.equal(s.x[:, 0], s.x[:, 2])
    # same seed, same split as the native 8x8 version: resize the raw images ourselves and compare
    idx = recover_indices(load_data(DataConfig(name="digits"), seed=0), DIGITS.images)
    big = F.interpolate(torch.tensor(DIGITS.images, dtype=torch.float64).unsqueeze(1), size=(16, 16),
                        mode="bilinear", align_corners=False)
    mean, std = big[idx[0]].mean(), big[idx[0]].std(correction=0)
    for s, i in zip(splits(b), idx):
        torch.testing.assert_close(s.x[:, :1], ((big[i] - mean) / std).float(), atol=1e-5, rtol=0)
    assert abs(b.train.x.double().mean().item()) < 1e-6


def test_diabetes_features_and_target_standardized_with_train_statistics():
    b = load_data(DataConfig(name="diabetes", val_fraction=0.1, test_fraction=0.2), seed=0)
    idx = recover_indices(b, DIAB_X)
    scaler = StandardScaler().fit(DIAB_X[idx[0]])
    y_mean, y_std = DIAB_Y[idx[0]].mean(), DIAB_Y[idx[0]].std()
    assert y_std > 10  # raw targets are in the tens to hundreds
    for s, i in zip(splits(b), idx):
        np.testing.assert_allclose(s.x.numpy(), scaler.transform(DIAB_X[i]), atol=1e-5)
        np.testing.assert_allclose(s.y.numpy(), (DIAB_Y[i] - y_mean) / y_std, atol=1e-5)
    assert abs(b.train.y.double().mean().item()) < 1e-6
    assert abs(b.train.y.double().std(correction=0).item() - 1.0) < 1e-5


# ----------------------------------------------------------------------------------------------------------
# Synthetic regression

def _lstsq(split: Split) -> tuple[torch.Tensor, float]:
    x, y = split.x.double(), split.y.double()
    w = torch.linalg.lstsq(x, y.unsqueeze(1)).solution.squeeze(1)
    return w, (x @ w - y).pow(2).mean().sqrt().item()


@pytest.mark.parametrize("name", ["toy_regression", "quadratic"])
def test_linear_model_explains_y_up_to_noise(name):
    cfg = DataConfig(name=name, n_samples=2000, n_features=8, noise=0.1, val_fraction=0.0, test_fraction=0.25)
    b = load_data(cfg, seed=0)
    assert b.input_shape == (8,) and len(b.train) == 1500 and len(b.test) == 500
    w, rms = _lstsq(b.train)
    assert 0.09 < rms < 0.11
    assert b.train.y.double().std().item() > 0.5  # the signal dominates the noise
    test_rms = (b.test.x.double() @ w - b.test.y.double()).pow(2).mean().sqrt().item()
    assert 0.08 < test_rms < 0.12  # the same w generated the test rows
    noiseless = load_data(DataConfig(name=name, n_samples=200, n_features=8, noise=0.0), seed=0)
    assert _lstsq(noiseless.train)[1] < 1e-5


def test_toy_regression_features_are_standard_normal():
    b = load_data(DataConfig(name="toy_regression", n_samples=4000, n_features=10), seed=0)
    x = b.train.x.double()
    assert x.mean(0).abs().max().item() < 0.1 and (x.std(0) - 1).abs().max().item() < 0.1
    corr = torch.corrcoef(x.T) - torch.eye(10, dtype=torch.float64)
    assert corr.abs().max().item() < 0.1


def test_quadratic_features_are_coupled():
    cfg = DataConfig(name="quadratic", n_samples=4000, n_features=10)
    x = load_data(cfg, seed=0).train.x.double()
    corr = torch.corrcoef(x.T) - torch.eye(10, dtype=torch.float64)
    # blocks of w interact through off-diagonal X^T X terms; independent features would give |corr| < 0.1
    assert corr.abs().max().item() > 0.15


def test_synthetic_options_are_honoured():
    b = load_data(DataConfig(name="quadratic", n_samples=50, n_features=3, val_fraction=0.0,
                             test_fraction=0.2), seed=0)
    assert b.input_shape == (3,) and len(b.train) == 40 and len(b.test) == 10
