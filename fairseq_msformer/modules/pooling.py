"""Pooling r consecutive elements into one block (mean, max or linear), with the optional Hourglass shift."""
import torch
import torch.nn as nn

POOL_TYPES = ("mean", "max", "linear")


def shift_right(x: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, N, C) -> (B, N, C), element i moved to i + steps; zeros enter on the left, the tail falls off."""
    if steps == 0:
        return x
    return torch.cat([x.new_zeros(x.size(0), steps, x.size(2)), x[:, : x.size(1) - steps]], dim=1)


class BlockPool(nn.Module):
    """(B, N, C) -> (B, N / r, C): block j summarises elements [j*r, (j+1)*r).

    With ``hourglass_shift`` the input is first shifted right by r - 1, so block j summarises elements
    [j*r - r + 1, j*r] (see ``ScaleGrid``). N must be a multiple of r (the decoder pads to the grid).
    """

    def __init__(self, factor: int, pool_type: str, dim: int, hourglass_shift: bool = False):
        super().__init__()
        assert pool_type in POOL_TYPES, pool_type
        self.factor, self.pool_type, self.hourglass_shift = factor, pool_type, hourglass_shift
        # linear pooling: concatenate the r elements and project back to C (Funnel/Hourglass "linear")
        self.proj = nn.Linear(factor * dim, dim) if pool_type == "linear" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hourglass_shift:
            x = shift_right(x, self.factor - 1)
        return self.pool(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N / r, C), no shift."""
        bsz, n, dim = x.shape
        r = self.factor
        if self.pool_type == "linear":
            # under autocast (--amp) the projection computes in half precision; the stream it starts keeps x's
            # dtype, so residual streams stay fp32 there as in fairseq's transformer_lm
            return self.proj(x.reshape(bsz, n // r, r * dim)).to(x.dtype)
        blocks = x.reshape(bsz, n // r, r, dim)  # (B, N/r, r, C)
        return blocks.mean(2) if self.pool_type == "mean" else blocks.amax(2)

    def step(self, x: torch.Tensor, cache: dict, name: str):
        """Incremental decoding: x (B, 1, C) is the newest element; returns its new block (B, 1, C) once
        the r elements of one are in (the shifted-in zeros count for the hourglass rule), else None."""
        buffer = cache.get(name)
        if buffer is None and self.hourglass_shift:
            buffer = x.new_zeros(x.size(0), self.factor - 1, x.size(2))
        buffer = x if buffer is None else torch.cat([buffer, x], dim=1)
        if buffer.size(1) < self.factor:
            cache[name] = buffer
            return None
        cache[name] = buffer[:, :0]  # (B, 0, C): the next block starts empty
        return self.pool(buffer)
