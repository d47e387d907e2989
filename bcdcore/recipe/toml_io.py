"""Recipe files in and out: reading (size, UTF-8, nesting), `--set KEY=VALUE` overrides, and writing the
resolved recipe as TOML.
"""
from __future__ import annotations

import copy
import math
import re
import tomllib
from pathlib import Path
from typing import Any

from bcdcore.recipe.plugin_keys import set_key, sweep_key
from bcdcore.recipe.schema import Recipe, RecipeError
from bcdcore.recipe.validate import SECTIONS, TABLES, Validator, did_you_mean


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override (`section.key=value`) and validate one recipe file."""
    path = Path(path)
    text = read_recipe_text(path)
    raw = parse_toml(text, str(path))
    return parse_recipe(raw, source=str(path), text=text, overrides=overrides)


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few hundred lines; anything far larger is not one


def read_recipe_text(path: Path) -> str:
    """The text of a recipe file, or a RecipeError naming what is wrong with the file itself."""
    try:
        if not path.exists():
            raise RecipeError(f"{path}: no such recipe file; pass the path of a .toml recipe")
        if path.is_dir():
            raise RecipeError(f"{path}: not a file; pass the path of a .toml recipe")
        if not path.is_file():  # a FIFO or a device: never opened (reading a FIFO would block)
            raise RecipeError(f"{path}: not a regular file; pass the path of a .toml recipe")
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise RecipeError(f"{path}: {path.stat().st_size} bytes is too large for a recipe "
                              f"(at most {MAX_RECIPE_BYTES}); is it the right file?")
        data = path.read_bytes()
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read the recipe: {os_reason(exc)}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text (byte {exc.start}); save the recipe as UTF-8") from None


def parse_toml(text: str, source: str) -> dict:
    """TOML text to a dict; malformed, too deeply nested or empty recipes are one RecipeError line."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{source}: not valid TOML: {exc}") from None
    except RecursionError:
        raise RecipeError(f"{source}: not a recipe: values nested too deeply") from None
    if not raw:
        raise RecipeError(f"{source}: the recipe is empty; start from recipes/quickstart.toml "
                          "(at least [run] name and [data] name)")
    return raw


def os_reason(exc: OSError, with_path: bool = True) -> str:
    """An OSError as the words a user needs: 'no space left on device', 'permission denied: PATH' (the path
    left out where the caller names the file already)."""
    words = (exc.strerror or str(exc) or type(exc).__name__).strip()
    words = words[:1].lower() + words[1:]
    return f"{words}: {exc.filename}" if exc.filename and with_path else words


def parse_recipe(raw: dict, source: str = "<recipe>", text: str = "",
                 overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    raw = copy.deepcopy(raw)
    for item in overrides:
        apply_override(raw, item)
    overridden = {item.split("=", 1)[0].strip() for item in overrides}
    return Validator(source, text, overridden).recipe(raw)


def parse_value(text: str) -> Any:
    """A `--set` value: any TOML value (5, 0.1, true, [1, 2], "s"), else the bare text as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. --set algorithm.K=5")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    if parts[0] in LISTS:
        if len(parts) != 1:
            raise RecipeError(f"--set {key!r}: [[{parts[0]}]] is a list of tables; replace it whole, e.g. "
                              f"{LISTS[parts[0]]}, or clear it with --set {parts[0]}=[]")
        raw[parts[0]] = _table_list(parts[0], value.strip())  # checked like the file's (Validator.array)
        return
    if len(parts) == 3 and sweep_key(key.strip(), TABLES):  # a plugin's argument: model.args.depth
        set_key(raw, parts, parse_value(value.strip()))
        return
    if len(parts) != 2 or not all(parts):
        lists = did_you_mean(parts[0], LISTS) if len(parts) == 1 else ""
        raise RecipeError(f"--set {key!r}: expected SECTION.KEY, e.g. algorithm.K (or SECTION.args.KEY){lists}")
    section, name = parts
    if section in SECTIONS and SECTIONS[section] is None:
        raise RecipeError(f"--set {key!r}: [{section}] cannot be set from the command line; edit the recipe")
    if section not in SECTIONS:
        raise RecipeError(f"--set {key!r}: unknown section [{section}]{did_you_mean(section, TABLES + tuple(LISTS))}")
    table = raw.setdefault(section, {})
    if not isinstance(table, dict):
        raise RecipeError(f"--set {key!r}: [{section}] is not a table in the recipe")
    table[name] = parse_value(value.strip())


# the arrays of tables `--set` replaces whole (an item cannot be named by a dotted key): an example of each
LISTS = {"stop": "--set 'stop=[{kind=\"patience\", patience=5}]'",
         "measure": "--set 'measure=[{unit=\"grad_norm\", every=10}]'"}


def _table_list(section: str, text: str) -> list:
    """The value of `--set stop=...`: a TOML array of inline tables (the Validator checks each table)."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"--set {section}: not a TOML array of inline tables ({exc}); e.g. {LISTS[section]}, "
                          f"or --set {section}=[]") from None
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise RecipeError(f"--set {section}: expected an array of inline tables, e.g. {LISTS[section]}, "
                          f"or --set {section}=[]")
    return value


def per_block(value: float | list[float] | str, n_blocks: int) -> list[float]:
    """One value per block; "auto" (lambda) starts at 0 until the run measures it."""
    if value == "auto":
        return [0.0] * n_blocks
    return list(value) if isinstance(value, list) else [float(value)] * n_blocks


def to_toml(data: dict) -> str:
    lines: list[str] = []
    for section, table in data.items():
        if isinstance(table, list):
            for item in table:
                lines.append(f"[[{section}]]")
                lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in item.items()]
                lines.append("")
        else:
            lines.append(f"[{section}]")
            lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
            lines.append("")
            for key, sub in ((k, v) for k, v in table.items() if isinstance(v, dict)):  # [model.args]
                lines.append(f"[{section}.{toml_key(key)}]")
                lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in sub.items()]
                lines.append("")
    return "\n".join(lines)


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else toml_string(key)


def toml_string(text: str) -> str:
    """A TOML basic string. Not json.dumps: JSON writes characters beyond U+FFFF as surrogate pairs, which TOML
    refuses, and leaves DEL raw, which TOML forbids; TOML takes every other character as it is."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table (a plugin argument that is itself a table)
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")
