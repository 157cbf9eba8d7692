"""Bottom-up family: fine to coarse, then one aggregation layer back to tokens (design.md §3).

    tokens ──[token layers before pooling (default 0)]──┐
      pool ─> scale-1 layers ─> pool ─> scale-2 layers ─> ...   (most layers run on T / K_s positions)
    aggregation: each token attends over the token states and every block the causality rule allows, + FFN
      ─> token-level layers ─> (decoder's final norm and softmax)
"""
import torch
import torch.nn as nn

from ..modules import BlockPool, LayerStack, TransformerBlock, causal_block_mask, coarse_scale_positions
from ..modules.attention import append_cache


class BottomUp(nn.Module):
    def __init__(self, args, grid, plan):
        super().__init__()
        self.grid = grid
        dim = args.decoder_embed_dim
        self.token_layers_before = LayerStack(args, args.token_layers_before_pooling)
        self.pools = nn.ModuleList(
            BlockPool(r, args.pool_type, dim, hourglass_shift=grid.hourglass) for r in grid.pool_factors
        )
        self.positions = coarse_scale_positions(args, grid)
        self.scales = nn.ModuleList(LayerStack(args, n) for n in plan.scale_layers)
        self.aggregate = TransformerBlock(args)
        self.token_layers = LayerStack(args, args.token_layers, final_norm=False)

    def forward(self, x: torch.Tensor, inner_states: list) -> torch.Tensor:
        # x: (B, T, C) token embeddings, T a multiple of the grid
        x = self.token_layers_before(x, inner_states)
        blocks, ready = [], [self.grid.ready(0, x.size(1), x.device)]
        h = x
        for s, (pool, positions, layers) in enumerate(zip(self.pools, self.positions, self.scales), start=1):
            h = layers(positions(pool(h)), inner_states)  # (B, T / K_s, C)
            blocks.append(h)
            ready.append(self.grid.ready(s, h.size(1), x.device))
        # token t reads token u <= t and block j of scale s once it is ready: (T, T + sum_s T / K_s)
        mask = causal_block_mask(ready[0], torch.cat(ready))
        x = self.aggregate(x, extra_memory=torch.cat(blocks, dim=1), mask=mask)
        inner_states.append(x)
        return self.token_layers(x, inner_states)

    def step(self, x: torch.Tensor, t: int, cache: dict) -> torch.Tensor:
        """Incremental decoding of token t, x (B, 1, C). A block is pooled and run through its scale's layers
        the step it completes; the aggregation layer then reads every cached token and block."""
        x = self.token_layers_before.step(x, t, cache, "before")
        h, new_blocks = x, []
        for s, (pool, positions, layers) in enumerate(zip(self.pools, self.positions, self.scales), start=1):
            h = pool.step(h, cache, f"pool{s}")
            if h is None:  # scale s (and every coarser one) has no new block at t
                break
            h = layers.step(positions(h, offset=self.grid.newest_block(s, t)), t, cache, f"scale{s}")
            new_blocks.append(h)
        attn = self.aggregate.attn
        if new_blocks:
            blocks = torch.cat(new_blocks, dim=1)  # (B, n_new, C)
            append_cache(cache, "aggregate.blocks.k", attn.k_proj(blocks))
            append_cache(cache, "aggregate.blocks.v", attn.v_proj(blocks))
        extra_kv = (cache["aggregate.blocks.k"], cache["aggregate.blocks.v"]) if "aggregate.blocks.k" in cache else None
        x = self.aggregate.step(x, t, cache, "aggregate", extra_kv=extra_kv)
        return self.token_layers.step(x, t, cache, "after")
