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

Gated scales (--retina-gate, NSA's gated branches, Yuan et al. 2025): each scale gets its own softmax, and the
scales' outputs are summed with per-head sigmoid gates of the query's input, so the coarse scales add to what
the window reads instead of taking softmax mass from it. The same keys are read; only the mixing changes.
"""
import functools
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import MultiScaleAttention, append_cache
from .pooling import BlockPool
from .positions import coarse_scale_positions, rotary_fraction


def retina_bounds(t, block_lengths: List[int], window: int, blocks: List[int]) -> list:
    """[b_0(t), b_1(t), ..., b_{S-1}(t)]: scale s reads the span [b_s, b_{s-1}) (scale 0: [b_0, t]).

    `t` is a tensor of positions (the blockwise pass) or one int (a decoding step: plain Python, no tensor ops).
    """
    def at_least_zero(x):
        return x.clamp(min=0) if torch.is_tensor(x) else max(x, 0)

    k = block_lengths
    bounds = [at_least_zero((t - window + 1) // k[1] * k[1])]
    for s in range(1, len(k)):
        if blocks[s - 1] < 0:  # unbounded last scale: everything older
            bounds.append(t * 0)
            continue
        b = bounds[-1] - blocks[s - 1] * k[s]
        if s + 1 < len(k):
            b = b // k[s + 1] * k[s + 1]  # align so that the next scale starts on one of its block boundaries
        bounds.append(at_least_zero(b))
    return bounds


class ChunkGroup:
    """Consecutive query chunks that share one key count per scale: which keys each chunk gathers
    (``flat_index``: (n, L) rows of every scale's keys laid end to end, scale by scale, see ``attend_chunks``) and
    the (n, Q, L) mask, True = may attend. For gated scales: ``widths`` (L_s, the columns of each scale),
    ``opened_mask`` (n, Q, L), the mask in which a query that reads nothing of scale s is opened to all of s's
    columns (a softmax needs a key), and ``present`` (n, Q, 1, S), whether a query reads any key of each scale:
    the gates are multiplied by it, so an opened row's output (and its gradient) is exactly zero."""

    def __init__(self, t, bounds, block_lengths, chunk: int, length: int):
        n = t.numel() // chunk
        self.chunks = n
        flat, masks, offset = [], [], 0  # offset: the row where scale s's T / K_s keys start
        self.widths, present, opened = [], [], []
        for s, k in enumerate(block_lengths):
            # bounds grow with t: a chunk's first query reads the oldest key, its last query the newest
            lo = bounds[s].view(n, chunk)[:, 0] // k  # (n,)
            hi = t.view(n, chunk)[:, -1] + 1 if s == 0 else bounds[s - 1].view(n, chunk)[:, -1] // k  # (n,)
            count = max(int((hi - lo).max()), 1)
            index = lo.unsqueeze(1) + torch.arange(count, device=t.device)  # (n, L_s)
            # indices past a scale's end (padded chunks) read its last key, which the mask hides
            flat.append(index.clamp(0, length // k - 1) + offset)
            offset += length // k
            j = index.unsqueeze(1)  # (n, 1, L_s)
            q_lo = bounds[s].view(n, chunk, 1)  # (n, Q, 1)
            if s == 0:
                allowed = (q_lo <= j) & (j <= t.view(n, chunk, 1))
            else:
                allowed = (q_lo <= j * k) & ((j + 1) * k <= bounds[s - 1].view(n, chunk, 1))
            masks.append(allowed)
            reads = allowed.any(dim=2, keepdim=True)  # (n, Q, 1)
            self.widths.append(count)
            present.append(reads)
            opened.append(allowed | ~reads)
        self.present = torch.cat(present, dim=2).unsqueeze(2)  # (n, Q, 1, S): broadcast over heads
        self.opened_mask = torch.cat(opened, dim=2)  # (n, Q, L)
        self.mask = torch.cat(masks, dim=2)  # (n, Q, L)
        self.flat_index = torch.cat(flat, dim=1)  # (n, L)


class RetinaLayout:
    """The query chunks of a sequence, in a few groups.

    An unbounded last scale makes later chunks read more blocks; padding every chunk to the longest would
    waste about half of that work, so chunks are grouped and each group is padded to its own longest.
    """

    GROUPS = 4

    def __init__(self, length: int, block_lengths, window: int, blocks, chunk: int, device):
        self.chunk = chunk
        self.num_chunks = -(-length // chunk)
        t = torch.arange(self.num_chunks * chunk, device=device)  # (C*Q,) query positions, padded to chunks
        bounds = retina_bounds(t, block_lengths, window, blocks)
        per_group = -(-self.num_chunks // min(self.GROUPS, self.num_chunks))
        self.groups = []
        for c0 in range(0, self.num_chunks, per_group):
            span = slice(c0 * chunk, min(c0 + per_group, self.num_chunks) * chunk)
            self.groups.append(ChunkGroup(t[span], [b[span] for b in bounds], block_lengths, chunk, length))


def attend_chunks(layout, heads, queries, gates, dropout, *keys_values):
    """Blockwise retina attention: queries (B, C*Q, C) -> (B, C*Q, C), heads split from the key width.

    `keys_values` are the per-scale keys (B, T / K_s, C) followed by the per-scale values; `gates` (B, C*Q, H, S)
    in (0, 1) mixes the scales read with a softmax each (None: one softmax over all scales).
    """
    scales = len(keys_values) // 2
    # every scale's keys (values) end to end, (B, sum_s T / K_s, C): one gather per chunk group reads all scales
    keys, values = torch.cat(keys_values[:scales], dim=1), torch.cat(keys_values[scales:], dim=1)
    bsz, _, dim = queries.shape
    q_len = layout.chunk
    outputs, start = [], 0
    for group in layout.groups:
        n, index = group.chunks, group.flat_index  # (n, L)

        def gather(states):  # (B, sum_s N_s, C) -> (B*n, H, L, D)
            picked = states.index_select(1, index.flatten())  # (B, n*L, C)
            picked = picked.view(bsz, n, index.size(1), heads, -1).transpose(2, 3)
            return picked.reshape(bsz * n, heads, index.size(1), -1)

        k, v = gather(keys), gather(values)  # (B*n, H, L, D)
        q = queries[:, start : start + n * q_len].reshape(bsz * n, q_len, heads, -1).transpose(1, 2)
        if gates is None:
            mask = group.mask.unsqueeze(1).repeat(bsz, 1, 1, 1)  # (B*n, 1, Q, L)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)  # (B*n, H, Q, D)
        else:
            g = gates[:, start : start + n * q_len].reshape(bsz, n, q_len, heads, -1)  # (B, n, Q, H, S)
            g = (g * group.present).reshape(bsz * n, q_len, heads, -1).transpose(1, 2)  # (B*n,H,Q,S)
            # explicit scores: one SDPA call per scale on slices of k and v cost 2.1x the ungated attention, this 1.8x
            mask = group.opened_mask.unsqueeze(1)  # (n, 1, Q, L)
            scores = (q @ k.transpose(2, 3)) * q.size(-1) ** -0.5  # (B*n, H, Q, L)
            scores = scores.view(bsz, n, heads, q_len, -1).masked_fill(~mask, float("-inf")).flatten(0, 1)
            # a softmax per scale over its own columns, each scaled by its gate: (B*n, H, Q, L)
            weights = torch.cat([torch.softmax(part, dim=-1) * g[..., s : s + 1]
                                 for s, part in enumerate(scores.split(group.widths, dim=-1))], dim=-1)
            out = F.dropout(weights, dropout) @ v if dropout > 0 else weights @ v  # (B*n, H, Q, D)
        outputs.append(out.transpose(1, 2).reshape(bsz, n * q_len, dim))
        start += n * q_len
    return torch.cat(outputs, dim=1)


@functools.lru_cache(maxsize=32)
def retina_layout(length, block_lengths, window, blocks, chunk, device) -> RetinaLayout:
    """Shared by every layer with the same windows (a 16-layer model often has only two settings)."""
    return RetinaLayout(length, list(block_lengths), window, list(blocks), chunk, torch.device(device))


class RetinaAttention(nn.Module):
    """Self-attention of tokens over a window of tokens plus pooled keys/values of older blocks."""

    def __init__(self, args, grid, window: int, blocks: List[int]):
        super().__init__()
        dim = args.decoder_embed_dim
        self.grid, self.window, self.blocks = grid, window, list(blocks)
        self.attn = MultiScaleAttention(dim, args.decoder_attention_heads, args.attention_dropout,
                                        rotary_fraction(args))
        # keys and values of scale s are pooled from those of scale s - 1 (complete-block rule only)
        self.key_pools = nn.ModuleList(BlockPool(r, args.pool_type, dim) for r in grid.pool_factors)
        self.value_pools = nn.ModuleList(BlockPool(r, args.pool_type, dim) for r in grid.pool_factors)
        self.key_positions = coarse_scale_positions(args, grid)
        # query chunk: about half the window (a multiple of K_1), so a chunk's shared keys stay near W + Q
        k1 = grid.block_lengths[1]
        self.chunk = k1 * max(1, round(min(window, 256) / (2 * k1)))
        self.recompute = not getattr(args, "no_retina_recompute", False)
        # --retina-gate: one sigmoid gate per head and scale, from the query's input
        heads = args.decoder_attention_heads
        self.gate = nn.Linear(dim, heads * grid.num_scales) if getattr(args, "retina_gate", False) else None

    def layout(self, length: int, device) -> RetinaLayout:
        return retina_layout(length, tuple(self.grid.block_lengths), self.window, tuple(self.blocks), self.chunk,
                             str(device))

    def scale_keys_values(self, x):
        """(B, T, C) -> per scale s: keys and values (B, T / K_s, C); rotary positions: keys rotated by their
        ready positions."""
        keys, values = [self.attn.k_proj(x)], [self.attn.v_proj(x)]
        for key_pool, value_pool in zip(self.key_pools, self.value_pools):
            keys.append(key_pool(keys[-1]))  # pooled from the previous scale's keys, before positions
            values.append(value_pool(values[-1]))
        keys = keys[:1] + [positions(k) for positions, k in zip(self.key_positions, keys[1:])]
        keys = [self.attn.rotate(k, self.grid.ready(s, k.size(1), x.device)) if self.attn.rotary is not None else k
                for s, k in enumerate(keys)]
        return keys, values

    def self_attention(self, x: torch.Tensor, positions=None) -> torch.Tensor:
        """x (B, T, C) tokens at positions 0..T-1 (`positions`, as other layers get it, is that)."""
        length = x.size(1)  # T, a multiple of the grid
        layout = self.layout(length, x.device)
        keys, values = self.scale_keys_values(x)
        padded = layout.num_chunks * layout.chunk
        x = F.pad(x, (0, 0, 0, padded - length))  # (B, C*Q, C)
        queries = self.attn.q_proj(x)
        if self.attn.rotary is not None:
            queries = self.attn.rotate(queries, torch.arange(padded, device=x.device))
        gates = None if self.gate is None else self.scale_gates(x)  # (B, C*Q, H, S)

        dropout = self.attn.attention_dropout if self.training else 0.0
        args = (layout, self.attn.num_heads, queries, gates, dropout, *keys, *values)
        if self.recompute and torch.is_grad_enabled():
            # keep only the per-scale keys/values for backward and gather again there: every chunk's own copy
            # of the keys it reads would otherwise be saved (~3x the memory of dense fused attention)
            out = checkpoint(attend_chunks, *args, use_reentrant=False)
        else:
            out = attend_chunks(*args)
        return self.attn.out_proj(out[:, :length])

    def scale_gates(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) query inputs -> (B, N, H, S) gates in (0, 1), one per head and scale."""
        return torch.sigmoid(self.gate(x)).view(x.size(0), x.size(1), self.attn.num_heads, -1)

    def step(self, x: torch.Tensor, t: int, cache: dict, name: str, extra_kv=None) -> torch.Tensor:
        """Incremental decoding of position t, x (B, 1, C).

        The cache holds, per scale, exactly what later queries can still read: the tokens from b_0(t) on,
        and the blocks of scale s from b_s(t) on (bounds only grow with t), so it grows like W + T / K_{S-1}
        (constant with a bounded last scale). Incomplete blocks wait, as raw keys/values, in pooling buffers.
        """
        lengths = self.grid.block_lengths
        bounds = retina_bounds(t, lengths, self.window, self.blocks)
        position = self.attn.step_position(x, t)  # every element formed at t is ready at t (complete rule)
        new_k, new_v = self.attn.k_proj(x), self.attn.v_proj(x)  # (B, 1, C), pooled unrotated
        keys, values, scales = [], [], []  # what this step reads of each scale s in `scales`
        for s, k in enumerate(lengths):
            if s > 0 and new_k is not None:  # pool the finer scale's new element into this scale's buffer
                new_k = self.key_pools[s - 1].step(new_k, cache, f"{name}.kbuf{s}")
                new_v = self.value_pools[s - 1].step(new_v, cache, f"{name}.vbuf{s}")
                if new_k is not None:
                    offset = self.grid.newest_block(s, t)
                    key = self.key_positions[s - 1](new_k, offset=offset)
                    append_cache(cache, f"{name}.k{s}", self.attn.rotate(key, position))
                    append_cache(cache, f"{name}.v{s}", new_v)
            elif s == 0:
                append_cache(cache, f"{name}.k0", self.attn.rotate(new_k, position))
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
            scales.append(s)
        if self.gate is not None:
            return self.gated_step(x, position, scales, keys, values)
        keys, values = torch.cat(keys, dim=1), torch.cat(values, dim=1)  # (B, L_t, C)
        return self.attn.attend(x, self.attn.split_heads(keys), self.attn.split_heads(values), positions=position)

    def gated_step(self, x, position, scales, keys, values) -> torch.Tensor:
        """--retina-gate while decoding: x (B, 1, C) reads each scale's keys (B, L_s, C) with its own softmax; a
        scale with nothing to read adds nothing (as ``present`` in the blockwise pass)."""
        q = self.attn.split_heads(self.attn.rotate(self.attn.q_proj(x), position))  # (B, H, 1, D)
        gates = self.scale_gates(x).transpose(1, 2)  # (B, H, 1, S)
        out = torch.zeros_like(q)
        for s, k, v in zip(scales, keys, values):
            if k.size(1) > 0:
                read = F.scaled_dot_product_attention(q, self.attn.split_heads(k), self.attn.split_heads(v))
                out = out + read * gates[..., s : s + 1]
        return self.attn.out_proj(out.transpose(1, 2).reshape(x.size(0), 1, -1))
