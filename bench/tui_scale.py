"""bcdtui at scale: 1,000 run directories of 10,000 metric lines each (about 2 GB), and three timings.

  1. start to first paint of the runs table: `python -m bcdtui` started in a pseudo-terminal (160x48) until the
     terminal output holds the first row's run id (interpreter start, imports, re-attach scan of every run,
     table build, first frame), median of --starts starts; also the same inside one process (App created to
     the first frame, pilot) for the split;
  2. one refresh (the app's periodic step: runner tick, incremental rescan of all runs, table update) with
     nothing new, and with 10 running runs each appending a metric line;
  3. metric line written to shown: a line appended to a running run's metrics.jsonl until the runs table cell
     and the run screen's chart hold its value, with the app's own refresh interval (0.25 s).
Targets (issues 4 and 13): first paint < 1.5 s, one refresh < 50 ms, written to shown < 0.5 s, on the 2-core
machine, at 1,000 runs x 10,000 lines and at 10,000 runs x 1,000 lines (`--runs 10000 --lines 1000`), with the
issue-13 columns (display ids, val after state, tags; the refreshes run with two config columns shown).

    PYTHONPATH=. python bench/tui_scale.py                  # the recorded run (bench/RESULTS.md)
    PYTHONPATH=. python bench/tui_scale.py --runs 50 --lines 1000 --starts 1   # smoke run, seconds
The run directories go to a temporary folder (removed at the end unless --keep); --dir reuses one.
"""
from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import math
import os
import platform
import pty
import select
import shutil
import signal
import socket
import statistics
import struct
import sys
import tempfile
import termios
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bcdcore.rundir import display_id  # noqa: E402
from bcdtui.synthetic import resolved_recipe  # noqa: E402

BASE_T = 1_795_000_000.0


# ----------------------------------------------------------------------------------------------------------
# data

def metric_blob(lines: int, rounds: int) -> bytes:
    """`lines` metric events (v1) as one bytes blob: every run directory gets a copy."""
    out = []
    for r in range(1, lines + 1):
        loss = 2.3 * math.exp(-r / (rounds / 4)) + 0.05
        event = {"v": 1, "kind": "metric", "t": BASE_T + 0.5 * r, "round": r, "grad_evals": 20 * r,
                 "samples": 1280 * r, "bytes_comm": 0, "wall_s": 0.5 * r, "train_loss": loss}
        if r % 10 == 0:
            event.update(val_loss=loss * 1.1, val_acc=1 - loss / 2.5)
        out.append(json.dumps(event))
    return ("\n".join(out) + "\n").encode()


def generate(root: Path, n_runs: int, lines: int, live: int) -> list[str]:
    """n_runs run directories; the first `live` say running with this process's pid (they look alive, so the
    app tails them), the rest finished or failed. Returns the ids of the live runs."""
    root.mkdir(parents=True, exist_ok=True)
    recipe = resolved_recipe("scale")
    full = metric_blob(lines, lines)
    end = json.dumps({"v": 1, "kind": "end", "t": BASE_T + 0.5 * lines + 1, "state": "finished",
                      "reason": "rounds done"}).encode() + b"\n"
    host, pid = socket.gethostname(), os.getpid()
    live_ids = []
    for i in range(n_runs):
        run_id = f"scale-20261126-{i // 3600 % 24:02d}{i // 60 % 60:02d}{i % 60:02d}-{i:06x}"
        path = root / run_id
        path.mkdir(exist_ok=True)
        (path / "recipe.toml").write_text(recipe)
        running = i < live
        state = "running" if running else ("failed" if i % 100 == 7 else "finished")
        with open(path / "metrics.jsonl", "wb") as f:
            f.write(b'{"v": 1, "kind": "start", "t": %.1f, "run_id": "%s"}\n' % (BASE_T, run_id.encode()))
            f.write(full)
            if not running:
                f.write(end)
        status = {"state": state, "run_id": run_id, "recipe": "scale", "host": host,
                  "pid": pid if running else 4_194_999, "gpu": "", "started": BASE_T + i,
                  "ended": None if running else BASE_T + i + 0.5 * lines, "exit_code": None if running else 0,
                  "error": "diverged: train_loss is nan" if state == "failed" else None,
                  "progress": {"round": lines, "rounds": lines * 2 if running else lines}}
        (path / "status.json").write_text(json.dumps(status))
        (path / "log.txt").write_text(f"run {run_id}\n")
        if i % 10 == 3:  # some runs carry tags and a display name (the tags column, the display id)
            (path / "annotations.json").write_text(json.dumps({"version": 1, "name": f"lr{i % 7}" if i % 20 == 3
                                                               else "", "tags": ["baseline", f"seed{i % 5}"],
                                                               "notes": "a note"}))
        if running:
            live_ids.append(run_id)
    return live_ids


def du(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


# ----------------------------------------------------------------------------------------------------------
# 1. start to first paint, end to end (a real terminal)

def first_paint_subprocess(runs: Path, recipes: Path, needle: str, timeout: float = 60.0) -> float:
    env = dict(os.environ)
    env.update(TERM="xterm-256color", COLUMNS="160", LINES="48",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    t0 = time.perf_counter()
    pid, fd = pty.fork()
    if pid == 0:  # child: the pty's slave is stdin/stdout/stderr
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 48, 160, 0, 0))
        os.execvpe(sys.executable, [sys.executable, "-m", "bcdtui", "--runs", str(runs), "--recipes",
                                    str(recipes), "--gpus", "none"], env)
    buf = b""
    target = needle.encode()
    elapsed = math.nan
    try:
        while time.perf_counter() - t0 < timeout:
            ready, _, _ = select.select([fd], [], [], 0.05)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
            if target in buf:
                elapsed = time.perf_counter() - t0
                break
    finally:
        try:
            os.write(fd, b"\x11")  # ctrl+q
            deadline = time.time() + 10
            while time.time() < deadline:
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                try:
                    while select.select([fd], [], [], 0.05)[0]:
                        if not os.read(fd, 65536):
                            break
                except OSError:
                    pass
            else:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        except (OSError, ChildProcessError):
            pass
        os.close(fd)
    if math.isnan(elapsed):
        raise RuntimeError(f"the first row ({needle}) never appeared; last output: {buf[-400:]!r}")
    return elapsed


# ----------------------------------------------------------------------------------------------------------
# 2 and 3, inside one process (pilot)

async def in_process(runs: Path, recipes: Path, live_ids: list[str], samples: int) -> dict:
    from textual.widgets import DataTable

    from bcdtui.app import BcdApp
    from bcdtui.runner import cpu_slot
    from bcdtui.screens import RunScreen
    from bcdtui.widgets import LineChart

    result: dict = {}
    painted = asyncio.Event()
    t0 = time.perf_counter()
    app = BcdApp(runs, recipes, slots=[cpu_slot()], refresh_s=0.25)
    app.first_paint_callbacks.append(lambda: (result.setdefault("first_paint_s", time.perf_counter() - t0),
                                              painted.set()))
    async with app.run_test(size=(160, 48)) as pilot:
        await asyncio.wait_for(painted.wait(), 60)
        table = app.runs_screen.query_one("#runs", DataTable)
        result["rows"] = table.row_count

        async def settled() -> float:
            """Seconds until every run's row is in the table with its val and loss (the first load reads the
            statuses, paints, then reads the events' tails and adds rows frame by frame, newest first)."""
            t = time.perf_counter()
            while app.ws.model.pending or table.row_count < len(app.ws.model.rows):
                await asyncio.sleep(0.05)
            return time.perf_counter() - t

        result["backfill_s"] = await settled() + result["first_paint_s"]
        # the config columns a user picks with `o` (each run's recipe.toml read once, the table re-laid out);
        # every refresh below then runs with them shown
        t = time.perf_counter()
        app.runs_screen._columns_chosen("algorithm.K algorithm.lambda")
        await pilot.pause()
        result["config_columns_paint_s"] = time.perf_counter() - t
        result["config_columns_s"] = await settled() + result["config_columns_paint_s"]
        result["columns"] = len(table.columns)

        # 2. one refresh
        idle, busy = [], []
        for _ in range(samples):
            t = time.perf_counter()
            app.tick()
            idle.append(time.perf_counter() - t)
            await pilot.pause()
        for k in range(samples):
            for j, run_id in enumerate(live_ids):
                with open(runs / run_id / "metrics.jsonl", "a") as f:
                    f.write(json.dumps({"v": 1, "kind": "metric", "t": time.time(), "round": 20_000 + k,
                                        "train_loss": 0.5 + 1e-4 * k + 1e-6 * j}) + "\n")
            t = time.perf_counter()
            app.tick()
            busy.append(time.perf_counter() - t)
            await pilot.pause()
        result["refresh_idle_s"] = idle
        result["refresh_busy_s"] = busy

        # 3. written to shown: the runs table, then the run screen
        target = live_ids[0]
        path = runs / target / "metrics.jsonl"

        async def latency(value: float, shown) -> float:
            with open(path, "a") as f:
                f.write(json.dumps({"v": 1, "kind": "metric", "t": time.time(), "round": 30_000,
                                    "grad_evals": 1, "train_loss": value}) + "\n")
                f.flush()
            t = time.perf_counter()
            while not shown(value):
                await asyncio.sleep(0.002)
                if time.perf_counter() - t > 5:
                    raise RuntimeError("the written line never showed")
            await pilot.pause()  # the repaint that follows the update
            return time.perf_counter() - t

        table_lat = []
        for k in range(samples):
            value = 0.123400 + 1e-6 * k
            table_lat.append(await latency(value, lambda v: app.ws.model.rows[target].train_loss == v
                                           and _cell(table, target) == f"{v:.4f}"))
            await asyncio.sleep(0.05 + 0.011 * k % 0.25)  # land at different phases of the refresh interval
        result["shown_table_s"] = table_lat

        table.move_cursor(row=table.get_row_index(target))
        await pilot.press("enter")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, RunScreen)
        chart = screen.query_one("#chart", LineChart)
        run_lat = []
        for k in range(samples):
            value = 0.2345 + 1e-6 * k
            run_lat.append(await latency(value, lambda v: chart.series and chart.series[0].ys
                                         and chart.series[0].ys[-1] == v))
            await asyncio.sleep(0.05 + 0.011 * k % 0.25)
        result["shown_run_screen_s"] = run_lat
    return result


def _cell(table, run_id: str) -> str:
    try:
        cell = table.get_cell(run_id, "train_loss")
    except Exception:  # noqa: BLE001
        return ""
    return getattr(cell, "plain", str(cell))


def stats(values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    return f"median {statistics.median(ms):.1f} ms, max {ms[-1]:.1f} ms (n={len(ms)})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--live", type=int, default=10, help="runs that look alive (running)")
    parser.add_argument("--starts", type=int, default=5, help="end-to-end starts to time")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--dir", type=Path, default=None, help="reuse/keep the generated runs here")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    root = args.dir or Path(tempfile.mkdtemp(prefix="bcdtui-scale-"))
    runs, recipes = root / "runs", root / "recipes"
    recipes.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}")
    try:
        t = time.perf_counter()
        if args.dir is not None and runs.is_dir() and len(list(runs.iterdir())) == args.runs:
            live_ids = sorted(p.name for p in runs.iterdir()
                              if json.loads((p / "status.json").read_text())["state"] == "running")
            for run_id in live_ids:  # they are "alive" through this process's pid
                status = json.loads((runs / run_id / "status.json").read_text())
                status["pid"] = os.getpid()
                (runs / run_id / "status.json").write_text(json.dumps(status))
            print(f"reusing {args.runs} run directories in {runs}")
        else:
            live_ids = generate(runs, args.runs, args.lines, args.live)
            print(f"generated {args.runs} run directories x {args.lines} metric lines "
                  f"({du(runs) / 1e9:.2f} GB) in {time.perf_counter() - t:.1f} s")
        newest = max(runs.iterdir(), key=lambda p: json.loads((p / "status.json").read_text())["started"]).name
        newest = display_id(newest)  # what the table shows of it

        starts = [first_paint_subprocess(runs, recipes, newest) for _ in range(args.starts)]
        print(f"1. start to first paint (bcdtui in a 160x48 pty, {args.runs} runs): "
              f"median {statistics.median(starts):.2f} s, max {max(starts):.2f} s (n={len(starts)})  "
              f"target < 1.5 s")
        res = asyncio.run(in_process(runs, recipes, live_ids, args.samples))
        print(f"   in one process (App() to first frame, table of {res['rows']} rows): {res['first_paint_s']:.2f} s")
        print(f"   every row with its val and loss (tails read after the first paint, newest first): "
              f"{res['backfill_s']:.2f} s after start")
        print(f"   config columns picked with o ({res['columns']} columns): first frame "
              f"{res['config_columns_paint_s']:.2f} s, every run's value {res['config_columns_s']:.2f} s")
        print(f"2. one refresh, nothing new:                {stats(res['refresh_idle_s'])}  target < 50 ms")
        print(f"   one refresh, {len(live_ids)} runs appended a line: {stats(res['refresh_busy_s'])}")
        print(f"3. metric line written to shown, runs table: {stats(res['shown_table_s'])}  target < 500 ms")
        print(f"   metric line written to shown, run screen: {stats(res['shown_run_screen_s'])}")
        ok = (statistics.median(starts) < 1.5 and max(res["refresh_busy_s"] + res["refresh_idle_s"]) < 0.05
              and max(res["shown_table_s"] + res["shown_run_screen_s"]) < 0.5)
        print("all targets met" if ok else "a target was missed")
        return 0
    finally:
        if args.dir is None and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        elif args.keep:
            print(f"kept {root}")


if __name__ == "__main__":
    sys.exit(main())
