"""Shared helpers: tiny recipes written into tmp_path, and the CLI run as a real subprocess.

The CLI helpers run `python -m bcdcore ...` with the repository on PYTHONPATH, BCD_OPS and BCD_RUNS unset
(so the recipe picks the backend and `./runs` is the default runs directory) and one OpenMP thread per
process (the suites start several runs side by side on small machines).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A recipe small enough to run in well under a second of training: 2-block MLP on the bundled digits.
TINY = """\
[run]
name = "tiny"
seed = 0
device = "cpu"
rounds = 3

[data]
name = "digits_flat"
batch_size = 32

[model]
name = "mlp"
widths = [16]

[algorithm]
mode = "blockwise"
schedule = "jacobi"
K = 2
lambda = 0.01
gamma = 1.0
solver = "sgd"
lr = 0.05

[eval]
every = 1
"""


def tiny_recipe(*, replace: dict[str, str] | None = None, append: str = "") -> str:
    """TINY with whole lines replaced (`{"K = 2": "K = 0"}`) and text appended at the end."""
    text = TINY
    for old, new in (replace or {}).items():
        assert old in text, f"{old!r} is not a line of the tiny recipe"
        text = text.replace(old, new, 1)
    return text + append


def dist_recipe(name: str, timeout_s: int) -> str:
    """A 2-process gloo recipe: 4-block MLP, random active subsets (the same generator on every rank), momentum,
    damping and a simulated network; every piece of state a checkpoint must carry."""
    return tiny_recipe(replace={'name = "tiny"': f'name = "{name}"', "widths = [16]": "widths = [16, 16, 16]",
                                "gamma = 1.0": "gamma = 0.9", 'solver = "sgd"': 'solver = "momentum"',
                                "[eval]": "active_share = 0.5\n\n[eval]"},
                       append=f"""
[distributed]
nproc = 2
communication_delay = 0.001
bandwidth = 1e8
timeout_s = {timeout_s}
""")


def wait_for(predicate, timeout: float, what: str, poll: float = 0.05) -> None:
    """Poll `predicate` until it holds; AssertionError naming `what` after `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def line_of(text: str, fragment: str) -> int:
    """1-based number of the first line of `text` that contains `fragment`."""
    for number, line in enumerate(text.splitlines(), 1):
        if fragment in line:
            return number
    raise AssertionError(f"{fragment!r} not in the recipe text")


@pytest.fixture(scope="module")
def single_torch_thread():
    """One torch intra-op thread for a module of tiny models (`pytestmark = pytest.mark.usefixtures(...)`): with
    more, synchronisation costs more than the maths (far more on a shared 2-core box). The module's end gives
    the previous setting back for the other test modules."""
    import torch  # here, not at the top: most test modules (the TUI's) never need torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def write_recipe(tmp_path):
    """write_recipe(text, name="recipe.toml") -> Path of the file written under tmp_path."""

    def write(text: str, name: str = "recipe.toml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("BCD_OPS", None)
    env.pop("BCD_RUNS", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def cli_args(*args: str) -> list[str]:
    return [sys.executable, "-m", "bcdcore", *[str(a) for a in args]]


def run_cli(*args: str, cwd: Path, timeout: float = 180, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m bcdcore ARGS...` in cwd and wait; text stdout/stderr captured."""
    return subprocess.run(cli_args(*args), cwd=cwd, env=env or cli_env(), capture_output=True, text=True,
                          timeout=timeout)


def start_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """Start `python -m bcdcore ARGS...` in cwd without waiting (for signals and concurrency)."""
    return subprocess.Popen(cli_args(*args), cwd=cwd, env=env or cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def stderr_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


@pytest.fixture
def cli(tmp_path):
    """cli(*args, cwd=tmp_path) -> CompletedProcess of `python -m bcdcore ARGS...`."""

    def call(*args: str, cwd: Path | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
        return run_cli(*args, cwd=cwd or tmp_path, timeout=timeout)

    return call


@pytest.fixture
def place(tmp_path, monkeypatch):
    """A working directory with recipes/ and runs/; the engine subprocesses import this checkout."""
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "tiny.toml").write_text(TINY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("BCD_RUNS", raising=False)
    monkeypatch.delenv("BCD_OPS", raising=False)
    monkeypatch.delenv("BCDTUI_CONFIRM", raising=False)
    return tmp_path
