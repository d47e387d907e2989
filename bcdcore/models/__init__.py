"""Models whose layers are grouped into blocks: the BlockModel, small models (MLP, CNN, residual CNN,
block-linear), ResNet, nanoGPT, ensembles, a text classifier, and the one registry (`build_model`, `BUILDERS`,
`register`), which also builds plugin and torchvision models by dotted path (bcdcore.models.plugin)."""
from bcdcore.models.blocks import BlockModel, block_sizes, group_blocks
from bcdcore.models.registry import BUILDERS, build_model, register

__all__ = ["BlockModel", "block_sizes", "group_blocks", "BUILDERS", "build_model", "register"]
