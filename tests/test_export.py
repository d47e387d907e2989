"""bcdcore export --onnx: every model family passes onnx.checker and matches torch on a batch."""
from __future__ import annotations

import onnx
import pytest
from conftest import tiny_recipe

from bcdcore.cli import main

FAMILIES = {  # model: (widths, dataset)
    "mlp": ("[16]", "digits_flat"),
    "linear": ("[16]", "digits_flat"),
    "block_linear": ("[]", "digits_flat"),
    "cnn": ("[4, 4]", "digits"),
    "residual_cnn": ("[4, 8]", "digits"),
}


def train_tiny(tmp_path, model: str, widths: str, dataset: str, capsys):
    text = tiny_recipe(replace={'name = "mlp"': f'name = "{model}"', "widths = [16]": f"widths = {widths}",
                                'name = "digits_flat"': f'name = "{dataset}"', "rounds = 3": "rounds = 1"})
    recipe = tmp_path / "r.toml"
    recipe.write_text(text)
    assert main(["run", str(recipe), "--runs-dir", str(tmp_path / "runs"), "--quiet"]) == 0
    out = capsys.readouterr().out
    return next(line for line in out.splitlines() if line.startswith("run directory: ")).split(": ", 1)[1]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_every_family(family, tmp_path, capsys):
    run_dir = train_tiny(tmp_path, family, *FAMILIES[family], capsys)
    assert main(["export", run_dir, "--onnx"]) == 0
    assert "outputs match torch" in capsys.readouterr().out
    model = onnx.load(f"{run_dir}/model.onnx")
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input][:1] == ["input"]


def test_export_without_checkpoint_fails_clearly(tmp_path, capsys):
    run_dir = train_tiny(tmp_path, "mlp", *FAMILIES["mlp"], capsys)
    (tmp_path / "runs").joinpath(run_dir.split("/")[-1], "checkpoint.pt").unlink()
    assert main(["export", run_dir, "--onnx"]) == 2  # bad input: no checkpoint to export
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no checkpoint.pt" in err[0]


ZOO = {  # family: ([data] lines, [model] lines); one round of one active block keeps training short
    "resnet18": ('name = "digits"\nimage_size = 32\nchannels = 3', 'name = "resnet18"\ncifar_stem = true'),
    "nanogpt": ('name = "stdlib_text"\nseq_len = 16\ncorpus_chars = 20000',
                'name = "nanogpt"\nn_layer = 1\nn_head = 2\nn_embd = 16'),
    "mlp_ensemble": ('name = "digits_flat"', 'name = "mlp_ensemble"\nwidths = [8]\nmembers = 2'),
    "cnn_ensemble": ('name = "digits"', 'name = "cnn_ensemble"\nwidths = [4]\nmembers = 2\nvoting = "random"'),
    "text_classifier": ('name = "imdb"\nroot = "{root}"\nseq_len = 12\nvocab_size = 50',
                        'name = "text_classifier"\nwidths = [8]\nn_embd = 8'),
}


def zoo_recipe(data: str, model: str) -> str:
    return f"""[run]
name = "zoo"
device = "cpu"
rounds = 1

[data]
{data}
batch_size = 8

[model]
{model}

[algorithm]
K = 1
active_share = 0.01
lr = 0.01

[eval]
every = 0
"""


@pytest.mark.parametrize("family", list(ZOO))
def test_export_every_zoo_family(family, tmp_path, capsys):
    data, model = ZOO[family]
    if family == "text_classifier":
        from zoo_files import write_imdb

        words = "good bad great awful fine dull".split()
        texts = {label: [" ".join(words[(i + j) % 6] for j in range(10)) for i in range(6)]
                 for label in ("pos", "neg")}
        write_imdb(tmp_path / "data", {"train": texts, "test": texts})
        data = data.format(root=tmp_path / "data")
    (tmp_path / "r.toml").write_text(zoo_recipe(data, model))
    assert main(["run", str(tmp_path / "r.toml"), "--runs-dir", str(tmp_path / "runs"), "--quiet"]) == 0
    out = capsys.readouterr().out
    run_dir = next(line for line in out.splitlines() if line.startswith("run directory: ")).split(": ", 1)[1]
    assert main(["export", run_dir, "--onnx"]) == 0, capsys.readouterr().err
    assert "outputs match torch" in capsys.readouterr().out
    onnx.checker.check_model(onnx.load(f"{run_dir}/model.onnx"))
