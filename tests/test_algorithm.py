"""Algorithm 1 against closed-form iterations on a block quadratic, and its structural promises."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bcdcore import ops
from bcdcore.algorithm import BlockwiseTrainer, EntireTrainer
from bcdcore.data import load_data
from bcdcore.data.batches import BatchStream, stream_seed
from bcdcore.models import build_model
from bcdcore.params import FlatParams
from bcdcore.recipe import AlgorithmConfig, DataConfig, ModelConfig

SIZES = [3, 3, 2]  # features per block of the block-linear model
# The closed-form checks run on the reference and on the compiled CPU kernels (skipped where not built).
BACKENDS = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(
    "cpu" not in ops.available_backends(), reason="compiled cpu backend not built"))]


def mse(out, y):
    return F.mse_loss(out.squeeze(-1), y)


class Quadratic:
    """loss(w) = mean((Xw - y)^2) = 1/2 w'Aw - b'w + const with A = 2X'X/m, b = 2X'y/m, on the train split."""

    def __init__(self, seed: int = 0) -> None:
        data = load_data(DataConfig(name="quadratic", n_samples=200, n_features=sum(SIZES), noise=0.1,
                                    val_fraction=0.0, test_fraction=0.0), seed)
        self.x = data.train.x.double()
        self.y = data.train.y.double()
        m = len(self.x)
        X, y = self.x.numpy(), self.y.numpy()
        self.A = 2 * X.T @ X / m
        self.b = 2 * X.T @ y / m
        self.slices = [slice(s, e) for s, e in zip(np.cumsum([0] + SIZES[:-1]), np.cumsum(SIZES))]

    def trainer(self, cfg: AlgorithmConfig, lams, gammas, seed: int = 0, backend: str = "reference"):
        model = build_model(ModelConfig(name="block_linear", widths=SIZES), (sum(SIZES),), 1, seed).double()
        params = FlatParams(model, model.blocks)
        streams = [BatchStream(self.x, self.y, len(self.x), stream_seed(seed, i)) for i in range(len(SIZES))]
        return BlockwiseTrainer(model, params, mse, streams, cfg, lams, gammas, backend, seed), params

    def prox_grad(self, z: np.ndarray, i: int, lam: float, a: np.ndarray) -> np.ndarray:
        """grad F_i at the full point z (block i = z[s]) for anchor a: full-batch, so exact."""
        s = self.slices[i]
        return self.grad_block(z, i) + lam * (z[s] - a[s])

    def exact_block(self, x: np.ndarray, i: int, lam: float, a: np.ndarray) -> np.ndarray:
        s = self.slices[i]
        rest = self.A[s] @ x - self.A[s, s] @ x[s]
        lhs = self.A[s, s] + lam * np.eye(s.stop - s.start)
        return np.linalg.solve(lhs, self.b[s] - rest + lam * a[s])

    def grad_block(self, x: np.ndarray, i: int) -> np.ndarray:
        s = self.slices[i]
        return self.A[s] @ x - self.b[s]


def lr_for(q: Quadratic, lam: float) -> float:
    return 1.0 / (max(np.linalg.eigvalsh(q.A[s, s]).max() for s in q.slices) + lam)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("schedule", ["jacobi", "gauss_seidel"])
def test_exact_block_solves_match_closed_form(schedule, backend):
    q = Quadratic()
    lams, gammas = [0.5, 1.0, 0.25], [1.0, 0.7, 0.5]
    cfg = AlgorithmConfig(schedule=schedule, K=600, lr=lr_for(q, 0.0), solver="sgd")
    trainer, params = q.trainer(cfg, lams, gammas, backend=backend)
    x = params.flat.detach().numpy().copy()
    for t in range(1, 4):
        trainer.run_round(t)
        a = x.copy()
        for i, s in enumerate(q.slices):
            base = a if schedule == "jacobi" else x
            xhat = q.exact_block(base, i, lams[i], a)
            x[s] = a[s] + gammas[i] * (xhat - a[s])
        np.testing.assert_allclose(params.flat.detach().numpy(), x, rtol=0, atol=1e-10)


def test_jacobi_and_gauss_seidel_differ_on_coupled_blocks():
    q = Quadratic()
    results = []
    for schedule in ("jacobi", "gauss_seidel"):
        trainer, params = q.trainer(AlgorithmConfig(schedule=schedule, K=50, lr=lr_for(q, 0.0)), [0.1] * 3, [1.0] * 3)
        trainer.run_round(1)
        results.append(params.flat.detach().clone())
    assert not torch.allclose(results[0], results[1], atol=1e-6)
    # block 0 sees only the anchor in both schedules
    torch.testing.assert_close(results[0][:3], results[1][:3], rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("schedule", ["jacobi", "gauss_seidel"])
def test_k_sgd_steps_match_hand_iteration(schedule, backend):
    q = Quadratic(seed=3)
    lams, gammas, lr, K = [0.3, 0.0, 2.0], [0.5, 1.0, 0.8], 0.05, 4
    trainer, params = q.trainer(AlgorithmConfig(schedule=schedule, K=K, lr=lr), lams, gammas, backend=backend)
    x = params.flat.detach().numpy().copy()
    for t in (1, 2):
        trainer.run_round(t)
        a = x.copy()
        for i, s in enumerate(q.slices):
            point = (a if schedule == "jacobi" else x).copy()
            for _ in range(K):
                point[s] = point[s] - lr * (q.grad_block(point, i) + lams[i] * (point[s] - a[s]))
            x[s] = a[s] + gammas[i] * (point[s] - a[s])
        np.testing.assert_allclose(params.flat.detach().numpy(), x, rtol=0, atol=1e-10)


def hand_solver(solver: str, cfg: AlgorithmConfig):
    """One block's inner iteration by hand (numpy, float64), state reset at the anchor: step(z, r) -> z'."""
    state = {"buf": None, "m": None, "v": None, "t": 0}

    def step(z: np.ndarray, r: np.ndarray) -> np.ndarray:
        if solver == "sgd":
            return z - cfg.lr * r
        if solver == "momentum":
            state["buf"] = r.copy() if state["buf"] is None else cfg.momentum * state["buf"] + r
            return z - cfg.lr * (r + cfg.momentum * state["buf"] if cfg.nesterov else state["buf"])
        state["t"] += 1
        m = (1 - cfg.beta1) * r + (0 if state["m"] is None else cfg.beta1 * state["m"])
        v = (1 - cfg.beta2) * r * r + (0 if state["v"] is None else cfg.beta2 * state["v"])
        state["m"], state["v"] = m, v
        mhat, vhat = m / (1 - cfg.beta1 ** state["t"]), v / (1 - cfg.beta2 ** state["t"])
        return z - cfg.lr * mhat / (np.sqrt(vhat) + cfg.eps)

    return step


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("schedule", ["jacobi", "gauss_seidel"])
@pytest.mark.parametrize("solver", ["momentum", "nesterov", "adam"])
def test_momentum_and_adam_blockwise_match_hand_iteration(solver, schedule, backend):
    """Blockwise momentum / Nesterov / Adam with the reset policy: every block starts its solver state at zero
    at each anchor (Adam's bias correction from step 1), two rounds, damping, both schedules."""
    q = Quadratic(seed=4)
    lams, gammas, K = [0.4, 0.1, 1.5], [0.9, 1.0, 0.6], 5
    cfg = AlgorithmConfig(schedule=schedule, K=K, solver="adam" if solver == "adam" else "momentum",
                          lr=0.02 if solver == "adam" else 0.04, momentum=0.8, nesterov=solver == "nesterov",
                          state_policy="reset")
    trainer, params = q.trainer(cfg, lams, gammas, backend=backend)
    x = params.flat.detach().numpy().copy()
    for t in (1, 2):
        trainer.run_round(t)
        a = x.copy()
        for i, s in enumerate(q.slices):
            point = (a if schedule == "jacobi" else x).copy()
            step = hand_solver(cfg.solver, cfg)
            for _ in range(K):
                point[s] = step(point[s], q.prox_grad(point, i, lams[i], a))
            x[s] = a[s] + gammas[i] * (point[s] - a[s])
        np.testing.assert_allclose(params.flat.detach().numpy(), x, rtol=0, atol=1e-10)


@pytest.mark.parametrize("lag", [0, 1])
@pytest.mark.parametrize("backend", BACKENDS)
def test_inexactness_rule_returns_the_certified_point(backend, lag):
    """The rule holds at z_k: the block returns z_k (the step from z_k is not applied), the report describes
    z_k, and with the host one step behind (lag 1, as on a GPU) one more pass runs and changes nothing."""
    q = Quadratic(seed=1)
    lam, c, lr, K = 1.0, 0.5, 0.05, 200
    gammas = [1.0, 0.6, 1.0]
    trainer, params = q.trainer(AlgorithmConfig(K=K, lr=lr, accuracy_factor=c), [lam] * 3, gammas,
                                backend=backend)
    trainer.rule_lag = lag
    a = params.flat.detach().numpy().copy()
    report = trainer.run_round(1).blocks
    expected = a.copy()
    for i, s in enumerate(q.slices):
        z = a.copy()
        for k in range(K):
            r = q.prox_grad(z, i, lam, a)
            d = z[s] - a[s]
            if np.linalg.norm(r) <= c * lam * np.linalg.norm(d):
                break
            z[s] = z[s] - lr * r
        assert 0 < k < K - 1
        assert report[i].inner_steps == k and report[i].stopped_early
        assert report[i].passes == k + 1 + lag
        np.testing.assert_allclose(report[i].residual, np.linalg.norm(r), rtol=1e-9)
        np.testing.assert_allclose(report[i].dist, np.linalg.norm(d), rtol=1e-9)
        assert report[i].residual <= report[i].threshold == pytest.approx(c * lam * np.linalg.norm(d))
        expected[s] = a[s] + gammas[i] * (z[s] - a[s])  # damping of the certified point
    np.testing.assert_allclose(params.flat.detach().numpy(), expected, rtol=0, atol=1e-10)


def test_returned_points_satisfy_the_rule_over_many_random_stops():
    """A few hundred early stops with SGD (lr up to 1.5/L), heavy ball 0.9 and Adam, random lambda and c, on
    both backends and both host lags: at every returned point the rule holds, recomputed in float64."""
    rng = np.random.default_rng(2026)
    stops = {"sgd": 0, "momentum": 0, "adam": 0}
    backends = ["reference"] + (["cpu"] if "cpu" in ops.available_backends() else [])
    for trial in range(14):
        q = Quadratic(seed=trial)
        big = max(np.linalg.eigvalsh(q.A[s, s]).max() for s in q.slices)
        for solver in stops:
            lam = float(rng.uniform(0.2, 2.0)) * big
            c = float(rng.uniform(0.2, 0.9))
            lr = {"sgd": rng.uniform(0.3, 1.5) / (big + lam), "momentum": rng.uniform(0.05, 0.3) / (big + lam),
                  "adam": rng.uniform(0.01, 0.1)}[solver]
            cfg = AlgorithmConfig(K=150, lr=float(lr), solver=solver, momentum=0.9, accuracy_factor=c)
            trainer, params = q.trainer(cfg, [lam] * 3, [1.0] * 3, seed=trial, backend=backends[trial % len(backends)])
            trainer.rule_lag = trial % 2
            for t in (1, 2, 3):
                a = params.flat.detach().numpy().copy()
                reports = trainer.run_round(t).blocks
                x = params.flat.detach().numpy()
                for rep in reports:
                    if not rep.stopped_early:
                        continue
                    s = q.slices[rep.block]
                    z = a.copy()
                    z[s] = x[s]
                    residual = np.linalg.norm(q.prox_grad(z, rep.block, lam, a))
                    assert residual <= c * lam * np.linalg.norm(z[s] - a[s]) * (1 + 1e-9), (solver, trial, t)
                    np.testing.assert_allclose(rep.residual, residual, rtol=1e-8)
                    stops[solver] += 1
    assert min(stops.values()) >= 80, stops  # the rule really stopped often enough to mean something


def test_rule_disabled_runs_all_k_steps():
    q = Quadratic(seed=1)
    for c, lam in ((-1.0, 1.0), (0.5, 0.0)):
        trainer, _ = q.trainer(AlgorithmConfig(K=30, lr=0.05, accuracy_factor=c), [lam] * 3, [1.0] * 3)
        assert all(b.inner_steps == 30 and not b.stopped_early for b in trainer.run_round(1).blocks)


def digits_problem(cfg: AlgorithmConfig, model_name="mlp", widths=(16, 16), seed=0, lams=None, gammas=None):
    data = load_data(DataConfig(name="digits" if model_name == "cnn" else "digits_flat"), seed)
    model = build_model(ModelConfig(name=model_name, widths=list(widths)), data.input_shape, 10, seed)
    params = FlatParams(model, model.blocks)
    n = params.n_blocks
    streams = [BatchStream(data.train.x, data.train.y, 32, stream_seed(seed, 100 + i)) for i in range(n)]
    trainer = BlockwiseTrainer(model, params, F.cross_entropy, streams, cfg, lams or [0.1] * n,
                               gammas or [1.0] * n, "reference", seed)
    return trainer, params, model


def test_jacobi_isolation_each_block_sees_only_the_anchor():
    """A Jacobi round equals, block by block, rounds where that block alone is active (same minibatches)."""
    cfg = AlgorithmConfig(schedule="jacobi", K=3, lr=0.1, solver="momentum")
    full, params, _ = digits_problem(cfg)
    start = params.flat.detach().clone()
    full.run_round(1)
    for i in range(params.n_blocks):
        alone, p_alone, _ = digits_problem(cfg)
        alone.active_blocks = lambda t, i=i: [i]
        alone.run_round(1)
        torch.testing.assert_close(p_alone.block(i), params.block(i), rtol=0, atol=0)
        for j in range(params.n_blocks):
            if j != i:
                torch.testing.assert_close(p_alone.block(j), p_alone.block(j, start), rtol=0, atol=0)


def test_active_share_updates_only_chosen_blocks():
    cfg = AlgorithmConfig(K=2, lr=0.1, active_share=0.5)
    trainer, params, _ = digits_problem(cfg, widths=(16, 16, 16))  # 4 blocks -> 2 active
    for t in range(1, 4):
        before = params.flat.detach().clone()
        reports = trainer.run_round(t).blocks
        active = sorted(r.block for r in reports)
        assert len(active) == 2
        for j in range(params.n_blocks):
            changed = not torch.equal(params.block(j), params.block(j, before))
            assert changed == (j in active)


def test_cyclic_active_rule_visits_blocks_in_turn():
    cfg = AlgorithmConfig(K=1, lr=0.1, active_share=0.5, active_rule="cyclic")
    trainer, _, _ = digits_problem(cfg, widths=(16, 16, 16))
    assert [trainer.active_blocks(t) for t in range(4)] == [[0, 1], [2, 3], [0, 1], [2, 3]]


def test_frozen_blocks_get_no_grad():
    cfg = AlgorithmConfig(K=2, lr=0.1)
    trainer, params, model = digits_problem(cfg)
    computed = []
    for i, block_params in enumerate(params.block_params):
        for p in block_params:
            p.register_hook(lambda g, i=i: computed.append(i))
    seen = []

    def check(module, inputs):
        grads = [[p.grad is not None for p in ps] for ps in params.block_params]
        seen.append(grads)

    model.register_forward_pre_hook(check)
    trainer.solve_block(1, [])
    assert set(computed) == {1}
    for grads in seen:
        assert all(grads[1]) and not any(grads[0]) and not any(grads[2])


def test_no_parameter_in_two_blocks():
    shared = torch.nn.Linear(4, 4)
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([shared, torch.nn.Sequential(shared)])
    with pytest.raises(ValueError, match="two blocks"):
        FlatParams(model, model.blocks)
    outside = torch.nn.Module()
    outside.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
    outside.extra = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="outside model.blocks"):
        FlatParams(outside, outside.blocks)


def test_flat_store_is_shared_and_bounded():
    cfg = AlgorithmConfig(K=1, lr=0.1, solver="adam")
    trainer, params, model = digits_problem(cfg)
    n = params.flat.numel()
    assert n == sum(p.numel() for p in model.parameters())
    for p in model.parameters():  # every parameter is a view of the flat buffer
        assert p.untyped_storage().data_ptr() == params.flat.untyped_storage().data_ptr()
    sizes = [trainer.anchor.numel(), trainer.next.numel()] + [s.numel() for s in trainer.solver.state]
    assert sizes == [n] * 4  # anchor, next, Adam m and v: independent of the number of blocks
    trainer.run_round(1)
    assert params.grads_in_place()


def test_batchnorm_buffers_move_with_their_block():
    cfg = AlgorithmConfig(K=2, lr=0.05)
    trainer, params, model = digits_problem(cfg, model_name="cnn", widths=(4, 4))
    trainer.active_blocks = lambda t: [0]
    before = params.snapshot_buffers()
    trainer.run_round(1)
    after = params.snapshot_buffers()
    assert not torch.equal(after[0][0], before[0][0])  # block 0's running mean moved
    assert all(torch.equal(x, y) for x, y in zip(after[1], before[1]))  # block 1's did not


def test_solver_state_policy_reset_vs_keep():
    results = {}
    for policy in ("reset", "keep"):
        trainer, params, _ = digits_problem(AlgorithmConfig(K=2, lr=0.05, solver="momentum", state_policy=policy))
        trainer.run_round(1)
        trainer.run_round(2)
        results[policy] = params.flat.detach().clone()
    assert not torch.equal(results["reset"], results["keep"])


def entire_against_torch(cfg: AlgorithmConfig, rounds: int, make_optimizer) -> None:
    """EntireTrainer for `rounds` rounds vs a torch optimizer on the same minibatches and weights."""
    data = load_data(DataConfig(name="digits_flat"), 0)
    model = build_model(ModelConfig(name="mlp", widths=[16]), data.input_shape, 10, 0)
    twin = copy.deepcopy(model)
    params = FlatParams(model, model.blocks)
    trainer = EntireTrainer(model, params, F.cross_entropy, BatchStream(data.train.x, data.train.y, 32, 7), cfg,
                            "reference")
    for t in range(1, rounds + 1):
        trainer.run_round(t)
    opt = make_optimizer(twin.parameters())
    stream = BatchStream(data.train.x, data.train.y, 32, 7)
    for _ in range(rounds * cfg.K):
        xb, yb = stream.next()
        opt.zero_grad()
        F.cross_entropy(twin(xb), yb).backward()
        opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_entire_mode_matches_torch_sgd_with_momentum():
    cfg = AlgorithmConfig(mode="entire", K=5, lr=0.05, solver="momentum", momentum=0.9)
    entire_against_torch(cfg, 2, lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9))


def test_entire_mode_adam_matches_torch_adam():
    cfg = AlgorithmConfig(mode="entire", K=6, lr=0.01, solver="adam")
    entire_against_torch(cfg, 1, lambda ps: torch.optim.Adam(ps, lr=0.01))


def test_jacobi_batchnorm_isolation_with_all_blocks_active():
    """A BatchNorm CNN, every block active: each block's parameters and statistics after a Jacobi round equal
    those of a round where that block alone is active (same minibatches), and every other block's statistics
    are its anchor's."""
    cfg = AlgorithmConfig(schedule="jacobi", K=3, lr=0.05, solver="momentum")
    full, params, _ = digits_problem(cfg, model_name="cnn", widths=(4, 4))
    start_buffers = params.snapshot_buffers()
    full.run_round(1)
    assert all(not torch.equal(b, s) for b, s in zip(params.block_buffers[0], start_buffers[0]) if b.is_floating_point())
    for i in range(params.n_blocks):
        alone, p_alone, _ = digits_problem(cfg, model_name="cnn", widths=(4, 4))
        alone.active_blocks = lambda t, i=i: [i]
        alone.run_round(1)
        torch.testing.assert_close(p_alone.block(i), params.block(i), rtol=0, atol=0)
        for live, solo in zip(params.block_buffers[i], p_alone.block_buffers[i]):
            torch.testing.assert_close(live, solo, rtol=0, atol=0)
        for j in range(params.n_blocks):
            if j != i:
                for solo, anchor in zip(p_alone.block_buffers[j], start_buffers[j]):
                    torch.testing.assert_close(solo, anchor, rtol=0, atol=0)
