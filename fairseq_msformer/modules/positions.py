"""Position information for the blocks of each coarse scale (each scale has its own, design.md §3)."""
import torch
import torch.nn as nn
from fairseq.modules import SinusoidalPositionalEmbedding


class ScalePositions(nn.Module):
    """Adds a position vector for block index j = 0 .. N-1 to (B, N, C) block states."""

    def __init__(self, max_blocks: int, dim: int, learned: bool):
        super().__init__()
        if learned:
            self.weight = nn.Parameter(torch.empty(max_blocks, dim))
            nn.init.normal_(self.weight, std=dim**-0.5)
        else:  # a fixed table, like fairseq's sinusoidal token positions (not saved in checkpoints)
            table = SinusoidalPositionalEmbedding.get_embedding(max_blocks, dim)
            self.register_buffer("weight", table, persistent=False)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        return x + self.weight[offset : offset + x.size(1)].to(x).unsqueeze(0)


def max_blocks(max_tokens: int, grid, scale: int) -> int:
    """Blocks of `scale` in the longest input: max_tokens tokens, right-padded to the grid by the decoder."""
    padded = -(-max_tokens // grid.grid) * grid.grid
    return padded // grid.block_lengths[scale]


def coarse_scale_positions(args, grid) -> nn.ModuleList:
    """One ScalePositions per coarse scale s = 1 .. S-1, long enough for max_target_positions tokens."""
    return nn.ModuleList(
        ScalePositions(max_blocks(args.max_target_positions, grid, s), args.decoder_embed_dim, args.decoder_learned_pos)
        for s in range(1, grid.num_scales)
    )
