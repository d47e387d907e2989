"""Rounds per second of block-parallel Algorithm 1 with 1 and 2 processes on the CPU, bytes per round, and the
simulated time of a stated network.

Each configuration is a real `bcdcore run` (2 processes: gloo, started by bcdcore through torchrun's agent), one
after another, each process with --threads OpenMP threads. The recipe: digits_flat, a 4-block MLP (widths
below; 3 hidden layers + head = 4 blocks), Jacobi, all blocks active, K inner SGD steps per block, batch 128,
eval only at the end. Rounds/s is measured from the runs' own metric events: (rounds - 2) / (wall_s of the
second-last round - wall_s of the first round), so process start, the first round (warm-up) and the final
evaluation are excluded. bytes/round is the metric `bytes_round` (model state on the wire, counted as a ring
all-gather moves it, summed over ranks); sim_time_s is wall_s + communication_delay per message (3 per round)
+ the largest per-rank received bytes / bandwidth, for the latency and bandwidth given below. The 2-process run
is checked to give the same final parameters as the 1-process run (bit for bit).

    PYTHONPATH=. python bench/distributed.py                 # the recorded run (bench/RESULTS.md)
    PYTHONPATH=. python bench/distributed.py --rounds 30     # quicker
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


def recipe_text(nproc: int, args, widths: list[int]) -> str:
    """The benchmarked recipe (see the module docstring) for `nproc` processes and these MLP widths, as TOML
    written by bcdcore's own writer from the values below."""
    return to_toml({
        "run": {"name": "bench-dist", "seed": 0, "device": "cpu", "rounds": args.rounds},
        "data": {"name": "digits_flat", "batch_size": 128},
        "model": {"name": "mlp", "widths": list(widths)},
        "algorithm": {"mode": "blockwise", "schedule": "jacobi", "K": args.K, "lambda": 0.01, "gamma": 1.0,
                      "solver": "sgd", "lr": 0.05},
        "eval": {"every": 0},
        "distributed": {"nproc": nproc, "communication_delay": args.delay, "bandwidth": args.bandwidth},
    })


def run(tmp: Path, nproc: int, args, widths) -> dict:
    recipe = tmp / f"w{widths[0]}-n{nproc}.toml"
    recipe.write_text(recipe_text(nproc, args, widths))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    env.pop("BCD_OPS", None)
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
            "wall": metrics[-1]["wall_s"], "comm_sim": metrics[-1].get("comm_sim_s", 0.0),
            "sizes": start["block_sizes"], "owner": start.get("block_owner"), "flat": flat}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--K", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="OpenMP threads per process")
    parser.add_argument("--delay", type=float, default=1e-3, help="simulated latency per message, s")
    parser.add_argument("--bandwidth", type=float, default=1.25e9, help="simulated bandwidth, bytes/s")
    parser.add_argument("--widths", default="16x16x16,256x256x256", help="comma-separated 4-block MLP widths")
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"{args.threads} thread(s) per process, {args.rounds} rounds, K {args.K}, batch 128")
    print(f"# simulated network: {args.delay * 1e3:g} ms per message, {args.bandwidth / 1e9:g} GB/s")
    header = ("model (block sizes)", "nproc", "rounds/s", "speedup", "bytes/round", "wall_s", "sim_time_s",
              "same params")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for spec in args.widths.split(","):
            widths = [int(w) for w in spec.split("x")]
            one = run(tmp, 1, args, widths)
            two = run(tmp, 2, args, widths)
            import torch

            same = torch.equal(one["flat"], two["flat"])
            for nproc, r in ((1, one), (2, two)):
                sim = f"{r['sim']:.3f}" if r["sim"] is not None else f"{r['wall']:.3f} (= wall)"
                print(f"| mlp {spec} ({'/'.join(map(str, r['sizes']))}) | {nproc} | {r['rate']:.1f} | "
                      f"{r['rate'] / one['rate']:.2f}x | {r['bytes']:,} | {r['wall']:.3f} | {sim} | "
                      f"{'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
