"""The recipe side of plugins (pure Python, nothing imported): which names are plugin paths, the `args` tables,
the `[model] blocks` partition rule, plugin stoppers' keys and `SECTION.args.KEY` sweep keys. Importing and
checking the plugin itself is bcdcore.plugins' work, at `bcdcore check` / run time.
"""
from __future__ import annotations

import re
from typing import Any, Protocol

from bcdcore.recipe.schema import RecipeError, show_value


class Validator(Protocol):
    """What these checks use of bcdcore.recipe.validate.Validator (named here, not imported: validate imports
    this module)."""

    def fail(self, dotted: str, message: str) -> RecipeError: ...

    def typed(self, dotted: str, value: Any, kind: str) -> Any: ...

    def choice(self, dotted: str, value: Any, choices) -> str: ...

# "package.module:name" or "package.module.name": identifiers separated by dots, at most one ':'
_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*(:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*)?")
ARGS_SECTIONS = ("model", "data", "algorithm")  # sections with an [X.args] table
TORCHVISION = "torchvision:"  # [model] name = "torchvision:resnet50": a torchvision.models builder (bcdcore.models)
BLOCK_RULES = ("auto", "children")


def is_plugin(name: Any) -> bool:
    """A plugin path (built-in names have neither '.' nor ':')."""
    return isinstance(name, str) and (":" in name or "." in name)


def plugin_names(recipe) -> list[tuple[str, str]]:
    """(recipe key, plugin path) for every plugin a recipe names: what `bcdcore check` imports and checks, and
    what bcdtui's launch dialog looks for on the path."""
    keys = [("model.name", recipe.model.name), ("data.name", recipe.data.name),
            ("algorithm.solver", recipe.algorithm.solver)]
    keys += [("stop.kind", s.kind) for s in recipe.stop] + [("measure.unit", m.unit) for m in recipe.measure]
    return [(key, name) for key, name in keys if is_plugin(name)]


def check_name(v: Validator, dotted: str, value: Any, choices) -> str:
    """A built-in name from `choices`, or a well-formed plugin path (imported later, by bcdcore check)."""
    value = v.typed(dotted, value, "str")
    if is_plugin(value):
        live = value.startswith("live:") and re.fullmatch(r"live:[\w.\-]+", value)  # bcdcore.train's objects
        if not live and not _PATH.fullmatch(value):
            raise v.fail(dotted, f"{value!r} is not a plugin path; write 'package.module:name' (Python "
                                 f"identifiers separated by dots)")
        return value
    return v.choice(dotted, value, choices) if choices else value


def check_args(v: Validator, dotted: str, value: Any) -> dict:
    """An `args` table: keyword arguments (identifier keys, any TOML values) passed to a plugin."""
    if not isinstance(value, dict):
        raise v.fail(dotted, f"expected a table [{dotted}] of keyword arguments, got {show_value(value)}")
    for key in value:
        if not str(key).isidentifier():
            raise v.fail(f"{dotted}.{key}", "is not a Python keyword argument name (letters, digits, '_')")
    return dict(value)


def check_blocks(v: Validator, dotted: str, value: Any) -> str | list[str]:
    """`[model] blocks`: "auto", "children", or a non-empty list of "prefix|prefix" entries."""
    if isinstance(value, str):
        if value not in BLOCK_RULES:
            raise v.fail(dotted, f"unknown rule {value!r}; use \"auto\", \"children\" or a list of module-name "
                                 f"prefixes, e.g. [\"conv1|bn1\", \"layer1\", \"fc\"]")
        return value
    if not isinstance(value, list) or not value:
        raise v.fail(dotted, f"expected \"auto\", \"children\" or a non-empty list of prefixes, got "
                             f"{show_value(value)}")
    seen: set[str] = set()
    for i, entry in enumerate(value):
        entry = v.typed(f"{dotted}[{i}]", entry, "str")
        for prefix in entry.split("|"):
            if not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", prefix.strip()):
                raise v.fail(dotted, f"entry {entry!r}: {prefix!r} is not a module name (like layer1 or "
                                     f"features.0); separate prefixes with '|'")
            if prefix.strip() in seen:
                raise v.fail(dotted, f"prefix {prefix.strip()!r} is listed twice; each prefix names one block")
            seen.add(prefix.strip())
    return list(value)


def field_value(v: Validator, dotted: str, value: Any, hint: str) -> Any | None:
    """The plugin fields' values (None: not a plugin field)."""
    if hint == "dict":
        return check_args(v, dotted, value)
    if hint == "str | list[str]":
        return check_blocks(v, dotted, value)
    return None


def check_plugin_keys(v: Validator, recipe) -> None:
    """args and blocks only where a plugin reads them."""
    m = recipe.model
    if not is_plugin(m.name):
        if m.args:
            raise v.fail("model.args", f"applies to plugin models ('package.module:build'), not {m.name!r}; "
                                       f"remove it")
        if m.blocks != "auto":
            raise v.fail("model.blocks", f"applies to plugin and torchvision models, not {m.name!r} (its blocks "
                                         f"are built in; use model.group to merge them); remove it")
    if recipe.data.args and not is_plugin(recipe.data.name):
        raise v.fail("data.args", f"applies to plugin datasets ('package.module:load'), not "
                                  f"{recipe.data.name!r}; remove it")
    if recipe.algorithm.args and not is_plugin(recipe.algorithm.solver):
        raise v.fail("algorithm.args", f"applies to plugin solvers ('package.module:Solver'), not "
                                       f"{recipe.algorithm.solver!r}; remove it")


def model_key_users(name: str, users: tuple[str, ...], key: str) -> bool:
    """Whether model option `key` applies to model `name` (torchvision and plugin models read weights)."""
    return name in users or (key == "weights" and is_plugin(name))


def plugin_stop(v: Validator, raw: dict, stop_cls) -> Any:
    """A plugin stopper: kind is its path, every other key one of its keyword arguments."""
    kind = check_name(v, "stop.kind", raw["kind"], ())
    return stop_cls(kind=kind, args=check_args(v, "stop", {k: val for k, val in raw.items() if k != "kind"}))


def sweep_key(key: str, tables: tuple[str, ...]) -> list[str] | None:
    """A sweep key's parts: SECTION.KEY, or SECTION.args.KEY for a plugin's argument (None: malformed)."""
    parts = key.split(".")
    if len(parts) == 2 and parts[0] in tables:
        return parts
    if len(parts) == 3 and parts[0] in ARGS_SECTIONS and parts[1] == "args" and parts[2].isidentifier():
        return parts
    return None


def set_key(raw: dict, parts: list[str], value: Any) -> None:
    """Set a (possibly nested) recipe key in raw TOML data."""
    table = raw
    for part in parts[:-1]:
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            raise RecipeError(f"{'.'.join(parts)}: [{part}] is not a table in the recipe")
    table[parts[-1]] = value

