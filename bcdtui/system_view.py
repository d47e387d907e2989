"""The system panel's cells, as plain functions of a SystemSnapshot (the screen only lays them out)."""
from __future__ import annotations

import math

from bcdcore.rundir import display_id, printable
from bcdtui.system import GpuSample, ProcSample, SystemSnapshot

BAR_W = 10
GPU_BAR_W = 6
GPU_COLUMNS = ("GPU", "name", "util", "memory", "power")
PROC_COLUMNS = ("run", "pid", "CPU %", "RSS", "GPU mem")


def bar(fraction: float, width: int = BAR_W) -> str:
    """`████▌     ` : a fraction in eighths of a cell, blank when unknown."""
    if not math.isfinite(fraction):
        return " " * width
    eighths = round(min(1.0, max(0.0, fraction)) * width * 8)
    full, part = divmod(eighths, 8)
    return ("█" * full + ("▏▎▍▌▋▊▉"[part - 1] if part else "")).ljust(width)


def human_bytes(value: float) -> str:
    if not math.isfinite(value) or value < 0:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return "—"


def mib(value: float) -> str:
    return human_bytes(value * 1024 * 1024) if math.isfinite(value) else "—"


def percent(value: float) -> str:
    return f"{value:.0f}%" if math.isfinite(value) else "—"


def _ratio(a: float, b: float) -> float:
    return a / b if math.isfinite(a) and math.isfinite(b) and b > 0 else math.nan


def gpu_cells(gpu: GpuSample) -> list[str]:
    """GPU, name, util, memory, power: about 70 columns with an H100's name, so a row fits at 80."""
    util = f"{bar(gpu.util_pct / 100, GPU_BAR_W)} {percent(gpu.util_pct):>4}"
    used, total = gpu.mem_used_mib / 1024, gpu.mem_total_mib / 1024
    memory = f"{bar(_ratio(used, total), GPU_BAR_W)} " + (
        f"{used:.1f}/{total:.0f} GiB" if math.isfinite(used) and math.isfinite(total) else mib(gpu.mem_used_mib))
    power = "—" if not math.isfinite(gpu.power_w) else f"{gpu.power_w:.0f}" + (
        f"/{gpu.power_limit_w:.0f} W" if math.isfinite(gpu.power_limit_w) else " W")
    return [str(gpu.index), printable(gpu.name).removeprefix("NVIDIA "), util, memory, power]


def proc_cells(proc: ProcSample) -> list[str]:
    if not proc.alive:
        return [display_id(proc.run_id), str(proc.pid), "ended", "—", "—"]
    return [display_id(proc.run_id), str(proc.pid), f"{proc.cpu_pct:.0f}" if math.isfinite(proc.cpu_pct) else "…",
            human_bytes(proc.rss_bytes), mib(proc.gpu_mem_mib)]


def host_line(snap: SystemSnapshot) -> str:
    """The machine: CPU and memory, and where the GPU numbers come from (or "no GPU")."""
    memory = _ratio(snap.mem_used_bytes, snap.mem_total_bytes)
    gpus = f"GPUs via {snap.gpu_source}" if snap.gpu_source else (snap.gpu_note or "no GPU")
    return (f"CPU {bar(snap.cpu_pct / 100)} {percent(snap.cpu_pct):>4}   memory {bar(memory)} "
            f"{human_bytes(snap.mem_used_bytes)} / {human_bytes(snap.mem_total_bytes)}   {gpus}")
