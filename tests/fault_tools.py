"""Tools of the fault suite (tests/faults.py): recipes, observations, process helpers and file checks."""
from __future__ import annotations

import hashlib
import json
import signal
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from conftest import run_cli, start_cli, tiny_recipe, wait_for

LONG = tiny_recipe(replace={"rounds = 3": "rounds = 400", "widths = [16]": "widths = [64, 64]"})


ENDLESS = tiny_recipe(replace={"rounds = 3": "rounds = 10000000"})


ROUNDS_CHECKPOINTED = 300


CHECKPOINTED = tiny_recipe(replace={"rounds = 3": f"rounds = {ROUNDS_CHECKPOINTED}",
                                    "widths = [16]": "widths = [64, 64]",
                                    "[data]": "checkpoint_every = 3\n\n[data]"})


@dataclass
class Observation:
    observed: str  # what happened, in words
    survived: bool  # right exit code, one line on stderr, no traceback
    intact: bool  # nothing lost, overwritten or left half-done


@dataclass
class Fault:
    name: str
    expected: str
    inject: Callable[[Path], Observation]


def finished(proc: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def one_line(proc) -> bool:
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    return len(err) == 1 and "Traceback" not in proc.stderr


def clean_exit(proc, code: int) -> bool:
    return proc.returncode == code and one_line(proc)


def quiet_exit(proc, code: int) -> bool:
    """A run that ends with `code` and prints no traceback (a run's own stderr may hold its progress)."""
    return proc.returncode == code and "Traceback" not in (proc.stderr or "")


def status(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def events(run_dir: Path, kind: str | None = None) -> list[dict]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text(errors="replace").splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if isinstance(e, dict) and (kind is None or e.get("kind") == kind):
            out.append(e)
    return out


def rounds_once(run_dir: Path, rounds: int) -> bool:
    """Every round exactly once in metrics.jsonl, metrics.csv and arrays/round.npy."""
    import csv

    import numpy as np

    want = list(range(1, rounds + 1))
    jsonl = [e["round"] for e in events(run_dir, "metric")]
    with open(run_dir / "metrics.csv") as f:
        table = [int(row["round"]) for row in csv.DictReader(f)]
    arrays = [int(r) for r in np.load(run_dir / "arrays" / "round.npy")]
    return jsonl == want and table == want and arrays == want


def run_dirs(runs: Path) -> list[Path]:
    return sorted(p for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []


def no_temporaries(run_dir: Path) -> bool:
    return not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]


def digest(folder: Path) -> str:
    """A hash of every file's name and bytes under folder (the lock file's holder line excepted)."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != "lock":
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def ls_state(cwd: Path, run_dir: Path) -> str:
    out = run_cli("ls", "--runs-dir", str(run_dir.parent), "--json", cwd=cwd)
    for record in json.loads(out.stdout or "[]"):
        if record["id"] == run_dir.name:
            return record["state"] + (f": {record['reason']}" if record["state"] == "unreadable" else "")
    return "missing"


def start_and_wait(tmp: Path, text: str, predicate, name: str = "recipe.toml") -> tuple[subprocess.Popen, Path]:
    """Start a run of `text` and wait until its run directory satisfies `predicate`."""
    recipe = tmp / name
    recipe.write_text(text)
    runs = tmp / "runs"
    proc = start_cli("run", recipe, "--runs-dir", runs, "--quiet", cwd=tmp)
    found: list[Path] = []

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.communicate()}")
        dirs = run_dirs(runs)
        if dirs and predicate(dirs[0]):
            found.append(dirs[0])
            return True
        return False

    wait_for(ready, 120, "the run to get going")
    return proc, found[0]


def killed_run(tmp: Path, text: str = None) -> Path:
    """A run stopped by SIGTERM after a few rounds: killed, with a checkpoint to resume from."""
    proc, run_dir = start_and_wait(tmp, text or LONG, lambda d: (d / "metrics.jsonl").exists()
                                   and len(events(d, "metric")) >= 3)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert status(run_dir).get("state") == "killed", status(run_dir)
    return run_dir


@contextmanager
def mounted_tmpfs(where: Path, size: str, read_only: bool = False) -> Iterator[bool]:
    """A small tmpfs at `where` (root only); yields False where mounting is not allowed."""
    where.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                              capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        done = False
    try:
        yield done
    finally:
        if done:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=20)
