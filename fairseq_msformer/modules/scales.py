"""The scale grid and the one causality rule (design.md §3), written once for every family.

Scale s groups tokens into blocks of K_s = r_1 * ... * r_s tokens (K_0 = 1: the tokens themselves).
Every element of every scale has a *ready position*: the last token position its value may depend on.

* ``complete`` rule (default): block j of scale s summarises tokens [j*K_s, (j+1)*K_s), so it is ready at
  (j+1)*K_s - 1. A finer element may read it only once it is complete.
* ``hourglass`` rule (Hourglass transformer): the finer sequence is shifted right by r_s - 1 before pooling,
  so block j summarises tokens up to j*K_s and is ready there: fresher, still leak-free.

Everything causal in this package is then one comparison: an element ready at q may read an element ready at
k iff k <= q. Masks (``causal_block_mask``) and upsampling (``upsample_index``) are both derived from it, so a
family cannot get the rule subtly wrong in one place and right in another.
"""
from typing import List

import torch
import torch.nn as nn

SHIFT_RULES = ("complete", "hourglass")


class ScaleGrid:
    """Block lengths per scale and the ready positions of their blocks."""

    def __init__(self, pool_factors: List[int], shift_rule: str = "complete"):
        assert shift_rule in SHIFT_RULES, shift_rule
        self.pool_factors = list(pool_factors)  # r_1 .. r_{S-1}
        self.shift_rule = shift_rule
        self.block_lengths = [1]  # K_0 .. K_{S-1}
        for r in self.pool_factors:
            self.block_lengths.append(self.block_lengths[-1] * r)

    @property
    def num_scales(self) -> int:
        return len(self.block_lengths)

    @property
    def grid(self) -> int:
        """Inputs are padded (on the right) to a multiple of the coarsest block."""
        return self.block_lengths[-1]

    @property
    def hourglass(self) -> bool:
        return self.shift_rule == "hourglass"

    def ready(self, scale: int, n: int, device=None) -> torch.Tensor:
        """(n,) ready positions of the first n blocks of `scale`."""
        k = self.block_lengths[scale]
        j = torch.arange(n, device=device)
        return j * k if self.hourglass else (j + 1) * k - 1


    def newest_block(self, scale: int, t: int) -> int:
        """Index of the newest block of `scale` ready at position t (-1: none yet)."""
        k = self.block_lengths[scale]
        return t // k if self.hourglass else (t + 1) // k - 1


def causal_block_mask(query_ready: torch.Tensor, key_ready: torch.Tensor) -> torch.Tensor:
    """(Tq, Tk) boolean mask, True where the query may attend to the key (SDPA's convention)."""
    return key_ready.unsqueeze(0) <= query_ready.unsqueeze(1)


def upsample_index(fine_ready: torch.Tensor, coarse_ready: torch.Tensor) -> torch.Tensor:
    """For each fine element, the newest coarse block it may read, or -1 where none is ready yet.

    With the complete rule this is "repeat each block r times, shift right by r - 1"; with the hourglass rule
    it is a plain repeat.
    """
    return torch.searchsorted(coarse_ready, fine_ready, right=True) - 1


class CausalUpsample(nn.Module):
    """Carries coarse block states to a finer scale under the causality rule.

    Fine elements for which no coarse block is ready yet read a learned "no context" vector.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.no_context = nn.Parameter(torch.zeros(dim))
        nn.init.normal_(self.no_context, std=dim**-0.5)

    def newest(self, cache: dict, name: str, like: torch.Tensor) -> torch.Tensor:
        """Incremental decoding: the newest ready coarse state cached under `name` (B, 1, C), or the "no context"
        vector (shaped like `like`) while no block of that scale is ready yet."""
        state = cache.get(name)
        return self.no_context.to(like).expand_as(like) if state is None else state

    def forward(self, coarse: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        # coarse: (B, Nc, C); index: (Nf,) in [-1, Nc) -> (B, Nf, C)
        bsz, _, dim = coarse.shape
        no_context = self.no_context.to(coarse).expand(bsz, 1, dim)
        padded = torch.cat([no_context, coarse], dim=1)  # (B, 1 + Nc, C): slot 0 is "no context"
        return padded.index_select(1, index + 1)
