"""checkpoint.pt: never runs code, and any bytes give either a checked checkpoint or one CheckpointError line,
with the run directory unchanged (property tests over random and mutated files)."""
from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import pytest
import torch
from conftest import run_cli, start_cli, tiny_recipe, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bcdcore.checkpoint import CheckpointError, check_like, load_checkpoint, save_checkpoint
from bcdcore.recipe import RecipeError
from bcdcore.run import resume_run

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> Path:
    """A tiny run stopped by SIGTERM mid-way: killed, with a real checkpoint."""
    import json
    import signal

    root = tmp_path_factory.mktemp("ckpt")
    (root / "r.toml").write_text(tiny_recipe(replace={"rounds = 3": "rounds = 100000"}))
    proc = start_cli("run", root / "r.toml", "--runs-dir", root / "runs", "--quiet", cwd=root)

    def going() -> bool:
        dirs = list((root / "runs").glob("*/metrics.jsonl"))
        return bool(dirs) and dirs[0].read_text().count('"metric"') >= 2

    wait_for(going, 120, "two rounds")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    run_dir = next((root / "runs").iterdir())
    assert json.loads((run_dir / "status.json").read_text())["state"] == "killed"
    return run_dir


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name not in ("lock", "checkpoint.pt", "log.txt"):
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def _try_resume(run_dir: Path) -> str:
    """'ok' when the checkpoint was accepted (the run is then closed unrun), else the refusal line."""
    try:
        run = resume_run(run_dir)
    except RecipeError as exc:
        assert "\n" not in str(exc)
        return str(exc)
    run.rundir.close()
    return "ok"


def test_tampered_checkpoint_never_runs_code(killed, tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    original = (killed / "checkpoint.pt").read_bytes()
    for payload in ({"round": Payload()}, Payload(), [torch.zeros(2), Payload()]):
        (killed / "checkpoint.pt").write_bytes(pickle.dumps(payload))
        before = _digest(killed)
        line = _try_resume(killed)
        assert "refused unread" in line and "could run code" in line
        assert not marker.exists(), "a checkpoint executed code"
        assert _digest(killed) == before
    (killed / "checkpoint.pt").write_bytes(original)
    assert _try_resume(killed) == "ok"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_checkpoint_bytes_are_accepted_checked_or_refused_in_one_line(killed, data):
    path = killed / "checkpoint.pt"
    original = path.read_bytes()
    try:
        kind = data.draw(st.sampled_from(["flip", "truncate", "random", "splice"]))
        blob = bytearray(original)
        if kind == "flip":
            for i in data.draw(st.lists(st.integers(0, len(blob) - 1), min_size=1, max_size=8)):
                blob[i] ^= data.draw(st.integers(1, 255))
        elif kind == "truncate":
            blob = blob[:data.draw(st.integers(0, len(blob) - 1))]
        elif kind == "random":
            blob = bytearray(data.draw(st.binary(max_size=4096)))
        else:
            at = data.draw(st.integers(0, len(blob)))
            blob[at:at] = data.draw(st.binary(min_size=1, max_size=64))
        path.write_bytes(bytes(blob))
        before = _digest(killed)
        outcome = _try_resume(killed)  # raises anything but RecipeError -> the test fails
        if outcome != "ok":
            assert _digest(killed) == before, "a refused checkpoint changed the run directory"
    finally:
        path.write_bytes(original)


@settings(max_examples=60, deadline=None)
@given(value=st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20))
def test_any_plain_data_saved_as_a_checkpoint_is_checked_without_surprises(tmp_path_factory, value):
    """Whatever plain data a checkpoint holds, the template check answers with CheckpointError or passes."""
    path = tmp_path_factory.mktemp("c") / "checkpoint.pt"
    save_checkpoint(path, {"round": value, "flat": value})
    template = {"round": 3, "flat": torch.zeros(4), "buffers": [[torch.zeros(2)]]}
    try:
        load_checkpoint(path, template)
    except CheckpointError as exc:
        assert "\n" not in str(exc)
    else:
        pytest.fail("a checkpoint without tensors passed the check")


def test_check_like_names_the_first_difference():
    want = {"flat": torch.zeros(5), "trainer": {"steps": [0, 0]}, "stoppers": [{"best": 1.0}]}
    with pytest.raises(CheckpointError, match=r"checkpoint.flat has shape \(4,\)"):
        check_like({"flat": torch.zeros(4), "trainer": {"steps": [0, 0]}, "stoppers": [{"best": 1.0}]}, want,
                   "checkpoint")
    with pytest.raises(CheckpointError, match=r"checkpoint.trainer.steps has 3 entries"):
        check_like({"flat": torch.zeros(5), "trainer": {"steps": [0, 0, 0]}, "stoppers": [{"best": 1.0}]},
                   want, "checkpoint")
    with pytest.raises(CheckpointError, match=r"checkpoint.stoppers\[0\].best should be a number"):
        check_like({"flat": torch.zeros(5), "trainer": {"steps": [0, 0]}, "stoppers": [{"best": "x"}]}, want,
                   "checkpoint")
    check_like({"flat": torch.ones(5), "trainer": {"steps": [3, 4]}, "stoppers": [{"best": 2}]}, want, "c")


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    from bcdcore import rundir

    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"round": 1, "flat": torch.arange(3.0)})
    real_open = open

    def full_disk_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if "w" in mode and str(file).endswith(".tmp"):
            f.close()
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return f

    monkeypatch.setattr("builtins.open", full_disk_open)
    with pytest.raises(OSError) as caught:
        save_checkpoint(path, {"round": 2, "flat": torch.arange(3.0) + 1})
    monkeypatch.undo()
    assert caught.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temporary left
    assert load_checkpoint(path)["round"] == 1
    assert rundir.write_bytes_atomic  # the one writer of every atomic file


def test_resume_after_kill9_drops_the_rounds_after_the_checkpoint(tmp_path):
    """A run killed hard after its round-6 checkpoint but with events up to later rounds: resume drops those
    events, so every round appears once in metrics.jsonl and metrics.csv, and reaches the same numbers."""
    import csv
    import json

    text = tiny_recipe(replace={"rounds = 3": "rounds = 12", "[data]": "checkpoint_every = 3\n\n[data]"})
    (tmp_path / "r.toml").write_text(text)
    reference = run_cli("run", tmp_path / "r.toml", "--runs-dir", tmp_path / "ref", "--quiet", cwd=tmp_path)
    assert reference.returncode == 0
    ref_dir = next((tmp_path / "ref").iterdir())
    # simulate the crash: the finished reference's events and a checkpoint of round 6
    crashed = tmp_path / "runs" / ref_dir.name
    crashed.parent.mkdir()
    run_cli("run", tmp_path / "r.toml", "--runs-dir", tmp_path / "part", "--quiet", "--set", "run.rounds=6",
            cwd=tmp_path)
    part = next((tmp_path / "part").iterdir())
    import shutil

    shutil.copytree(ref_dir, crashed)
    shutil.copy(part / "checkpoint.pt", crashed / "checkpoint.pt")
    status = json.loads((crashed / "status.json").read_text())
    status.update(state="running", pid=2 ** 22 + 12345)  # a process that is gone
    (crashed / "status.json").write_text(json.dumps(status))
    with open(crashed / "metrics.jsonl", "a") as f:
        f.write('{"v": 1, "kind": "metric", "round": 13, "train_lo')  # torn by the kill
    resumed = run_cli("run", "--resume", crashed, "--quiet", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    metrics = [json.loads(line) for line in (crashed / "metrics.jsonl").read_text().splitlines()]
    rounds = [e["round"] for e in metrics if e["kind"] == "metric"]
    assert rounds == list(range(1, 13))
    with open(crashed / "metrics.csv") as f:
        assert [int(r["round"]) for r in csv.DictReader(f)] == list(range(1, 13))
    ref = [json.loads(line) for line in (ref_dir / "metrics.jsonl").read_text().splitlines()]
    assert ([e["train_loss"] for e in metrics if e["kind"] == "metric"]
            == [e["train_loss"] for e in ref if e["kind"] == "metric"])
