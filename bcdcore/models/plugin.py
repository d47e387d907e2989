"""Plugin and torchvision models: any `nn.Module`, with its parameters partitioned into blocks.

`[model] name = "pkg.module:build"` calls `build(input_shape, n_outputs, **args)`; `"torchvision:resnet50"`
calls that `torchvision.models` builder with `num_classes = n_outputs` (and `[model.args]`), weights only from
a local file. The module's parameters are then cut into blocks by `[model] blocks`:

- "auto": the module's own `blocks` (an nn.ModuleList) when it has one, else "children";
- "children": one block per top-level child that holds parameters;
- a list of entries, each "prefix|prefix|...": a parameter (or buffer) belongs to the first entry one of whose
  prefixes equals its qualified name or is followed in it by a dot.

Every parameter must belong to exactly one block; the error names the first orphan or doubly-owned one.
Buffers (BatchNorm statistics) go with their block by the same rule. A tied weight has one qualified name in
PyTorch (the first module that registers it), so it belongs to that module's block, as in the built-ins.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor, nn

from bcdcore import plugins
from bcdcore.models.weights import read_state_dict
from bcdcore.recipe import ModelConfig
from bcdcore.recipe.plugin_keys import TORCHVISION


class BlockGroup:
    """One block of a partitioned module: the parameters and buffers it owns, looked up by name in the module
    at each call (moving a module to a device replaces its buffer tensors)."""

    def __init__(self, net: nn.Module, label: str, params: list[str], buffers: list[str]) -> None:
        self.net, self.label, self.param_names, self.buffer_names = net, label, params, buffers

    def parameters(self) -> Iterator[nn.Parameter]:
        return iter([self.net.get_parameter(n) for n in self.param_names])

    def buffers(self) -> Iterator[Tensor]:
        return iter([self.net.get_buffer(n) for n in self.buffer_names])

    def __repr__(self) -> str:
        return f"BlockGroup({self.label!r}, {len(self.param_names)} parameters, {len(self.buffer_names)} buffers)"


class PartitionedModel(nn.Module):
    """A user's module `net`, run as it is, whose parameters are partitioned into `blocks` (BlockGroups)."""

    def __init__(self, net: nn.Module, groups: list[tuple[str, list[str], list[str]]], *, name: str,
                 input_shape: tuple[int, ...], n_outputs: int) -> None:
        super().__init__()
        self.net = net
        # A plain list, not a ModuleList: the groups hold no modules of their own (state_dict stays the net's).
        self.blocks = [BlockGroup(net, label, ps, bs) for label, ps, bs in groups]
        self.name, self.input_shape, self.n_outputs = name, tuple(input_shape), n_outputs

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def block_labels(self) -> list[str]:
        return [b.label for b in self.blocks]


def build_plugin(cfg: ModelConfig, input_shape: tuple[int, ...], n_outputs: int) -> PartitionedModel:
    """Build `cfg.name` (a plugin path, a live object or "torchvision:NAME") and partition it."""
    if cfg.name.startswith(TORCHVISION):
        net = torchvision_module(cfg, n_outputs)
    else:
        builder = plugins.resolve(cfg.name, "model", "model.name")
        if isinstance(builder, nn.Module):  # an instance handed to bcdcore.train
            net = builder
        else:
            net = plugins.call(builder, cfg.name, "model.name", "model", tuple(input_shape), n_outputs, **cfg.args)
            plugins.returned(net, nn.Module, cfg.name, "model.name", "model")
        if cfg.weights:
            load_state_file(net, cfg.weights)
    groups = partition(net, cfg.blocks)
    return PartitionedModel(net, groups, name=cfg.name, input_shape=input_shape, n_outputs=n_outputs)


def torchvision_module(cfg: ModelConfig, n_outputs: int) -> nn.Module:
    import torchvision

    name = cfg.name[len(TORCHVISION):]
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        from bcdcore.recipe import did_you_mean

        raise plugins.PluginError(f"model.name = {cfg.name!r}: torchvision.models has no builder {name!r}"
                                  f"{did_you_mean(name, known)}; e.g. torchvision:resnet18, torchvision:resnet50")
    builder = torchvision.models.get_model_builder(name)
    # weights=None: never download; a local file is loaded below (weights_only)
    net = plugins.call(builder, cfg.name, "model.name", "model", weights=None, num_classes=n_outputs, **cfg.args)
    if cfg.weights:
        load_state_file(net, cfg.weights)
    return net


def load_state_file(net: nn.Module, path: str) -> None:
    """`[model] weights`: a state_dict saved by torch.save (bare or under "state_dict"), read with
    weights_only=True (no code from the file runs) and loaded strictly."""
    state = read_state_dict(path)
    try:
        net.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as exc:
        words = " ".join(str(exc).split())
        raise ValueError(f"model.weights = {path!r} does not fit the model: {words[:300]}") from None


def partition(net: nn.Module, rule: str | list[str]) -> list[tuple[str, list[str], list[str]]]:
    """(label, parameter names, buffer names) per block, every parameter in exactly one block."""
    params = dict(net.named_parameters())
    buffers = dict(net.named_buffers())
    if not params:
        raise ValueError("the model has no parameters; there is nothing to train")
    own = rule == "auto" and isinstance(getattr(net, "blocks", None), nn.ModuleList)
    if own:
        return own_blocks(net, params, buffers)
    if rule in ("auto", "children"):
        entries = [[name] for name, child in net.named_children() if any(True for _ in child.parameters())]
        where = "model.blocks = \"children\""
    else:
        entries = [[p.strip() for p in entry.split("|")] for entry in rule]
        where = "model.blocks"
    groups: list[tuple[str, list[str], list[str]]] = [("|".join(e), [], []) for e in entries]
    for names, slot in ((params, 1), (buffers, 2)):
        for name in names:
            index = next((i for i, entry in enumerate(entries) if any(matches(name, p) for p in entry)), None)
            if index is None:
                what = "parameter" if slot == 1 else "buffer"
                raise ValueError(f"{where}: {what} {name!r} belongs to no block (orphan); add a prefix that "
                                 f"names it (e.g. {name.split('.')[0]!r}) to model.blocks")
            groups[index][slot].append(name)
    for label, ps, _ in groups:
        if not ps:
            top = ", ".join(n for n, _ in net.named_children())
            raise ValueError(f"{where}: entry {label!r} matches no parameter (top-level modules: {top})")
    return groups


def matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def own_blocks(net: nn.Module, params: dict, buffers: dict) -> list[tuple[str, list[str], list[str]]]:
    """The module's own `blocks` ModuleList: every parameter of the module in exactly one of them."""
    param_name = {id(p): n for n, p in params.items()}
    buffer_name = {id(b): n for n, b in buffers.items()}
    owner: dict[str, int] = {}
    groups = []
    for i, block in enumerate(net.blocks):
        ps, bs = [], []
        for p in block.parameters():
            name = param_name.get(id(p))
            if name is None:  # `blocks` not registered as a submodule: the model would not own its parameters
                raise ValueError(f"model.blocks: block {i} holds a parameter the model does not register; assign "
                                 f"blocks as an attribute of the module (self.blocks = nn.ModuleList(...))")
            if name in owner:
                raise ValueError(f"model.blocks: parameter {name!r} is in block {owner[name]} and block {i} "
                                 f"(doubly owned); every parameter must belong to exactly one block (a tied "
                                 f"weight: partition by prefixes, model.blocks = [...], where its first name owns it)")
            owner[name] = i
            ps.append(name)
        bs = [buffer_name[id(b)] for b in block.buffers() if id(b) in buffer_name]
        if not ps:
            raise ValueError(f"model.blocks: block {i} ({type(block).__name__}) has no parameters; every block "
                             f"must hold at least one")
        groups.append((f"blocks.{i}", ps, bs))
    for name in params:
        if name not in owner:
            raise ValueError(f"model.blocks: parameter {name!r} is outside model.blocks (orphan); move its module "
                             f"into blocks, or set [model] blocks = \"children\" or a list of prefixes")
    owned_buffers = {n for _, _, bs in groups for n in bs}
    for name in buffers:
        if name not in owned_buffers:
            raise ValueError(f"model.blocks: buffer {name!r} is outside model.blocks (orphan); move its module "
                             f"into blocks")
    return groups


def check_forward(model: nn.Module, x: Tensor, task: str, n_outputs: int, name: str) -> None:
    """One eval-mode forward of a plugin model on two training rows, before anything is written: a model that
    raises, or whose output does not fit the task (N, n_outputs), is one PluginError line (exit 2), not a failed
    run. Eval mode and no_grad: no BatchNorm statistics or gradients change."""
    from bcdcore.recipe import LANGUAGE_MODEL, REGRESSION

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:
        raise plugins.PluginError(f"model.name = {name!r}: forward on a batch of the training data {tuple(x.shape)} "
                                  f"raised {type(exc).__name__}: {plugins.first_line(exc)[:300]}") from None
    finally:
        model.train(was_training)
    n = x.shape[0]
    if task == REGRESSION:
        ok = isinstance(out, Tensor) and tuple(out.shape) in ((n,), (n, 1))
        want = f"({n},) or ({n}, 1)"
    elif task == LANGUAGE_MODEL:
        ok = isinstance(out, Tensor) and tuple(out.shape) == (*x.shape, n_outputs)
        want = str((*x.shape, n_outputs))
    else:
        ok = isinstance(out, Tensor) and tuple(out.shape) == (n, n_outputs)
        want = str((n, n_outputs))
    if not ok:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise plugins.PluginError(f"model.name = {name!r}: the model's output for {n} samples is {got}; a {task} "
                                  f"task with n_outputs = {n_outputs} needs {want}")
