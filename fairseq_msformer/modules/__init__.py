"""Building blocks shared by the three families: plain nn.Modules, no fairseq registries."""
from .attention import LayerStack, MultiScaleAttention, TransformerBlock
from .pooling import POOL_TYPES, BlockPool, shift_right
from .positions import ScalePositions, coarse_scale_positions
from .scales import SHIFT_RULES, CausalUpsample, ScaleGrid, causal_block_mask, upsample_index

__all__ = [
    "BlockPool", "CausalUpsample", "LayerStack", "MultiScaleAttention", "POOL_TYPES", "SHIFT_RULES",
    "ScaleGrid", "ScalePositions", "TransformerBlock", "causal_block_mask", "coarse_scale_positions", "shift_right", "upsample_index",
]
