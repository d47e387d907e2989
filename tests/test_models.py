"""Block models: blocks partition the parameters, compose to the model, group, seed, and keep their shapes."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from bcdcore.models import BlockModel, block_sizes, build_model, group_blocks
from bcdcore.recipe import ModelConfig

FLAT, SMALL_IMG, MID_IMG, BIG_IMG = (64,), (1, 8, 8), (3, 16, 16), (3, 32, 32)

# (name, widths, input shape, expected number of blocks)
CASES = [
    ("mlp", [16, 8], FLAT, 3),
    ("mlp", [16, 8], SMALL_IMG, 3),
    ("mlp", [], FLAT, 1),
    ("linear", [16, 8], FLAT, 3),
    ("linear", [12], SMALL_IMG, 2),
    ("block_linear", [], FLAT, 4),
    ("block_linear", [10, 20, 34], SMALL_IMG, 3),
    ("cnn", [4, 8], SMALL_IMG, 3),
    ("cnn", [4, 8], MID_IMG, 3),
    ("cnn", [4, 8, 8], BIG_IMG, 4),
    ("residual_cnn", [4, 4, 8], SMALL_IMG, 4),
    ("residual_cnn", [4, 8, 8], MID_IMG, 4),
    ("residual_cnn", [8, 8, 16, 32], BIG_IMG, 5),
]
IDS = [f"{name}-{widths}-{'x'.join(map(str, shape))}" for name, widths, shape, _ in CASES]


pytestmark = pytest.mark.usefixtures("single_torch_thread")  # these models are tiny: see conftest


def make(name: str, widths: list[int], shape: tuple[int, ...], n_outputs: int = 3, seed: int = 0,
         group: int = 0, batch_norm: bool = True) -> BlockModel:
    cfg = ModelConfig(name=name, widths=list(widths), group=group, batch_norm=batch_norm)
    return build_model(cfg, shape, n_outputs, seed)


def inputs(shape: tuple[int, ...], n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def run_by_hand(blocks, x):
    for block in blocks:
        x = block(x)
    return x


@pytest.mark.parametrize("name,widths,shape,n_blocks", CASES, ids=IDS)
def test_blocks_partition_parameters_and_buffers(name, widths, shape, n_blocks):
    model = make(name, widths, shape)
    assert isinstance(model.blocks, nn.ModuleList)
    assert len(model.blocks) == n_blocks
    in_blocks = [p for block in model.blocks for p in block.parameters()]
    assert len(in_blocks) == len({id(p) for p in in_blocks}), "a parameter sits in two blocks"
    assert {id(p) for p in in_blocks} == {id(p) for p in model.parameters()}
    assert all(sum(1 for _ in block.parameters()) > 0 for block in model.blocks), "an empty block"
    buffers = [b for block in model.blocks for b in block.buffers()]
    assert {id(b) for b in buffers} == {id(b) for b in model.buffers()}
    assert len(buffers) == len({id(b) for b in buffers})
    assert block_sizes(model) == [sum(p.numel() for p in b.parameters()) for b in model.blocks]
    assert sum(block_sizes(model)) == sum(p.numel() for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("name,widths,shape,n_blocks", CASES, ids=IDS)
@pytest.mark.parametrize("n_outputs", [1, 10])
def test_output_shape_and_forward_runs_blocks_in_order(name, widths, shape, n_blocks, n_outputs):
    model = make(name, widths, shape, n_outputs=n_outputs)
    x = inputs(shape)
    for train in (True, False):
        model.train(train)
        out = model(x)
        assert out.shape == (6, n_outputs)
        assert torch.isfinite(out).all()
        assert torch.equal(out, run_by_hand(model.blocks, x))


@pytest.mark.parametrize("name,widths,shape,n_blocks", CASES, ids=IDS)
def test_grouping_keeps_parameters_and_outputs(name, widths, shape, n_blocks):
    model = make(name, widths, shape).eval()
    x = inputs(shape)
    expected = model(x)
    order = [id(p) for p in model.parameters()]
    for k in range(1, n_blocks + 1):
        groups = group_blocks(list(model.blocks), k)
        assert len(groups) == k
        if k < n_blocks:  # groups are Sequentials of the original block objects, earlier groups larger
            members = [list(g) for g in groups]
            assert [len(m) for m in members] == [len(p) for p in np.array_split(np.arange(n_blocks), k)]
            assert all(a is b for a, b in zip(sum(members, []), model.blocks, strict=True))
        assert [id(p) for g in groups for p in g.parameters()] == order
        assert torch.equal(run_by_hand(groups, x), expected)
        # the same through the recipe: grouping happens after init, so the weights do not depend on it
        grouped = make(name, widths, shape, group=k).eval()
        assert len(grouped.blocks) == k
        assert torch.equal(grouped(x), expected)
    assert group_blocks(list(model.blocks), n_blocks) == list(model.blocks)  # k == n: no-op


@pytest.mark.parametrize("name,widths,shape,n_blocks", CASES, ids=IDS)
def test_grouping_into_more_groups_than_blocks_raises(name, widths, shape, n_blocks):
    with pytest.raises(ValueError, match=rf"model\.group = {n_blocks + 1}.*\b{n_blocks} blocks"):
        make(name, widths, shape, group=n_blocks + 1)
    model = make(name, widths, shape)
    with pytest.raises(ValueError, match="model.group"):
        group_blocks(list(model.blocks), n_blocks + 1)
    with pytest.raises(ValueError, match="model.group"):
        group_blocks(list(model.blocks), 0)


@pytest.mark.parametrize("name,widths,shape,n_blocks", CASES, ids=IDS)
def test_seed_fixes_weights_and_leaves_global_rng_alone(name, widths, shape, n_blocks):
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    a = make(name, widths, shape, seed=7)
    assert torch.equal(torch.get_rng_state(), before), "building a model moved the global random state"
    b = make(name, widths, shape, seed=7)
    c = make(name, widths, shape, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() == sc.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


# ----------------------------------------------------------------------------------------------------------
# mlp / linear


def test_linear_model_is_the_product_of_its_layers():
    model = make("linear", [16, 8], SMALL_IMG, n_outputs=3, seed=3)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 16), (16, 8), (8, 3)]
    weight = torch.eye(64, dtype=torch.float64)
    bias = torch.zeros(64, dtype=torch.float64)
    for m in linears:  # x -> W x + b composed: W = W3 W2 W1, b = W3 (W2 b1 + b2) + b3
        weight = m.weight.double() @ weight
        bias = m.weight.double() @ bias + m.bias.double()
    x = inputs(SMALL_IMG, n=9)
    expected = x.flatten(1).double() @ weight.T + bias
    torch.testing.assert_close(model(x).double(), expected, rtol=1e-5, atol=1e-5)
    # affine: an affine combination of inputs maps to the same combination of outputs
    x1, x2 = inputs(SMALL_IMG, seed=4), inputs(SMALL_IMG, seed=5)
    torch.testing.assert_close(model(0.3 * x1 + 0.7 * x2), 0.3 * model(x1) + 0.7 * model(x2),
                               rtol=1e-4, atol=1e-5)


def test_mlp_has_relu_between_layers_and_linear_has_none():
    mlp = make("mlp", [16, 8], FLAT, seed=3)
    lin = make("linear", [16, 8], FLAT, seed=3)
    assert sum(isinstance(m, nn.ReLU) for m in mlp.modules()) == 2
    assert not any(isinstance(m, nn.ReLU) for m in lin.modules())
    # same seed, same layer shapes -> same weights; only the activations differ
    assert all(torch.equal(p, q) for p, q in zip(mlp.parameters(), lin.parameters()))
    x1, x2 = inputs(FLAT, seed=4), inputs(FLAT, seed=5)
    assert not torch.allclose(mlp(0.5 * x1 + 0.5 * x2), 0.5 * mlp(x1) + 0.5 * mlp(x2), atol=1e-4)


def test_mlp_without_hidden_layers_is_one_linear_block():
    model = make("mlp", [], SMALL_IMG, n_outputs=1)
    assert len(model.blocks) == 1
    (linear,) = [m for m in model.modules() if isinstance(m, nn.Linear)]
    x = inputs(SMALL_IMG)
    torch.testing.assert_close(model(x), x.flatten(1) @ linear.weight.T + linear.bias)


# ----------------------------------------------------------------------------------------------------------
# block_linear


def block_weights(model: BlockModel) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in model.parameters()])


def test_block_linear_is_x_times_concatenated_weights():
    model = make("block_linear", [10, 20, 34], SMALL_IMG, n_outputs=1, seed=2)
    assert [tuple(p.shape) for p in model.parameters()] == [(10,), (20,), (34,)]
    assert not any(isinstance(m, nn.Linear) for m in model.modules())  # no hidden bias anywhere
    x = inputs(SMALL_IMG, n=7)
    torch.testing.assert_close(model(x), (x.flatten(1) @ block_weights(model)).unsqueeze(1),
                               rtol=1e-6, atol=1e-6)
    # with small integers float32 arithmetic is exact, so the block sum must match to the last bit
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(torch.arange(p.numel(), dtype=torch.float32) % 5 - 2 + i)
    xi = torch.randint(-3, 4, (7, *SMALL_IMG), generator=torch.Generator().manual_seed(0)).float()
    assert torch.equal(model(xi), (xi.flatten(1) @ block_weights(model)).unsqueeze(1))


def test_block_linear_weights_start_small_and_random():
    w = block_weights(make("block_linear", [], (4000,), n_outputs=1, seed=0))
    assert w.abs().max() > 0
    assert 0.08 < w.std().item() < 0.12
    assert abs(w.mean().item()) < 0.01


def test_block_linear_loss_is_a_quadratic_in_each_block():
    model = make("block_linear", [], FLAT, n_outputs=1, seed=0)
    x, y = inputs(FLAT, n=32), torch.randn(32, 1, generator=torch.Generator().manual_seed(9))
    first = next(iter(model.blocks[0].parameters()))
    loss = ((model(x) - y) ** 2).mean()
    (grad,) = torch.autograd.grad(loss, first)
    xs = x.flatten(1)[:, :first.numel()]
    residual = model(x) - y
    torch.testing.assert_close(grad, (2 / 32) * (xs * residual).sum(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("d,sizes", [(64, [16, 16, 16, 16]), (10, [3, 3, 2, 2]), (3, [1, 1, 1]), (1, [1])])
def test_block_linear_default_split(d, sizes):
    model = make("block_linear", [], (d,), n_outputs=1)
    assert block_sizes(model) == sizes
    x = inputs((d,))
    torch.testing.assert_close(model(x), (x @ block_weights(model)).unsqueeze(1))


def test_block_linear_widths_must_sum_to_features():
    with pytest.raises(ValueError, match=r"model\.widths = \[10, 20\].*64 input features"):
        make("block_linear", [10, 20], FLAT)


def test_block_linear_with_several_outputs():
    model = make("block_linear", [30, 34], FLAT, n_outputs=10)
    assert [tuple(p.shape) for p in model.parameters()] == [(30, 10), (34, 10)]
    x = inputs(FLAT)
    weight = torch.cat(list(model.parameters()))
    torch.testing.assert_close(model(x), x @ weight)


# ----------------------------------------------------------------------------------------------------------
# cnn / residual_cnn


@pytest.mark.parametrize("name", ["cnn", "residual_cnn"])
def test_image_models_reject_flat_inputs(name):
    with pytest.raises(ValueError, match=rf"model\.name = '{name}' needs image inputs \(C, H, W\); "
                                         rf"dataset gives shape \(64,\)"):
        make(name, [4], FLAT)


def test_cnn_pools_until_one_pixel_then_stops():
    model = make("cnn", [4, 4, 4, 4, 4], SMALL_IMG)  # 8 -> 4 -> 2 -> 1 -> 1 -> 1
    pools = [sum(isinstance(m, nn.MaxPool2d) for m in b.modules()) for b in model.blocks[:-1]]
    assert pools == [1, 1, 1, 0, 0]
    head = [m for m in model.blocks[-1].modules() if isinstance(m, nn.Linear)][0]
    assert head.in_features == 4
    assert model(inputs(SMALL_IMG)).shape == (6, 3)
    big = make("cnn", [4, 8], BIG_IMG)  # 32 -> 16 -> 8
    head = [m for m in big.blocks[-1].modules() if isinstance(m, nn.Linear)][0]
    assert head.in_features == 8 * 8 * 8


@pytest.mark.parametrize("name,widths", [("cnn", [4, 8]), ("residual_cnn", [4, 4, 8])])
def test_batch_norm_switch(name, widths):
    with_bn = make(name, widths, MID_IMG, batch_norm=True)
    without = make(name, widths, MID_IMG, batch_norm=False)
    assert any(isinstance(m, nn.BatchNorm2d) for m in with_bn.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in without.modules())
    assert not list(without.buffers())
    # a conv bias right before BatchNorm is redundant; without BatchNorm it is the only shift
    assert all(m.bias is None for m in with_bn.modules() if isinstance(m, nn.Conv2d))
    assert all(m.bias is not None for m in without.modules() if isinstance(m, nn.Conv2d))
    assert without(inputs(MID_IMG)).shape == (6, 3)


def per_block_sizes(model: BlockModel, x: torch.Tensor) -> list[tuple[int, tuple[int, ...]]]:
    """(values per sample, shape per sample) entering each block, then leaving the last."""
    seen: list[tuple[int, tuple[int, ...]]] = []
    hooks = [b.register_forward_pre_hook(lambda m, args: seen.append((args[0][0].numel(),
                                                                      tuple(args[0].shape[1:]))))
             for b in model.blocks]
    try:
        out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen + [(out[0].numel(), tuple(out.shape[1:]))]


@pytest.mark.parametrize("widths,shape", [([4, 4, 8], SMALL_IMG), ([4, 8, 8], MID_IMG),
                                          ([8, 8, 16, 32], BIG_IMG), ([4, 16, 16, 64], BIG_IMG),
                                          ([8, 4, 4, 2], MID_IMG), ([2, 8, 32, 128], SMALL_IMG)])
def test_residual_units_never_grow_the_feature_map(widths, shape):
    model = make("residual_cnn", widths, shape).eval()
    sizes = per_block_sizes(model, inputs(shape))
    units = list(range(1, len(widths)))
    assert all(sizes[i + 1][0] <= sizes[i][0] for i in units), sizes
    _, h, w = shape
    for i in units:  # a width change halves the resolution, a kept width keeps it
        c_in, c_out = widths[i - 1], widths[i]
        if c_out != c_in:
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        assert sizes[i + 1][1] == (c_out, h, w)


# [4, 32]: 4*8*8 -> 32*4*4 doubles; [2, 8, 32, 128, 256] on 8x8 reaches 1x1, where any widening grows the map
@pytest.mark.parametrize("widths,shape", [([4, 32], SMALL_IMG), ([4, 4, 20], MID_IMG),
                                          ([2, 8, 32, 128, 256], SMALL_IMG)])
def test_residual_width_jump_that_grows_the_map_raises(widths, shape):
    with pytest.raises(ValueError, match=rf"^model\.widths = {re.escape(str(widths))}: residual unit"):
        make("residual_cnn", widths, shape)


def test_residual_identity_and_projection_shortcuts():
    model = make("residual_cnn", [4, 4, 8], MID_IMG)
    keep, change = model.blocks[1], model.blocks[2]
    assert isinstance(keep.shortcut, nn.Identity)
    assert keep.conv1.stride == (1, 1)
    convs = [m for m in change.shortcut.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.kernel_size, c.stride) for c in convs] == [((1, 1), (2, 2))]
    assert change.conv1.stride == (2, 2)
    head = model.blocks[-1]
    assert any(isinstance(m, nn.AdaptiveAvgPool2d) for m in head.modules())
    assert [m.in_features for m in head.modules() if isinstance(m, nn.Linear)] == [8]


def test_unknown_model_name_raises():
    with pytest.raises(ValueError, match="model.name: unknown model 'vit'"):
        make("vit", [4], FLAT)



def test_parameters_are_float32_even_when_the_default_dtype_is_not():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        models = [make(name, widths, shape) for name, widths, shape, _ in CASES[::3]]
    finally:
        torch.set_default_dtype(old)
    assert all(p.dtype == torch.float32 for m in models for p in m.parameters())
    assert all(b.dtype in (torch.float32, torch.int64) for m in models for b in m.buffers())
