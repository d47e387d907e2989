"""The schema of a run directory's records: status.json and every event kind of metrics.jsonl (version 1).

Every reader (bcdcore ls, plot, --resume's check, sweeps, the launcher's end of a run, every bcdtui screen)
takes records through here (by way of bcdcore.runfiles and bcdcore.rundir), so that what a reader sees is
typed: a round is an int >= 0, a loss is a float (nan/inf included), a pid is a positive int. Anything else is
rejected with `RecordError`, whose message is the one line a user sees ("status.json: progress.round must be
an integer >= 0, got 'x'"). A bad event line is skipped and counted by the caller; a bad status.json makes the
run `unreadable: <reason>`.

The writer stores non-finite floats as the strings "nan", "inf", "-inf" (JSON has no such numbers); they read
back as floats here. Fields a version-1 reader does not know are kept when they are plain JSON of bounded depth
(plugins add their own), so that a newer writer's records still read. Strings are made printable (a terminal
shows them). No torch, no numpy: the TUI imports this.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, Callable

EVENT_VERSION = 1
STATES = ("queued", "running", "finished", "failed", "killed")
EVENT_KINDS = ("start", "metric", "block", "measure", "end")
NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
MAX_INT = 2 ** 63 - 1  # what the writer can produce (and numpy can hold)
MAX_PID = 2 ** 31 - 1
MAX_TIME = 253402300799.0  # unix seconds of 9999-12-31: what a datetime (and every reader's clock) can show
MAX_DEPTH = 16  # nesting of any value; deeper JSON is a bad record, never a RecursionError later
MAX_STATUS_BYTES = 1 << 20  # a real status.json is a few hundred bytes
MAX_LINE_BYTES = 64 << 20  # a measurement matrix can be large; a line beyond this is skipped unparsed


class RecordError(ValueError):
    """A record that does not follow the schema; the message is one line naming the field (dotted when nested:
    `progress.round must be an integer >= 0, got '7'`)."""

    def __init__(self, message: str, field: str = "", detail: str = "") -> None:
        super().__init__(message)
        self.field, self.detail = field, detail


# ----------------------------------------------------------------------------------------------------------
# decoding bytes

def decode_object(raw: bytes | str, what: str = "record") -> dict:
    """One JSON object from raw bytes: strict UTF-8, any JSON error or nesting as a RecordError."""
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RecordError(f"{what}: not UTF-8 (bad byte at offset {exc.start})") from None
    else:
        text = raw
    if "\x00" in text:
        raise RecordError(f"{what}: contains NUL bytes")
    try:
        data = json.loads(text)
    except RecursionError:
        raise RecordError(f"{what}: JSON nested too deeply") from None
    except ValueError as exc:  # json.JSONDecodeError, and int strings past Python's digit limit
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RecordError(f"{what}: not valid JSON ({first[:120]})") from None
    if not isinstance(data, dict):
        kind = _kind(data)
        raise RecordError(f"{what}: not a JSON object ({kind if data is None else 'a ' + kind})")
    return data


def _kind(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return "an object" if isinstance(value, dict) else "a list"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ----------------------------------------------------------------------------------------------------------
# field checks: each returns the normalised value or raises RecordError(reason without the field name)

def _bad(expected: str, value: Any) -> RecordError:
    return RecordError(f"must be {expected}, got {_show(value)}")


def integer(lo: int = 0, hi: int = MAX_INT) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise _bad(f"an integer >= {lo}" if hi == MAX_INT else f"an integer in [{lo}, {hi}]", value)
        return value
    return check


def number(finite: bool = False, lo: float = -math.inf, hi: float = math.inf) -> Callable[[Any], float | int]:
    """A JSON number (int kept as int), or with finite=False also the writer's "nan"/"inf"/"-inf" strings."""
    def check(value: Any) -> float | int:
        if isinstance(value, str) and not finite and value in NONFINITE:
            return NONFINITE[value]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad("a number", value)
        if isinstance(value, int) and abs(value) > MAX_INT:
            raise _bad("a number within 64 bits", value)  # float() of a longer int would overflow later
        if finite and not math.isfinite(value):
            raise _bad("a finite number", value)
        if value < lo or value > hi:  # nan compares false: a nan loss passes
            raise _bad(f"a number >= {_g(lo)}" if hi == math.inf else f"a number in [{_g(lo)}, {_g(hi)}]", value)
        return value
    return check


def printable(value: str) -> str:
    """Text safe to show on a terminal: control characters (an ESC could drive the terminal), format characters
    and lone surrogates (undecodable bytes of a file name) become backslash escapes."""
    if value.isprintable():
        return value
    out = []
    for ch in value:
        if ch.isprintable():
            out.append(ch)
        elif 0xDC80 <= ord(ch) <= 0xDCFF:  # os.fsdecode's escape of an undecodable byte
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def _g(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


def version(value: Any) -> int:
    if value != EVENT_VERSION or isinstance(value, bool) or not isinstance(value, int):
        raise RecordError(f"has version {_show(value)}; this reader reads version {EVENT_VERSION}")
    return value


def text(max_len: int = 4096) -> Callable[[Any], str]:
    """A string, made printable (readers show these on terminals) and cut at max_len characters."""
    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise _bad("a string", value)
        value = printable(value)
        return value if len(value) <= max_len else value[:max_len - 1] + "…"
    return check


def name(pattern: str = r"[\w.:/+-]{1,200}") -> Callable[[Any], str]:
    """An identifier-like string (a measurement unit, a metric name): shown in titles, so no markup or spaces."""
    compiled = re.compile(pattern, re.ASCII)

    def check(value: Any) -> str:
        if not isinstance(value, str) or not compiled.fullmatch(value):
            raise _bad("a plain name (letters, digits, _ . : / + -)", value)
        return value
    return check


def one_of(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices or not isinstance(value, str):
            raise _bad(f"one of {', '.join(choices)}", value)
        return value
    return check


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad("true or false", value)
    return value


def list_of(item: Callable[[Any], Any], max_len: int = 1 << 20) -> Callable[[Any], list]:
    def check(value: Any) -> list:
        if not isinstance(value, list) or len(value) > max_len:
            raise _bad("a list", value)
        out = []
        for i, v in enumerate(value):
            try:
                out.append(item(v))
            except RecordError as exc:
                raise RecordError(f"item {i} {exc}") from None
        return out
    return check


def optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else check(value)


def plain(value: Any, depth: int = 0) -> Any:
    """Any JSON value of bounded depth (fields this version does not know, plugin output)."""
    if depth > MAX_DEPTH:
        raise RecordError(f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        return {printable(str(k)): plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v, depth + 1) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
        raise _bad("a number within 64 bits", value)
    if isinstance(value, str):
        return printable(value)
    return value


_value = optional(number())


def measure_value(value: Any) -> Any:
    """A measurement: a number, a list of numbers or a matrix (list of lists); nan where a cell is null."""
    if not isinstance(value, list):
        return _value(value)
    if value and all(isinstance(row, list) for row in value):
        return list_of(list_of(_value))(value)
    return list_of(_value)(value)


def table(spec: dict[str, Callable[[Any], Any]], required: tuple[str, ...] = ()) -> Callable[[Any], dict]:
    """An object whose known fields follow `spec`; unknown fields are kept as plain JSON."""
    def check(value: Any) -> dict:
        if not isinstance(value, dict):
            raise _bad("an object", value)
        out = {}
        for key in required:
            if key not in value:
                raise RecordError(f"{key} is missing", key, "is missing")
        for key, v in value.items():
            rule = spec.get(key, plain)
            try:
                out[key] = rule(v)
            except RecordError as exc:
                field = f"{printable(key)}.{exc.field}" if exc.field else printable(key)
                detail = exc.detail if exc.field else str(exc)
                raise RecordError(f"{field} {detail}", field, detail) from None
        return out
    return check


# ----------------------------------------------------------------------------------------------------------
# status.json

_time = optional(number(finite=True, lo=0, hi=MAX_TIME))
_str = optional(text())

STATUS = table({
    "state": one_of(STATES), "run_id": _str, "recipe": _str, "pid": optional(integer(1, MAX_PID)),
    "host": _str, "gpu": _str, "started": _time, "ended": _time, "exit_code": optional(integer(-MAX_INT)),
    "error": _str, "world_size": optional(integer(1)), "launcher_pid": optional(integer(1, MAX_PID)),
    "progress": optional(table({"round": integer(), "rounds": integer()})),
}, required=("state",))


def check_status(data: Any) -> dict:
    """The fields of a status.json object, typed (RecordError names the first bad field)."""
    return STATUS(data)


def parse_status(raw: bytes | str) -> dict:
    """status.json's bytes as a checked status; RecordError("status.json: ...") otherwise."""
    data = decode_object(raw, "status.json")
    try:
        return check_status(data)
    except RecordError as exc:
        raise RecordError(f"status.json: {exc}") from None


# ----------------------------------------------------------------------------------------------------------
# events

_count = number(finite=True, lo=0)
_metric_value = optional(number())

EVENTS: dict[str, Callable[[Any], dict]] = {
    "start": table({"run_id": _str, "recipe": _str, "n_blocks": optional(integer()),
                    "block_sizes": optional(list_of(integer())), "device": _str, "backend": _str, "mode": _str,
                    "resumed_from_round": optional(integer()), "world_size": optional(integer(1)),
                    "dist_backend": _str, "block_owner": optional(list_of(integer())), "exchange": _str}),
    "metric": table({"round": integer(), "grad_evals": optional(_count), "samples": optional(_count),
                     "bytes_comm": optional(_count), "wall_s": optional(_count), "bytes_round": optional(_count),
                     "comm_sim_s": _metric_value, "sim_time_s": _metric_value, "train_loss": _metric_value},
                    required=("round",)),
    "block": table({"round": integer(), "block": integer(), "inner_steps": optional(integer()),
                    "stopped_early": optional(boolean), "residual": _metric_value, "threshold": _metric_value,
                    "dist": _metric_value, "lambda": _metric_value, "gamma": _metric_value},
                   required=("round", "block")),
    "measure": table({"unit": name(), "round": integer(), "value": measure_value, "figure": _str, "path": _str},
                     required=("unit", "round")),
    # an end event's state is only shown (status.json's state is what readers act on): any plain name reads
    "end": table({"state": name(r"[a-z_]{1,32}"), "reason": _str}, required=("state",)),
}

# the writer always stamps `t`; a reader needs only v and kind, so a line without t still reads
_metric_name = name(r"(val|test)_\w{1,100}")
_ENVELOPE = table({"v": version, "kind": text(64), "t": number(finite=True, lo=0, hi=MAX_TIME)},
                  required=("v", "kind"))


def check_event(data: Any) -> dict:
    """One event object, typed: the envelope (v, kind, t) and the fields of its kind. Metric values named
    val_* / test_* are numbers like train_loss. An unknown kind keeps its plain fields (a newer writer)."""
    if not isinstance(data, dict):
        raise _bad("an object", data)
    envelope = {k: data[k] for k in ("v", "kind", "t") if k in data}
    _ENVELOPE(envelope)
    kind = data["kind"]
    rule = EVENTS.get(kind)
    if rule is None:
        return table({})(data)
    out = rule(data)
    if kind == "metric":
        for key, value in out.items():
            if key.startswith(("val_", "test_")):
                try:
                    _metric_name(key)
                    out[key] = _metric_value(value)
                except RecordError as exc:
                    raise RecordError(f"{printable(key)} {exc}") from None
    out.update(envelope)
    return out


def parse_event(raw: bytes | str) -> dict:
    """One metrics.jsonl line as a checked event; RecordError with the reason otherwise."""
    data = decode_object(raw, "event")
    try:
        return check_event(data)
    except RecordError as exc:
        kind = data.get("kind")
        label = f"{kind} event" if isinstance(kind, str) and kind in EVENT_KINDS else "event"
        raise RecordError(f"{label}: {exc}") from None
