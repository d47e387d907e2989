"""The compiled fused ops (csrc/, bcdcore.ops.compiled) against the `reference` backend of bcdcore.ops.

Every case draws fresh random inputs (a new seed per run, printed on failure; BCD_TEST_SEED=N reproduces one),
never zeros, and poisons `out` with NaN before the call. Tolerances (torch.testing.assert_close):

  updated values and state, fp32 math   rtol 1.3e-6, atol 1e-5   (torch's fp32 defaults: a few fp32 ulps; the
                                                                  kernels round like the reference, which differs
                                                                  only where torch's CPU sqrt is 1 ulp off)
  bf16 parameters                       rtol 2**-7,  atol 1e-5   (one bf16 ulp: both sides compute the same fp32
                                                                  value to within an ulp, so rounding to bf16 can
                                                                  differ by at most one bf16 ulp)
  fp16 parameters                       rtol 2**-10, atol 1e-5   (one fp16 ulp, same reasoning)
  fp64 parameters                       rtol 1e-12,  atol 1e-12
  the norms r2, d2 (fp32)               rtol 1e-5,   atol 1e-6   (sums of up to 3M squares in another order)
  the norms r2, d2 (fp64)               rtol 1e-10,  atol 1e-12

CUDA tests are marked `cuda` and skip where no device is visible; everything skips with the reason when the
compiled backend did not load.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch.testing import assert_close

from bcdcore import ops

try:
    from bcdcore.ops import compiled

    _BACKENDS = compiled.backends()
    _WHY = "; ".join(f"{k}={v}" for k, v in compiled.info().items())
except ImportError as exc:  # nothing compiled: every test here skips
    compiled = None
    _BACKENDS = {}
    _WHY = str(exc)

CPU = _BACKENDS.get("cpu")
CUDA = _BACKENDS.get("cuda")
HAS_GPU = torch.cuda.is_available()

needs_cpu = pytest.mark.skipif(CPU is None, reason=f"compiled cpu backend absent ({_WHY})")
needs_cuda_module = pytest.mark.skipif(CUDA is None, reason=f"compiled cuda backend absent ({_WHY})")
cuda_case = [pytest.mark.cuda, pytest.mark.skipif(not HAS_GPU, reason="no CUDA device"), needs_cuda_module]

SIZES = [1, 3, 4095, 65537, 3_000_017]
FORMS = ["sgd", "momentum", "nesterov", "adam", "damp"]
FUSED = [None, "gamma", "gamma+out"]

TOL = {
    torch.float32: dict(rtol=1.3e-6, atol=1e-5),
    torch.bfloat16: dict(rtol=2**-7, atol=1e-5),
    torch.float16: dict(rtol=2**-10, atol=1e-5),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
}
STATE_TOL = {torch.float32: TOL[torch.float32], torch.float64: TOL[torch.float64]}
NORM_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def _seed() -> int:
    env = os.environ.get("BCD_TEST_SEED")
    return int(env) if env else int.from_bytes(os.urandom(7), "little")


def _cases():
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        for n in SIZES:
            for form in FORMS:
                for fused in FUSED:
                    if form == "damp" and fused is None:
                        continue
                    out.append((form, fused, dtype, n, 0))
    # fp16 and fp64, misaligned operands (every operand at offset 1, or all at different offsets)
    for form in FORMS:
        for fused in FUSED:
            if form == "damp" and fused is None:
                continue
            out.append((form, fused, torch.float16, 65537, 0))
            out.append((form, fused, torch.float64, 65537, 0))
            out.append((form, fused, torch.float32, 40_003, 1))
            out.append((form, fused, torch.bfloat16, 40_003, 1))
            out.append((form, fused, torch.bfloat16, 40_003, "mixed"))
    return out


CASES = _cases()


def _ids(case):
    form, fused, dtype, n, off = case
    return f"{form}-{fused or 'plain'}-{str(dtype)[6:]}-n{n}" + (f"-off{off}" if off else "")


class Inputs:
    """Random operands on `device`, built twice (for the reference and for the kernel)."""

    def __init__(self, form, fused, dtype, n, offset, device, seed):
        self.form, self.fused, self.dtype, self.n, self.device, self.seed = form, fused, dtype, n, device, seed
        gen = torch.Generator().manual_seed(seed)
        sd = torch.float64 if dtype == torch.float64 else torch.float32
        self.state_dtype = sd

        def rnd(scale=1.0, positive=False, dt=dtype):
            gd = torch.float64 if dt == torch.float64 else torch.float32
            t = torch.rand(n, generator=gen, dtype=gd) if positive else torch.randn(n, generator=gen, dtype=gd)
            return (t * scale + (1e-3 if positive else 0.0)).to(dt)

        self.x = rnd()
        self.g = rnd()
        self.a = (self.x.to(sd) + rnd(0.5, dt=sd)).to(dtype)
        # a small perturbation can round back to x in bf16/fp16 (then ||x - a|| is rightly 0): move those away
        self.a = torch.where(self.a == self.x, (self.x.to(sd) + 1.0).to(dtype), self.a)
        self.buf = rnd(dt=sd)
        self.m = rnd(0.1, dt=sd)
        self.v = rnd(0.1, positive=True, dt=sd)
        u = torch.rand(8, generator=gen, dtype=torch.float64).tolist()
        self.kw = dict(lr=0.01 + 0.4 * u[0], lam=0.05 + u[1], momentum=0.5 + 0.49 * u[2], beta1=0.8 + 0.19 * u[3],
                       beta2=0.9 + 0.099 * u[4], eps=1e-8, step=1 + int(9 * u[5]))
        self.gamma = 0.1 + 0.9 * u[6] if fused else None
        if offset == 1:
            self.offsets = dict(x=1, g=1, a=1, out=1, buf=1, m=1, v=1)
        elif offset == "mixed":
            self.offsets = dict(x=1, g=2, a=3, out=5, buf=2, m=3, v=1)
        else:
            self.offsets = dict(x=0, g=0, a=0, out=0, buf=0, m=0, v=0)

    def _place(self, name, t):
        off = self.offsets[name]
        if off == 0:
            return t.clone().to(self.device)
        base = torch.empty(self.n + off, dtype=t.dtype, device=self.device)
        view = base[off:]
        view.copy_(t)
        return view

    def make(self):
        """A fresh set of operands (x, g, a, state..., out) placed as this case wants."""
        ops_ = dict(x=self._place("x", self.x), g=self._place("g", self.g), a=self._place("a", self.a),
                    buf=self._place("buf", self.buf), m=self._place("m", self.m), v=self._place("v", self.v))
        if self.fused == "gamma+out":
            ops_["out"] = self._place("out", torch.full((self.n,), float("nan"), dtype=self.dtype))
        return ops_

    def call(self, fns, t, skip=None):
        kw = self.kw
        extra = {} if skip is None else {"skip": skip}
        if self.gamma is not None:
            extra["gamma"] = self.gamma
        if "out" in t:
            extra["out"] = t["out"]
        if self.form == "sgd":
            return fns["sgd"](t["x"], t["g"], t["a"], lr=kw["lr"], lam=kw["lam"], **extra)
        if self.form in ("momentum", "nesterov"):
            return fns["momentum"](t["x"], t["g"], t["a"], t["buf"], lr=kw["lr"], lam=kw["lam"],
                                   momentum=kw["momentum"], nesterov=self.form == "nesterov", **extra)
        if self.form == "adam":
            return fns["adam"](t["x"], t["g"], t["a"], t["m"], t["v"], lr=kw["lr"], lam=kw["lam"],
                               beta1=kw["beta1"], beta2=kw["beta2"], eps=kw["eps"], step=kw["step"], **extra)
        return fns["damp"](t["x"], t["a"], **extra)


def check_against_reference(fns, case, device):
    seed = _seed()
    form, fused, dtype, n, offset = case
    inp = Inputs(form, fused, dtype, n, offset, device, seed)
    want, got = inp.make(), inp.make()
    g0, a0 = got["g"].clone(), got["a"].clone()
    ref = inp.call(ops.REFERENCE, want)
    res = inp.call(fns, got)
    tag = f"[{_ids(case)} seed={seed}]"

    def close(name, actual, expected, tol):
        assert_close(actual, expected, **tol, equal_nan=False, msg=lambda m: f"{tag} {name}: {m}")

    close("x", got["x"], want["x"], TOL[dtype])
    if "out" in got:
        close("out", got["out"], want["out"], TOL[dtype])
        assert torch.equal(got["x"], got["a"]), f"{tag} x must be restored to a when out= is given"
    for s in {"momentum": ["buf"], "nesterov": ["buf"], "adam": ["m", "v"]}.get(form, []):
        close(s, got[s], want[s], STATE_TOL[inp.state_dtype])
    assert torch.equal(got["g"], g0) and torch.equal(got["a"], a0), f"{tag} g or a was written"
    if form == "damp":
        assert res is None
        return
    r2, d2 = res
    for name, t, e in (("r2", r2, ref[0]), ("d2", d2, ref[1])):
        assert t.dim() == 0 and t.device == got["x"].device, f"{tag} {name} must be a 0-dim tensor on x's device"
        assert t.dtype == inp.state_dtype, f"{tag} {name} has dtype {t.dtype}, want {inp.state_dtype}"
        close(name, t, e, NORM_TOL[inp.state_dtype])
    assert r2.item() > 0 and d2.item() > 0, f"{tag} norms of random inputs must be positive"


def check_rule_against_reference(fns, case, device, holds: bool):
    """The rule's norms pass and the predicated step against the reference: the rule state (stopped, r2, d2,
    k), and a step given skip=rule that is not applied (state untouched; the damped write still done) when the
    rule holds, and is the ordinary step when it does not. A rule state already stopped stays as it was."""
    seed = _seed()
    form, fused, dtype, n, offset = case
    inp = Inputs(form, fused, dtype, n, offset, device, seed)
    tag = f"[rule {_ids(case)} holds={holds} seed={seed}]"
    probe = inp.make()
    r2, d2 = ops.REFERENCE["sgd"](probe["x"], probe["g"], probe["a"], lr=0.0, lam=inp.kw["lam"])
    ratio = (r2.double().sqrt() / d2.double().sqrt()).item()
    coef = ratio * (2.0 if holds else 0.5)  # far from the boundary: both sides decide alike
    results = []
    for fns_ in (ops.REFERENCE, fns):
        t = inp.make()
        before = {k: v.clone() for k, v in t.items()}
        rule = ops.new_rule_state(t["x"])
        fns_["rule_check"](t["x"], t["g"], t["a"], rule, lam=inp.kw["lam"], coef=coef, step=3)
        assert all(torch.equal(t[k], before[k], ) for k in t if k != "out"), f"{tag} the norms pass wrote"
        inp.call(fns_, t, skip=rule)
        stopped = rule.clone()
        fns_["rule_check"](t["x"], t["g"], t["a"], rule, lam=inp.kw["lam"], coef=1e30, step=4)
        if holds:
            assert torch.equal(rule, stopped), f"{tag} a stopped rule state was changed"
        results.append((t, before, stopped))
    (want, want0, rule_want), (got, got0, rule_got) = results
    assert rule_got[0].item() == rule_want[0].item() == float(holds), tag
    assert rule_got[3].item() == rule_want[3].item() == 3.0, tag
    assert rule_got.dtype == torch.float64 and rule_got.device == got["x"].device
    assert_close(rule_got[1:3], rule_want[1:3], **NORM_TOL[torch.float64 if dtype == torch.float64 else
                                                             torch.float32], msg=lambda m: f"{tag} norms: {m}")
    for name in got:
        tol = STATE_TOL[inp.state_dtype] if name in ("buf", "m", "v") else TOL[dtype]
        assert_close(got[name], want[name], **tol, msg=lambda m, name=name: f"{tag} {name}: {m}")
    if holds:  # nothing moved but the damped write
        for name in ("buf", "m", "v", "g", "a"):
            assert torch.equal(got[name], got0[name]), f"{tag} {name} changed by a skipped step"
        if fused is None:
            assert torch.equal(got["x"], got0["x"]), f"{tag} x changed by a skipped step"


RULE_CASES = [(form, fused, dtype, n, off) for form in ("sgd", "momentum", "nesterov", "adam")
              for fused in FUSED for dtype, n, off in ((torch.float32, 40_003, 0), (torch.bfloat16, 4095, "mixed"),
                                                       (torch.float64, 3001, 1))]


# ------------------------------------------------------------------------------------------------------------
# CPU


@needs_cpu
@pytest.mark.parametrize("holds", [True, False])
@pytest.mark.parametrize("case", RULE_CASES, ids=[_ids(c) for c in RULE_CASES])
def test_cpu_rule_check_and_skip_match_reference(case, holds):
    check_rule_against_reference(CPU, case, torch.device("cpu"), holds)

@needs_cpu
@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_cpu_matches_reference(case):
    check_against_reference(CPU, case, torch.device("cpu"))


@needs_cpu
@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
def test_cpu_every_instruction_set_matches_reference(isa):
    mod = compiled.cpu_module
    if mod is None or isa not in mod.available_isas():
        pytest.skip(f"instruction set {isa} not available on this processor/build")
    before = mod.isa()
    try:
        mod.set_isa(isa)
        for form in FORMS:
            for fused in FUSED[1:] if form == "damp" else FUSED:
                for dtype, n, off in ((torch.float32, 65537, 0), (torch.bfloat16, 4095, "mixed"),
                                      (torch.float16, 4097, 1), (torch.float64, 3001, 0)):
                    check_against_reference(CPU, (form, fused, dtype, n, off), torch.device("cpu"))
    finally:
        mod.set_isa(before)


@needs_cpu
@pytest.mark.parametrize("form", ["sgd", "adam"])
def test_cpu_bitwise_reproducible_across_thread_counts(form):
    inp = Inputs(form, "gamma", torch.float32, 1_000_003, 0, torch.device("cpu"), _seed())
    threads = torch.get_num_threads()
    results = []
    try:
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            t = inp.make()
            r2, d2 = inp.call(CPU, t)
            results.append((t["x"], r2, d2))
    finally:
        torch.set_num_threads(threads)
    for x, r2, d2 in results[1:]:
        assert torch.equal(x, results[0][0])
        assert torch.equal(r2, results[0][1]) and torch.equal(d2, results[0][2]), "norms depend on thread count"


@needs_cpu
def test_cpu_empty_tensors_give_zero_norms():
    x, g, a = (torch.empty(0) for _ in range(3))
    r2, d2 = CPU["sgd"](x, g, a, lr=0.1, lam=0.1)
    assert r2.item() == 0.0 and d2.item() == 0.0


@needs_cpu
def test_ops_surface_uses_the_cpu_backend():
    assert "cpu" in ops.available_backends()
    inp = Inputs("sgd", None, torch.float32, 1000, 0, torch.device("cpu"), _seed())
    want, got = inp.make(), inp.make()
    ref = ops.prox_sgd_step_(want["x"], want["g"], want["a"], lr=0.1, lam=0.2, backend="reference")
    res = ops.prox_sgd_step_(got["x"], got["g"], got["a"], lr=0.1, lam=0.2, backend="cpu")
    assert_close(got["x"], want["x"], **TOL[torch.float32])
    assert_close(res[0], ref[0], **NORM_TOL[torch.float32])
    ops.damp_(got["x"], got["a"], gamma=0.5, backend="cpu")
    ops.damp_(want["x"], want["a"], gamma=0.5, backend="reference")
    assert_close(got["x"], want["x"], **TOL[torch.float32])


# ------------------------------------------------------------------------------------------------------------
# bad inputs: clear errors (ValueError; TypeError for dtypes), before anything is touched

def _bad_calls(dev):
    def t(n=8, dtype=torch.float32):
        return torch.randn(n, device=dev).to(dtype)

    x = t()
    return [
        ("int dtype", TypeError, "dtype", lambda f: f["sgd"](x.int(), x.int(), x.int(), lr=0.1, lam=0.1)),
        ("g dtype", TypeError, "dtype mismatch", lambda f: f["sgd"](t(), t(dtype=torch.float64), t(), lr=0.1,
                                                                     lam=0.1)),
        ("state dtype", TypeError, "state buffer buf", lambda f: f["momentum"](
            t(dtype=torch.bfloat16), t(dtype=torch.bfloat16), t(dtype=torch.bfloat16), t(dtype=torch.bfloat16),
            lr=0.1, lam=0.1, momentum=0.9)),
        ("size", ValueError, "size mismatch", lambda f: f["sgd"](t(), t(9), t(), lr=0.1, lam=0.1)),
        ("non-contiguous", ValueError, "contiguous", lambda f: f["sgd"](t(), t(16)[::2], t(), lr=0.1, lam=0.1)),
        ("out size", ValueError, "size mismatch", lambda f: f["sgd"](t(), t(), t(), lr=0.1, lam=0.1, gamma=0.5,
                                                                      out=t(7))),
        ("shared memory", ValueError, "share memory", lambda f: f["sgd"](x, x, t(), lr=0.1, lam=0.1)),
        ("out aliases x", ValueError, "share memory", lambda f: f["sgd"](x, t(), t(), lr=0.1, lam=0.1, gamma=0.5,
                                                                          out=x)),
        ("damp without gamma or out", ValueError, "gamma= or out=", lambda f: f["damp"](t(), t())),
        ("adam step 0", ValueError, "step counts from 1", lambda f: f["adam"](
            t(), t(), t(), t(), t(), lr=0.1, lam=0.1, beta1=0.9, beta2=0.99, eps=1e-8, step=0)),
        ("damp out size", ValueError, "size mismatch", lambda f: f["damp"](t(), t(), gamma=0.5, out=t(3))),
    ]


@needs_cpu
@pytest.mark.parametrize("i", range(len(_bad_calls("cpu"))), ids=[c[0] for c in _bad_calls("cpu")])
def test_cpu_bad_inputs_raise_clear_errors(i):
    name, exc, text, call = _bad_calls("cpu")[i]
    with pytest.raises(exc, match=text) as info:
        call(CPU)
    assert "bcdcore" in str(info.value), name
    assert "\n" not in str(info.value).strip(), "one line, no C++ backtrace"


@needs_cpu
def test_cpu_backend_rejects_cuda_tensors_and_cuda_backend_rejects_cpu_tensors():
    if CUDA is not None:  # the CUDA module validates before touching the GPU: runs without one
        with pytest.raises(ValueError, match="cuda backend needs CUDA tensors"):
            CUDA["sgd"](torch.randn(4), torch.randn(4), torch.randn(4), lr=0.1, lam=0.1)
    if HAS_GPU:
        with pytest.raises(ValueError, match="cpu backend needs CPU tensors"):
            CPU["sgd"](*(torch.randn(4, device="cuda") for _ in range(3)), lr=0.1, lam=0.1)


# ------------------------------------------------------------------------------------------------------------
# CUDA

@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")
@needs_cuda_module
def test_cuda_matches_reference(case):
    check_against_reference(CUDA, case, torch.device("cuda"))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")
@needs_cuda_module
@pytest.mark.parametrize("case", [("sgd", None, torch.float32, 93_516_096, 0),
                                  ("adam", "gamma+out", torch.bfloat16, 20_000_003, "mixed")],
                         ids=["sgd-93.5M", "adam-bf16-20M-mixed"])
def test_cuda_large(case):
    check_against_reference(CUDA, case, torch.device("cuda"))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")
@needs_cuda_module
def test_cuda_bitwise_reproducible_and_on_current_stream():
    inp = Inputs("adam", "gamma", torch.float32, 5_000_011, 0, torch.device("cuda"), _seed())
    results = []
    for use_side_stream in (False, True):
        t = inp.make()
        torch.cuda.synchronize()
        stream = torch.cuda.Stream() if use_side_stream else torch.cuda.current_stream()
        with torch.cuda.stream(stream):
            r2, d2 = inp.call(CUDA, t)
        stream.synchronize()
        results.append((t["x"], t["m"], r2, d2))
    for a, b in zip(results[0], results[1]):
        assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")
@needs_cuda_module
@pytest.mark.parametrize("i", range(len(_bad_calls("cpu"))), ids=[c[0] for c in _bad_calls("cpu")])
def test_cuda_bad_inputs_raise_clear_errors(i):
    name, exc, text, call = _bad_calls("cuda")[i]
    with pytest.raises(exc, match=text):
        call(CUDA)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")
@needs_cuda_module
def test_cuda_empty_tensors_and_device_mismatch():
    e = torch.empty(0, device="cuda")
    r2, d2 = CUDA["sgd"](e, e.clone(), e.clone(), lr=0.1, lam=0.1)
    assert r2.item() == 0.0 and d2.item() == 0.0
    with pytest.raises(ValueError, match="device mismatch"):
        CUDA["sgd"](torch.randn(4, device="cuda"), torch.randn(4), torch.randn(4, device="cuda"), lr=0.1, lam=0.1)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")
@needs_cuda_module
@pytest.mark.parametrize("holds", [True, False])
@pytest.mark.parametrize("case", RULE_CASES, ids=[_ids(c) for c in RULE_CASES])
def test_cuda_rule_check_and_skip_match_reference(case, holds):
    check_rule_against_reference(CUDA, case, torch.device("cuda"), holds)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpu)])
def test_rule_state_is_checked(backend):
    fns = ops.REFERENCE if backend == "reference" else CPU
    x, g, a = (torch.randn(5) for _ in range(3))
    with pytest.raises(TypeError, match="rule state"):
        fns["rule_check"](x, g, a, torch.zeros(4), lam=0.1, coef=1.0, step=0)
    with pytest.raises(ValueError, match="rule state"):
        fns["sgd"](x, g, a, lr=0.1, lam=0.1, skip=torch.zeros(3, dtype=torch.float64))
