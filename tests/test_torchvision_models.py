"""Any torchvision model: `[model] name = "torchvision:resnet50"`, partitioned by prefix patterns, trains a
blockwise round on synthetic 3x64x64 images (one round, K = 1, a tiny batch) and exports to ONNX; weights come
from a local file only (weights_only), and a missing file is one line, exit 2."""
from __future__ import annotations

import pytest
import torch
from conftest import run_cli

import bcdcore
from bcdcore.data import DataBundle, Split
from bcdcore.export import export_onnx, load_trained
from bcdcore.models import build_model
from bcdcore.recipe import ModelConfig

pytestmark = pytest.mark.usefixtures("single_torch_thread")

RESNET_BLOCKS = ["conv1|bn1", "layer1", "layer2", "layer3", "layer4", "fc"]


def images(n: int = 16, seed: int = 0) -> DataBundle:
    """Synthetic 3x64x64 images, 4 classes; only a training split (the engine carves val and test)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 64, 64, generator=g)
    return DataBundle("synthetic64", "classification", (3, 64, 64), 4, Split(x, torch.arange(n) % 4))


def one_round(name: str, tmp_path, blocks: list[str]) -> bcdcore.RunResult:
    return bcdcore.train({"run": {"name": name, "rounds": 1, "device": "cpu"}, "data": {"batch_size": 2},
                          "model": {"name": f"torchvision:{name}", "blocks": blocks},
                          "algorithm": {"K": 1, "lambda": 0.1, "lr": 0.01}, "eval": {"batch_size": 4}},
                         data=images, runs_dir=tmp_path)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_partitioned_by_patterns_trains_a_round_and_exports(name, tmp_path):
    import torchvision

    run = one_round(name, tmp_path, RESNET_BLOCKS)
    assert run.state == "finished" and run.exit_code == 0
    assert list(run.history["round"]) == [1.0]
    assert run.final["grad_evals"] > 0 and 0 <= run.final["test_acc"] <= 1
    start = next(e for e in bcdcore_events(run.path) if e["kind"] == "start")
    reference = dict(torchvision.models.get_model(name, num_classes=4).named_parameters())
    expected = [sum(p.numel() for n, p in reference.items() if n.split(".")[0] in entry.split("|"))
                for entry in RESNET_BLOCKS]
    assert start["n_blocks"] == 6 and start["block_sizes"] == expected
    prepared = load_trained(run.path)
    for group in prepared.model.blocks:  # BatchNorm statistics move with the block that owns the layer
        prefixes = tuple(group.label.split("|"))
        assert all(n.split(".")[0] in prefixes for n in group.buffer_names)
    assert sum(len(g.buffer_names) for g in prepared.model.blocks) == len(dict(prepared.model.net.named_buffers()))
    out = export_onnx(run.path)
    assert out.is_file() and out.stat().st_size > 1_000_000


def bcdcore_events(path):
    from bcdcore.rundir import read_events

    return list(read_events(path))


def test_children_is_the_default_partition_and_weights_come_from_a_local_file(tmp_path):
    import torchvision

    source = torchvision.models.resnet18(num_classes=4)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "r18.pt")
    model = build_model(ModelConfig(name="torchvision:resnet18", weights=str(tmp_path / "r18.pt")), (3, 64, 64), 4,
                        seed=7)
    assert [g.label for g in model.blocks] == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"]
    for key, value in source.state_dict().items():
        assert torch.equal(model.net.state_dict()[key], value), key
    again = build_model(ModelConfig(name="torchvision:resnet18"), (3, 64, 64), 4, seed=7)
    other = build_model(ModelConfig(name="torchvision:resnet18"), (3, 64, 64), 4, seed=8)
    assert torch.equal(again.net.fc.weight, build_model(ModelConfig(name="torchvision:resnet18"), (3, 64, 64), 4,
                                                        seed=7).net.fc.weight)  # the seed decides the weights
    assert not torch.equal(again.net.fc.weight, other.net.fc.weight)
    with pytest.raises(ValueError, match="does not fit the model"):
        build_model(ModelConfig(name="torchvision:resnet18", weights=str(tmp_path / "r18.pt")), (3, 64, 64), 10, 0)


def test_missing_weights_file_and_unknown_builder_are_one_line_exit_2(tmp_path):
    (tmp_path / "r.toml").write_text('[run]\nname = "tv"\n[data]\nname = "digits"\nchannels = 3\n[model]\n'
                                     'name = "torchvision:resnet18"\nweights = "nowhere.pt"\n')
    done = run_cli("check", "r.toml", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "model.weights" in done.stderr and "no such file 'nowhere.pt'" in done.stderr
    (tmp_path / "r.toml").write_text('[run]\nname = "tv"\n[data]\nname = "digits"\nchannels = 3\n[model]\n'
                                     'name = "torchvision:resnet51"\n')
    done = run_cli("check", "r.toml", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "has no builder 'resnet51' (did you mean 'resnet50'?)" in done.stderr
