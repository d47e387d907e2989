"""`python -m bcdcore run|check|ls` as real subprocesses: exit codes, stderr, the run directory, the event
stream, determinism, SIGTERM + --resume, divergence.

The independent invocations start side by side once per module (`batch`), so the suite pays the torch import
of each process in parallel rather than one after another.
"""
from __future__ import annotations

import csv
import json
import math
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, cli_env, run_cli, start_cli, stderr_lines, tiny_recipe

from bcdcore.recipe import load_recipe
from bcdcore.rundir import display_id

# The run recipe: enough rounds to be still running a moment after its first metric event.
ROUNDS, EVERY, BATCH, K = 80, 10, 32, 2
LONG = tiny_recipe(replace={'name = "tiny"': 'name = "long"', "seed = 0": "seed = 3",
                            "rounds = 3": f"rounds = {ROUNDS}", "every = 1": f"every = {EVERY}",
                            'solver = "sgd"': 'solver = "momentum"', "gamma = 1.0": "gamma = 0.9"})

# A step size of 1e6 on a regression set: the loss is no longer finite within the 5 rounds. (lambda = 0.0 is the
# default; it stands here because the tiny recipe sets one.)
DIVERGENT = tiny_recipe(replace={'name = "tiny"': 'name = "boom"', "rounds = 3": "rounds = 5",
                                 'name = "digits_flat"': 'name = "toy_regression"', "lambda = 0.01": "lambda = 0.0",
                                 "lr = 0.05": "lr = 1e6"})

# error class -> (recipe text or None for a missing file, extra arguments, fragments of the one stderr line)
ERROR_CASES = {
    "unknown-key": (tiny_recipe(replace={"lambda = 0.01": "lamda = 0.01"}), [],
                    ["algorithm.lamda", "did you mean 'lambda'"]),
    "unknown-section": (tiny_recipe(replace={"[algorithm]": "[algoritm]"}), [],
                        ["algoritm", "did you mean 'algorithm'"]),
    "wrong-type": (tiny_recipe(replace={"K = 2": 'K = "5"'}), [], ["algorithm.K"]),
    "out-of-range": (tiny_recipe(replace={"gamma = 1.0": "gamma = 1.5"}), [], ["algorithm.gamma"]),
    "unknown-name": (tiny_recipe(replace={'name = "mlp"': 'name = "mpl"'}), [], ["model.name", "'mlp'"]),
    "per-block-length": (tiny_recipe(replace={"gamma = 1.0": "gamma = [1.0, 0.5, 0.5]"}), [],
                         ["algorithm.gamma", "2 blocks"]),
    "dataset-option": (tiny_recipe(replace={"batch_size = 32": "batch_size = 32\nn_samples = 50"}), [],
                       ["data.n_samples"]),
    "missing-data-root": (tiny_recipe(replace={"batch_size = 32": 'batch_size = 32\nroot = "no/such/dir"'}), [],
                          ["data.root"]),
    "set-bad-form": (TINY, ["--set", "algorithm.K"], ["--set", "algorithm.K"]),
    "set-bad-value": (TINY, ["--set", "algorithm.K=0"], ["algorithm.K"]),
    "invalid-toml": (TINY + "K = \n", [], ["recipe.toml", "TOML"]),
    "missing-file": (None, [], ["recipe.toml"]),
    "sweep-in-run": (TINY + '\n[sweep]\n"algorithm.K" = [1, 2]\n', [], ["sweep"]),
}
# Each subprocess costs a full interpreter with torch: the classes that take different paths through the CLI
# (recipe loading, --set, the model-dependent checks in prepare) run as subprocesses; every class runs through
# `bcdcore.cli.main` in-process as well.
SUBPROCESS_ERRORS = ("unknown-key", "per-block-length", "set-bad-value")


def _write(folder: Path, text: str | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.toml"
    if text is not None:
        path.write_text(text)
    return path


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """Every independent CLI call of this module, started side by side. name -> (CompletedProcess, cwd)."""
    root = tmp_path_factory.mktemp("cli")
    jobs: dict[str, tuple[list[str], Path]] = {}
    for name in SUBPROCESS_ERRORS:
        text, extra, _ = ERROR_CASES[name]
        cwd = root / f"error-{name}"
        jobs[f"error-{name}"] = (["run", str(_write(cwd, text)), *extra], cwd)
    cwd = root / "finished"
    recipe = _write(cwd, LONG)
    jobs["run-1"] = (["run", str(recipe)], cwd)  # with the progress bar
    jobs["run-2"] = (["run", str(recipe), "--quiet"], cwd)
    cwd = root / "divergent"
    jobs["divergent"] = (["run", str(_write(cwd, DIVERGENT)), "--quiet"], cwd)
    cwd = root / "check-ok"
    jobs["check-ok"] = (["check", str(_write(cwd, TINY))], cwd)

    def call(item):
        name, (args, cwd) = item
        return name, (run_cli(*args, cwd=cwd, timeout=300), cwd)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(pool.map(call, jobs.items()))


def events_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def run_dir_from(proc, cwd: Path) -> Path:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("run directory: ")]
    assert len(lines) == 1, proc.stdout
    path = Path(lines[0].removeprefix("run directory: ").strip())
    path = path if path.is_absolute() else cwd / path
    assert path.is_dir()
    return path


@pytest.fixture(scope="module")
def finished(batch):
    """The two uninterrupted runs of LONG: [(run_dir, events), ...] in the order of their run ids."""
    runs = []
    for name in ("run-1", "run-2"):
        proc, cwd = batch[name]
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        run_dir = run_dir_from(proc, cwd)
        runs.append((run_dir, events_of(run_dir)))
    return runs


# ----------------------------------------------------------------------------------------------------------
# recipe errors: exit 2, one line on stderr, no traceback, no run directory

@pytest.mark.parametrize("case", SUBPROCESS_ERRORS)
def test_recipe_error_exits_2_with_one_line(batch, case):
    proc, cwd = batch[f"error-{case}"]
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = stderr_lines(proc)
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    for fragment in ERROR_CASES[case][2]:
        assert fragment in lines[0], lines[0]
    assert "run directory" not in proc.stdout
    assert not (cwd / "runs").exists(), "a recipe error must not create a run directory"
    assert sorted(p.name for p in cwd.iterdir()) == ([] if case == "missing-file" else ["recipe.toml"])


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_recipe_error_classes_through_cli_main(case, tmp_path, monkeypatch, capsys):
    from bcdcore import cli

    text, extra, fragments = ERROR_CASES[case]
    cwd = tmp_path / "work"
    path = _write(cwd, text)
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("BCD_OPS", raising=False)
    monkeypatch.delenv("BCD_RUNS", raising=False)
    code = cli.main(["run", str(path), "--quiet", *extra])
    out, err = capsys.readouterr()
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "run directory" not in out
    assert sorted(p.name for p in cwd.iterdir()) == ([] if text is None else ["recipe.toml"])


def test_check_ok(batch):
    proc, cwd = batch["check-ok"]
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok: ") and "2 blocks" in proc.stdout
    assert not (cwd / "runs").exists()


def test_check_failing(tmp_path, monkeypatch, capsys):
    from bcdcore import cli

    cwd = tmp_path / "work"
    path = _write(cwd, ERROR_CASES["per-block-length"][0])
    monkeypatch.chdir(cwd)
    assert cli.main(["check", str(path)]) == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "algorithm.gamma" in lines[0] and "3 entries" in lines[0]
    assert not out.startswith("ok")
    assert not (cwd / "runs").exists()
    # a recipe that is fine except for one --set is rejected the same way
    assert cli.main(["check", str(_write(tmp_path / "b", TINY)), "--set", "algorithm.gamma=0"]) == 2
    assert "algorithm.gamma" in capsys.readouterr().err


def test_check_a_sweep_recipe(tmp_path, capsys):
    from bcdcore import cli

    path = _write(tmp_path, TINY + '\n[sweep]\n"algorithm.K" = [1, 2]\n"run.seed" = [0, 1, 2]\n')
    assert cli.main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok: ") and "6 runs" in out


@pytest.mark.parametrize("args", [
    ["run"],  # neither a recipe nor --resume
    ["run", "--resume", "{tmp}"],  # not a run directory
    ["run", "--resume", "{tmp}", "{tmp}/recipe.toml"],  # --resume takes the run's own recipe
])
def test_run_usage_errors_exit_2(tmp_path, monkeypatch, capsys, args):
    from bcdcore import cli

    _write(tmp_path, TINY)
    monkeypatch.chdir(tmp_path)
    assert cli.main([a.format(tmp=tmp_path) for a in args]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------------------------
# a finished run and its directory

def test_run_prints_its_directory_and_finishes(batch, finished):
    for name, (run_dir, _) in zip(("run-1", "run-2"), finished):
        proc, cwd = batch[name]
        assert proc.returncode == 0
        assert run_dir.parent == cwd / "runs"  # ./runs is the default runs directory
        assert re.fullmatch(r"long-\d{8}-\d{6}-[0-9a-f]{6}(-\d+)?", run_dir.name), run_dir.name
        status = json.loads((run_dir / "status.json").read_text())
        for key in ("state", "pid", "host", "gpu", "started", "ended", "exit_code", "error", "progress"):
            assert key in status, key
        assert status["state"] == "finished" and status["exit_code"] == 0 and status["error"] is None
        assert status["progress"] == {"round": ROUNDS, "rounds": ROUNDS}
        assert status["started"] <= status["ended"]
        for name_ in ("recipe.toml", "status.json", "metrics.jsonl", "metrics.csv", "log.txt"):
            assert (run_dir / name_).is_file(), name_
        assert (run_dir / "log.txt").read_text().strip()
        assert not list(run_dir.glob("*.tmp")) and not list(run_dir.glob(".*.tmp"))


def test_every_event_has_version_kind_and_time(finished):
    run_dir, events = finished[0]
    assert [e["kind"] for e in events][0] == "start" and events[-1]["kind"] == "end"
    assert {e["kind"] for e in events} == {"start", "metric", "block", "end"}
    started = json.loads((run_dir / "status.json").read_text())["started"]
    for e in events:
        assert e["v"] == 1
        assert isinstance(e["t"], float) and started - 5 <= e["t"] <= time.time()
    times = [e["t"] for e in events]
    assert times == sorted(times)


def test_start_event(finished):
    run_dir, events = finished[0]
    start = events[0]
    assert start["run_id"] == run_dir.name
    assert start["recipe"] == "long"
    assert start["n_blocks"] == 2
    assert start["block_sizes"] == [64 * 16 + 16, 16 * 10 + 10]
    assert start["device"] == "cpu"
    assert start["backend"] in ("reference", "cpu", "cuda")


def test_metric_events(finished):
    _, events = finished[0]
    metrics = [e for e in events if e["kind"] == "metric"]
    blocks = [e for e in events if e["kind"] == "block"]
    assert [m["round"] for m in metrics] == list(range(1, ROUNDS + 1))
    for m in metrics:
        for key in ("grad_evals", "samples", "wall_s", "train_loss", "bytes_comm"):
            assert key in m, key
        assert math.isfinite(m["train_loss"])
        t = m["round"]
        evaluated = t % EVERY == 0 or t == ROUNDS
        assert ("val_loss" in m) == evaluated and ("val_acc" in m) == evaluated, m
        if evaluated:
            assert 0 <= m["val_acc"] <= 1 and m["val_loss"] > 0
        # compute accounting: one forward+backward pass per inner step (the rule is off), a minibatch each;
        # grad_evals = flops over one full forward+backward (a block pass costs less; evaluation adds some)
        passes = sum(b["passes"] for b in blocks if b["round"] <= t)
        assert passes == sum(b["inner_steps"] for b in blocks if b["round"] <= t) == t * 2 * K
        assert m["samples"] == passes * BATCH
        table = events[0]["flop_table"]
        assert m["grad_evals"] == pytest.approx(m["flops"] / (table["forward"] + table["full_backward"]))
        assert 0 < m["grad_evals"] < passes + t
    assert all("test_loss" not in m and "test_acc" not in m for m in metrics[:-1])
    last = metrics[-1]
    assert 0 <= last["test_acc"] <= 1 and last["test_loss"] > 0
    walls = [m["wall_s"] for m in metrics]
    assert walls == sorted(walls) and walls[0] > 0
    assert last["val_acc"] > 0.5  # it learned something


def test_block_events(finished):
    _, events = finished[0]
    blocks = [e for e in events if e["kind"] == "block"]
    assert [(b["round"], b["block"]) for b in blocks] == [(t, i) for t in range(1, ROUNDS + 1) for i in (0, 1)]
    for b in blocks:
        for key in ("inner_steps", "stopped_early", "residual", "threshold", "dist", "gamma"):
            assert key in b, key
        assert b["inner_steps"] == K and b["stopped_early"] is False  # accuracy_factor < 0: rule off
        assert b["residual"] >= 0 and b["dist"] > 0
        assert b["gamma"] == 0.9


def test_block_event_names_lambda_as_in_design(finished):
    """DESIGN, event stream: `block`: round, block, inner_steps, stopped_early, residual, threshold, dist,
    lambda, gamma."""
    _, events = finished[0]
    block = next(e for e in events if e["kind"] == "block")
    assert block.get("lambda") == 0.01, f"block event keys: {sorted(block)}"


def test_end_event(finished):
    _, events = finished[0]
    assert events[-1]["state"] == "finished" and events[-1]["reason"] == "rounds done"
    assert sum(e["kind"] == "end" for e in events) == 1


def test_metrics_csv_and_arrays_mirror_the_events(finished):
    run_dir, events = finished[0]
    metrics = [e for e in events if e["kind"] == "metric"]
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(metrics)
    for key in ("round", "grad_evals", "samples", "wall_s", "train_loss", "val_loss", "val_acc",
                "test_loss", "test_acc"):
        assert key in rows[0], key
    for row, m in zip(rows, metrics):
        assert int(row["round"]) == m["round"]
        assert float(row["train_loss"]) == pytest.approx(m["train_loss"], rel=1e-12)
        assert (row["val_loss"] == "") == ("val_loss" not in m)
    train = np.load(run_dir / "arrays" / "train_loss.npy")
    np.testing.assert_allclose(train, [m["train_loss"] for m in metrics], rtol=1e-12)
    val = np.load(run_dir / "arrays" / "val_acc.npy")
    assert val.shape == (ROUNDS,)
    assert np.isnan(val[0]) and val[EVERY - 1] == pytest.approx(metrics[EVERY - 1]["val_acc"])
    assert np.load(run_dir / "arrays" / "test_acc.npy")[-1] == pytest.approx(metrics[-1]["test_acc"])


def test_recipe_toml_is_the_resolved_recipe(batch, finished):
    run_dir, _ = finished[0]
    _, cwd = batch["run-1"]
    written = load_recipe(run_dir / "recipe.toml")
    original = load_recipe(cwd / "recipe.toml")
    assert written.digest() == original.digest()
    assert run_dir.name.split("-")[3] == original.digest()[:6]
    text = (run_dir / "recipe.toml").read_text()
    assert "accuracy_factor" in text and "val_fraction" in text  # defaults filled in


def test_two_runs_of_one_recipe_get_two_directories_and_identical_metrics(finished):
    (dir_a, events_a), (dir_b, events_b) = finished
    assert dir_a != dir_b
    assert (dir_a / "metrics.jsonl").stat().st_ino != (dir_b / "metrics.jsonl").stat().st_ino

    def values(events, kind):
        return [{k: v for k, v in e.items() if k not in ("t", "wall_s")} for e in events if e["kind"] == kind]

    assert values(events_a, "metric") == values(events_b, "metric")
    assert values(events_a, "block") == values(events_b, "block")
    assert len(values(events_a, "metric")) == ROUNDS


# ----------------------------------------------------------------------------------------------------------
# failures, resume, ls

def test_divergent_run_fails_with_exit_1(batch):
    proc, cwd = batch["divergent"]
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    run_dir = run_dir_from(proc, cwd)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and status["exit_code"] == 1
    assert status["error"].startswith("diverged"), status["error"]
    end = events_of(run_dir)[-1]
    assert end["kind"] == "end" and end["state"] == "failed" and end["reason"].startswith("diverged")
    assert status["progress"]["round"] < 5  # it stopped at the first non-finite loss


def test_resume_of_a_finished_run_exits_2(finished, tmp_path):
    run_dir, events = finished[0]
    before = (run_dir / "metrics.jsonl").read_text()
    proc = run_cli("run", "--resume", str(run_dir), "--quiet", cwd=tmp_path)
    assert proc.returncode == 2
    lines = stderr_lines(proc)
    assert len(lines) == 1 and "finished" in lines[0] and "Traceback" not in proc.stderr
    assert (run_dir / "metrics.jsonl").read_text() == before
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"


def _wait_for_metric(proc, cwd: Path, timeout: float = 120) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended before SIGTERM: {proc.communicate()}"
        for run_dir in (cwd / "runs").glob("long-*") if (cwd / "runs").is_dir() else ():
            try:
                text = (run_dir / "metrics.jsonl").read_text()
            except OSError:
                continue
            if '"kind": "metric"' in text:
                return run_dir
        time.sleep(0.01)
    raise AssertionError("no metric event within the timeout")


def test_sigterm_checkpoints_and_resume_reaches_the_same_metrics(finished, tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(LONG)
    proc = start_cli("run", str(recipe), "--quiet", cwd=tmp_path)
    try:
        run_dir = _wait_for_metric(proc, tmp_path)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in err
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "killed"
    assert proc.returncode != 0 and status["exit_code"] == proc.returncode
    assert status["progress"]["round"] < ROUNDS
    assert (run_dir / "checkpoint.pt").is_file()
    events = events_of(run_dir)
    assert events[-1]["kind"] == "end" and events[-1]["state"] == "killed"
    assert events[-1]["reason"] == "killed by SIGTERM"
    killed_at = max(e["round"] for e in events if e["kind"] == "metric")
    assert killed_at == status["progress"]["round"]

    ls = run_cli("ls", cwd=tmp_path, env=cli_env(COLUMNS="250"))
    assert ls.returncode == 0 and ls.stdout.splitlines()[1].split()[:2] == [display_id(run_dir.name), "killed"]

    resumed = run_cli("run", "--resume", str(run_dir), "--quiet", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert run_dir_from(resumed, tmp_path).resolve() == run_dir.resolve()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["exit_code"] == 0
    assert status["progress"] == {"round": ROUNDS, "rounds": ROUNDS}

    events = events_of(run_dir)
    metrics = [e for e in events if e["kind"] == "metric"]
    assert [m["round"] for m in metrics] == list(range(1, ROUNDS + 1))  # no round lost or repeated
    assert events[-1]["kind"] == "end" and events[-1]["state"] == "finished"
    reference = [e for e in finished[0][1] if e["kind"] == "metric"]
    keys = ("round", "grad_evals", "samples", "train_loss", "val_loss", "val_acc", "test_loss", "test_acc")
    assert {k: metrics[-1][k] for k in keys} == {k: reference[-1][k] for k in keys}
    # every round after the resume matches the uninterrupted run, not only the last
    assert [m["train_loss"] for m in metrics] == [m["train_loss"] for m in reference]
    assert len(np.load(run_dir / "arrays" / "train_loss.npy")) == ROUNDS


def test_ls_lists_the_runs_with_state_and_final_metrics(batch, finished):
    _, cwd = batch["run-1"]
    proc = run_cli("ls", cwd=cwd, env=cli_env(COLUMNS="250"))
    listed = run_cli("ls", "--json", cwd=cwd)
    assert proc.returncode == listed.returncode == 0, proc.stderr + listed.stderr
    header, *lines = proc.stdout.splitlines()
    assert header.split() == ["run", "state", "val", "round", "started"]  # no run has tags or notes
    rows = {r["id"]: (r, line) for r, line in zip(json.loads(listed.stdout), lines)}
    for run_dir, events in finished:
        record, line = rows[run_dir.name]
        last = events[-2]  # the last metric event (the end event follows it)
        assert line.split()[:5] == [display_id(run_dir.name), "finished", "val_acc", f"{last['val_acc']:.4f}",
                                    f"{ROUNDS}/{ROUNDS}"]
        assert record["display_id"] == display_id(run_dir.name) and record["path"] == f"runs/{run_dir.name}"
        assert record["metrics"] == {k: v for k, v in last.items() if k not in ("v", "kind", "t", "round")}
        assert (record["tags"], record["name"], record["notes"]) == ([], "", "")
    empty = run_cli("ls", "--runs-dir", str(cwd / "nothing-here"), cwd=cwd)
    assert empty.returncode == 0 and "no runs" in empty.stdout
    assert json.loads(run_cli("ls", "--runs-dir", str(cwd / "nothing-here"), "--json", cwd=cwd).stdout) == []


def test_ls_prints_the_same_whole_rows_in_a_pipe_as_on_a_wide_terminal(batch, finished):
    """Nothing is cut to a width: a script reading `ls` gets what a wide terminal shows."""
    _, cwd = batch["run-1"]
    env = cli_env()
    env.pop("COLUMNS", None)
    narrow = run_cli("ls", cwd=cwd, env=env)
    wide = run_cli("ls", cwd=cwd, env=cli_env(COLUMNS="250"))
    assert narrow.returncode == 0 and narrow.stdout == wide.stdout
    widths = {len(line.split("  finished")[0]) for line in narrow.stdout.splitlines()[1:]}
    assert len(widths) == 1  # aligned: every state starts in the same column


def test_run_in_a_pipe_prints_one_plain_line_per_evaluation(batch, finished):
    proc, cwd = batch["run-1"]  # not --quiet; its stdout is a pipe
    evals = [e for e in events_of(run_dir_from(proc, cwd)) if e["kind"] == "metric" and "val_acc" in e]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("round ")]
    assert len(lines) == len(evals) == ROUNDS // EVERY
    for line, e in zip(lines, evals):
        assert line == (f"round {e['round']}/{ROUNDS}  train_loss {e['train_loss']:.4f}  val_loss {e['val_loss']:.4f}"
                         f"  val_acc {e['val_acc']:.4f}  grad_evals {e['grad_evals']:.1f}  {e['wall_s']:.1f}s")
    assert "\x1b" not in proc.stdout + proc.stderr and "━" not in proc.stderr  # no live bar, no escapes
