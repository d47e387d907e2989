"""CUDA-graph rounds of Algorithm 1: each block's inner step captured once, then replayed with no host round trip.

On a GPU an eager inner step is a few dozen kernel launches issued from Python (forward, backward, the norms
pass of the inexactness rule, the fused update), and small models leave the GPU idle between them. Here every
inner step k of block i (forward and backward on a static minibatch buffer, the rule's norms pass, the fused
step predicated on the device-side stopped flag, the damped write of the last step) is captured once as a CUDA
graph and replayed in later rounds; the stream fills the static buffer with the block's next minibatch before
each replay (the block's K index vectors go to the GPU in one copy that nobody waits for). The rule's stop stays a device flag: nothing is read by the host until the round's end, where the
rule states, the last norms and the per-step losses of every solved block come back in one copy, the round's
only synchronisation. A step the rule has stopped still replays (the kernels skip it on the device; the block's
BatchNorm statistics are put back); at the round's end the block's stream goes back to where the eager loop
leaves it and only the eager passes are counted, so graph rounds are eager rounds, minibatch for minibatch.

Capture applies on a GPU, in one process, with fixed-shape minibatches already on the device, no active
dropout (its RNG is not replayed the way eager draws it), no module that opts out (`cuda_graphs = False` on a
module, for model plugins whose forward synchronises or changes shape), and no Adam with `state_policy = "keep"`
(its bias correction changes every round, and a graph holds its constants). Elsewhere the eager loop runs and
the log says why, once. `[algorithm] cuda_graphs = "off"` turns it off.

A graph is keyed by (block, step, lambda, gamma); a new lambda (lambda = "auto" re-measured) captures again.
The capture round runs each step eagerly first (the warm-up torch asks for, and the step's real work), then
captures it; later rounds replay. All graphs share one memory pool: they replay one at a time on one stream and
keep no output in it (losses, norms and rule states are copied into buffers allocated outside).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor, nn

from bcdcore import ops
from bcdcore.data.batches import BatchStream

log = logging.getLogger(__name__)

SETTINGS = ("auto", "off")
_said: set[str] = set()


@dataclass(frozen=True)
class Decision:
    use: bool
    reason: str  # why the eager loop runs ("" when graphs are used)


def decide(model: nn.Module, streams: list, cfg, device: torch.device | str, *, comm=None) -> Decision:
    """Whether a blockwise run's rounds can be captured as CUDA graphs, and if not, why (one line)."""
    device = torch.device(device)
    setting = getattr(cfg, "cuda_graphs", "auto")
    if setting == "off":
        return Decision(False, 'cuda_graphs = "off" in the recipe')
    if device.type != "cuda":
        return Decision(False, f"the run is on {device.type}, not on a GPU")
    if comm is not None:
        return Decision(False, "a distributed run (its blocks are exchanged between ranks every round)")
    return capturable(model, streams, cfg, device)


def capturable(model: nn.Module, streams: list, cfg, device: torch.device) -> Decision:
    """The checks of `decide` that do not depend on the device type: opt-outs, dropout, the data, the solver."""
    for name, m in model.named_modules():
        if getattr(m, "cuda_graphs", True) is False:
            return Decision(False, f"module {name or 'model'} ({type(m).__name__}) opts out (cuda_graphs = False)")
    for name, m in model.named_modules():
        p = m.p if isinstance(m, nn.modules.dropout._DropoutNd) else getattr(m, "dropout", 0.0)
        if isinstance(p, (int, float)) and not isinstance(p, bool) and p > 0:
            return Decision(False, f"dropout p={p} in {name or 'model'} ({type(m).__name__}): its random numbers "
                                   "are not replayed as the eager loop draws them")
    for i, s in enumerate(streams):
        x = getattr(s, "x", None)
        if not isinstance(s, BatchStream) or type(x) is not Tensor or hasattr(x, "prefetch"):
            return Decision(False, f"dynamic shapes: block {i}'s minibatches are not fixed-shape tensors "
                                   "(a file-backed or custom data stream)")
        if x.device != device or s.y.device != device:
            return Decision(False, f"the training split is on {x.device}, not on {device}: every minibatch "
                                   "would be copied from the host")
    if cfg.solver == "adam" and cfg.state_policy == "keep":
        return Decision(False, 'adam with state_policy = "keep": its bias correction changes every round')
    return Decision(True, "")


def note(decision: Decision) -> str:
    """The decision as one log line."""
    if decision.use:
        return "CUDA graphs: each block's inner steps are captured in the first round and replayed after it"
    return f"CUDA graphs not used (eager rounds): {decision.reason}"


def say_once(decision: Decision) -> None:
    """Log the decision once per process and reason: the fallback's reason, or that graphs are used."""
    key = decision.reason or "used"
    if key in _said:
        return
    _said.add(key)
    log.info("%s", note(decision))


class Replayable(Protocol):
    def replay(self) -> None: ...


class CudaCapture:
    """The GPU's capture: warm-up on a side stream (torch's rule for capture), then torch.cuda.graph into one
    shared memory pool."""

    def __init__(self, device: torch.device) -> None:
        self.pool = torch.cuda.graph_pool_handle()
        self.side = torch.cuda.Stream(device)

    def warm(self, fn: Callable[[], None]) -> None:
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            fn()
        torch.cuda.current_stream().wait_stream(self.side)

    def capture(self, fn: Callable[[], None]) -> Replayable:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            fn()
        return graph


class StaticBatch:
    """The minibatch buffers a graph reads: allocated like the first batch (shape, dtype, memory format), then
    filled by a copy on the stream before each replay."""

    def __init__(self) -> None:
        self.x: Tensor | None = None
        self.y: Tensor | None = None

    def fill(self, xb: Tensor, yb: Tensor) -> None:
        if self.x is None:  # image batches channels-last, as BatchStream hands them out
            fmt = torch.channels_last if xb.dim() == 4 else torch.contiguous_format
            self.x = torch.empty_like(xb, memory_format=fmt)
            self.y = torch.empty_like(yb)
        for mine, new, what in ((self.x, xb, "inputs"), (self.y, yb, "targets")):
            if new.shape != mine.shape or new.dtype != mine.dtype or new.device != mine.device:
                raise RuntimeError(f"a minibatch's {what} changed from {tuple(mine.shape)} {mine.dtype} to "
                                   f"{tuple(new.shape)} {new.dtype} inside a CUDA-graph run; set [algorithm] "
                                   'cuda_graphs = "off" for data with changing shapes')
        self.x.copy_(xb)
        self.y.copy_(yb)


def draw_indices(stream: BatchStream, k: int, device: torch.device) -> Tensor:
    """The rows of the stream's next k minibatches as a [k, batch] index tensor on `device`, advancing the
    stream exactly as k calls of BatchStream.next would (not next() itself: it copies each index vector to the
    device with a blocking copy, which waits for the GPU). One copy from pinned memory, not waited for."""
    host = torch.stack([stream.draw() for _ in range(k)])
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def read_back(*parts: Tensor) -> list[float]:
    """The round's one synchronisation: every part, flattened, in one device-to-host copy."""
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in parts])
    return flat.cpu().tolist()


class GraphRound:
    """Rounds of a BlockwiseTrainer (Jacobi or Gauss-Seidel) by graph replay; `capture` is CudaCapture on a GPU
    (tests give a stand-in with the same warm/capture methods)."""

    def __init__(self, trainer, capture=None) -> None:
        self.tr = trainer
        p = trainer.params
        self.cap = capture if capture is not None else CudaCapture(p.flat.device)
        self.graphs: dict[tuple, Replayable] = {}
        self.batch = StaticBatch()
        n, k = p.n_blocks, trainer.cfg.K
        self.rules = torch.zeros(n, ops.RULE_LEN, dtype=torch.float64, device=p.flat.device)
        self.norms = torch.zeros(n, 2, dtype=torch.float64, device=p.flat.device)  # last step's r2, d2
        self.losses: Tensor | None = None  # [n, K] in the loss's dtype, allocated at the first capture
        self.shape = (n, k)
        self.stream_at: dict[int, tuple] = {}  # block -> its stream's state before this round's draws
        self.kept_buffers: dict[int, list[Tensor]] = {}  # block -> its buffers before a replayed forward
        self.failed = ""  # why a capture failed: the round finishes eagerly and the run stays eager after it

    def run_round(self, t: int) -> object:
        tr = self.tr
        active = tr.active_blocks(t)
        bases = tr.solve_blocks(active, self.solve_block)
        if active:  # rows gathered on the device (an index tensor would be a blocking host-to-device copy)
            pick = lambda t: torch.stack([t[i] for i in active])  # noqa: E731
            values = read_back(pick(self.rules), pick(self.norms), pick(self.losses))
        else:
            values = []
        na, K = len(active), tr.cfg.K
        rules, norms, losses = values[:4 * na], values[4 * na:6 * na], values[6 * na:]
        reports = [self.report(i, rules[4 * j:4 * j + 4], norms[2 * j:2 * j + 2], base)
                   for j, (i, base) in enumerate(zip(active, bases))]
        # the eager loop's loss: the mean over the passes it makes (not the replays after a stop), in its order
        used = [v for j, r in enumerate(reports) for v in losses[K * j:K * j + r.passes]]
        dtype = self.losses.dtype if self.losses is not None else torch.float32
        loss = float(torch.tensor(used, dtype=dtype).mean()) if used else math.nan  # on the host: no device read
        if self.failed:
            tr.graph_round = None
        return tr.result(loss, reports)

    def report(self, i: int, rule: list[float], norms: list[float], base: int):
        """Block i's report from its rule state and last norms, as the eager loop makes it. A block whose rule
        stopped replayed all K steps (the ones after the stop change nothing) and drew K minibatches; its
        stream goes back to where the eager loop leaves it (the passes up to the step at which the host sees
        the stop), so that later rounds see the eager loop's minibatches."""
        tr = self.tr
        cfg, lam = tr.cfg, tr.lams[i]
        passes = cfg.K
        if self.rule_on(i):
            stopped = rule[0] != 0
            applied = int(rule[3]) if stopped else cfg.K
            coef = cfg.accuracy_factor * lam
            residual, dist, threshold = math.sqrt(rule[1]), math.sqrt(rule[2]), coef * math.sqrt(rule[2])
            if stopped:
                passes = min(cfg.K, applied + 1 + tr.rule_lag)
        else:
            stopped, applied = False, cfg.K
            residual, dist, threshold = math.sqrt(norms[0]), math.sqrt(norms[1]), math.nan
        if passes < cfg.K:
            stream = tr.streams[i]
            generator_state, stream.order, stream.position = self.stream_at[i]
            stream.generator.set_state(generator_state)
            for _ in range(passes):
                stream.draw()
        tr.solver.steps[i] = base + applied  # skipped steps do not advance Adam's counter
        return tr.block_report(i, applied, stopped, residual, threshold, dist, passes)

    def rule_on(self, i: int) -> bool:
        return self.tr.cfg.accuracy_factor >= 0 and self.tr.lams[i] > 0

    def solve_block(self, i: int) -> int:
        """Block i's K inner steps, replayed (captured first where new); returns its Adam counter before them."""
        tr = self.tr
        p, cfg = tr.params, tr.cfg
        view = lambda t: p.block(i, t)  # noqa: E731
        if cfg.state_policy == "reset":
            tr.solver.reset(i, view)
        p.set_trainable({i})
        base = tr.solver.steps[i]
        if self.rule_on(i):
            self.rules[i].zero_()
        stream = tr.streams[i]
        self.stream_at[i] = (stream.generator.get_state(), stream.order, stream.position)
        rows = draw_indices(stream, cfg.K, p.flat.device)
        for k in range(cfg.K):
            self.batch.fill(stream.x.index_select(0, rows[k]), stream.y.index_select(0, rows[k]))
            key = (i, k, tr.lams[i], tr.gammas[i])
            graph = self.graphs.get(key)
            if self.failed:
                self.step_fn(i, k, base)()
            elif graph is None:
                step = self.step_fn(i, k, base)
                self.cap.warm(step)  # the step's real work this round, and the warm-up before capture
                self.graphs = {kk: g for kk, g in self.graphs.items() if kk[:2] != (i, k)}  # a stale lambda
                try:
                    self.graphs[key] = self.cap.capture(step)
                except RuntimeError as exc:  # capture records, runs nothing: this round's work is done
                    self.failed = f"capturing block {i}'s step {k} failed ({str(exc).strip().splitlines()[0]})"
                    failed = Decision(False, self.failed + "; the rest of the run is eager")
                    say_once(failed)
                    self.tr.graphs_note = note(failed)
            else:
                graph.replay()
        return base

    def step_fn(self, i: int, k: int, base: int) -> Callable[[], None]:
        """Inner step k of block i as a function of device state only: what a graph captures."""
        tr = self.tr
        p, cfg, solver = tr.params, tr.cfg, tr.solver
        lam = tr.lams[i]
        x, g, a = p.block(i), p.block(i, p.grad), p.block(i, tr.anchor)
        out = p.block(i, tr.next) if tr.next is not None else None
        last = k == cfg.K - 1
        damp = tr.last_damp(tr.gammas[i]) if last else None
        out = out if last else None
        rule = self.rules[i] if self.rule_on(i) else None
        coef = cfg.accuracy_factor * lam
        view = lambda t: p.block(i, t)  # noqa: E731
        b = tr.backend

        # Running statistics (BatchNorm) of block i move with every forward; the eager loop makes passes only up
        # to the step at which the host sees a stop (rule_lag steps after it), so a replayed forward after that
        # puts the block's buffers back (a predicated copy, decided on the device as the step's skip is)
        buffers = list(p.block_buffers[i]) if rule is not None else []
        kept = self.kept_buffers.setdefault(i, [torch.empty_like(t) for t in buffers]) if buffers else []
        lag = tr.rule_lag

        def step() -> None:
            for mine, live in zip(kept, buffers):
                mine.copy_(live)
            g.zero_()
            loss = tr.loss_fn(tr.model(self.batch.x), self.batch.y)
            loss.backward()  # (before the buffers are put back: the backward reads them)
            if buffers:
                late = (rule[0] != 0) & (rule[3] + lag < k)  # stopped before this pass's step in eager terms
                for mine, live in zip(kept, buffers):
                    live.copy_(torch.where(late, mine, live))
            if self.losses is None:
                self.losses = torch.zeros(self.shape, dtype=loss.dtype, device=loss.device)
            self.losses[i, k].copy_(loss.detach())
            if rule is not None:
                ops.rule_check_(x, g, a, rule, lam=lam, coef=coef, step=k, backend=b)
            solver.steps[i] = base + k  # the counter the eager loop has here (Adam's step is base + k + 1)
            r2, d2 = solver.step(i, x, g, a, view, lam, gamma=damp, out=out, skip=rule)
            if last:
                self.norms[i, 0].copy_(r2)
                self.norms[i, 1].copy_(d2)

        return step
