"""Every error path of every command: the documented exit code, exactly one line on stderr, no traceback.

Recipe errors of `run` are covered case by case in test_cli.py and the faults in test_faults.py; this table
covers the rest of each command's refusals. The commands run as real subprocesses, two at a time.
"""
from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import TINY, run_cli, stderr_lines, tiny_recipe


def _setup(root: Path) -> dict[str, Path]:
    """A finished run, a copy of it without its checkpoint, and a few files to point commands at."""
    (root / "tiny.toml").write_text(TINY)
    (root / "sweep.toml").write_text(TINY + '\n[sweep]\n"algorithm.K" = [1, 2]\n')
    (root / "a-file").write_text("not a folder")
    done = run_cli("run", root / "tiny.toml", "--runs-dir", root / "runs", "--quiet", cwd=root)
    assert done.returncode == 0, done.stderr
    finished = next((root / "runs").iterdir())
    no_ckpt = root / "no-ckpt" / finished.name
    shutil.copytree(finished, no_ckpt)
    (no_ckpt / "checkpoint.pt").unlink()
    (no_ckpt / "status.json").write_text('{"state": "killed"}')
    for copy in (finished.name, f"{finished.name}-2"):  # two runs whose ids share a prefix
        shutil.copytree(finished, root / "twins" / copy)
    (root / "slip.toml").write_text(TINY.replace("K = 2", "k = 2"))
    return {"finished": finished, "no_ckpt": no_ckpt}


# name -> (arguments with {root}/{finished}/{no_ckpt} placeholders, {{ }} for a brace; exit code; a fragment of
# the one line)
CASES: dict[str, tuple[list[str], int, str]] = {
    "no command": ([], 2, "required"),
    "unknown command": (["frobnicate"], 2, "invalid choice"),
    "unknown flag": (["ls", "--bogus"], 2, "unrecognized arguments"),
    "run without recipe": (["run"], 2, "give a recipe"),
    "run missing recipe": (["run", "{root}/nope.toml"], 2, "no such recipe file"),
    "run bad --set": (["run", "{root}/tiny.toml", "--set", "algorithm.K"], 2, "KEY=VALUE"),
    "run a sweep recipe": (["run", "{root}/sweep.toml"], 2, "bcdcore sweep"),
    "run runs-dir is a file": (["run", "{root}/tiny.toml", "--runs-dir", "{root}/a-file"], 2, "a-file"),
    "resume with a recipe": (["run", "--resume", "{finished}", "{root}/tiny.toml"], 2, "drop the RECIPE"),
    "resume not a run dir": (["run", "--resume", "{root}/nowhere"], 2, "not a run directory"),
    "resume a file": (["run", "--resume", "{root}/a-file"], 2, "not a run directory"),
    "resume finished": (["run", "--resume", "{finished}"], 2, "already finished"),
    "resume without checkpoint": (["run", "--resume", "{no_ckpt}"], 2, "no checkpoint.pt"),
    "check missing recipe": (["check", "{root}/nope.toml"], 2, "no such recipe file"),
    "check bad --set": (["check", "{root}/tiny.toml", "--set", "algorithm.K=0"], 2, "algorithm.K"),
    "check a folder": (["check", "{root}"], 2, "not a file"),
    "sweep without [sweep]": (["sweep", "{root}/tiny.toml"], 2, "no [sweep] table"),
    "sweep --per-gpu 0": (["sweep", "{root}/sweep.toml", "--per-gpu", "0"], 2, "--per-gpu"),
    "sweep bad --gpus": (["sweep", "{root}/sweep.toml", "--gpus", "x"], 2, "--gpus"),
    "sweep runs-dir is a file": (["sweep", "{root}/sweep.toml", "--runs-dir", "{root}/a-file"], 2, "a-file"),
    "plot no such run": (["plot", "{root}/nowhere", "--out", "{root}/p.png"], 2, "nowhere"),
    "plot unknown metric": (["plot", "{finished}", "--y", "nope", "--out", "{root}/p.png"], 2, "nope"),
    "plot unknown x": (["plot", "{finished}", "--x", "nope", "--out", "{root}/p.png"], 2, "nope"),
    "plot out in a file": (["plot", "{finished}", "--out", "{root}/a-file/p.png"], 2, "a-file"),
    "export not a run dir": (["export", "{root}/nowhere", "--onnx"], 2, "not a run directory"),
    "export without checkpoint": (["export", "{no_ckpt}", "--onnx"], 2, "checkpoint.pt"),
    "export without --onnx": (["export", "{finished}"], 2, "--onnx"),
    "export unknown run id": (["export", "nope", "--onnx", "--runs-dir", "{root}/runs"], 2, "nor the id of a run"),
    "resume unknown run id": (["run", "--resume", "nope", "--runs-dir", "{root}/runs"], 2, "nor the id of a run"),
    "plot unknown run id": (["plot", "nope", "--runs-dir", "{root}/runs"], 2, "nor the id of a run"),
    "plot ambiguous run id": (["plot", "tiny", "--runs-dir", "{root}/twins", "--out", "{root}/p.png"], 2,
                              "2 runs match"),
    "ls unknown --state": (["ls", "--state", "finshed"], 2, "did you mean 'finished'"),
    "ls bad --tag": (["ls", "--tag", "a b"], 2, "tag 'a b'"),
    "tag unknown run id": (["tag", "nope", "--runs-dir", "{root}/runs", "--add", "x"], 2, "nor the id of a run"),
    "tag not a run dir": (["tag", "{root}/a-file", "--add", "x"], 2, "not a run directory"),
    "tag bad tag": (["tag", "{finished}", "--add", "a,b"], 2, "no spaces or commas"),
    "tag notes twice": (["tag", "{finished}", "--notes", "x", "--notes-file", "{root}/tiny.toml"], 2, "not both"),
    "tag missing notes file": (["tag", "{finished}", "--notes-file", "{root}/nope.md"], 2, "no such file"),
    "tag name too long": (["tag", "{finished}", "--name", "x" * 201], 2, "display name"),
    "run --set stop not a list": (["run", "{root}/tiny.toml", "--set", "stop=5"], 2, "array of inline tables"),
    "run --set stop.KEY": (["run", "{root}/tiny.toml", "--set", "stop.kind=patience"], 2, "replace it whole"),
    "check --set bad stop table": (["check", "{root}/tiny.toml", "--set", "stop=[{{kind='patience', patience=0}}]"],
                                   2, "--set stop: stop.patience: must be >= 1"),
    "check --set stop kind rounds": (["check", "{root}/tiny.toml", "--set", "stop=[{{kind='rounds', rounds=9}}]"],
                                     2, "--set run.rounds="),
    "check --set case slip": (["check", "{root}/tiny.toml", "--set", "algorithm.k=3"], 2, "did you mean 'K'"),
    "check case slip in a file": (["check", "{root}/slip.toml"], 2, "algorithm.k: unknown key (did you mean 'K'?)"),
    "sweep --set bad measure": (["sweep", "{root}/sweep.toml", "--set", "measure=[{{unit='nope'}}]"], 2,
                                "unknown measurement unit"),
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-errors")
    places = {"root": root, **_setup(root)}

    def call(name: str):
        args, _, _ = CASES[name]
        return name, run_cli(*[a.format(**places) for a in args], cwd=root)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(call, CASES))


@pytest.mark.parametrize("name", list(CASES))
def test_error_path_is_one_line_and_its_exit_code(outcomes, name):
    proc = outcomes[name]
    _, code, fragment = CASES[name]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = stderr_lines(proc)
    assert proc.returncode == code, (proc.returncode, lines)
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    assert fragment in lines[0], lines[0]


def test_a_model_too_large_is_refused_in_gb_before_anything_is_written(tmp_path):
    recipe = tmp_path / "big.toml"
    recipe.write_text(tiny_recipe(replace={"widths = [16]": "widths = [3000000, 3000000]"}))
    proc = run_cli("check", recipe, cwd=tmp_path)
    lines = stderr_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1, lines
    assert "9,000," in lines[0] and "GB" in lines[0] and "model.widths" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.toml"]
