"""Plain unit tests of the workstation's logic (no terminal): runner, tailer, runs model, recipe diff, recipe
workspace, charts, key map, and the headless Workstation. Processes here are a small fake engine (a Python
script that speaks the run-directory format), so these tests take seconds; the pilot tests use the real one."""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bcdcore.recipe import flatten, toml_value
from bcdtui import charts
from bcdtui.diff import MISSING, diff_runs, recipe_diff
from bcdtui.recipes import (
    TEMPLATE,
    editor_command,
    error_line,
    list_recipes,
    new_recipe,
    parse_overrides,
    plan_launch,
    validate_text,
)
from bcdtui.runner import (
    CPU_SLOT,
    Job,
    LaunchSpec,
    Runner,
    RunnerError,
    Slot,
    cpu_slot,
    detect_slots,
    parse_nvidia_smi,
    read_launch_run_dir,
    slot_key_for_gpu,
)
from bcdtui.runs import RunsModel, fmt_duration, progress_bar
from bcdtui.synthetic import demo_runs, resolved_recipe, write_run
from bcdtui.tailer import RunFollower, TextTail, read_tail
from bcdtui.workstation import ActionError, Workstation

REPO = Path(__file__).resolve().parents[1]

FAKE_ENGINE = r'''
import json, os, signal, socket, sys, time
args = sys.argv[1:]
assert args[0] == "run", args
recipe = resume = None
runs, sets, i = "runs", [], 1
while i < len(args):
    a = args[i]
    if a in ("--resume", "--runs-dir", "--set"):
        val = args[i + 1]
        if a == "--resume": resume = val
        elif a == "--runs-dir": runs = val
        else: sets.append(val)
        i += 2
    elif a in ("--quiet", "--sweep-point"):
        i += 1
    else:
        recipe = a
        i += 1
text = open(recipe).read() if recipe else ""
if "broken" in text:
    print(f"error: {recipe}:1: [run] broken: this recipe is broken on purpose", file=sys.stderr)
    sys.exit(2)
rounds = int(os.environ.get("FAKE_ROUNDS", "3"))
delay = float(os.environ.get("FAKE_DELAY", "0.02"))
for s in sets:
    k, v = s.split("=", 1)
    if k == "run.rounds":
        rounds = int(v)
path = resume or os.path.join(runs, f"fake-{os.getpid()}")
os.makedirs(path, exist_ok=True)
if not resume:
    with open(os.path.join(path, "recipe.toml"), "w") as f:
        f.write(text + "".join(f"# set {s}\n" for s in sets))
print(f"run directory: {path}", flush=True)
status = {"state": "queued", "recipe": "fake", "progress": {"round": 0, "rounds": rounds}}
def write_status(**kw):
    status.update(kw)
    tmp = os.path.join(path, ".status.tmp")
    with open(tmp, "w") as f:
        json.dump(status, f)
    os.replace(tmp, os.path.join(path, "status.json"))
events = open(os.path.join(path, "metrics.jsonl"), "a", buffering=1)
def event(kind, **kw):
    events.write(json.dumps({"v": 1, "kind": kind, "t": time.time(), **kw}) + "\n")
stop = []
if os.environ.get("FAKE_IGNORE_TERM") == "1":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
write_status(state="running", pid=os.getpid(), host=socket.gethostname(),
             gpu=os.environ.get("CUDA_VISIBLE_DEVICES", ""), started=time.time(),
             cuda_visible=os.environ.get("CUDA_VISIBLE_DEVICES"), omp=os.environ.get("OMP_NUM_THREADS"),
             session_leader=os.getsid(0) == os.getpid(), sets=sets)
event("start", run_id=os.path.basename(path), recipe="fake", n_blocks=2, block_sizes=[10, 5], device="cpu",
      backend="reference")
for r in range(1, rounds + 1):
    time.sleep(delay)
    event("block", round=r, block=0, inner_steps=2, stopped_early=False, residual=0.5, threshold="nan",
          dist=0.1, gamma=1.0, **{"lambda": 0.0})
    event("metric", round=r, grad_evals=2 * r, samples=64 * r, bytes_comm=0, wall_s=delay * r, train_loss=1.0 / r)
    write_status(progress={"round": r, "rounds": rounds})
    if stop:
        event("end", state="killed", reason="killed by SIGTERM")
        write_status(state="killed", exit_code=143, ended=time.time())
        sys.exit(143)
event("end", state="finished", reason="rounds done")
write_status(state="finished", exit_code=0, ended=time.time())
print("finished: rounds done", flush=True)
'''


@pytest.fixture
def fake(tmp_path):
    """(engine argv, recipe path) of the fake engine."""
    script = tmp_path / "fake_engine.py"
    script.write_text(FAKE_ENGINE)
    recipe = tmp_path / "recipes" / "fake.toml"
    recipe.parent.mkdir()
    recipe.write_text(resolved_recipe("fake"))
    return [sys.executable, str(script)], recipe


def fake_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(extra)
    return env


def wait(predicate, timeout=30.0, step=0.02, tick=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if tick is not None:
            tick()
        if predicate():
            return True
        time.sleep(step)
    raise AssertionError("condition not reached in time")


def status_of(run_dir) -> dict:
    try:
        return json.loads((Path(run_dir) / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def start_endless(tmp_path: Path, fake: tuple[list[str], Path], **env: str) -> tuple[Runner, Job]:
    """A Runner over tmp_path/runs and its job: the fake engine with 100000 rounds (running until killed) and
    `env` on top, returned once the run's status says running."""
    engine, recipe = fake
    runner = Runner(tmp_path / "runs", slots=[cpu_slot()], engine=engine, cwd=tmp_path,
                    env=fake_env(FAKE_ROUNDS="100000", **env))
    job = runner.submit(LaunchSpec(recipe=str(recipe)))
    wait(lambda: job.run_dir and status_of(job.run_dir).get("state") == "running", tick=runner.tick)
    return runner, job


# ----------------------------------------------------------------------------------------------------------
# runner

def test_parse_nvidia_smi_and_slot_keys():
    slots = parse_nvidia_smi("0, NVIDIA H100 80GB HBM3, 81559\n1, NVIDIA H100 80GB HBM3, 81559\n\nbad line\n")
    assert [s.key for s in slots] == ["gpu0", "gpu1"]
    assert slots[1].cuda_visible == "1" and "80 GiB" in slots[1].label
    assert slot_key_for_gpu("") == CPU_SLOT and slot_key_for_gpu("3") == "gpu3" and slot_key_for_gpu("2,3") == "gpu2"


def test_detect_slots_uses_nvidia_smi_when_present_else_cpu(tmp_path):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '0, Fake GPU, 16384'\necho '1, Fake GPU, 16384'\n")
    smi.chmod(0o755)
    assert [s.key for s in detect_slots(str(smi))] == ["gpu0", "gpu1"]
    assert [s.key for s in detect_slots(str(tmp_path / "missing-smi"))] == [CPU_SLOT]
    broken = tmp_path / "broken-smi"
    broken.write_text("#!/bin/sh\nexit 9\n")
    broken.chmod(0o755)
    assert [s.key for s in detect_slots(str(broken))] == [CPU_SLOT]


def test_toml_value():
    assert toml_value(5) == "5"
    assert toml_value(0.1) == "0.1"
    assert toml_value(True) == "true"
    assert toml_value("adam") == '"adam"'
    assert toml_value([0.1, 0.2]) == "[0.1, 0.2]"


def test_launch_detached_with_argument_list_and_link_run_dir(tmp_path, fake):
    engine, recipe = fake
    runner = Runner(tmp_path / "runs", slots=[cpu_slot()], engine=engine, cwd=tmp_path, env=fake_env())
    job = runner.submit(LaunchSpec(recipe=str(recipe), overrides=["run.rounds=2", "algorithm.K=3"], label="fake"))
    assert job.state == "queued"
    runner.tick()
    assert job.state in ("starting", "started") and job.pid
    assert isinstance(job.proc.args, list)  # never a shell string
    wait(lambda: job.state == "exited", tick=runner.tick)
    assert job.exit_code == 0 and Path(job.run_dir).parent == (tmp_path / "runs").resolve()
    status = status_of(job.run_dir)
    assert status["state"] == "finished"
    assert status["session_leader"] is True  # start_new_session: its own session and process group
    assert status["cuda_visible"] == ""  # the CPU slot hides GPUs
    assert status["sets"] == ["run.rounds=2", "algorithm.K=3"]
    assert read_launch_run_dir(Path(job.out_path), tmp_path) == Path(job.run_dir)


def test_queue_per_slot_limit_and_cuda_visible_devices(tmp_path, fake):
    engine, recipe = fake
    slots = [Slot("gpu0", "0: fake", "0"), Slot("gpu1", "1: fake", "1")]
    runner = Runner(tmp_path / "runs", slots=slots, per_slot=1, engine=engine, cwd=tmp_path,
                    env=fake_env(FAKE_ROUNDS="15", FAKE_DELAY="0.05"))
    jobs = [runner.submit(LaunchSpec(recipe=str(recipe), label=f"j{i}")) for i in range(3)]
    runner.tick()
    assert [j.state for j in jobs].count("queued") == 1
    assert sorted(j.slot for j in jobs if j.state != "queued") == ["gpu0", "gpu1"]
    assert json.loads(runner.queue_file.read_text())[0]["id"] == jobs[2].id  # the queue survives a restart
    wait(lambda: all(j.state == "exited" for j in jobs), timeout=60, tick=runner.tick)
    for job in jobs:  # each run saw only its own GPU
        assert status_of(job.run_dir)["cuda_visible"] == job.slot.removeprefix("gpu")
    assert {j.slot for j in jobs} == {"gpu0", "gpu1"}
    assert json.loads(runner.queue_file.read_text()) == []


def test_queue_is_restored_by_a_new_runner(tmp_path, fake):
    engine, recipe = fake
    runs = tmp_path / "runs"
    first = Runner(runs, slots=[cpu_slot()], engine=engine, cwd=tmp_path)
    job = first.submit(LaunchSpec(recipe=str(recipe), label="later", slots=[CPU_SLOT]))
    second = Runner(runs, slots=[cpu_slot()], engine=engine, cwd=tmp_path)
    assert [j.id for j in second.queued()] == [job.id] and second.jobs[job.id].spec.label == "later"
    second.cancel(job.id)
    assert Runner(runs, slots=[cpu_slot()], engine=engine).queued() == []
    with pytest.raises(RunnerError):
        first.submit(LaunchSpec(recipe=str(recipe), slots=["gpu7"]))


def test_recipe_error_becomes_a_job_error_with_the_engine_line(tmp_path, fake):
    engine, _ = fake
    bad = tmp_path / "broken.toml"
    bad.write_text("broken = true\n")
    runner = Runner(tmp_path / "runs", slots=[cpu_slot()], engine=engine, cwd=tmp_path)
    job = runner.submit(LaunchSpec(recipe=str(bad), label="broken"))
    wait(lambda: job.state == "error", tick=runner.tick)
    assert "broken on purpose" in job.error and job.exit_code == 2 and not job.run_dir
    assert any("broken on purpose" in m for m in runner.drain_messages())


def test_kill_sends_sigterm_to_the_group_and_the_run_ends_killed(tmp_path, fake):
    runner, job = start_endless(tmp_path, fake, FAKE_DELAY="0.02")
    request = runner.kill(job.run_dir)
    assert request.group and request.pid == job.pid
    wait(lambda: job.state == "exited", tick=runner.tick)
    assert status_of(job.run_dir)["state"] == "killed" and job.exit_code == 143
    with pytest.raises(RunnerError):
        runner.kill(job.run_dir)  # nothing left to kill


def test_kill_escalates_to_sigkill_after_the_grace_period(tmp_path, fake):
    runner, job = start_endless(tmp_path, fake, FAKE_IGNORE_TERM="1")
    request = runner.kill(job.run_dir, grace_s=0.3)
    time.sleep(0.1)
    runner.tick()
    assert job.state == "started" and not request.escalated  # SIGTERM ignored, grace not over yet
    wait(lambda: job.state == "exited", tick=runner.tick)
    assert request.escalated and job.exit_code == -signal.SIGKILL
    assert any("SIGKILL" in m for m in runner.drain_messages())
    model = RunsModel(tmp_path / "runs")
    model.refresh(jobs=list(runner.jobs.values()))
    assert model.rows[Path(job.run_dir).name].state == "lost"  # died without an end event


def test_kill_reattached_run_started_elsewhere(tmp_path, fake):
    """A run this Runner did not start (a previous bcdtui) is killed through its status pid."""
    engine, recipe = fake
    runs = tmp_path / "runs"
    out = open(tmp_path / "out.txt", "wb")
    proc = subprocess.Popen([*engine, "run", str(recipe), "--runs-dir", str(runs)], stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env=fake_env(FAKE_ROUNDS="100000"))
    try:
        wait(lambda: read_launch_run_dir(tmp_path / "out.txt", tmp_path) is not None)
        run_dir = read_launch_run_dir(tmp_path / "out.txt", tmp_path)
        wait(lambda: status_of(run_dir).get("state") == "running")
        runner = Runner(runs, slots=[cpu_slot()], engine=engine)
        assert runner.usage(runner.live_runs()) == {CPU_SLOT: 1}  # a re-attached run holds its slot
        runner.kill(run_dir)
        assert proc.wait(timeout=30) == 143
        assert status_of(run_dir)["state"] == "killed"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.close()


def test_rerun_resume_and_delete(tmp_path, fake):
    engine, recipe = fake
    runs = tmp_path / "runs"
    runner = Runner(runs, slots=[cpu_slot()], engine=engine, cwd=tmp_path, env=fake_env())
    job = runner.submit(LaunchSpec(recipe=str(recipe)))
    wait(lambda: job.state == "exited", tick=runner.tick)
    again = runner.rerun(job.run_dir)
    assert again.spec.recipe == str(Path(job.run_dir, "recipe.toml").resolve()) and "rerun" in again.spec.label
    wait(lambda: again.state == "exited", tick=runner.tick)
    assert again.run_dir != job.run_dir and status_of(again.run_dir)["state"] == "finished"
    with pytest.raises(RunnerError, match="finished: nothing to resume"):
        runner.resume(job.run_dir)  # issue 13: u on a finished run is refused, not started to fail
    status = status_of(job.run_dir)
    Path(job.run_dir, "status.json").write_text(json.dumps({**status, "state": "killed"}))
    with pytest.raises(RunnerError, match="checkpoint"):
        runner.resume(job.run_dir)
    Path(job.run_dir, "checkpoint.pt").write_bytes(b"x")
    assert runner.resume(job.run_dir).spec.resume == str(Path(job.run_dir).resolve())
    runner.delete(job.run_dir)
    assert not Path(job.run_dir).exists()
    with pytest.raises(RunnerError):
        runner.delete(tmp_path)  # not a run directory of this runs dir


def test_delete_refuses_a_live_run(tmp_path, fake):
    runner, job = start_endless(tmp_path, fake)
    with pytest.raises(RunnerError, match="kill it"):
        runner.delete(job.run_dir)
    runner.kill(job.run_dir)
    wait(lambda: job.state == "exited", tick=runner.tick)
    runner.delete(job.run_dir)
    assert not Path(job.run_dir).exists()


# ----------------------------------------------------------------------------------------------------------
# tailer

def test_text_tail_waits_for_complete_lines(tmp_path):
    log = tmp_path / "log.txt"
    tail = TextTail(log)
    assert tail.poll() == []
    log.write_text("one\ntw")
    assert tail.poll() == ["one"]
    with open(log, "a") as f:
        f.write("o\nthree\n")
    assert tail.poll() == ["two", "three"]
    assert tail.poll() == []


def test_text_tail_starts_a_huge_log_near_its_end_on_a_line_boundary(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("".join(f"line {i}\n" for i in range(20)))  # 150 bytes; its last 20 start inside "line 17"
    tail = TextTail(log, max_initial_bytes=20)
    assert tail.poll() == ["line 18", "line 19"]
    with open(log, "a") as f:
        f.write("line 20\n")
    assert tail.poll() == ["line 20"]


def test_follower_reads_by_offsets_and_folds_events(tmp_path):
    run = write_run(tmp_path, "r-20260101-000000-aaaaaa", state="running", rounds=10, done=4, measures=True)
    follower = RunFollower(run)
    first = follower.poll()
    assert first.metrics and first.blocks and first.log_lines
    assert follower.columns["round"] == [1.0, 2.0, 3.0, 4.0]
    assert follower.blocks_round == 4 and [b["block"] for b in follower.block_rows()] == [0, 1]
    offset = follower.events.offset
    assert follower.poll().events == 0 and follower.events.offset == offset  # nothing new: nothing re-read
    with open(run / "metrics.jsonl", "a") as f:  # a resumed run repeats round 4, then a torn line
        f.write(json.dumps({"v": 1, "kind": "metric", "t": 1.0, "round": 4, "train_loss": 0.25}) + "\n")
        f.write(json.dumps({"v": 1, "kind": "measure", "t": 1.0, "unit": "hessian", "round": 4,
                            "value": [[1, 2], [3, 4]]}) + "\n")
        f.write('{"v": 1, "kind": "metric", "round": 5, "train_lo')
    result = follower.poll()
    assert result.metrics and result.measures and result.events == 2
    assert follower.columns["train_loss"][-1] == 0.25 and len(follower.columns["round"]) == 4
    assert "hessian" in follower.measures
    with open(run / "metrics.jsonl", "a") as f:
        f.write('ss": 0.2}\n')
        f.write(json.dumps({"v": 1, "kind": "end", "t": 2.0, "state": "finished", "reason": "rounds done"}) + "\n")
    result = follower.poll()
    assert result.ended and follower.columns["round"][-1] == 5.0 and follower.end["state"] == "finished"
    xs, ys = follower.series("train_loss", "grad_evals")
    assert len(xs) == len(ys) and all(math.isfinite(v) for v in xs)  # rounds lacking grad_evals dropped


def test_read_tail_reads_only_the_end_and_widens_when_needed(tmp_path):
    run = write_run(tmp_path, "r-20260101-000000-bbbbbb", state="running", rounds=2000, done=1500, eval_every=500)
    summary = read_tail(run, window=2048)
    assert summary.round == 1500 and summary.val_name == "val_acc"  # found by widening past block events
    assert summary.seconds_per_round == pytest.approx(0.5)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"v": 1, "kind": "metric", "round": 1501, "tra')  # torn
    assert read_tail(run).round == 1500
    assert read_tail(tmp_path / "missing").round is None


# ----------------------------------------------------------------------------------------------------------
# runs model

def test_model_states_lost_and_reattached(tmp_path):
    demo_runs(tmp_path, live_pid=os.getpid(), live_host=socket.gethostname())
    model = RunsModel(tmp_path)
    result = model.refresh()
    assert len(result.added) == 6
    states = {k: r.state for k, r in model.rows.items()}
    assert states["tiny-20261126-043000-deadbe"] == "lost"  # running, this host, dead pid, no end event
    assert states["sweep_k-20261126-040000-a1b2c3"] == "running"  # this host, live pid: re-attached
    assert states["diabetes-20261126-041500-77aa01"] == "failed"
    lost = model.rows["tiny-20261126-043000-deadbe"]
    assert "end event" in lost.error
    running = model.rows["sweep_k-20261126-040000-a1b2c3"]
    assert running.round == 75 and running.rounds == 200 and running.eta_s == pytest.approx(125 * 0.5)
    assert model.live_runs() == [(str(running.path), "0")]


def test_model_refresh_is_incremental(tmp_path):
    demo_runs(tmp_path)
    model = RunsModel(tmp_path)
    model.refresh()
    assert not model.refresh().any
    run = tmp_path / "sweep_k-20261126-040000-a1b2c3"
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"v": 1, "kind": "metric", "t": 1_795_004_300.0, "round": 76, "train_loss": 0.123})
                + "\n")
    result = model.refresh()
    assert result.changed == {run.name} and not result.added
    assert model.rows[run.name].train_loss == 0.123 and model.rows[run.name].round == 76
    import shutil

    shutil.rmtree(tmp_path / "tiny-20261126-043000-deadbe")
    assert model.refresh().removed == {"tiny-20261126-043000-deadbe"}


def test_model_sort_and_filter(tmp_path):
    demo_runs(tmp_path)
    model = RunsModel(tmp_path)
    model.refresh()
    assert [r.id for r in model.view()][0] == "tiny-20261126-043000-deadbe"  # newest first by default
    model.sort_by("train_loss", reverse=False)
    losses = [r.train_loss for r in model.view()]
    assert losses == sorted(losses)
    model.sort_by("state", reverse=False)
    assert model.view()[0].state == "running"
    model.filter_text = "quickstart"
    assert {r.recipe for r in model.view()} == {"quickstart"} and len(model.view()) == 3
    model.filter_text = "quickstart killed"
    assert [r.state for r in model.view()] == ["killed"]
    model.filter_text = ""
    assert model.cycle_state_filter() == "active" and {r.state for r in model.view()} == {"running"}
    assert model.cycle_state_filter() == "finished" and len(model.view()) == 2
    assert model.cycle_state_filter() == "problems"
    assert {r.state for r in model.view()} == {"failed", "killed", "lost"}
    assert model.cycle_sort() in ("run", "recipe", "state", "val", "progress")
    with pytest.raises(ValueError):
        model.sort_by("nope")


def test_row_formatting():
    assert fmt_duration(62) == "1m02s" and fmt_duration(3 * 3600 + 120) == "3h02m" and fmt_duration(math.nan) == ""
    assert progress_bar(0.5, 8).startswith("████") and progress_bar(1.0).endswith("100%")


# ----------------------------------------------------------------------------------------------------------
# recipe diff

def test_flatten_and_diff_differences_only():
    a = {"run": {"name": "a", "seed": 0}, "algorithm": {"K": 10, "lambda": 0.01},
         "stop": [{"kind": "patience", "patience": 4}]}
    b = {"run": {"name": "a", "seed": 1}, "algorithm": {"K": 5, "lambda": 0.01}, "stop": []}
    assert flatten(a)["stop[0].kind"] == "patience"
    rows = recipe_diff([a, b], only_differences=True)
    keys = [r.key for r in rows]
    assert keys == ["run.seed", "algorithm.K", "stop[0].kind", "stop[0].patience", "stop"]
    stop_row = next(r for r in rows if r.key == "stop[0].kind")
    assert stop_row.values[1] is MISSING and stop_row.cells()[2] == "—"
    everything = recipe_diff([a, b])
    assert {r.key for r in everything} >= {"run.name", "algorithm.lambda"}
    assert not next(r for r in everything if r.key == "run.name").differs
    assert recipe_diff([a, a], only_differences=True) == []
    assert recipe_diff([{"x": {"v": True}}, {"x": {"v": 1}}], True)[0].differs  # true is not 1


def test_diff_runs_reads_resolved_recipes(tmp_path):
    one = write_run(tmp_path, "a-20260101-000000-aaaaaa", recipe=resolved_recipe("a", algorithm={"K": 3}))
    two = write_run(tmp_path, "a-20260101-000001-bbbbbb", recipe=resolved_recipe("a", algorithm={"K": 7}))
    rows = diff_runs([one, two], only_differences=True)
    assert [(r.key, r.values) for r in rows] == [("algorithm.K", [3, 7])]


# ----------------------------------------------------------------------------------------------------------
# recipes

def test_validate_text_ok_and_errors_with_lines():
    ok = validate_text(TEMPLATE.format(name="t"), "t.toml")
    assert ok.ok and ok.message.startswith("ok: mlp on digits_flat")
    broken_toml = "[run]\nname = \"x\"\nrounds = = 3\n"
    bad = validate_text(broken_toml, "x.toml")
    assert not bad.ok and bad.line == 3 and bad.message.startswith("x.toml:3: not valid TOML")
    unknown = validate_text("[run]\nname = \"x\"\n\n[algorithm]\nK = 2\ngama = 0.5\n", "y.toml")
    assert not unknown.ok and unknown.line == 6 and "gamma" in unknown.message  # did you mean
    out_of_range = validate_text("[algorithm]\ngamma = 2.0\n", "z.toml")
    assert not out_of_range.ok and out_of_range.line == 2
    assert error_line("y.toml:6: bad", "y.toml") == 6 and error_line("other: bad", "y.toml") is None


def test_sweep_plan_runs_each_point_as_bcdcore_sweep_does(tmp_path):
    recipe = tmp_path / "grid.toml"
    recipe.write_text(TEMPLATE.format(name="grid") + '\n[sweep]\n"algorithm.K" = [1, 5]\n"run.seed" = [0, 1, 2]\n')
    plan = plan_launch(recipe, ["run.rounds=2"])
    assert len(plan.runs) == 6 and plan.runs[0] == ["run.rounds=2", "algorithm.K=1", "run.seed=0"]
    assert plan.recipe == recipe and plan.sweep_point  # the recipe itself, run with --sweep-point: no copy
    runner = Runner(tmp_path / "runs", slots=[cpu_slot()], engine=["bcd"], restore_queue=False)
    job = runner.submit(LaunchSpec(recipe=str(plan.recipe), overrides=plan.runs[0], sweep_point=plan.sweep_point))
    assert job.args == ["bcd", "run", str(recipe), "--runs-dir", str(tmp_path / "runs"), "--quiet", "--sweep-point",
                        "--set", "run.rounds=2", "--set", "algorithm.K=1", "--set", "run.seed=0"]
    assert "sweep of 6 runs" in plan.summary and len(plan.describe(limit=4)) == 5
    single = plan_launch(_write(tmp_path / "one.toml", TEMPLATE.format(name="one")))
    assert single.runs == [[]] and single.recipe == tmp_path / "one.toml"
    from bcdcore.recipe import RecipeError

    with pytest.raises(RecipeError, match="algorithm.K"):
        plan_launch(tmp_path / "one.toml", ["algorithm.K=0"])


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_overrides_templates_and_editor(tmp_path):
    assert parse_overrides('algorithm.K=5  algorithm.lambda=[0.1,0.2]\nrun.name="a b"') == \
        ["algorithm.K=5", "algorithm.lambda=[0.1,0.2]", "run.name=a b"]
    from bcdcore.recipe import RecipeError

    with pytest.raises(RecipeError):
        parse_overrides("algorithm.K")
    path = new_recipe(tmp_path, "exp/first")
    assert path == tmp_path / "exp" / "first.toml" and validate_text(path.read_text(), "p").ok
    with pytest.raises(RecipeError):
        new_recipe(tmp_path, "exp/first")
    with pytest.raises(RecipeError):
        new_recipe(tmp_path, "../escape")
    assert list_recipes(tmp_path) == [path]
    assert editor_command(path, {"EDITOR": "emacs -nw"}) == ["emacs", "-nw", str(path)]
    assert editor_command(path, {})[0] == "vi"


# ----------------------------------------------------------------------------------------------------------
# charts

def test_line_chart_shape_downsampling_and_edge_cases():
    xs = list(range(10_000))
    ys = [math.exp(-x / 3000) for x in xs]
    lines = charts.line_chart([charts.Series("a", xs, ys), charts.Series("b", xs, [y / 2 for y in ys])], 60, 12,
                              x_label="round")
    assert len(lines) == 12 and all(line.cell_len <= 60 for line in lines)
    assert any("⠀" < ch <= "⣿" for ch in lines[0].plain + lines[5].plain)
    assert "round" in lines[-2].plain and "━ a" in lines[-1].plain
    empty = charts.line_chart([charts.Series("a", [], [])], 40, 8)
    assert "no data yet" in "".join(l.plain for l in empty)
    logged = charts.line_chart([charts.Series("a", [1, 2, 3], [1.0, -1.0, math.nan])], 40, 8, log_y=True)
    assert len(logged) == 8
    flat = charts.line_chart([charts.Series("a", [1, 2], [3.0, 3.0])], 30, 6, legend=False)
    assert len(flat) == 6


def test_heat_map_and_matrix_coercion():
    assert charts.as_matrix(3) == [[3.0]] and charts.as_matrix([1, 2]) == [[1.0, 2.0]]
    assert charts.as_matrix({"a": 1}) is None
    lines = charts.heat_map([[float(i * j) for j in range(6)] for i in range(4)], 30, 6)
    assert lines[-1].plain.startswith("0 ") and "(4x6)" in lines[-1].plain
    assert all(set(l.plain) == {"▀"} for l in lines[:-1])
    assert charts.colormap(0.0) == "#440154" and charts.colormap(1.0) == "#fde725"


# ----------------------------------------------------------------------------------------------------------
# the headless twin and the layout rule

def test_workstation_headless_launch_kill_rerun_delete_compare(tmp_path, fake):
    engine, recipe = fake
    ws = Workstation(tmp_path / "runs", recipe.parent, slots=[cpu_slot()], engine=engine, cwd=tmp_path)
    ws.runner.env = fake_env(FAKE_ROUNDS="100000", FAKE_DELAY="0.02")
    jobs = ws.launch(recipe, ["run.rounds=100000"])
    assert ws.state_of_job(jobs[0]) in ("starting", "queued", "running")
    assert ws.wait_for(lambda: ws.state_of_job(jobs[0]) == "running", timeout=30)
    run_id = ws.run_id_of(jobs[0])
    with pytest.raises(ActionError, match="kill it"):
        ws.delete(run_id)
    assert "SIGTERM" in ws.kill(run_id)
    assert ws.wait_for(lambda: ws.row(run_id).state == "killed", timeout=30)
    ws.runner.env = fake_env(FAKE_ROUNDS="2")
    again = ws.rerun(run_id)
    assert ws.wait_for(lambda: ws.state_of_job(again) == "finished", timeout=30)
    comparison = ws.compare([run_id, ws.run_id_of(again)])
    assert [s.label.split(": ")[1] for s in comparison.series("train_loss")] == [run_id, ws.run_id_of(again)]
    assert comparison.metric_names()[0] == "train_loss"
    with pytest.raises(ActionError):
        ws.compare([run_id])
    assert ws.delete(run_id).startswith("deleted") and run_id not in ws.model.rows
    with pytest.raises(ActionError):
        ws.row(run_id)
    with pytest.raises(ActionError, match="not valid TOML|expected"):
        ws.launch(_write(tmp_path / "bad.toml", "[run]\nrounds = = 1\n"))


def test_bcdtui_imports_no_training_code():
    code = ("import sys, bcdtui.app, bcdtui.synthetic, bcdtui.workstation; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'bcdcore')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert out.returncode == 0, out.stderr
    # bcdcore.records (the schema of status and events), bcdcore.runfiles (total file reading) and bcdcore.runlock
    # (the writer's lock), all without torch, come in through bcdcore.rundir; bcdcore.scheduler is the queue bcdtui
    # shares with `bcdcore sweep`; bcdcore.sweepfile reads cluster jobs from sweep.json; bcdcore.annotations reads
    # and writes a run's tags, notes and display name; the recipe package is its five modules (and `eval` of this
    # list, not numpy)
    assert eval(out.stdout) == ["bcdcore", "bcdcore.annotations", "bcdcore.recipe", "bcdcore.recipe.locate",
                                "bcdcore.recipe.plugin_keys", "bcdcore.recipe.schema", "bcdcore.recipe.toml_io",
                                "bcdcore.recipe.validate", "bcdcore.records", "bcdcore.rundir", "bcdcore.runfiles",
                                "bcdcore.runlock", "bcdcore.scheduler", "bcdcore.sweepfile"]


def test_docs_key_map_matches_the_bindings():
    from bcdtui.app import key_sections
    from bcdtui.keydoc import with_key_map
    from bcdtui.keymap import key_map

    page = (REPO / "docs" / "tui.md").read_text()
    assert with_key_map(page) == page, "docs/tui.md's key map is stale: run python -m bcdtui.keydoc"
    rows = [row for _title, rows in key_map(key_sections()) for row in rows]
    assert ("F1", "this key map") in rows and ("k", "SIGTERM to the run's process group (it checkpoints, ends "
                                                   "killed), SIGKILL after the grace period; cancels a queued launch") in rows
    for keys, what in rows:
        assert f"| `{keys}` | {what} |" in page, f"docs/tui.md lacks the key {keys!r} ({what})"


def test_command_line(tmp_path, monkeypatch):
    from bcdtui import app as app_module

    seen = {}
    monkeypatch.setattr(app_module.BcdApp, "run", lambda self: seen.update(app=self))
    assert app_module.main(["--runs", str(tmp_path / "r"), "--recipes", str(tmp_path / "c"), "--gpus", "none",
                            "--per-gpu", "3", "--grace", "5"]) == 0
    ws = seen["app"].ws
    assert ws.runs_dir == tmp_path / "r" and ws.recipes_dir == tmp_path / "c"
    assert [s.key for s in ws.slots] == [CPU_SLOT] and ws.runner.per_slot == 3 and ws.runner.grace_s == 5
    monkeypatch.setenv("BCD_RUNS", str(tmp_path / "env_runs"))
    app_module.main([])
    assert seen["app"].ws.runs_dir == tmp_path / "env_runs"
    with pytest.raises(SystemExit):
        app_module.main(["--per-gpu", "0"])


def test_slot_usage_counts_a_run_once_however_its_path_is_spelled(tmp_path, monkeypatch):
    from bcdtui.runner import Job

    monkeypatch.chdir(tmp_path)
    runner = Runner(Path("runs"), slots=[cpu_slot()], engine=["true"])
    job = Job(id="j1", spec=LaunchSpec(recipe="x"), state="started", slot=CPU_SLOT,
              run_dir=str(tmp_path / "runs" / "r-1"))
    runner.jobs[job.id] = job
    assert runner.usage([("runs/r-1", ""), ("runs/r-2", "")]) == {CPU_SLOT: 2}
