"""Retina (foveated) attention: recent tokens at full resolution, older ones as pooled blocks (design.md §3).

For a query at position t and scales s = 1 .. S-1 with block lengths K_s, the past is cut into disjoint,
block-aligned spans, newest first (``retina_bounds``):

    scale 0 (tokens):  [b_0, t]           b_0 = floor((t - W + 1) / K_1) * K_1          (W .. W + K_1 - 1 tokens)
    scale s (blocks):  [b_s, b_{s-1})     b_s = floor((b_{s-1} - n_s K_s) / K_{s+1}) * K_{s+1}   (n_s .. blocks)
    last scale:        [b_{S-1}, b_{S-2})  n_{S-1} blocks, or everything older when n_{S-1} = -1

so every position is read once, at one resolution, and only complete blocks are read (the causality rule).

Blockwise: queries are cut into chunks of Q; each chunk gathers the few keys its queries can read (a fixed
count L per chunk, about W + Q + sum_s (n_s + Q / K_s)) and runs one masked SDPA over (Q, L). Memory and
compute per query grow like W + T / K_{S-1} (or stay constant with a bounded last scale), never like T.
"""
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import MultiScaleAttention, append_cache
from .pooling import BlockPool
from .positions import ScalePositions


def floor_to(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.div(x, k, rounding_mode="floor") * k


def retina_bounds(t: torch.Tensor, block_lengths: List[int], window: int, blocks: List[int]) -> List[torch.Tensor]:
    """[b_0(t), b_1(t), ..., b_{S-1}(t)]: scale s reads the span [b_s, b_{s-1}) (scale 0: [b_0, t])."""
    k = block_lengths
    bounds = [floor_to(t - window + 1, k[1]).clamp(min=0)]
    for s in range(1, len(k)):
        if blocks[s - 1] < 0:  # unbounded last scale: everything older
            bounds.append(torch.zeros_like(t))
            continue
        b = bounds[-1] - blocks[s - 1] * k[s]
        if s + 1 < len(k):
            b = floor_to(b, k[s + 1])  # align so that the next scale starts on one of its block boundaries
        bounds.append(b.clamp(min=0))
    return bounds


class RetinaLayout:
    """Which keys each query chunk gathers (per scale: first index and count) and the (C, Q, L) mask."""

    def __init__(self, length: int, block_lengths, window: int, blocks, chunk: int, device):
        self.chunk = chunk
        self.num_chunks = -(-length // chunk)
        t = torch.arange(self.num_chunks * chunk, device=device)  # (C*Q,) query positions, padded to chunks
        bounds = retina_bounds(t, block_lengths, window, blocks)
        first, last = t.view(self.num_chunks, chunk)[:, 0], t.view(self.num_chunks, chunk)[:, -1]
        self.index, masks = [], []
        for s, k in enumerate(block_lengths):
            lo = bounds[s][first] // k  # (C,) first key index any query of the chunk reads (bounds grow with t)
            hi = last + 1 if s == 0 else bounds[s - 1][last] // k  # (C,) one past the last one
            count = max(int((hi - lo).max()), 1)
            index = lo.unsqueeze(1) + torch.arange(count, device=device)  # (C, L_s) key indices
            self.index.append(index)
            j = index.unsqueeze(1)  # (C, 1, L_s)
            q_lo = bounds[s].view(self.num_chunks, chunk, 1)  # (C, Q, 1)
            if s == 0:
                allowed = (q_lo <= j) & (j <= t.view(self.num_chunks, chunk, 1))
            else:
                q_hi = bounds[s - 1].view(self.num_chunks, chunk, 1)
                allowed = (q_lo <= j * k) & ((j + 1) * k <= q_hi)
            masks.append(allowed)
        self.mask = torch.cat(masks, dim=2)  # (C, Q, L), True = may attend


class RetinaAttention(nn.Module):
    """Self-attention of tokens over a window of tokens plus pooled keys/values of older blocks."""

    def __init__(self, args, grid, window: int, blocks: List[int]):
        super().__init__()
        dim = args.decoder_embed_dim
        self.grid, self.window, self.blocks = grid, window, list(blocks)
        self.attn = MultiScaleAttention(dim, args.decoder_attention_heads, args.attention_dropout)
        # keys and values of scale s are pooled from those of scale s - 1 (complete-block rule only)
        self.key_pools = nn.ModuleList(BlockPool(r, args.pool_type, dim) for r in grid.pool_factors)
        self.value_pools = nn.ModuleList(BlockPool(r, args.pool_type, dim) for r in grid.pool_factors)
        self.key_positions = nn.ModuleList(
            ScalePositions(args.max_target_positions // k + 2, dim, args.decoder_learned_pos)
            for k in grid.block_lengths[1:]
        )
        # query chunk: about half the window (a multiple of K_1), so a chunk's shared keys stay near W + Q
        k1 = grid.block_lengths[1]
        self.chunk = k1 * max(1, round(min(window, 256) / (2 * k1)))
        self._layouts = {}

    def layout(self, length: int, device) -> RetinaLayout:
        key = (length, str(device))
        if key not in self._layouts:
            self._layouts = {key: RetinaLayout(length, self.grid.block_lengths, self.window, self.blocks,
                                               self.chunk, device)}
        return self._layouts[key]

    def scale_keys_values(self, x):
        """(B, T, C) -> per scale s: keys and values (B, T / K_s, C)."""
        keys, values = [self.attn.k_proj(x)], [self.attn.v_proj(x)]
        for s, (kp, vp, pos) in enumerate(zip(self.key_pools, self.value_pools, self.key_positions)):
            keys.append(kp(keys[-1]))
            values.append(vp(values[-1]))
        keys = keys[:1] + [pos(k) for pos, k in zip(self.key_positions, keys[1:])]
        return keys, values

    def self_attention(self, x: torch.Tensor) -> torch.Tensor:
        bsz, length, dim = x.shape  # T = length, a multiple of the grid
        layout = self.layout(length, x.device)
        chunks, q_len, heads = layout.num_chunks, layout.chunk, self.attn.num_heads
        keys, values = self.scale_keys_values(x)

        def gather(states, index):  # (B, N_s, C), (C, L_s) -> (B*C, H, L_s, D)
            picked = states[:, index.clamp(0, states.size(1) - 1).flatten()]  # (B, C*L_s, C)
            picked = picked.view(bsz, chunks, index.size(1), heads, -1).transpose(2, 3)
            return picked.reshape(bsz * chunks, heads, index.size(1), -1)

        k = torch.cat([gather(ks, idx) for ks, idx in zip(keys, layout.index)], dim=2)  # (B*C, H, L, D)
        v = torch.cat([gather(vs, idx) for vs, idx in zip(values, layout.index)], dim=2)
        q = self.attn.q_proj(F.pad(x, (0, 0, 0, chunks * q_len - length)))  # (B, C*Q, C)
        q = q.view(bsz * chunks, q_len, heads, -1).transpose(1, 2)  # (B*C, H, Q, D)
        mask = layout.mask.unsqueeze(1).repeat(bsz, 1, 1, 1)  # (B*C, 1, Q, L)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn.attention_dropout if self.training else 0.0
        )  # (B*C, H, Q, D)
        out = out.transpose(1, 2).reshape(bsz, chunks * q_len, dim)[:, :length]
        return self.attn.out_proj(out)

    def step(self, x: torch.Tensor, t: int, cache: dict, name: str, extra_kv=None) -> torch.Tensor:
        """Incremental decoding of position t, x (B, 1, C).

        The cache holds, per scale, exactly what later queries can still read: the tokens from b_0(t) on,
        and the blocks of scale s from b_s(t) on (bounds only grow with t), so it grows like W + T / K_{S-1}
        (constant with a bounded last scale). Incomplete blocks wait, as raw keys/values, in pooling buffers.
        """
        lengths = self.grid.block_lengths
        bounds = [int(b) for b in retina_bounds(torch.tensor([t]), lengths, self.window, self.blocks)]
        new_k, new_v = self.attn.k_proj(x), self.attn.v_proj(x)  # (B, 1, C)
        keys, values = [], []
        for s, k in enumerate(lengths):
            if s > 0 and new_k is not None:  # pool the finer scale's new element into this scale's buffer
                new_k = self.key_pools[s - 1].step(new_k, cache, f"{name}.kbuf{s}")
                new_v = self.value_pools[s - 1].step(new_v, cache, f"{name}.vbuf{s}")
                if new_k is not None:
                    offset = self.grid.newest_block(s, t)
                    append_cache(cache, f"{name}.k{s}", self.key_positions[s - 1](new_k, offset=offset))
                    append_cache(cache, f"{name}.v{s}", new_v)
            elif s == 0:
                append_cache(cache, f"{name}.k0", new_k)
                append_cache(cache, f"{name}.v0", new_v)
            if f"{name}.k{s}" not in cache:
                continue  # no block of this scale is complete yet
            # the cache of scale s holds elements [formed - n, formed): drop those before b_s, read up to b_{s-1}
            formed = t + 1 if s == 0 else (t + 1) // k
            first, end = bounds[s] // k, (t + 1 if s == 0 else bounds[s - 1] // k)
            for kind, out in (("k", keys), ("v", values)):
                cached = cache[f"{name}.{kind}{s}"]
                cached = cached[:, first - (formed - cached.size(1)) :]
                cache[f"{name}.{kind}{s}"] = cached
                out.append(cached[:, : end - first])
        keys, values = torch.cat(keys, dim=1), torch.cat(values, dim=1)  # (B, L_t, C)
        return self.attn.attend(x, self.attn.split_heads(keys), self.attn.split_heads(values))
