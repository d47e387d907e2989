"""TOML recipe -> validated, typed `Recipe`.

Pure Python (no torch): the TUI imports this module for live validation. Every error is a `RecipeError`
whose message is one line naming the file, the line where it can be found, the key, and how to fix it.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import itertools
import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ----------------------------------------------------------------------------------------------------------
# Catalogues: the names a recipe may use. Loaders and builders live in bcdcore.data / bcdcore.models.

CLASSIFICATION, REGRESSION = "classification", "regression"
# Next-token prediction: inputs (N, T) token ids, targets (N, T) the following tokens; the loss is the mean
# token cross-entropy and the accuracy (val_acc, test_acc) the share of tokens predicted exactly.
LANGUAGE_MODEL = "language_model"
TASKS = (CLASSIFICATION, REGRESSION, LANGUAGE_MODEL)

FEATURES, TOKENS = "features", "tokens"  # what a dataset's x holds: float features/images, or int64 token ids


@dataclass(frozen=True)
class DatasetSpec:
    task: str
    options: tuple[str, ...] = ()  # dataset-specific [data] keys this dataset accepts
    inputs: str = FEATURES  # FEATURES (float32 x) or TOKENS (int64 token ids; models that embed them)
    files: str = ""  # the files it reads under [data] root ("" = bundled or generated, nothing to download)
    official_test: bool = False  # the test split is the dataset's own (test_fraction is not used)


_MNIST_FILES = "{MNIST}/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]"

DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(CLASSIFICATION, ("image_size", "channels")),
    "digits_flat": DatasetSpec(CLASSIFICATION),
    "diabetes": DatasetSpec(REGRESSION),
    "toy_regression": DatasetSpec(REGRESSION, ("n_samples", "n_features", "noise")),
    "quadratic": DatasetSpec(REGRESSION, ("n_samples", "n_features", "noise")),
    # real datasets read from [data] root (torchvision / scikit-learn formats)
    "mnist": DatasetSpec(CLASSIFICATION, ("image_size", "channels"), files=_MNIST_FILES, official_test=True),
    "mini_mnist": DatasetSpec(CLASSIFICATION, ("per_class", "image_size", "channels"), files=_MNIST_FILES,
                              official_test=True),
    "mnist_8ch": DatasetSpec(CLASSIFICATION, ("per_class",), files=_MNIST_FILES, official_test=True),
    "mnist_flat": DatasetSpec(CLASSIFICATION, files=_MNIST_FILES, official_test=True),
    "fashion_mnist": DatasetSpec(CLASSIFICATION, ("image_size", "channels"),
                                 files=_MNIST_FILES.replace("MNIST", "FashionMNIST"), official_test=True),
    "cifar10": DatasetSpec(CLASSIFICATION, ("augment",),
                           files="cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}",
                           official_test=True),
    "cifar100": DatasetSpec(CLASSIFICATION, ("augment",), files="cifar-100-python/{train,test,meta}",
                            official_test=True),
    "svhn": DatasetSpec(CLASSIFICATION, files="svhn/{train,test}_32x32.mat", official_test=True),
    "imagenet": DatasetSpec(CLASSIFICATION, ("image_size", "per_class", "storage"),
                            files="imagenet/{train,val}/<class>/<image>", official_test=True),
    "mini_imagenet": DatasetSpec(CLASSIFICATION, ("image_size", "per_class", "storage"),
                                 files="mini_imagenet/train/<class>/<image>"),
    "imdb": DatasetSpec(CLASSIFICATION, ("seq_len", "vocab_size"), inputs=TOKENS,
                        files="aclImdb/{train,test}/{pos,neg}/*.txt", official_test=True),
    "california_housing": DatasetSpec(REGRESSION, files="california_housing/cal_housing_py3.pkz"),
    # character-level text from the Python standard library's own sources: offline everywhere
    "stdlib_text": DatasetSpec(LANGUAGE_MODEL, ("seq_len", "corpus_chars"), inputs=TOKENS),
}
DATASET_OPTION_KEYS = ("image_size", "channels", "n_samples", "n_features", "noise", "per_class", "augment",
                       "seq_len", "vocab_size", "corpus_chars", "storage")

MODELS = ("mlp", "linear", "cnn", "residual_cnn", "block_linear", "resnet18", "resnet34", "nanogpt",
          "mlp_ensemble", "cnn_ensemble", "text_classifier")
TOKEN_MODELS = ("nanogpt", "text_classifier")  # models that embed token ids (datasets with inputs = TOKENS)
# model-specific [model] keys -> the models that use them (any other model must leave them at their default)
MODEL_OPTION_KEYS: dict[str, tuple[str, ...]] = {
    "batch_norm": ("cnn", "residual_cnn", "cnn_ensemble"),
    "cifar_stem": ("resnet18", "resnet34"),
    "weights": ("resnet18", "resnet34"),
    "n_layer": ("nanogpt",),
    "n_head": ("nanogpt",),
    "n_embd": ("nanogpt", "text_classifier"),
    "dropout": ("nanogpt",),
    "tie_weights": ("nanogpt",),
    "members": ("mlp_ensemble", "cnn_ensemble"),
    "voting": ("mlp_ensemble", "cnn_ensemble"),
}
VOTING = ("average", "random")
SOLVERS = ("sgd", "momentum", "adam")
MODES = ("blockwise", "entire")
SCHEDULES = ("jacobi", "gauss_seidel")
ACTIVE_RULES = ("random", "cyclic")
STATE_POLICIES = ("reset", "keep")
OPS_BACKENDS = ("auto", "reference", "cpu", "cuda")
STOP_KINDS = ("patience", "target_loss", "target_accuracy", "wall_time", "divergence")
METRICS = ("train_loss", "val_loss", "val_acc")
MEASURE_UNITS = ("memory", "hessian_dense", "hessian_blocks", "grad_norm")  # third-party units: "pkg.module:Class"


# Integers beyond 2**53 lose precision in JSON readers and overflow 64-bit seeds once streams are derived.
MAX_INT = 2 ** 53
# run ids add 23 characters (and a -N suffix) to the name; filesystems allow 255 bytes per name
MAX_NAME = 200
MAX_SWEEP_POINTS = 10_000  # each point is a process and a run directory


class RecipeError(ValueError):
    """A recipe problem, already phrased as the one line the user sees."""


# ----------------------------------------------------------------------------------------------------------
# Typed recipe. Field defaults are the documented defaults (README "Recipe keys").

@dataclass
class RunConfig:
    name: str = "run"
    seed: int = 0
    device: str = "auto"
    rounds: int = 100
    wall_time_s: float = 0.0  # 0 = no limit
    checkpoint_every: int = 0  # rounds; 0 = only when the run stops
    ops_backend: str = "auto"


@dataclass
class DataConfig:
    name: str = "digits"
    root: str = ""  # "" = $BCD_DATA, else ~/.cache/bcd/data
    download: bool = False
    batch_size: int = 64
    val_fraction: float = 0.1
    test_fraction: float = 0.2  # not used by datasets with an official test split
    image_size: int = 0  # digits, mnist family: 0 keeps the native size; imagenet 0 = 64, mini_imagenet 0 = 84
    channels: int = 1  # digits, mnist, mini_mnist, fashion_mnist: 1 or 3 (repeated)
    n_samples: int = 1000  # synthetic datasets
    n_features: int = 20
    noise: float = 0.1
    per_class: int = 0  # mini_mnist, mnist_8ch: training images per class (0 = 500); imagenet: cap (0 = all)
    augment: bool = False  # cifar10, cifar100: random crop (4-pixel zero padding) + horizontal flip
    seq_len: int = 0  # imdb: tokens per review (0 = 256); stdlib_text: characters per window (0 = 128)
    vocab_size: int = 20000  # imdb: words kept, including <pad> and <unk>
    corpus_chars: int = 1_000_000  # stdlib_text: characters of standard-library source read
    storage: str = "memory"  # imagenet, mini_imagenet: "memory" (decoded once) | "disk" (decoded per minibatch)


@dataclass
class ModelConfig:
    name: str = "mlp"
    widths: list[int] = field(default_factory=lambda: [64, 64])
    group: int = 0  # 0 = one block per layer/unit; k = merge consecutive blocks into k groups
    batch_norm: bool = True  # cnn, residual_cnn, cnn_ensemble
    cifar_stem: bool = False  # resnet18/34: 3x3 stride-1 stem conv and no max-pool (for 32x32 inputs)
    weights: str = ""  # resnet18/34: a torchvision state_dict file (.pt/.pth) to load; "" = random init
    n_layer: int = 4  # nanogpt: transformer layers (one block each)
    n_head: int = 4  # nanogpt: attention heads (must divide n_embd)
    n_embd: int = 128  # nanogpt: model width; text_classifier: embedding width
    dropout: float = 0.0  # nanogpt
    tie_weights: bool = False  # nanogpt: share the token embedding with the output head (the embedding block owns it)
    members: int = 3  # mlp_ensemble, cnn_ensemble
    voting: str = "average"  # ensembles: "average" (mean of member outputs) | "random" (one member per sample)


@dataclass
class AlgorithmConfig:
    mode: str = "blockwise"
    schedule: str = "jacobi"
    active_share: float = 1.0
    active_rule: str = "random"
    K: int = 10
    gamma: float | list[float] = 1.0
    lam: float | list[float] | str = 0.0  # TOML key "lambda"
    accuracy_factor: float = -1.0  # < 0 disables the inexactness rule
    solver: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    state_policy: str = "reset"
    lambda_every: int = 0  # lambda = "auto": re-measure every N rounds (0 = once, at the start)
    lambda_batch_size: int = 1024  # lambda = "auto": rows of each training batch the Hessian is measured on
    lambda_batches: int = 3  # lambda = "auto": independent batches (their mean is used, their spread logged)


@dataclass
class EvalConfig:
    every: int = 1
    batch_size: int = 1024


@dataclass
class StopConfig:
    kind: str
    metric: str = ""
    value: float = 0.0
    patience: int = 5
    min_delta: float = 0.0
    seconds: float = 0.0
    max_loss: float = math.inf


@dataclass
class MeasureConfig:
    unit: str
    every: int = 1
    at_start: bool = False  # also measure at x_0, before the first round (round 0)


@dataclass
class DistributedConfig:
    nproc: int = 1
    backend: str = "gloo"
    communication_delay: float = 0.0  # simulated latency per collective, seconds
    bandwidth: float = 0.0  # simulated link bandwidth, bytes/s (0 = unlimited)
    sleep: bool = False  # really sleep the simulated communication time (wall_s then includes it)
    timeout_s: float = 300.0  # process-group timeout: a rank stuck this long in a collective fails the run


@dataclass
class Recipe:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    stop: list[StopConfig] = field(default_factory=list)
    measure: list[MeasureConfig] = field(default_factory=list)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    sweep: dict[str, list] = field(default_factory=dict)
    source: str = field(default="", compare=False)  # file the recipe came from (for messages)

    @property
    def task(self) -> str:
        return DATASETS[self.data.name].task

    def to_dict(self) -> dict:
        """The resolved recipe as plain TOML-able data (every default filled in)."""
        out: dict[str, Any] = {}
        for name in ("run", "data", "model", "algorithm", "eval", "distributed"):
            section = dataclasses.asdict(getattr(self, name))
            if name == "algorithm":
                section = {("lambda" if k == "lam" else k): v for k, v in section.items()}
            if name == "data":
                spec = DATASETS[self.data.name]
                section = {k: v for k, v in section.items()
                           if k not in DATASET_OPTION_KEYS or k in spec.options}
            out[name] = section
        out["stop"] = [_stop_to_dict(s) for s in self.stop]
        out["measure"] = [dataclasses.asdict(m) for m in self.measure]
        if self.sweep:
            out["sweep"] = dict(self.sweep)
        return out

    def digest(self) -> str:
        """Hash of the resolved recipe (order-independent)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()


STOP_KEYS: dict[str, tuple[str, ...]] = {
    "patience": ("metric", "patience", "min_delta"),
    "target_loss": ("metric", "value"),
    "target_accuracy": ("metric", "value"),
    "wall_time": ("seconds",),
    "divergence": ("metric", "max_loss"),
}
STOP_DEFAULT_METRIC = {"patience": "val_loss", "target_loss": "val_loss",
                       "target_accuracy": "val_acc", "divergence": "train_loss"}


def _stop_to_dict(stop: StopConfig) -> dict:
    d = {"kind": stop.kind}
    for key in STOP_KEYS[stop.kind]:
        d[key] = getattr(stop, key)
    return d


# ----------------------------------------------------------------------------------------------------------
# Loading

class _Locator:
    """Finds the line of `section.key` in the recipe text so messages can point at it."""

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()

    def where(self, dotted: str) -> str:
        line = self.line_of(dotted)
        return f"{self.path}:{line}" if line else self.path

    def line_of(self, dotted: str) -> int | None:
        dotted = re.sub(r"\[\d+\]$", "", dotted)  # list items: point at the list's line
        parts = dotted.split(".")
        header = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?")
        if len(parts) == 1:  # a section name: its header line
            for number, line in enumerate(self.lines, 1):
                m = header.match(line)
                if m and m.group(1).strip().split(".")[0] == dotted:
                    return number
        section, key = (parts[0], parts[-1]) if len(parts) > 1 else ("", parts[0])
        current = ""
        assign = re.compile(r'^\s*"?' + re.escape(key) + r'"?\s*=')
        sec_line = None
        for number, line in enumerate(self.lines, 1):
            m = header.match(line)
            if m:
                current = m.group(1).strip()
                if current == section and sec_line is None:
                    sec_line = number
                continue
            if current == section and assign.match(line):
                return number
            if not section and current == "" and assign.match(line):
                return number
        return sec_line


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
        if not path.is_file():
            raise RecipeError(f"{path}: not a file; pass the path of a .toml recipe")
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
    return _Validator(source, text, overridden).recipe(raw)


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
    if len(parts) != 2 or not all(parts):
        raise RecipeError(f"--set {key!r}: expected SECTION.KEY, e.g. algorithm.K")
    section, name = parts
    if section in SECTIONS and SECTIONS[section] is None:
        raise RecipeError(f"--set {key!r}: [{section}] cannot be set from the command line; edit the recipe")
    if section not in SECTIONS:
        raise RecipeError(f"--set {key!r}: unknown section [{section}]{_did_you_mean(section, _TABLES)}")
    table = raw.setdefault(section, {})
    if not isinstance(table, dict):
        raise RecipeError(f"--set {key!r}: [{section}] is not a table in the recipe")
    table[name] = parse_value(value.strip())


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


# section name -> dataclass; None marks array-of-tables sections handled separately
SECTIONS: dict[str, type | None] = {
    "run": RunConfig, "data": DataConfig, "model": ModelConfig, "algorithm": AlgorithmConfig,
    "eval": EvalConfig, "distributed": DistributedConfig, "stop": None, "measure": None, "sweep": None,
}
_TABLES = tuple(k for k, v in SECTIONS.items() if v is not None)


def _field_key(section: str, name: str) -> str:
    return "lambda" if (section, name) == ("algorithm", "lam") else name


class _Validator:
    def __init__(self, source: str, text: str, overridden: set[str] = frozenset()) -> None:
        self.source = source
        self.loc = _Locator(source, text) if text else None
        self.overridden = overridden

    def fail(self, dotted: str, message: str) -> RecipeError:
        if dotted in self.overridden:
            return RecipeError(f"--set {dotted}: {message}")
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
            raise self.fail(dotted, f"expected {_KIND_WORDS[kind]}, got {_show(value)}")
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
            raise self.fail(dotted, f"unknown value {value!r}{_did_you_mean(value, choices)}; "
                                    f"choose one of {', '.join(choices)}")
        return value

    def table(self, section: str, raw: Any, cls: type) -> Any:
        if not isinstance(raw, dict):
            raise self.fail(section, f"expected a table [{section}], got {_show(raw)}")
        fields = {_field_key(section, f.name): f for f in dataclasses.fields(cls)}
        for key in raw:
            if key not in fields:
                raise self.fail(f"{section}.{key}", f"unknown key{_did_you_mean(key, fields)}")
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
        if dotted in ("algorithm.gamma", "algorithm.lambda"):
            return self.per_block(dotted, value)
        if hint.startswith("list[int]"):
            if not isinstance(value, list):
                raise self.fail(dotted, f"expected a list of integers, got {_show(value)}")
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
            raise self.fail(dotted, f"expected a number or a per-block list of numbers, got {_show(value)}")
        return self.typed(dotted, value, "float")

    # --- the whole recipe
    def recipe(self, raw: dict) -> Recipe:
        for key, value in raw.items():
            if key not in SECTIONS:
                what = "section" if isinstance(value, (dict, list)) else "top-level key (keys belong in a section)"
                raise self.fail(key, f"unknown {what}{_did_you_mean(key, SECTIONS)}")
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
            raise self.fail(name, f"expected an array of tables [[{name}]], got {_show(value)}")
        return value

    def stop(self, index: int, raw: dict) -> StopConfig:
        if "kind" not in raw:
            raise self.fail("stop.kind", f"[[stop]] #{index + 1} needs kind = one of {', '.join(STOP_KINDS)}")
        kind = self.choice("stop.kind", raw["kind"], STOP_KINDS)
        allowed = ("kind",) + STOP_KEYS[kind]
        for key in raw:
            if key not in allowed:
                raise self.fail(f"stop.{key}", f"unknown key for kind = {kind!r}{_did_you_mean(key, allowed)}; "
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
                                f"unknown key{_did_you_mean(key, ('unit', 'every', 'at_start'))}")
        if "unit" not in raw:
            raise self.fail("measure.unit", f"[[measure]] #{index + 1} needs unit = <name>")
        unit = self.typed("measure.unit", raw["unit"], "str")
        if unit not in MEASURE_UNITS and "." not in unit:  # dotted paths are imported when the run is prepared
            known = ", ".join(MEASURE_UNITS)
            raise self.fail("measure.unit", f"unknown measurement unit {unit!r}{_did_you_mean(unit, MEASURE_UNITS)}"
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

        self.choice("data.name", r.data.name, DATASETS)
        need(r.data.batch_size >= 1, "data.batch_size", f"must be >= 1, got {r.data.batch_size}")
        need(0 <= r.data.val_fraction < 1, "data.val_fraction", f"must be in [0, 1), got {r.data.val_fraction}")
        need(0 <= r.data.test_fraction < 1, "data.test_fraction", f"must be in [0, 1), got {r.data.test_fraction}")
        need(r.data.val_fraction + r.data.test_fraction < 0.9, "data.test_fraction",
             "val_fraction + test_fraction must leave at least 10% of the data for training")
        spec = DATASETS[r.data.name]
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
        self.choice("model.name", m.name, MODELS)
        need(all(w >= 1 for w in m.widths), "model.widths", f"widths must be >= 1, got {m.widths}")
        need(m.group >= 0, "model.group", f"must be >= 0 (0 = no grouping), got {m.group}")
        if m.name in ("cnn", "residual_cnn", "cnn_ensemble"):
            need(bool(m.widths), "model.widths", f"{m.name} needs at least one width")
        defaults = ModelConfig()
        for key, users in MODEL_OPTION_KEYS.items():
            if m.name not in users and getattr(m, key) != getattr(defaults, key):
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
        if spec.task == LANGUAGE_MODEL:
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
        self.choice("algorithm.solver", a.solver, SOLVERS)
        self.choice("algorithm.active_rule", a.active_rule, ACTIVE_RULES)
        self.choice("algorithm.state_policy", a.state_policy, STATE_POLICIES)
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
        need(d.communication_delay >= 0, "distributed.communication_delay",
             f"must be >= 0 seconds, got {d.communication_delay}")
        need(d.bandwidth >= 0, "distributed.bandwidth", f"must be >= 0 bytes/s (0 = unlimited), got {d.bandwidth}")
        need(d.timeout_s > 0, "distributed.timeout_s", f"must be > 0, got {d.timeout_s}")
        if d.nproc > 1:
            need(not (a.mode == "blockwise" and a.schedule == "gauss_seidel"), "distributed.nproc",
                 "block-parallel runs (nproc > 1) use schedule = \"jacobi\"; gauss_seidel solves the blocks "
                 "one after another and cannot be spread over processes")
            need(d.backend != "nccl" or r.run.device != "cpu", "distributed.backend",
                 "nccl needs CUDA devices; use backend = \"gloo\" with device = \"cpu\"")
        for stop in r.stop:
            if r.task == REGRESSION and "acc" in stop.metric:
                raise self.fail("stop.metric", f"dataset {r.data.name!r} is a regression task: "
                                               f"it has no {stop.metric}; use val_loss or train_loss")

    def sweep(self, raw: dict, table: Any) -> dict[str, list]:
        if not isinstance(table, dict):
            raise self.fail("sweep", f"expected a table [sweep] of KEY = [values], got {_show(table)}")
        flat = dict(_flatten(table))
        for key, values in flat.items():
            parts = key.split(".")
            if len(parts) != 2 or parts[0] not in _TABLES:
                raise self.fail(f"sweep.{key}", "sweep keys name a recipe key as SECTION.KEY, "
                                                "e.g. \"algorithm.K\" = [1, 5]")
            if not isinstance(values, list) or not values:
                raise self.fail(f"sweep.{key}", f"expected a non-empty list of values, got {_show(values)}")
        size = math.prod(len(v) for v in flat.values())
        if size > MAX_SWEEP_POINTS:
            raise self.fail("sweep", f"the grid has {size:,} points; at most {MAX_SWEEP_POINTS:,} (split the sweep)")
        # every point of the grid must itself be a valid recipe
        for point in expand_grid(flat):
            trial = copy.deepcopy({k: v for k, v in raw.items() if k != "sweep"})
            for key, value in point.items():
                section, name = key.split(".")
                trial.setdefault(section, {})[name] = value
            try:
                self.recipe(trial)
            except RecipeError as exc:
                raise RecipeError(f"{exc} (in sweep point {_show_point(point)})") from None
        return flat


def _flatten(table: dict, prefix: str = ""):
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, dotted + ".")
        else:
            yield dotted, value


def expand_grid(sweep: dict[str, list]) -> list[dict[str, Any]]:
    """Cartesian product of the sweep lists, in key order (last key varies fastest)."""
    keys = list(sweep)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(sweep[k] for k in keys))]


def _show_point(point: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in point.items())


_KIND_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _show(value: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "table"}
    return f"{kind.get(type(value), type(value).__name__)} {value!r}"


# ----------------------------------------------------------------------------------------------------------
# Checks that need the built model (number of blocks)

def check_block_lists(recipe: Recipe, n_blocks: int) -> None:
    """Per-block lists must have one entry per block of the built (grouped) model."""
    for key, value in (("gamma", recipe.algorithm.gamma), ("lambda", recipe.algorithm.lam)):
        if isinstance(value, list) and len(value) != n_blocks:
            v = _Validator(recipe.source, _read(recipe.source))
            raise v.fail(f"algorithm.{key}", f"per-block list has {len(value)} entries but the model has "
                                             f"{n_blocks} blocks; give {n_blocks} values or one number")


def _read(source: str) -> str:
    try:
        return Path(source).read_text()
    except OSError:
        return ""


def per_block(value: float | list[float] | str, n_blocks: int) -> list[float]:
    """One value per block; "auto" (lambda) starts at 0 until the run measures it."""
    if value == "auto":
        return [0.0] * n_blocks
    return list(value) if isinstance(value, list) else [float(value)] * n_blocks


# ----------------------------------------------------------------------------------------------------------
# Writing the resolved recipe (tomllib only reads)

def to_toml(data: dict) -> str:
    lines: list[str] = []
    for section, table in data.items():
        if isinstance(table, list):
            for item in table:
                lines.append(f"[[{section}]]")
                lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in item.items()]
                lines.append("")
        else:
            lines.append(f"[{section}]")
            lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items()]
            lines.append("")
    return "\n".join(lines)


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")
