"""Measurement plugins (bcdcore.measure) checked against dense computations.

Quadratics loss = x^T A x have the Hessian A + A^T exactly (whatever the data), so the dense and block-wise
Hessian measurements are compared with analytic blocks; a small MLP is compared with a dense autograd Hessian.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bcdcore.algorithm import BlockwiseTrainer, EntireTrainer
from bcdcore.data.batches import BatchStream
from bcdcore.measure import (
    BUILTIN,
    HessianBlocks,
    HessianDense,
    MeasureContext,
    Measurement,
    MemoryUsage,
    auto_lambda,
    block_sigma_max,
    load_unit,
)
from bcdcore.models import build_model
from bcdcore.params import FlatParams
from bcdcore.recipe import AlgorithmConfig, ModelConfig

# ----------------------------------------------------------------------------------------------------------
# fixtures: quadratic block models


class Vec(nn.Module):
    def __init__(self, n: int, generator: torch.Generator) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(n, generator=generator, dtype=torch.float64))


class QuadModel(nn.Module):
    """Blocks that are plain parameter vectors; the output is x = all parameters, concatenated."""

    def __init__(self, sizes: list[int], seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.blocks = nn.ModuleList(Vec(n, g) for n in sizes)

    def forward(self, inputs):
        return torch.cat([b.w for b in self.blocks])


def quadratic_loss(a: torch.Tensor):
    return lambda out, y: out @ a @ out  # ignores the data: the Hessian is a + a^T


def make_ctx(model, params, loss_fn, tmp_path, *, trainer=None, batch=None, round=0) -> MeasureContext:
    out = tmp_path / "measurements"
    out.mkdir(exist_ok=True)
    if batch is None:
        batch = (torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    return MeasureContext(model=model, params=params, trainer=trainer, loss_fn=loss_fn, batch=batch,
                          device=torch.device("cpu"), round=round, out_dir=out)


def quadratic_ctx(a: torch.Tensor, sizes: list[int], tmp_path, **kw):
    model = QuadModel(sizes)
    params = FlatParams(model, model.blocks)
    return make_ctx(model, params, quadratic_loss(a), tmp_path, **kw)


def orthonormal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))
    return q


SIZES = [3, 6, 4]  # unequal blocks


def adversarial_hessian(seed: int = 1) -> torch.Tensor:
    """A symmetric H whose blocks defeat a power iteration on the paired operator [[0, B], [B^T, 0]]:
    H_00 has eigenvalues +4 and -4 (sigma_max 4 attained by both signs), H_01 has two equal top singular values
    (3, 3, 0.5), H_22's sigma_max 6 is the magnitude of its negative eigenvalue -6. The rest is random."""
    g = torch.Generator().manual_seed(seed)
    n = sum(SIZES)
    r = torch.randn(n, n, generator=g, dtype=torch.float64) * 0.4
    h = r + r.T
    o = np.concatenate([[0], np.cumsum(SIZES)])
    b = [slice(int(o[i]), int(o[i + 1])) for i in range(len(SIZES))]
    q0 = orthonormal(3, 3, g)
    h[b[0], b[0]] = q0 @ torch.diag(torch.tensor([4.0, -4.0, 0.3], dtype=torch.float64)) @ q0.T
    h01 = orthonormal(3, 3, g) @ torch.diag(torch.tensor([3.0, 3.0, 0.5], dtype=torch.float64)) @ orthonormal(6, 3, g).T
    h[b[0], b[1]] = h01
    h[b[1], b[0]] = h01.T
    q2 = orthonormal(4, 4, g)
    h[b[2], b[2]] = q2 @ torch.diag(torch.tensor([-6.0, 1.0, 2.0, 0.5], dtype=torch.float64)) @ q2.T
    return h


def nonsymmetric_a(h: torch.Tensor, seed: int = 2) -> torch.Tensor:
    """A non-symmetric A with A + A^T = h."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(h.shape, generator=g, dtype=torch.float64)
    return h / 2 + (r - r.T)


def analytic_blocks(h: torch.Tensor, sizes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    o = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    n = len(sizes)
    sigma = np.array([[torch.linalg.svdvals(h[o[i]:o[i + 1], o[j]:o[j + 1]])[0].item() for j in range(n)]
                      for i in range(n)])
    off = sigma * (1 - np.eye(n))
    return sigma, np.sqrt((off ** 2).sum(axis=1))


def naive_paired_power(b: torch.Tensor, iterations: int, seed: int = 0) -> float:
    """The biased estimator: power iteration on [[0, B], [B^T, 0]] with the Rayleigh quotient."""
    m, n = b.shape
    paired = torch.zeros(m + n, m + n, dtype=torch.float64)
    paired[:m, m:] = b
    paired[m:, :m] = b.T
    x = torch.randn(m + n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = x / x.norm()
    for _ in range(iterations):
        y = paired @ x
        x = y / y.norm()
    return float(x @ paired @ x)


# ----------------------------------------------------------------------------------------------------------
# hessian_dense


@pytest.mark.parametrize("symmetric", [True, False])
def test_hessian_dense_equals_a_plus_a_transpose(tmp_path, symmetric):
    n = sum(SIZES)
    g = torch.Generator().manual_seed(3)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    if symmetric:
        a = a + a.T  # then the Hessian is exactly 2A
    ctx = quadratic_ctx(a, SIZES, tmp_path, round=4)
    result = HessianDense().measure(ctx)
    h = np.array(result["value"])
    expected = (a + a.T).numpy()
    if symmetric:
        expected = 2 * a.numpy()
    assert h.shape == (n, n)
    np.testing.assert_allclose(h, expected, rtol=0, atol=1e-7 * np.abs(expected).max())
    assert result["array"] == "measurements/hessian_dense_r4.npy"
    np.testing.assert_array_equal(np.load(tmp_path / result["array"]), h)
    assert (tmp_path / result["figure"]).read_bytes()[:4] == b"\x89PNG"
    assert result["block_offsets"] == [0, 3, 9, 13]


def test_hessian_dense_refuses_too_large_model(tmp_path):
    ctx = quadratic_ctx(torch.eye(301, dtype=torch.float64), [150, 151], tmp_path)
    with pytest.raises(ValueError) as err:
        HessianDense().measure(ctx)
    message = str(err.value)
    assert "301 parameters" in message and "limit of 300" in message and "\n" not in message
    with pytest.raises(ValueError, match="13 parameters, above the limit of 12"):
        HessianDense(max_params=12).measure(quadratic_ctx(torch.eye(13, dtype=torch.float64), SIZES, tmp_path))
    assert not list((tmp_path / "measurements").iterdir())  # refused before writing anything


# ----------------------------------------------------------------------------------------------------------
# hessian_blocks on quadratics


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_hessian_blocks_match_dense_svd_where_paired_operator_is_biased(tmp_path, method):
    h = adversarial_hessian()
    ctx = quadratic_ctx(nonsymmetric_a(h), SIZES, tmp_path, round=2)
    unit = HessianBlocks(method=method)
    result = unit.measure(ctx)
    sigma, row_norms = analytic_blocks(h, SIZES)
    got = np.array(result["value"])
    assert got.shape == (3, 3)
    np.testing.assert_allclose(got, sigma, rtol=0.01)
    np.testing.assert_allclose(result["row_norms"], row_norms, rtol=0.01)
    assert result["converged"]
    # The constructed values are what the test is about.
    assert sigma[0, 0] == pytest.approx(4.0) and sigma[0, 1] == pytest.approx(3.0)
    assert sigma[2, 2] == pytest.approx(6.0)
    # The same pairs, estimated naively on the paired operator with at least our budget, are off by > 1%.
    budget = 200
    o = [0, 3, 9, 13]
    for i, j in [(0, 0), (0, 1), (2, 2)]:
        assert result["iterations"][i][j] <= budget
        naive = naive_paired_power(h[o[i]:o[i + 1], o[j]:o[j + 1]], budget)
        assert abs(naive - sigma[i, j]) / sigma[i, j] > 0.01, (i, j, naive)
        assert abs(got[i, j] - sigma[i, j]) / sigma[i, j] < 0.01


def test_hessian_blocks_symmetry_halves_the_work(tmp_path):
    h = adversarial_hessian(seed=5)
    ctx = quadratic_ctx(h / 2, SIZES, tmp_path)
    result = HessianBlocks().measure(ctx)
    got = np.array(result["value"])
    np.testing.assert_array_equal(got, got.T)
    # Two products (H_ij v, H_ji u) per iteration, for the 6 pairs i <= j only.
    its = np.array(result["iterations"])
    assert result["hvp"] <= sum(2 * its[i, j] + 1 for i in range(3) for j in range(i, 3))


@pytest.mark.parametrize("shape", [(3, 20), (20, 3), (1, 7), (9, 9)])
@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_block_sigma_max_on_rectangular_operators(shape, method):
    g = torch.Generator().manual_seed(7)
    b = torch.randn(shape, generator=g, dtype=torch.float64)
    s, its, ok = block_sigma_max(lambda v: b @ v, lambda u: b.T @ u, shape[1], shape[0],
                                 generator=torch.Generator().manual_seed(0), method=method, tol=1e-6)
    assert ok
    assert s == pytest.approx(torch.linalg.svdvals(b)[0].item(), rel=1e-4)
    zero = torch.zeros(shape, dtype=torch.float64)
    assert block_sigma_max(lambda v: zero @ v, lambda u: zero.T @ u, shape[1], shape[0],
                           generator=torch.Generator(), method=method)[0] == 0.0


def test_hessian_blocks_deterministic_and_leaves_global_rng(tmp_path):
    h = adversarial_hessian(seed=9)
    ctx = quadratic_ctx(h / 2, SIZES, tmp_path)
    state = torch.get_rng_state()
    first = HessianBlocks(seed=3).measure(ctx)
    second = HessianBlocks(seed=3).measure(ctx)
    assert torch.equal(state, torch.get_rng_state())
    assert first["value"] == second["value"] and first["iterations"] == second["iterations"]


def test_auto_lambda_is_sqrt_n_times_largest_row_norm(tmp_path):
    h = adversarial_hessian(seed=11)
    ctx = quadratic_ctx(nonsymmetric_a(h), SIZES, tmp_path, round=0)
    lams, result = auto_lambda(ctx)
    _, row_norms = analytic_blocks(h, SIZES)
    expected = math.sqrt(3) * row_norms.max()
    assert len(lams) == 3 and all(lam == lams[0] for lam in lams)
    assert lams[0] == pytest.approx(expected, rel=0.01)
    assert lams[0] == pytest.approx(math.sqrt(3) * max(result["row_norms"]), rel=1e-12)
    assert (tmp_path / result["figure"]).exists()
    # One block: no coupling, lambda 0.
    one = quadratic_ctx(torch.eye(4, dtype=torch.float64), [4], tmp_path)
    assert auto_lambda(one)[0] == [0.0]


def test_heat_map_is_written_per_round(tmp_path):
    ctx = quadratic_ctx(adversarial_hessian() / 2, SIZES, tmp_path, round=7)
    result = HessianBlocks().measure(ctx)
    assert result["figure"] == "measurements/hessian_blocks_r7.png"
    data = (tmp_path / result["figure"]).read_bytes()
    assert data[:4] == b"\x89PNG" and len(data) > 5000
    np.testing.assert_array_equal(np.load(tmp_path / result["array"]), np.array(result["value"]))


# ----------------------------------------------------------------------------------------------------------
# a small MLP against a dense autograd Hessian


def dense_autograd_hessian(model, params, loss_fn, batch) -> torch.Tensor:
    """torch.autograd.functional.hessian of the loss over the flat parameter vector, float64, eval mode."""
    names = {id(p): name for name, p in model.named_parameters()}
    order = [(names[id(p)], p.shape, p.numel()) for ps in params.block_params for p in ps]
    x, y = batch
    x = x.double()

    def f(flat):
        feed, offset = {}, 0
        for name, shape, n in order:
            feed[name] = flat[offset:offset + n].view(shape)
            offset += n
        return loss_fn(torch.func.functional_call(model, feed, (x,)), y)

    was = model.training
    model.eval()
    try:
        return torch.autograd.functional.hessian(f, params.flat.detach().double().clone(), vectorize=True)
    finally:
        model.train(was)


@pytest.mark.parametrize("widths", [[5], [6, 5]])
def test_mlp_block_sigmas_match_dense_autograd_hessian(tmp_path, widths):
    model = build_model(ModelConfig(name="mlp", widths=widths), (4,), 3, seed=0)
    params = FlatParams(model, model.blocks)
    assert params.flat.numel() < 300
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g))
    dense = dense_autograd_hessian(model, params, F.cross_entropy, batch)
    sigma, row_norms = analytic_blocks(dense, params.sizes)
    assert np.all(sigma > 1e-3)  # every block couples: a relative comparison means something
    ctx = make_ctx(model, params, F.cross_entropy, tmp_path, batch=batch)
    result = HessianBlocks().measure(ctx)  # in the parameters' dtype, float32
    np.testing.assert_allclose(np.array(result["value"]), sigma, rtol=0.01)
    np.testing.assert_allclose(result["row_norms"], row_norms, rtol=0.01)
    # The dense finite-difference unit agrees with autograd entry by entry.
    fd = np.array(HessianDense().measure(ctx)["value"])
    np.testing.assert_allclose(fd, dense.numpy(), rtol=0, atol=1e-5 * np.abs(dense.numpy()).max())


# ----------------------------------------------------------------------------------------------------------
# models with BatchNorm: statistics, parameters, gradients and train flags untouched


def trained_cnn():
    model = build_model(ModelConfig(name="cnn", widths=[2, 3]), (1, 8, 8), 3, seed=0)
    params = FlatParams(model, model.blocks)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
    model.train()
    with torch.no_grad():
        model(x * 3 + 1)  # running statistics away from their initial values
    params.grad.copy_(torch.randn(params.grad.shape, generator=g))
    return model, params, (x, y)


def model_state(model, params):
    return (params.flat.clone(), params.grad.clone(), [b.clone() for b in model.buffers()],
            [m.training for m in model.modules()])


def assert_same_state(before, after):
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert len(before[2]) == len(after[2]) and all(torch.equal(a, b) for a, b in zip(before[2], after[2]))
    assert before[3] == after[3]


@pytest.mark.parametrize("unit", [HessianBlocks(max_iter=12), HessianDense()])
def test_batchnorm_statistics_untouched_on_a_cnn(tmp_path, unit):
    model, params, batch = trained_cnn()
    assert params.flat.numel() <= 300
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    model.blocks[1].eval()  # a mixed state must come back as it was
    before = model_state(model, params)
    result = unit.measure(make_ctx(model, params, F.cross_entropy, tmp_path, batch=batch))
    assert_same_state(before, model_state(model, params))
    value = np.array(result["value"])
    assert np.all(np.isfinite(value))
    if isinstance(unit, HessianBlocks):
        assert value.shape == (3, 3) and np.all(value > 0)
        # Measured in eval mode: the loss it saw is the eval-mode loss, not the train-mode (batch statistics) one.
        model.eval()
        with torch.no_grad():
            eval_loss = F.cross_entropy(model(batch[0]), batch[1]).item()
        model.train()
        model.blocks[1].eval()
        assert result["loss"] == pytest.approx(eval_loss, rel=1e-5)
        with torch.no_grad():
            snapshot = params.snapshot_buffers()
            train_loss = F.cross_entropy(model(batch[0]), batch[1]).item()
            params.restore_buffers(snapshot)
        assert abs(train_loss - eval_loss) > 1e-3


# ----------------------------------------------------------------------------------------------------------
# memory


def mlp_setup():
    model = build_model(ModelConfig(name="mlp", widths=[16, 8]), (10,), 3, seed=0)
    params = FlatParams(model, model.blocks)
    x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
    return model, params, x, y


@pytest.mark.parametrize("mode,solver,schedule,n_state,n_algorithm", [
    ("blockwise", "momentum", "jacobi", 1, 2),
    ("blockwise", "adam", "gauss_seidel", 2, 1),
    ("blockwise", "sgd", "jacobi", 0, 2),
    ("entire", "momentum", "jacobi", 1, 1),  # entire keeps the round-start point as the ops need an anchor
])
def test_memory_reports_byte_counts(tmp_path, mode, solver, schedule, n_state, n_algorithm):
    model, params, x, y = mlp_setup()
    cfg = AlgorithmConfig(mode=mode, solver=solver, schedule=schedule, K=2, lr=0.01)
    if mode == "entire":
        trainer = EntireTrainer(model, params, F.cross_entropy, BatchStream(x, y, 16, 0), cfg, "reference")
    else:
        n = params.n_blocks
        trainer = BlockwiseTrainer(model, params, F.cross_entropy, [BatchStream(x, y, 16, i) for i in range(n)],
                                   cfg, [0.1] * n, [1.0] * n, "reference", 0)
    trainer.run_round(0)
    numel = sum(p.numel() for p in model.parameters())
    assert numel == 10 * 16 + 16 + 16 * 8 + 8 + 8 * 3 + 3
    result = MemoryUsage().measure(make_ctx(model, params, F.cross_entropy, tmp_path, trainer=trainer))
    fp32 = 4
    assert result["parameters"] == numel * fp32
    assert result["gradients"] == numel * fp32
    assert result["solver_state"] == n_state * numel * fp32
    assert result["algorithm_buffers"] == n_algorithm * numel * fp32
    assert result["model_buffers"] == 0
    assert result["value"] == (3 + n_state + n_algorithm) * numel * fp32 - numel * fp32
    assert result["peak_source"] == "ru_maxrss"
    # Bytes, not KiB: this process (torch loaded) holds well over 50 MB.
    assert result["peak_bytes"] > 50e6 and result["peak_bytes"] > result["value"]


def test_memory_counts_batchnorm_buffers(tmp_path):
    model, params, _ = trained_cnn()
    result = MemoryUsage().measure(make_ctx(model, params, F.cross_entropy, tmp_path, trainer=None))
    bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    # running_mean, running_var (fp32, one per channel) and num_batches_tracked (int64)
    assert result["model_buffers"] == sum(2 * m.num_features * 4 + 8 for m in bn) == (2 * 2 * 4 + 8) + (2 * 3 * 4 + 8)
    assert result["solver_state"] == result["algorithm_buffers"] == 0
    assert result["value"] == 2 * params.flat.numel() * 4 + result["model_buffers"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_memory_peak_on_cuda_and_hessian_blocks_on_gpu(tmp_path):
    device = torch.device("cuda")
    model, params, _, _ = mlp_setup()
    model.to(device)
    params = FlatParams(model, model.blocks)
    ctx = make_ctx(model, params, F.cross_entropy, tmp_path)
    ctx.device = device
    g = torch.Generator().manual_seed(0)
    ctx.batch = (torch.randn(32, 10, generator=g).to(device), torch.randint(0, 3, (32,), generator=g).to(device))
    result = MemoryUsage().measure(ctx)
    assert result["peak_source"] == "cuda_max_memory_allocated"
    assert result["peak_bytes"] >= result["parameters"] + result["gradients"]
    on_gpu = HessianBlocks().measure(ctx)
    model.cpu()
    cpu_params = FlatParams(model, model.blocks)
    cpu_ctx = make_ctx(model, cpu_params, F.cross_entropy, tmp_path, batch=tuple(t.cpu() for t in ctx.batch))
    np.testing.assert_allclose(np.array(on_gpu["value"]), np.array(HessianBlocks().measure(cpu_ctx)["value"]),
                               rtol=0.01)


# ----------------------------------------------------------------------------------------------------------
# loading units


class CustomUnit:
    name = "custom"

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def measure(self, ctx: MeasureContext) -> dict:
        return {"value": self.scale * ctx.params.flat.numel()}


class NotAUnit:
    pass


def test_load_unit_resolves_builtins_and_dotted_paths(tmp_path):
    assert set(BUILTIN) == {"memory", "hessian_dense", "hessian_blocks", "grad_norm"}
    for name, cls in BUILTIN.items():
        unit = load_unit(name)
        assert isinstance(unit, cls) and unit.name == name and isinstance(unit, Measurement)
    assert load_unit("hessian_dense", max_params=10).max_params == 10
    ctx = quadratic_ctx(torch.eye(13, dtype=torch.float64), SIZES, tmp_path)
    for path in (f"{__name__}:CustomUnit", f"{__name__}.CustomUnit"):
        unit = load_unit(path)
        assert isinstance(unit, CustomUnit) and unit.name == "custom"
        assert unit.measure(ctx) == {"value": 13}
    assert load_unit(f"{__name__}:CustomUnit", scale=2.0).measure(ctx) == {"value": 26.0}


@pytest.mark.parametrize("unit,message", [
    ("hessian_block", "unknown measure unit 'hessian_block' (did you mean 'hessian_blocks'?); built-in units: "
                      "memory, hessian_dense, hessian_blocks"),
    ("flops", "unknown measure unit 'flops'; built-in units"),
    ("no_such_pkg.units:Unit", "cannot import module 'no_such_pkg.units'"),
    (f"{__name__}:Missing", f"module '{__name__}' has no attribute 'Missing'"),
    (f"{__name__}:NotAUnit", "is not a measurement: it needs a measure(ctx) method"),
    ("", "non-empty string"),
])
def test_load_unit_rejects_unknown_names_clearly(unit, message):
    with pytest.raises(ValueError) as err:
        load_unit(unit)
    assert message in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------------------
# issue 14: the largest singular value, lambda on the training objective, grad_norm


def test_lanczos_restart_finds_the_top_value_a_single_run_misses():
    """The random start lies along B's second right singular vector, orthogonal to the top one: a single
    Golub-Kahan run finds an exact invariant subspace at once and certifies sigma_2; the deflated restart
    check (a fresh random start kept orthogonal to that Ritz vector) finds sigma_1."""
    n_in, n_out, seed = 12, 10, 5
    start = torch.randn(n_in, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    g = torch.Generator().manual_seed(99)
    q, _ = torch.linalg.qr(torch.cat([start[:, None], torch.randn(n_in, n_out - 1, generator=g,
                                                                   dtype=torch.float64)], 1))
    v = torch.cat([q[:, 1:2], q[:, 0:1], q[:, 2:]], 1)  # v_1 orthogonal to the start, v_2 along it
    u, _ = torch.linalg.qr(torch.randn(n_out, n_out, generator=g, dtype=torch.float64))
    sigma = torch.linspace(5.0, 0.5, n_out, dtype=torch.float64)
    b = u @ torch.diag(sigma) @ v.T

    def run(checks: int) -> tuple[float, int, bool]:
        return block_sigma_max(lambda x: b @ x, lambda y: b.T @ y, n_in, n_out,
                               generator=torch.Generator().manual_seed(seed), tol=1e-8, checks=checks)

    missed, _, claimed = run(0)  # what a single run (the old test) returns
    assert claimed and missed == pytest.approx(float(sigma[1]), rel=1e-9)
    top, _, converged = run(3)
    assert converged and top == pytest.approx(float(sigma[0]), rel=1e-9)
