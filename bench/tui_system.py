"""bcdtui's system panel (F4): what it costs the UI thread per refresh, and what one sample costs its worker.

  1. UI thread, per app refresh while the panel is open: the live-run list handed to the worker
     (bcdtui.system.local_runs over every run row) at 1,000 and 10,000 runs, and drawing one snapshot
     (SystemScreen.show: host line, GPU table, per-run table) with 8 GPUs and 64 live runs, in a headless app;
  2. worker thread, one SystemMonitor.sample() with this machine's GPU chain and psutil over 1, 16 and 64
     live processes (each a sleeping child of this script).
The target (issue 13) is the runs table's: one refresh < 50 ms on the UI thread; the sample is off that thread.

    PYTHONPATH=. python bench/tui_system.py
"""
from __future__ import annotations

import asyncio
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bcdtui import system  # noqa: E402


def median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def rows(n: int, live: int) -> list[SimpleNamespace]:
    return [SimpleNamespace(id=f"run{i:05d}-20261126-000000-{i:06x}", state="running" if i < live else "finished",
                            pid=10_000 + i, host="box") for i in range(n)]


def snapshot(n_gpus: int, n_runs: int) -> system.SystemSnapshot:
    gpus = [system.GpuSample(i, "NVIDIA H100 80GB HBM3", 40.0 + i, 30_000.0 + i, 81_559.0, 300.0 + i, 700.0)
            for i in range(n_gpus)]
    procs = [system.ProcSample(f"run{i:05d}-20261126-000000-{i:06x}", 10_000 + i, 99.0, 2.5e9, 4_000.0)
             for i in range(n_runs)]
    return system.SystemSnapshot(gpus, "NVML", "", 37.0, 30e9, 64e9, procs)


async def draw_ms(repeat: int) -> float:
    from bcdtui.app import BcdApp
    from bcdtui.runner import cpu_slot
    from bcdtui.screens.system import SystemScreen

    class Still(SystemScreen):
        def sample_loop(self) -> None:  # the bench draws by hand: no worker
            return None

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        app = BcdApp(Path(tmp) / "runs", Path(tmp) / "recipes", slots=[cpu_slot()], refresh_s=3600)
        async with app.run_test(size=(160, 48)) as pilot:
            screen = Still(system.SystemMonitor(system.GpuProbe([])), "box")
            await app.push_screen(screen)
            await pilot.pause()
            snap = snapshot(8, 64)
            return median_ms(lambda: screen.show(snap), repeat)


def main() -> int:
    print(f"machine: {platform.node()} {platform.machine()}, python {platform.python_version()}")
    for n in (1_000, 10_000):
        table = rows(n, 10)
        took = median_ms(lambda: system.local_runs(table, "box"), 51)
        print(f"UI thread: local_runs over {n:>6,} rows          {took:7.2f} ms")
    print(f"UI thread: draw a snapshot (8 GPUs, 64 runs)     {asyncio.run(draw_ms(21)):7.2f} ms")
    children = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]) for _ in range(64)]
    try:
        for k in (1, 16, 64):
            monitor = system.SystemMonitor(system.default_probe())
            monitor.runs = [(f"r{i}", c.pid) for i, c in enumerate(children[:k])]
            monitor.sample()  # the first: GPU probe, psutil baselines
            took = median_ms(monitor.sample, 11)
            gpu = monitor.gpu.source or monitor.gpu.note
            print(f"worker:    one sample, {k:>2} live processes ({gpu})  {took:7.2f} ms")
    finally:
        for c in children:
            c.kill()
            c.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
