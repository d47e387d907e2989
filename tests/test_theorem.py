"""The theorem's quantities (issue 14): grad_norm, lambda = "auto" on the training objective, and the O(1/T)
bound of Algorithm 1 checked through the engine on random block quadratics."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bcdcore.cli import main
from bcdcore.data import load_data
from bcdcore.measure import GradNorm, HessianBlocks, MeasureContext, auto_lambda
from bcdcore.models import build_model
from bcdcore.params import FlatParams
from bcdcore.recipe import DataConfig, ModelConfig
from bcdcore.rundir import read_events

SIZES = [4, 3, 5]


def mse(out, y):
    return F.mse_loss(out.squeeze(-1), y)


def quadratic(seed: int, n_samples: int = 150):
    """The training split of the `quadratic` dataset as numpy, and A, b of f(w) = 1/2 w'Aw - b'w + const."""
    data = load_data(DataConfig(name="quadratic", n_samples=n_samples, n_features=sum(SIZES), noise=0.1,
                                val_fraction=0.0, test_fraction=0.0), seed)
    X, y = data.train.x.double().numpy(), data.train.y.double().numpy()
    return data, X, y, 2 * X.T @ X / len(X), 2 * X.T @ y / len(X)


def lbar_max(A: np.ndarray) -> float:
    o = np.cumsum([0] + SIZES)
    rows = []
    for i in range(len(SIZES)):
        sq = sum(np.linalg.svd(A[o[i]:o[i + 1], o[j]:o[j + 1]], compute_uv=False)[0] ** 2
                 for j in range(len(SIZES)) if j != i)
        rows.append(math.sqrt(sq))
    return max(rows)


def ctx_for(model, params, batch, tmp_path, train=None) -> MeasureContext:
    return MeasureContext(model=model, params=params, trainer=None, loss_fn=mse, batch=batch,
                          device=torch.device("cpu"), round=0, out_dir=tmp_path / "measurements", train=train)


@pytest.mark.parametrize("chunk", [1024, 37])
def test_grad_norm_is_the_full_gradient_of_the_mean_loss(tmp_path, chunk):
    data, X, y, A, b = quadratic(seed=3)
    model = build_model(ModelConfig(name="block_linear", widths=SIZES), (sum(SIZES),), 1, 3).double()
    params = FlatParams(model, model.blocks)
    params.grad.fill_(7.0)  # must stay as it is
    w = params.flat.detach().numpy().copy()
    train = (data.train.x.double(), data.train.y.double())
    result = GradNorm(batch_size=chunk).measure(ctx_for(model, params, train, tmp_path, train=train))
    grad = A @ w - b
    f = float(np.mean((X @ w - y) ** 2))
    assert result["value"] == pytest.approx(float(grad @ grad), rel=1e-10)
    assert result["loss"] == pytest.approx(f, rel=1e-12)
    o = np.cumsum([0] + SIZES)
    np.testing.assert_allclose(result["block_grad_sq"], [float(grad[o[i]:o[i + 1]] @ grad[o[i]:o[i + 1]])
                                                         for i in range(3)], rtol=1e-10)
    assert result["samples"] == len(X)
    assert torch.all(params.grad == 7.0)


def test_auto_lambda_train_mode_uses_batch_statistics_and_leaves_buffers(tmp_path):
    """On a BatchNorm CNN: the training-mode Hessian couplings equal those of a deep copy in training mode
    (double backward through it, dense), differ from eval mode's, and the model's statistics are untouched."""
    data = load_data(DataConfig(name="digits"), 0)
    model = build_model(ModelConfig(name="cnn", widths=[2, 2]), data.input_shape, 10, 0).double()
    params = FlatParams(model, model.blocks)
    x, y = data.train.x[:64].double(), data.train.y[:64]
    with torch.no_grad():  # statistics away from their initial values, so eval and train mode differ
        model.train()
        model(data.train.x[64:256].double() * 3.0 + 1.0)
    model.eval()
    buffers = [b.clone() for b in model.buffers()]
    ctx = MeasureContext(model=model, params=params, trainer=None, loss_fn=F.cross_entropy, batch=(x, y),
                         device=torch.device("cpu"), round=0, out_dir=tmp_path / "m")
    lams, result = auto_lambda(ctx, [(x, y)], HessianBlocks(mode="train", figure=False, tol=1e-8))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert not model.training
    eval_mode = HessianBlocks(mode="eval", figure=False, tol=1e-8).measure(ctx)

    twin = copy.deepcopy(model).train()
    blocks = [list(b.parameters()) for b in twin.blocks]
    leaves = [p for ps in blocks for p in ps]
    grads = torch.autograd.grad(F.cross_entropy(twin(x), y), leaves, create_graph=True)
    flat_grad = torch.cat([g.reshape(-1) for g in grads])
    hessian = torch.stack([torch.cat([h.reshape(-1) for h in torch.autograd.grad(flat_grad[k], leaves,
                                                                                  retain_graph=True)])
                           for k in range(len(flat_grad))])
    o = np.cumsum([0] + params.sizes)
    n = params.n_blocks
    sigma = np.array([[torch.linalg.svdvals(hessian[o[i]:o[i + 1], o[j]:o[j + 1]])[0].item() for j in range(n)]
                      for i in range(n)])
    np.testing.assert_allclose(result["value"], sigma, rtol=1e-4, atol=1e-10)
    off = sigma - np.diag(np.diag(sigma))
    expected = math.sqrt(n) * np.sqrt((off ** 2).sum(axis=1)).max()
    assert lams == pytest.approx([expected] * n, rel=1e-4)
    assert abs(np.array(eval_mode["value"]) - sigma).max() > 1e-3 * sigma.max()  # the mode matters here
    assert result["lambda_spread"] == 0.0 and result["batches"] == 1


RECIPE = """\
[run]
name = "bound"
seed = {seed}
device = "cpu"
rounds = {rounds}

[data]
name = "quadratic"
n_samples = 150
n_features = 12
noise = 0.1
val_fraction = 0.0
test_fraction = 0.0
batch_size = 1024

[model]
name = "block_linear"
widths = [4, 3, 5]

[algorithm]
mode = "blockwise"
schedule = "jacobi"
K = 300
lr = 0.1
lambda = "auto"
gamma = 1.0

[eval]
every = 0

[[measure]]
unit = "grad_norm"
every = 1
at_start = true
"""


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bound_holds_through_the_engine_on_random_block_quadratics(tmp_path, capsys, seed):
    """(1/T) sum_{t=1..T} ||grad f(x_t)||^2 <= 2 sqrt(n) Lbar_max (f(x_0) - f*) / T, x_t the point after t
    rounds, with lambda = "auto" (measured on the whole training objective), gamma = 1, near-exact block
    solves, full-batch gradients. (The sum runs over the rounds' results: with uncoupled blocks, Lbar = 0, one
    round reaches x* and the right side is 0, so no bound of this form can include ||grad f(x_0)||^2.)"""
    rounds = 8
    (tmp_path / "r.toml").write_text(RECIPE.format(seed=seed, rounds=rounds))
    assert main(["run", str(tmp_path / "r.toml"), "--runs-dir", str(tmp_path / "runs"), "--quiet"]) == 0
    run_dir = capsys.readouterr().out.split("run directory: ")[1].split()[0]
    _, X, y, A, b = quadratic(seed)
    lam_event = [e for e in read_events(run_dir, "measure") if e.get("purpose") == "lambda auto"][0]
    lbar = lbar_max(A)
    assert lam_event["lambda"] == pytest.approx([math.sqrt(3) * lbar] * 3, rel=1e-5)  # the objective's Lbar
    g = {e["round"]: e for e in read_events(run_dir, "measure") if e["unit"] == "grad_norm"}
    assert sorted(g) == list(range(rounds + 1))
    w_star = np.linalg.lstsq(X, y, rcond=None)[0]
    f_star = float(np.mean((X @ w_star - y) ** 2))
    for T in range(1, rounds + 1):
        mean_sq = sum(g[t]["value"] for t in range(1, T + 1)) / T
        bound = 2 * math.sqrt(3) * lbar * (g[0]["loss"] - f_star) / T
        assert mean_sq <= bound, (T, mean_sq, bound)
    metrics = read_events(run_dir, "metric")
    assert all(m["flops"] > 0 for m in metrics)


def test_grad_norm_on_a_seeded_subset(tmp_path):
    """samples = 50 of a larger split: the same 50 rows every time, and the closed form on exactly those."""
    data, _, _, _, _ = quadratic(seed=5)
    model = build_model(ModelConfig(name="block_linear", widths=SIZES), (sum(SIZES),), 1, 5).double()
    params = FlatParams(model, model.blocks)
    train = (data.train.x.double(), data.train.y.double())
    ctx = ctx_for(model, params, train, tmp_path, train=train)
    first, again = GradNorm(samples=50, seed=4).measure(ctx), GradNorm(samples=50, seed=4).measure(ctx)
    assert first == again and first["samples"] == 50
    idx = torch.randperm(len(train[0]), generator=torch.Generator().manual_seed(4))[:50]
    X, y = train[0][idx].numpy(), train[1][idx].numpy()
    w = params.flat.detach().numpy()
    grad = 2 * X.T @ (X @ w - y) / 50
    assert first["value"] == pytest.approx(float(grad @ grad), rel=1e-10)
    assert first["loss"] == pytest.approx(float(np.mean((X @ w - y) ** 2)), rel=1e-12)
