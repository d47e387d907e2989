"""Zoo models: torchvision-exact ResNets, nanoGPT with resolved weight tying, ensembles, the text classifier;
and for every model of the catalogue: blocks cover every parameter exactly once, and one round of training in
blockwise and in entire mode on CPU."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from bcdcore.algorithm import BlockwiseTrainer, EntireTrainer
from bcdcore.data import TokenShape
from bcdcore.data.batches import BatchStream, stream_seed
from bcdcore.models import BlockModel, block_sizes, build_model
from bcdcore.models.ensembles import EnsembleModel
from bcdcore.models.gpt import LMHead
from bcdcore.models.resnet import (
    BasicBlock,
    ResNetHead,
    ResNetStem,
    load_torchvision_state_dict,
    to_torchvision_state_dict,
)
from bcdcore.params import FlatParams
from bcdcore.recipe import MODELS, AlgorithmConfig, ModelConfig

pytestmark = pytest.mark.usefixtures("single_torch_thread")  # these models are tiny: see conftest


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------
# ResNet-18/34 against torchvision

@pytest.mark.parametrize("name,units", [("resnet18", 8), ("resnet34", 16)])
def test_resnet_matches_torchvision_logits(name, units):
    tv = getattr(torchvision.models, name)(weights=None).eval()
    ours = build_model(ModelConfig(name=name), (3, 64, 64), 1000, seed=0)
    assert len(ours.blocks) == units + 2
    assert isinstance(ours.blocks[0], ResNetStem) and isinstance(ours.blocks[-1], ResNetHead)
    assert all(isinstance(b, BasicBlock) for b in ours.blocks[1:-1])
    assert sum(block_sizes(ours)) == sum(p.numel() for p in tv.parameters())
    load_torchvision_state_dict(ours, tv.state_dict())  # strict: every key mapped, every shape equal
    ours.eval()
    x = torch.randn(2, 3, 64, 64, generator=gen(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x), rtol=1e-5, atol=1e-5)
    # and back: our weights load strictly into torchvision under its own names
    back = getattr(torchvision.models, name)(weights=None).eval()
    back.load_state_dict(to_torchvision_state_dict(ours), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(back(x), tv(x), rtol=0, atol=0)


def test_resnet_grouped_still_maps_to_torchvision():
    tv = torchvision.models.resnet18(weights=None).eval()
    ours = build_model(ModelConfig(name="resnet18", group=3), (3, 48, 48), 1000, seed=0)
    assert len(ours.blocks) == 3
    load_torchvision_state_dict(ours, tv.state_dict())
    x = torch.randn(1, 3, 48, 48, generator=gen(2))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), tv(x), rtol=1e-5, atol=1e-5)


def test_resnet_mismatched_state_dicts_raise_clear_errors(tmp_path):
    r18 = torchvision.models.resnet18(weights=None).state_dict()
    r34 = build_model(ModelConfig(name="resnet34"), (3, 32, 32), 1000, 0)
    with pytest.raises(ValueError, match=r"does not match resnet34: missing layer1\.2\.bn1\.bias"):
        load_torchvision_state_dict(r34, r18)
    r18_10 = build_model(ModelConfig(name="resnet18"), (3, 32, 32), 10, 0)
    with pytest.raises(ValueError, match=r"fc\.weight has shape \(1000, 512\) in the file but \(10, 512\)"):
        load_torchvision_state_dict(r18_10, r18)
    cifar = build_model(ModelConfig(name="resnet18", cifar_stem=True), (3, 32, 32), 1000, 0)
    with pytest.raises(ValueError, match=r"conv1\.weight has shape \(64, 3, 7, 7\) in the file but \(64, 3, 3, 3\)"):
        load_torchvision_state_dict(cifar, r18)
    extra = dict(r18, **{"extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected extra\.weight"):
        load_torchvision_state_dict(build_model(ModelConfig(name="resnet18"), (3, 32, 32), 1000, 0), extra)
    # the recipe key model.weights loads a saved torchvision state_dict at build time
    path = tmp_path / "r18.pt"
    torch.save(r18, path)
    loaded = build_model(ModelConfig(name="resnet18", weights=str(path)), (3, 32, 32), 1000, 0)
    assert torch.equal(loaded.blocks[0].conv1.weight, r18["conv1.weight"])
    with pytest.raises(ValueError, match=r"model\.weights = .*r18\.pt.*fc\.weight has shape"):
        build_model(ModelConfig(name="resnet18", weights=str(path)), (3, 32, 32), 10, 0)


def test_resnet_cifar_stem():
    std = build_model(ModelConfig(name="resnet18"), (3, 32, 32), 10, 0)
    cifar = build_model(ModelConfig(name="resnet18", cifar_stem=True), (3, 32, 32), 10, 0)
    assert std.blocks[0].conv1.kernel_size == (7, 7) and isinstance(std.blocks[0].maxpool, nn.MaxPool2d)
    assert cifar.blocks[0].conv1.kernel_size == (3, 3) and cifar.blocks[0].conv1.stride == (1, 1)
    assert isinstance(cifar.blocks[0].maxpool, nn.Identity)
    x = torch.randn(2, 3, 32, 32, generator=gen())
    with torch.no_grad():
        assert cifar.blocks[0](x).shape == (2, 64, 32, 32) and std.blocks[0](x).shape == (2, 64, 8, 8)
        assert cifar.eval()(x).shape == (2, 10)
    gray = build_model(ModelConfig(name="resnet34"), (1, 28, 28), 10, 0)  # e.g. MNIST: conv1 takes 1 channel
    assert gray.blocks[0].conv1.in_channels == 1


# ----------------------------------------------------------------------------------------------------------
# nanoGPT

VOCAB, T = 11, 8


def gpt(**kw) -> BlockModel:
    cfg = dict(name="nanogpt", n_layer=3, n_head=2, n_embd=16)
    cfg.update(kw)
    return build_model(ModelConfig(**cfg), TokenShape((T,), VOCAB), VOCAB, seed=0)


def test_nanogpt_blocks_and_causality():
    model = gpt().eval()
    assert len(model.blocks) == 3 + 2
    assert [type(b).__name__ for b in model.blocks] == ["Embeddings"] + ["TransformerLayer"] * 3 + ["LMHead"]
    assert model.blocks[0].wpe.num_embeddings == T and model.blocks[0].wte.num_embeddings == VOCAB
    x = torch.randint(0, VOCAB, (4, T), generator=gen())
    out = model(x)
    assert out.shape == (4, T, VOCAB)
    changed = x.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % VOCAB
    with torch.no_grad():
        torch.testing.assert_close(model(changed)[:, :5], out[:, :5])  # no position sees the future
        assert not torch.allclose(model(changed)[:, 5:], out[:, 5:])
    assert model(x[:, :3]).shape == (4, 3, VOCAB)  # shorter contexts work
    grouped = gpt(group=3)  # layers are groupable: [embeddings, layer1], [layer2, layer3], [head]
    assert block_sizes(grouped) == [sum(block_sizes(model)[:2]), sum(block_sizes(model)[2:4]), block_sizes(model)[4]]
    with torch.no_grad():
        torch.testing.assert_close(grouped.eval()(x), out)


def test_nanogpt_tied_weights_have_one_owner():
    untied, tied = gpt(), gpt(tie_weights=True)
    head = tied.blocks[-1]
    assert isinstance(head, LMHead) and head.tied
    assert {n for n, _ in head.named_parameters()} == {"ln_f.weight", "ln_f.bias"}  # only the final norm
    assert "lm_head.weight" in dict(untied.blocks[-1].named_parameters())
    assert sum(block_sizes(untied)) - sum(block_sizes(tied)) == VOCAB * 16
    x = torch.randint(0, VOCAB, (2, T), generator=gen())
    with torch.no_grad():
        h = tied.blocks[-1].ln_f(tied.blocks[3](tied.blocks[2](tied.blocks[1](tied.blocks[0](x)))))
        torch.testing.assert_close(tied(x), h @ tied.blocks[0].wte.weight.T)
    params = FlatParams(tied, tied.blocks)  # one owner per parameter, or this would raise
    wte = tied.blocks[0].wte.weight
    # the head block's gradient never reaches the shared matrix; the embeddings block's sees both uses
    params.set_trainable({len(tied.blocks) - 1})
    F.cross_entropy(tied(x).reshape(-1, VOCAB), x.reshape(-1)).backward()
    assert wte.grad is None
    params.set_trainable({0})
    params.grad.zero_()
    F.cross_entropy(tied(x).reshape(-1, VOCAB), x.reshape(-1)).backward()
    emb_only = copy.deepcopy(tied)
    emb_only.blocks[-1]._tied = ()
    emb_only.blocks[-1].lm_head = nn.Linear(16, VOCAB, bias=False)
    with torch.no_grad():
        emb_only.blocks[-1].lm_head.weight.copy_(wte)
    emb_only.blocks[-1].lm_head.weight.requires_grad_(False)
    emb_only.zero_grad(set_to_none=True)
    F.cross_entropy(emb_only(x).reshape(-1, VOCAB), x.reshape(-1)).backward()
    assert not torch.allclose(wte.grad, emb_only.blocks[0].wte.weight.grad)  # the output use adds to it
    clone = copy.deepcopy(tied)  # a copy ties to its own embeddings, not the original's
    assert clone.blocks[-1]._tied[0] is clone.blocks[0]


def test_nanogpt_needs_a_language_model_dataset():
    with pytest.raises(ValueError, match="needs a language-model dataset"):
        build_model(ModelConfig(name="nanogpt"), TokenShape((T,), VOCAB), 2, 0)
    with pytest.raises(ValueError, match="embeds token ids; it needs a text dataset"):
        build_model(ModelConfig(name="nanogpt"), (T,), VOCAB, 0)
    with pytest.raises(ValueError, match="needs float features but the dataset gives token ids"):
        build_model(ModelConfig(name="mlp"), TokenShape((T,), VOCAB), 2, 0)


# ----------------------------------------------------------------------------------------------------------
# Ensembles

@pytest.mark.parametrize("name,shape,per_member", [("mlp_ensemble", (12,), 3), ("cnn_ensemble", (1, 8, 8), 3)])
def test_ensemble_blocks_are_the_members_blocks_concatenated(name, shape, per_member):
    model = build_model(ModelConfig(name=name, widths=[6, 5], members=3), shape, 4, 0)
    assert isinstance(model, EnsembleModel) and model.n_members == 3
    assert len(model.blocks) == 3 * per_member
    assert [list(chain) for chain in model._members] == [list(model.blocks[i * per_member:(i + 1) * per_member])
                                                         for i in range(3)]
    x = torch.randn(5, *shape, generator=gen())
    model.eval()
    with torch.no_grad():
        outs = model.member_outputs(x)
        assert outs.shape == (3, 5, 4)
        torch.testing.assert_close(model(x), outs.mean(0))  # average voting (the default)
        assert not torch.allclose(outs[0], outs[1])  # members start from different weights
    grouped = build_model(ModelConfig(name=name, widths=[6, 5], members=3, group=3), shape, 4, 0).eval()
    assert block_sizes(grouped) == [sum(block_sizes(model)[i * per_member:(i + 1) * per_member]) for i in range(3)]
    with torch.no_grad():
        torch.testing.assert_close(grouped(x), model(x))


def test_random_voting_is_random_in_training_and_deterministic_in_eval():
    model = build_model(ModelConfig(name="mlp_ensemble", widths=[8], members=4, voting="random"), (6,), 3, 0)
    x = torch.randn(64, 6, generator=gen())
    with torch.no_grad():
        outs = model.member_outputs(x)
        model.eval()
        a, b = model(x), model(x)
        assert torch.equal(a, b)
        pick = model.choose(x)
        assert len(set(pick.tolist())) == 4  # every member answers for some samples
        torch.testing.assert_close(a, outs[pick, torch.arange(64)])
        # a sample gets the same member whatever batch it is in
        torch.testing.assert_close(model(x[7:8]), a[7:8])
        torch.testing.assert_close(model(x.flip(0)), a.flip(0))
        model.train()
        t1, t2 = model.choose(x), model.choose(x)
        assert not torch.equal(t1, t2)  # training: a fresh random member per sample and forward
        again = build_model(ModelConfig(name="mlp_ensemble", widths=[8], members=4, voting="random"), (6,), 3, 0)
        assert torch.equal(again.choose(x), t1)  # ... from a seeded generator


# ----------------------------------------------------------------------------------------------------------
# Text classifier

def test_text_classifier_ignores_padding():
    model = build_model(ModelConfig(name="text_classifier", n_embd=12, widths=[8]), TokenShape((10,), 30), 2, 0)
    assert len(model.blocks) == 3 and model.blocks[0].embedding.num_embeddings == 30
    model.eval()
    x = torch.tensor([[5, 6, 7, 0, 0, 0, 0, 0, 0, 0], [5, 6, 7, 9, 9, 9, 9, 9, 9, 9]])
    out = model(x)
    assert out.shape == (2, 2)
    with torch.no_grad():
        torch.testing.assert_close(model(x[:1, :3]), out[:1])  # padding contributes nothing
        assert not torch.allclose(out[0], out[1])
    assert torch.equal(model.blocks[0].embedding.weight[0], torch.zeros(12))


# ----------------------------------------------------------------------------------------------------------
# Every model of the catalogue: coverage and one round of training

FLAT, IMG, RGB = (16,), (1, 8, 8), (3, 32, 32)
EVERY = {  # name -> (ModelConfig keys, input shape, outputs)
    "mlp": (dict(widths=[8, 8]), FLAT, 3),
    "linear": (dict(widths=[8]), FLAT, 3),
    "block_linear": (dict(widths=[]), FLAT, 3),
    "cnn": (dict(widths=[4, 4]), IMG, 3),
    "residual_cnn": (dict(widths=[4, 4, 8]), IMG, 3),
    "resnet18": (dict(), RGB, 3),
    "resnet34": (dict(), RGB, 3),
    "nanogpt": (dict(n_layer=2, n_head=2, n_embd=16), TokenShape((T,), VOCAB), VOCAB),
    "mlp_ensemble": (dict(widths=[8], members=2), FLAT, 3),
    "cnn_ensemble": (dict(widths=[4], members=2), IMG, 3),
    "text_classifier": (dict(n_embd=8, widths=[8]), TokenShape((T,), VOCAB), 2),
}


def test_every_catalogue_model_is_covered_here():
    assert set(EVERY) == set(MODELS)


def make(name: str) -> BlockModel:
    keys, shape, n_out = EVERY[name]
    return build_model(ModelConfig(name=name, **keys), shape, n_out, seed=0)


def batch_for(name: str, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    _, shape, n_out = EVERY[name]
    g = gen(3)
    if isinstance(shape, TokenShape):
        x = torch.randint(1, shape.vocab_size, (n, *shape), generator=g)
        y = x.roll(-1, 1) if name == "nanogpt" else torch.randint(0, n_out, (n,), generator=g)
        return x, y
    return torch.randn(n, *shape, generator=g), torch.randint(0, n_out, (n,), generator=g)


@pytest.mark.parametrize("name", sorted(EVERY))
def test_blocks_cover_every_parameter_exactly_once(name):
    model = make(name)
    owned = [p for b in model.blocks for p in b.parameters()]
    assert len({id(p) for p in owned}) == len(owned)  # no parameter in two blocks
    assert {id(p) for p in owned} == {id(p) for p in model.parameters()}  # none outside the blocks
    assert sum(block_sizes(model)) == sum(p.numel() for p in model.parameters())
    buffers = [b for block in model.blocks for b in block.buffers()]
    assert {id(b) for b in buffers} == {id(b) for b in model.buffers()} and len(buffers) == len(set(map(id, buffers)))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    FlatParams(model, model.blocks)


def loss_for(name: str):
    if name == "nanogpt":
        return lambda out, y: F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return F.cross_entropy


@pytest.mark.parametrize("mode", ["blockwise", "entire"])
@pytest.mark.parametrize("name", sorted(EVERY))
def test_every_model_trains_one_round(name, mode):
    model = make(name)
    params = FlatParams(model, model.blocks)
    x, y = batch_for(name)
    cfg = AlgorithmConfig(mode=mode, K=2, lr=0.01, solver="adam", schedule="gauss_seidel")
    n = params.n_blocks
    if mode == "entire":
        trainer = EntireTrainer(model, params, loss_for(name), BatchStream(x, y, 4, 0), cfg, "reference")
    else:
        streams = [BatchStream(x, y, 4, stream_seed(0, 100 + i)) for i in range(n)]
        trainer = BlockwiseTrainer(model, params, loss_for(name), streams, cfg, [0.01] * n, [1.0] * n,
                                   "reference", 0)
    before = params.flat.detach().clone()
    result = trainer.run_round(1)
    assert torch.isfinite(torch.tensor(result.train_loss))
    assert result.grad_evals == 2 * (n if mode == "blockwise" else 1)
    for i in range(n):  # every block moved
        assert not torch.equal(params.block(i), params.block(i, before)), f"block {i} did not move"
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
