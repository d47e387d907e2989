"""The fault catalogue: each fault injected into real `bcdcore` processes, and what a user would check after.

Shared by tests/test_faults.py (one test per fault) and bench/faults.py (the table of fault, expected and
observed). A fault *survives* when the process ends with the documented exit code and one line on stderr, no
traceback; *nothing is lost* when every run directory involved is still readable and true: earlier events,
the last good checkpoint, other runs, and no temporary files or half-made directories left behind.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

from conftest import cli_args, cli_env, run_cli, start_cli, tiny_recipe, wait_for
from fault_tools import (
    CHECKPOINTED,
    ENDLESS,
    LONG,
    ROUNDS_CHECKPOINTED,
    Fault,
    Observation,
    clean_exit,
    digest,
    events,
    finished,
    killed_run,
    ls_state,
    mounted_tmpfs,
    no_temporaries,
    one_line,
    quiet_exit,
    rounds_once,
    run_dirs,
    start_and_wait,
    status,
)

# ----------------------------------------------------------------------------------------------------------
# helpers


# ----------------------------------------------------------------------------------------------------------
# the faults

def kill9_at_random_points(tmp: Path, seed: int = 11) -> Observation:
    """SIGKILL at a random moment of a training run, three times over (the first after its first checkpoint);
    each time the run shows as lost, resumes, and in the end every round appears once in every mirror and the
    numbers equal an uninterrupted run's."""
    rng = random.Random(seed)
    recipe = tmp / "recipe.toml"
    recipe.write_text(CHECKPOINTED)
    reference = run_cli("run", recipe, "--runs-dir", tmp / "reference", "--quiet", cwd=tmp)
    ref_dir = run_dirs(tmp / "reference")[0]
    proc, run_dir = start_and_wait(tmp, CHECKPOINTED, lambda d: (d / "checkpoint.pt").exists())
    states = []
    for attempt in range(3):
        time.sleep(rng.uniform(0.0, 0.5))
        if proc.poll() is not None or status(run_dir).get("state") == "finished":
            break
        proc.kill()
        proc.communicate(timeout=60)
        states.append(ls_state(tmp, run_dir))
        proc = start_cli("run", "--resume", run_dir, "--quiet", cwd=tmp)
        wait_for(lambda: proc.poll() is not None or (status(run_dir).get("pid") == proc.pid
                                                      and status(run_dir).get("state") == "running"),
                 120, "the resumed run to train")
    done = finished(proc, 300)
    ok = reference.returncode == 0 and done.returncode == 0 and "Traceback" not in done.stderr
    same = ([e["train_loss"] for e in events(run_dir, "metric")]
            == [e["train_loss"] for e in events(ref_dir, "metric")])
    once = rounds_once(run_dir, ROUNDS_CHECKPOINTED)
    return Observation(f"{len(states)} kills, shown as {', '.join(states)}; resumed to finished; every round "
                       f"once: {once}; equal to uninterrupted: {same}",
                       ok and bool(states) and all(s == "lost" for s in states),
                       once and same and no_temporaries(run_dir))


def full_disk_mid_run(tmp: Path) -> Observation:
    """The runs directory's disk fills up while the run writes: it fails naming the disk, removes its
    temporary files, keeps its last good checkpoint (still loadable) and its status says why."""
    import torch

    with mounted_tmpfs(tmp / "small", "1m") as mounted:
        if not mounted:
            return _full_disk_by_file_size_limit(tmp)
        recipe = tmp / "recipe.toml"
        recipe.write_text(LONG.replace("[data]", "checkpoint_every = 1\n\n[data]"))
        runs = tmp / "small" / "runs"
        proc = start_cli("run", recipe, "--runs-dir", runs, "--quiet", cwd=tmp)
        wait_for(lambda: bool(run_dirs(runs)) and (run_dirs(runs)[0] / "checkpoint.pt").exists(), 120,
                 "a first checkpoint")
        run_dir = run_dirs(runs)[0]
        fd = os.open(tmp / "small" / "filler", os.O_WRONLY | os.O_CREAT)
        try:  # take every free byte
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError:
            pass
        finally:
            os.close(fd)
        proc = finished(proc, 120)
        st = status(run_dir)
        try:
            ckpt_ok = isinstance(torch.load(run_dir / "checkpoint.pt", weights_only=True)["round"], int)
        except Exception:  # noqa: BLE001
            ckpt_ok = False
        (tmp / "small" / "filler").unlink()
        reason = str(st.get("error"))
        return Observation(f"exit {proc.returncode}; status {st.get('state')}: {reason}; checkpoint loadable: "
                           f"{ckpt_ok}; temporaries: {not no_temporaries(run_dir)}",
                           quiet_exit(proc, 1) and st.get("state") == "failed" and "no space left" in reason,
                           ckpt_ok and no_temporaries(run_dir))


def _full_disk_by_file_size_limit(tmp: Path) -> Observation:
    """Where no tmpfs can be mounted: a file-size limit makes the event stream's writes fail (EFBIG)."""
    import resource

    recipe = tmp / "recipe.toml"
    recipe.write_text(LONG)
    limit = 64 * 1024

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.Popen(cli_args("run", recipe, "--runs-dir", tmp / "runs", "--quiet"), cwd=tmp, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=limited)
    proc = finished(proc, 180)
    run_dir = run_dirs(tmp / "runs")[0]
    st = status(run_dir)
    reason = str(st.get("error"))
    return Observation(f"(file-size limit) exit {proc.returncode}; status {st.get('state')}: {reason}",
                       quiet_exit(proc, 1) and st.get("state") == "failed" and "file too large" in reason,
                       no_temporaries(run_dir))


def runs_dir_read_only(tmp: Path) -> Observation:
    recipe = tmp / "recipe.toml"
    recipe.write_text(tiny_recipe())
    with mounted_tmpfs(tmp / "ro", "1m", read_only=True) as mounted:
        if mounted:
            target = tmp / "ro" / "runs"
        elif os.geteuid() != 0:
            (tmp / "ro").chmod(0o555)
            target = tmp / "ro" / "runs"
        else:
            return Observation("skipped: root without mount", True, True)
        proc = run_cli("run", recipe, "--runs-dir", target, "--quiet", cwd=tmp)
    return Observation(f"exit {proc.returncode}: {proc.stderr.strip()}",
                       clean_exit(proc, 2) and ("read-only" in proc.stderr or "permission" in proc.stderr),
                       True)


def runs_dir_is_a_file(tmp: Path) -> Observation:
    recipe = tmp / "recipe.toml"
    recipe.write_text(tiny_recipe())
    (tmp / "runs").write_text("not a folder")
    proc = run_cli("run", recipe, "--runs-dir", tmp / "runs", "--quiet", cwd=tmp)
    return Observation(f"exit {proc.returncode}: {proc.stderr.strip()}", clean_exit(proc, 2),
                       (tmp / "runs").read_text() == "not a folder")


def concurrent_resumes(tmp: Path) -> Observation:
    """A second `--resume` while the first one trains: refused naming the holder; the first goes on."""
    run_dir = killed_run(tmp, ENDLESS)
    first = start_cli("run", "--resume", run_dir, "--quiet", cwd=tmp)
    wait_for(lambda: status(run_dir).get("pid") == first.pid and status(run_dir).get("state") == "running", 120,
             "the first resume to run")
    second = run_cli("run", "--resume", run_dir, "--quiet", cwd=tmp)
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)
    refused = second.stderr.strip()
    names_holder = "another process writes this run" in refused and f":{first.pid}" in refused
    rounds = [e["round"] for e in events(run_dir, "metric")]
    return Observation(f"second exit {second.returncode}: {refused[-90:]}; first exit {first.returncode}",
                       clean_exit(second, 2) and names_holder and first.returncode == 143,
                       rounds == sorted(set(rounds)) and status(run_dir).get("state") == "killed")


def tampered_checkpoint_runs_no_code(tmp: Path) -> Observation:
    """A checkpoint.pt whose pickle would run a command: refused unread, the command never runs."""
    run_dir = killed_run(tmp)
    marker = tmp / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (run_dir / "checkpoint.pt").write_bytes(pickle.dumps({"round": Payload()}))
    before = digest(run_dir)
    proc = run_cli("run", "--resume", run_dir, "--quiet", cwd=tmp)
    export = run_cli("export", run_dir, "--onnx", cwd=tmp)
    return Observation(f"resume exit {proc.returncode}, export exit {export.returncode}; code ran: "
                       f"{marker.exists()}",
                       clean_exit(proc, 2) and clean_exit(export, 2) and not marker.exists(),
                       digest(run_dir) == before)


def _bad_checkpoint(tmp: Path, mangle: Callable[[bytes], bytes], what: str) -> Observation:
    run_dir = killed_run(tmp)
    path = run_dir / "checkpoint.pt"
    path.write_bytes(mangle(path.read_bytes()))
    before = digest(run_dir)
    proc = run_cli("run", "--resume", run_dir, "--quiet", cwd=tmp)
    return Observation(f"{what}: exit {proc.returncode}: {proc.stderr.strip()[:120]}", clean_exit(proc, 2),
                       digest(run_dir) == before and status(run_dir).get("state") == "killed")


def truncated_checkpoint(tmp: Path) -> Observation:
    return _bad_checkpoint(tmp, lambda b: b[: len(b) // 2], "truncated")


def empty_checkpoint(tmp: Path) -> Observation:
    return _bad_checkpoint(tmp, lambda b: b"", "empty")


def garbage_checkpoint(tmp: Path) -> Observation:
    return _bad_checkpoint(tmp, lambda b: random.Random(5).randbytes(len(b)), "random bytes")


def recipe_edited_beside_checkpoint(tmp: Path) -> Observation:
    run_dir = killed_run(tmp)
    text = (run_dir / "recipe.toml").read_text()
    (run_dir / "recipe.toml").write_text(text.replace("widths = [64, 64]", "widths = [32, 64]"))
    before = digest(run_dir)
    proc = run_cli("run", "--resume", run_dir, "--quiet", cwd=tmp)
    return Observation(f"exit {proc.returncode}: {proc.stderr.strip()[:140]}",
                       clean_exit(proc, 2) and "recipe.toml" in proc.stderr, digest(run_dir) == before)


def corrupt_files_of_one_run(tmp: Path) -> Observation:
    """Garbage in one run's status.json and metrics.jsonl: `ls` and `plot` still serve the other run."""
    recipe = tmp / "recipe.toml"
    recipe.write_text(tiny_recipe())
    for _ in range(2):
        run_cli("run", recipe, "--runs-dir", tmp / "runs", "--quiet", cwd=tmp)
    bad, good = run_dirs(tmp / "runs")
    (bad / "status.json").write_bytes(b"[1, 2")
    with open(bad / "metrics.jsonl", "ab") as f:
        f.write(b'{"v": 1, "kind": "metric", "round": "x", "train_loss": {"a": 1}}\n\xff\xfe\n[]\n')
    ls = run_cli("ls", "--runs-dir", tmp / "runs", cwd=tmp)
    listed = run_cli("ls", "--runs-dir", tmp / "runs", "--json", cwd=tmp)
    states = {r["id"]: r["state"] for r in json.loads(listed.stdout or "[]")} if listed.returncode == 0 else {}
    healthy = states.get(good.name) == "finished" and states.get(bad.name) == "unreadable" and len(
        ls.stdout.splitlines()) == 3
    plot = run_cli("plot", good, bad, "--out", tmp / "p.png", cwd=tmp)
    return Observation(f"ls exit {ls.returncode}, lists the healthy run: {healthy}; plot exit "
                       f"{plot.returncode}", ls.returncode == 0 and healthy and "Traceback" not in
                       ls.stderr + listed.stderr + plot.stderr and plot.returncode in (0, 2), True)


def _twice(tmp: Path, sig: signal.Signals) -> Observation:
    proc, run_dir = start_and_wait(tmp, LONG, lambda d: status(d).get("state") == "running")
    time.sleep(0.3)
    proc.send_signal(sig)
    proc.send_signal(sig)
    proc = finished(proc, 120)
    st = status(run_dir)
    return Observation(f"exit {proc.returncode}; status {st.get('state')}",
                       quiet_exit(proc, 128 + sig) and st.get("state") == "killed", no_temporaries(run_dir))


def sigterm_twice(tmp: Path) -> Observation:
    return _twice(tmp, signal.SIGTERM)


def sigint_twice(tmp: Path) -> Observation:
    return _twice(tmp, signal.SIGINT)


def ctrl_c_during_start_up(tmp: Path) -> Observation:
    recipe = tmp / "recipe.toml"
    recipe.write_text(tiny_recipe())
    proc = start_cli("run", recipe, "--runs-dir", tmp / "runs", cwd=tmp)
    time.sleep(1.0)  # importing torch, building the data
    proc.send_signal(signal.SIGINT)
    proc = finished(proc, 120)
    left = [status(d).get("state") for d in run_dirs(tmp / "runs")]
    ok = ((proc.returncode == 130 and one_line(proc)) or (proc.returncode == 0 and "Traceback" not in proc.stderr))
    return Observation(f"exit {proc.returncode}: {proc.stderr.strip()[:100]}; run directories left: {left}", ok,
                       all(s in ("killed", "finished") for s in left))


def _bad_recipe(text: bytes | None, what: str, fragment: str) -> Callable[[Path], Observation]:
    def inject(tmp: Path) -> Observation:
        recipe = tmp / "recipe.toml"
        if text is None:
            recipe.mkdir()
        else:
            recipe.write_bytes(text)
        proc = run_cli("run", recipe, "--runs-dir", tmp / "runs", "--quiet", cwd=tmp)
        return Observation(f"{what}: exit {proc.returncode}: {proc.stderr.strip()[:120]}",
                           clean_exit(proc, 2) and fragment in proc.stderr, not (tmp / "runs").exists())
    return inject


HUGE_SEED = tiny_recipe(replace={"seed = 0": "seed = 18446744073709551616"}).encode()
HUGE_MODEL = tiny_recipe(replace={"widths = [16]": "widths = [4000000, 4000000]"}).encode()
HUGE_ROUNDS = tiny_recipe(replace={"rounds = 3": "rounds = 100000000000000000000"}).encode()
LONG_NAME = tiny_recipe(replace={'name = "tiny"': f'name = "{"n" * 300}"'}).encode()

FAULTS: list[Fault] = [
    Fault("kill -9 at random points (x3)", "lost, then resume: every round once, equal numbers",
          kill9_at_random_points),
    Fault("disk full mid-run", "exit 1, failed: no space left, checkpoint kept, no .tmp", full_disk_mid_run),
    Fault("runs directory read-only", "exit 2, one line", runs_dir_read_only),
    Fault("runs directory is a file", "exit 2, one line, file untouched", runs_dir_is_a_file),
    Fault("two --resume at once", "one runs, one refused naming host:pid", concurrent_resumes),
    Fault("checkpoint that runs code", "refused unread, no code runs", tampered_checkpoint_runs_no_code),
    Fault("truncated checkpoint", "exit 2, nothing changed", truncated_checkpoint),
    Fault("empty checkpoint", "exit 2, nothing changed", empty_checkpoint),
    Fault("random-bytes checkpoint", "exit 2, nothing changed", garbage_checkpoint),
    Fault("recipe.toml edited beside checkpoint", "exit 2 naming recipe.toml", recipe_edited_beside_checkpoint),
    Fault("garbage status/events in one run", "other runs listed and plotted", corrupt_files_of_one_run),
    Fault("SIGTERM twice", "exit 143, killed", sigterm_twice),
    Fault("SIGINT twice", "exit 130, killed", sigint_twice),
    Fault("Ctrl-C during start-up", "exit 130, one line, no queued run left", ctrl_c_during_start_up),
    Fault("empty recipe", "exit 2, nothing written", _bad_recipe(b"# nothing\n", "empty", "empty")),
    Fault("non-UTF-8 recipe", "exit 2, nothing written", _bad_recipe(b"[run]\nname = \"\xff\"\n", "bytes", "UTF-8")),
    Fault("deeply nested recipe", "exit 2, nothing written",
          _bad_recipe(b"a = " + b"[" * 5000 + b"]" * 5000, "nested", "nested")),
    Fault("recipe path is a folder", "exit 2, nothing written", _bad_recipe(None, "folder", "not a file")),
    Fault("seed >= 2^64", "exit 2, nothing written", _bad_recipe(HUGE_SEED, "seed", "run.seed")),
    Fault("model too large to allocate", "exit 2 naming GB", _bad_recipe(HUGE_MODEL, "model", "GB")),
    Fault("rounds = 10^20", "exit 2, nothing written", _bad_recipe(HUGE_ROUNDS, "rounds", "run.rounds")),
    Fault("run name longer than the filesystem allows", "exit 2, nothing written",
          _bad_recipe(LONG_NAME, "name", "run.name")),
]
