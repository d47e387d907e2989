"""Seconds per round of Algorithm 1 (bcdcore's BlockwiseTrainer) against a naive implementation, side by side.

One process, one model, one data set, one set of hyper-parameters for every candidate:
  - a 4-block CNN (bcdcore.models.build_model, name "cnn": 3 conv blocks + a linear head), 3x32x32 inputs,
    10 classes, synthetic random data from a seeded torch.Generator;
  - Jacobi, K inner steps, batch 128, lambda 0.1, gamma 1.0, SGD solver, the inexactness rule checked at every
    inner step with a threshold that never fires here, so both candidates run K steps per block (verified).
Candidates:
  ours (reference)  BlockwiseTrainer with the plain-PyTorch update ops;
  ours (cpu/cuda)   the same with the compiled fused ops, when bcdcore.ops.available_backends() lists them;
  naive             written below: per block a deepcopy of the whole model, a torch.optim.SGD over that copy's
                    block, loss.backward() through the whole model (every parameter requires grad), the proximal
                    term added to the loss through autograd, a second forward+backward after every step for the
                    stopping test, then the x-hat blocks damped into the original model.
Before timing, one round of each from the same weights and the same minibatches must give the same parameters
(within 1e-4 relative; asserted, in float64 -- see the comment at the check). Then every candidate's first
float32 round, which measures its peak memory and warms it up; then --warmup rounds; then --rounds timed rounds,
the candidates interleaved round by round so that drift of the machine hits all of them alike. The table gives
the median (and min) wall seconds per round, the speedup of each candidate over naive, and process CPU seconds
per round (all threads; far below threads x wall seconds means other processes took the cores).

    PYTHONPATH=. python bench/round_throughput.py --threads 2          # the recorded run (bench/RESULTS.md)
    PYTHONPATH=. python bench/round_throughput.py --quick              # smoke run, seconds
    PYTHONPATH=. python bench/round_throughput.py --device cuda --rounds 10 --warmup 2
On a GPU it then runs bench/graph_rounds.py: eager rounds against CUDA-graph rounds (rounds/s, GPU busy share)
on the seed's CNN recipe and ResNet-18 (--graphs-table FILE keeps that table, --no-graphs skips it).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:
    import bcdcore  # noqa: F401
except ImportError:  # run from a checkout without PYTHONPATH
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bcdcore import ops  # noqa: E402
from bcdcore.algorithm import BlockwiseTrainer  # noqa: E402
from bcdcore.data.batches import BatchStream, stream_seed  # noqa: E402
from bcdcore.models import block_sizes, build_model  # noqa: E402
from bcdcore.params import FlatParams  # noqa: E402
from bcdcore.recipe import AlgorithmConfig, ModelConfig  # noqa: E402

TARGET_SPEEDUP = 3.0
CHECK_RTOL = 1e-4


# ----------------------------------------------------------------------------------------------------------
# the naive implementation (deliberately plain: what one writes without a flat store and fused ops)

class NaiveBCD:
    def __init__(self, model: nn.Module, streams: list[BatchStream], cfg: AlgorithmConfig, lam: float,
                 gamma: float) -> None:
        self.model, self.streams, self.cfg, self.lam, self.gamma = model, streams, cfg, lam, gamma
        self.closest = math.inf  # smallest residual / threshold seen by the stopping test (fires at <= 1)

    def run_round(self) -> tuple[float, int]:
        cfg, lam, model = self.cfg, self.lam, self.model
        model.train()
        anchors = [[p.detach().clone() for p in block.parameters()] for block in model.blocks]
        results, losses, steps = [], [], 0
        for i in range(len(model.blocks)):
            work = copy.deepcopy(model)  # a full model copy per block
            for p in work.parameters():
                p.requires_grad_(True)  # every block requires grad: backward runs through the whole model
            z = list(work.blocks[i].parameters())
            a = anchors[i]
            opt = torch.optim.SGD(z, lr=cfg.lr)

            def objective(xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                loss = F.cross_entropy(work(xb), yb)
                prox = sum(((p - q) ** 2).sum() for p, q in zip(z, a))
                return loss, loss + 0.5 * lam * prox

            for _ in range(cfg.K):
                xb, yb = self.streams[i].next()
                work.zero_grad(set_to_none=True)
                loss, f = objective(xb, yb)
                f.backward()
                opt.step()
                losses.append(loss.detach())
                steps += 1
                if cfg.accuracy_factor >= 0 and lam > 0:
                    # stopping test at the new point: a second forward+backward pass
                    work.zero_grad(set_to_none=True)
                    _, f = objective(xb, yb)
                    f.backward()
                    with torch.no_grad():
                        residual = torch.sqrt(sum((p.grad ** 2).sum() for p in z)).item()
                        dist = torch.sqrt(sum(((p - q) ** 2).sum() for p, q in zip(z, a))).item()
                    threshold = cfg.accuracy_factor * lam * dist
                    self.closest = min(self.closest, residual / threshold if threshold > 0 else math.inf)
                    if residual <= threshold:
                        break
            results.append(([p.detach().clone() for p in z], [b.detach().clone() for b in work.blocks[i].buffers()]))
            del work, opt
        with torch.no_grad():  # damping into the original model (Jacobi: every x-hat was solved at x_t)
            for block, a, (xhat, bufs) in zip(model.blocks, anchors, results):
                for p, q, h in zip(block.parameters(), a, xhat):
                    p.copy_(q + self.gamma * (h - q))
                for b, nb in zip(block.buffers(), bufs):
                    b.copy_(nb)
        return torch.stack(losses).mean().item(), steps


# ----------------------------------------------------------------------------------------------------------
# set-up shared by every candidate

def make_data(n: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x.to(device), y.to(device)


def as_dtype(data: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return data[0].to(dtype), data[1]


def make_streams(x, y, batch: int, n_blocks: int, seed: int) -> list[BatchStream]:
    return [BatchStream(x, y, batch, stream_seed(seed, 100 + i)) for i in range(n_blocks)]


def make_model(widths: list[int], device: torch.device, seed: int, dtype=torch.float32) -> nn.Module:
    return build_model(ModelConfig(name="cnn", widths=widths), (3, 32, 32), 10, seed).to(device, dtype)


def flat_of(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


class Ours:
    def __init__(self, args, cfg: AlgorithmConfig, backend: str, data, device, dtype=torch.float32,
                 batch: int | None = None) -> None:
        self.model = make_model(args.widths, device, args.seed, dtype)
        data = as_dtype(data, dtype)
        self.params = FlatParams(self.model, self.model.blocks)
        n = self.params.n_blocks
        streams = make_streams(*data, batch or args.batch, n, args.seed)
        self.trainer = BlockwiseTrainer(self.model, self.params, F.cross_entropy, streams, cfg, [args.lam] * n,
                                        [args.gamma] * n, backend, stream_seed(args.seed, 2))
        self.t = 0
        self.closest = math.inf

    def run_round(self) -> tuple[float, int]:
        result = self.trainer.run_round(self.t)
        self.t += 1
        for r in result.blocks:  # the rule's margin at the last checked iterate (closest to firing)
            if r.threshold > 0:
                self.closest = min(self.closest, r.residual / r.threshold)
        return result.train_loss, sum(r.inner_steps for r in result.blocks)


class Naive:
    def __init__(self, args, cfg: AlgorithmConfig, data, device, dtype=torch.float32,
                 batch: int | None = None) -> None:
        self.model = make_model(args.widths, device, args.seed, dtype)
        data = as_dtype(data, dtype)
        streams = make_streams(*data, batch or args.batch, len(self.model.blocks), args.seed)
        self.impl = NaiveBCD(self.model, streams, cfg, args.lam, args.gamma)

    @property
    def closest(self) -> float:
        return self.impl.closest

    def run_round(self) -> tuple[float, int]:
        return self.impl.run_round()


# ----------------------------------------------------------------------------------------------------------
# measurement

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_bytes_cpu(prof) -> int:
    """Peak of live tensor bytes allocated inside the profiled window (allocations minus frees, in order).
    Frees of tensors allocated before the window are not reported by the profiler, so they never lower it."""
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    live = peak = 0
    for _, nbytes in sorted(events):
        live += nbytes
        peak = max(peak, live)
    return peak


def build_and_round_with_memory(build, device: torch.device):
    """Build a candidate and run its first round; return (candidate, (loss, steps), peak extra bytes)."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        cand = build()
        out = cand.run_round()
        sync(device)
        return cand, out, torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        cand = build()
        out = cand.run_round()
    return cand, out, peak_bytes_cpu(prof)


def timed_round(cand, device: torch.device) -> tuple[float, float, int]:
    """Wall seconds, process CPU seconds (all threads; a check on contention from other processes) and steps."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    _, steps = cand.run_round()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0, steps


def mib(n: float) -> str:
    return f"{n / 2 ** 20:.2f} MiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per candidate (default 5; quick 1)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed rounds after the first float32 round (the memory round), which already "
                         "warms every candidate up (default 0)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: K=2, batch 32, 1 round; its numbers are not the benchmark")
    ap.add_argument("--widths", type=int, nargs=3, default=[32, 64, 128], help="conv block widths")
    ap.add_argument("--K", type=int, default=None, help="inner steps per block (default 10; quick 2)")
    ap.add_argument("--batch", type=int, default=None, help="minibatch size (default 128; quick 32)")
    ap.add_argument("--samples", type=int, default=2048, help="synthetic training samples")
    ap.add_argument("--check-batch", type=int, default=None,
                    help="minibatch size of the float64 equivalence round (default 32, at most --batch: fp64 "
                         "convolutions are slow on CPU; the code path does not depend on the batch size)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true",
                    help="after timing, print torch.profiler's top ops for one round of each candidate")
    ap.add_argument("--graphs-table", help="--device cuda: also write the eager-vs-CUDA-graphs table here")
    ap.add_argument("--no-graphs", action="store_true", help="--device cuda: skip eager vs CUDA graphs")
    args = ap.parse_args()
    args.rounds = args.rounds if args.rounds is not None else (1 if args.quick else 5)
    args.warmup = args.warmup if args.warmup is not None else 0
    args.K = args.K if args.K is not None else (2 if args.quick else 10)
    args.batch = args.batch if args.batch is not None else (32 if args.quick else 128)
    args.check_batch = min(args.check_batch or 32, args.batch)
    args.lam, args.gamma = 0.1, 1.0
    # The rule ||grad F_i|| <= c * lam * ||z - a|| is evaluated at every inner step; with c = 1 it does not fire
    # on this problem (the margin is printed), so both candidates do the same K steps per block.
    accuracy_factor = 1.0

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    cfg = AlgorithmConfig(mode="blockwise", schedule="jacobi", K=args.K, gamma=args.gamma, lam=args.lam,
                          accuracy_factor=accuracy_factor, solver="sgd", lr=0.05)
    available = ops.available_backends()
    compiled = "cuda" if device.type == "cuda" else "cpu"
    backends = ["reference"] + ([compiled] if compiled in available else [])

    data = make_data(args.samples, device, args.seed)
    probe = make_model(args.widths, device, args.seed)
    sizes = block_sizes(probe)
    n_blocks = len(sizes)
    del probe
    memory_method = ("torch.cuda.max_memory_allocated minus the allocated bytes before the candidate is built"
                     if device.type == "cuda" else
                     "torch.profiler(profile_memory=True): peak of live tensor bytes allocated by the CPU "
                     "allocator from building the candidate through its first round")

    print("round throughput: Algorithm 1 (bcdcore BlockwiseTrainer) vs naive, one process")
    print(f"  torch {torch.__version__}, python {platform.python_version()}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
             f", {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"))
    print(f"  model cnn widths={args.widths}: {n_blocks} blocks, parameters per block {sizes} "
          f"(total {sum(sizes)}), inputs 3x32x32, 10 classes, {args.samples} synthetic samples")
    print(f"  jacobi, K={args.K}, batch {args.batch}, lambda {args.lam}, gamma {args.gamma}, sgd lr {cfg.lr}, "
          f"accuracy_factor {accuracy_factor} (rule checked every step)")
    print(f"  ops backends available: {', '.join(available)}"
          + ("" if compiled in available else f" (compiled '{compiled}' not built: no row for it)"))
    print(f"  peak memory: {memory_method}")
    if args.quick:
        print("  --quick: smoke run with reduced K/batch/rounds; not the benchmark's numbers")

    expected = args.K * n_blocks

    # ---- equivalence check: one round of each candidate from the same weights and the same minibatches.
    # Done in float64: on random data a ReLU/max-pool network's fp32 trajectory is chaotic at the roundoff
    # level (a 1e-7 relative nudge of the weights flips a pre-activation across 0 within a few steps and the
    # paths then part at ~1e-3), so fp32 cannot tell "same iteration" from "different iteration"; fp64 can.
    # A compiled backend that refuses fp64 is checked in fp32 over K=2 steps per block instead (before any
    # kink is crossed).
    t0 = time.perf_counter()
    naive_ref = {}

    def naive_point(dtype: torch.dtype, c: AlgorithmConfig) -> tuple[torch.Tensor, torch.Tensor]:
        key = (dtype, c.K)
        if key not in naive_ref:
            n = Naive(args, c, data, device, dtype, args.check_batch)
            x0 = flat_of(n.model)
            _, s = n.run_round()
            assert s == c.K * n_blocks, f"naive: the stopping rule fired in the check round ({s} steps)"
            naive_ref[key] = (x0, flat_of(n.model))
        return naive_ref[key]

    for b in backends:
        name = f"ours ({b})"
        dtype, c = torch.float64, cfg
        try:
            o = Ours(args, c, b, data, device, dtype, args.check_batch)
            _, s = o.run_round()
        except (RuntimeError, ValueError, TypeError) as exc:
            if b == "reference":
                raise
            print(f"  check: {name} refuses float64 ({type(exc).__name__}: {exc}); checking in float32, K=2")
            dtype, c = torch.float32, AlgorithmConfig(**{**vars(cfg), "K": 2})
            o = Ours(args, c, b, data, device, dtype, args.check_batch)
            _, s = o.run_round()
        assert s == c.K * n_blocks, f"{name}: the stopping rule fired in the check round ({s} steps)"
        x0, x_naive = naive_point(dtype, c)
        diff = (o.params.flat.detach() - x_naive).norm().item()
        rel, rel_step = diff / x_naive.norm().item(), diff / (x_naive - x0).norm().item()
        print(f"  check ({str(dtype).replace('torch.', '')}, K={c.K}, batch {args.check_batch}): {name} vs naive, "
              f"one round from the same weights and minibatches: ||diff||/||x|| = {rel:.1e}, "
              f"||diff||/||x_1 - x_0|| = {rel_step:.1e}")
        assert rel <= CHECK_RTOL, f"{name} and naive disagree: relative difference {rel:.2e} > {CHECK_RTOL}"
        del o
    naive_ref.clear()
    print(f"  check passed in {time.perf_counter() - t0:.1f} s")

    # ---- first float32 round of every candidate: peak memory, and it warms them up
    cands, mem, first_steps = {}, {}, {}
    for b in backends:
        name = f"ours ({b})"
        cands[name], (_, first_steps[name]), mem[name] = build_and_round_with_memory(
            lambda b=b: Ours(args, cfg, b, data, device), device)
    cands["naive"], (_, first_steps["naive"]), mem["naive"] = build_and_round_with_memory(
        lambda: Naive(args, cfg, data, device), device)
    assert all(s == expected for s in first_steps.values()), f"inner steps differ: {first_steps}"
    x_naive = flat_of(cands["naive"].model)
    for name in cands:
        if name != "naive":
            rel = (cands[name].params.flat.detach() - x_naive).norm().item() / x_naive.norm().item()
            print(f"  info (float32, K={args.K}): {name} vs naive after the first round: ||diff||/||x|| = "
                  f"{rel:.1e} (roundoff amplified by ReLU/max-pool kinks, see the float64 check)")

    # ---- warmup and timed rounds, interleaved
    times = {name: [] for name in cands}
    cpu_times = {name: [] for name in cands}
    steps = {name: set() for name in cands}
    for r in range(args.warmup + args.rounds):
        for name, cand in cands.items():
            dt, ct, s = timed_round(cand, device)
            steps[name].add(s)
            if r >= args.warmup:
                times[name].append(dt)
                cpu_times[name].append(ct)
    for name in cands:
        assert steps[name] <= {expected}, f"{name}: the stopping rule fired ({steps[name]} steps per round)"

    naive_med, naive_min = statistics.median(times["naive"]), min(times["naive"])
    print()
    print(f"{'candidate':<17} {'s/round (median)':>16} {'min':>7} {'max':>7} {'speedup vs naive':>16} "
          f"{'(at min)':>8} {'cpu s/round':>11} {'inner steps/round':>17} {'peak memory':>11}")
    for name in cands:
        med, lo = statistics.median(times[name]), min(times[name])
        print(f"{name:<17} {med:>16.3f} {lo:>7.3f} {max(times[name]):>7.3f} {naive_med / med:>15.2f}x "
              f"{naive_min / lo:>7.2f}x {statistics.median(cpu_times[name]):>11.2f} {expected:>17d} "
              f"{mib(mem[name]):>11}")
    param_bytes = sum(sizes) * 4
    print(f"(peak memory: one float32 copy of the parameters is {mib(param_bytes)}; the activations that the "
          f"block-0 solve keeps for its backward dominate every candidate's peak)")
    closest = min(c.closest for c in cands.values())
    print(f"({args.rounds} timed rounds after {args.warmup} warmup + 1 memory round; stopping rule checked at every "
          f"step, never fired: smallest residual/threshold seen = {closest:.1f}, fires at <= 1)")
    best = max(naive_med / statistics.median(times[n]) for n in cands if n != "naive")
    verdict = "meets" if best >= TARGET_SPEEDUP else "MISSES"
    print(f"best speedup {best:.2f}x {verdict} the {TARGET_SPEEDUP:.0f}x target")

    if device.type == "cuda" and not args.no_graphs:  # eager vs CUDA graphs, on the two workloads
        import graph_rounds  # bench/graph_rounds.py, beside this file

        print("\neager vs CUDA graphs (bench/graph_rounds.py):", flush=True)
        graph_rounds.main(["--device", "cuda", "--rounds", str(args.rounds), "--warmup", str(max(1, args.warmup)),
                           "--seed", str(args.seed)] + (["--out", args.graphs_table] if args.graphs_table else []))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        for name, cand in cands.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                cand.run_round()
            print(f"\n--- torch.profiler, one round of {name}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return 0


if __name__ == "__main__":
    sys.exit(main())
