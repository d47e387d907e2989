"""Measurements inside a run: measure events, figures, and lambda = "auto" feeding the block updates."""
from __future__ import annotations

import math

from conftest import tiny_recipe

from bcdcore.cli import main
from bcdcore.rundir import read_events

AUTO = tiny_recipe(replace={"lambda = 0.01": 'lambda = "auto"\nlambda_every = 2', "rounds = 3": "rounds = 4"},
                   append='\n[[measure]]\nunit = "memory"\nevery = 2\n')


def run(tmp_path, text, capsys) -> tuple[int, str]:
    (tmp_path / "r.toml").write_text(text)
    code = main(["run", str(tmp_path / "r.toml"), "--runs-dir", str(tmp_path / "runs"), "--quiet"])
    out = capsys.readouterr()
    run_dir = next((l.split(": ", 1)[1] for l in out.out.splitlines() if l.startswith("run directory")), "")
    return code, run_dir or out.err


def test_auto_lambda_sets_every_block_lambda_from_the_measurement(tmp_path, capsys):
    code, run_dir = run(tmp_path, AUTO, capsys)
    assert code == 0
    measures = [e for e in read_events(run_dir, "measure") if e.get("purpose") == "lambda auto"]
    assert [m["round"] for m in measures] == [0, 2]  # at the start, then every lambda_every rounds
    blocks = read_events(run_dir, "block")
    for m in measures:
        n = len(m["row_norms"])
        expected = math.sqrt(n) * max(m["row_norms"])
        assert m["lambda"] == [expected] * n and expected > 0
        used = {b["lambda"] for b in blocks if m["round"] < b["round"] <= m["round"] + 2}
        assert used == {expected}
        assert (tmp_path / "runs" / run_dir.split("/")[-1] / m["figure"]).is_file()


def test_memory_measure_events_every_n_rounds(tmp_path, capsys):
    code, run_dir = run(tmp_path, AUTO, capsys)
    memory = [e for e in read_events(run_dir, "measure") if e["unit"] == "memory"]
    assert [e["round"] for e in memory] == [2, 4]
    n_params = read_events(run_dir, "start")[0]["block_sizes"]
    assert memory[0]["parameters"] == 4 * sum(n_params)
    assert memory[0]["value"] >= 3 * 4 * sum(n_params)  # parameters, gradients, anchor (+ next)


def test_unknown_third_party_unit_is_a_recipe_error(tmp_path, capsys):
    text = tiny_recipe(append='\n[[measure]]\nunit = "nosuchpkg.module:Thing"\n')
    code, err = run(tmp_path, text, capsys)
    assert code == 2 and "measure.unit" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()
