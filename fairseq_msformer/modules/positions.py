"""Position information: a position vector for the blocks of each coarse scale (each scale has its own, design.md
§3), and optional rotary positions inside attention."""
import torch
import torch.nn as nn
from fairseq.modules import SinusoidalPositionalEmbedding
from fairseq.modules.rotary_positional_embedding import rotate_half

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


class NoScalePositions(nn.Module):
    """--no-scale-positions: blocks of a coarse scale get no position vector (ScalePositions' interface)."""

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        return x


def coarse_scale_positions(args, grid) -> nn.ModuleList:
    """One ScalePositions per coarse scale s = 1 .. S-1, sized for position_table_length(args) tokens (nothing
    added with --no-scale-positions)."""
    if getattr(args, "no_scale_positions", False):
        return nn.ModuleList(NoScalePositions() for _ in range(1, grid.num_scales))
    tokens = position_table_length(args)
    return nn.ModuleList(
        ScalePositions(max_blocks(tokens, grid, s), args.decoder_embed_dim, args.decoder_learned_pos)
        for s in range(1, grid.num_scales)
    )


class RotaryPositions(nn.Module):
    """Rotary position embedding (RoFormer, Su et al. 2021; on by default in x-transformers) at any positions.

    Queries and keys of elements at `positions` (in tokens) are rotated so that their dot product depends on the
    distance between them. Every element of every scale is placed at its ready position (``ScaleGrid.ready``: a
    block sits at the last token it may depend on), so a token reading a block sees how far back the block's
    information lies, in the same units as it sees other tokens. fairseq's RotaryPositionalEmbedding serves only
    contiguous positions 0..T-1, and its cached table keeps the device it was first built on; this computes the
    angles of the positions it is given. The first ``fraction`` of each head's dimensions is rotated and the rest
    carry content only: half by default, as x-transformers (rotary_emb_dim = dim_head // 2); local-attention and
    MEGABYTE rotate all of them (fraction 1).
    """

    def __init__(self, head_dim: int, fraction: float = 0.5, base: float = 10000.0):
        super().__init__()
        self.dim = max(2, int(round(head_dim * fraction, 6)) // 2 * 2)  # even: the rotated dimensions form pairs
        self.base = base

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x (B, N, H, D) at positions (N,) -> rotated x, same shape and dtype."""
        d = self.dim
        inv_freq = self.base ** -(torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)  # (d/2,)
        angles = positions.to(torch.float32).unsqueeze(1) * inv_freq  # (N, d/2), fp32 whatever x's dtype
        angles = torch.cat([angles, angles], dim=1).unsqueeze(1)  # (N, 1, d): the same for every head
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        rotated = x[..., :d]
        turned = rotated * cos + rotate_half(rotated) * sin
        return turned if d == x.size(-1) else torch.cat([turned, x[..., d:]], dim=-1)


def rotary_fraction(args) -> float:
    """The fraction of each head's dimensions rotated: --rotary-fraction with --rotary-positions, else 0 (none)."""
    return args.rotary_fraction if getattr(args, "rotary_positions", False) else 0.0
