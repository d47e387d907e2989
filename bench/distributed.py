"""Rounds per second of block-parallel Algorithm 1 with 1 and 2 processes on the CPU, bytes per round, and the
simulated time of a stated network.

Each configuration is a real `bcdcore run` (2 processes: gloo, started by bcdcore through torchrun's agent), one
after another. Four configurations per model, in this order, repeated --repeat times (interleaved, so a change
in the machine's load hits all four alike):

- `1p default`: 1 process with the threads a user gets by default (OMP_NUM_THREADS unset: torch uses every
  core). This is the baseline of the "vs 1p default" column.
- `1p 1 thread`: 1 process with OMP_NUM_THREADS=1, the per-core work of one rank.
- `2p gloo`: 2 processes with bcdcore's default, OMP_NUM_THREADS = cores / processes (1 on a 2-core machine),
  the round's exchange through gloo's all_gather (`distributed.exchange = "backend"`).
- `2p`: the same with bcdcore's default exchange, sockets between the ranks of one host
  (`distributed.exchange = "auto"`, bcdcore/run/host_exchange.py).

The recipe: digits_flat, a 4-block MLP (widths below; 3 hidden layers + head = 4 blocks), Jacobi, all blocks
active, K inner SGD steps per block, batch 128, eval only at the end. Rounds/s is measured from the runs' own
metric events: (rounds - 2) / (wall_s of the second-last round - wall_s of the first round), so process start,
the first round (warm-up) and the final evaluation are excluded. bytes/round is the metric `bytes_round` (model
state on the wire, counted as a ring all-gather moves it, summed over ranks); sim_time_s is wall_s +
communication_delay per message (1 per round: the round's single collective) + the largest per-rank received
bytes / bandwidth, for the latency and bandwidth given below. "same params": the final parameters equal the
`1p 1 thread` run's bit for bit (the 2-process claim; other thread counts may order reductions differently).
The load average (`os.getloadavg`) is printed before each repetition: on a shared machine the numbers are only
as good as it is quiet.

    PYTHONPATH=. python bench/distributed.py                          # the recorded run (bench/RESULTS.md)
    PYTHONPATH=. python bench/distributed.py --rounds 30 --repeat 1   # quicker
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

sys.path.insert(0, str(ROOT))  # bcdcore from this checkout, as in the other bench scripts

from bcdcore.recipe import to_toml  # noqa: E402


def recipe_text(nproc: int, args, widths: list[int], exchange: str = "auto") -> str:
    """The benchmarked recipe (see the module docstring) for `nproc` processes and these MLP widths, as TOML
    written by bcdcore's own writer from the values below."""
    return to_toml({
        "run": {"name": "bench-dist", "seed": 0, "device": "cpu", "rounds": args.rounds},
        "data": {"name": "digits_flat", "batch_size": 128},
        "model": {"name": "mlp", "widths": list(widths)},
        "algorithm": {"mode": "blockwise", "schedule": "jacobi", "K": args.K, "lambda": 0.01, "gamma": 1.0,
                      "solver": "sgd", "lr": 0.05},
        "eval": {"every": 0},
        "distributed": {"nproc": nproc, "communication_delay": args.delay, "bandwidth": args.bandwidth,
                        "exchange": exchange},
    })


def run(tmp: Path, nproc: int, args, widths, threads: int | None, exchange: str, tag: str) -> dict:
    """One `bcdcore run`; threads None: OMP_NUM_THREADS unset (torch's default, or bcdcore's per-rank share)."""
    recipe = tmp / f"w{widths[0]}-n{nproc}-{tag}.toml"
    recipe.write_text(recipe_text(nproc, args, widths, exchange))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("BCD_OPS", None)
    env.pop("OMP_NUM_THREADS", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run([sys.executable, "-m", "bcdcore", "run", str(recipe), "--runs-dir", str(tmp / "runs"),
                           "--quiet"], env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    run_dir = Path(proc.stdout.splitlines()[0].removeprefix("run directory: "))
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    metrics = [e for e in events if e["kind"] == "metric"]
    start = next(e for e in events if e["kind"] == "start")
    first, second_last = metrics[0], metrics[-2]
    rate = (len(metrics) - 2) / (second_last["wall_s"] - first["wall_s"])
    import torch

    flat = torch.load(run_dir / "checkpoint.pt", weights_only=False)["flat"]
    return {"rate": rate, "bytes": metrics[-1].get("bytes_round", 0), "sim": metrics[-1].get("sim_time_s"),
            "wall": metrics[-1]["wall_s"], "sizes": start["block_sizes"], "owner": start.get("block_owner"),
            "flat": flat}


CONFIGS = (("1p default", 1, None, "auto"), ("1p 1 thread", 1, 1, "auto"), ("2p gloo", 2, None, "backend"),
           ("2p", 2, None, "auto"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--K", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of the three configurations")
    parser.add_argument("--delay", type=float, default=1e-3, help="simulated latency per message, s")
    parser.add_argument("--bandwidth", type=float, default=1.25e9, help="simulated bandwidth, bytes/s")
    parser.add_argument("--widths", default="16x16x16,256x256x256", help="comma-separated 4-block MLP widths")
    args = parser.parse_args()
    import statistics

    import torch

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()},"
          f" torch {torch.__version__}, {args.rounds} rounds, K {args.K}, batch 128, {args.repeat} repetition(s)")
    print(f"# simulated network: {args.delay * 1e3:g} ms per message, {args.bandwidth / 1e9:g} GB/s")
    header = ("model (block sizes)", "config", "rounds/s (median)", "vs 1p default", "vs 1p 1 thread",
              "each repetition vs 1p default", "each vs 1p 1 thread", "bytes/round", "sim_time_s - wall_s",
              "block_owner", "same params")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for spec in args.widths.split(","):
            widths = [int(w) for w in spec.split("x")]
            results: dict[str, list[dict]] = {name: [] for name, *_ in CONFIGS}
            for rep in range(args.repeat):
                print(f"# {spec} repetition {rep + 1}: load average {os.getloadavg()[0]:.2f}", flush=True)
                for name, nproc, threads, exchange in CONFIGS:
                    results[name].append(run(tmp, nproc, args, widths, threads, exchange,
                                             f"{name.replace(' ', '')}{rep}"))
            reference = results["1p 1 thread"][0]["flat"]
            base = [r["rate"] for r in results["1p default"]]
            one = [r["rate"] for r in results["1p 1 thread"]]
            for name, *_ in CONFIGS:
                rs = results[name]
                ratios = [r["rate"] / b for r, b in zip(rs, base)]  # against the same repetition's baseline
                thread_ratios = [r["rate"] / b for r, b in zip(rs, one)]
                last = rs[-1]
                sim = f"{last['sim'] - last['wall']:.3f}" if last["sim"] is not None else "0"
                same = all(torch.equal(r["flat"], reference) for r in rs)
                rows.append(f"| mlp {spec} ({'/'.join(map(str, last['sizes']))}) | {name} | "
                            f"{statistics.median(r['rate'] for r in rs):.1f} | {statistics.median(ratios):.2f}x | "
                            f"{statistics.median(thread_ratios):.2f}x | {' '.join(f'{x:.2f}x' for x in ratios)} | "
                            f"{' '.join(f'{x:.2f}x' for x in thread_ratios)} | {last['bytes']:,} | {sim} | "
                            f"{last['owner'] or '-'} | {'yes' if same else 'NO'} |")
    print(f"# load average at the end: {os.getloadavg()[0]:.2f}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
