"""CUDA-graph rounds (bcdcore.graphs): when capture applies and why not (said once), the static minibatch buffers,
the round's single read-back, and GraphRound's rounds against the eager loop.

Without a GPU, GraphRound runs with a stand-in capture whose `replay` calls the captured function again: the
host-side logic (which step is captured when, the keys, the static buffers, the Adam counter, the per-block rule
states and the one read-back per round) is the same code the GPU runs, and its rounds must give the eager loop's
numbers bit for bit. The `cuda` tests compare real graphs with eager rounds on the same minibatches.
"""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bcdcore import graphs
from bcdcore.algorithm import BlockwiseTrainer
from bcdcore.data.batches import BatchStream, stream_seed
from bcdcore.models import build_model
from bcdcore.params import FlatParams
from bcdcore.recipe import AlgorithmConfig, ModelConfig

HAS_GPU = torch.cuda.is_available()


class FakeCapture:
    """The capture interface without a GPU: warm runs the step, a 'graph' replays it by calling it again."""

    def __init__(self) -> None:
        self.warmed = self.captured = self.replayed = 0

    def warm(self, fn) -> None:
        self.warmed += 1
        fn()

    def capture(self, fn):
        self.captured += 1
        outer = self

        class Graph:
            def replay(self) -> None:
                outer.replayed += 1
                fn()

        return Graph()


def make(cfg: AlgorithmConfig, device="cpu", seed=0, widths=(4, 6, 8), n=96, batch=16, dtype=torch.float32):
    model = build_model(ModelConfig(name="cnn", widths=list(widths)), (3, 8, 8), 10, seed).to(device, dtype)
    params = FlatParams(model, model.blocks)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 3, 8, 8, generator=gen).to(device, dtype)
    y = torch.randint(0, 10, (n,), generator=gen).to(device)
    nb = params.n_blocks
    streams = [BatchStream(x, y, batch, stream_seed(seed, i)) for i in range(nb)]
    lams = [0.1 * (1 + i) for i in range(nb)]
    gammas = [1.0 - 0.2 * i for i in range(nb)]
    backend = "cuda" if torch.device(device).type == "cuda" else "cpu"
    from bcdcore import ops
    if backend not in ops.available_backends():
        backend = "reference"
    tr = BlockwiseTrainer(model, params, F.cross_entropy, streams, cfg, lams, gammas, backend, seed)
    return tr


def cfg_of(**kw) -> AlgorithmConfig:
    base = dict(mode="blockwise", schedule="jacobi", K=3, lam=0.1, gamma=1.0, solver="sgd", lr=0.05)
    return AlgorithmConfig(**{**base, **kw})


def state(tr) -> list[torch.Tensor]:
    return [tr.params.flat.clone()] + [b.clone() for bs in tr.params.block_buffers for b in bs] + \
        [s.clone() for s in tr.solver.state]


# ------------------------------------------------------------------------------------------------------------
# when capture applies


def test_decide_falls_back_on_cpu_when_off_and_when_distributed():
    tr = make(cfg_of())
    d = graphs.decide(tr.model, tr.streams, tr.cfg, "cpu")
    assert not d.use and "on cpu" in d.reason
    assert tr.graph_round is None  # a CPU run keeps the eager loop, unchanged
    d = graphs.decide(tr.model, tr.streams, cfg_of(cuda_graphs="off"), "cuda")
    assert not d.use and '"off"' in d.reason
    d = graphs.decide(tr.model, tr.streams, tr.cfg, "cuda", comm=object())
    assert not d.use and "distributed" in d.reason
    d = graphs.decide(tr.model, tr.streams, tr.cfg, "cuda")  # the split lives on the CPU here
    assert not d.use and "copied from the host" in d.reason
    assert tr.graphs_note == "CUDA graphs not used (eager rounds): the run is on cpu, not on a GPU"


def test_capturable_accepts_a_plain_model_and_names_each_reason():
    tr = make(cfg_of())
    dev = torch.device("cpu")
    assert graphs.capturable(tr.model, tr.streams, tr.cfg, dev) == graphs.Decision(True, "")

    opted = copy.deepcopy(tr.model)
    opted.blocks[1].cuda_graphs = False  # a plugin's module opts out
    d = graphs.capturable(opted, tr.streams, tr.cfg, dev)
    assert not d.use and "blocks.1" in d.reason and "opts out" in d.reason

    dropped = copy.deepcopy(tr.model)
    dropped.blocks[0].append(nn.Dropout(0.25))
    d = graphs.capturable(dropped, tr.streams, tr.cfg, dev)
    assert not d.use and "dropout p=0.25" in d.reason
    dropped.blocks[0][-1].p = 0.0  # inactive dropout is harmless
    assert graphs.capturable(dropped, tr.streams, tr.cfg, dev).use

    class Prefetching(torch.Tensor):  # a file-backed split decodes on the host
        prefetch = None

    files = [BatchStream(s.x.as_subclass(Prefetching), s.y, 16, 0) for s in tr.streams]
    d = graphs.capturable(tr.model, files, tr.cfg, dev)
    assert not d.use and "dynamic shapes" in d.reason
    d = graphs.capturable(tr.model, [object()] * len(tr.streams), tr.cfg, dev)
    assert not d.use and "dynamic shapes" in d.reason

    d = graphs.capturable(tr.model, tr.streams, cfg_of(solver="adam", state_policy="keep"), dev)
    assert not d.use and "bias correction" in d.reason
    assert graphs.capturable(tr.model, tr.streams, cfg_of(solver="adam"), dev).use


def test_recipe_key_cuda_graphs(write_recipe):
    from conftest import TINY

    from bcdcore.recipe import RecipeError, load_recipe

    assert load_recipe(write_recipe(TINY)).algorithm.cuda_graphs == "auto"
    assert load_recipe(write_recipe(TINY), ['algorithm.cuda_graphs="off"']).algorithm.cuda_graphs == "off"
    with pytest.raises(RecipeError, match="algorithm.cuda_graphs") as info:
        load_recipe(write_recipe(TINY), ['algorithm.cuda_graphs="on"'])
    assert "\n" not in str(info.value).strip()


def test_fallback_reason_is_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(graphs, "_said", set())
    with caplog.at_level(logging.INFO, logger="bcdcore.graphs"):
        for _ in range(3):
            graphs.say_once(graphs.Decision(False, "the run is on cpu, not on a GPU"))
        graphs.say_once(graphs.Decision(False, "dropout p=0.1 in blocks.0"))
        graphs.say_once(graphs.Decision(True, ""))
        graphs.say_once(graphs.Decision(True, ""))
    lines = [r.getMessage() for r in caplog.records]
    assert lines.count("CUDA graphs not used (eager rounds): the run is on cpu, not on a GPU") == 1
    assert sum("dropout" in m for m in lines) == 1 and sum("captured" in m for m in lines) == 1


# ------------------------------------------------------------------------------------------------------------
# static buffers and the read-back


def test_static_batch_keeps_its_memory_and_layout_and_refuses_a_new_shape():
    sb = graphs.StaticBatch()
    xb = torch.randn(4, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    yb = torch.arange(4)
    sb.fill(xb, yb)
    ptr = sb.x.data_ptr()
    assert sb.x.is_contiguous(memory_format=torch.channels_last) and torch.equal(sb.x, xb)
    xb2, yb2 = torch.randn(4, 3, 5, 5), torch.arange(4) + 1
    sb.fill(xb2, yb2)
    assert sb.x.data_ptr() == ptr and torch.equal(sb.x, xb2) and torch.equal(sb.y, yb2)
    with pytest.raises(RuntimeError, match=r"changed from \(4, 3, 5, 5\).*cuda_graphs = \"off\""):
        sb.fill(torch.randn(3, 3, 5, 5), torch.arange(3))


def test_draw_indices_advances_the_stream_as_next_does():
    x, y = torch.randn(50, 3), torch.arange(50)
    a, b = BatchStream(x, y, 16, 7), BatchStream(x, y, 16, 7)
    for k in (2, 3, 1, 4):  # 16-row batches of 50 rows: epochs end (and reshuffle) inside these draws
        rows = graphs.draw_indices(b, k, torch.device("cpu"))
        for j in range(k):
            xb, yb = a.next()
            assert torch.equal(x.index_select(0, rows[j]), xb) and torch.equal(y.index_select(0, rows[j]), yb)
        assert a.position == b.position and torch.equal(a.order, b.order)
        assert torch.equal(a.generator.get_state(), b.generator.get_state())


def test_read_back_is_one_copy_in_order():
    a = torch.tensor([[1.0, 0.0, 2.0, 3.0]], dtype=torch.float64)
    b = torch.tensor([0.5, 0.25], dtype=torch.float32)
    assert graphs.read_back(a, b, torch.tensor(7.0)) == [1.0, 0.0, 2.0, 3.0, 0.5, 0.25, 7.0]


# ------------------------------------------------------------------------------------------------------------
# GraphRound against the eager loop (CPU, stand-in capture)


CASES = [dict(), dict(schedule="gauss_seidel"), dict(solver="momentum", nesterov=True),
         dict(solver="adam", lr=0.01), dict(accuracy_factor=1e-3), dict(solver="adam", accuracy_factor=1e-3),
         dict(schedule="gauss_seidel", accuracy_factor=1e-3, gamma=0.5), dict(active_share=0.5)]


@pytest.mark.parametrize("kw", CASES, ids=[",".join(f"{k}={v}" for k, v in c.items()) or "jacobi" for c in CASES])
def test_graph_rounds_equal_eager_rounds_bit_for_bit(kw):
    eager, replay = make(cfg_of(**kw)), make(cfg_of(**kw))
    cap = FakeCapture()
    replay.graph_round = graphs.GraphRound(replay, cap)
    nb, k = eager.params.n_blocks, eager.cfg.K
    for t in range(3):
        a, b = eager.run_round(t), replay.run_round(t)
        for x, y in zip(state(eager), state(replay)):
            assert torch.equal(x, y), f"round {t}: graph rounds differ from eager"
        assert a.train_loss == b.train_loss and a.grad_evals == b.grad_evals
        assert [vars(r) for r in a.blocks] == [vars(r) for r in b.blocks]
        assert eager.solver.steps == replay.solver.steps
    solved = sum(len(eager.active_blocks(t)) for t in range(3))
    assert cap.warmed == cap.captured <= nb * k and cap.warmed + cap.replayed == solved * k


@pytest.mark.parametrize("lag", [0, 1])
def test_a_firing_rule_keeps_the_certified_point_and_the_eager_minibatches(lag):
    """The stop is a device flag: every step replays (skipped on the device), the point is eager's, and the
    stream goes back to where the eager loop leaves it (lag 1: the GPU's, which sees a stop one step late), so
    the rounds after a stop see the same minibatches, losses and passes as eager rounds."""
    kw = dict(accuracy_factor=50.0, K=4)
    eager, replay = make(cfg_of(**kw)), make(cfg_of(**kw))
    eager.rule_lag = replay.rule_lag = lag
    cap = FakeCapture()
    replay.graph_round = graphs.GraphRound(replay, cap)
    short = 0  # blocks whose eager solve made fewer than K passes
    for t in range(3):
        a, b = eager.run_round(t), replay.run_round(t)
        assert any(r.stopped_early for r in a.blocks), "the test needs a rule that fires"
        short += sum(r.passes < 4 for r in a.blocks)
        for x, y in zip(state(eager), state(replay)):
            assert torch.equal(x, y), f"round {t}: graph rounds differ from eager"
        assert [vars(r) for r in a.blocks] == [vars(r) for r in b.blocks]
        assert (a.train_loss, a.grad_evals) == (b.train_loss, b.grad_evals)
        assert [s.position for s in eager.streams] == [s.position for s in replay.streams]
        assert replay.solver.steps == eager.solver.steps
    assert short, "the test needs a stop the eager loop sees before its last pass"
    assert cap.warmed + cap.replayed == 3 * eager.params.n_blocks * 4  # every step replayed


def test_a_replayed_round_reads_the_device_once(monkeypatch):
    tr = make(cfg_of(accuracy_factor=1e-3))
    tr.graph_round = graphs.GraphRound(tr, FakeCapture())
    tr.run_round(0)  # the capture round
    calls = {"item": 0, "tolist": 0, "read_back": 0}
    item, tolist, read_back = torch.Tensor.item, torch.Tensor.tolist, graphs.read_back

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(torch.Tensor, "item", counting("item", item))
    monkeypatch.setattr(torch.Tensor, "tolist", counting("tolist", tolist))
    monkeypatch.setattr(graphs, "read_back", counting("read_back", read_back))
    tr.run_round(1)
    assert calls == {"item": 0, "tolist": 1, "read_back": 1}


def test_a_new_lambda_captures_again():
    tr = make(cfg_of())
    cap = FakeCapture()
    tr.graph_round = graphs.GraphRound(tr, cap)
    tr.run_round(0)
    first = cap.captured
    tr.run_round(1)
    assert cap.captured == first
    tr.lams[0] *= 2  # lambda = "auto" re-measured
    tr.run_round(2)
    assert cap.captured == first + tr.cfg.K and len(tr.graph_round.graphs) == first


def test_a_failed_capture_finishes_the_round_eagerly_and_says_so(caplog, monkeypatch):
    class Failing(FakeCapture):
        def capture(self, fn):
            if self.captured == 2:
                raise RuntimeError("operation not permitted when stream is capturing\nmore")
            return super().capture(fn)

    monkeypatch.setattr(graphs, "_said", set())
    eager, replay = make(cfg_of(accuracy_factor=1e-3)), make(cfg_of(accuracy_factor=1e-3))
    replay.graph_round = graphs.GraphRound(replay, Failing())
    with caplog.at_level(logging.INFO, logger="bcdcore.graphs"):
        for t in range(2):
            eager.run_round(t)
            replay.run_round(t)
            assert torch.equal(eager.params.flat, replay.params.flat)
    assert replay.graph_round is None  # eager from the next round on
    lines = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(lines) == 1 and "step 2 failed (operation not permitted when stream is capturing)" in lines[0]
    assert replay.graphs_note == lines[0]  # the run's log gets it too (bcdcore.run.loop)


# ------------------------------------------------------------------------------------------------------------
# GPU


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")
@pytest.mark.parametrize("kw", [dict(), dict(solver="adam", lr=0.01, accuracy_factor=1e-3),
                                dict(schedule="gauss_seidel", gamma=0.7, solver="momentum")])
def test_cuda_graph_rounds_equal_eager_rounds(kw):
    """Real CUDA graphs against the eager loop on the same minibatches: equal to fp32 roundoff."""
    eager = make(cfg_of(**kw, cuda_graphs="off"), device="cuda")
    replay = make(cfg_of(**kw), device="cuda")
    assert eager.graph_round is None and replay.graph_round is not None
    for t in range(4):
        a, b = eager.run_round(t), replay.run_round(t)
        torch.testing.assert_close(replay.params.flat, eager.params.flat, rtol=1e-5, atol=1e-6)
        assert abs(a.train_loss - b.train_loss) <= 1e-5 * max(1.0, abs(a.train_loss))
        assert [r.inner_steps for r in a.blocks] == [r.inner_steps for r in b.blocks]


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")
def test_cuda_replayed_round_synchronises_once():
    import warnings

    tr = make(cfg_of(accuracy_factor=1e-3), device="cuda")
    assert tr.graph_round is not None
    tr.run_round(0)  # the capture round
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            tr.run_round(1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in seen if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
