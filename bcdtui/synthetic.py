"""Synthetic run directories in the engine's format (status.json, metrics.jsonl v1, log.txt, recipe.toml),
deterministic, for tests, snapshots, benchmarks and demos of the workstation. Nothing here trains anything."""
from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

from bcdcore.recipe import parse_recipe, to_toml

DEAD_PID = 4_194_999  # above Linux's largest pid_max (2**22): never a live process


def resolved_recipe(name: str = "demo", **sections) -> str:
    """A resolved recipe (every default filled in) as TOML; `sections` = {"algorithm": {"K": 5}, ...}."""
    raw = {"run": {"name": name, "rounds": 30, "device": "cpu"},
           "data": {"name": "digits_flat", "batch_size": 64},
           "model": {"name": "mlp", "widths": [32]},
           "algorithm": {"K": 10, "lambda": 0.01}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return to_toml(parse_recipe(raw, source=name).to_dict())


def metric_line(t0: float, rnd: int, rounds: int, n_blocks: int = 2, k: int = 10, seed: int = 0,
                final: bool = False, eval_every: int = 1) -> dict:
    phase = 0.3 * seed
    loss = 2.3 * math.exp(-rnd / max(1.0, rounds / 4) / (1 + 0.6 * seed)) + 0.05 + 0.02 * math.sin(rnd / 3 + phase)
    event = {"v": 1, "kind": "metric", "t": t0 + 0.5 * rnd, "round": rnd, "grad_evals": rnd * n_blocks * k,
             "samples": rnd * n_blocks * k * 64, "bytes_comm": 0, "wall_s": 0.5 * rnd, "train_loss": loss}
    if eval_every and (rnd % eval_every == 0 or final):
        event["val_loss"] = loss * 1.15 + 0.01
        event["val_acc"] = min(0.99, 1.0 - loss / 2.5)
    if final:
        event["test_loss"] = loss * 1.2
        event["test_acc"] = min(0.99, 0.98 - loss / 2.5)
    return event


def block_lines(t: float, rnd: int, n_blocks: int = 2, k: int = 10, lam: float = 0.01) -> list[dict]:
    out = []
    for b in range(n_blocks):
        residual = 0.5 / (1 + rnd) * (1 + 0.3 * b)
        out.append({"v": 1, "kind": "block", "t": t, "round": rnd, "block": b, "inner_steps": k - (b % 3),
                    "stopped_early": b % 3 != 0, "residual": residual, "threshold": 0.4 * lam * (b + 1),
                    "dist": 0.03 / (1 + b), "gamma": 1.0, "lambda": lam})
    return out


def write_run(runs_dir: Path | str, run_id: str, *, state: str = "finished", rounds: int = 30,
              done: int | None = None, recipe: str | None = None, recipe_name: str | None = None,
              host: str | None = None, pid: int | None = None, gpu: str = "", started: float = 1_795_000_000.0,
              n_blocks: int = 2, k: int = 10, seed: int = 0, error: str | None = None, end_reason: str | None = None,
              measures: bool = False, blocks: bool = True, eval_every: int = 1) -> Path:
    """One run directory. `done` = rounds written (default: all for finished, half otherwise); a `running`
    state gets no end event; the others end with one."""
    path = Path(runs_dir) / run_id
    path.mkdir(parents=True, exist_ok=True)
    name = recipe_name or run_id.rsplit("-", 3)[0]
    (path / "recipe.toml").write_text(recipe if recipe is not None else resolved_recipe(name))
    done = rounds if done is None and state == "finished" else (rounds // 2 if done is None else done)
    lines = [{"v": 1, "kind": "start", "t": started, "run_id": run_id, "recipe": name, "n_blocks": n_blocks,
              "block_sizes": [1040 + 10 * i for i in range(n_blocks)], "device": "cuda" if gpu else "cpu",
              "backend": "cuda" if gpu else "cpu", "mode": "blockwise", "resumed_from_round": None}]
    log = [f"run {run_id}: {n_blocks} blocks on {'cuda' if gpu else 'cpu'}"]
    for rnd in range(1, done + 1):
        final = state == "finished" and rnd == done
        if blocks:
            lines += block_lines(started + 0.5 * rnd - 0.1, rnd, n_blocks, k)
        m = metric_line(started, rnd, rounds, n_blocks, k, seed, final, eval_every)
        lines.append(m)
        log.append(f"round {rnd} " + " ".join(f"{key} {m[key]:.5g}" for key in m
                                             if key.endswith(("_loss", "_acc"))))
        if measures and rnd % 5 == 0:
            matrix = [[math.cos(0.4 * i * j / (1 + rnd / 10)) for j in range(n_blocks * 4)] for i in range(n_blocks * 4)]
            lines.append({"v": 1, "kind": "measure", "t": started + 0.5 * rnd, "unit": "block_coupling",
                          "round": rnd, "value": matrix, "path": ""})
    ended = None
    if state != "running":
        reason = end_reason or {"finished": "rounds done", "killed": "killed by SIGTERM",
                                "failed": "diverged: train_loss is nan"}.get(state, state)
        lines.append({"v": 1, "kind": "end", "t": started + 0.5 * done + 0.2, "state": state, "reason": reason})
        log.append(f"end: {state} ({reason})")
        ended = started + 0.5 * done + 0.2
    with open(path / "metrics.jsonl", "w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    (path / "log.txt").write_text("\n".join(log) + "\n")
    status = {"state": state, "run_id": run_id, "recipe": name, "progress": {"round": done, "rounds": rounds},
              "host": host if host is not None else socket.gethostname(), "pid": pid if pid is not None else DEAD_PID,
              "gpu": gpu, "started": started, "ended": ended,
              "exit_code": {"finished": 0, "failed": 1, "killed": 143}.get(state), "error": error}
    tmp = path / ".status.tmp"
    tmp.write_text(json.dumps(status, indent=1))
    os.replace(tmp, path / "status.json")
    return path


def demo_runs(runs_dir: Path | str, live_pid: int | None = None, live_host: str = "gpu-box") -> list[Path]:
    """A small, fixed set covering every state (the snapshot tests and docs screenshot use it). The running
    run names `live_host` so that its liveness is not checked against this machine."""
    runs_dir = Path(runs_dir)
    base = 1_795_000_000.0
    recipe_a = resolved_recipe("quickstart", algorithm={"K": 10, "lambda": 0.01, "solver": "momentum"})
    recipe_b = resolved_recipe("quickstart", algorithm={"K": 5, "lambda": 0.05, "solver": "momentum"},
                               run={"seed": 1})
    return [
        write_run(runs_dir, "quickstart-20261126-025404-92c6eb", recipe=recipe_a, rounds=30, started=base,
                  host="gpu-box", pid=4242, measures=True),
        write_run(runs_dir, "quickstart-20261126-031010-4be1a0", recipe=recipe_b, rounds=30, started=base + 960,
                  host="gpu-box", pid=4243, seed=1),
        write_run(runs_dir, "sweep_k-20261126-040000-a1b2c3", state="running", rounds=200, done=75,
                  started=base + 4200, host=live_host, pid=live_pid or 4244, gpu="0", n_blocks=4, k=5, seed=2),
        write_run(runs_dir, "diabetes-20261126-041500-77aa01", state="failed", rounds=100, done=12,
                  started=base + 5100, host="gpu-box", pid=4245, error="diverged: train_loss is nan",
                  end_reason="diverged: train_loss is nan", recipe_name="diabetes"),
        write_run(runs_dir, "quickstart-20261126-042000-0c0ffe", state="killed", rounds=30, done=9,
                  started=base + 5400, host="gpu-box", pid=4246, gpu="1"),
        write_run(runs_dir, "tiny-20261126-043000-deadbe", state="running", rounds=50, done=20, started=base + 6000,
                  pid=DEAD_PID, recipe_name="tiny"),  # this host, dead pid, no end event: lost
    ]
