"""`bcdcore sweep --slurm` through submitit's local executor (`--slurm-executor local`: no Slurm here): the grid
runs as jobs end to end with job ids and states in sweep.json, the runs appear in bcdtui's run list and its
cluster-jobs model, which also cancels a running job. On a machine without `sbatch`, --slurm is one line, exit 2.
"""
from __future__ import annotations

import json
import os
import sys

import pytest
from conftest import run_cli, start_cli, tiny_recipe, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st

from bcdcore.recipe import RecipeError
from bcdcore.rundir import list_runs, read_status
from bcdcore.sweepfile import job_state, read_sweep_jobs
from bcdtui.cluster import ClusterJobs
from bcdtui.runs import RunsModel

GRID = '\n[sweep]\n"algorithm.K" = [1, 2]\n'
LOCAL = ("--slurm", "--slurm-executor", "local")


def _sweep_dir(tmp_path):
    dirs = [p for p in (tmp_path / "runs").iterdir() if (p / "sweep.json").is_file()]
    assert len(dirs) == 1
    return dirs[0]


def test_two_point_sweep_runs_as_jobs_end_to_end(tmp_path):
    (tmp_path / "grid.toml").write_text(tiny_recipe(append=GRID))
    out = run_cli("sweep", "grid.toml", *LOCAL, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines()[-1] == "sweep done: 2 finished; jobs: 2 done"
    sweep_dir = _sweep_dir(tmp_path)
    data = json.loads((sweep_dir / "sweep.json").read_text())
    assert data["cluster"]["executor"] == "local" and data["cluster"]["slots_per_job"] == 1
    assert [j["points"] for j in data["jobs"]] == [[0], [1]]
    assert all(j["job_id"].isdigit() and j["state"] == "done" and j["scheduler_state"] == "FINISHED"
               for j in data["jobs"])
    assert [p["job_id"] for p in data["points"]] == [j["job_id"] for j in data["jobs"]]
    assert all(p["state"] == "done" and p["exit_code"] == 0 for p in data["points"])
    assert {p["overrides"]["algorithm.K"] for p in data["points"]} == {1, 2}
    runs = sorted(list_runs(tmp_path / "runs"))
    assert runs == sorted(tmp_path / "runs" / p["run_dir"] for p in data["points"])
    assert all(read_status(run)["state"] == "finished" for run in runs)
    # the TUI: both runs in its run list, both jobs in its cluster-jobs model (none live any more)
    model = RunsModel(tmp_path / "runs")
    model.refresh()
    rows = {r.id: r for r in model.view()}
    assert {r.name for r in runs} <= set(rows) and all(rows[r.name].state == "finished" for r in runs)
    assert read_sweep_jobs(sweep_dir).watched is False  # the sweep's process has ended, so have its jobs
    jobs = ClusterJobs(tmp_path / "runs")
    assert jobs.refresh(live_only=True) == [] and jobs.problems == []
    all_rows = jobs.refresh(live_only=False)
    assert [(r.sweep, r.job.state, r.runs) for r in all_rows] == [(sweep_dir.name, "done", "1 finished")] * 2
    assert "already ended" in jobs.cancel(all_rows[0])


def test_tui_cancels_a_running_job(tmp_path):
    text = tiny_recipe(append=GRID).replace("rounds = ", "rounds = 100000 #", 1)
    (tmp_path / "grid.toml").write_text(text)
    proc = start_cli("sweep", "grid.toml", *LOCAL, "--slots-per-job", "2", cwd=tmp_path)
    try:
        jobs = ClusterJobs(tmp_path / "runs")
        wait_for(lambda: [r.runs for r in jobs.refresh(live_only=True)] == ["2 running"], 120,
                 "the job's two runs to run")
        (row,) = jobs.rows
        assert row.job.state == "running" and row.job.points == [0, 1]
        assert read_sweep_jobs(row.job.sweep_dir).watched is True
        assert jobs.cancel(row).startswith(f"cancelled job {row.job.job_id}")
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, out + err
    assert "jobs: 1 cancelled" in out.splitlines()[-1]
    data = json.loads((_sweep_dir(tmp_path) / "sweep.json").read_text())
    assert data["jobs"][0]["state"] == "cancelled"
    runs = [tmp_path / "runs" / p["run_dir"] for p in data["points"]]
    wait_for(lambda: all(read_status(r).get("state") == "killed" for r in runs), 60, "the runs to stop")
    assert all((r / "checkpoint.pt").is_file() for r in runs)
    assert jobs.refresh(live_only=True) == []


def test_without_sbatch_one_line_exit_2(tmp_path):
    (tmp_path / "grid.toml").write_text(tiny_recipe(append=GRID))
    env = {**os.environ, "PATH": os.path.dirname(sys.executable)}  # python, no sbatch
    out = run_cli("sweep", "grid.toml", "--slurm", "--partition", "gpu", cwd=tmp_path, env=env)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: sweep --slurm: no `sbatch` on PATH (not a Slurm login node); run the sweep there, or without "
        "--slurm on this machine's GPUs"]
    assert not (tmp_path / "runs").exists()
    for bad, line in ((("--slots-per-job", "0"), "--slots-per-job must be >= 1, got 0"),
                      (("--time", "0"), "--time must be >= 1 minute, got 0"),
                      (("--slurm-executor", "pbs"), "--slurm-executor 'pbs': choose one of slurm, local")):
        out = run_cli("sweep", "grid.toml", "--slurm", *bad, cwd=tmp_path, env=env)
        assert out.returncode == 2 and out.stderr.strip().splitlines() == [f"error: {line}"]


def test_slurm_job_script_carries_the_options(tmp_path, monkeypatch):
    """The sbatch file submitit writes for `--slurm --partition gpu --gpus-per-job 2 --time 30 --account acme`
    (fake sbatch/srun on PATH: nothing is submitted)."""
    from bcdcore.cluster import ClusterOptions, ClusterSweep
    from bcdcore.recipe import load_recipe

    for tool in ("sbatch", "srun"):
        (tmp_path / tool).write_text("#!/bin/sh\nexit 1\n")
        (tmp_path / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    (tmp_path / "grid.toml").write_text(tiny_recipe(append=GRID))
    options = ClusterOptions(partition="gpu", gpus_per_job=2, time_min=30, account="acme", slots_per_job=2)
    options.check()
    sweep = ClusterSweep(tmp_path / "grid.toml", load_recipe(tmp_path / "grid.toml"), tmp_path / "runs", options)
    assert [j.points for j in sweep.jobs] == [[0, 1]]  # two slots per job: both points in one job
    text = sweep.executor()._make_submission_file_text("python -m x", "uid")
    for line in ("--partition=gpu", "--gpus-per-node=2", "--time=30", "--account=acme", "--ntasks-per-node=1",
                 f"--job-name={sweep.dir.name}"):
        assert f"#SBATCH {line}\n" in text
    assert sweep.command(1)[-2:] == ["--set", "algorithm.K=2"]


def test_a_refused_submission_is_one_line(tmp_path):
    """sbatch refuses the job (a fake that says what a real one says for a bad partition): one line, exit 2."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: invalid partition specified: nope' >&2\nexit 1\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    (tmp_path / "grid.toml").write_text(tiny_recipe(append=GRID))
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    out = run_cli("sweep", "grid.toml", "--slurm", "--partition", "nope", cwd=tmp_path, env=env)
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error: job 1 of 2 was refused: sbatch: error: invalid partition specified: nope; "
                           "check --partition"), line
    data = json.loads((_sweep_dir(tmp_path) / "sweep.json").read_text())
    assert [j["state"] for j in data["jobs"]] == ["unsubmitted", "unsubmitted"]


def test_missing_submitit_is_one_line(monkeypatch):
    from bcdcore.cluster import ClusterOptions

    monkeypatch.setitem(sys.modules, "submitit", None)  # `import submitit` raises ImportError
    with pytest.raises(RecipeError, match="^sweep --slurm needs submitit: pip install submitit$"):
        ClusterOptions(executor="local").check()


def test_scheduler_states():
    assert [job_state(s) for s in ("PENDING", "RUNNING", "COMPLETED", "FINISHED", "CANCELLED by 1234", "TIMEOUT",
                                   "INTERRUPTED", "NODE_FAIL", "what", "")] == \
        ["queued", "running", "done", "done", "cancelled", "failed", "cancelled", "failed", "unknown", "unknown"]


def _containers(inner):
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           _containers, max_leaves=20)


@settings(max_examples=150, deadline=None)
@given(cluster=json_values, jobs=json_values, points=json_values, raw=st.binary(max_size=64))
def test_reader_never_raises(tmp_path_factory, cluster, jobs, points, raw):
    folder = tmp_path_factory.mktemp("sweep")
    (folder / "sweep.json").write_text(json.dumps({"cluster": cluster, "jobs": jobs, "points": points}))
    read = read_sweep_jobs(folder)
    assert all(j.job_id.replace("_", "").isdigit() for j in read.jobs)
    ClusterJobs(folder.parent).refresh()
    (folder / "sweep.json").write_bytes(raw)
    assert read_sweep_jobs(folder).jobs == []
    good = {"cluster": {"executor": "local"}, "jobs": [{"job_id": "42", "state": "running", "points": [0]}],
            "points": [{"index": 0, "run_dir": None}]}
    (folder / "sweep.json").write_text(json.dumps(good))
    (job,) = read_sweep_jobs(folder).jobs
    assert (job.job_id, job.state, job.points, job.run_dirs, job.executor) == ("42", "running", [0], [], "local")
