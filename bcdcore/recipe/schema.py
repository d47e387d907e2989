"""The recipe's schema: the catalogues of names a recipe may use, the typed sections (RunConfig, DataConfig,
..., Recipe) whose defaults are the documented defaults, and sweep grids.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
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

# a plugin loader ("pkg.module:load"): no built-in options; its bundle says the task
PLUGIN_DATASET = DatasetSpec(task="")

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
CUDA_GRAPHS = ("auto", "off")
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
    args: dict = field(default_factory=dict)  # [data.args]: keyword arguments of a plugin loader


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
    # plugin and torchvision models: "auto" (the module's own `blocks`, else "children"), "children", or a list
    # of "prefix|prefix" entries (a parameter belongs to the first entry one of whose prefixes names it)
    blocks: str | list[str] = "auto"
    args: dict = field(default_factory=dict)  # [model.args]: keyword arguments of a plugin builder


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
    args: dict = field(default_factory=dict)  # [algorithm.args]: keyword arguments of a plugin solver class
    cuda_graphs: str = "auto"  # blockwise rounds on a GPU replay captured inner steps where capture applies


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
    args: dict = field(default_factory=dict)  # a plugin stopper's keys (every key but kind), its keyword arguments


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
    nnodes: int = 1  # hosts; nproc ranks on each, world size nnodes x nproc
    node_rank: int = 0  # this host's number; node 0 hosts the c10d rendezvous store
    rdzv_endpoint: str = ""  # "host:port" of node 0, reachable from every node (needed when nnodes > 1)
    rdzv_id: str = ""  # rendezvous id shared by the nodes; "" = derived from the recipe (same recipe, same id)
    exchange: str = "auto"  # a blockwise round's exchange: "auto" = sockets between one host's CPU ranks, "backend"


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
        spec = DATASETS.get(self.data.name)
        return spec.task if spec is not None else ""  # a plugin dataset says its task when it is loaded

    def to_dict(self) -> dict:
        """The resolved recipe as plain TOML-able data (every default filled in)."""
        out: dict[str, Any] = {}
        for name in ("run", "data", "model", "algorithm", "eval", "distributed"):
            section = dataclasses.asdict(getattr(self, name))
            if name == "algorithm":
                section = {("lambda" if k == "lam" else k): v for k, v in section.items()}
            if name == "data":
                spec = DATASETS.get(self.data.name, PLUGIN_DATASET)
                section = {k: v for k, v in section.items()
                           if k not in DATASET_OPTION_KEYS or k in spec.options}
            # plugin keys only where they say something: built-in recipes resolve (and hash) as before
            if not section.get("args", True):
                del section["args"]
            if name == "model" and self.model.name in MODELS:
                del section["blocks"]
            out[name] = section
        out["stop"] = [stop_to_dict(s) for s in self.stop]
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


def stop_to_dict(stop: StopConfig) -> dict:
    if stop.kind not in STOP_KEYS:  # a plugin stopper: its own keys
        return {"kind": stop.kind, **stop.args}
    d = {"kind": stop.kind}
    for key in STOP_KEYS[stop.kind]:
        d[key] = getattr(stop, key)
    return d


# ----------------------------------------------------------------------------------------------------------
# Loading


# ----------------------------------------------------------------------------------------------------------
# Checks that need the built model (number of blocks)


# ----------------------------------------------------------------------------------------------------------
# Writing the resolved recipe (tomllib only reads)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested tables as dotted keys (`algorithm.K`), arrays of tables as `name[i].key`; other values (lists
    included) are leaves. The one flattening of recipes: sweeps, recipe diffs in the TUI, plot legends."""
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        for index, value in enumerate(data):
            out.update(flatten(value, f"{prefix}[{index}]"))
    else:
        out[prefix] = data
    return out


def expand_grid(sweep: dict[str, list]) -> list[dict[str, Any]]:
    """Cartesian product of the sweep lists, in key order (last key varies fastest)."""
    keys = list(sweep)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(sweep[k] for k in keys))]


def show_point(point: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in point.items())


KIND_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def show_value(value: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "table"}
    return f"{kind.get(type(value), type(value).__name__)} {value!r}"
