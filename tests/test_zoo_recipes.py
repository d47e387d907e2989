"""Shipped zoo recipes: each says whether it needs downloaded files, each prepares (data + model + trainer)
against tiny datasets in the real formats, and the nanoGPT recipe, run as shipped through the CLI, brings the
validation loss far below the unigram (character-frequency) baseline."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, cli_env
from zoo_files import write_california, write_cifar, write_image_tree, write_imdb, write_mnist, write_svhn

from bcdcore.data import load_data
from bcdcore.recipe import DATASETS, MODELS, load_recipe
from bcdcore.run import prepare

RECIPES = sorted((REPO / "recipes").glob("*.toml"))
ZOO = [p for p in RECIPES if load_recipe(p).data.name not in ("digits", "digits_flat", "diabetes",
                                                                 "toy_regression", "quadratic")]


def top_comment(path: Path) -> str:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# "))
    return " ".join(lines)


def test_a_recipe_for_every_zoo_model_and_dataset():
    recipes = [load_recipe(p) for p in RECIPES]
    used_data = {r.data.name for r in recipes}
    used_models = {r.model.name for r in recipes}
    assert {n for n, spec in DATASETS.items() if spec.files or n == "stdlib_text"} <= used_data
    assert {"resnet18", "resnet34", "nanogpt", "mlp_ensemble", "cnn_ensemble", "text_classifier"} <= used_models
    assert used_models <= set(MODELS)


@pytest.mark.parametrize("path", ZOO, ids=[p.stem for p in ZOO])
def test_zoo_recipe_says_whether_it_needs_downloaded_files(path):
    comment = top_comment(path)
    needs = bool(DATASETS[load_recipe(path).data.name].files)
    assert comment, f"{path.name} has no top comment"
    assert ("Needs downloaded files" in comment) == needs, comment
    assert ("Offline: needs no downloaded files" in comment) == (not needs), comment


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_mnist(root, per_class_train=6, n_test=10)
    write_mnist(root, folder="FashionMNIST", per_class_train=3, n_test=10, gz=True)
    write_cifar(root, per_batch=4)
    write_cifar(root, hundred=True, per_batch=20)
    write_svhn(root)
    classes = ["n01", "n02"]
    write_image_tree(root / "imagenet" / "train", classes, per_class=4)
    write_image_tree(root / "imagenet" / "val", classes, per_class=1)
    write_image_tree(root / "mini_imagenet" / "train", classes, per_class=6)
    words = "good great fine bad awful poor".split()
    write_imdb(root, {s: {lab: [" ".join(words[i % 6:i % 6 + 3]) for i in range(8)] for lab in ("pos", "neg")}
                      for s in ("train", "test")})
    write_california(root, n=60)
    return root


@pytest.mark.parametrize("path", [p for p in ZOO if DATASETS[load_recipe(p).data.name].files],
                         ids=lambda p: p.stem)
def test_zoo_recipe_prepares_on_tiny_files(path, tiny_root):
    overrides = [f'data.root="{tiny_root}"', 'run.device="cpu"']
    recipe = load_recipe(path)
    if recipe.data.name in ("mini_mnist", "mnist_8ch"):
        overrides.append("data.per_class=4")  # the tiny files hold 6 training images per class
    p = prepare(load_recipe(path, overrides))
    assert len(p.data.train) > 0 and len(p.data.test) > 0
    assert p.params.n_blocks == len(p.model.blocks) >= 2
    x = p.data.val.x[:2] if len(p.data.val) else p.data.test.x[:2]
    p.model.eval()
    with torch.no_grad():
        out = p.model(x)
    assert out.shape[0] == len(x) and torch.isfinite(out).all()


def test_nanogpt_recipe_beats_the_unigram_baseline(tmp_path):
    recipe = REPO / "recipes" / "nanogpt_stdlib.toml"
    r = load_recipe(recipe)
    baseline = load_data(r.data, r.run.seed).info["unigram_val_loss"]
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bcdcore", "run", str(recipe), "--quiet", "--set",
                           'run.device="cpu"', "--runs-dir", str(tmp_path / "runs")],
                          cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
               if '"metric"' in line]
    val = [m["val_loss"] for m in metrics if isinstance(m.get("val_loss"), float)]
    print(f"nanogpt_stdlib: val_loss {val[-1]:.3f} (unigram baseline {baseline:.3f}) in {seconds:.0f} s; "
          f"curve {[round(v, 3) for v in val]}")
    assert val[-1] < baseline - 0.5, (val, baseline)  # clearly below: > 0.5 nats/char better
    assert metrics[-1]["test_loss"] < baseline - 0.4
    assert 0 < metrics[-1]["val_acc"] < 1  # token accuracy


# ----------------------------------------------------------------------------------------------------------
# Validation of the zoo keys (pure Python, no data read)

BASE = {"data": {"name": "cifar10"}, "model": {"name": "resnet18"}}


def zoo_error(data: dict | None = None, model: dict | None = None) -> str:
    from bcdcore.recipe import RecipeError, parse_recipe

    raw = {"data": {**BASE["data"], **(data or {})}, "model": {**BASE["model"], **(model or {})}}
    with pytest.raises(RecipeError) as info:
        parse_recipe(raw)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("data,model,fragments", [
    ({"augment": True, "name": "mnist"}, {}, ["data.augment", "does not apply to dataset 'mnist'"]),
    ({"seq_len": 64}, {}, ["data.seq_len", "its options: augment"]),
    ({}, {"cifar_stem": True, "name": "mlp"}, ["model.cifar_stem", "does not apply to model 'mlp'",
                                               "resnet18, resnet34"]),
    ({}, {"members": 5}, ["model.members", "mlp_ensemble, cnn_ensemble"]),
    ({}, {"batch_norm": False}, ["model.batch_norm", "does not apply to model 'resnet18'"]),
    ({}, {"name": "nanogpt"}, ["model.name", "embeds token ids but dataset 'cifar10' gives features"]),
    ({"name": "imdb"}, {"name": "mlp"}, ["model.name", "'imdb' gives token ids", "text_classifier"]),
    ({"name": "imdb"}, {"name": "nanogpt"}, ["model.name", "text_classifier"]),
    ({"name": "stdlib_text"}, {"name": "text_classifier"}, ["model.name", "language-model task", "nanogpt"]),
    ({"name": "stdlib_text"}, {"name": "nanogpt", "n_embd": 30, "n_head": 4}, ["model.n_head", "must divide"]),
    ({}, {"name": "mlp_ensemble", "voting": "majority"}, ["model.voting", "average, random"]),
    ({}, {"name": "mlp_ensemble", "members": 0}, ["model.members", ">= 1"]),
    ({}, {"weights": "/no/such/file.pt"}, ["model.weights", "no such file"]),
    ({"name": "mini_mnist", "per_class": -1}, {"name": "mlp"}, ["data.per_class", ">= 0"]),
    ({"name": "imdb", "vocab_size": 2}, {"name": "text_classifier"}, ["data.vocab_size", ">= 3"]),
    ({"name": "stdlib_text", "seq_len": 1}, {"name": "nanogpt"}, ["data.seq_len", ">= 2"]),
])
def test_zoo_keys_are_validated(data, model, fragments):
    message = zoo_error(data, model)
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("path", ZOO, ids=[p.stem for p in ZOO])
def test_zoo_recipe_resolved_form_round_trips(path, tmp_path):
    from bcdcore.recipe import to_toml

    recipe = load_recipe(path)
    resolved = tmp_path / "resolved.toml"
    resolved.write_text(to_toml(recipe.to_dict()))
    again = load_recipe(resolved)
    assert again.to_dict() == recipe.to_dict()
