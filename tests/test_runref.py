"""bcdcore.runref.resolve_run: which run a reference names, as a table of cases over one runs directory."""
from __future__ import annotations

import json

import pytest

from bcdcore.annotations import update_annotations
from bcdcore.recipe import RecipeError
from bcdcore.runref import RunRefError, resolve_run

RUN_IDS = [
    "adam-20261202-101500-a1b2c3",
    "adam-20261202-101500-a1b2c3-2",   # a second copy in the same second
    "sgd-20261202-101600-0f0f0f",
    "sgd-20261202-111600-0f0f0f",      # the same recipe again: the same display id sgd-0f0f0f
    "gpt-20261202-101700-777777",      # given the display name "baseline"
    "hand-made",                       # a folder in no run id form
] + [f"many-20261202-10{i:02d}00-{i:06x}" for i in range(7)]
SWEEP_RUN = "sw-sweep-20261202-101800-eeeeee/sw-20261202-101801-123456"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runref") / "runs"
    for run_id in [*RUN_IDS, SWEEP_RUN]:
        path = runs / run_id
        path.mkdir(parents=True)
        (path / "status.json").write_text(json.dumps({"state": "finished"}))
    (runs / SWEEP_RUN).parent.joinpath("sweep.json").write_text("{}")
    update_annotations(runs / "gpt-20261202-101700-777777", name="baseline")
    (runs.parent / "elsewhere").mkdir()
    return runs


# reference -> the run it names (relative to the runs directory)
FOUND = {
    "adam-20261202-101500-a1b2c3": "adam-20261202-101500-a1b2c3",  # a full id, also a prefix of its copy's
    "adam-20261202-101500-a1b2c3-2": "adam-20261202-101500-a1b2c3-2",
    "adam-a1b2c3-2": "adam-20261202-101500-a1b2c3-2",  # the copy's display id
    "adam-a1b2c3": "adam-20261202-101500-a1b2c3",  # an exact display id, also a prefix of the copy's
    "sgd-20261202-1016": "sgd-20261202-101600-0f0f0f",  # a prefix of one full id
    "baseline-777777": "gpt-20261202-101700-777777",  # the display id with the user's name
    "base": "gpt-20261202-101700-777777",  # a prefix of it
    "gpt-2026": "gpt-20261202-101700-777777",  # the full id still works
    "hand-made": "hand-made",
    "sw-123456": SWEEP_RUN,  # inside a sweep directory
    "many-000003": "many-20261202-100300-000003",  # an exact display id
    "many-20261202-1004": "many-20261202-100400-000004",
}

# reference -> fragments of the one-line error
REFUSED = {
    "adam": ["2 runs match", "adam-20261202-101500-a1b2c3 (adam-a1b2c3)", "adam-20261202-101500-a1b2c3-2"],
    "sgd-0f0f0f": ["2 runs match", "sgd-20261202-101600-0f0f0f", "sgd-20261202-111600-0f0f0f"],
    "many": ["7 runs match", "many-20261202-100400-000004", "and 2 more", "give more of the id"],
    "nothing-like-it": ["not a run directory, nor the id of a run in", "bcdcore ls"],
    "gpt-777777": ["not a run directory"],  # the display id without the user's name is no longer shown
    "no/such/dir": ["no/such/dir: not a run directory (no such path)"],
    "": ["an empty run reference"],
    "   ": ["an empty run reference"],
}


@pytest.mark.parametrize("ref", list(FOUND))
def test_a_reference_names_one_run(runs, ref):
    assert resolve_run(ref, runs) == runs / FOUND[ref]


@pytest.mark.parametrize("ref", list(REFUSED))
def test_a_reference_that_names_none_or_several_is_one_line(runs, ref):
    with pytest.raises(RunRefError) as caught:
        resolve_run(ref, runs)
    message = str(caught.value)
    assert "\n" not in message and isinstance(caught.value, RecipeError)  # the CLI's exit 2
    for fragment in REFUSED[ref]:
        assert fragment in message, message
    assert message.count("(many-") <= 5  # at most 5 candidates named


def test_an_existing_path_wins_and_is_returned_as_given(runs, monkeypatch):
    assert resolve_run(runs / "hand-made", runs) == runs / "hand-made"
    assert resolve_run(runs.parent / "elsewhere", runs) == runs.parent / "elsewhere"  # not a run: the command says
    monkeypatch.chdir(runs)
    assert resolve_run("sgd-20261202-101600-0f0f0f", runs.parent / "missing").name == "sgd-20261202-101600-0f0f0f"


def test_a_runs_directory_that_is_missing_or_a_file_has_no_runs(tmp_path):
    (tmp_path / "file").write_text("x")
    for runs in (tmp_path / "missing", tmp_path / "file"):
        with pytest.raises(RunRefError, match="nor the id of a run in"):
            resolve_run("adam", runs)
