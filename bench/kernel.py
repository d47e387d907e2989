"""Benchmark of the fused proximal SGD-form step (bcdcore.ops, csrc/) against what plain PyTorch offers.

    .venv/bin/python bench/kernel.py [--device cpu|cuda] [--quick] [--out FILE]

One process, side by side, on three workloads (fp32):
  resnet18     the ResNet-18 parameter list (62 tensors, 11.7M elements) as 10 per-block flat slices of one
               flat buffer (stem, the 8 BasicBlocks, fc)
  resnet18x8   eight copies of it (93.5M elements, 496 tensors, 80 blocks)
  small100     100 tensors of 1,024 elements, one block
Every method does the same work per element: d = x - a; r = g + lam*d; x -= lr*r, and it produces the squared
norms ||r||^2 and ||d||^2 that the inexactness rule needs (per block, except torch.compile: one global pair).
  fused (ours)        bcdcore's compiled kernel, one call per block slice (one pass: 16 bytes/element)
  fused, 1 flat call  one call on the whole flat buffer (the kernel alone: no per-call overhead; the GPU targets)
  fused, multi-slice  one multi-slice call (ops.prox_sgd_multi_) over the block slices, each with its own lam:
                      one launch on CUDA for up to 32 blocks (ResNet-18's 10), per-block norms
  fused, per tensor   (small100 only) one call per tensor: shows the per-call overhead
  eager loop          per parameter tensor: sub, add, vector_norm x2, sub_; per block: stack + sum
  foreach             torch._foreach_sub / _foreach_add / _foreach_norm x2 / _foreach_add_, per-block sums
  torch.compile       the same step on the whole flat buffer, compiled (n/a where compiling fails)
  rule pair           the step as Algorithm 1 runs it with the inexactness rule on: the norms pass
                      (ops.rule_check_: reads x, g, a, decides on the device) then the step predicated on that
                      decision (skip=rule); 28 bytes/element (12 + 16), per block or in 1 flat call
  copy (ceiling)      dst.copy_(src) over 2N fp32 elements: moves the same 16 bytes/element
GB/s counts the bytes per element each method must move (16; the rule pair 28); "% copy" is that bandwidth
relative to the copy's, measured in the same run; "ours is Nx" = method time / our time. Times are medians of
repeated steps.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LR, LAM = 1e-3, 0.1
BYTES_PER_ELEMENT = 16
RULE_PAIR_BYTES = 28  # norms pass (x, g, a read) + step (x, g, a read, x written)

# ResNet-18 (torchvision, 1000 classes) stem and layer1, (block, shape); the rest is built in _resnet18_fallback.
_RESNET18_HEAD = ([("stem", (64, 3, 7, 7)), ("stem", (64,)), ("stem", (64,))]
                  + [(f"layer1.{i}", s) for i in range(2) for s in [(64, 64, 3, 3), (64,), (64,)] * 2])


def resnet18_shapes() -> list[tuple[str, tuple[int, ...]]]:
    try:
        import torchvision

        model = torchvision.models.resnet18(weights=None)
        out = []
        for name, p in model.named_parameters():
            parts = name.split(".")
            block = ".".join(parts[:2]) if parts[0].startswith("layer") else (
                "stem" if parts[0] in ("conv1", "bn1") else parts[0])
            out.append((block, tuple(p.shape)))
        return out
    except Exception:  # noqa: BLE001 - torchvision absent or broken: same list, written out
        return _resnet18_fallback()


def _resnet18_fallback() -> list[tuple[str, tuple[int, ...]]]:
    """The parameter shapes of torchvision's resnet18, written out (used when torchvision is missing)."""
    out = list(_RESNET18_HEAD)
    for l, c in ((2, 128), (3, 256), (4, 512)):
        out += [(f"layer{l}.0", s) for s in [(c, c // 2, 3, 3), (c,), (c,), (c, c, 3, 3), (c,), (c,),
                                              (c, c // 2, 1, 1), (c,), (c,)]]
        out += [(f"layer{l}.1", s) for s in [(c, c, 3, 3), (c,), (c,), (c, c, 3, 3), (c,), (c,)]]
    out += [("fc", (1000, 512)), ("fc", (1000,))]
    return out


class Workload:
    """Flat x, g, a buffers; per-block slices and per-tensor views of them (the engine's parameter store)."""

    def __init__(self, name: str, tensors: list[tuple[str, tuple[int, ...]]], device: torch.device, seed: int):
        self.name = name
        sizes = [torch.Size(s).numel() for _, s in tensors]
        self.n = sum(sizes)
        gen = torch.Generator(device=device).manual_seed(seed)
        self.x = torch.randn(self.n, generator=gen, device=device)
        self.g = torch.randn(self.n, generator=gen, device=device)
        self.a = self.x + 0.01 * torch.randn(self.n, generator=gen, device=device)
        self.tensors: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.block_of: list[int] = []
        self.blocks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        names: list[str] = []
        off = 0
        starts: list[int] = []
        for (block, shape), size in zip(tensors, sizes):
            if not names or names[-1] != block:
                names.append(block)
                starts.append(off)
            self.tensors.append(tuple(t[off:off + size].view(shape) for t in (self.x, self.g, self.a)))
            self.block_of.append(len(names) - 1)
            off += size
        starts.append(off)
        self.bounds = list(zip(starts[:-1], starts[1:]))
        for i in range(len(names)):
            self.blocks.append(tuple(t[starts[i]:starts[i + 1]] for t in (self.x, self.g, self.a)))
        self.block_ids = torch.tensor(self.block_of, device=device)
        self.n_blocks = len(names)


def make_workloads(device: torch.device, quick: bool) -> list[Workload]:
    r18 = resnet18_shapes()
    r18x8 = [(f"copy{k}.{b}", s) for k in range(8) for b, s in r18]
    small = [("all", (1024,)) for _ in range(100)]
    return [Workload("resnet18", r18, device, 1), Workload("resnet18x8", r18x8, device, 2),
            Workload("small100", small, device, 3)]


# ------------------------------------------------------------------------------------------------------------
# the methods (each returns per-block norms, or a global pair for torch.compile)

def ours(fn: Callable) -> Callable[[Workload], object]:
    def step(w: Workload):
        return [fn(x, g, a, lr=LR, lam=LAM) for x, g, a in w.blocks]
    return step


def ours_multi(backend: str) -> Callable[[Workload], object]:
    from bcdcore import ops

    def step(w: Workload):
        return ops.prox_sgd_multi_(w.x, w.g, w.a, bounds=w.bounds, lr=LR, lams=[LAM] * w.n_blocks, backend=backend)
    return step


def ours_flat(fn: Callable) -> Callable[[Workload], object]:
    def step(w: Workload):
        return fn(w.x, w.g, w.a, lr=LR, lam=LAM)
    return step


def ours_per_tensor(fn: Callable) -> Callable[[Workload], object]:
    def step(w: Workload):
        return [fn(x.view(-1), g.view(-1), a.view(-1), lr=LR, lam=LAM) for x, g, a in w.tensors]
    return step


def rule_pair(backend: str, flat: bool) -> Callable[[Workload], object]:
    """The two passes of an inner step with the rule on; coef = 0 never stops, so every step is applied."""
    from bcdcore import ops

    def step(w: Workload):
        rule = getattr(w, "_rule", None)
        if rule is None:
            rule = w._rule = ops.new_rule_state(w.x)
        out = []
        for x, g, a in ([(w.x, w.g, w.a)] if flat else w.blocks):
            ops.rule_check_(x, g, a, rule, lam=LAM, coef=0.0, step=0, backend=backend)
            out.append(ops.prox_sgd_step_(x, g, a, lr=LR, lam=LAM, skip=rule, backend=backend))
        return out
    return step


def eager(w: Workload):
    r2s, d2s = [], []
    for x, g, a in w.tensors:
        d = x.sub(a)
        r = g.add(d, alpha=LAM)
        r2s.append(torch.linalg.vector_norm(r).square())
        d2s.append(torch.linalg.vector_norm(d).square())
        x.sub_(r, alpha=LR)
    r2 = torch.zeros(w.n_blocks, device=w.x.device).index_add_(0, w.block_ids, torch.stack(r2s))
    d2 = torch.zeros(w.n_blocks, device=w.x.device).index_add_(0, w.block_ids, torch.stack(d2s))
    return r2, d2


def foreach(w: Workload):
    xs = [t[0] for t in w.tensors]
    gs = [t[1] for t in w.tensors]
    as_ = [t[2] for t in w.tensors]
    d = torch._foreach_sub(xs, as_)
    r = torch._foreach_add(gs, d, alpha=LAM)
    rn = torch._foreach_norm(r)
    dn = torch._foreach_norm(d)
    torch._foreach_add_(xs, r, alpha=-LR)
    r2 = torch.zeros(w.n_blocks, device=w.x.device).index_add_(0, w.block_ids, torch.stack(rn).square())
    d2 = torch.zeros(w.n_blocks, device=w.x.device).index_add_(0, w.block_ids, torch.stack(dn).square())
    return r2, d2


def _flat_step(x, g, a):
    d = x - a
    r = g + LAM * d
    x.sub_(LR * r)
    return (r * r).sum(), (d * d).sum()


_compiled_step = None


def compiled(w: Workload):
    return _compiled_step(w.x, w.g, w.a)


def copy_of(w: Workload, buffers: dict) -> Callable[[Workload], object]:
    src, dst = buffers["src"][: 2 * w.n], buffers["dst"][: 2 * w.n]

    def step(_w: Workload):
        dst.copy_(src)
    return step


# ------------------------------------------------------------------------------------------------------------
# timing

def _once(fn: Callable, w: Workload, device: torch.device) -> float:
    """Milliseconds of one call (CUDA: between events on the current stream)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(w)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn(w)
    return (time.perf_counter() - t0) * 1e3


def time_side_by_side(steps: dict[str, Callable], w: Workload, device: torch.device, budget_s: float,
                      max_reps: int) -> dict[str, float | str]:
    """Median ms of each method, the methods interleaved round by round (so that drifting machine noise hits
    them alike). A method that raises gets its error message instead of a time."""
    out: dict[str, float | str] = {}
    alive: dict[str, Callable] = {}
    first: dict[str, float] = {}
    for name, fn in steps.items():
        try:
            _once(fn, w, device)  # warm-up (and torch.compile's compilation)
            first[name] = min(_once(fn, w, device), _once(fn, w, device))
            alive[name] = fn
        except Exception as exc:  # noqa: BLE001 - torch.compile in particular
            msg = str(exc).strip().splitlines()[0][:70] if str(exc).strip() else ""
            out[name] = f"n/a: {type(exc).__name__}: {msg}"
    if not alive:
        return out
    total = sum(first.values())
    reps = int(max(5, min(max_reps, budget_s * 1e3 * len(alive) / max(total, 1e-3))))
    times: dict[str, list[float]] = {name: [] for name in alive}
    for _ in range(reps):
        for name, fn in alive.items():
            times[name].append(_once(fn, w, device))
    out.update({name: statistics.median(ts) for name, ts in times.items()})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--quick", action="store_true", help="fewer repeats (about a quarter of the time)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (it compiles for a while)")
    ap.add_argument("--out", help="also write the table (markdown) to this file")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/kernel.py: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    from bcdcore import ops

    backend = args.device
    if backend not in ops.available_backends():
        print(f"bench/kernel.py: the compiled {backend} backend is not available "
              f"(available: {ops.available_backends()}); build it first (see csrc/README.md)", file=sys.stderr)
        return 2

    def fn(x, g, a, *, lr, lam):
        return ops.prox_sgd_step_(x, g, a, lr=lr, lam=lam, backend=backend)

    budget, max_reps = (0.4, 10) if args.quick else (1.5, 50)

    global _compiled_step
    compile_error = None
    if not args.no_compile:
        try:
            _compiled_step = torch.compile(_flat_step, dynamic=True)
        except Exception as exc:  # noqa: BLE001
            compile_error = exc
    else:
        compile_error = "skipped (--no-compile)"

    workloads = make_workloads(device, args.quick)
    biggest = max(w.n for w in workloads)
    buffers = {"src": torch.randn(2 * biggest, device=device), "dst": torch.empty(2 * biggest, device=device)}

    info = ""
    try:
        from bcdcore.ops import compiled
        info = ", ".join(f"{k}={v}" for k, v in compiled.info().items() if k != "notes")
    except ImportError:
        pass
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or
                                                                                  platform.machine())
    header = (f"fused SGD-form step, fp32 | {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC | "
              f"device {device.type} ({dev_name}) | torch {torch.__version__} | "
              f"{torch.get_num_threads()} CPU threads | {info}")
    rows: list[tuple[str, str, float | None, str]] = []  # workload, method, ms, note
    results: dict[tuple[str, str], float | None] = {}
    for w in workloads:
        methods: list[tuple[str, Callable | None, str]] = [("fused (ours)", ours(fn), f"{w.n_blocks} calls")]
        if w.n_blocks > 1:
            methods.append(("fused, 1 flat call", ours_flat(fn), "whole buffer, global norms"))
            methods.append(("fused, multi-slice", ours_multi(backend),
                            f"1 call, {-(-w.n_blocks // 32)} launch(es), per-block norms"))
        methods.append(("rule pair", rule_pair(backend, False), f"{w.n_blocks} x 2 calls, 28 B/element"))
        if w.n_blocks > 1:
            methods.append(("rule pair, 1 flat call", rule_pair(backend, True), "2 calls, 28 B/element"))
        if w.name == "small100":
            methods.append(("fused, per tensor", ours_per_tensor(fn), f"{len(w.tensors)} calls"))
        methods += [("eager loop", eager, f"{len(w.tensors)} tensors"),
                    ("foreach", foreach, f"{len(w.tensors)} tensors"),
                    ("torch.compile", compiled if compile_error is None else None, "flat buffer, 1 call"),
                    ("copy (ceiling)", copy_of(w, buffers), f"{2 * w.n:,} fp32 copied")]
        steps = {name: step for name, step, _ in methods if step is not None}
        timed = time_side_by_side(steps, w, device, budget, max_reps)
        for name, step, note in methods:
            ms = None
            got = timed.get(name)
            if isinstance(got, float):
                ms = got
            elif isinstance(got, str):
                note = got
            else:
                note = f"n/a: {compile_error}" if name == "torch.compile" else "n/a"
            results[(w.name, name)] = ms
            rows.append((w.name, name, ms, note))
            print(f"  {w.name:<11} {name:<18} {'n/a' if ms is None else f'{ms:10.3f} ms'}", file=sys.stderr,
                  flush=True)

    # table
    lines = [header, "",
             "| workload | elements | method | ms | GB/s | % copy | ours is Nx | note |",
             "|---|---:|---|---:|---:|---:|---:|---|"]
    for wname, method, ms, note in rows:
        w = next(w for w in workloads if w.name == wname)
        copy_ms = results[(wname, "copy (ceiling)")]
        our_ms = results[(wname, "fused (ours)")]
        if ms is None:
            lines.append(f"| {wname} | {w.n:,} | {method} | n/a | | | | {note} |")
            continue
        moved = RULE_PAIR_BYTES if method.startswith("rule pair") else BYTES_PER_ELEMENT
        gbs = moved * w.n / (ms * 1e-3) / 1e9
        pct = f"{100 * copy_ms * moved / (ms * BYTES_PER_ELEMENT):.0f}%" if copy_ms else ""
        speed = f"{ms / our_ms:.2f}x" if our_ms and method != "fused (ours)" else ""
        lines.append(f"| {wname} | {w.n:,} | {method} | {ms:.3f} | {gbs:.1f} | {pct} | {speed} | {note} |")

    def ratio(wn: str, m: str, ours_row: str = "fused (ours)") -> float | None:
        t, o = results.get((wn, m)), results.get((wn, ours_row))
        return t / o if t and o else None

    def frac(wn: str, ours_row: str = "fused (ours)") -> float | None:
        """Bandwidth of `ours_row` for the bytes it moves, over the copy's."""
        c, o = results.get((wn, "copy (ceiling)")), results.get((wn, ours_row))
        moved = RULE_PAIR_BYTES if ours_row.startswith("rule pair") else BYTES_PER_ELEMENT
        return c * moved / (o * BYTES_PER_ELEMENT) if c and o else None

    if device.type == "cpu":
        checks = [("ours vs eager at resnet18", ratio("resnet18", "eager loop"), 3.0, "x"),
                  ("ours vs foreach at resnet18", ratio("resnet18", "foreach"), 1.5, "x"),
                  ("ours / copy bandwidth at resnet18x8", frac("resnet18x8"), 0.70, ""),
                  ("(info) rule pair (1 flat call) / copy bandwidth at resnet18x8",
                   frac("resnet18x8", "rule pair, 1 flat call"), 0.0, ""),
                  ("(info) per-block calls / multi-slice at resnet18", ratio("resnet18", "fused (ours)",
                                                                             "fused, multi-slice"), 0.0, "x")]
    else:  # the GPU targets are about the kernel: one flat call at 93.5M (per-block rows shown too)
        flat = "fused, 1 flat call"
        checks = [("ours (1 flat call) / copy bandwidth at resnet18x8", frac("resnet18x8", flat), 0.90, ""),
                  ("rule pair (1 flat call) / copy bandwidth at resnet18x8",
                   frac("resnet18x8", "rule pair, 1 flat call"), 0.85, ""),
                  ("ours (1 flat call) vs foreach at resnet18x8", ratio("resnet18x8", "foreach", flat), 4.0, "x"),
                  ("ours (1 flat call) vs torch.compile at resnet18x8",
                   ratio("resnet18x8", "torch.compile", flat), 1.8, "x"),
                  ("1 flat call / multi-slice at resnet18 (the 10 blocks in one launch within 1.5x of flat)",
                   ratio("resnet18", flat, "fused, multi-slice"), 1 / 1.5, "x"),
                  ("(info) multi-slice / copy bandwidth at resnet18x8", frac("resnet18x8", "fused, multi-slice"),
                   0.0, ""),
                  ("(info) ours (80 per-block calls, host-bound) / copy bandwidth at resnet18x8",
                   frac("resnet18x8"), 0.0, ""),
                  ("(info) ours (80 per-block calls) vs foreach at resnet18x8", ratio("resnet18x8", "foreach"),
                   0.0, "x")]
    lines.append("")
    for label, val, target, unit in checks:
        info = label.startswith("(info)")  # shown beside the targets, judged by none
        kind = "" if info else "target "
        if val is None:
            lines.append(f"{kind}{label}: n/a" + ("" if info else f" (>= {target:g}{unit} wanted)"))
        else:
            shown = f"{val:.2f}x" if unit else f"{100 * val:.0f}%"
            want = f"{target:g}x" if unit else f"{100 * target:.0f}%"
            lines.append(f"{kind}{label}: {shown}" + ("" if info else
                                                     f" (>= {want}) {'PASS' if val >= target else 'FAIL'}"))
    if device.type == "cpu":
        lines.append("(CPU: a copy's stores first read their destination lines (write-allocate), so the copy moves "
                     "24 bytes per 16 counted while the fused step writes lines it has just read: it can pass 100%.)")
    table = "\n".join(lines)
    if args.out:
        Path(args.out).write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    if (os.cpu_count() or 1) <= 4:  # no pool of compile workers competing with the timed threads
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    raise SystemExit(main())
