"""The model zoo: ResNet-18/34 (torchvision-compatible), nanoGPT, ensembles, a small text classifier.

Each builder returns a `BlockModel` whose `blocks` hold every parameter exactly once:

- `resnet18` / `resnet34`: stem (conv1, bn1, max-pool), one block per BasicBlock (8 / 16), head (pool, fc).
  Module and parameter names inside each block are torchvision's, so `load_torchvision_state_dict` maps
  every key of `torchvision.models.resnet18/34().state_dict()` onto ours exactly (strict, shapes checked).
- `nanogpt`: embeddings (token + position), one block per transformer layer, head (final LayerNorm + the
  vocabulary projection). Weight tying (`tie_weights = true`) is resolved by ownership: the embeddings block
  owns the shared matrix, and the head reads it without registering it, so the head block holds only the
  final LayerNorm. A step on the head block then leaves the shared matrix alone (it is another block's
  coordinate); a step on the embeddings block moves it with the gradient of both its uses.
- `mlp_ensemble` / `cnn_ensemble`: `members` independent MLPs / CNNs; the blocks are member 0's blocks, then
  member 1's, ... Voting "average" returns the mean of the member outputs; "random" returns, per sample, one
  member's output: drawn at random in training mode, and in eval mode picked by a hash of the sample itself,
  so evaluation is deterministic and does not depend on how samples are batched.
- `text_classifier`: embeddings block (mean of the word embeddings of the non-padding tokens), one block per
  hidden width (Linear + ReLU), head (Linear).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bcdcore.models import BlockModel, _cnn_blocks, _image_shape, _mlp_blocks, group_blocks
from bcdcore.recipe import ModelConfig

__all__ = ["build_zoo_model", "ZOO_MODELS", "EnsembleModel", "load_torchvision_state_dict",
           "to_torchvision_state_dict", "torchvision_key_map", "load_weights_file", "RESNET_LAYERS"]

ZOO_MODELS = ("resnet18", "resnet34", "nanogpt", "mlp_ensemble", "cnn_ensemble", "text_classifier")
RESNET_LAYERS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}


# ----------------------------------------------------------------------------------------------------------
# ResNet-18/34

class ResNetStem(nn.Module):
    """torchvision's conv1 -> bn1 -> relu -> maxpool; the CIFAR stem is a 3x3 stride-1 conv and no max-pool."""

    tv_name = ""  # prefix of these parameters in torchvision's state_dict

    def __init__(self, c_in: int, cifar: bool) -> None:
        super().__init__()
        if cifar:
            self.conv1 = nn.Conv2d(c_in, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(c_in, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock, same attribute names (conv1, bn1, conv2, bn2, downsample)."""

    def __init__(self, c_in: int, c_out: int, stride: int, tv_name: str) -> None:
        super().__init__()
        self.tv_name = tv_name
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNetHead(nn.Module):
    tv_name = ""

    def __init__(self, c_in: int, n_outputs: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(c_in, n_outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _resnet_blocks(cfg: ModelConfig, input_shape: tuple[int, ...], n_outputs: int) -> list[nn.Module]:
    if len(input_shape) != 3:
        raise ValueError(f"model.name = {cfg.name!r} needs image inputs (C, H, W); dataset gives shape "
                         f"{tuple(input_shape)}; use an image dataset (e.g. 'cifar10') or model 'mlp'")
    blocks: list[nn.Module] = [ResNetStem(int(input_shape[0]), cfg.cifar_stem)]
    c = 64
    for layer, (count, width) in enumerate(zip(RESNET_LAYERS[cfg.name], (64, 128, 256, 512)), start=1):
        for j in range(count):
            stride = 2 if (j == 0 and layer > 1) else 1
            blocks.append(BasicBlock(c, width, stride, f"layer{layer}.{j}"))
            c = width
    blocks.append(ResNetHead(c, n_outputs))
    for block in blocks:  # torchvision's initialisation
        for m in block.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    return blocks


def torchvision_key_map(model: nn.Module) -> dict[str, str]:
    """torchvision state_dict key -> our state_dict key, for every parameter and buffer of a resnet18/34
    (grouped or not: the map follows the modules, not the block positions)."""
    mapping: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, (ResNetStem, BasicBlock, ResNetHead)):
            for local in module.state_dict():
                tv = f"{module.tv_name}.{local}" if module.tv_name else local
                mapping[tv] = f"{name}.{local}"
    if not mapping:
        raise ValueError("not a resnet18/34 of bcdcore.models: no torchvision key map")
    return mapping


def _first(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


def load_torchvision_state_dict(model: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Load torchvision's resnet18/34 state_dict into our model: every key must map (strict) with its shape."""
    mapping = torchvision_key_map(model)
    missing = sorted(set(mapping) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(mapping))
    what = getattr(model, "name", "the model")
    if missing or unexpected:
        parts = ([f"missing {_first(missing)}"] if missing else []) + (
            [f"unexpected {_first(unexpected)}"] if unexpected else [])
        raise ValueError(f"torchvision state_dict does not match {what}: {'; '.join(parts)} "
                         f"(is it a {what} state_dict, e.g. torchvision.models.{what}().state_dict()?)")
    ours = model.state_dict()
    for tv, key in mapping.items():
        if tuple(state_dict[tv].shape) != tuple(ours[key].shape):
            raise ValueError(f"torchvision state_dict does not match {what}: {tv} has shape "
                             f"{tuple(state_dict[tv].shape)} in the file but {tuple(ours[key].shape)} in the model "
                             f"(check n_outputs (classes), cifar_stem and the input channels)")
    model.load_state_dict({key: state_dict[tv] for tv, key in mapping.items()}, strict=True)


def to_torchvision_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Our resnet18/34 parameters and buffers under torchvision's key names (for torchvision.models.resnetXX)."""
    ours = model.state_dict()
    return {tv: ours[key] for tv, key in torchvision_key_map(model).items()}


def load_weights_file(model: nn.Module, path: str) -> None:
    """`model.weights`: a torchvision state_dict saved with torch.save (bare, or under "state_dict")."""
    try:
        state = torch.load(Path(path).expanduser(), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"model.weights = {path!r}: cannot read it as a torch state_dict "
                         f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"model.weights = {path!r}: expected a state_dict (a dict of tensors), got "
                         f"{type(state).__name__}")
    try:
        load_torchvision_state_dict(model, state)
    except ValueError as exc:
        raise ValueError(f"model.weights = {path!r}: {exc}") from None


# ----------------------------------------------------------------------------------------------------------
# nanoGPT

class Embeddings(nn.Module):
    """Token + position embeddings (GPT-2's wte, wpe), then dropout."""

    def __init__(self, vocab_size: int, block_size: int, n_embd: int, dropout: float) -> None:
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence of length {t} is longer than the model's block size {self.block_size}")
        pos = torch.arange(t, device=idx.device)
        return self.drop(self.wte(idx) + self.wpe(pos))


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c)))


class TransformerLayer(nn.Module):
    """Pre-norm GPT-2 layer: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd),
                                 nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class LMHead(nn.Module):
    """Final LayerNorm and the projection to vocabulary logits (N, T, V).

    Tied: the projection is the embeddings block's token matrix, held as a plain (unregistered) reference so
    that it stays a parameter of that block only."""

    def __init__(self, n_embd: int, vocab_size: int, tied_to: Embeddings | None) -> None:
        super().__init__()
        self.ln_f = nn.LayerNorm(n_embd)
        self._tied = (tied_to,) if tied_to is not None else ()
        self.lm_head = None if tied_to is not None else nn.Linear(n_embd, vocab_size, bias=False)

    @property
    def tied(self) -> bool:
        return bool(self._tied)

    def forward(self, x: Tensor) -> Tensor:
        x = self.ln_f(x)
        return F.linear(x, self._tied[0].wte.weight) if self._tied else self.lm_head(x)


def _nanogpt_blocks(cfg: ModelConfig, input_shape: tuple[int, ...], n_outputs: int,
                    vocab_size: int) -> list[nn.Module]:
    if len(input_shape) != 1:
        raise ValueError(f"model.name = 'nanogpt' needs token sequences (T,); dataset gives {tuple(input_shape)}")
    if n_outputs != vocab_size:
        raise ValueError(f"model.name = 'nanogpt' predicts the next token: it needs a language-model dataset "
                         f"(n_outputs = vocabulary size), got {n_outputs} outputs for {vocab_size} tokens; "
                         f"use data.name = 'stdlib_text'")
    if cfg.n_embd % cfg.n_head:
        raise ValueError(f"model.n_head = {cfg.n_head} must divide model.n_embd = {cfg.n_embd}")
    emb = Embeddings(vocab_size, int(input_shape[0]), cfg.n_embd, cfg.dropout)
    layers = [TransformerLayer(cfg.n_embd, cfg.n_head, cfg.dropout) for _ in range(cfg.n_layer)]
    head = LMHead(cfg.n_embd, vocab_size, emb if cfg.tie_weights else None)
    blocks: list[nn.Module] = [emb, *layers, head]
    for block in blocks:  # GPT-2 initialisation; residual projections scaled by depth
        for name, m in block.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for name, p in block.named_parameters():
            if name.endswith("c_proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
    return blocks


# ----------------------------------------------------------------------------------------------------------
# Ensembles

class EnsembleModel(BlockModel):
    """`members` networks side by side; `blocks` is their blocks concatenated (then grouped, if asked), and
    the forward pass runs each member's own chain of blocks and combines the outputs by `voting`."""

    def __init__(self, blocks: list[nn.Module], members: list[list[nn.Module]], voting: str, seed: int, *,
                 name: str, input_shape: tuple[int, ...], n_outputs: int) -> None:
        super().__init__(blocks, name=name, input_shape=input_shape, n_outputs=n_outputs)
        if voting not in ("average", "random"):
            raise ValueError(f"model.voting: unknown voting {voting!r}; use 'average' or 'random'")
        # plain attributes: the member modules are registered once, through self.blocks
        self._members = tuple(tuple(chain) for chain in members)
        self.voting = voting
        self.seed = seed
        self._hash_w: Tensor | None = None  # eval-mode vote hash weights, drawn on first use (not a buffer)
        self._generator = torch.Generator().manual_seed(seed)

    @property
    def n_members(self) -> int:
        return len(self._members)

    def member_outputs(self, x: Tensor) -> Tensor:
        """(members, N, n_outputs)."""
        outs = []
        for chain in self._members:
            h = x
            for block in chain:
                h = block(h)
            outs.append(h)
        return torch.stack(outs)

    def choose(self, x: Tensor) -> Tensor:
        """The member answering for each sample under random voting, (N,) on x's device."""
        n, m = x.shape[0], self.n_members
        if self.training:
            return torch.randint(0, m, (n,), generator=self._generator).to(x.device)
        # eval: a hash of the sample (rounded to 2^-16, then exact integer arithmetic), so batching cannot change
        # it; rounding rather than reinterpreting the float bits keeps it expressible in ONNX (export)
        flat = x.reshape(n, -1)
        bits = torch.round(flat.float() * 65536.0).to(torch.int64) if flat.is_floating_point() else flat.long()
        if self._hash_w is None or self._hash_w.numel() != flat.shape[1]:
            self._hash_w = torch.randint(1, 65521, (flat.shape[1],), generator=torch.Generator().manual_seed(self.seed))
        return ((bits % 65521) * self._hash_w.to(x.device)).sum(1) % m

    def forward(self, x: Tensor) -> Tensor:
        outs = self.member_outputs(x)
        if self.voting == "average" or self.n_members == 1:
            return outs.mean(0)
        pick = self.choose(x)
        return outs[pick, torch.arange(x.shape[0], device=x.device)]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", members={self.n_members}, voting={self.voting!r}"


def _ensemble(cfg: ModelConfig, input_shape: tuple[int, ...], n_outputs: int, seed: int) -> EnsembleModel:
    members = []
    for _ in range(cfg.members):
        if cfg.name == "mlp_ensemble":
            members.append(_mlp_blocks(cfg, math.prod(input_shape), n_outputs, nn.ReLU))
        else:
            _image_shape(cfg, input_shape)
            members.append(_cnn_blocks(cfg, input_shape, n_outputs))
    blocks = [b for chain in members for b in chain]
    if cfg.group > 0:
        blocks = group_blocks(blocks, cfg.group)
    return EnsembleModel(blocks, members, cfg.voting, seed, name=cfg.name, input_shape=input_shape,
                         n_outputs=n_outputs)


# ----------------------------------------------------------------------------------------------------------
# Text classifier

class BagOfEmbeddings(nn.Module):
    """Mean of the embeddings of the non-padding tokens (id 0 is padding): (N, T) ids -> (N, n_embd)."""

    def __init__(self, vocab_size: int, n_embd: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, n_embd, padding_idx=0)
        nn.init.normal_(self.embedding.weight, std=0.1)
        with torch.no_grad():
            self.embedding.weight[0].zero_()

    def forward(self, idx: Tensor) -> Tensor:
        mask = (idx != 0).unsqueeze(-1).to(self.embedding.weight.dtype)
        return (self.embedding(idx) * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def _text_blocks(cfg: ModelConfig, input_shape: tuple[int, ...], n_outputs: int,
                 vocab_size: int) -> list[nn.Module]:
    if len(input_shape) != 1:
        raise ValueError(f"model.name = 'text_classifier' needs token sequences (T,); dataset gives "
                         f"{tuple(input_shape)}")
    blocks: list[nn.Module] = [BagOfEmbeddings(vocab_size, cfg.n_embd)]
    width_in = cfg.n_embd
    for width in cfg.widths:
        blocks.append(nn.Sequential(nn.Linear(width_in, width), nn.ReLU()))
        width_in = width
    blocks.append(nn.Sequential(nn.Linear(width_in, n_outputs)))
    return blocks


# ----------------------------------------------------------------------------------------------------------

def build_zoo_model(cfg: ModelConfig, input_shape: tuple[int, ...], n_outputs: int, seed: int,
                    vocab_size: int) -> BlockModel:
    """Build one of ZOO_MODELS (called by bcdcore.models.build_model inside its seeded RNG scope)."""
    if cfg.name in ("mlp_ensemble", "cnn_ensemble"):
        return _ensemble(cfg, input_shape, n_outputs, seed)
    if cfg.name in RESNET_LAYERS:
        blocks = _resnet_blocks(cfg, input_shape, n_outputs)
    elif cfg.name == "nanogpt":
        blocks = _nanogpt_blocks(cfg, input_shape, n_outputs, vocab_size)
    elif cfg.name == "text_classifier":
        blocks = _text_blocks(cfg, input_shape, n_outputs, vocab_size)
    else:
        raise ValueError(f"model.name: unknown zoo model {cfg.name!r}")
    if cfg.group > 0:
        blocks = group_blocks(blocks, cfg.group)
    return BlockModel(blocks, name=cfg.name, input_shape=input_shape, n_outputs=n_outputs)
