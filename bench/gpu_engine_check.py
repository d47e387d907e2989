"""End-to-end check of the CUDA ops inside the engine (run by bench/gpu_check.sh on a GPU machine).

    python3 bench/gpu_engine_check.py RUNS_DIR [RECIPE] [DEVICE] [KEY=VALUE ...]

(DEVICE cpu compares the compiled `cpu` ops instead, to try the check on a machine without a GPU.)

Runs RECIPE (default recipes/quickstart.toml) on the GPU twice through the CLI, with run.ops_backend = "cuda"
and "reference", and compares every round's metrics: the same recipe and seed must give the same curves
within a relative 1e-4 (the fused kernel's fp32 rounding differs from the reference's op-by-op rounding, and
the difference grows over rounds). KEY=VALUE pairs are passed as --set overrides to both runs, e.g.
algorithm.accuracy_factor=200 to exercise the inexactness rule: then the block events must also agree on where
each block stopped (inner_steps, stopped_early, passes: the device-side flag and the host's one-step-late read).
Prints one line per run and one verdict; exit 1 on a failure.
"""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bcdcore.rundir import list_runs, metric_table, read_events  # noqa: E402

TOLERANCE = 1e-4
COMPARED = ("train_loss", "val_loss", "val_acc", "test_acc")


def run(recipe: Path, runs_dir: Path, ops: str, device: str, sets: list[str]) -> tuple[dict, list]:
    out = runs_dir / (f"ops_{ops}" + ("_" + "_".join(k.split("=")[0].split(".")[-1] for k in sets) if sets else ""))
    extra = [arg for kv in sets for arg in ("--set", kv)]
    proc = subprocess.run([sys.executable, "-m", "bcdcore", "run", str(recipe), "--quiet", "--runs-dir", str(out),
                           "--set", f"run.device={device}", "--set", f"run.ops_backend={ops}", *extra],
                          capture_output=True, text=True)
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    print(f"ops {ops:<9} exit {proc.returncode}: {last}")
    if proc.returncode != 0:
        print(proc.stderr[-2000:])
        raise SystemExit(1)
    (run_dir,) = list_runs(out)
    start = read_events(run_dir, "start")[0]
    assert start.get("backend") == ops and str(start.get("device", "")).startswith(device), start
    events = read_events(run_dir)
    blocks = [(b["round"], b["block"], b["inner_steps"], b["stopped_early"], b.get("passes"))
              for b in events if b.get("kind") == "block"]
    return metric_table(events), blocks


def main() -> int:
    runs_dir = Path(sys.argv[1])
    recipe = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).resolve().parents[1] / "recipes/quickstart.toml"
    device = sys.argv[3] if len(sys.argv) > 3 else "cuda"
    sets = sys.argv[4:]
    (fused, fused_blocks), (ref, ref_blocks) = (run(recipe, runs_dir, device, device, sets),
                                                run(recipe, runs_dir, "reference", device, sets))
    worst, where = 0.0, ""
    for name in COMPARED:
        for i, (a, b) in enumerate(zip(fused.get(name, []), ref.get(name, []))):
            if math.isnan(a) and math.isnan(b):
                continue
            rel = abs(a - b) / max(abs(b), 1e-12)
            if rel > worst or math.isnan(rel):
                worst, where = rel, f"{name} row {i}: {a!r} vs {b!r}"
    rows = len(ref.get("round", []))
    ok = rows > 0 and len(fused.get("round", [])) == rows and worst <= TOLERANCE
    stops = sum(b[3] for b in ref_blocks)
    same_stops = fused_blocks == ref_blocks
    print(f"block events: {len(ref_blocks)}, early stops {stops}, identical inner_steps/stopped_early/passes: "
          f"{same_stops}")
    ok = ok and same_stops
    print(f"{device} vs reference ops on {device}: {rows} metric rows, worst relative difference {worst:.2e} "
          f"({where or 'none'}), tolerance {TOLERANCE:g}: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
