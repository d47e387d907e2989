"""The system panel's sampling, without a terminal: per GPU utilisation, memory and power (NVML through
nvidia-ml-py, else `nvidia-smi --query-gpu`, else nothing: a CPU-only machine reports "no GPU", not an
error), and per live run its process tree's CPU %, RSS and GPU memory (psutil; NVML's per-process memory).

Readers are injected, so tests drive the fallback chain with fakes. `SystemMonitor.sample()` does blocking
work (a subprocess, driver calls): the screen calls it from a worker thread, never from the UI thread."""
from __future__ import annotations

import math
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

NAN = math.nan
MIB = 1024 * 1024
SMI_GPU_FIELDS = "index,name,utilization.gpu,memory.used,memory.total,power.draw,power.limit"
SMI_APP_FIELDS = "pid,used_memory"
SMI_TIMEOUT_S = 5.0


class GpuUnavailable(Exception):
    """A reader cannot answer here (no library, no driver, no GPU): the next reader is tried."""


@dataclass
class GpuSample:
    index: int
    name: str
    util_pct: float = NAN
    mem_used_mib: float = NAN
    mem_total_mib: float = NAN
    power_w: float = NAN
    power_limit_w: float = NAN


@dataclass
class ProcSample:
    run_id: str
    pid: int
    cpu_pct: float = NAN  # the process and its children; nan on the first sample (psutil needs two)
    rss_bytes: float = NAN
    gpu_mem_mib: float = NAN  # nan where no GPU reader gives per-process memory
    alive: bool = True


@dataclass
class SystemSnapshot:
    gpus: list[GpuSample] = field(default_factory=list)
    gpu_source: str = ""  # the reader that answered ("NVML", "nvidia-smi"), "" when none did
    gpu_note: str = ""  # "no GPU" on a CPU-only machine
    cpu_pct: float = NAN  # the whole machine
    mem_used_bytes: float = NAN
    mem_total_bytes: float = NAN
    procs: list[ProcSample] = field(default_factory=list)
    took_s: float = 0.0


GpuReading = tuple[list[GpuSample], dict[int, float]]  # the GPUs, and GPU memory (MiB) per pid


class GpuReader(Protocol):
    name: str

    def read(self) -> GpuReading: ...


def _num(value: Any, scale: float = 1.0) -> float:
    try:
        out = float(value) / scale
    except (TypeError, ValueError, OverflowError):
        return NAN
    return out if math.isfinite(out) else NAN


# ----------------------------------------------------------------------------------------------------------
# NVML

class NvmlReader:
    """GPUs through NVML (`import pynvml`, from nvidia-ml-py). `nvml` injects a module-like fake."""

    name = "NVML"

    def __init__(self, nvml: Any = None) -> None:
        self._nvml = nvml
        self._ready = False

    def _module(self) -> Any:
        if self._nvml is None:
            try:
                import pynvml
            except ImportError:
                raise GpuUnavailable("nvidia-ml-py is not installed") from None
            self._nvml = pynvml
        return self._nvml

    def read(self) -> GpuReading:
        nvml = self._module()
        try:  # NVML raises its own NVMLError subclasses (driver missing, library not found, ...)
            if not self._ready:
                nvml.nvmlInit()
                self._ready = True
            count = int(nvml.nvmlDeviceGetCount())
        except Exception as exc:  # noqa: BLE001 - any failure of the driver library means "not here"
            raise GpuUnavailable(str(exc) or type(exc).__name__) from None
        if count <= 0:
            raise GpuUnavailable("no GPU")
        gpus, per_pid = [], {}
        for i in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(i)
            except Exception:  # noqa: BLE001 - a GPU that fell off the bus: the others still show
                gpus.append(GpuSample(i, "unreadable"))
                continue
            gpus.append(self._gpu(nvml, i, handle))
            for proc in _call(nvml, "nvmlDeviceGetComputeRunningProcesses", handle, default=[]) or []:
                pid, used = getattr(proc, "pid", None), _num(getattr(proc, "usedGpuMemory", None), MIB)
                if isinstance(pid, int) and math.isfinite(used):
                    per_pid[pid] = per_pid.get(pid, 0.0) + used
        return gpus, per_pid

    @staticmethod
    def _gpu(nvml: Any, index: int, handle: Any) -> GpuSample:
        name = _call(nvml, "nvmlDeviceGetName", handle, default="GPU")
        name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
        util = _call(nvml, "nvmlDeviceGetUtilizationRates", handle)
        mem = _call(nvml, "nvmlDeviceGetMemoryInfo", handle)
        return GpuSample(index, name, util_pct=_num(getattr(util, "gpu", None)),
                         mem_used_mib=_num(getattr(mem, "used", None), MIB),
                         mem_total_mib=_num(getattr(mem, "total", None), MIB),
                         power_w=_num(_call(nvml, "nvmlDeviceGetPowerUsage", handle), 1000.0),  # milliwatts
                         power_limit_w=_num(_call(nvml, "nvmlDeviceGetEnforcedPowerLimit", handle), 1000.0))


def _call(module: Any, name: str, *args: Any, default: Any = None) -> Any:
    """One NVML query; a field the GPU does not support (power on some boards) reads as `default`."""
    try:
        return getattr(module, name)(*args)
    except Exception:  # noqa: BLE001 - NVMLError_NotSupported and friends: that one field is unknown
        return default


# ----------------------------------------------------------------------------------------------------------
# nvidia-smi

def parse_smi_gpus(text: str) -> list[GpuSample]:
    """`nvidia-smi --query-gpu=<SMI_GPU_FIELDS> --format=csv,noheader,nounits` output; `[N/A]` reads as
    unknown, a line that is not 7 fields is skipped."""
    out = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 7:
            continue
        index = _num(parts[0])
        if not math.isfinite(index):
            continue
        out.append(GpuSample(int(index), parts[1], *(_num(p) for p in parts[2:])))
    return out


def parse_smi_apps(text: str) -> dict[int, float]:
    """`nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits` -> MiB per pid."""
    out: dict[int, float] = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2 or not parts[0].isdigit() or not math.isfinite(_num(parts[1])):
            continue
        out[int(parts[0])] = out.get(int(parts[0]), 0.0) + _num(parts[1])
    return out


class SmiReader:
    """GPUs through the `nvidia-smi` command (an argument list, no shell). `run` injects a fake subprocess.run."""

    name = "nvidia-smi"

    def __init__(self, run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
                 exe: str = "nvidia-smi") -> None:
        self._run, self.exe = run, exe

    def _query(self, what: str) -> str:
        try:
            done = self._run([self.exe, what, "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=SMI_TIMEOUT_S, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise GpuUnavailable("nvidia-smi not found") from None
        except subprocess.TimeoutExpired:
            raise GpuUnavailable(f"nvidia-smi did not answer in {SMI_TIMEOUT_S:.0f} s") from None
        except OSError as exc:
            raise GpuUnavailable(f"nvidia-smi: {exc.strerror or exc}") from None
        if done.returncode != 0:
            lines = [ln.strip() for ln in f"{done.stderr or ''}\n{done.stdout or ''}".splitlines() if ln.strip()]
            raise GpuUnavailable(lines[0] if lines else f"nvidia-smi exited with {done.returncode}")
        return done.stdout or ""

    def read(self) -> GpuReading:
        gpus = parse_smi_gpus(self._query(f"--query-gpu={SMI_GPU_FIELDS}"))
        if not gpus:
            raise GpuUnavailable("no GPU")
        try:
            per_pid = parse_smi_apps(self._query(f"--query-compute-apps={SMI_APP_FIELDS}"))
        except GpuUnavailable:
            per_pid = {}
        return gpus, per_pid


class GpuProbe:
    """The readers in order; the first that answers is used. When none does, the machine has no GPU to show:
    the probe says "no GPU" and stops asking (a CPU-only machine does not grow one while bcdtui runs)."""

    def __init__(self, readers: Iterable[GpuReader]) -> None:
        self.readers = list(readers)
        self.source = ""
        self.note = ""
        self.detail = ""  # why each reader declined, for the curious (shown dim)
        self.gave_up = False
        self._answered = False

    def read(self) -> GpuReading:
        if self.gave_up:
            return [], {}
        reasons = []
        for reader in self.readers:
            try:
                gpus, per_pid = reader.read()
            except GpuUnavailable as exc:
                reasons.append(f"{reader.name}: {exc}")
                continue
            self.source, self.note, self.detail, self._answered = reader.name, "", "", True
            return gpus, per_pid
        # a reader that answered before and fails now (a driver reload) is asked again next time
        self.source, self.note, self.detail = "", "GPU unreadable" if self._answered else "no GPU", "; ".join(reasons)
        self.gave_up = not self._answered
        return [], {}


def default_probe() -> GpuProbe:
    return GpuProbe([NvmlReader(), SmiReader()])


# ----------------------------------------------------------------------------------------------------------
# processes

def local_runs(rows: Iterable[Any], host: str) -> list[tuple[str, int]]:
    """(run id, pid) of the running runs whose process is on this host (rows: bcdtui.runs.RunRow-like)."""
    out = []
    for row in rows:
        pid = getattr(row, "pid", None)
        if getattr(row, "state", "") == "running" and isinstance(pid, int) and pid > 0 \
                and getattr(row, "host", "") in ("", host):
            out.append((str(row.id), pid))
    return out


class ProcessSampler:
    """CPU % and RSS of each run's process tree (the engine and any children, e.g. data loader workers), and its
    GPU memory from a GPU reader's per-pid table. psutil's CPU % is measured between two calls, so the
    Process objects are kept from one sample to the next; `psutil_module` injects a fake."""

    def __init__(self, psutil_module: Any = None) -> None:
        if psutil_module is None:
            import psutil as psutil_module
        self.psutil = psutil_module
        self._procs: dict[int, Any] = {}

    def _process(self, pid: int) -> tuple[Any, bool]:
        """The kept Process of `pid` and whether it is new (its first cpu_percent reads 0, not a measure)."""
        proc = self._procs.get(pid)
        if proc is not None:
            return proc, False
        proc = self.psutil.Process(pid)
        proc.cpu_percent(None)
        self._procs[pid] = proc
        return proc, True

    def _children(self) -> dict[int, list[int]]:
        """parent pid -> child pids, from one pass over the process table (Process.children would make one pass
        per run: 64 live runs cost 64 scans of /proc)."""
        kids: dict[int, list[int]] = {}
        for proc in self.psutil.process_iter(["ppid"]):
            ppid = (getattr(proc, "info", None) or {}).get("ppid")
            if isinstance(ppid, int) and ppid > 0:
                kids.setdefault(ppid, []).append(proc.pid)
        return kids

    def sample(self, runs: list[tuple[str, int]], gpu_mem: dict[int, float]) -> list[ProcSample]:
        ps, out, seen = self.psutil, [], set()
        kids = self._children() if runs else {}
        for run_id, pid in runs:
            sample = ProcSample(run_id, pid)
            try:
                root, fresh = self._process(pid)
                seen.add(pid)
                tree, cpu, rss, gpu = [pid], 0.0, 0.0, NAN
                for member in tree:  # grows as it goes: the run's process tree, breadth first
                    tree.extend(k for k in kids.get(member, ()) if k not in tree)
                    try:
                        kept = root if member == pid else self._process(member)[0]  # a new child adds 0
                        seen.add(member)
                        cpu += kept.cpu_percent(None)
                        rss += kept.memory_info().rss
                    except (ps.NoSuchProcess, ps.ZombieProcess):
                        if member == pid:
                            raise
                        continue  # a child that ended between the listing and the read
                    if member in gpu_mem:
                        gpu = (0.0 if math.isnan(gpu) else gpu) + gpu_mem[member]
                sample.cpu_pct = NAN if fresh else cpu
                sample.rss_bytes, sample.gpu_mem_mib = rss, gpu
            except (ps.NoSuchProcess, ps.ZombieProcess):
                sample.alive = False
            except ps.AccessDenied:
                pass  # another user's process: its numbers stay unknown
            out.append(sample)
        for pid in set(self._procs) - seen:
            del self._procs[pid]
        return out


# ----------------------------------------------------------------------------------------------------------
# the monitor the screen's worker thread drives

class SystemMonitor:
    """One `sample()` reads the GPUs, the machine's CPU and memory and every run in `runs` (a list the UI
    thread replaces whole, never mutates, so the worker thread reads a consistent one)."""

    def __init__(self, gpu: GpuProbe | None = None, procs: ProcessSampler | None = None,
                 psutil_module: Any = None, clock: Callable[[], float] = time.perf_counter) -> None:
        if psutil_module is None:
            import psutil as psutil_module
        self.psutil = psutil_module
        self.gpu = gpu if gpu is not None else default_probe()
        self.procs = procs if procs is not None else ProcessSampler(psutil_module)
        self.runs: list[tuple[str, int]] = []
        self.latest: SystemSnapshot | None = None
        self._clock = clock
        self.psutil.cpu_percent(None)  # the machine's CPU % is measured between calls too

    def sample(self) -> SystemSnapshot:
        start = self._clock()
        gpus, per_pid = self.gpu.read()
        memory = self.psutil.virtual_memory()
        snap = SystemSnapshot(gpus=gpus, gpu_source=self.gpu.source, gpu_note=self.gpu.note,
                              cpu_pct=_num(self.psutil.cpu_percent(None)),
                              mem_used_bytes=_num(getattr(memory, "total", NAN)) - _num(getattr(memory, "available",
                                                                                                 NAN)),
                              mem_total_bytes=_num(getattr(memory, "total", NAN)),
                              procs=self.procs.sample(list(self.runs), per_pid))
        snap.took_s = self._clock() - start
        self.latest = snap
        return snap
