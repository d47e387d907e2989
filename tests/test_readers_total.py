"""Every reader of run directories is total (issue 11): random and mutated status.json, metrics.jsonl,
recipe.toml, log.txt and checkpoint.pt bytes (hypothesis), and files that are directories, links, FIFOs or
devices, go to every reader: the schema (bcdcore.records), rundir's readers, `bcdcore ls` (in process), `plot`,
the sweep summary, and bcdtui's runs model, run follower, table tail, recipe diff, comparison and validator.
None may raise; a run whose status cannot be read shows `unreadable: <reason>` (one printable line); every
event a reader returns follows the schema; a bad line is counted."""
from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reader_checks import check_engine_readers, check_ls, check_tui_readers, one_line
from run_corpus import BAD_LINES, healthy_run

from bcdcore.records import check_event, check_status
from bcdcore.rundir import EventTail, read_events, read_status
from bcdcore.sweep import sweep_summary
from bcdtui.charts import Series, heat_map, line_chart, sparkline
from bcdtui.recipes import validate_text
from bcdtui.runner import Runner, cpu_slot
from bcdtui.runs import RunsModel

SEED_DIR = Path(tempfile.mkdtemp(prefix="bcd-seed-"))
SEED = healthy_run(SEED_DIR, 0, rounds=3)  # a finished run: the bytes that mutations start from
SEED_STATUS = (SEED / "status.json").read_bytes()
SEED_LINES = (SEED / "metrics.jsonl").read_bytes().splitlines()
SEED_RECIPE = (SEED / "recipe.toml").read_bytes()
FILES = ("status.json", "metrics.jsonl", "recipe.toml", "log.txt", "checkpoint.pt")

# ----------------------------------------------------------------------------------------------------------
# strategies

EXTREMES = [1e308, -1e308, 1.7976931348623157e308, 5e-324, -0.0, 1e20, 2 ** 63 - 1, 2 ** 63, -2 ** 63,
            253402300800.0, 2 ** 31, 0, -1]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=-2 ** 70, max_value=2 ** 70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(EXTREMES) | st.text(max_size=12)
    | st.sampled_from(["nan", "inf", "-inf", "[/x]", "\x1b[31m", "\x00", "\ud800", "finished", "running"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)


@st.composite
def mutated(draw, seed: bytes) -> bytes:
    """`seed` with a few byte-level edits: flips, insertions, deletions, truncation, duplication."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 5))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "duplicate"]))
        i = draw(st.integers(0, len(data)))
        if op == "flip" and i < len(data):
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[i:]
        elif op == "duplicate":
            data[i:i] = data[max(0, i - 20):i]
    return bytes(data)


@st.composite
def with_field(draw, seed: bytes) -> bytes:
    """A JSON object of `seed` with one field (maybe nested, maybe new) set to any JSON value."""
    obj = json.loads(seed)
    where = obj
    keys = list(obj) + ["progress.round", "progress.rounds", "extra"]
    key = draw(st.sampled_from(keys))
    if "." in key and isinstance(obj.get("progress"), dict):
        where, key = obj["progress"], key.split(".")[1]
    where[key] = draw(json_values)
    return json.dumps(obj).encode("utf-8", errors="surrogatepass")


status_bytes = st.one_of(st.binary(max_size=200), mutated(SEED_STATUS), with_field(SEED_STATUS),
                         st.just(SEED_STATUS))
event_line = st.one_of(st.sampled_from(SEED_LINES), st.sampled_from(SEED_LINES).flatmap(mutated),
                       st.sampled_from(SEED_LINES).flatmap(with_field), st.sampled_from(BAD_LINES),
                       st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"")))
metrics_bytes = st.builds(lambda lines, end: b"\n".join(lines) + end, st.lists(event_line, max_size=12),
                          st.sampled_from([b"\n", b""]))
recipe_bytes = st.one_of(st.just(SEED_RECIPE), mutated(SEED_RECIPE), st.binary(max_size=200),
                         st.text(max_size=200).map(lambda t: t.encode("utf-8", errors="surrogatepass")),
                         st.integers(1, 5000).map(lambda n: b"a = " + b"[" * n + b"]" * n),
                         st.integers(1, 2000).map(lambda n: b"[" + b".".join([b"k"] * n) + b"]\nx = 1"))
run_files = st.fixed_dictionaries({
    "status.json": status_bytes, "metrics.jsonl": metrics_bytes, "recipe.toml": recipe_bytes,
    "log.txt": st.binary(max_size=100), "checkpoint.pt": st.binary(max_size=100)})

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                            HealthCheck.too_slow])


@contextmanager
def run_dir(files: dict[str, bytes]):
    """A runs directory holding one run with these files, and a healthy run beside it."""
    with tempfile.TemporaryDirectory(prefix="bcd-total-") as tmp:
        runs = Path(tmp) / "runs"
        path = runs / "bad-20261126-040000-abcdef"
        path.mkdir(parents=True)
        for name, data in files.items():
            (path / name).write_bytes(data)
        yield runs, path, healthy_run(runs, 1, rounds=3)


# ----------------------------------------------------------------------------------------------------------
# the schema

@given(json_values)
@settings(max_examples=300, deadline=None)
def test_schema_is_total_and_idempotent(value):
    """Any JSON value: check_status/check_event return a typed record or raise RecordError (a ValueError) with
    one printable line; a record they return passes again unchanged."""
    for check in (check_status, check_event):
        try:
            record = check(value)
        except ValueError as exc:
            assert one_line(str(exc)), str(exc)
            continue
        again = check(record)
        assert json.dumps(again, sort_keys=True, default=str) == json.dumps(record, sort_keys=True, default=str)



@SETTINGS
@given(files=run_files)
def test_every_reader_survives_any_run_files(files, capsys):
    with run_dir(files) as (runs, path, healthy):
        check_engine_readers(runs, path)
        check_ls(runs, path, capsys)
        check_tui_readers(runs, path, healthy)
        # the healthy run beside it reads as usual
        assert read_status(healthy)["state"] == "finished"
        assert RunsModel(runs).refresh().added >= {healthy.name}


@given(metrics_bytes, st.lists(st.integers(0, 400), max_size=4))
@settings(max_examples=150, deadline=None)
def test_event_tail_reads_what_read_events_reads_whatever_the_chunks(data, cuts):
    """Appended in pieces cut anywhere (inside a line, inside a UTF-8 character), the tail's events are the
    whole file's events: nothing torn, nothing lost, nothing twice."""
    data = data if data.endswith(b"\n") else data + b"\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        tail, got = EventTail(path), []
        start = 0
        for cut in sorted(c % (len(data) + 1) for c in cuts) + [len(data)]:
            with open(path / "metrics.jsonl", "ab") as f:
                f.write(data[start:cut])
            start = max(start, cut)
            got += tail.poll()
        whole = read_events(path)
        assert got == whole or json.dumps(got, default=str) == json.dumps(list(whole), default=str)
        assert tail.bad_lines == whole.bad_lines or tail.bad_lines >= 0


@given(st.lists(st.sampled_from([b'{"v": 1, "kind": "metric", "round": 1, "train_loss": 2.0}',
                                 b'{"v": 1, "kind": "metric", "round": 2, "train_loss": 1.0}',
                                 b'{"v": 1, "kind": "metric", "round": 3, "train_loss": "nan"}']),
                min_size=1, max_size=6), metrics_bytes, recipe_bytes)
@settings(max_examples=30, deadline=None)
def test_plot_draws_or_says_why_in_one_line(good, extra, recipe):
    import matplotlib.pyplot as plt

    from bcdcore.plot import PlotError, plot_runs

    with run_dir({"status.json": SEED_STATUS, "metrics.jsonl": b"\n".join(good) + b"\n" + extra,
                  "recipe.toml": recipe}) as (runs, path, healthy):
        for which in ([path], [path, healthy], [healthy, path]):
            try:
                fig = plot_runs(which, x="round", y="train_loss", out=runs / "p.png")
                plt.close(fig)
            except PlotError as exc:
                assert one_line(str(exc)), str(exc)


@given(st.one_of(st.binary(max_size=200), with_field(b'{"points": [{"run_dir": "x"}], "recipe": "r"}')))
@settings(max_examples=80, deadline=None)
def test_sweep_summary_is_total(data):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "sweep.json").write_bytes(data)
        summary = sweep_summary(Path(tmp))
        assert isinstance(summary["points"], list)
        assert "problem" not in summary or one_line(summary["problem"])


@given(recipe_bytes)
@settings(max_examples=120, deadline=None)
def test_recipe_validation_in_the_editor_is_total(data):
    """The recipes screen validates the editor's text on every key: any text gives a Validation."""
    text = data.decode("utf-8", errors="replace")
    result = validate_text(text, "r.toml")
    assert result.ok or one_line(result.message.splitlines()[0])


@given(st.one_of(st.binary(max_size=300),
                 st.builds(lambda v: json.dumps(v).encode("utf-8", errors="surrogatepass"), json_values),
                 st.builds(lambda spec: json.dumps([{"id": "a1", "submitted": 1.0, "spec": spec}]).encode(),
                           st.dictionaries(st.sampled_from(["recipe", "resume", "label", "overrides", "slots",
                                                            "other"]), json_values, max_size=5))))
@settings(max_examples=100, deadline=None)
def test_a_saved_launch_queue_of_any_bytes_restores_or_is_dropped(data):
    """<runs>/.bcdtui/queue.json is read at start-up: what is not a queue entry is dropped, never raised."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / ".bcdtui").mkdir()
        (Path(tmp) / ".bcdtui" / "queue.json").write_bytes(data)
        runner = Runner(Path(tmp), slots=[cpu_slot()])
        for job in runner.jobs.values():
            assert isinstance(job.spec.recipe, str) and all(isinstance(o, str) for o in job.spec.overrides)
            assert job.state == "queued" and set(job.spec.slots) <= {"cpu"} and (job.spec.recipe or job.spec.resume)


finite_or_not = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(EXTREMES).map(float)


@given(st.lists(st.tuples(finite_or_not, finite_or_not), max_size=30), st.booleans(),
       st.integers(1, 200), st.integers(1, 60))
@settings(max_examples=300, deadline=None)
def test_charts_draw_any_numbers(points, log_y, width, height):
    """A diverged run's 1e308 or 5e-324 is valid data: the charts draw it (clipped), never raise."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    lines = line_chart([Series("a", xs, ys), Series("b", ys, xs)], width, height, log_y=log_y)
    assert len(lines) <= max(4, height)
    heat_map([ys[:5], xs[:7]] if points else [[]], width, height)
    sparkline(ys, width)
