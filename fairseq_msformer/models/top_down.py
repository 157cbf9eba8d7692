"""Top-down family: coarse to fine, as in SampleRNN (design.md §3).

    embeddings ─pool─> scale 1 ─pool─> ... ─pool─> scale S-1        (a pyramid of pooled embeddings)
    h_{S-1} = layers_{S-1}(pooled_{S-1})
    h_s     = layers_s(pooled_s  (+ or concat)  causal_upsample(h_{s+1}))   for s = S-2 .. 0
    h_0 feeds the decoder's final norm and softmax.
"""
import torch
import torch.nn as nn

from ..modules import BlockPool, CausalUpsample, LayerStack, coarse_scale_positions, upsample_index


class TopDown(nn.Module):
    def __init__(self, args, grid, plan):
        super().__init__()
        self.grid = grid
        dim = args.decoder_embed_dim
        self.pools = nn.ModuleList(
            BlockPool(r, args.pool_type, dim, hourglass_shift=grid.hourglass) for r in grid.pool_factors
        )
        self.positions = coarse_scale_positions(args, grid)
        # stacks[s] runs at scale s; stacks[0] is token level (its output goes to the decoder's final norm)
        self.stacks = nn.ModuleList(
            [LayerStack(args, args.token_layers, final_norm=False)]
            + [LayerStack(args, n) for n in plan.scale_layers]
        )
        # upsamples[s] carries scale s + 1 down to scale s
        self.upsamples = nn.ModuleList(CausalUpsample(dim) for _ in grid.pool_factors)
        self.concat = args.top_down_combine == "concat"
        if self.concat:
            self.combine = nn.ModuleList(nn.Linear(2 * dim, dim) for _ in grid.pool_factors)

    def forward(self, x: torch.Tensor, inner_states: list) -> torch.Tensor:
        # x: (B, T, C) token embeddings, T a multiple of the grid
        pyramid = [x]
        for pool in self.pools:
            pyramid.append(pool(pyramid[-1]))  # (B, T / K_s, C)
        h = None
        for s in reversed(range(self.grid.num_scales)):
            inputs = pyramid[s] if s == 0 else self.positions[s - 1](pyramid[s])
            ready = self.grid.ready(s, inputs.size(1), x.device)  # (N_s,) the causality rule; rotary positions
            if h is not None:
                index = upsample_index(ready, self.grid.ready(s + 1, h.size(1), x.device))
                inputs = self.with_context(s, inputs, self.upsamples[s](h, index))  # newest ready coarser block
            h = self.stacks[s](inputs, inner_states, ready)
        return h

    def with_context(self, s: int, inputs: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Scale s's pooled embeddings (B, N_s, C) combined with the coarser scale's states read at them."""
        if self.concat:
            # the projection starts scale s's residual stream: keep its dtype (fp32 under autocast, see BlockPool)
            return self.combine[s](torch.cat([inputs, context], dim=-1)).to(inputs.dtype)
        return inputs + context

    def step(self, x: torch.Tensor, t: int, cache: dict) -> torch.Tensor:
        """Incremental decoding of token t, x (B, 1, C): the scales that complete a block at t run coarse to
        fine, each reading the newest state of the scale above (cached from an earlier step if it has none now)."""
        pyramid = [x]  # the elements formed at t, finest first
        for s, pool in enumerate(self.pools, start=1):
            pooled = pool.step(pyramid[-1], cache, f"pool{s}")
            if pooled is None:
                break
            pyramid.append(pooled)
        h = None
        for s in reversed(range(len(pyramid))):
            inputs = pyramid[s]
            if s > 0:
                inputs = self.positions[s - 1](inputs, offset=self.grid.newest_block(s, t))
            if s + 1 < self.grid.num_scales:
                context = h if h is not None else self.upsamples[s].newest(cache, f"newest{s + 1}", inputs)
                inputs = self.with_context(s, inputs, context)
            h = self.stacks[s].step(inputs, t, cache, f"scale{s}")
            if s > 0:
                cache[f"newest{s}"] = h
        return h
