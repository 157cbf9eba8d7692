"""Retina (foveated) attention: recent tokens at full resolution, older ones as pooled blocks (design.md §3).

For a query at position t and scales s = 1 .. S-1 with block lengths K_s, the past is cut into disjoint,
block-aligned spans, newest first (``retina_bounds``):

    scale 0 (tokens):  [b_0, t]           b_0 = floor((t - W + 1) / K_1) * K_1          (W .. W + K_1 - 1 tokens)
                                          bucketed: b_0 = (floor(t / W) - 1) * W        (W + 1 .. 2W tokens)
    scale s (blocks):  [b_s, b_{s-1})     b_s = floor((b_{s-1} - n_s K_s) / K_{s+1}) * K_{s+1}   (n_s .. blocks)
    last scale:        [b_{S-1}, b_{S-2})  n_{S-1} blocks, or everything older when n_{S-1} = -1

so every position is read once, at one resolution, and only complete blocks are read (the causality rule).
Bucketed (--retina-bucketed-window): the window starts one W-token bucket before the query's own, as in
local-attention with one bucket of look-back, so retina reads what local-attention reads plus the older blocks, and
every query of a bucket reads the same blocks (a query chunk of W, the chunk for W <= 128, gathers no block it
does not use).

Blockwise: queries are cut into chunks of Q; each chunk gathers the few keys its queries can read (a fixed
count L per chunk, about W + Q + sum_s (n_s + Q / K_s)) and runs one masked SDPA over (Q, L) (gated scales:
matmuls and a softmax per scale, gated_chunks.py). Memory and
compute per query grow like W + T / K_{S-1} (or stay constant with a bounded last scale), never like T.

Gated scales (--retina-gate, NSA's gated branches, Yuan et al. 2025): each scale gets its own softmax, and the
scales' outputs are summed with per-head sigmoid gates of the query's input, so the coarse scales add to what
the window reads instead of taking softmax mass from it. The same keys are read; only the mixing changes.

Selected blocks (--retina-select N, NSA's selection branch; needs the gates): each query also reads, at full
resolution, the N blocks of the coarsest scale (K_{S-1} tokens each) that lie wholly before its window and whose
pooled keys its query scores highest (summed over heads, so all heads read the same tokens: NSA's shared
selection). They are a further gated branch with its own softmax: exact copying from far back, which pooled keys
cannot do. The choice (top-N) gets no gradient, as in NSA; the keys it ranks learn through the coarse scale.
"""
import functools
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import MultiScaleAttention, append_cache
from .gated_chunks import attend_chunks_gated
from .pooling import BlockPool
from .positions import coarse_scale_positions, rotary_fraction


def retina_bounds(t, block_lengths: List[int], window: int, blocks: List[int], bucketed: bool = False) -> list:
    """[b_0(t), b_1(t), ..., b_{S-1}(t)]: scale s reads the span [b_s, b_{s-1}) (scale 0: [b_0, t]).

    `t` is a tensor of positions (the blockwise pass) or one int (a decoding step: plain Python, no tensor ops).
    bucketed: the window starts at the bucket before t's (W-token buckets; W a multiple of K_1).
    """
    def at_least_zero(x):
        return x.clamp(min=0) if torch.is_tensor(x) else max(x, 0)

    k = block_lengths
    start = (t // window - 1) * window if bucketed else (t - window + 1) // k[1] * k[1]
    bounds = [at_least_zero(start)]
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
    ``opened_hidden`` (n, Q, L), the mask's complement in which a query that reads nothing of scale s is
    opened to all of s's columns (a softmax needs a key), and ``present`` (n, Q, S), whether a query reads any
    key of each scale: the gates are multiplied by it, so an opened row's output (and its gradient) is exactly zero.
    """

    def __init__(self, t, bounds, block_lengths, chunk: int, length: int):
        n = t.numel() // chunk
        self.chunks = n
        flat, self.masks, offset = [], [], 0  # offset: the row where scale s's T / K_s keys start
        self.widths = []
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
            self.masks.append(allowed)  # (n, Q, L_s)
            self.widths.append(count)
        self.mask = torch.cat(self.masks, dim=2)  # (n, Q, L)
        self.flat_index = torch.cat(flat, dim=1)  # (n, L)

    # the gated scales' masks: built on first use (a layout is cached, so once per length)
    @functools.cached_property
    def present(self) -> torch.Tensor:  # (n, Q, S): broadcast over batch and heads
        return torch.cat([m.any(dim=2, keepdim=True) for m in self.masks], dim=2)

    @functools.cached_property
    def opened_hidden(self) -> torch.Tensor:  # (n, Q, L): True = hidden
        return ~torch.cat([m | ~m.any(dim=2, keepdim=True) for m in self.masks], dim=2)


class RetinaLayout:
    """The query chunks of a sequence, in a few groups.

    An unbounded last scale makes later chunks read more blocks; padding every chunk to the longest would
    waste about half of that work, so chunks are grouped and each group is padded to its own longest.
    """

    GROUPS = 4

    def __init__(self, length: int, block_lengths, window: int, blocks, chunk: int, device, bucketed=False):
        self.chunk = chunk
        self.num_chunks = -(-length // chunk)
        t = torch.arange(self.num_chunks * chunk, device=device)  # (C*Q,) query positions, padded to chunks
        bounds = retina_bounds(t, block_lengths, window, blocks, bucketed)
        per_group = -(-self.num_chunks // min(self.GROUPS, self.num_chunks))
        self.groups = []
        for c0 in range(0, self.num_chunks, per_group):
            span = slice(c0 * chunk, min(c0 + per_group, self.num_chunks) * chunk)
            self.groups.append(ChunkGroup(t[span], [b[span] for b in bounds], block_lengths, chunk, length))


def attend_chunks(layout, heads, queries, dropout, *keys_values):
    """Blockwise retina attention, one softmax over all scales: queries (B, C*Q, C) -> (B, C*Q, C), heads split
    from the key width. `keys_values` are the per-scale keys (B, T / K_s, C) followed by the per-scale values.
    (Gated scales: ``attend_chunks_gated``.)"""
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
        mask = group.mask.unsqueeze(1).repeat(bsz, 1, 1, 1)  # (B*n, 1, Q, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)  # (B*n, H, Q, D)
        outputs.append(out.transpose(1, 2).reshape(bsz, n * q_len, dim))
        start += n * q_len
    return torch.cat(outputs, dim=1)


def attend_selected(queries, gate, token_keys, token_values, block_keys, block_len: int, selectable, count: int,
                    heads: int, dropout: float) -> torch.Tensor:
    """Selected blocks: queries (B, N, C) read the tokens of their top-`count` selectable blocks -> (B, N, C),
    already multiplied by `gate` (B, N, H, 1); zero for a query with no selectable block.

    token_keys/values (B, M, C) are the tokens the blocks cover (block j: tokens [j*K, (j+1)*K), K = block_len);
    block_keys (B, nb, C) the blocks' pooled keys, nb * K <= M; selectable (N, nb) bool: query i may pick block j.
    The picked tokens are read through one SDPA over all M tokens under a mask: gathering each query's own
    N*K tokens instead made training 5x slower on CPU (many tiny matmuls, and index_add in backward).
    """
    bsz, n, dim = queries.shape
    num_blocks = block_keys.size(1)
    count = min(count, num_blocks)
    if count == 0:
        return queries.new_zeros(bsz, n, dim)
    with torch.no_grad():  # the choice gets no gradient; scored in fp32 (fp16 scores could overflow to inf)
        importance = queries.float() @ block_keys.float().transpose(1, 2)  # (B, N, nb)
        top, chosen = importance.masked_fill(~selectable, float("-inf")).topk(count, dim=-1)  # (B, N, n)
        # False where fewer than `count` blocks are selectable (the rest of the top-n are unselectable ones)
        picked = selectable.expand_as(importance).gather(2, chosen)  # (B, N, n)
        blocks = torch.zeros_like(importance, dtype=torch.bool).scatter_(2, chosen, picked)  # (B, N, nb)
        mask = blocks.repeat_interleave(block_len, dim=2)  # (B, N, nb*K)
        mask = F.pad(mask, (0, token_keys.size(1) - mask.size(2)))  # (B, N, M)
        reads = picked.any(dim=2, keepdim=True)  # (B, N, 1)
        # a query with nothing picked is opened to every token (a softmax needs a key) and its gate set to zero,
        # so its output and every gradient through it are exactly zero
        mask = mask | ~reads

    def split(x):  # (B, L, C) -> (B, H, L, D)
        return x.view(bsz, x.size(1), heads, -1).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(queries), split(token_keys), split(token_values),
                                         attn_mask=mask.unsqueeze(1), dropout_p=dropout)  # (B, H, N, D)
    out = out * (gate * reads.unsqueeze(-1)).transpose(1, 2)  # gate (B, N, H, 1) -> (B, H, N, 1)
    return out.transpose(1, 2).reshape(bsz, n, dim)


def selectable_blocks(t: torch.Tensor, num_blocks: int, block_lengths, window: int, blocks,
                      bucketed: bool = False) -> torch.Tensor:
    """(N, nb) bool for queries at positions t (N,): query t may select block j of the coarsest scale iff the block
    lies wholly before its window (complete, so leak-free, and not already read at full resolution):
    (j + 1) * K <= b_0(t). The full pass and a decoding step both ask this."""
    window_start = retina_bounds(t, list(block_lengths), window, list(blocks), bucketed)[0]  # (N,)
    ends = (torch.arange(num_blocks, device=t.device) + 1) * block_lengths[-1]  # (nb,)
    return ends.unsqueeze(0) <= window_start.unsqueeze(1)


@functools.lru_cache(maxsize=32)
def selectable_in_sample(length, block_lengths, window, blocks, device, bucketed=False) -> torch.Tensor:
    """selectable_blocks for every position of a sample of `length` tokens, (T, T / K_{S-1}); cached per length."""
    t = torch.arange(length, device=torch.device(device))
    return selectable_blocks(t, length // block_lengths[-1], block_lengths, window, blocks, bucketed)


@functools.lru_cache(maxsize=32)
def retina_layout(length, block_lengths, window, blocks, chunk, device, bucketed=False) -> RetinaLayout:
    """Shared by every layer with the same windows (a 16-layer model often has only two settings)."""
    return RetinaLayout(length, list(block_lengths), window, list(blocks), chunk, torch.device(device), bucketed)


class RetinaAttention(nn.Module):
    """Self-attention of tokens over a window of tokens plus pooled keys/values of older blocks."""

    def __init__(self, args, grid, window: int, blocks: List[int]):
        super().__init__()
        dim = args.decoder_embed_dim
        self.grid, self.window, self.blocks = grid, window, list(blocks)
        self.bucketed = getattr(args, "retina_bucketed_window", False)
        self.attn = MultiScaleAttention(dim, args.decoder_attention_heads, args.attention_dropout,
                                        rotary_fraction(args))
        # keys and values of scale s are pooled from those of scale s - 1 (complete-block rule only)
        self.key_pools = nn.ModuleList(BlockPool(r, args.pool_type, dim) for r in grid.pool_factors)
        self.value_pools = nn.ModuleList(BlockPool(r, args.pool_type, dim) for r in grid.pool_factors)
        self.key_positions = coarse_scale_positions(args, grid)
        # query chunk: about the window, at most 128 (a multiple of K_1): a chunk's shared keys stay near W + Q.
        # Half the window made more, smaller matmuls: the paper-scale gated retina trained ~10% slower at W = 64
        k1 = grid.block_lengths[1]
        self.chunk = k1 * max(1, round(min(window, 128) / k1))
        self.recompute = not getattr(args, "no_retina_recompute", False)
        # --retina-gate: one sigmoid gate per head and scale, from the query's input
        heads = args.decoder_attention_heads
        # --retina-select N: N selected blocks of the coarsest scale, one more gated branch
        self.select = getattr(args, "retina_select", 0)
        branches = grid.num_scales + (1 if self.select else 0)
        self.gate = nn.Linear(dim, heads * branches) if getattr(args, "retina_gate", False) else None

    def layout(self, length: int, device) -> RetinaLayout:
        return retina_layout(length, tuple(self.grid.block_lengths), self.window, tuple(self.blocks), self.chunk,
                             str(device), self.bucketed)

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
        positions = torch.arange(padded, device=x.device) if self.attn.rotary is not None else None
        queries = self.attn.project_queries(x, positions)  # (B, C*Q, C)
        gates = None if self.gate is None else self.scale_gates(x)  # (B, C*Q, H, S), + 1 branch with --retina-select
        heads, dropout = self.attn.num_heads, self.attn.attention_dropout if self.training else 0.0
        selectable = self.selectable(length, x.device) if self.select else None

        # recompute: keep only the per-scale keys/values for backward and gather again there: every chunk's own
        # copy of the keys it reads would otherwise be saved (~3x the memory of dense fused attention)
        recompute = self.recompute and torch.is_grad_enabled()
        if self.gate is None:
            read = functools.partial(attend_chunks, layout, heads)
            inputs = (queries, dropout, *keys, *values)
            out = (checkpoint(read, *inputs, use_reentrant=False) if recompute else read(*inputs))[:, :length]
            return self.attn.out_proj(out)
        # gated scales gather again in backward by themselves (gated_chunks.py), and compute their weights again
        # unless --no-retina-recompute keeps them
        scales = self.grid.num_scales
        keep_weights = not self.recompute and torch.is_grad_enabled()  # nothing to keep them for at evaluation
        out = attend_chunks_gated(layout, heads, queries, gates[..., :scales], dropout, keep_weights, *keys,
                                  *values)[:, :length]
        if self.select:
            read = functools.partial(attend_selected, block_len=self.grid.block_lengths[-1], selectable=selectable,
                                     count=self.select, heads=heads, dropout=dropout)
            inputs = (queries[:, :length], gates[:, :length, :, -1:], keys[0], values[0], keys[-1])
            out = out + (checkpoint(read, *inputs, use_reentrant=False) if recompute else read(*inputs))
        return self.attn.out_proj(out)

    def selectable(self, length: int, device) -> torch.Tensor:
        return selectable_in_sample(length, tuple(self.grid.block_lengths), self.window, tuple(self.blocks),
                                    str(device), self.bucketed)

    def scale_gates(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) query inputs -> (B, N, H, S) gates in (0, 1), one per head and scale."""
        return torch.sigmoid(self.gate(x)).view(x.size(0), x.size(1), self.attn.num_heads, -1)

    def step(self, x: torch.Tensor, t: int, cache: dict, name: str, extra_kv=None) -> torch.Tensor:
        """Incremental decoding of position t, x (B, 1, C).

        The cache holds, per scale, exactly what later queries can still read: the tokens from b_0(t) on,
        and the blocks of scale s from b_s(t) on (bounds only grow with t), so it grows like W + T / K_{S-1}
        (constant with a bounded last scale). Incomplete blocks wait, as raw keys/values, in pooling buffers.
        With --retina-select it also keeps every token and every coarsest block (any may be selected): T.
        """
        lengths = self.grid.block_lengths
        bounds = retina_bounds(t, lengths, self.window, self.blocks, self.bucketed)
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
                    if self.select and s == len(lengths) - 1:  # every block stays selectable: keep them all
                        append_cache(cache, f"{name}.select_blocks", cache[f"{name}.k{s}"][:, -1:])
            elif s == 0:
                append_cache(cache, f"{name}.k0", self.attn.rotate(new_k, position))
                append_cache(cache, f"{name}.v0", new_v)
                if self.select:  # the selected blocks' tokens, all of them
                    append_cache(cache, f"{name}.select_k", cache[f"{name}.k0"][:, -1:])
                    append_cache(cache, f"{name}.select_v", new_v)
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
            selected = None
            if f"{name}.select_blocks" in cache:
                blocks = cache[f"{name}.select_blocks"]  # (B, nb, C)
                selectable = selectable_blocks(torch.tensor([t], device=x.device), blocks.size(1), lengths,
                                               self.window, self.blocks, self.bucketed)  # (1, nb)
                selected = (cache[f"{name}.select_k"], cache[f"{name}.select_v"], blocks, selectable)
            return self.gated_step(x, position, scales, keys, values, selected)
        keys, values = torch.cat(keys, dim=1), torch.cat(values, dim=1)  # (B, L_t, C)
        return self.attn.attend(x, self.attn.split_heads(keys), self.attn.split_heads(values), positions=position)

    def gated_step(self, x, position, scales, keys, values, selected=None) -> torch.Tensor:
        """--retina-gate while decoding: x (B, 1, C) reads each scale's keys (B, L_s, C) with its own softmax; a
        scale with nothing to read adds nothing (as ``present`` in the blockwise pass). `selected`: (token keys,
        token values, block keys, selectable) for --retina-select, None before the first coarsest block."""
        query = self.attn.project_queries(x, position)  # (B, 1, C)
        q = self.attn.split_heads(query)  # (B, H, 1, D)
        gates = self.scale_gates(x)  # (B, 1, H, S [+ 1])
        head_gates = gates.transpose(1, 2)  # (B, H, 1, S [+ 1])
        out = torch.zeros_like(q)
        for s, k, v in zip(scales, keys, values):
            if k.size(1) > 0:
                read = F.scaled_dot_product_attention(q, self.attn.split_heads(k), self.attn.split_heads(v))
                out = out + read * head_gates[..., s : s + 1]
        out = self.attn.merge_heads(out)  # (B, 1, C)
        if selected is not None:
            token_keys, token_values, block_keys, selectable = selected
            out = out + attend_selected(query, gates[..., -1:], token_keys, token_values, block_keys,
                                        self.grid.block_lengths[-1], selectable, self.select, self.attn.num_heads, 0.0)
        return self.attn.out_proj(out)
