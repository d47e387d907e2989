"""Run directories for the reader tests: healthy ones in the engine's format (plain file writes, no training)
and a catalogue of ways to break one, each with what a reader must then show.

`STATUS_CORRUPTIONS` make a run unreadable (its status.json cannot be read): readers show
`unreadable: <reason>`. `EVENT_CORRUPTIONS` spoil lines of metrics.jsonl: the run still reads, the bad lines are
skipped and counted. Both are used by the property tests (as seeds for mutation) and by the 1,000-run tests.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

from bcdtui.synthetic import resolved_recipe, write_run

RECIPE = None  # the resolved recipe text, made once (validation costs more than writing a run)


def recipe_text() -> str:
    global RECIPE
    if RECIPE is None:
        RECIPE = resolved_recipe("demo")
    return RECIPE


def healthy_run(runs_dir: Path, i: int, rounds: int = 4) -> Path:
    """Run number i: finished, failed or killed (an ended state needs no live process), a few rounds."""
    state = ("finished", "finished", "failed", "killed")[i % 4]
    return write_run(runs_dir, f"demo{i:04d}-20261126-040000-{i:06x}", state=state, rounds=rounds,
                     done=rounds if state == "finished" else rounds // 2, recipe=recipe_text(), recipe_name="demo",
                     blocks=i % 2 == 0, started=1_795_000_000.0 + i)


def _status(path: Path) -> dict:
    return json.loads((path / "status.json").read_text())


def _write(path: Path, data: bytes) -> None:
    target = path / "status.json"
    if target.is_symlink() or target.exists():
        target.unlink()
    target.write_bytes(data)


def _set(path: Path, **fields) -> None:
    status = _status(path)
    for dotted, value in fields.items():
        where = status
        *parents, last = dotted.split("__")
        for key in parents:
            where = where[key]
        where[last] = value
    _write(path, json.dumps(status).encode())


def _replace_with(path: Path, make) -> None:
    (path / "status.json").unlink()
    make(path / "status.json")


STATUS_CORRUPTIONS = {
    "random bytes": lambda p, rng: _write(p, rng.randbytes(rng.randint(1, 300))),
    "truncated": lambda p, rng: _write(p, (p / "status.json").read_bytes()[:rng.randint(1, 40)]),
    "a JSON list": lambda p, rng: _write(p, b"[1, 2, 3]"),
    "a JSON string": lambda p, rng: _write(p, b'"finished"'),
    "null": lambda p, rng: _write(p, b"null"),
    "round is a string": lambda p, rng: _set(p, progress__round="7"),
    "rounds is negative": lambda p, rng: _set(p, progress__rounds=-1),
    "state unknown": lambda p, rng: _set(p, state="exploded"),
    "state missing": lambda p, rng: _write(p, json.dumps({k: v for k, v in _status(p).items()
                                                           if k != "state"}).encode()),
    "pid is a dict": lambda p, rng: _set(p, pid={"a": 1}),
    "pid is negative": lambda p, rng: _set(p, pid=-1),
    "started is a list": lambda p, rng: _set(p, started=[1]),
    "started is inf": lambda p, rng: _write(p, (p / "status.json").read_bytes().replace(
        b'"started": 1', b'"started": 1e999', 1)),
    "progress is a list": lambda p, rng: _set(p, progress=[1, 2]),
    "invalid UTF-8": lambda p, rng: _write(p, (p / "status.json").read_bytes().replace(b'"demo"', b'"d\xffmo"', 1)),
    "NUL bytes": lambda p, rng: _write(p, b"\x00" * 64),
    "deep nesting": lambda p, rng: _write(p, b'{"state": "finished", "x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"),
    "empty": lambda p, rng: _write(p, b""),
    "huge": lambda p, rng: _write(p, b'{"state": "finished", "pad": "' + b"x" * (2 << 20) + b'"}'),
    "a directory": lambda p, rng: _replace_with(p, lambda t: t.mkdir()),
    "a symlink loop": lambda p, rng: _replace_with(p, lambda t: os.symlink(t.name, t)),
    "a dangling symlink": lambda p, rng: _replace_with(p, lambda t: os.symlink("nowhere.json", t)),
    "a FIFO": lambda p, rng: _replace_with(p, lambda t: os.mkfifo(t)),
    "missing (events only)": lambda p, rng: (p / "status.json").unlink(),
}


def _insert_lines(path: Path, lines: list[bytes], rng: random.Random) -> None:
    file = path / "metrics.jsonl"
    have = file.read_bytes().split(b"\n")[:-1]
    for line in lines:
        have.insert(rng.randint(0, len(have)), line)
    file.write_bytes(b"\n".join(have) + b"\n")


BAD_LINES = [
    b"not json at all",
    b"[1, 2]",
    b'"a string"',
    b'{"v": 1, "kind": "metric", "round": "3", "train_loss": 0.1}',
    b'{"v": 1, "kind": "metric", "round": 3, "train_loss": {"a": 1}}',
    b'{"v": 1, "kind": "metric", "round": -3}',
    b'{"v": 1, "kind": "metric", "round": 3, "train_loss": 1' + b"0" * 5000 + b"}",
    b'{"v": 1, "kind": "block", "round": 1, "block": "x"}',
    b'{"v": 1, "kind": "measure", "round": 1, "unit": "u", "value": {"deep": [[[1]]]}}',
    b'{"v": 2, "kind": "metric", "round": 1}',
    b'{"kind": "metric", "round": 1}',
    b'{"v": 1, "kind": "end", "state": 5}',
    b'{"v": 1, "kind": "metric", "round": 1, "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    b'{"v": 1, "kind": "metric", "round": 1, "train_loss": "\xff\xfe"}',
    b"\x00\x00\x00",
    b'{"v": 1, "kind": "metric", "t": 1e999, "round": 1}',
]

EVENT_CORRUPTIONS = {
    "bad lines": lambda p, rng: _insert_lines(p, rng.sample(BAD_LINES, rng.randint(1, 4)), rng),
    "random bytes line": lambda p, rng: _insert_lines(p, [rng.randbytes(rng.randint(1, 200)).replace(b"\n", b"")
                                                          or b"x"], rng),
}


def corrupt(path: Path, rng: random.Random) -> str:
    """Break run `path` one way (chosen by rng) so that it is unreadable; maybe spoil its events too.
    Returns the name of the status corruption."""
    name = rng.choice(sorted(STATUS_CORRUPTIONS))
    if rng.random() < 0.5:
        rng.choice(list(EVENT_CORRUPTIONS.values()))(path, rng)
    STATUS_CORRUPTIONS[name](path, rng)
    return name


def corrupted_runs_dir(runs_dir: Path, n: int, n_bad: int, seed: int = 0) -> tuple[list[Path], dict[Path, str]]:
    """n runs of which n_bad (chosen at random) are corrupted: (healthy paths, {corrupted path: how})."""
    rng = random.Random(seed)
    paths = [healthy_run(runs_dir, i) for i in range(n)]
    bad = rng.sample(paths, n_bad)
    how = {p: corrupt(p, rng) for p in bad}
    return [p for p in paths if p not in how], how
