"""Validation of a parsed recipe, section by section: unknown keys (with a "did you mean"), types, ranges,
sizes that would overflow, and cross-section rules; each error is one RecipeError line naming file, line and key.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
from pathlib import Path
from typing import Any

from bcdcore.recipe import plugin_keys as plug
from bcdcore.recipe.locate import Locator, read_text_or_empty
from bcdcore.recipe.schema import (
    ACTIVE_RULES,
    CUDA_GRAPHS,
    DATASET_OPTION_KEYS,
    DATASETS,
    KIND_WORDS,
    LANGUAGE_MODEL,
    MAX_INT,
    MAX_NAME,
    MAX_SWEEP_POINTS,
    MEASURE_UNITS,
    METRICS,
    MODEL_OPTION_KEYS,
    MODELS,
    MODES,
    OPS_BACKENDS,
    PLUGIN_DATASET,
    REGRESSION,
    SCHEDULES,
    SOLVERS,
    STATE_POLICIES,
    STOP_DEFAULT_METRIC,
    STOP_KEYS,
    STOP_KINDS,
    TOKEN_MODELS,
    TOKENS,
    VOTING,
    AlgorithmConfig,
    DataConfig,
    DistributedConfig,
    EvalConfig,
    MeasureConfig,
    ModelConfig,
    Recipe,
    RecipeError,
    RunConfig,
    StopConfig,
    expand_grid,
    flatten,
    show_point,
    show_value,
)


def did_you_mean(word: str, choices) -> str:
    """` (did you mean 'K'?)` for the closest choice, or "". Case slips come first (`k` for `K` is no close
    match to difflib: one letter, no letter in common), then spelling compared without case."""
    choices = [c for c in choices if isinstance(c, str)]
    same = [c for c in choices if c.lower() == word.lower()]
    if same:
        return f" (did you mean {same[0]!r}?)"
    folded: dict[str, str] = {}
    for c in choices:
        folded.setdefault(c.lower(), c)
    close = difflib.get_close_matches(word.lower(), list(folded), n=1, cutoff=0.5)
    return f" (did you mean {folded[close[0]]!r}?)" if close else ""


# section name -> dataclass; None marks array-of-tables sections handled separately
SECTIONS: dict[str, type | None] = {
    "run": RunConfig, "data": DataConfig, "model": ModelConfig, "algorithm": AlgorithmConfig,
    "eval": EvalConfig, "distributed": DistributedConfig, "stop": None, "measure": None, "sweep": None,
}


TABLES = tuple(k for k, v in SECTIONS.items() if v is not None)


def field_key(section: str, name: str) -> str:
    return "lambda" if (section, name) == ("algorithm", "lam") else name


class Validator:
    def __init__(self, source: str, text: str, overridden: set[str] = frozenset()) -> None:
        self.source = source
        self.loc = Locator(source, text) if text else None
        self.overridden = overridden

    def fail(self, dotted: str, message: str) -> RecipeError:
        if dotted in self.overridden:
            return RecipeError(f"--set {dotted}: {message}")
        if dotted.split(".")[0] in self.overridden:  # a key of a [[stop]] or [[measure]] list set whole
            return RecipeError(f"--set {dotted.split('.')[0]}: {dotted}: {message}")
        where = self.loc.where(dotted) if self.loc else self.source
        return RecipeError(f"{where}: {dotted}: {message}")

    # --- scalar checks
    def typed(self, dotted: str, value: Any, kind: str) -> Any:
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
            "str": isinstance(value, str),
        }[kind]
        if not ok:
            raise self.fail(dotted, f"expected {KIND_WORDS[kind]}, got {show_value(value)}")
        if kind == "int" and abs(value) > MAX_INT:  # would overflow torch's 64-bit seeds, counters and JSON readers
            raise self.fail(dotted, f"{value} is out of range (at most {MAX_INT} in size)")
        if kind == "float":
            value = float(value)
            if not math.isfinite(value) and dotted != "stop.max_loss":  # inf means "no limit" there only
                raise self.fail(dotted, f"must be a finite number, got {value}")
        return value

    def choice(self, dotted: str, value: Any, choices) -> str:
        value = self.typed(dotted, value, "str")
        if value not in choices:
            raise self.fail(dotted, f"unknown value {value!r}{did_you_mean(value, choices)}; "
                                    f"choose one of {', '.join(choices)}")
        return value

    def table(self, section: str, raw: Any, cls: type) -> Any:
        if not isinstance(raw, dict):
            raise self.fail(section, f"expected a table [{section}], got {show_value(raw)}")
        fields = {field_key(section, f.name): f for f in dataclasses.fields(cls)}
        for key in raw:
            if key not in fields:
                raise self.fail(f"{section}.{key}", f"unknown key{did_you_mean(key, fields)}")
        obj = cls() if all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
                           for f in dataclasses.fields(cls)) else None
        values = {}
        for key, f in fields.items():
            if key in raw:
                values[f.name] = self.field_value(section, key, raw[key], f)
        return dataclasses.replace(obj, **values) if obj is not None else cls(**values)

    def field_value(self, section: str, key: str, value: Any, f: dataclasses.Field) -> Any:
        dotted = f"{section}.{key}"
        hint = str(f.type)
        plugin_value = plug.field_value(self, dotted, value, hint)  # args tables, model.blocks
        if plugin_value is not None:
            return plugin_value
        if dotted in ("algorithm.gamma", "algorithm.lambda"):
            return self.per_block(dotted, value)
        if hint.startswith("list[int]"):
            if not isinstance(value, list):
                raise self.fail(dotted, f"expected a list of integers, got {show_value(value)}")
            return [self.typed(f"{dotted}[{i}]", v, "int") for i, v in enumerate(value)]
        if hint == "bool":
            return self.typed(dotted, value, "bool")
        if hint == "int":
            return self.typed(dotted, value, "int")
        if hint == "float":
            return self.typed(dotted, value, "float")
        return self.typed(dotted, value, "str")

    def per_block(self, dotted: str, value: Any) -> Any:
        if isinstance(value, list):
            if not value:
                raise self.fail(dotted, "a per-block list must not be empty")
            return [self.typed(f"{dotted}[{i}]", v, "float") for i, v in enumerate(value)]
        if isinstance(value, str):
            if dotted == "algorithm.lambda" and value == "auto":
                return value
            raise self.fail(dotted, f"expected a number or a per-block list of numbers, got {show_value(value)}")
        return self.typed(dotted, value, "float")

    # --- the whole recipe
    def recipe(self, raw: dict) -> Recipe:
        for key, value in raw.items():
            if key not in SECTIONS:
                what = "section" if isinstance(value, (dict, list)) else "top-level key (keys belong in a section)"
                raise self.fail(key, f"unknown {what}{did_you_mean(key, SECTIONS)}")
        recipe = Recipe(source=self.source)
        self.data_keys = set(raw.get("data", {})) if isinstance(raw.get("data"), dict) else set()
        for name, cls in SECTIONS.items():
            if cls is not None and name in raw:
                setattr(recipe, name, self.table(name, raw[name], cls))
        recipe.stop = [self.stop(i, s) for i, s in enumerate(self.array(raw, "stop"))]
        recipe.measure = [self.measure(i, m) for i, m in enumerate(self.array(raw, "measure"))]
        self.check_ranges(recipe)
        if "sweep" in raw:
            recipe.sweep = self.sweep(raw, raw["sweep"])
        return recipe

    def array(self, raw: dict, name: str) -> list:
        value = raw.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.fail(name, f"expected an array of tables [[{name}]], got {show_value(value)}")
        return value

    def stop(self, index: int, raw: dict) -> StopConfig:
        if "kind" not in raw:
            raise self.fail("stop.kind", f"[[stop]] #{index + 1} needs kind = one of {', '.join(STOP_KINDS)}")
        if plug.is_plugin(raw["kind"]):
            return plug.plugin_stop(self, raw, StopConfig)
        if raw["kind"] == "rounds":  # "run it longer" is run.rounds, not a stopper
            raise self.fail("stop.kind", "there is no 'rounds' stopper: a run stops after run.rounds; "
                                         "set that instead (e.g. --set run.rounds=600)")
        kind = self.choice("stop.kind", raw["kind"], STOP_KINDS)
        allowed = ("kind",) + STOP_KEYS[kind]
        for key in raw:
            if key not in allowed:
                raise self.fail(f"stop.{key}", f"unknown key for kind = {kind!r}{did_you_mean(key, allowed)}; "
                                               f"allowed: {', '.join(allowed)}")
        stop = StopConfig(kind=kind, metric=STOP_DEFAULT_METRIC.get(kind, ""))
        fields = {f.name: f for f in dataclasses.fields(StopConfig)}
        for key, value in raw.items():
            if key != "kind":
                setattr(stop, key, self.field_value("stop", key, value, fields[key]))
        if "metric" in raw:
            self.choice("stop.metric", stop.metric, METRICS)
        if kind in ("target_loss", "target_accuracy") and "value" not in raw:
            raise self.fail("stop.value", f"[[stop]] kind = {kind!r} needs value = <target>")
        if kind in ("divergence", "target_loss") and "acc" in stop.metric:
            raise self.fail("stop.metric", f"kind = {kind!r} watches a loss; use train_loss or val_loss")
        if kind == "target_accuracy" and "acc" not in stop.metric:
            raise self.fail("stop.metric", "kind = 'target_accuracy' watches an accuracy; use val_acc")
        if kind == "target_accuracy" and not 0 < stop.value <= 1:
            raise self.fail("stop.value", f"target accuracy must be in (0, 1], got {stop.value}")
        if kind == "wall_time" and stop.seconds <= 0:
            raise self.fail("stop.seconds", "[[stop]] kind = 'wall_time' needs seconds > 0")
        if kind == "patience" and stop.patience < 1:
            raise self.fail("stop.patience", f"must be >= 1, got {stop.patience}")
        return stop

    def measure(self, index: int, raw: dict) -> MeasureConfig:
        for key in raw:
            if key not in ("unit", "every", "at_start"):
                raise self.fail(f"measure.{key}",
                                f"unknown key{did_you_mean(key, ('unit', 'every', 'at_start'))}")
        if "unit" not in raw:
            raise self.fail("measure.unit", f"[[measure]] #{index + 1} needs unit = <name>")
        unit = self.typed("measure.unit", raw["unit"], "str")
        if unit not in MEASURE_UNITS and "." not in unit:  # dotted paths are imported when the run is prepared
            known = ", ".join(MEASURE_UNITS)
            raise self.fail("measure.unit", f"unknown measurement unit {unit!r}{did_you_mean(unit, MEASURE_UNITS)}"
                                            f"; known units: {known}")
        every = self.typed("measure.every", raw.get("every", 1), "int")
        if every < 1:
            raise self.fail("measure.every", f"must be >= 1, got {every}")
        at_start = self.typed("measure.at_start", raw.get("at_start", False), "bool")
        return MeasureConfig(unit=unit, every=every, at_start=at_start)

    def check_ranges(self, r: Recipe) -> None:
        def need(ok: bool, dotted: str, message: str) -> None:
            if not ok:
                raise self.fail(dotted, message)

        need(bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", r.run.name)), "run.name",
             f"{r.run.name!r} must be letters, digits, '_', '-', '.' (it names the run directory)")
        need(len(r.run.name) <= MAX_NAME, "run.name", f"is {len(r.run.name)} characters; at most {MAX_NAME} "
                                                      "(the run directory's name must fit the filesystem)")
        need(r.run.rounds >= 1, "run.rounds", f"must be >= 1, got {r.run.rounds}")
        need(r.run.wall_time_s >= 0, "run.wall_time_s", f"must be >= 0 (0 = no limit), got {r.run.wall_time_s}")
        need(r.run.checkpoint_every >= 0, "run.checkpoint_every", f"must be >= 0, got {r.run.checkpoint_every}")
        need(r.run.seed >= 0, "run.seed", f"must be >= 0, got {r.run.seed}")
        need(bool(re.fullmatch(r"auto|cpu|cuda(:\d+)?", r.run.device)), "run.device",
             f"unknown device {r.run.device!r}; use \"auto\", \"cpu\", \"cuda\" or \"cuda:N\"")
        self.choice("run.ops_backend", r.run.ops_backend, OPS_BACKENDS)

        plug.check_name(self, "data.name", r.data.name, DATASETS)
        need(r.data.batch_size >= 1, "data.batch_size", f"must be >= 1, got {r.data.batch_size}")
        need(0 <= r.data.val_fraction < 1, "data.val_fraction", f"must be in [0, 1), got {r.data.val_fraction}")
        need(0 <= r.data.test_fraction < 1, "data.test_fraction", f"must be in [0, 1), got {r.data.test_fraction}")
        need(r.data.val_fraction + r.data.test_fraction < 0.9, "data.test_fraction",
             "val_fraction + test_fraction must leave at least 10% of the data for training")
        spec = DATASETS.get(r.data.name, PLUGIN_DATASET)
        for key in DATASET_OPTION_KEYS:
            if key not in spec.options and key in self.data_keys:
                accepted = ", ".join(spec.options) or "none"
                raise self.fail(f"data.{key}", f"does not apply to dataset {r.data.name!r} "
                                               f"(its options: {accepted}); remove it")
        self.choice("data.storage", r.data.storage, ("memory", "disk"))
        need(r.data.image_size >= 0, "data.image_size", f"must be >= 0 (0 = native), got {r.data.image_size}")
        need(r.data.channels in (1, 3), "data.channels", f"must be 1 or 3, got {r.data.channels}")
        need(r.data.n_samples >= 20, "data.n_samples", f"must be >= 20, got {r.data.n_samples}")
        need(r.data.n_features >= 1, "data.n_features", f"must be >= 1, got {r.data.n_features}")
        need(r.data.noise >= 0, "data.noise", f"must be >= 0, got {r.data.noise}")
        need(r.data.per_class >= 0, "data.per_class", f"must be >= 0 (0 = the dataset's default), "
                                                       f"got {r.data.per_class}")
        need(r.data.seq_len == 0 or r.data.seq_len >= 2, "data.seq_len",
             f"must be >= 2 (0 = the dataset's default), got {r.data.seq_len}")
        need(r.data.vocab_size >= 3, "data.vocab_size", f"must be >= 3 (<pad>, <unk> and a word), "
                                                         f"got {r.data.vocab_size}")
        need(r.data.corpus_chars >= 1000, "data.corpus_chars", f"must be >= 1000, got {r.data.corpus_chars}")
        if r.data.root:
            need(Path(r.data.root).expanduser().is_dir() or r.data.download, "data.root",
                 f"folder {r.data.root!r} does not exist; create it or set data.download = true")

        m = r.model
        plug.check_name(self, "model.name", m.name, MODELS)
        plug.check_plugin_keys(self, r)
        need(all(w >= 1 for w in m.widths), "model.widths", f"widths must be >= 1, got {m.widths}")
        need(m.group >= 0, "model.group", f"must be >= 0 (0 = no grouping), got {m.group}")
        if m.name in ("cnn", "residual_cnn", "cnn_ensemble"):
            need(bool(m.widths), "model.widths", f"{m.name} needs at least one width")
        defaults = ModelConfig()
        for key, users in MODEL_OPTION_KEYS.items():
            if not plug.model_key_users(m.name, users, key) and getattr(m, key) != getattr(defaults, key):
                raise self.fail(f"model.{key}", f"does not apply to model {m.name!r} (it is a key of "
                                                f"{', '.join(users)}); remove it")
        need(m.n_layer >= 1, "model.n_layer", f"must be >= 1, got {m.n_layer}")
        need(m.n_head >= 1, "model.n_head", f"must be >= 1, got {m.n_head}")
        need(m.n_embd >= 1, "model.n_embd", f"must be >= 1, got {m.n_embd}")
        need(m.name != "nanogpt" or m.n_embd % m.n_head == 0, "model.n_head",
             f"n_head = {m.n_head} must divide n_embd = {m.n_embd}")
        need(0 <= m.dropout < 1, "model.dropout", f"must be in [0, 1), got {m.dropout}")
        need(m.members >= 1, "model.members", f"must be >= 1, got {m.members}")
        self.choice("model.voting", m.voting, VOTING)
        if m.weights:
            need(Path(m.weights).expanduser().is_file(), "model.weights",
                 f"no such file {m.weights!r}; give the path of a torchvision state_dict (.pt/.pth)")
        # model <-> dataset: token ids need a model that embeds them, and only nanogpt predicts next tokens
        if plug.is_plugin(m.name) or plug.is_plugin(r.data.name):
            pass  # a plugin says what it takes when it is built (bcdcore check)
        elif spec.task == LANGUAGE_MODEL:
            need(m.name == "nanogpt", "model.name", f"dataset {r.data.name!r} is a language-model task; "
                                                    f"use model \"nanogpt\"")
        elif spec.inputs == TOKENS:
            need(m.name in TOKEN_MODELS and m.name != "nanogpt", "model.name",
                 f"dataset {r.data.name!r} gives token ids; use model \"text_classifier\"")
        else:
            need(m.name not in TOKEN_MODELS, "model.name",
                 f"model {m.name!r} embeds token ids but dataset {r.data.name!r} gives features; use a "
                 f"text dataset ({', '.join(n for n, d in DATASETS.items() if d.inputs == TOKENS)})")

        a = r.algorithm
        self.choice("algorithm.mode", a.mode, MODES)
        self.choice("algorithm.schedule", a.schedule, SCHEDULES)
        plug.check_name(self, "algorithm.solver", a.solver, SOLVERS)
        self.choice("algorithm.active_rule", a.active_rule, ACTIVE_RULES)
        self.choice("algorithm.state_policy", a.state_policy, STATE_POLICIES)
        self.choice("algorithm.cuda_graphs", a.cuda_graphs, CUDA_GRAPHS)
        need(0 < a.active_share <= 1, "algorithm.active_share", f"must be in (0, 1], got {a.active_share}")
        need(a.K >= 1, "algorithm.K", f"must be >= 1, got {a.K}")
        need(a.lr > 0, "algorithm.lr", f"must be > 0, got {a.lr}")
        need(0 <= a.momentum < 1, "algorithm.momentum", f"must be in [0, 1), got {a.momentum}")
        need(0 <= a.beta1 < 1, "algorithm.beta1", f"must be in [0, 1), got {a.beta1}")
        need(0 <= a.beta2 < 1, "algorithm.beta2", f"must be in [0, 1), got {a.beta2}")
        need(a.eps > 0, "algorithm.eps", f"must be > 0, got {a.eps}")
        for g in a.gamma if isinstance(a.gamma, list) else [a.gamma]:
            need(0 < g <= 1, "algorithm.gamma", f"must be in (0, 1], got {g}")
        need(a.lambda_every >= 0, "algorithm.lambda_every", f"must be >= 0, got {a.lambda_every}")
        need(a.lambda_batch_size >= 1, "algorithm.lambda_batch_size", f"must be >= 1, got {a.lambda_batch_size}")
        need(a.lambda_batches >= 1, "algorithm.lambda_batches", f"must be >= 1, got {a.lambda_batches}")
        for lam in a.lam if isinstance(a.lam, list) else ([] if a.lam == "auto" else [a.lam]):
            need(lam >= 0, "algorithm.lambda", f"must be >= 0, got {lam}")

        need(r.eval.every >= 0, "eval.every", f"must be >= 0 (0 = only at the end), got {r.eval.every}")
        need(r.eval.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {r.eval.batch_size}")
        d = r.distributed
        need(d.nproc >= 1, "distributed.nproc", f"must be >= 1, got {d.nproc}")
        self.choice("distributed.backend", d.backend, ("gloo", "nccl"))
        self.choice("distributed.exchange", d.exchange, ("auto", "backend"))
        need(d.communication_delay >= 0, "distributed.communication_delay",
             f"must be >= 0 seconds, got {d.communication_delay}")
        need(d.bandwidth >= 0, "distributed.bandwidth", f"must be >= 0 bytes/s (0 = unlimited), got {d.bandwidth}")
        need(d.timeout_s > 0, "distributed.timeout_s", f"must be > 0, got {d.timeout_s}")
        need(d.nnodes >= 1, "distributed.nnodes", f"must be >= 1, got {d.nnodes}")
        need(0 <= d.node_rank < d.nnodes, "distributed.node_rank",
             f"must be in [0, nnodes = {d.nnodes}), got {d.node_rank}")
        need(not d.rdzv_endpoint or _endpoint_ok(d.rdzv_endpoint), "distributed.rdzv_endpoint",
             f"{d.rdzv_endpoint!r} is not host:port (e.g. \"node0:29500\", port 1-65535)")
        need(d.nnodes == 1 or bool(d.rdzv_endpoint), "distributed.rdzv_endpoint",
             "multi-node runs (nnodes > 1) need the rendezvous address of node 0, e.g. --rdzv node0:29500")
        need(bool(re.fullmatch(r"[A-Za-z0-9_.-]{0,64}", d.rdzv_id)), "distributed.rdzv_id",
             f"{d.rdzv_id!r} must be at most 64 letters, digits, '_', '-', '.'")
        if d.nproc * d.nnodes > 1:
            need(not (a.mode == "blockwise" and a.schedule == "gauss_seidel"), "distributed.nproc",
                 "block-parallel runs (nproc x nnodes > 1) use schedule = \"jacobi\"; gauss_seidel solves the blocks "
                 "one after another and cannot be spread over processes")
            need(d.backend != "nccl" or r.run.device != "cpu", "distributed.backend",
                 "nccl needs CUDA devices; use backend = \"gloo\" with device = \"cpu\"")
        for stop in r.stop:
            if r.task == REGRESSION and "acc" in stop.metric:
                raise self.fail("stop.metric", f"dataset {r.data.name!r} is a regression task: "
                                               f"it has no {stop.metric}; use val_loss or train_loss")

    def sweep(self, raw: dict, table: Any) -> dict[str, list]:
        if not isinstance(table, dict):
            raise self.fail("sweep", f"expected a table [sweep] of KEY = [values], got {show_value(table)}")
        flat = flatten(table)
        for key, values in flat.items():
            if plug.sweep_key(key, TABLES) is None:
                raise self.fail(f"sweep.{key}", "sweep keys name a recipe key as SECTION.KEY (or SECTION.args.KEY "
                                                "for a plugin's argument), e.g. \"algorithm.K\" = [1, 5]")
            if not isinstance(values, list) or not values:
                raise self.fail(f"sweep.{key}", f"expected a non-empty list of values, got {show_value(values)}")
        size = math.prod(len(v) for v in flat.values())
        if size > MAX_SWEEP_POINTS:
            raise self.fail("sweep", f"the grid has {size:,} points; at most {MAX_SWEEP_POINTS:,} (split the sweep)")
        # every point of the grid must itself be a valid recipe
        for point in expand_grid(flat):
            trial = copy.deepcopy({k: v for k, v in raw.items() if k != "sweep"})
            for key, value in point.items():
                plug.set_key(trial, key.split("."), value)
            try:
                self.recipe(trial)
            except RecipeError as exc:
                raise RecipeError(f"{exc} (in sweep point {show_point(point)})") from None
        return flat


def check_block_lists(recipe: Recipe, n_blocks: int) -> None:
    """Per-block lists must have one entry per block of the built (grouped) model."""
    for key, value in (("gamma", recipe.algorithm.gamma), ("lambda", recipe.algorithm.lam)):
        if isinstance(value, list) and len(value) != n_blocks:
            v = Validator(recipe.source, read_text_or_empty(recipe.source))
            raise v.fail(f"algorithm.{key}", f"per-block list has {len(value)} entries but the model has "
                                             f"{n_blocks} blocks; give {n_blocks} values or one number")


def _endpoint_ok(endpoint: str) -> bool:
    """host:port with a port in 1..65535 (an IPv6 host in brackets: [::1]:29500)."""
    host, sep, port = endpoint.rpartition(":")
    return bool(sep and host and port.isdigit() and 1 <= int(port) <= 65535
                and re.fullmatch(r"[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]", host))
