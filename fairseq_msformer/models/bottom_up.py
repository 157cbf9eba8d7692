"""Bottom-up family: fine to coarse, then back to tokens (design.md §3).

    tokens ──[token layers before pooling]──┐
      pool ─> scale-1 layers ─> pool ─> scale-2 layers ─> ...   (most layers run on T / K_s positions)
    back to tokens (--bottom-up-combine):
      attention  the aggregation layer: each token attends over the token states and every block the causality
                 rule allows, + FFN (the paper's description)
      residual   each scale's states are causally upsampled, projected and added to the token stream
                 (Hourglass); the aggregation layer is then an ordinary token layer (no T x T block mask)
      both       the residual, then the attention aggregation layer
      ─> token-level layers ─> (decoder's final norm and softmax)
"""
import torch
import torch.nn as nn

from ..modules import (
    BlockPool, CausalUpsample, LayerStack, TransformerBlock, causal_block_mask, coarse_scale_positions,
    upsample_index,
)
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
        combine = getattr(args, "bottom_up_combine", "attention")
        self.attend_blocks = combine in ("attention", "both")
        self.residual = combine in ("residual", "both")
        if self.residual:  # upsamples[s - 1] and up_projs[s - 1] carry scale s to the tokens
            self.upsamples = nn.ModuleList(CausalUpsample(dim) for _ in grid.pool_factors)
            self.up_projs = nn.ModuleList(nn.Linear(dim, dim) for _ in grid.pool_factors)
        self.aggregate = TransformerBlock(args)
        self.token_layers = LayerStack(args, args.token_layers, final_norm=False)

    def forward(self, x: torch.Tensor, inner_states: list) -> torch.Tensor:
        # x: (B, T, C) token embeddings, T a multiple of the grid
        # ready[s]: (T / K_s,) ready positions of scale s's elements (the causality rule; rotary positions)
        ready = [self.grid.ready(s, x.size(1) // k, x.device) for s, k in enumerate(self.grid.block_lengths)]
        x = self.token_layers_before(x, inner_states, ready[0])
        blocks, h = [], x
        for s, (pool, positions, layers) in enumerate(zip(self.pools, self.positions, self.scales), start=1):
            h = layers(positions(pool(h)), inner_states, ready[s])  # (B, T / K_s, C)
            blocks.append(h)
        if self.residual:  # every token gets the newest ready block of every scale added to its stream
            for s, h in enumerate(blocks, start=1):
                x = x + self.up_projs[s - 1](self.upsamples[s - 1](h, upsample_index(ready[0], ready[s])))
        if self.attend_blocks:
            # token t reads token u <= t and block j of scale s once it is ready: (T, T + sum_s T / K_s)
            mask = causal_block_mask(ready[0], torch.cat(ready))
            x = self.aggregate(x, extra_memory=torch.cat(blocks, dim=1), mask=mask, positions=ready[0],
                               memory_positions=torch.cat(ready))
        else:
            x = self.aggregate(x, positions=ready[0])
        inner_states.append(x)
        return self.token_layers(x, inner_states, ready[0])

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
        if self.residual:
            for s, (upsample, proj) in enumerate(zip(self.upsamples, self.up_projs), start=1):
                if s <= len(new_blocks):
                    cache[f"newest{s}"] = new_blocks[s - 1]  # (B, 1, C)
                x = x + proj(upsample.newest(cache, f"newest{s}", x))
        if not self.attend_blocks:
            return self.token_layers.step(self.aggregate.step(x, t, cache, "aggregate"), t, cache, "after")
        attn = self.aggregate.attn
        if new_blocks:
            blocks = torch.cat(new_blocks, dim=1)  # (B, n_new, C), every block formed at t is ready at t
            append_cache(cache, "aggregate.blocks.k", attn.rotate(attn.k_proj(blocks), attn.step_position(blocks, t)))
            append_cache(cache, "aggregate.blocks.v", attn.v_proj(blocks))
        extra_kv = (cache["aggregate.blocks.k"], cache["aggregate.blocks.v"]) if "aggregate.blocks.k" in cache else None
        x = self.aggregate.step(x, t, cache, "aggregate", extra_kv=extra_kv)
        return self.token_layers.step(x, t, cache, "after")
