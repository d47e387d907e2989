"""ResNet-18/34, torchvision-compatible: stem (conv1, bn1, max-pool), one block per BasicBlock (8 / 16), head
(pool, fc). Module and parameter names inside each block are torchvision's, so `load_torchvision_state_dict`
maps every key of `torchvision.models.resnet18/34().state_dict()` onto ours exactly (strict, shapes checked).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from bcdcore.models.weights import read_state_dict
from bcdcore.recipe import ModelConfig

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


def resnet_blocks(cfg: ModelConfig, input_shape: tuple[int, ...], n_outputs: int) -> list[nn.Module]:
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
    state = read_state_dict(path)
    try:
        load_torchvision_state_dict(model, state)
    except ValueError as exc:
        raise ValueError(f"model.weights = {path!r}: {exc}") from None


# ----------------------------------------------------------------------------------------------------------
# nanoGPT


# ----------------------------------------------------------------------------------------------------------
# Ensembles


# ----------------------------------------------------------------------------------------------------------
# Text classifier


# ----------------------------------------------------------------------------------------------------------

