"""Position information for the blocks of each coarse scale (each scale has its own, design.md §3)."""
import torch
import torch.nn as nn
from fairseq.modules import SinusoidalPositionalEmbedding

# the longest input a model with sinusoidal positions accepts unless --max-target-positions says otherwise:
# fairseq's SinusoidalPositionalEmbedding.max_positions (its tables grow on demand, and so do ours)
SINUSOIDAL_MAX_POSITIONS = int(1e5)


class ScalePositions(nn.Module):
    """Adds a position vector for block index j = 0 .. N-1 to (B, N, C) block states.

    Learned tables hold ``max_blocks`` rows (the decoder refuses longer inputs); sinusoidal ones start there
    and grow on demand, so a model scores inputs longer than it was trained on, as fairseq's do.
    """

    def __init__(self, max_blocks: int, dim: int, learned: bool):
        super().__init__()
        self.learned = learned
        if learned:
            self.weight = nn.Parameter(torch.empty(max_blocks, dim))
            nn.init.normal_(self.weight, std=dim**-0.5)
        else:  # a fixed table, like fairseq's sinusoidal token positions (not saved in checkpoints)
            table = SinusoidalPositionalEmbedding.get_embedding(max_blocks, dim)
            self.register_buffer("weight", table, persistent=False)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        end = offset + x.size(1)
        if not self.learned and end > self.weight.size(0):
            # computed in fp32, then kept in the table's dtype (that of the model, as fairseq's token positions)
            self.weight = SinusoidalPositionalEmbedding.get_embedding(end, self.weight.size(1)).to(self.weight)
        return x + self.weight[offset:end].to(x).unsqueeze(0)


def max_blocks(max_tokens: int, grid, scale: int) -> int:
    """Blocks of `scale` in the longest input: max_tokens tokens, right-padded to the grid by the decoder."""
    padded = -(-max_tokens // grid.grid) * grid.grid
    return padded // grid.block_lengths[scale]


def position_table_length(args) -> int:
    """Tokens the position tables are built for: --max-target-positions when given (learned positions always
    have it: the training length by default), else the training length (sinusoidal tables grow beyond it)."""
    return args.max_target_positions or args.tokens_per_sample


def coarse_scale_positions(args, grid) -> nn.ModuleList:
    """One ScalePositions per coarse scale s = 1 .. S-1, sized for position_table_length(args) tokens."""
    tokens = position_table_length(args)
    return nn.ModuleList(
        ScalePositions(max_blocks(tokens, grid, s), args.decoder_embed_dim, args.decoder_learned_pos)
        for s in range(1, grid.num_scales)
    )
