"""The one registry of measurement units: built-in names (BUILTIN) and third-party classes by dotted path.
"""
from __future__ import annotations

from bcdcore.measure.gradnorm import GradNorm
from bcdcore.measure.hessian import HessianBlocks, HessianDense
from bcdcore.measure.memory import MemoryUsage
from bcdcore.measure.protocol import Measurement
from bcdcore.plugins import import_object
from bcdcore.recipe import did_you_mean

BUILTIN: dict[str, type] = {
    "memory": MemoryUsage,
    "hessian_dense": HessianDense,
    "hessian_blocks": HessianBlocks,
    "grad_norm": GradNorm,
}


def load_unit(unit: str, **options) -> Measurement:
    """The measurement named `unit`: a built-in name (`BUILTIN`), or a dotted path to a class,
    "package.module:Class" or "package.module.Class" (the module must be importable), instantiated with
    `options` as keyword arguments. Raises ValueError with one clear line otherwise."""
    if not isinstance(unit, str) or not unit.strip():
        raise ValueError(f"measure unit must be a non-empty string, got {unit!r}")
    unit = unit.strip()
    known = ", ".join(BUILTIN)
    if unit in BUILTIN:
        cls = BUILTIN[unit]
    elif ":" in unit or "." in unit:
        cls = import_class(unit)
    else:
        hint = did_you_mean(unit, BUILTIN)
        raise ValueError(f"unknown measure unit {unit!r}{hint}; built-in units: {known}; or a dotted path to "
                         f"a class, 'package.module:Class'")
    try:
        obj = cls(**options) if isinstance(cls, type) else cls
    except TypeError as exc:
        raise ValueError(f"measure unit {unit!r}: cannot create it: {exc}") from None
    if not callable(getattr(obj, "measure", None)):
        raise ValueError(f"measure unit {unit!r} is not a measurement: it needs a measure(ctx) method")
    if not isinstance(getattr(obj, "name", None), str) or not obj.name:
        try:
            obj.name = unit
        except AttributeError:
            raise ValueError(f"measure unit {unit!r} needs a string attribute 'name'") from None
    return obj


def import_class(unit: str):
    """The object at a dotted path (the one resolver of every plugin kind: bcdcore.plugins)."""
    return import_object(unit, "measure.unit")
