"""The recipes reference (docs/recipes.md), generated from the schema: every key of every section with its
type, its default (read from the dataclasses, so it cannot drift) and its meaning. tests/test_docs.py keeps the
page equal to `reference_markdown()` and fails on a schema key without a meaning here.

    python -m bcdcore.recipe.reference > docs/recipes.md
"""
from __future__ import annotations

import dataclasses

from bcdcore.recipe.schema import AlgorithmConfig, DataConfig, DistributedConfig, EvalConfig, ModelConfig, RunConfig
from bcdcore.recipe.toml_io import toml_value

SECTIONS = {"run": RunConfig, "data": DataConfig, "model": ModelConfig, "algorithm": AlgorithmConfig,
            "eval": EvalConfig, "distributed": DistributedConfig}

# "section.key": (type, meaning)
MEANINGS: dict[str, tuple[str, str]] = {
    'run.name': ('string',
        'names the run directory (letters, digits, `_ - .`)'),
    'run.seed': ('int >= 0',
        'the one seed: data split, model init, minibatch streams, active sets'),
    'run.device': ('"auto" \\| "cpu" \\| "cuda" \\| "cuda:N"',
        '"auto" = CUDA when available'),
    'run.rounds': ('int >= 1',
        'outer rounds of Algorithm 1 (or of the `entire` baseline)'),
    'run.wall_time_s': ('number >= 0',
        'stop (finished) after this many seconds; 0 = no limit'),
    'run.checkpoint_every': ('int >= 0',
        'also checkpoint every N rounds; 0 = only when the run stops'),
    'run.ops_backend': ('"auto" \\| "reference" \\| "cpu" \\| "cuda"',
        'update-op backend; auto = fastest available'),
    'data.name': ('string',
        '`digits` (8x8 images, 10 classes), `digits_flat` (64 features), `diabetes` (regression), `toy_regression` (y = Xw + noise), `quadratic` (least squares with coupled features); or a plugin loader `"pkg.module:load"` (docs/plugins.md)'),
    'data.root': ('string',
        'folder of dataset files (for datasets that need files)'),
    'data.download': ('bool',
        'allow downloading missing files'),
    'data.batch_size': ('int >= 1',
        'minibatch size of every inner step'),
    'data.val_fraction': ('[0, 1)',
        'seeded validation share (stratified for classification)'),
    'data.test_fraction': ('[0, 1)',
        'seeded test share'),
    'data.image_size': ('int >= 0',
        '`digits` only: resize to image_size x image_size (0 = 8x8)'),
    'data.channels': ('1 \\| 3',
        '`digits` only: repeat the channel for 3-channel models'),
    'data.n_samples': ('int >= 20',
        '`toy_regression`, `quadratic`'),
    'data.n_features': ('int >= 1',
        '`toy_regression`, `quadratic`'),
    'data.noise': ('number >= 0',
        '`toy_regression`, `quadratic`: noise standard deviation'),
    'model.name': ('string',
        '`mlp` (ReLU), `linear` (identity activations), `cnn`, `residual_cnn`, `block_linear`; adds `resnet18`, `resnet34`, `nanogpt`, `mlp_ensemble`, `cnn_ensemble`, `text_classifier`; or a plugin builder `"pkg.module:build"`, or any torchvision model `"torchvision:resnet50"` (docs/plugins.md)'),
    'model.widths': ('list of int',
        'mlp/linear: hidden widths (one block per layer + the output layer); cnn: conv channels (one block each, + a head block); residual_cnn: stem width then one residual unit per width (+ head); block_linear: features per block (`[]` = 4 equal blocks)'),
    'model.group': ('int >= 0',
        'merge consecutive blocks into this many groups (0 = no grouping)'),
    'model.batch_norm': ('bool',
        'cnn, residual_cnn'),
    'algorithm.mode': ('"blockwise" \\| "entire"',
        'Algorithm 1, or the whole model trained by the same solver (baseline)'),
    'algorithm.schedule': ('"jacobi" \\| "gauss_seidel"',
        'every block sees x_t, or blocks in order see the already-damped earlier blocks'),
    'algorithm.active_share': ('(0, 1]',
        'share of blocks updated per round: max(1, floor(share * n))'),
    'algorithm.active_rule': ('"random" \\| "cyclic"',
        'how the active subset is chosen when active_share < 1'),
    'algorithm.K': ('int >= 1',
        'inner solver steps per block per round (entire: steps per round)'),
    'algorithm.gamma': ('(0, 1] or per-block list',
        'damping x_{t+1} = a + gamma (xhat - a)'),
    'algorithm.lambda': ('>= 0 or per-block list',
        'proximal weight lambda_i'),
    'algorithm.accuracy_factor': ('number',
        'c of the inexactness rule; < 0 disables it'),
    'algorithm.solver': ('"sgd" \\| "momentum" \\| "adam" \\| "pkg.module:Solver"',
        'inner solver; a plugin solver class by dotted path (docs/plugins.md)'),
    'algorithm.lr': ('> 0',
        'solver step size'),
    'algorithm.momentum': ('[0, 1)',
        '`momentum` solver'),
    'algorithm.nesterov': ('bool',
        '`momentum` solver'),
    'algorithm.state_policy': ('"reset" \\| "keep"',
        'solver state at a new anchor (below)'),
    'algorithm.cuda_graphs': ('"auto" \\| "off"',
        'on a GPU, replay each block\'s captured inner steps as CUDA graphs where capture applies '
        '(the log says why not); "off" = eager rounds'),
    'distributed.machine': ('fused',
        'vs torch.compile (applies to vs foreach)'),
    'distributed.---': ('---:',
        '---: (applies to ---:)'),
    "distributed.this project's CPU machine (2 cores, AVX-512)": ('35.9 ms (80 block calls)',
        '1.9x (applies to 3.5x)'),
    'distributed.NVIDIA H200': ('0.362 ms (one flat call)',
        '3.0x (applies to 14.1x)'),
    'data.per_class': ('int >= 0',
        '`mini_mnist`, `mnist_8ch`: training images per class, drawn with the run seed (0 = 500, i.e. 5,000 images); `imagenet`, `mini_imagenet`: at most this many images per class read from the training tree (0 = all) (applies to `mini_mnist`, `mnist_8ch`, `imagenet`, `mini_imagenet`)'),
    'data.augment': ('bool',
        'training minibatches randomly cropped (4-pixel zero padding) and mirrored left-right; validation and test are not (applies to `cifar10`, `cifar100`)'),
    'data.seq_len': ('int, 0 or >= 2',
        '`imdb`: words kept per review (0 = 256); `stdlib_text`: characters per window (0 = 128) (applies to `imdb`, `stdlib_text`)'),
    'data.vocab_size': ('int >= 3',
        'words kept, `<pad>` and `<unk>` included (applies to `imdb`)'),
    'data.corpus_chars': ('int >= 1000',
        'characters of standard-library source read (applies to `stdlib_text`)'),
    'data.storage': ('"memory" \\| "disk"',
        '`memory`: every image decoded once into a tensor; `disk`: only the file paths are held and each minibatch (and evaluation batch) is decoded from its files, for trees that do not fit in memory (applies to `imagenet`, `mini_imagenet`)'),
    'data.args': ('table',
        'plugin datasets (`name = "pkg.module:load"`): keyword arguments of the loader, as a `[data.args]` table; in diffs and sweeps as `data.args.KEY` (docs/plugins.md)'),
    'model.cifar_stem': ('bool',
        '3x3 stride-1 stem conv and no max-pool, for 32x32 inputs (applies to `resnet18`, `resnet34`)'),
    'model.weights': ('string',
        'resnet18/34 and `torchvision:` models: a torchvision state_dict file (`torch.save(torchvision.models.resnet18().state_dict(), path)`, bare or under `"state_dict"`) loaded strictly at build time (applies to `resnet18`, `resnet34`, and `torchvision:` and plugin models, loaded with weights_only)'),
    'model.n_layer': ('int >= 1',
        'transformer layers (one block each) (applies to `nanogpt`)'),
    'model.n_head': ('int >= 1',
        'attention heads; must divide n_embd (applies to `nanogpt`)'),
    'model.n_embd': ('int >= 1',
        'nanogpt: model width; text_classifier: embedding width (applies to `nanogpt`, `text_classifier`)'),
    'model.dropout': ('[0, 1)',
        ' (applies to `nanogpt`)'),
    'model.tie_weights': ('bool',
        'share the token embedding with the output projection (owned by the embeddings block, below) (applies to `nanogpt`)'),
    'model.members': ('int >= 1',
        ' (applies to `mlp_ensemble`, `cnn_ensemble`)'),
    'model.voting': ('"average" \\| "random"',
        'below (applies to `mlp_ensemble`, `cnn_ensemble`)'),
    'model.blocks': ('"auto" \\| "children" \\| list of strings',
        'plugin and torchvision models: the partition into blocks. `auto`: the module\'s own `blocks` (an nn.ModuleList) when it has one, else `children`; `children`: one block per top-level child with parameters; a list of `"prefix\\|prefix"` entries: a parameter (or buffer) belongs to the first entry one of whose prefixes is its qualified name or followed in it by a dot (docs/plugins.md)'),
    'model.args': ('table',
        'plugin models (`name = "pkg.module:build"`, `"torchvision:resnet50"`): keyword arguments of the builder, as a `[model.args]` table; in diffs and sweeps as `model.args.KEY`'),
    'algorithm.beta1': ('[0, 1)',
        "Adam's first-moment decay"),
    'algorithm.beta2': ('[0, 1)',
        "Adam's second-moment decay"),
    'algorithm.eps': ('> 0',
        "Adam's denominator guard"),
    'algorithm.lambda_every': ('int >= 0',
        '`lambda = "auto"`: measure again every N rounds; 0 = only at the start'),
    'algorithm.lambda_batch_size': ('int >= 1',
        '`lambda = "auto"`: rows per measurement batch'),
    'algorithm.lambda_batches': ('int >= 1',
        '`lambda = "auto"`: disjoint seeded training batches measured (the spread is logged)'),
    'algorithm.args': ('table',
        'plugin solvers (`solver = "pkg.module:Solver"`): keyword arguments of the solver class, as an `[algorithm.args]` table; in sweeps as `algorithm.args.KEY`'),
    'eval.every': ('int >= 0',
        'evaluate on the validation split every N rounds; 0 = only at the end'),
    'eval.batch_size': ('int >= 1',
        'rows per evaluation batch'),
    'distributed.nproc': ('int >= 1',
        'processes (ranks); 1 = the ordinary single-process run'),
    'distributed.backend': ('"gloo" \\| "nccl"',
        'torch.distributed backend: gloo on the CPU, NCCL on GPUs'),
    'distributed.communication_delay': ('number >= 0',
        'simulated latency per message, seconds (accounting: comm_sim_s, sim_time_s)'),
    'distributed.bandwidth': ('number >= 0',
        'simulated bandwidth, bytes/s (0 = unlimited)'),
    'distributed.sleep': ('bool',
        'also sleep for the simulated communication time (a real slow network)'),
    'distributed.timeout_s': ('number > 0',
        'collective timeout; a rank that stops answering ends the run after this'),
    'distributed.nnodes': ('int >= 1',
        'hosts (torchrun c10d rendezvous); nproc ranks on each; also `bcdcore run --nnodes`'),
    'distributed.node_rank': ('int in [0, nnodes)',
        "this host's number; node 0 hosts the rendezvous; also `--node-rank`"),
    'distributed.rdzv_endpoint': ('"host:port"',
        'rendezvous address on node 0, reachable from every node (needed when nnodes > 1); also `--rdzv`'),
    'distributed.rdzv_id': ('string',
        'rendezvous id, the same on every node; "" = derived from the recipe'),
    'distributed.exchange': ('"auto" \\| "backend"',
        "a blockwise round's exchange: auto = Unix-domain sockets when all ranks are on one host on the CPU, "
        "else the backend's all_gather; backend = always the backend's"),
}

SHIPPED = '| recipe | what |\n|---|---|\n| `recipes/quickstart.toml` | 3-block MLP on the 8x8 digits, Jacobi, lambda 0.01, momentum; test acc >= 0.95 |\n| `recipes/quickstart_entire.toml` | the same model trained whole (the baseline) |\n| `recipes/diabetes.toml` | regression, Gauss-Seidel, per-block lambda and gamma, Adam |'

ALGORITHM_NOTES = 'Per-block lists must have one entry per block of the built (grouped) model; `bcdcore check` verifies it.\n`lambda = "auto"` sets every block\'s lambda to sqrt(n) * max_i Lbar_i, measured by `hessian_blocks` in training\nmode on `lambda_batches` (3) training batches of `lambda_batch_size` (1024) rows at the start (and every\n`lambda_every` rounds, an int >= 0, default 0 = only at the start); each choice is logged as a\n`measure` event with `purpose = "lambda auto"` and the lambdas, and kept in the checkpoint.\nIn `entire` mode lambda, gamma, schedule and active_share play no part.'

STOP_MEASURE_SWEEP = '`[[stop]]` (any number; the first that fires ends the run):\n\n| kind | keys (defaults) | ends the run as |\n|---|---|---|\n| patience | metric ("val_loss"), patience (5 evaluations), min_delta (0) | finished |\n| target_loss | metric ("val_loss"), value (required) | finished |\n| target_accuracy | metric ("val_acc"), value in (0, 1] (required) | finished |\n| wall_time | seconds (> 0) | finished |\n| divergence | metric ("train_loss"), max_loss (inf) | failed: diverged |\n| "pkg.module:Stopper" | any: the keyword arguments of the plugin class (docs/plugins.md) | what its update returns |\n\nA non-finite train or validation loss always ends the run as `failed` ("diverged: train_loss is nan"), with\nor without a divergence stopper. Metrics: train_loss, val_loss, val_acc. On the command line a list is replaced\nwhole: `--set \'stop=[{kind="patience", patience=10}]\'`, or cleared: `--set stop=[]` (the same for measure).\n\n`[[measure]]` (any number): `unit` (`memory`, `hessian_dense`, `hessian_blocks`, `grad_norm`, or a third-party\nclass as `"pkg.module:Class"`), `every` (rounds, default 1), `at_start` (also at x_0, default false). See\n"Instruments" below.\n\n`[sweep]`: dotted keys mapped to lists, e.g. `"algorithm.K" = [1, 5, 10]` and `"run.seed" = [0, 1, 2]`, or a\nnested `[sweep.algorithm]` table; a plugin\'s argument is `"model.args.depth" = [2, 4]`; the grid is their cartesian product (last key fastest) and every point is\nvalidated. `bcdcore run` refuses a recipe with a `[sweep]` table and points to `bcdcore sweep`.'


PIPE = "\\|"  # a literal | inside a markdown table cell


def key_name(section: str, field: dataclasses.Field) -> str:
    return "lambda" if (section, field.name) == ("algorithm", "lam") else field.name


def default_text(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "(required)"
    return toml_value(value)


def missing_meanings() -> list[str]:
    """Schema keys that have no line here (the docs test fails on any)."""
    return [f"{s}.{key_name(s, f)}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)
            if f"{s}.{key_name(s, f)}" not in MEANINGS]


def reference_markdown() -> str:
    out = ["# Recipes reference", "",
           "Generated from the schema by `python -m bcdcore.recipe.reference > docs/recipes.md`; do not edit by hand.",
           "One TOML file is one run (or one sweep). Unknown keys, wrong types and out-of-range values are rejected",
           "with one line naming the file, line and key (with a \"did you mean\" for near misses);",
           "`bcdcore check RECIPE` validates without running, and `--set section.key=value` overrides one key.", "",
           "## Shipped recipes", "", SHIPPED, ""]
    for section, cls in SECTIONS.items():
        out += [f"## [{section}]", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            key = key_name(section, f)
            kind, meaning = MEANINGS.get(f"{section}.{key}", ("?", "?"))
            default = default_text(f).replace("|", PIPE)
            out.append(f"| {key} | {kind} | {default} | {meaning} |")
        out.append("")
        if section == "algorithm":
            out += [ALGORITHM_NOTES, ""]
    out += ["## [[stop]], [[measure]], [sweep]", "", STOP_MEASURE_SWEEP, ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(reference_markdown(), end="")
