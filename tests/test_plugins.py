"""Plugins by dotted path: every way a plugin can be wrong is one line and exit 2 from `bcdcore check` (the CLI's
own code, in process; one real subprocess shows the exit status and no traceback), and the partition rules
put every parameter in exactly one block."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from conftest import cli_env, run_cli
from hypothesis import given, settings
from hypothesis import strategies as st

from bcdcore.cli import main
from bcdcore.recipe import ModelConfig, RecipeError, parse_recipe

pytestmark = pytest.mark.usefixtures("single_torch_thread")

PKG = "p15plug"  # a package name no other test uses: imported once per session, from the folder below

MODULES = {
    "__init__.py": "",
    "nets.py": """
        from torch import nn

        class Good(nn.Module):
            def __init__(self, n_in, n_out, width=8):
                super().__init__()
                self.blocks = nn.ModuleList([nn.Sequential(nn.Flatten(), nn.Linear(n_in, width), nn.ReLU()),
                                             nn.Linear(width, n_out)])
            def forward(self, x):
                for b in self.blocks:
                    x = b(x)
                return x

        CONSTANT = 3

        def build(input_shape, n_outputs, width=8):
            return Good(input_shape[0], n_outputs, width)

        class Orphan(Good):
            def __init__(self, n_in, n_out):
                super().__init__(n_in, n_out)
                self.scale = nn.Parameter(nn.init.ones_(nn.Linear(1, 1).weight))  # outside blocks

        def orphan(input_shape, n_outputs):
            return Orphan(input_shape[0], n_outputs)

        def shared(input_shape, n_outputs):
            net = Good(input_shape[0], n_outputs)
            net.blocks.append(net.blocks[1])  # the same Linear in blocks 1 and 2
            return net

        def not_a_module(input_shape, n_outputs):
            return 42

        def bad_signature(n_outputs):
            return None

        def plain(input_shape, n_outputs):  # no blocks: partitioned by children or prefixes
            return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], 8), nn.BatchNorm1d(8), nn.ReLU(),
                                 nn.Linear(8, n_outputs))

        def wrong_inputs(input_shape, n_outputs):  # expects 99 features
            return Good(99, n_outputs)

        def wrong_outputs(input_shape, n_outputs):
            return Good(input_shape[0], n_outputs + 1)

        def raises(input_shape, n_outputs):
            raise RuntimeError("out of ideas\\nsecond line")
        """,
    "data.py": """
        import torch
        from bcdcore.data import DataBundle, Split

        def load(n=120, seed=0):
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(n, 4, generator=g)
            return DataBundle("blobs", "classification", (4,), 2, Split(x, (x[:, 0] > 0).long()))

        def wrong_type():
            return (torch.zeros(3, 4), torch.zeros(3))

        def bad_labels():
            return DataBundle("b", "classification", (4,), 2, Split(torch.zeros(30, 4), torch.full((30,), 5)))
        """,
    "opt.py": """
        class Sign:
            n_state = 0
            def __init__(self, scale=1.0):
                self.scale = scale
            def step(self, x, g, a, state, *, lr, lam, step):
                d = x - a
                r = g + lam * d
                x.sub_(lr * self.scale * r.sign())
                return r.dot(r), d.dot(d)

        class PlainSGD:  # the built-in sgd form, written as a plugin
            n_state = 0
            def step(self, x, g, a, state, *, lr, lam, step):
                d = x - a
                r = g + lam * d
                r2, d2 = (r * r).sum(), (d * d).sum()
                x.copy_(x - lr * r)
                return r2, d2

        class NoNorms(Sign):
            def step(self, x, g, a, state, *, lr, lam, step):
                return None

        class BadState(Sign):
            n_state = "two"
        """,
    "stop.py": """
        class After:
            def __init__(self, rounds=2):
                self.rounds, self.seen = rounds, 0
            def update(self, metrics, wall_s):
                self.seen += 1
                return ("finished", f"after {self.seen}") if self.seen >= self.rounds else None
        """,
}


@pytest.fixture(scope="module")
def plugdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plugins")
    (root / PKG).mkdir()
    for name, text in MODULES.items():
        (root / PKG / name).write_text(textwrap.dedent(text))
    return root


def recipe(model: str = f"{PKG}.nets:build", data: str = f"{PKG}.data:load", extra: str = "", solver: str = "sgd",
           model_extra: str = "") -> str:
    return textwrap.dedent(f"""\
        [run]
        name = "plug"
        device = "cpu"
        rounds = 2
        [data]
        name = "{data}"
        batch_size = 16
        [model]
        name = "{model}"
        {model_extra}
        [algorithm]
        K = 2
        lambda = 0.01
        solver = "{solver}"
        lr = 0.05
        """) + extra


def check(plugdir: Path, tmp_path: Path, text: str, capsys) -> tuple[int, str, str]:
    path = tmp_path / "r.toml"
    path.write_text(text)
    code = main(["--plugins", str(plugdir), "check", str(path)])
    out, err = capsys.readouterr()
    return code, out, err


ERRORS = [
    # (what, recipe kwargs, words the one line must contain)
    ("not importable", {"model": "p15_no_such_pkg.nets:build"}, ["cannot import module 'p15_no_such_pkg.nets'",
                                                                 "--plugins DIR"]),
    ("no such attribute", {"model": f"{PKG}.nets:nothing"}, ["has no attribute 'nothing'"]),
    ("wrong kind: a solver as model", {"model": f"{PKG}.opt:Sign"}, ["is a solver class, not a model plugin"]),
    ("wrong kind: a model as solver", {"solver": f"{PKG}.nets:build"}, ["is a function, not a solver plugin"]),
    ("wrong kind: a value", {"data": f"{PKG}.nets:CONSTANT"}, ["is the int 3, not a data plugin"]),
    ("wrong kind: a module as data", {"data": f"{PKG}.nets:Good"}, ["is an nn.Module, not a data plugin"]),
    ("orphan parameter", {"model": f"{PKG}.nets:orphan"}, ["parameter 'scale'", "orphan"]),
    ("duplicated parameter", {"model": f"{PKG}.nets:shared"}, ["parameter 'blocks.1.weight'", "doubly owned"]),
    ("wrong return type", {"model": f"{PKG}.nets:not_a_module"}, ["returned int, not Module"]),
    ("bad signature", {"model": f"{PKG}.nets:bad_signature"}, ["bad signature bad_signature(n_outputs)"]),
    ("plugin raises", {"model": f"{PKG}.nets:raises"}, ["raised RuntimeError: out of ideas"]),
    ("forward raises", {"model": f"{PKG}.nets:wrong_inputs"},
     ["forward on a batch of the training data (2, 4) raised RuntimeError"]),
    ("wrong output shape", {"model": f"{PKG}.nets:wrong_outputs"},
     ["output for 2 samples is (2, 3); a classification task with n_outputs = 2 needs (2, 2)"]),
    ("data wrong return type", {"data": f"{PKG}.data:wrong_type"}, ["returned tuple, not DataBundle"]),
    ("data bad labels", {"data": f"{PKG}.data:bad_labels"}, ["targets lie in [5, 5]"]),
    ("unknown data argument", {"extra": "[data.args]\nbogus = 1\n"}, ["bad signature load(n=120, seed=0)",
                                                                       "unexpected keyword argument 'bogus'"]),
    ("solver without norms", {"solver": f"{PKG}.opt:NoNorms"}, ["step returned NoneType, not (r2, d2)"]),
    ("solver state count", {"solver": f"{PKG}.opt:BadState"}, ["n_state = 'two'"]),
    ("prefix orphan", {"model": f"{PKG}.nets:plain", "model_extra": 'blocks = ["1", "4"]'},
     ["parameter '2.weight' belongs to no block (orphan)", "add a prefix that names it (e.g. '2')"]),
    ("prefix matching nothing", {"model": f"{PKG}.nets:plain", "model_extra": 'blocks = ["1|2", "4", "fc"]'},
     ["entry 'fc' matches no parameter"]),
    ("stopper of the wrong kind", {"extra": f'[[stop]]\nkind = "{PKG}.opt:Sign"\n'},
     ["is a solver class, not a stopper plugin"]),
    ("stopper bad keys", {"extra": f'[[stop]]\nkind = "{PKG}.stop:After"\nwindow = 3\n'},
     ["unexpected keyword argument 'window'"]),
]


@pytest.mark.parametrize("what,kwargs,words", ERRORS, ids=[e[0] for e in ERRORS])
def test_every_plugin_error_is_one_line_and_exit_2(plugdir, tmp_path, capsys, what, kwargs, words):
    code, out, err = check(plugdir, tmp_path, recipe(**kwargs), capsys)
    assert code == 2, (what, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_good_plugins_pass_check_with_their_blocks(plugdir, tmp_path, capsys):
    extra = f'[algorithm.args]\nscale = 0.5\n[[stop]]\nkind = "{PKG}.stop:After"\nrounds = 1\n[model.args]\nwidth = 6\n'
    text = recipe(solver=f"{PKG}.opt:Sign", extra=extra)
    code, out, err = check(plugdir, tmp_path, text, capsys)
    assert code == 0, err
    assert out.startswith("ok: ") and "2 blocks" in out
    # the partition rules: children (3 modules with parameters), prefixes (2 entries)
    code, out, err = check(plugdir, tmp_path, recipe(model=f"{PKG}.nets:plain", model_extra='blocks = "children"'),
                           capsys)
    assert code == 0 and "3 blocks" in out, err
    code, out, err = check(plugdir, tmp_path, recipe(model=f"{PKG}.nets:plain", model_extra='blocks = ["1|2", "4"]'),
                           capsys)
    assert code == 0 and "2 blocks" in out, err


def test_a_real_subprocess_exits_2_with_one_line(plugdir, tmp_path):
    (tmp_path / "r.toml").write_text(recipe(model=f"{PKG}.nets:orphan"))
    done = run_cli("--plugins", plugdir, "check", "r.toml", cwd=tmp_path, env=cli_env())
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "orphan" in done.stderr and "Traceback" not in done.stderr
    missing = run_cli("--plugins", tmp_path / "nowhere", "check", "r.toml", cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "no such folder" in missing.stderr


def test_plugin_run_trains_and_the_plugin_stopper_ends_it(plugdir, tmp_path, capsys):
    text = recipe(solver=f"{PKG}.opt:Sign", extra=f'[[stop]]\nkind = "{PKG}.stop:After"\nrounds = 2\n')
    (tmp_path / "r.toml").write_text(text.replace("rounds = 2\n[data]", "rounds = 9\n[data]"))
    code = main(["--plugins", str(plugdir), "run", str(tmp_path / "r.toml"), "--runs-dir", str(tmp_path / "runs"),
                 "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "finished: after 2" in out
    from bcdcore.api import load_run

    run = load_run(next((tmp_path / "runs").iterdir()))
    assert list(run.history["round"]) == [1.0, 2.0]  # the stopper, not the 9 rounds, ended it
    assert 'kind = "p15plug.stop:After"' in (run.path / "recipe.toml").read_text()


def test_recipe_keys_of_plugins_are_validated_without_importing():
    ok = parse_recipe({"model": {"name": "a.b:c", "blocks": ["x|y", "z"], "args": {"depth": 2}},
                       "sweep": {"model.args.depth": [1, 2]}})
    assert ok.model.blocks == ["x|y", "z"] and ok.sweep == {"model.args.depth": [1, 2]}
    for raw, words in [({"model": {"name": "mlp", "args": {"a": 1}}}, "model.args: applies to plugin models"),
                       ({"model": {"name": "a.b:c", "blocks": ["x", "x"]}}, "listed twice"),
                       ({"model": {"name": "a.b:c", "blocks": "rows"}}, "unknown rule 'rows'"),
                       ({"model": {"name": "a.b:c", "args": {"not ok": 1}}}, "not a Python keyword"),
                       ({"data": {"name": "digits", "args": {"n": 1}}}, "data.args: applies to plugin datasets"),
                       ({"algorithm": {"args": {"n": 1}}}, "algorithm.args: applies to plugin solvers"),
                       ({"model": {"name": "a.b:c"}, "sweep": {"model.width.x": [1]}}, "SECTION.args.KEY"),
                       ({"model": {"name": "a..b"}}, "not a plugin path")]:
        with pytest.raises(RecipeError, match=None) as info:
            parse_recipe(raw)
        assert words in str(info.value) and "\n" not in str(info.value)


MODULE_NAMES = ["0", "1", "2", "3", "4"]  # the top-level children of nets.plain


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from(MODULE_NAMES + ["9", "1.weight", "2.running_mean"]), min_size=1,
                         max_size=3, unique=True), min_size=1, max_size=5))
def test_any_prefix_partition_owns_each_parameter_once_or_says_why(entries):
    from torch import nn

    from bcdcore.models.plugin import partition

    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    rule = ["|".join(e) for e in entries]
    try:
        groups = partition(net, rule)
    except ValueError as exc:
        assert "\n" not in str(exc) and ("orphan" in str(exc) or "matches no parameter" in str(exc))
        return
    owned = [n for _, ps, _ in groups for n in ps]
    assert sorted(owned) == sorted(n for n, _ in net.named_parameters())  # each exactly once
    buffers = [n for _, _, bs in groups for n in bs]
    assert sorted(buffers) == sorted(n for n, _ in net.named_buffers())
    for label, ps, _ in groups:  # first matching entry wins
        for name in ps:
            first = next(i for i, e in enumerate(entries) if any(name == p or name.startswith(p + ".") for p in e))
            assert groups[first][0] == label


def test_model_config_keeps_builtin_recipes_unchanged():
    from bcdcore.recipe import Recipe

    r = Recipe()
    assert "blocks" not in r.to_dict()["model"] and "args" not in r.to_dict()["model"]
    assert ModelConfig().blocks == "auto"


def test_a_tied_weight_belongs_to_the_block_of_its_first_name_and_trains(tmp_path):
    """Tied weights, as the built-in nanogpt ties them: the embedding's block owns the shared matrix."""
    import torch
    from torch import nn

    import bcdcore
    from bcdcore.data import DataBundle, Split
    from bcdcore.models.plugin import partition
    from bcdcore.rundir import read_events

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.encode = nn.Linear(6, 4, bias=False)
            self.middle = nn.Linear(4, 4)
            self.decode = nn.Linear(4, 6)
            self.decode.weight = self.encode.weight  # tied (used transposed in forward)

        def forward(self, x):
            h = torch.tanh(self.middle(self.encode(x)))
            return h @ self.encode.weight + self.decode.bias

    net = Tied()
    groups = partition(net, ["encode", "middle", "decode"])
    assert [ps for _, ps, _ in groups] == [["encode.weight"], ["middle.weight", "middle.bias"], ["decode.bias"]]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 6, generator=g)
    before = net.encode.weight.detach().clone()
    run = bcdcore.train({"run": {"name": "tied", "rounds": 2, "device": "cpu"}, "data": {"batch_size": 16},
                         "model": {"blocks": ["encode", "middle", "decode"]}, "algorithm": {"K": 2}},
                        model=net, data=DataBundle("t", "classification", (6,), 6, Split(x, x.argmax(1))),
                        runs_dir=tmp_path)
    assert run.state == "finished"
    start = next(e for e in read_events(run.path) if e["kind"] == "start")
    assert start["block_sizes"] == [24, 20, 6]  # the shared matrix counted once, in the encoder's block
    assert net.decode.weight is net.encode.weight and not torch.equal(before, net.encode.weight.detach())


def test_plugin_weights_come_from_a_local_state_dict(plugdir, tmp_path, monkeypatch):
    import torch

    from bcdcore.models import build_model

    monkeypatch.syspath_prepend(str(plugdir))
    cfg = ModelConfig(name=f"{PKG}.nets:build", args={"width": 5})
    first = build_model(cfg, (4,), 2, seed=1)
    torch.save(first.net.state_dict(), tmp_path / "w.pt")
    other = build_model(ModelConfig(name=cfg.name, args=cfg.args, weights=str(tmp_path / "w.pt")), (4,), 2, seed=2)
    for key, value in first.net.state_dict().items():
        assert torch.equal(other.net.state_dict()[key], value)
    (tmp_path / "code.pt").write_bytes(b"\x80\x04cos\nsystem\n.")  # a pickle that would run code: refused
    with pytest.raises(ValueError, match="cannot read it as a torch state_dict") as info:
        build_model(ModelConfig(name=cfg.name, weights=str(tmp_path / "code.pt")), (4,), 2, seed=2)
    assert "\n" not in str(info.value)


TOML_SCALARS = st.one_of(st.integers(-2**53, 2**53), st.booleans(), st.text(max_size=12),
                         st.floats(allow_nan=False, allow_infinity=False))
ARGS = st.dictionaries(st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True),
                       st.one_of(TOML_SCALARS, st.lists(st.integers(-99, 99), max_size=3),
                                 st.dictionaries(st.from_regex(r"[a-z]{1,5}", fullmatch=True), TOML_SCALARS,
                                                 max_size=2)), max_size=4)


@settings(max_examples=60, deadline=None)
@given(model_args=ARGS, data_args=ARGS, solver_args=ARGS)
def test_args_tables_survive_the_resolved_recipe(model_args, data_args, solver_args):
    """Whatever a plugin's args hold, the run directory's recipe.toml reads back to the same recipe (and hash)."""
    from bcdcore.recipe import flatten, parse_toml, to_toml

    raw = {"model": {"name": "pkg.nets:build", "args": model_args}, "data": {"name": "pkg.data:load",
                                                                              "args": data_args},
           "algorithm": {"solver": "pkg.opt:Lion", "args": solver_args}}
    recipe = parse_recipe(raw)
    again = parse_recipe(parse_toml(to_toml(recipe.to_dict()), "resolved.toml"))
    assert again.to_dict() == recipe.to_dict() and again.digest() == recipe.digest()
    flat = flatten(recipe.to_dict())
    for key, value in model_args.items():
        if not isinstance(value, dict):
            assert flat[f"model.args.{key}"] == value  # what the TUI's recipe diff and plot legends show


@pytest.mark.parametrize("schedule", ["jacobi", "gauss_seidel"])
def test_a_plugin_solver_reproduces_the_builtin_one_under_the_rule_and_damping(plugdir, tmp_path, monkeypatch,
                                                                               schedule):
    """The engine's side of the contract (the rule's skip, damping, state policy) around a plain PyTorch step:
    sgd written as a plugin gives the built-in sgd's numbers, early stops included."""
    import numpy as np

    import bcdcore
    from bcdcore.rundir import read_events

    monkeypatch.syspath_prepend(str(plugdir))
    base = recipe(extra="")
    base = base.replace("rounds = 2", "rounds = 4").replace("K = 2", "K = 6").replace("lambda = 0.01", "lambda = 0.5")
    base = base.replace("lr = 0.05", f"lr = 0.05\naccuracy_factor = 10.0\ngamma = 0.7\nschedule = \"{schedule}\"")
    base = base.replace('device = "cpu"', 'device = "cpu"\nops_backend = "reference"')
    runs = {}
    for solver in ("sgd", f"{PKG}.opt:PlainSGD"):
        runs[solver] = bcdcore.train(base.replace('solver = "sgd"', f'solver = "{solver}"'), runs_dir=tmp_path)
    builtin, plugin = runs["sgd"], runs[f"{PKG}.opt:PlainSGD"]
    np.testing.assert_allclose(plugin.history["train_loss"], builtin.history["train_loss"], rtol=1e-6)
    np.testing.assert_allclose(plugin.history["val_loss"], builtin.history["val_loss"], rtol=1e-6)

    def blocks(run):
        return [(e["round"], e["block"], e["inner_steps"], e["stopped_early"], e["passes"])
                for e in read_events(run.path) if e["kind"] == "block"]

    assert blocks(plugin) == blocks(builtin)
    stops = [stopped for *_, stopped, _ in blocks(plugin)]
    assert any(stops) and not all(stops)  # the rule stopped some blocks early, not all

