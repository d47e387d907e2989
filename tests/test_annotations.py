"""Tags, notes and display names of a run (bcdcore.annotations): stored beside the run, read back totally."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bcdcore.annotations import (
    ANNOTATIONS_FILE,
    MAX_TAGS,
    AnnotationError,
    Annotations,
    read_annotations,
    update_annotations,
)


def _run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    (run / "status.json").write_text('{"state": "finished"}')
    return run


def test_update_keeps_what_is_not_given_and_round_trips(tmp_path):
    run = _run(tmp_path)
    assert read_annotations(run) == (Annotations(), "")
    update_annotations(run, add_tags=["baseline", "lr=0.1", "baseline"])
    update_annotations(run, name="adam, wide", notes="first try\nsecond line")
    stored = update_annotations(run, add_tags=["wide"], remove_tags=["lr=0.1"])
    assert stored == Annotations("adam, wide", ("baseline", "wide"), "first try\nsecond line")
    assert read_annotations(run) == (stored, "")
    assert json.loads((run / ANNOTATIONS_FILE).read_text())["tags"] == ["baseline", "wide"]
    assert not [p for p in os.listdir(run) if p.endswith(".tmp")]


@pytest.mark.parametrize("kwargs, message", [
    ({"add_tags": ["two words"]}, "tag 'two words'"),
    ({"add_tags": ["a,b"]}, "no spaces or commas"),
    ({"add_tags": [f"t{i}" for i in range(MAX_TAGS + 1)]}, f"at most {MAX_TAGS} tags"),
    ({"name": "x" * 201}, "the most is 200"),
    ({"name": "bell\x07"}, "control characters"),
    ({"notes": "a\x00b"}, "NUL"),
])
def test_bad_input_is_one_line_and_changes_nothing(tmp_path, kwargs, message):
    run = _run(tmp_path)
    update_annotations(run, add_tags=["keep"])
    before = (run / ANNOTATIONS_FILE).read_bytes()
    with pytest.raises(AnnotationError, match=message) as info:
        update_annotations(run, **kwargs)
    assert "\n" not in str(info.value)
    assert (run / ANNOTATIONS_FILE).read_bytes() == before


def test_an_unreadable_file_is_reported_and_never_overwritten(tmp_path):
    run = _run(tmp_path)
    (run / ANNOTATIONS_FILE).write_text('{"tags": "not a list", "notes": "my precious notes"}')
    annotations, problem = read_annotations(run)
    assert annotations == Annotations() and "tags must be a list" in problem
    with pytest.raises(AnnotationError, match="fix or remove the file first"):
        update_annotations(run, add_tags=["x"])
    assert "my precious notes" in (run / ANNOTATIONS_FILE).read_text()


def test_not_a_run_directory(tmp_path):
    with pytest.raises(AnnotationError, match="not a run directory"):
        update_annotations(tmp_path, add_tags=["x"])


def test_a_fifo_or_directory_in_place_of_the_file_reads_as_a_problem(tmp_path):
    run = _run(tmp_path)
    os.mkfifo(run / ANNOTATIONS_FILE)
    assert read_annotations(run)[1]  # never blocks on the FIFO
    os.unlink(run / ANNOTATIONS_FILE)
    (run / ANNOTATIONS_FILE).mkdir()
    assert "directory" in read_annotations(run)[1]


@settings(max_examples=200, deadline=None)
@given(raw=st.one_of(st.binary(max_size=300),
                     st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                                  lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
                                      st.sampled_from(["name", "tags", "notes", "x"]), kids, max_size=4),
                                  max_leaves=12).map(lambda v: json.dumps(v).encode())))
def test_reading_any_bytes_never_raises(tmp_path_factory, raw):
    run = _run(tmp_path_factory.mktemp("a"))
    (run / ANNOTATIONS_FILE).write_bytes(raw)
    annotations, problem = read_annotations(run)
    assert isinstance(annotations, Annotations)
    assert bool(problem) or annotations.tags is not None
    assert "\n" not in problem


@pytest.mark.parametrize("run_id, name, shown", [
    ("quickstart-20261202-101500-a1b2c3", "", "quickstart-a1b2c3"),
    ("quickstart-20261202-101500-a1b2c3-2", "", "quickstart-a1b2c3-2"),
    ("sweep-lr-0.1-20261202-101500-00ff00", "", "sweep-lr-0.1-00ff00"),
    ("quickstart-20261202-101500-a1b2c3", "adam wide", "adam wide-a1b2c3"),
    ("hand-made-folder", "", "hand-made-folder"),
    ("hand-made-folder", "mine", "mine"),
])
def test_display_id_is_name_and_digest(run_id, name, shown):
    from bcdcore.rundir import display_id, run_id_for
    assert display_id(run_id, name) == shown
    assert display_id(run_id_for("r", "abcdef0123")) == "r-abcdef"
