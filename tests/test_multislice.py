"""The multi-slice form of the fused ops (bcdcore.ops.prox_*_multi_, damp_multi_) and the `out=` write without
gamma, on every backend, against the `reference` backend on fresh random inputs.

Per slice the multi-slice op is the one-buffer op on that slice with the slice's lam and gamma: the compiled
backends must give the bits of their own one-buffer calls, slice by slice (same tasks, same reduction), and agree
with the reference to the tolerances of tests/test_kernels.py; elements outside every slice stay untouched.
hypothesis draws the slice layout (counts, lengths including empty slices, gaps), the form and the write mode.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from bcdcore import ops

try:
    from bcdcore.ops import compiled

    _BACKENDS = compiled.backends()
except ImportError:
    _BACKENDS = {}

CPU = _BACKENDS.get("cpu")
CUDA = _BACKENDS.get("cuda")
HAS_GPU = torch.cuda.is_available()
needs_cpu = pytest.mark.skipif(CPU is None or "sgd_multi" not in (CPU or {}), reason="compiled cpu multi absent")

FORMS = ["sgd", "momentum", "nesterov", "adam", "damp"]
MODES = ["plain", "gamma", "gamma+out", "out"]
TOL = {torch.float32: dict(rtol=1.3e-6, atol=1e-5), torch.bfloat16: dict(rtol=2**-7, atol=1e-5),
       torch.float64: dict(rtol=1e-12, atol=1e-12)}
NORM_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def _seed() -> int:
    env = os.environ.get("BCD_TEST_SEED")
    return int(env) if env else int.from_bytes(os.urandom(7), "little")


class Case:
    """Random flat operands of n elements and a slice layout [(start, end)] with per-slice lam and gamma."""

    def __init__(self, form, mode, dtype, bounds, n, seed, device="cpu"):
        self.form, self.mode, self.dtype, self.bounds, self.n, self.device = form, mode, dtype, bounds, n, device
        gen = torch.Generator().manual_seed(seed)
        sd = torch.float64 if dtype == torch.float64 else torch.float32
        self.sd = sd
        r = lambda dt=dtype: torch.randn(n, generator=gen, dtype=sd).to(dt)  # noqa: E731
        self.x, self.g = r(), r()
        self.a = (self.x.to(sd) + 0.5 * torch.randn(n, generator=gen, dtype=sd)).to(dtype)
        self.buf, self.m = r(sd), 0.1 * r(sd)
        self.v = 0.1 * torch.rand(n, generator=gen, dtype=sd) + 1e-3
        u = torch.rand(len(bounds) * 2 + 6, generator=gen, dtype=torch.float64).tolist()
        self.lams = [0.05 + v for v in u[:len(bounds)]]
        self.gammas = [0.1 + 0.9 * v for v in u[len(bounds):2 * len(bounds)]]
        k = u[2 * len(bounds):]
        self.kw = dict(lr=0.01 + 0.4 * k[0], momentum=0.5 + 0.49 * k[1], beta1=0.8 + 0.19 * k[2],
                       beta2=0.9 + 0.099 * k[3], eps=1e-8, step=1 + int(9 * k[4]))

    def make(self):
        t = {name: getattr(self, name).clone().to(self.device) for name in ("x", "g", "a", "buf", "m", "v")}
        if "out" in self.mode:
            t["out"] = torch.full((self.n,), float("nan"), dtype=self.dtype, device=self.device)
        return t

    def _extra(self, t, gammas):
        extra = {"gammas": gammas} if "gamma" in self.mode else {}
        if "out" in t:
            extra["out"] = t["out"]
        return extra

    def call_multi(self, fns, t):
        kw, b = self.kw, self.bounds
        extra = self._extra(t, self.gammas)
        if self.form == "sgd":
            return fns["sgd_multi"](t["x"], t["g"], t["a"], bounds=b, lr=kw["lr"], lams=self.lams, **extra)
        if self.form in ("momentum", "nesterov"):
            return fns["momentum_multi"](t["x"], t["g"], t["a"], t["buf"], bounds=b, lr=kw["lr"], lams=self.lams,
                                         momentum=kw["momentum"], nesterov=self.form == "nesterov", **extra)
        if self.form == "adam":
            return fns["adam_multi"](t["x"], t["g"], t["a"], t["m"], t["v"], bounds=b, lr=kw["lr"], lams=self.lams,
                                     beta1=kw["beta1"], beta2=kw["beta2"], eps=kw["eps"], step=kw["step"], **extra)
        return fns["damp_multi"](t["x"], t["a"], bounds=b, **extra)

    def call_each(self, fns, t):
        """The one-buffer op on every slice, one call each: what one multi-slice call must equal."""
        kw, r2s, d2s = self.kw, [], []
        for s, (lo, hi) in enumerate(self.bounds):
            v = {k: x[lo:hi] for k, x in t.items()}
            extra = {"gamma": self.gammas[s]} if "gamma" in self.mode else {}
            if "out" in v:
                extra["out"] = v["out"]
            lam = self.lams[s]
            if self.form == "sgd":
                res = fns["sgd"](v["x"], v["g"], v["a"], lr=kw["lr"], lam=lam, **extra)
            elif self.form in ("momentum", "nesterov"):
                res = fns["momentum"](v["x"], v["g"], v["a"], v["buf"], lr=kw["lr"], lam=lam, momentum=kw["momentum"],
                                      nesterov=self.form == "nesterov", **extra)
            elif self.form == "adam":
                res = fns["adam"](v["x"], v["g"], v["a"], v["m"], v["v"], lr=kw["lr"], lam=lam, beta1=kw["beta1"],
                                  beta2=kw["beta2"], eps=kw["eps"], step=kw["step"], **extra)
            else:
                res = fns["damp"](v["x"], v["a"], **extra)
            if res is not None:
                r2s.append(res[0])
                d2s.append(res[1])
        if self.form == "damp":
            return None
        if not r2s:
            return torch.zeros(0, dtype=self.sd), torch.zeros(0, dtype=self.sd)
        return torch.stack(r2s), torch.stack(d2s)


def layout(lengths: list[int], gaps: list[int]) -> tuple[list[tuple[int, int]], int]:
    bounds, pos = [], 0
    for n, gap in zip(lengths, gaps):
        pos += gap
        bounds.append((pos, pos + n))
        pos += n
    return bounds, pos + (gaps[-1] if gaps else 0)


def check(fns, case: Case, tag: str, bitwise_with_single: bool) -> None:
    want, got, single = case.make(), case.make(), case.make()
    ref = case.call_multi(ops.REFERENCE, want)
    res = case.call_multi(fns, got)
    inside = torch.zeros(case.n, dtype=torch.bool)
    for lo, hi in case.bounds:
        inside[lo:hi] = True
    inside = inside.to(case.device)
    names = ["x"] + (["out"] if "out" in got else []) + {"momentum": ["buf"], "nesterov": ["buf"],
                                                          "adam": ["m", "v"]}.get(case.form, [])
    for name in names:
        tol = TOL[case.sd] if name in ("buf", "m", "v") else TOL[case.dtype]
        assert_close(got[name], want[name], **tol, equal_nan=True, msg=lambda m, name=name: f"{tag} {name}: {m}")
        before = case.make()[name]
        assert torch.equal(got[name][~inside].nan_to_num(7.0), before[~inside].nan_to_num(7.0)), \
            f"{tag} {name} written outside the slices"
    if "out" in got:
        assert torch.equal(got["x"][inside], got["a"][inside]), f"{tag} x must be restored to a where out= is written"
    if case.form == "damp":
        assert res is None and ref is None
    else:
        assert res[0].shape == (len(case.bounds),) and res[0].dtype == case.sd, f"{tag} norms shape/dtype"
        assert_close(res[0], ref[0], **NORM_TOL[case.sd], msg=lambda m: f"{tag} r2: {m}")
        assert_close(res[1], ref[1], **NORM_TOL[case.sd], msg=lambda m: f"{tag} d2: {m}")
    if bitwise_with_single:
        each = case.call_each(fns, single)
        for name in names:
            assert torch.equal(got[name].nan_to_num(7.0), single[name].nan_to_num(7.0)), \
                f"{tag} {name}: multi-slice differs from one call per slice"
        if res is not None:
            assert torch.equal(res[0].cpu(), each[0].cpu()) and torch.equal(res[1].cpu(), each[1].cpu()), \
                f"{tag} norms: multi-slice differs from one call per slice"


slice_layouts = st.integers(0, 6).flatmap(lambda k: st.tuples(
    st.lists(st.one_of(st.just(0), st.integers(1, 40), st.integers(1000, 3000)), min_size=k, max_size=k),
    st.lists(st.integers(0, 5), min_size=k + 1, max_size=k + 1)))


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpu)])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lay=slice_layouts, form=st.sampled_from(FORMS), mode=st.sampled_from(MODES),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_multi_slice_matches_reference_per_slice(backend, lay, form, mode, dtype):
    if form == "damp" and mode == "plain":
        mode = "gamma"
    bounds, n = layout(*lay)
    seed = _seed()
    fns = ops.REFERENCE if backend == "reference" else CPU
    case = Case(form, mode, dtype, bounds, n, seed)
    check(fns, case, f"[{backend} {form} {mode} {dtype} {bounds} seed={seed}]", backend != "reference")


@needs_cpu
@pytest.mark.parametrize("form", FORMS)
def test_cpu_multi_slice_across_task_boundaries(form):
    """Slices longer than a task (16,384 elements), misaligned starts, an empty slice: still one call's bits."""
    bounds, n = layout([40_003, 0, 16_385, 3], [1, 2, 3, 5, 7])
    seed = _seed()
    case = Case(form, "gamma+out" if form != "damp" else "gamma", torch.float32, bounds, n, seed)
    check(CPU, case, f"[cpu {form} big seed={seed}]", True)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpu)])
def test_multi_slice_bad_layouts_raise(backend):
    fns = ops.REFERENCE if backend == "reference" else CPU
    x, g, a = torch.randn(10), torch.randn(10), torch.randn(10)
    for bounds, lams, match in (([(0, 4), (3, 6)], [0.1, 0.1], "overlaps"), ([(0, 11)], [0.1], "not inside"),
                                ([(5, 4)], [0.1], "not inside"), ([(0, 4)], [0.1, 0.2], "lams")):
        with pytest.raises(ValueError, match=match):
            fns["sgd_multi"](x, g, a, bounds=bounds, lr=0.1, lams=lams)
    with pytest.raises(ValueError, match="gammas"):
        fns["damp_multi"](x, a, bounds=[(0, 4)], gammas=[0.5, 0.5])


CUDA_MARKS = [pytest.mark.cuda, pytest.mark.skipif(not HAS_GPU, reason="no CUDA device"),
              pytest.mark.skipif(CUDA is None, reason="compiled cuda backend absent")]


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpu),
                                     pytest.param("cuda", marks=CUDA_MARKS)])
@pytest.mark.parametrize("form", ["sgd", "adam", "damp"])
def test_out_without_gamma_moves_the_undamped_point(backend, form):
    """gamma=None with out=: out <- x_new (the undamped step) and x <- a, bit-exact restore."""
    fns = {"reference": ops.REFERENCE, "cpu": CPU, "cuda": CUDA}[backend]
    seed = _seed()
    case = Case(form, "out", torch.float32, [(0, 5000)], 5000, seed, device="cuda" if backend == "cuda" else "cpu")
    plain, moved = case.make(), case.make()
    moved["out"] = torch.full((5000,), float("nan"), device=case.device)
    kw = case.kw
    if form == "sgd":
        fns["sgd"](plain["x"], plain["g"], plain["a"], lr=kw["lr"], lam=0.3)
        fns["sgd"](moved["x"], moved["g"], moved["a"], lr=kw["lr"], lam=0.3, out=moved["out"])
    elif form == "adam":
        for t, extra in ((plain, {}), (moved, {"out": moved["out"]})):
            fns["adam"](t["x"], t["g"], t["a"], t["m"], t["v"], lr=kw["lr"], lam=0.3, beta1=kw["beta1"],
                        beta2=kw["beta2"], eps=1e-8, step=2, **extra)
    else:
        fns["damp"](moved["x"], moved["a"], out=moved["out"])
    assert torch.equal(moved["out"], plain["x"]), f"[{backend} {form} seed={seed}] out is not the undamped point"
    assert torch.equal(moved["x"], moved["a"]), f"[{backend} {form} seed={seed}] x not restored to a"
    with pytest.raises(ValueError, match="gamma= or out="):
        fns["damp"](plain["x"], plain["a"])


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")
@pytest.mark.skipif(CUDA is None, reason="compiled cuda backend absent")
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("count", [1, 10, 33, 70])
@pytest.mark.parametrize("mode", ["gamma+out", "out"])
def test_cuda_multi_slice_matches_reference_and_one_call_per_slice(form, dtype, count, mode):
    """Up to 70 slices (more than one launch's 32), lengths 0..70,000 with one empty slice, odd gaps."""
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    lengths = [int(v) for v in torch.randint(0, 70_000, (count,), generator=gen)]
    lengths[count // 2] = 0
    gaps = [int(v) for v in torch.randint(0, 9, (count + 1,), generator=gen)]
    bounds, n = layout(lengths, gaps)
    mode = mode if form != "damp" else {"gamma+out": "gamma", "out": "out"}[mode]
    case = Case(form, mode, dtype, bounds, n, seed, device="cuda")
    check(CUDA, case, f"[cuda {form} {dtype} {count} slices seed={seed}]", True)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpu)])
@pytest.mark.parametrize("kw", [dict(gamma=0.6), dict(gamma=1.0, accuracy_factor=50.0), dict(active_share=0.5),
                                dict(solver="adam", lr=0.01, gamma=0.8, accuracy_factor=2.0)])
def test_jacobi_damping_at_the_round_end_gives_the_fused_bits(backend, kw):
    """A round's damping writes as one multi-slice call equal the damping fused into each block's last step
    (float32: the undamped point is stored exactly), rule stops included."""
    import torch.nn.functional as F

    from bcdcore.algorithm import BlockwiseTrainer
    from bcdcore.data.batches import BatchStream, stream_seed
    from bcdcore.models import build_model
    from bcdcore.params import FlatParams
    from bcdcore.recipe import AlgorithmConfig, ModelConfig

    def trainer(defer: bool):
        model = build_model(ModelConfig(name="mlp", widths=[12, 8]), (10,), 3, 0)
        params = FlatParams(model, model.blocks)
        gen = torch.Generator().manual_seed(5)
        x, y = torch.randn(64, 10, generator=gen), torch.randint(0, 3, (64,), generator=gen)
        n = params.n_blocks
        cfg = AlgorithmConfig(**{**dict(mode="blockwise", schedule="jacobi", K=4, lam=0.1, lr=0.1), **kw})
        streams = [BatchStream(x, y, 16, stream_seed(0, i)) for i in range(n)]
        tr = BlockwiseTrainer(model, params, F.cross_entropy, streams, cfg, [0.1 * (i + 1) for i in range(n)],
                              [cfg.gamma * (1 - 0.1 * i) for i in range(n)], backend, 0)
        assert tr.defer_damping  # float32 Jacobi in one process
        tr.defer_damping = defer
        return tr

    deferred, fused = trainer(True), trainer(False)
    for t in range(3):
        a, b = deferred.run_round(t), fused.run_round(t)
        assert torch.equal(deferred.params.flat, fused.params.flat), f"round {t}"
        assert [vars(r) for r in a.blocks] == [vars(r) for r in b.blocks] and a.train_loss == b.train_loss
