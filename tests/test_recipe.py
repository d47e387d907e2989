"""Recipe validation: every error class is one RecipeError line naming the key (and file:line when the key is
in the file); --set overrides; [sweep]; the resolved recipe round trip."""
from __future__ import annotations

import dataclasses
import math
import tomllib

import pytest
from conftest import TINY, line_of, tiny_recipe

from bcdcore.recipe import (
    AlgorithmConfig,
    DataConfig,
    RecipeError,
    RunConfig,
    expand_grid,
    load_recipe,
    parse_recipe,
    to_toml,
)


def recipe_error(path, overrides=()) -> str:
    """The message of the RecipeError that loading `path` raises; it must be exactly one line."""
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    message = str(info.value)
    assert message.strip(), "empty error message"
    assert "\n" not in message.strip(), f"message is not one line: {message!r}"
    return message


def test_tiny_recipe_loads_with_its_values_and_defaults(write_recipe):
    r = load_recipe(write_recipe(TINY))
    assert (r.run.name, r.run.seed, r.run.rounds) == ("tiny", 0, 3)
    assert (r.data.name, r.data.batch_size) == ("digits_flat", 32)
    assert (r.model.name, r.model.widths) == ("mlp", [16])
    a = r.algorithm
    assert (a.mode, a.schedule, a.K, a.lam, a.gamma, a.solver, a.lr) == (
        "blockwise", "jacobi", 2, 0.01, 1.0, "sgd", 0.05)
    assert isinstance(a.K, int) and isinstance(a.lam, float)
    # a key the file leaves out takes the documented default
    assert a.accuracy_factor == AlgorithmConfig().accuracy_factor
    assert r.run.wall_time_s == RunConfig().wall_time_s
    assert r.task == "classification"


# ----------------------------------------------------------------------------------------------------------
# Error classes with the key in the file: "<file>:<line>: <key>: ..." on one line.
# (id, {old line: new line}, key named in the message, fragment of the offending line, further fragments)

ALGO_LAST = "lr = 0.05"  # the last line of [algorithm] in TINY: a key appended to it lands in [algorithm]

FILE_ERRORS = [
    # unknown sections and keys, with a "did you mean"
    ("unknown-key-lamda", {"lambda = 0.01": "lamda = 0.01"}, "algorithm.lamda", "lamda", ["did you mean 'lambda'"]),
    ("unknown-key-run", {"rounds = 3": "rouns = 3"}, "run.rouns", "rouns", ["did you mean 'rounds'"]),
    ("unknown-key-eval", {"every = 1": "evry = 1"}, "eval.evry", "evry", ["did you mean 'every'"]),
    ("unknown-section", {"[algorithm]": "[algoritm]"}, "algoritm", "[algoritm]", ["did you mean 'algorithm'"]),
    # wrong types
    ("K-string", {"K = 2": 'K = "5"'}, "algorithm.K", 'K = "5"', ["integer"]),
    ("K-float", {"K = 2": "K = 2.5"}, "algorithm.K", "K = 2.5", ["integer"]),
    ("gamma-bool", {"gamma = 1.0": "gamma = true"}, "algorithm.gamma", "gamma = true", []),
    ("lambda-string", {"lambda = 0.01": 'lambda = "big"'}, "algorithm.lambda", 'lambda = "big"', []),
    ("rounds-float", {"rounds = 3": "rounds = 3.0"}, "run.rounds", "rounds = 3.0", ["integer"]),
    ("widths-item", {"widths = [16]": 'widths = [16, "x"]'}, "model.widths", "widths", []),
    ("name-number", {'name = "tiny"': "name = 5"}, "run.name", "name = 5", ["string"]),
    # out of range
    ("gamma-0", {"gamma = 1.0": "gamma = 0"}, "algorithm.gamma", "gamma = 0", ["(0, 1]"]),
    ("gamma-1.5", {"gamma = 1.0": "gamma = 1.5"}, "algorithm.gamma", "gamma = 1.5", ["(0, 1]"]),
    ("gamma-list-item", {"gamma = 1.0": "gamma = [1.0, 0.0]"}, "algorithm.gamma", "gamma = [", []),
    ("lambda-negative", {"lambda = 0.01": "lambda = -1"}, "algorithm.lambda", "lambda = -1", [">= 0"]),
    ("lambda-list-negative", {"lambda = 0.01": "lambda = [0.1, -0.5]"}, "algorithm.lambda", "lambda = [", []),
    ("K-0", {"K = 2": "K = 0"}, "algorithm.K", "K = 0", [">= 1"]),
    ("active_share-0", {ALGO_LAST: ALGO_LAST + "\nactive_share = 0"}, "algorithm.active_share",
     "active_share", ["(0, 1]"]),
    ("active_share-1.5", {ALGO_LAST: ALGO_LAST + "\nactive_share = 1.5"}, "algorithm.active_share",
     "active_share", []),
    ("lr-0", {"lr = 0.05": "lr = 0"}, "algorithm.lr", "lr = 0", []),
    ("lr-inf", {"lr = 0.05": "lr = inf"}, "algorithm.lr", "lr = inf", []),
    ("lr-nan", {"lr = 0.05": "lr = nan"}, "algorithm.lr", "lr = nan", []),
    ("rounds-0", {"rounds = 3": "rounds = 0"}, "run.rounds", "rounds = 0", []),
    ("batch-0", {"batch_size = 32": "batch_size = 0"}, "data.batch_size", "batch_size = 0", []),
    # unknown names, with a "did you mean"
    ("model-name", {'name = "mlp"': 'name = "mpl"'}, "model.name", '"mpl"', ["did you mean 'mlp'"]),
    ("dataset-name", {'name = "digits_flat"': 'name = "digit_flat"'}, "data.name", '"digit_flat"',
     ["did you mean 'digits_flat'"]),
    ("solver-name", {'solver = "sgd"': 'solver = "adm"'}, "algorithm.solver", '"adm"', ["did you mean 'adam'"]),
    ("schedule-name", {'schedule = "jacobi"': 'schedule = "jacobbi"'}, "algorithm.schedule", "jacobbi",
     ["did you mean 'jacobi'"]),
    ("mode-name", {'mode = "blockwise"': 'mode = "entier"'}, "algorithm.mode", "entier",
     ["did you mean 'entire'"]),
    # dataset options that do not apply to the dataset
    ("option-n_samples-digits", {"batch_size = 32": "batch_size = 32\nn_samples = 50"}, "data.n_samples",
     "n_samples", ["digits_flat"]),
    ("option-image_size-toy", {'name = "digits_flat"': 'name = "toy_regression"\nimage_size = 16'},
     "data.image_size", "image_size", ["toy_regression"]),
    # a dataset option set to its default value is still an option that does not apply
    ("option-noise-default-digits", {"batch_size = 32": "batch_size = 32\nnoise = 0.1"}, "data.noise",
     "noise", ["digits_flat"]),
    # missing dataset folder
    ("data-root-missing", {"batch_size = 32": 'batch_size = 32\nroot = "no/such/folder"'}, "data.root",
     "root =", []),
    # stopper keys
    ("stop-unknown-key", {}, "stop.patiense", "patiense", ["did you mean 'patience'"]),
    ("stop-kind", {}, "stop.kind", "kind =", ["did you mean 'patience'"]),
]
STOP_APPEND = {
    "stop-unknown-key": '\n[[stop]]\nkind = "patience"\npatiense = 3\n',
    "stop-kind": '\n[[stop]]\nkind = "patiense"\n',
}


@pytest.mark.parametrize("case", FILE_ERRORS, ids=[c[0] for c in FILE_ERRORS])
def test_error_names_file_line_and_key(write_recipe, case):
    case_id, replace, key, line_fragment, fragments = case
    text = tiny_recipe(replace=replace, append=STOP_APPEND.get(case_id, ""))
    path = write_recipe(text)
    message = recipe_error(path)
    expected_prefix = f"{path}:{line_of(text, line_fragment)}: "
    assert message.startswith(expected_prefix), f"{message!r} does not start with {expected_prefix!r}"
    assert key in message
    for fragment in fragments:
        assert fragment in message


def test_unknown_key_without_close_match_has_no_did_you_mean(write_recipe):
    path = write_recipe(tiny_recipe(replace={"K = 2": "K = 2\nzzzzzz = 1"}))
    message = recipe_error(path)
    assert "algorithm.zzzzzz" in message and "did you mean" not in message


def test_regression_dataset_rejects_accuracy_stop(write_recipe):
    text = tiny_recipe(replace={'name = "digits_flat"': 'name = "toy_regression"'},
                       append='\n[[stop]]\nkind = "target_accuracy"\nvalue = 0.9\n')
    message = recipe_error(write_recipe(text))
    assert "stop.metric" in message and "val_acc" in message


def test_invalid_toml_and_missing_file_are_recipe_errors(write_recipe, tmp_path):
    message = recipe_error(write_recipe(TINY + "K = \n"))
    assert "recipe.toml" in message and "TOML" in message
    message = recipe_error(tmp_path / "nope.toml")
    assert "nope.toml" in message


def test_parse_recipe_without_text_still_names_the_key():
    raw = tomllib.loads(tiny_recipe(replace={"K = 2": "K = 0"}))
    with pytest.raises(RecipeError, match=r"^<mem>: algorithm\.K: must be >= 1"):
        parse_recipe(raw, source="<mem>")


# ----------------------------------------------------------------------------------------------------------
# Per-block lists need the built model: bcdcore.run.prepare checks their length.

@pytest.mark.parametrize("key, value", [("gamma", "[1.0, 0.5, 0.5]"), ("lambda", "[0.1]")])
def test_per_block_list_length_mismatch(write_recipe, key, value):
    from bcdcore.run import prepare

    old = {"gamma": "gamma = 1.0", "lambda": "lambda = 0.01"}[key]
    text = tiny_recipe(replace={old: f"{key} = {value}"})
    text = text.replace("[run]\n", '[run]\nops_backend = "reference"\n', 1)
    path = write_recipe(text)
    recipe = load_recipe(path)  # the length is not knowable without the model
    with pytest.raises(RecipeError) as info:
        prepare(recipe)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:{line_of(text, key + ' = [')}: algorithm.{key}: ")
    n_given = value.count(",") + 1
    assert f"{n_given} entries" in message and "2 blocks" in message


def test_per_block_lists_of_the_right_length_are_used(write_recipe):
    from bcdcore.run import prepare

    text = tiny_recipe(replace={"lambda = 0.01": "lambda = [0.1, 0.2]", "gamma = 1.0": "gamma = [0.5, 1.0]"})
    text = text.replace("[run]\n", '[run]\nops_backend = "reference"\n', 1)
    prepared = prepare(load_recipe(write_recipe(text)))
    assert prepared.params.n_blocks == 2
    assert prepared.lams == [0.1, 0.2] and prepared.gammas == [0.5, 1.0]


# ----------------------------------------------------------------------------------------------------------
# --set KEY=VALUE

def test_set_overrides_apply_with_toml_types(write_recipe):
    path = write_recipe(TINY)
    r = load_recipe(path, ["algorithm.K=5", "algorithm.lambda=[0.1, 0.2]", "run.name=other",
                           "algorithm.gamma=0.5", "algorithm.solver=adam", "algorithm.active_share=0.5",
                           "data.batch_size = 16", "distributed.backend=gloo"])
    assert r.algorithm.K == 5 and isinstance(r.algorithm.K, int)
    assert r.algorithm.lam == [0.1, 0.2]
    assert r.run.name == "other"  # a bare word is a string
    assert r.algorithm.gamma == 0.5 and r.algorithm.solver == "adam"
    assert r.algorithm.active_share == 0.5  # a key the file does not have
    assert r.data.batch_size == 16
    # the last --set of one key wins, and the file itself is untouched
    assert load_recipe(path, ["algorithm.K=5", "algorithm.K=7"]).algorithm.K == 7
    assert load_recipe(path).algorithm.K == 2


@pytest.mark.parametrize("item, key, fragment", [
    ('algorithm.K="5"', "algorithm.K", "integer"),
    ("algorithm.K=2.5", "algorithm.K", "integer"),
    ("algorithm.gamma=true", "algorithm.gamma", ""),
    ("algorithm.K=0", "algorithm.K", ">= 1"),
    ("algorithm.gamma=1.5", "algorithm.gamma", "(0, 1]"),
    ("algorithm.lambda=-1", "algorithm.lambda", ">= 0"),
    ("algorithm.lamda=1", "algorithm.lamda", "did you mean 'lambda'"),
    ("algoritm.K=5", "algoritm", "did you mean 'algorithm'"),
    ("model.name=mpl", "model.name", "did you mean 'mlp'"),
    ("data.n_samples=50", "data.n_samples", "digits_flat"),
    ("algorithm.lambda_batch_size=0", "algorithm.lambda_batch_size", ">= 1"),
    ("algorithm.lambda_batches=0", "algorithm.lambda_batches", ">= 1"),
])
def test_set_values_are_validated_like_the_file(write_recipe, item, key, fragment):
    message = recipe_error(write_recipe(TINY), [item])
    assert key in message and fragment in message


@pytest.mark.parametrize("item", ["algorithm.K", "K=5", "a.b.c=1", "=5", ".K=5", "algorithm.=5"])
def test_set_bad_forms(write_recipe, item):
    message = recipe_error(write_recipe(TINY), [item])
    assert "--set" in message


def test_set_value_error_does_not_point_at_the_replaced_file_line(write_recipe):
    """K = 0 came from --set, not from the file's `K = 2` line: the message must not send the user there."""
    path = write_recipe(TINY)
    message = recipe_error(path, ["algorithm.K=0"])
    assert "algorithm.K" in message
    assert f"{path}:{line_of(TINY, 'K = 2')}:" not in message, message


# ----------------------------------------------------------------------------------------------------------
# [sweep]

def test_sweep_dotted_keys_and_grid_order(write_recipe):
    text = TINY + '\n[sweep]\n"algorithm.K" = [1, 2, 3]\n"run.seed" = [0, 1]\n"algorithm.gamma" = [0.5, 1.0]\n'
    r = load_recipe(write_recipe(text))
    assert r.sweep == {"algorithm.K": [1, 2, 3], "run.seed": [0, 1], "algorithm.gamma": [0.5, 1.0]}
    grid = expand_grid(r.sweep)
    assert len(grid) == 3 * 2 * 2
    assert grid[0] == {"algorithm.K": 1, "run.seed": 0, "algorithm.gamma": 0.5}
    assert grid[1] == {"algorithm.K": 1, "run.seed": 0, "algorithm.gamma": 1.0}  # last key varies fastest
    assert grid[2] == {"algorithm.K": 1, "run.seed": 1, "algorithm.gamma": 0.5}
    assert grid[-1] == {"algorithm.K": 3, "run.seed": 1, "algorithm.gamma": 1.0}
    assert len({tuple(p.values()) for p in grid}) == 12
    # the base recipe keeps its own values
    assert r.algorithm.K == 2


def test_sweep_nested_tables_equal_dotted_keys(write_recipe):
    nested = load_recipe(write_recipe(TINY + "\n[sweep.algorithm]\nK = [1, 2]\nlambda = [0.0, 0.1]\n"
                                             "\n[sweep.run]\nseed = [0, 1, 2]\n", "nested.toml"))
    dotted = load_recipe(write_recipe(TINY + '\n[sweep]\n"algorithm.K" = [1, 2]\n"algorithm.lambda" = [0.0, 0.1]\n'
                                             '"run.seed" = [0, 1, 2]\n', "dotted.toml"))
    assert nested.sweep == dotted.sweep == {"algorithm.K": [1, 2], "algorithm.lambda": [0.0, 0.1],
                                            "run.seed": [0, 1, 2]}
    assert len(expand_grid(nested.sweep)) == 12


@pytest.mark.parametrize("sweep, key, fragments", [
    ('"algorithm.gamma" = [0.5, 1.5]', "algorithm.gamma", ["1.5", "sweep"]),
    ('"algorithm.K" = [1, "5"]', "algorithm.K", ["sweep"]),
    ('"algorithm.lamda" = [0.1]', "lamda", ["did you mean 'lambda'"]),
    ('"algoritm.K" = [1, 2]', "algoritm.K", []),
    ('"K" = [1, 2]', "K", []),
    ('"algorithm.K" = 3', "algorithm.K", ["list"]),
    ('"algorithm.K" = []', "algorithm.K", []),
])
def test_sweep_errors(write_recipe, sweep, key, fragments):
    message = recipe_error(write_recipe(TINY + f"\n[sweep]\n{sweep}\n"))
    assert key in message
    for fragment in fragments:
        assert fragment in message


def test_sweep_error_names_the_bad_point(write_recipe):
    text = TINY + '\n[sweep]\n"run.seed" = [0, 1]\n"algorithm.K" = [3, 0]\n'
    message = recipe_error(write_recipe(text))
    assert "algorithm.K" in message and "algorithm.K=0" in message


# ----------------------------------------------------------------------------------------------------------
# The resolved recipe round trip

RICH = """\
[run]
name = "rich.recipe-1"
seed = 7
rounds = 12
wall_time_s = 30.5
checkpoint_every = 3

[data]
name = "toy_regression"
batch_size = 16
n_samples = 200
n_features = 5
noise = 0.25
val_fraction = 0.15

[model]
name = "mlp"
widths = [8, 4]
group = 2

[algorithm]
schedule = "gauss_seidel"
K = 3
lambda = [0.1, 0.0]
gamma = [0.9, 1.0]
accuracy_factor = 0.5
solver = "adam"
lr = 0.003
active_share = 0.5
active_rule = "cyclic"
state_policy = "keep"

[eval]
every = 2

[[stop]]
kind = "patience"
metric = "val_loss"
patience = 3
min_delta = 0.001

[[stop]]
kind = "divergence"

[[stop]]
kind = "wall_time"
seconds = 100

[[stop]]
kind = "target_loss"
value = 0.01

[sweep]
"algorithm.K" = [1, 3]
"run.seed" = [0, 1]
"""


@pytest.mark.parametrize("text", [TINY, RICH], ids=["tiny", "rich"])
def test_resolved_recipe_round_trip(write_recipe, text):
    path = write_recipe(text)
    recipe = load_recipe(path)
    written = to_toml(recipe.to_dict())
    again = parse_recipe(tomllib.loads(written), source=recipe.source, text=written)
    assert again == recipe
    assert again.digest() == recipe.digest()
    assert again.to_dict() == recipe.to_dict()
    # through a file, as a run directory's recipe.toml is read on --resume
    from_file = load_recipe(write_recipe(written, "resolved.toml"))
    assert dataclasses.replace(from_file, source=recipe.source) == recipe
    assert from_file.digest() == recipe.digest()


def test_resolved_recipe_fills_every_default(write_recipe):
    d = load_recipe(write_recipe(TINY)).to_dict()
    assert set(d["run"]) >= {f.name for f in dataclasses.fields(RunConfig)}
    algorithm_keys = {("lambda" if f.name == "lam" else f.name) for f in dataclasses.fields(AlgorithmConfig)}
    # the TOML key is "lambda", never the field name "lam"; a plugin solver's [algorithm.args] only when it has some
    assert set(d["algorithm"]) == algorithm_keys - {"args"}
    assert d["algorithm"]["accuracy_factor"] == AlgorithmConfig().accuracy_factor
    assert d["data"]["val_fraction"] == DataConfig().val_fraction
    assert "n_samples" not in d["data"]  # options of other datasets are not written
    rich = load_recipe(write_recipe(RICH, "rich.toml")).to_dict()
    assert rich["data"]["n_samples"] == 200
    assert [s["kind"] for s in rich["stop"]] == ["patience", "divergence", "wall_time", "target_loss"]
    divergence = rich["stop"][1]
    assert divergence["metric"] == "train_loss" and math.isinf(divergence["max_loss"])


def test_digest_follows_content_not_order(write_recipe):
    base = load_recipe(write_recipe(TINY))
    changed = load_recipe(write_recipe(TINY, "b.toml"), ["algorithm.K=3"])
    assert changed.digest() != base.digest()
    # the same recipe with its sections in another order (and a default spelled out) hashes the same
    sections = TINY.split("\n\n")
    reordered = "\n\n".join(reversed(sections)).replace("[eval]\n", "[eval]\nbatch_size = 1024\n")
    assert load_recipe(write_recipe(reordered, "c.toml")).digest() == base.digest()
    assert len(base.digest()) >= 6 and all(c in "0123456789abcdef" for c in base.digest())


def test_measure_at_start_is_a_bool(write_recipe):
    ok = load_recipe(write_recipe(tiny_recipe(append='\n[[measure]]\nunit = "grad_norm"\nat_start = true\n')))
    assert ok.measure[0].unit == "grad_norm" and ok.measure[0].at_start is True
    message = recipe_error(write_recipe(tiny_recipe(append='\n[[measure]]\nunit = "grad_norm"\nat_start = 1\n')))
    assert "measure.at_start" in message


# ----------------------------------------------------------------------------------------------------------
# --set of a whole [[stop]] / [[measure]] list, and case slips

STOPPED = TINY + '\n[[stop]]\nkind = "divergence"\n\n[[stop]]\nkind = "patience"\npatience = 3\n'


def test_set_replaces_or_clears_the_stop_and_measure_lists(write_recipe):
    path = write_recipe(STOPPED)
    assert [s.kind for s in load_recipe(path).stop] == ["divergence", "patience"]
    assert load_recipe(path, ["stop=[]"]).stop == []
    r = load_recipe(path, ['stop=[{kind="target_accuracy", value=0.9}, {kind="wall_time", seconds=60}]'])
    assert [(s.kind, s.metric) for s in r.stop] == [("target_accuracy", "val_acc"), ("wall_time", "")]
    assert (r.stop[0].value, r.stop[1].seconds) == (0.9, 60)
    r = load_recipe(path, ['measure=[{unit="grad_norm", every=5}]', "stop=[]"])
    assert [(m.unit, m.every, m.at_start) for m in r.measure] == [("grad_norm", 5, False)]
    assert load_recipe(path, ['measure=[{unit="grad_norm"}]', "measure=[]"]).measure == []  # the last one wins
    # the resolved recipe (what a run stores and resumes from) carries the replacement
    again = parse_recipe(tomllib.loads(to_toml(r.to_dict())))
    assert again.stop == [] and again.measure == r.measure
    assert load_recipe(path).to_dict()["stop"][1] == {"kind": "patience", "metric": "val_loss", "patience": 3,
                                                      "min_delta": 0.0}  # the file itself is untouched


@pytest.mark.parametrize("item, fragments", [
    ("stop=5", ["--set stop: expected an array of inline tables", "--set stop=[]"]),
    ("stop=[{kind=patience}]", ["--set stop: not a TOML array of inline tables"]),
    ("stop=[1, 2]", ["--set stop: expected an array of inline tables"]),
    ("stop.kind=patience", ["[[stop]] is a list of tables; replace it whole", "--set stop=[]"]),
    ('stop=[{kind="patience", patience=0}]', ["--set stop: stop.patience: must be >= 1"]),
    ('stop=[{kind="patience", patiense=2}]', ["--set stop: stop.patiense", "did you mean 'patience'"]),
    ('stop=[{kind="rounds", rounds=600}]', ["no 'rounds' stopper", "--set run.rounds=600"]),
    ('measure=[{unit="grad_norm", every=0}]', ["--set measure: measure.every: must be >= 1"]),
    ("stp=[]", ["expected SECTION.KEY", "did you mean 'stop'"]),
    ("algorithm.k=3", ["--set algorithm.k: unknown key (did you mean 'K'?)"]),
    ("Algorithm.K=3", ["unknown section [Algorithm] (did you mean 'algorithm'?)"]),
    ("run.Rounds=3", ["did you mean 'rounds'"]),
])
def test_set_list_and_case_errors_are_one_line_naming_the_set(write_recipe, item, fragments):
    message = recipe_error(write_recipe(STOPPED), [item])
    for fragment in fragments:
        assert fragment in message, message
    assert ".toml:" not in message  # blamed on the --set, not on a line of the file


@pytest.mark.parametrize("word, choices, shown", [
    ("k", ("K", "lr"), "K"),  # one letter: no close match for difflib, but a case slip
    ("LR", ("K", "lr"), "lr"),
    ("Lamda", ("lambda", "K"), "lambda"),  # spelling compared without case
    ("zzz", ("K", "lr"), None),
])
def test_did_you_mean_catches_case_slips(word, choices, shown):
    from bcdcore.recipe import did_you_mean

    assert did_you_mean(word, choices) == (f" (did you mean {shown!r}?)" if shown else "")


def test_a_case_slip_in_the_file_names_its_line(write_recipe):
    text = tiny_recipe(replace={"K = 2": "k = 2"})
    path = write_recipe(text)
    message = recipe_error(path)
    assert f"{path}:{line_of(text, 'k = 2')}: algorithm.k: unknown key (did you mean 'K'?)" == message
