"""The system panel (issue 13 item 4): nvidia-smi parsing, the NVML -> nvidia-smi -> "no GPU" chain with fake
readers, per-process sampling with psutil on real processes, the cells, and pilot tests of the F4 screen
(sampling happens in a worker thread, never on the UI thread)."""
from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st
from textual.widgets import DataTable, Static

from bcdtui.app import BcdApp
from bcdtui.runner import cpu_slot
from bcdtui.screens.system import SystemScreen
from bcdtui.synthetic import demo_runs, write_run
from bcdtui.system import (
    GpuProbe,
    GpuSample,
    GpuUnavailable,
    NvmlReader,
    ProcessSampler,
    ProcSample,
    SmiReader,
    SystemMonitor,
    default_probe,
    local_runs,
    parse_smi_apps,
    parse_smi_gpus,
)
from bcdtui.system_view import bar, gpu_cells, host_line, human_bytes, proc_cells

SMI = """0, NVIDIA H100 80GB HBM3, 87, 40321, 81559, 512.33, 700.00
1, NVIDIA H100 80GB HBM3, [N/A], 3, 81559, [N/A], [N/A]
garbage line
x, bad index, 1, 2, 3, 4, 5
"""


# ----------------------------------------------------------------------------------------------------------
# nvidia-smi

def test_parse_smi_gpus_reads_numbers_and_unknowns():
    gpus = parse_smi_gpus(SMI)
    assert [g.index for g in gpus] == [0, 1]
    g0, g1 = gpus
    assert (g0.name, g0.util_pct, g0.mem_used_mib, g0.mem_total_mib, g0.power_w, g0.power_limit_w) == \
        ("NVIDIA H100 80GB HBM3", 87.0, 40321.0, 81559.0, 512.33, 700.0)
    assert math.isnan(g1.util_pct) and math.isnan(g1.power_w) and g1.mem_used_mib == 3.0
    assert parse_smi_gpus("") == []


@given(st.text(alphabet=st.sampled_from("0123456789,.[]N/A \n-eE+infa"), max_size=300))
def test_parse_smi_never_raises_and_reads_only_well_formed_lines(text):
    for gpu in parse_smi_gpus(text):
        assert isinstance(gpu.index, int) and isinstance(gpu.util_pct, float)
    assert all(isinstance(pid, int) and math.isfinite(mib) for pid, mib in parse_smi_apps(text).items())


def test_parse_smi_apps_sums_per_pid():
    assert parse_smi_apps("123, 500\n123, 20\n456, [N/A]\nbad\n789, 7\n") == {123: 520.0, 789: 7.0}


def _smi_run(calls, gpus=SMI, apps="4242, 1000\n", code=0, err=""):
    def run(cmd, **kw):
        calls.append((cmd, kw))
        assert isinstance(cmd, list) and "shell" not in kw
        return subprocess.CompletedProcess(cmd, code, gpus if "--query-gpu" in cmd[1] else apps, err)

    return run


def test_smi_reader_runs_argument_lists_and_reads_apps():
    calls = []
    gpus, per_pid = SmiReader(_smi_run(calls)).read()
    assert [g.index for g in gpus] == [0, 1] and per_pid == {4242: 1000.0}
    assert calls[0][0] == ["nvidia-smi", "--query-gpu=index,name,utilization.gpu,memory.used,memory.total,"
                           "power.draw,power.limit", "--format=csv,noheader,nounits"]
    assert calls[1][0][1] == "--query-compute-apps=pid,used_memory" and calls[0][1]["timeout"] > 0


def test_smi_reader_failures_are_gpu_unavailable():
    def missing(cmd, **kw):
        raise FileNotFoundError(2, "No such file")

    def hangs(cmd, **kw):
        raise subprocess.TimeoutExpired(cmd, kw["timeout"])

    with pytest.raises(GpuUnavailable, match="nvidia-smi not found"):
        SmiReader(missing).read()
    with pytest.raises(GpuUnavailable, match="did not answer"):
        SmiReader(hangs).read()
    with pytest.raises(GpuUnavailable, match="NVIDIA-SMI has failed"):
        SmiReader(_smi_run([], code=9, err="NVIDIA-SMI has failed because it couldn't communicate\n")).read()
    with pytest.raises(GpuUnavailable, match="no GPU"):
        SmiReader(_smi_run([], gpus="No devices were found\n")).read()


# ----------------------------------------------------------------------------------------------------------
# NVML (a fake module with pynvml's names)

class NVMLError(Exception):
    pass


class FakeNvml:
    def __init__(self, count=2, init_error=None, power=True):
        self.count, self.init_error, self.power, self.inits = count, init_error, power, 0

    def nvmlInit(self):
        self.inits += 1
        if self.init_error:
            raise NVMLError(self.init_error)

    def nvmlDeviceGetCount(self):
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return b"NVIDIA H200" if h == 0 else "NVIDIA H200"

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=50 + h, memory=10)

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=(h + 1) * 1024 ** 3, total=141 * 1024 ** 3, free=0)

    def nvmlDeviceGetPowerUsage(self, h):
        if not self.power:
            raise NVMLError("Not Supported")
        return 250_500  # milliwatts

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return 700_000

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [SimpleNamespace(pid=4242, usedGpuMemory=512 * 1024 ** 2), SimpleNamespace(pid=7, usedGpuMemory=None)]


def test_nvml_reader_units_and_per_process_memory():
    nvml = FakeNvml()
    reader = NvmlReader(nvml)
    gpus, per_pid = reader.read()
    assert gpus == [GpuSample(0, "NVIDIA H200", 50.0, 1024.0, 141 * 1024.0, 250.5, 700.0),
                    GpuSample(1, "NVIDIA H200", 51.0, 2048.0, 141 * 1024.0, 250.5, 700.0)]
    assert per_pid == {4242: 1024.0}  # 512 MiB on each GPU; a process without a number is left out
    reader.read()
    assert nvml.inits == 1  # initialised once
    gpus, _ = NvmlReader(FakeNvml(power=False)).read()
    assert math.isnan(gpus[0].power_w) and gpus[0].util_pct == 50.0  # an unsupported field only


def test_nvml_reader_failures_are_gpu_unavailable():
    with pytest.raises(GpuUnavailable, match="Driver Not Loaded"):
        NvmlReader(FakeNvml(init_error="Driver Not Loaded")).read()
    with pytest.raises(GpuUnavailable, match="no GPU"):
        NvmlReader(FakeNvml(count=0)).read()


class Reader:
    def __init__(self, name, answers):
        self.name, self.answers, self.calls = name, list(answers), 0

    def read(self):
        self.calls += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_probe_falls_back_to_nvidia_smi_then_to_no_gpu_and_stops_asking():
    nvml = Reader("NVML", [GpuUnavailable("NVML Shared Library Not Found")])
    smi = Reader("nvidia-smi", [([GpuSample(0, "A100")], {1: 2.0})])
    probe = GpuProbe([nvml, smi])
    assert probe.read() == ([GpuSample(0, "A100")], {1: 2.0}) and probe.source == "nvidia-smi"

    nvml = Reader("NVML", [GpuUnavailable("NVML Shared Library Not Found")])
    smi = Reader("nvidia-smi", [GpuUnavailable("nvidia-smi not found")])
    probe = GpuProbe([nvml, smi])
    assert probe.read() == ([], {}) and probe.note == "no GPU" and probe.source == ""
    assert probe.detail == "NVML: NVML Shared Library Not Found; nvidia-smi: nvidia-smi not found"
    probe.read()
    assert (nvml.calls, smi.calls) == (1, 1)  # a CPU-only machine is probed once


def test_probe_keeps_asking_a_reader_that_answered_before():
    gpu = ([GpuSample(0, "H200")], {})
    nvml = Reader("NVML", [gpu, GpuUnavailable("GPU is lost"), gpu])
    probe = GpuProbe([nvml])
    probe.read()
    assert probe.read() == ([], {}) and probe.note == "GPU unreadable" and not probe.gave_up
    assert probe.read() == gpu and probe.source == "NVML" and probe.note == ""


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU driver")
def test_the_real_chain_on_this_cpu_only_machine_says_no_gpu():
    probe = default_probe()
    assert probe.read() == ([], {}) and probe.note == "no GPU"
    snap = SystemMonitor(probe).sample()
    assert snap.gpus == [] and snap.gpu_note == "no GPU" and "no GPU" in host_line(snap)


# ----------------------------------------------------------------------------------------------------------
# processes

def test_process_sampler_measures_a_process_tree():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        sampler = ProcessSampler()
        me = os.getpid()
        first = sampler.sample([("r1", me)], {child.pid: 300.0})
        assert math.isnan(first[0].cpu_pct)  # psutil measures CPU % between two samples
        sum(i * i for i in range(200_000))  # some CPU time of this process between the samples
        second = sampler.sample([("r1", me)], {child.pid: 300.0, 999_999_999: 5.0})[0]
        assert second.alive and second.cpu_pct >= 0 and math.isfinite(second.cpu_pct)
        rss = psutil.Process(me).memory_info().rss + psutil.Process(child.pid).memory_info().rss
        assert 0.5 * rss <= second.rss_bytes <= 2 * rss  # this process and its child, summed
        assert second.gpu_mem_mib == 300.0  # the child's GPU memory counts for the run
    finally:
        child.kill()
        child.wait()
    gone = sampler.sample([("r1", child.pid)], {})[0]
    assert not gone.alive and proc_cells(gone)[2] == "ended"


def test_process_sampler_access_denied_leaves_numbers_unknown():
    class Denied(Exception):
        pass

    class FakePsutil:
        NoSuchProcess = ZombieProcess = type("NoSuch", (Exception,), {})
        AccessDenied = Denied

        @staticmethod
        def process_iter(attrs):
            return []

        @staticmethod
        def Process(pid):
            raise Denied()

    sample = ProcessSampler(FakePsutil).sample([("r", 1)], {})[0]
    assert sample.alive and math.isnan(sample.cpu_pct) and math.isnan(sample.rss_bytes)


def test_local_runs_are_running_runs_of_this_host_with_a_pid():
    rows = [SimpleNamespace(id="a", state="running", pid=10, host="box"),
            SimpleNamespace(id="b", state="running", pid=11, host="other"),
            SimpleNamespace(id="c", state="finished", pid=12, host="box"),
            SimpleNamespace(id="d", state="running", pid=None, host="box"),
            SimpleNamespace(id="e", state="running", pid=13, host="")]
    assert local_runs(rows, "box") == [("a", 10), ("e", 13)]


# ----------------------------------------------------------------------------------------------------------
# cells

def test_cells_bars_and_units():
    assert bar(0.5, 4) == "██  " and bar(1.5, 2) == "██" and bar(math.nan, 3) == "   "
    assert bar(0.5, 1) == "▌" and bar(1 / 8, 1) == "▏"  # eighths of a cell
    assert human_bytes(512) == "512 B" and human_bytes(3 * 1024 ** 3) == "3.0 GiB" and human_bytes(math.nan) == "—"
    cells = gpu_cells(GpuSample(0, "H200", 87.0, 1024.0, 4096.0, 250.4, 700.0))
    assert cells == ["0", "H200", "█████▎  87%", "█▌     1.0/4 GiB", "250/700 W"]
    assert gpu_cells(GpuSample(1, "NVIDIA A100", power_w=70.0))[1:] == ["A100", " " * 6 + "    —", " " * 6 + " —",
                                                                         "70 W"]
    cells = proc_cells(ProcSample("quickstart-20261126-025404-92c6eb", 42, 153.2, 2 * 1024 ** 2, 100.0))
    assert cells == ["quickstart-92c6eb", "42", "153", "2.0 MiB", "100.0 MiB"]
    assert proc_cells(ProcSample("r", 1))[2:] == ["…", "—", "—"]


# ----------------------------------------------------------------------------------------------------------
# pilot: F4

class FakePsutil:
    NoSuchProcess = ZombieProcess = AccessDenied = type("Never", (Exception,), {})

    @staticmethod
    def cpu_percent(interval=None):
        return 42.0

    @staticmethod
    def virtual_memory():
        return SimpleNamespace(total=64 * 1024 ** 3, available=48 * 1024 ** 3)


class FakeSampler:
    """Fixed numbers per run (the snapshot must not depend on this machine); records its threads."""

    def __init__(self):
        self.threads: list[threading.Thread] = []

    def sample(self, runs, gpu_mem):
        self.threads.append(threading.current_thread())
        return [ProcSample(run_id, 4242 + i, 97.0, 1.5 * 1024 ** 3, gpu_mem.get(4242, math.nan))
                for i, (run_id, _) in enumerate(runs)]


def fake_monitor() -> tuple[SystemMonitor, FakeSampler]:
    sampler = FakeSampler()
    return SystemMonitor(GpuProbe([NvmlReader(FakeNvml())]), sampler, psutil_module=FakePsutil), sampler


@pytest.fixture
def place(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").mkdir()
    demo_runs(tmp_path / "runs")
    # a running run on this host whose process is alive (this test process), so the panel lists it
    write_run(tmp_path / "runs", "live-20261126-050000-abcdef", state="running", pid=os.getpid(),
              host=socket.gethostname(), rounds=100, done=10, started=1_795_009_000.0)
    return tmp_path


async def _open_system(pilot, app):
    await pilot.pause()
    await pilot.press("f4")
    deadline = time.monotonic() + 30
    while not (isinstance(app.screen, SystemScreen) and app.screen.snapshot is not None):
        assert time.monotonic() < deadline, "no sample reached the system screen"
        await pilot.pause(0.05)
    await pilot.pause()
    return app.screen


def _cells(table: DataTable) -> list[list[str]]:
    return [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]


async def test_f4_shows_gpus_and_live_runs_sampled_off_the_ui_thread(place):
    app = BcdApp(place / "runs", place / "recipes", slots=[cpu_slot()], refresh_s=0.1)
    app.system_monitor, sampler = fake_monitor()
    async with app.run_test(size=(120, 36)) as pilot:
        screen = await _open_system(pilot, app)
        gpus = _cells(screen.query_one("#gpus", DataTable))
        assert [row[:2] for row in gpus] == [["0", "H200"], ["1", "H200"]]
        assert gpus[0][3].endswith(" 1.0/141 GiB") and gpus[1][2].endswith(" 51%") and gpus[1][4] == "250/700 W"
        assert _cells(screen.query_one("#procs", DataTable)) == [["live-abcdef", "4242", "97", "1.5 GiB", "1.0 GiB"]]
        host = str(screen.query_one("#sys-host", Static).render())
        assert "42%" in host and "16.0 GiB / 64.0 GiB" in host and "GPUs via NVML" in host
        assert sampler.threads and threading.main_thread() not in sampler.threads
        await pilot.press("f4")  # F4 again: the same panel, not a second sampler
        await pilot.pause()
        assert app.screen is screen and sum(isinstance(s, SystemScreen) for s in app.screen_stack) == 1
        await pilot.press("escape")
        assert not isinstance(app.screen, SystemScreen)


async def test_f4_on_this_machine_says_no_gpu_and_lists_this_run(place):
    app = BcdApp(place / "runs", place / "recipes", slots=[cpu_slot()], refresh_s=0.1)
    if shutil.which("nvidia-smi") is None:
        app.system_monitor = SystemMonitor(default_probe())  # the real chain, the real psutil
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await _open_system(pilot, app)
        procs = _cells(screen.query_one("#procs", DataTable))
        assert [row[:2] for row in procs] == [["live-abcdef", str(os.getpid())]]
        if shutil.which("nvidia-smi") is None:
            assert not screen.query_one("#gpus", DataTable).display
            assert "no GPU" in str(screen.query_one("#sys-host", Static).render())


async def test_a_driver_call_that_hangs_never_blocks_the_ui(place):
    release = threading.Event()

    class Hanging:
        name = "NVML"

        def read(self):
            release.wait(60)  # a driver call that does not return (until the test lets it)
            return [GpuSample(0, "H200")], {}

    app = BcdApp(place / "runs", place / "recipes", slots=[cpu_slot()], refresh_s=0.1)
    app.system_monitor = SystemMonitor(GpuProbe([Hanging()]), FakeSampler(), psutil_module=FakePsutil)
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            await pilot.press("f4")
            await pilot.pause()
            screen = app.screen
            assert isinstance(screen, SystemScreen) and screen.snapshot is None  # still sampling
            assert "sampling" in str(screen.query_one("#sys-host", Static).render())
            await pilot.press("escape")  # the UI answers while the sample hangs
            await pilot.pause()
            assert not isinstance(app.screen, SystemScreen)
            await pilot.press("f1")
            await pilot.pause()
            assert type(app.screen).__name__ == "HelpScreen"
            release.set()
    finally:
        release.set()
