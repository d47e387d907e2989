"""Plugins: a researcher's own models, datasets, solvers, stoppers and measurement units, named in a recipe by
dotted path ("package.module:name", or "package.module.name") and resolved here, for every kind alike.

`resolve` imports the object and checks it is of the kind the recipe key asks for; `check_call` checks that
the call the engine will make fits the object's signature; `returned` checks what a call gave back. Every
failure is one `PluginError` line (a RecipeError: `bcdcore` exits 2) naming the key, the path and the fix.
Objects handed to the Python API (`bcdcore.train(model=...)`) are resolved under a `live:` name in the same
process. `add_plugin_dirs` puts folders on sys.path and on PYTHONPATH, so every process the run starts
(sweep points, distributed ranks, TUI launches) imports the same plugins.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any

from bcdcore.recipe import RecipeError

# What each kind is called by, for messages (the documented contracts, docs/plugins.md).
CONTRACTS = {
    "model": "a function build(input_shape, n_outputs, **args) returning an nn.Module",
    "data": "a function load(**args) returning a bcdcore.data.DataBundle",
    "solver": "a solver class Solver(**args) with n_state and step(x, g, a, state, *, lr, lam, step) -> (r2, d2)",
    "stopper": "a stopper class Stopper(**keys) with update(metrics, wall_s) -> None | (state, reason)",
    "measure": "a measurement class with measure(ctx)",
}
# The method that marks a class as one kind (a model or data function has none of them).
MARKERS = {"solver": "step", "stopper": "update", "measure": "measure"}

LIVE_PREFIX = "live:"
_live: dict[str, Any] = {}  # live name -> object handed to the Python API in this process


class PluginError(RecipeError):
    """A plugin that cannot be used, as the one line the user sees."""


def is_dotted(name: str) -> bool:
    """Whether a recipe name is a plugin path rather than a built-in name (built-ins have no '.' or ':')."""
    return isinstance(name, str) and (":" in name or "." in name)


def live_name(obj: Any, kind: str) -> str:
    """A name under which `obj` resolves in this process (objects given to bcdcore.train)."""
    name = f"{LIVE_PREFIX}{kind}-{getattr(obj, '__name__', type(obj).__name__)}-{id(obj):x}"
    _live[name] = obj
    return name


def split_path(path: str, where: str) -> tuple[str, str]:
    module, sep, attr = path.partition(":")
    if not sep:
        module, _, attr = path.rpartition(".")
    if not module or not attr or not all(part.isidentifier() for part in (*module.split("."), *attr.split("."))):
        raise PluginError(f"{where} = {path!r}: a plugin path is 'package.module:name' (Python identifiers "
                          f"separated by dots)")
    return module, attr


def import_object(path: str, where: str) -> Any:
    """The object at `path`, imported; one PluginError line when it is not there."""
    if path.startswith(LIVE_PREFIX):
        if path not in _live:
            raise PluginError(f"{where} = {path!r}: a Python object given to bcdcore.train in another process; "
                              f"run it again from Python, or name an importable 'package.module:name'")
        return _live[path]
    module_name, attr = split_path(path, where)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PluginError(f"{where} = {path!r}: cannot import module {module_name!r} ({exc}); put its folder on "
                          f"PYTHONPATH or pass --plugins DIR") from None
    except Exception as exc:  # the user's module raised while importing: still one line
        raise PluginError(f"{where} = {path!r}: importing {module_name!r} failed: {type(exc).__name__}: "
                          f"{first_line(exc)}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PluginError(f"{where} = {path!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def kind_of(obj: Any) -> str:
    """What an object looks like: 'solver', 'stopper', 'measure' (classes with their method), 'model' (an
    nn.Module class or instance), 'function' (any other callable), or 'value' (not callable)."""
    cls = obj if inspect.isclass(obj) else type(obj)
    for kind, method in MARKERS.items():
        if callable(getattr(cls, method, None)):
            return kind
    if is_module(obj):
        return "model"
    return "function" if callable(obj) else "value"


def is_module(obj: Any) -> bool:
    torch_nn = sys.modules.get("torch.nn")  # only an object of an imported torch can be a module
    if torch_nn is None:
        return False
    return isinstance(obj, torch_nn.Module) or (inspect.isclass(obj) and issubclass(obj, torch_nn.Module))


def resolve(path: str, kind: str, where: str) -> Any:
    """The plugin at `path` for recipe key `where`, checked to be of `kind` (model, data, solver, stopper,
    measure)."""
    obj = import_object(path, where)
    found = kind_of(obj)
    wanted = {"model": ("model", "function"), "data": ("function",)}.get(kind, (kind,))
    if found not in wanted:
        what = {"value": f"the {type(obj).__name__} {repr(obj)[:40]}", "function": "a function",
                "model": "an nn.Module"}.get(found, f"a {found} class")
        raise PluginError(f"{where} = {path!r} is {what}, not a {kind} plugin; {where} needs {CONTRACTS[kind]}")
    return obj


def check_call(obj: Any, path: str, where: str, kind: str, *args: Any, **kwargs: Any) -> None:
    """The call the engine will make, `obj(*args, **kwargs)`, checked against obj's signature first, so a
    wrong parameter list is one line naming the parameters, not a TypeError from inside the user's code."""
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):  # builtins without a signature: the call itself will tell
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        given = ", ".join([*(f"<{i}>" for i in range(len(args))), *kwargs]) or "no arguments"
        raise PluginError(f"{where} = {path!r}: bad signature {obj_name(obj)}{signature}: {exc} (called with "
                          f"{given}); {where} needs {CONTRACTS[kind]}") from None


def call(obj: Any, path: str, where: str, kind: str, *args: Any, **kwargs: Any) -> Any:
    """Check the signature, then call; an exception raised by the plugin becomes one line."""
    check_call(obj, path, where, kind, *args, **kwargs)
    try:
        return obj(*args, **kwargs)
    except RecipeError:
        raise
    except Exception as exc:
        raise PluginError(f"{where} = {path!r} raised {type(exc).__name__}: {first_line(exc)}") from None


def returned(value: Any, expected: type | tuple[type, ...], path: str, where: str, kind: str) -> Any:
    if not isinstance(value, expected):
        raise PluginError(f"{where} = {path!r} returned {type(value).__name__}, not "
                          f"{getattr(expected, '__name__', expected)}; {where} needs {CONTRACTS[kind]}")
    return value


def obj_name(obj: Any) -> str:
    return getattr(obj, "__qualname__", type(obj).__name__)


def first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else ""


def add_plugin_dirs(dirs: list[str] | tuple[str, ...]) -> None:
    """Make `dirs` importable here and in every process started from here (PYTHONPATH is inherited)."""
    for d in reversed([os.path.abspath(os.path.expanduser(str(d))) for d in dirs]):
        if not os.path.isdir(d):
            raise PluginError(f"--plugins {d}: no such folder; give the folder that holds your package")
        if d not in sys.path:
            sys.path.insert(0, d)
    share_sys_path()


def share_sys_path() -> None:
    """Put this process's own sys.path additions (folders outside the interpreter's installation: the
    current directory of `python -m`, --plugins, a notebook's sys.path.append) on PYTHONPATH, so that child
    processes, which start with only the interpreter's defaults, can import the same plugins."""
    prefixes = tuple(os.path.abspath(p) for p in {sys.prefix, sys.base_prefix, sys.exec_prefix})
    extra = []
    for entry in sys.path:
        path = os.path.abspath(entry or os.getcwd())
        if os.path.isdir(path) and not path.startswith(prefixes) and path not in extra:
            extra.append(path)
    current = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([*extra, *current]))

