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
    assert main(["export", run_dir, "--onnx"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no checkpoint.pt" in err[0]
