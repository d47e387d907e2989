"""Algorithm 1 (proximal block coordinate descent with damping) and the `entire` baseline.

Round t with anchor a = x_t:
  1. choose the active blocks S_t;
  2. for each i in S_t, from z_0 = a_i, run at most K solver steps on
         F_i(z) = loss(x with block i = z; minibatch) + lam_i/2 ||z - a_i||^2;
     the inexactness rule ||grad F_i(z_k)|| <= c * lam_i * ||z_k - a_i|| is checked at z_k with the gradient
     the solver computed there (no extra forward/backward); when it holds the block returns z_k: the step from
     z_k is not applied. Without a stop the block returns z_K;
  3. damping x_{t+1,i} = a_i + gamma_i (xhat_i - a_i) of the returned point; blocks outside S_t keep a_i.
With the rule on, an inner step is a norms pass (ops.rule_check_) and a step predicated on the device-side
stopped flag (skip=rule): the decision never leaves the device. The host reads the flag through a pinned,
non-blocking copy checked one step later (`rule_lag` = 1 on CUDA), so after a stop one more forward/backward
runs, changes nothing and is counted; on the CPU, where reading it costs nothing, at once (`rule_lag` = 0).
Jacobi: every subproblem sees the other blocks at x_t (each block's result goes to `next`, its slice of x is
put back to a_i in the same fused pass; for fp32/fp64 parameters the result is undamped and one multi-slice
write damps every solved block into x at the round's end). On a GPU the rounds replay CUDA graphs where capture
applies (bcdcore.graphs). Gauss-Seidel: blocks in order, each damped in place, so later
blocks see earlier blocks' new values. Memory beyond the model: anchor, next (Jacobi), the flat gradient and
the solver state, all flat and independent of the number of blocks.

Solver state policy (`state_policy`): "reset" (default) zeroes a block's momentum/Adam state at each new
anchor, because F_i changes with the anchor and old momentum points along a different objective; "keep"
carries each block's state (and Adam step count) across rounds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor, nn

from bcdcore import graphs, ops
from bcdcore.data.batches import BatchStream
from bcdcore.params import FlatParams
from bcdcore.recipe import AlgorithmConfig
from bcdcore.solvers import BUILTIN_STATE, PluginSolver

if TYPE_CHECKING:  # a distributed run's communicator (bcdcore.run.distributed); only its type is named
    from bcdcore.run.distributed import Comm

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class BlockReport:
    block: int
    inner_steps: int  # solver steps applied: the block returned z_{inner_steps}
    stopped_early: bool  # the rule certified the returned point z_{inner_steps} (then inner_steps <= K - 1)
    residual: float  # ||grad F_i(z_k)||: at the returned point when stopped, else at z_{K-1} (last checked)
    threshold: float  # c * lam_i * ||z_k - a_i|| there (nan when the rule is off)
    dist: float  # ||z_k - a_i|| there
    lam: float
    gamma: float
    passes: int = 0  # forward+backward passes run for this block (a pass after the stop included)


@dataclass
class RoundResult:
    train_loss: float  # mean minibatch loss (without the proximal term) over the round's passes
    grad_evals: int  # forward+backward passes on one minibatch (partial or full)
    samples: int
    blocks: list[BlockReport] = field(default_factory=list)
    flops: float = 0.0  # of those passes, from the trainer's flop table (0 without one)


class Solver:
    """The inner solver: flat state buffers (parameter-sized) and the matching fused op."""

    def __init__(self, cfg: AlgorithmConfig, like: Tensor, n_blocks: int, backend: str) -> None:
        self.cfg, self.backend = cfg, backend
        state_dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        # a plugin solver ("pkg.module:Solver", bcdcore.solvers) says how many state buffers it needs
        self.plugin = PluginSolver(cfg) if cfg.solver not in BUILTIN_STATE else None
        n_state = self.plugin.n_state if self.plugin is not None else BUILTIN_STATE[cfg.solver]
        self.state = [torch.zeros(like.numel(), dtype=state_dtype, device=like.device) for _ in range(n_state)]
        self.steps = [0] * n_blocks  # Adam's bias-correction counters, per block

    def reset(self, block: int, view: Callable[[Tensor], Tensor]) -> None:
        for buf in self.state:
            view(buf).zero_()
        self.steps[block] = 0

    def step(self, block: int, x: Tensor, g: Tensor, a: Tensor, view: Callable[[Tensor], Tensor], lam: float,
             gamma: float | None = None, out: Tensor | None = None,
             skip: Tensor | None = None) -> tuple[Tensor, Tensor]:
        c, b = self.cfg, self.backend
        self.steps[block] += 1  # a skipped step is taken back by the caller once it knows (uncount)
        if self.plugin is not None:
            return self.plugin.step(x, g, a, [view(s) for s in self.state], lr=c.lr, lam=lam,
                                    step=self.steps[block], gamma=gamma, out=out, skip=skip, backend=b)
        if c.solver == "sgd":
            return ops.prox_sgd_step_(x, g, a, lr=c.lr, lam=lam, gamma=gamma, out=out, skip=skip, backend=b)
        if c.solver == "momentum":
            return ops.prox_momentum_step_(x, g, a, view(self.state[0]), lr=c.lr, lam=lam, momentum=c.momentum,
                                           nesterov=c.nesterov, gamma=gamma, out=out, skip=skip, backend=b)
        return ops.prox_adam_step_(x, g, a, view(self.state[0]), view(self.state[1]), lr=c.lr, lam=lam,
                                   beta1=c.beta1, beta2=c.beta2, eps=c.eps, step=self.steps[block],
                                   gamma=gamma, out=out, skip=skip, backend=b)

    def uncount(self, block: int, skipped: int) -> None:
        """Steps the device skipped (the rule had stopped) do not advance Adam's bias-correction counter."""
        self.steps[block] -= skipped

    def state_dict(self) -> dict:
        return {"state": self.state, "steps": list(self.steps)}

    def load_state_dict(self, state: dict) -> None:
        for mine, saved in zip(self.state, state["state"]):
            mine.copy_(saved)
        self.steps = list(state["steps"])


class BlockwiseTrainer:
    """Algorithm 1 over a model whose parameters live in a FlatParams store."""

    def __init__(self, model: nn.Module, params: FlatParams, loss_fn: LossFn, streams: list[BatchStream],
                 cfg: AlgorithmConfig, lams: list[float], gammas: list[float], backend: str,
                 seed: int, comm: "Comm | None" = None) -> None:
        n = params.n_blocks
        if not (len(streams) == len(lams) == len(gammas) == n):
            raise ValueError("one stream, lambda and gamma per block are required")
        self.model, self.params, self.loss_fn, self.streams = model, params, loss_fn, streams
        self.cfg, self.lams, self.gammas, self.backend = cfg, lams, gammas, backend
        self.anchor = torch.empty_like(params.flat)
        self.next = torch.empty_like(params.flat) if cfg.schedule == "jacobi" else None
        self.solver = Solver(cfg, params.flat, n, backend)
        self.active_generator = torch.Generator().manual_seed(seed)
        self.flop_table = None  # bcdcore.flops.FlopTable: set by the run to count each round's flops
        # The rule state ([stopped, r2, d2, k], on the device) and the host's view of it a step later.
        self.rule = ops.new_rule_state(params.flat)
        on_gpu = params.flat.device.type == "cuda"
        self.rule_lag = 1 if on_gpu else 0
        self._rule_host = [torch.zeros(ops.RULE_LEN, dtype=torch.float64, pin_memory=on_gpu) for _ in range(2)]
        self.comm = comm  # bcdcore.run.distributed.Comm when the blocks are spread over ranks
        if comm is not None:
            comm.assign([n * params.flat.element_size() for n in params.sizes])
        # Jacobi damps every solved block at the round's end in one multi-slice write (each block's last step
        # moves its undamped point to `next`): the bits of damping each block in its last step where the
        # parameters' storage is their math type (fp32, fp64); 16-bit parameters keep the fused damping.
        self.defer_damping = (self.next is not None and comm is None
                              and params.flat.dtype in (torch.float32, torch.float64))
        # CUDA graphs: each block's inner steps captured once and replayed (bcdcore.graphs), where they apply
        decision = graphs.decide(model, streams, cfg, params.flat.device, comm=comm)
        graphs.say_once(decision)
        self.graph_round = graphs.GraphRound(self) if decision.use else None
        self.graphs_note = graphs.note(decision)  # the line the run's log gets (bcdcore.run.loop)

    def active_blocks(self, t: int) -> list[int]:
        n = self.params.n_blocks
        if self.cfg.active_share >= 1:
            return list(range(n))
        m = max(1, math.floor(self.cfg.active_share * n))
        if self.cfg.active_rule == "cyclic":
            return sorted((t * m + j) % n for j in range(m))
        return sorted(torch.randperm(n, generator=self.active_generator)[:m].tolist())

    def run_round(self, t: int) -> RoundResult:
        if self.comm is not None:
            return self._run_round_distributed(t)
        if self.graph_round is not None:
            return self.graph_round.run_round(t)
        losses: list[Tensor] = []
        reports = self.solve_blocks(self.active_blocks(t), lambda i: self.solve_block(i, losses))
        return self.result(torch.stack(losses).mean().item() if losses else math.nan, reports)

    def solve_blocks(self, active: list[int], solve: Callable[[int], object]) -> list:
        """One round's block solves from the anchor x_t (`solve(i)` solves block i), the buffers moved with their
        blocks and, for Jacobi, the solved blocks written to x. Returns what `solve` returned, in order."""
        p, cfg = self.params, self.cfg
        self.model.train()
        self.anchor.copy_(p.flat)
        anchor_buffers = p.snapshot_buffers()
        out, new_buffers = [], {}
        for i in active:
            before = anchor_buffers if cfg.schedule == "jacobi" else p.snapshot_buffers()
            out.append(solve(i))
            # Buffers (BatchNorm statistics) move with their block: keep block i's, undo the drift that the
            # forward passes caused in every other block.
            if cfg.schedule == "jacobi":
                new_buffers[i] = [b.detach().clone() for b in p.block_buffers[i]]
                p.restore_buffers(before)
            else:
                p.restore_buffers(before, [j for j in range(p.n_blocks) if j != i])
        if cfg.schedule == "jacobi":
            if self.defer_damping and active:  # x_{t+1,i} = a_i + gamma_i (xhat_i - a_i): one multi-slice write
                ops.damp_multi_(self.next, self.anchor, bounds=[(p.offsets[i], p.offsets[i + 1]) for i in active],
                                gammas=[self.gammas[i] for i in active], out=p.flat, backend=self.backend)
            for i in active:
                if not self.defer_damping:
                    p.block(i).copy_(p.block(i, self.next))
                for live, new in zip(p.block_buffers[i], new_buffers[i]):
                    live.copy_(new)
        p.set_trainable(None)
        return out

    def result(self, loss: float, reports: list[BlockReport]) -> RoundResult:
        """The round's result from its mean loss and block reports (passes, samples, flops counted)."""
        passes = sum(r.passes for r in reports)
        table = self.flop_table
        flops = sum(table.block_pass(r.block) * r.passes for r in reports) if table is not None else 0.0
        return RoundResult(train_loss=loss, grad_evals=passes, samples=passes * self.streams[0].batch_size,
                           blocks=reports, flops=flops)

    _result = result  # its earlier name, still used by code written against it (the distributed round)

    def _run_round_distributed(self, t: int) -> RoundResult:
        """Jacobi over ranks: solve the owned active blocks from x_t, then exchange the damped results so
        every rank holds the x_{t+1} (and buffers) of the 1-process run. Reports and per-step losses are
        gathered, so the train_loss is the same mean in the same order as in one process."""
        p, comm = self.params, self.comm
        self.model.train()
        self.anchor.copy_(p.flat)
        anchor_buffers = p.snapshot_buffers()
        active = self.active_blocks(t)
        mine, new_buffers = [], {}
        for i in active:
            if not comm.owns(i):
                continue
            losses: list[Tensor] = []
            report = self.solve_block(i, losses)
            mine.append((report, [x.item() for x in losses]))
            new_buffers[i] = [b.detach().clone() for b in p.block_buffers[i]]
            p.restore_buffers(anchor_buffers)
        for report, _ in mine:
            p.block(report.block).copy_(p.block(report.block, self.next))
            for live, new in zip(p.block_buffers[report.block], new_buffers[report.block]):
                live.copy_(new)
        p.set_trainable(None)
        comm.exchange_blocks(p, active)
        gathered = comm.all_gather_object(mine)
        everything = sorted((item for part in gathered for item in part), key=lambda item: item[0].block)
        reports = [r for r, _ in everything]
        values = [v for _, vs in everything for v in vs]
        loss = torch.tensor(values, dtype=p.flat.dtype).mean().item() if values else math.nan
        return self._result(loss, reports)

    def merge_states(self, states: list[dict]) -> dict:
        """One checkpointable state from every rank's: each block's solver state, step counter and stream
        come from its owner."""
        merged = states[0]
        owner = self.comm.owner
        for i, r in enumerate(owner):
            if r == 0:
                continue
            src = states[r]
            for mine, theirs in zip(merged["solver"]["state"], src["solver"]["state"]):
                self.params.block(i, mine).copy_(self.params.block(i, theirs.to(mine.device)))
            merged["solver"]["steps"][i] = src["solver"]["steps"][i]
            merged["streams"][i] = src["streams"][i]
        return merged

    def solve_block(self, i: int, losses: list[Tensor]) -> BlockReport:
        p, cfg = self.params, self.cfg
        lam, gamma = self.lams[i], self.gammas[i]
        view = lambda t: p.block(i, t)  # noqa: E731
        x, g, a = p.block(i), p.block(i, p.grad), p.block(i, self.anchor)
        out = p.block(i, self.next) if self.next is not None else None
        damp = self.last_damp(gamma)
        if cfg.state_policy == "reset":
            self.solver.reset(i, view)
        p.set_trainable({i})
        if cfg.accuracy_factor >= 0 and lam > 0:
            return self._solve_with_rule(i, losses, x, g, a, out, view, lam, gamma, damp)
        r2 = d2 = None
        for k in range(cfg.K):
            self._pass(i, g, losses)
            last = k == cfg.K - 1
            r2, d2 = self.solver.step(i, x, g, a, view, lam, gamma=damp if last else None, out=out if last else None)
        return BlockReport(block=i, inner_steps=cfg.K, stopped_early=False, residual=math.sqrt(r2.item()),
                           threshold=math.nan, dist=math.sqrt(d2.item()), lam=lam, gamma=gamma, passes=cfg.K)

    def block_report(self, i: int, applied: int, stopped: bool, residual: float, threshold: float, dist: float,
                     passes: int) -> BlockReport:
        return BlockReport(block=i, inner_steps=applied, stopped_early=stopped, residual=residual,
                           threshold=threshold, dist=dist, lam=self.lams[i], gamma=self.gammas[i], passes=passes)

    def last_damp(self, gamma: float) -> float | None:
        """The gamma of a block's last step: None when it writes the undamped point (deferred Jacobi damping,
        or Gauss-Seidel with gamma = 1, which needs no damping write at all)."""
        if self.defer_damping:
            return None
        return gamma if (self.next is not None or gamma != 1.0) else None

    def _pass(self, i: int, g: Tensor, losses: list[Tensor]) -> None:
        """One forward/backward on block i's next minibatch; the gradient lands in g (block i's slice)."""
        xb, yb = self.streams[i].next()
        g.zero_()
        loss = self.loss_fn(self.model(xb), yb)
        loss.backward()
        losses.append(loss.detach())

    def _solve_with_rule(self, i: int, losses: list[Tensor], x: Tensor, g: Tensor, a: Tensor, out: Tensor | None,
                         view: Callable[[Tensor], Tensor], lam: float, gamma: float,
                         damp: float | None) -> BlockReport:
        """Inner steps with the inexactness rule: a norms pass that decides on the device, then the step,
        predicated on that decision; the returned point is the one the rule certified."""
        cfg, b, rule = self.cfg, self.backend, self.rule
        coef = cfg.accuracy_factor * lam
        rule.zero_()
        copies: list = [None, None]  # per host buffer: the event of its copy (CUDA) or True (CPU)
        passes = 0
        for k in range(cfg.K):
            self._pass(i, g, losses)
            passes += 1
            ops.rule_check_(x, g, a, rule, lam=lam, coef=coef, step=k, backend=b)
            last = k == cfg.K - 1
            self.solver.step(i, x, g, a, view, lam, gamma=damp if last else None, out=out if last else None,
                             skip=rule)
            if self._stop_seen(k, copies):
                break
        if not last and (damp is not None or out is not None):  # left before the damped write of step K-1
            ops.damp_(x, a, gamma=damp, out=out, backend=b)
        stopped, r2, d2, k_rule = rule.tolist()  # one read per block solve, not per inner step
        stopped = stopped != 0
        applied = int(k_rule) if stopped else cfg.K
        self.solver.uncount(i, passes - applied)
        dist = math.sqrt(d2)
        return BlockReport(block=i, inner_steps=applied, stopped_early=stopped, residual=math.sqrt(r2),
                           threshold=coef * dist, dist=dist, lam=lam, gamma=gamma, passes=passes)

    def _stop_seen(self, k: int, copies: list) -> bool:
        """Whether the host knows the rule has stopped, `rule_lag` steps after the step that decided it. On
        CUDA the rule state of step k goes to pinned memory by a non-blocking copy; the copy of step k - 1
        is waited for (its work is done, step k's is queued behind it, so the GPU never idles) and read."""
        if self.rule_lag == 0:
            return self.rule[0].item() != 0  # a CPU tensor: no device to wait for
        slot = k % 2
        on_gpu = self.rule.device.type == "cuda"
        self._rule_host[slot].copy_(self.rule, non_blocking=on_gpu)
        event = None
        if on_gpu:
            event = torch.cuda.Event()
            event.record()
        copies[slot] = event if on_gpu else True  # (lag 1 on the CPU: tests of the GPU's order of events)
        prev = copies[1 - slot]
        if k == 0 or prev is None:
            return False
        if prev is not True:
            prev.synchronize()
        return self._rule_host[1 - slot][0].item() != 0

    def state_dict(self) -> dict:
        return {"solver": self.solver.state_dict(), "active_generator": self.active_generator.get_state(),
                "streams": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: dict) -> None:
        self.solver.load_state_dict(state["solver"])
        self.active_generator.set_state(state["active_generator"])
        for stream, saved in zip(self.streams, state["streams"]):
            stream.load_state_dict(saved)


class EntireTrainer:
    """The baseline: the whole model trained by the same solver, K steps per round, state kept throughout."""

    def __init__(self, model: nn.Module, params: FlatParams, loss_fn: LossFn, stream: BatchStream,
                 cfg: AlgorithmConfig, backend: str, comm: "Comm | None" = None) -> None:
        self.model, self.params, self.loss_fn, self.stream, self.cfg = model, params, loss_fn, stream, cfg
        self.backend = backend
        self.comm = comm
        self.net = model
        if comm is not None:
            # Data parallel: each rank its own minibatch stream, gradients averaged by DDP's reducer into the
            # flat grad buffer (parameters keep their flat views), so every rank takes the same step.
            from torch.nn.parallel import DistributedDataParallel

            dev = params.flat.device
            self.net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        self.solver = Solver(cfg, params.flat, 1, backend)
        self.flop_table = None  # bcdcore.flops.FlopTable: set by the run to count each round's flops
        # lam = 0, so the anchor plays no part in the step; the fused ops still need a distinct buffer to
        # read, and holding x at the round's start makes the returned distance mean something.
        self.anchor = torch.empty_like(params.flat)

    def run_round(self, t: int) -> RoundResult:
        p = self.params
        self.model.train()
        p.set_trainable(None)
        x, g = p.flat, p.grad
        self.anchor.copy_(x)
        whole = lambda t: t  # noqa: E731
        losses = []
        for _ in range(self.cfg.K):
            xb, yb = self.stream.next()
            g.zero_()
            loss = self.loss_fn(self.net(xb), yb)
            loss.backward()
            losses.append(loss.detach())
            if self.comm is not None:
                if not p.grads_in_place():
                    raise RuntimeError("DistributedDataParallel replaced the flat gradient views")
                self.comm.account_all_reduce(g.numel() * g.element_size())
            self.solver.step(0, x, g, self.anchor, whole, 0.0)
        steps = self.cfg.K
        per_pass = self.flop_table.full if self.flop_table is not None else 0.0
        if self.comm is not None:  # the mean over every rank's steps
            total, count = self.comm.sum_floats([torch.stack(losses).sum().item(), steps])
            w = self.comm.world
            return RoundResult(train_loss=total / count, grad_evals=steps * w,
                               samples=steps * w * self.stream.batch_size, flops=steps * w * per_pass)
        return RoundResult(train_loss=torch.stack(losses).mean().item(), grad_evals=steps,
                           samples=steps * self.stream.batch_size, flops=steps * per_pass)

    def state_dict(self) -> dict:
        return {"solver": self.solver.state_dict(), "stream": self.stream.state_dict()}

    def merge_states(self, states: list[dict]) -> dict:
        """Checkpoint of a data-parallel run: rank 0's (the solver state is the same on every rank) plus
        every rank's stream."""
        return {**states[0], "rank_streams": [s["stream"] for s in states]}

    def load_state_dict(self, state: dict) -> None:
        self.solver.load_state_dict(state["solver"])
        streams = state.get("rank_streams")
        if self.comm is not None and streams and len(streams) == self.comm.world:
            self.stream.load_state_dict(streams[self.comm.rank])
        else:
            self.stream.load_state_dict(state["stream"])
