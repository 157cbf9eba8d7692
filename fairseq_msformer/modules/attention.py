"""Pre-norm Transformer layers whose attention may read a memory that mixes several scales.

Attention goes through ``F.scaled_dot_product_attention`` with either ``is_causal`` (self-attention within one
scale) or a boolean block mask from ``causal_block_mask`` (reading other scales): no T x T score matrix is
kept for backward (design.md §6). Masks are boolean, so they work unchanged under fp16/bf16.

With rotary positions (--rotary-positions) queries and keys are rotated by their elements' ready positions in
tokens (``ScaleGrid.ready``), which every caller passes beside its states; while decoding, the element formed at
step t is always ready at t (a token at t, a block the step it completes), so a step rotates at t.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq import utils
from fairseq.modules import FairseqDropout, LayerNorm
from torch.utils.checkpoint import checkpoint

from .positions import RotaryPositions, rotary_fraction


def append_cache(cache: dict, name: str, value: torch.Tensor) -> torch.Tensor:
    """Incremental decoding: append (B, n, C) to cache[name] along time; returns the whole cached tensor.

    Every cached tensor is batch-first, so beam search reorders them all with index_select(0, order).
    """
    old = cache.get(name)
    cache[name] = value if old is None else torch.cat([old, value], dim=1)
    return cache[name]


class MultiScaleAttention(nn.Module):
    """Multi-head attention of queries (B, Tq, C) over a memory (B, Tk, C)."""

    def __init__(self, dim: int, num_heads: int, attention_dropout: float, rotary_fraction: float = 0.0):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embedding dim {dim} is not divisible by {num_heads} attention heads")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.attention_dropout = attention_dropout
        # rotary positions on this fraction of each head's dimensions (0: none)
        self.rotary = RotaryPositions(self.head_dim, rotary_fraction) if rotary_fraction > 0 else None
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(proj.weight, gain=2**-0.5)  # as fairseq's MultiheadAttention
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        bsz, n, _ = x.shape
        return x.view(bsz, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, D)

    def rotate(self, x: torch.Tensor, positions: Optional[torch.Tensor]) -> torch.Tensor:
        """Projected queries or keys (B, N, C) of elements at `positions` (N,) tokens -> rotated (B, N, C); x itself
        without rotary positions."""
        if self.rotary is None:
            return x
        if positions is None:
            raise ValueError("rotary positions: the caller must pass the positions of the queries and keys")
        bsz, n, _ = x.shape
        return self.rotary(x.view(bsz, n, self.num_heads, self.head_dim), positions).view(bsz, n, -1)

    def project_queries(self, query: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, Tq, C) at `positions` (Tq,) -> projected, rotated queries (B, Tq, C), heads side by side."""
        return self.rotate(self.q_proj(query), positions)

    @staticmethod
    def merge_heads(x: torch.Tensor) -> torch.Tensor:
        """(B, H, N, D) -> (B, N, H*D), the input of out_proj."""
        bsz, _, n, _ = x.shape
        return x.transpose(1, 2).reshape(bsz, n, -1)

    def keys_values(self, memory: torch.Tensor, positions: Optional[torch.Tensor] = None):
        """(B, Tk, C) -> keys and values, each (B, H, Tk, D)."""
        return self.split_heads(self.rotate(self.k_proj(memory), positions)), self.split_heads(self.v_proj(memory))

    def attend(self, query, keys, values, mask: Optional[torch.Tensor] = None, causal: bool = False,
               positions: Optional[torch.Tensor] = None):
        """query (B, Tq, C) at `positions` (Tq,), keys/values (B, H, Tk, D), mask (Tq, Tk) or (B|1, H|1, Tq, Tk)
        bool -> (B, Tq, C)."""
        q = self.split_heads(self.project_queries(query, positions))  # (B, H, Tq, D)
        out = F.scaled_dot_product_attention(
            q, keys, values,
            attn_mask=mask,
            dropout_p=self.attention_dropout if self.training else 0.0,
            is_causal=causal and mask is None,
        )  # (B, H, Tq, D)
        return self.out_proj(self.merge_heads(out))

    def forward(self, query, memory, mask=None, causal=False, positions=None, memory_positions=None):
        keys, values = self.keys_values(memory, memory_positions)
        return self.attend(query, keys, values, mask=mask, causal=causal, positions=positions)

    def self_attention(self, x, positions=None):
        """Causal self-attention within one scale: (B, N, C) at positions (N,) -> (B, N, C)."""
        return self(x, x, causal=True, positions=positions, memory_positions=positions)

    def step(self, x, t: int, cache: dict, name: str, extra_kv=None):
        """Incremental: x (B, 1, C), formed at step t, reads every cached element of its scale, itself, and
        `extra_kv` (projected, rotated keys/values (B, M, C) of other scales' ready blocks)."""
        position = self.step_position(x, t)
        keys = append_cache(cache, name + ".k", self.rotate(self.k_proj(x), position))  # (B, n, C)
        values = append_cache(cache, name + ".v", self.v_proj(x))
        if extra_kv is not None:
            keys, values = torch.cat([keys, extra_kv[0]], dim=1), torch.cat([values, extra_kv[1]], dim=1)
        return self.attend(x, self.split_heads(keys), self.split_heads(values), positions=position)

    def step_position(self, x: torch.Tensor, t: int) -> Optional[torch.Tensor]:
        """(N,) positions of the N elements of x (B, N, C) that a decoding step at t forms (each is ready at t), or
        None without rotary positions."""
        return None if self.rotary is None else torch.full((x.size(1),), t, device=x.device)


class TransformerBlock(nn.Module):
    """Pre-norm layer: x + Attn(LN(x) -> memory), then x + FFN(LN(x)).

    The FFN is fc2(act(fc1(h))), or with --ffn-glu a gated linear unit (Shazeer 2020; GEGLU with --activation-fn
    gelu, as local-attention's FFN): fc1 gives two halves, act(one) gates the other. The halves are 2/3 of
    --decoder-ffn-embed-dim wide, so that switching it on keeps the parameters (as local-attention does).

    Without ``extra_memory`` it is causal self-attention within one scale. With it, the queries read
    [LN(x); extra_memory] under ``mask`` (the bottom-up aggregation layer: tokens read tokens and blocks).
    ``positions`` (N,) and ``memory_positions`` are the elements' ready positions, read by rotary positions only.
    """

    def __init__(self, args, attention: Optional[nn.Module] = None):
        super().__init__()
        dim = args.decoder_embed_dim
        self.attn_norm = LayerNorm(dim)
        # any module with .self_attention(x) (and, for extra_memory, MultiScaleAttention's call signature)
        self.attn = attention or MultiScaleAttention(
            dim, args.decoder_attention_heads, args.attention_dropout, rotary_fraction(args))
        self.ffn_norm = LayerNorm(dim)
        self.glu = getattr(args, "ffn_glu", False)
        inner = args.decoder_ffn_embed_dim * 2 // 3 if self.glu else args.decoder_ffn_embed_dim  # F
        self.fc1 = nn.Linear(dim, 2 * inner if self.glu else inner)
        self.fc2 = nn.Linear(inner, dim)
        self.activation_fn = utils.get_activation_fn(args.activation_fn)
        self.dropout = FairseqDropout(args.dropout, module_name=type(self).__name__)
        self.activation_dropout = FairseqDropout(args.activation_dropout, module_name=type(self).__name__)

    def forward(self, x, extra_memory=None, mask=None, positions=None, memory_positions=None):
        h = self.attn_norm(x)
        if extra_memory is None:
            x = x + self.dropout(self.attn.self_attention(h, positions))
        else:
            memory = torch.cat([h, extra_memory], dim=1)  # (B, T + sum_s N_s, C)
            x = x + self.dropout(self.attn(h, memory, mask=mask, positions=positions,
                                           memory_positions=memory_positions))
        return self.feed_forward(x)

    def feed_forward(self, x):
        h = self.fc1(self.ffn_norm(x))  # (B, N, F), or (B, N, 2F) with --ffn-glu
        if not self.glu:
            h = self.activation_fn(h)
        elif torch.is_grad_enabled() and h.requires_grad:
            # backward recomputes act(gate) instead of keeping it: fc1's output and the product are kept anyway
            # (checkpoint input, fc2's input), so this saves a quarter of the gated FFN's bytes for backward
            h = checkpoint(self.gated_linear_unit, h, use_reentrant=False)
        else:
            h = self.gated_linear_unit(h)
        return x + self.dropout(self.fc2(self.activation_dropout(h)))

    def gated_linear_unit(self, h):
        """(B, N, 2F) -> (B, N, F): act(one half) gates the other."""
        h, gate = h.chunk(2, dim=-1)
        return h * self.activation_fn(gate)

    def step(self, x, t: int, cache: dict, name: str, extra_kv=None):
        """Incremental decoding of one new element x (B, 1, C) at position t (see the attention's step)."""
        h = self.attn_norm(x)
        x = x + self.dropout(self.attn.step(h, t, cache, name, extra_kv=extra_kv))
        return self.feed_forward(x)


class LayerStack(nn.Module):
    """n causal self-attention layers at one scale, optionally followed by a LayerNorm.

    Pre-norm stacks leave an unnormalised residual stream; a stack whose output is read by another scale
    (pooled, upsampled or attended to) ends with ``final_norm``. The decoder's own final norm serves the last one.
    """

    def __init__(self, args, num_layers: int, final_norm: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(num_layers))
        self.final_norm = LayerNorm(args.decoder_embed_dim) if final_norm and num_layers > 0 else None

    def forward(self, x, inner_states=None, positions=None):
        """x (B, N, C) at ready positions (N,) (read by rotary positions only)."""
        for layer in self.layers:
            x = layer(x, positions=positions)
            if inner_states is not None:
                inner_states.append(x)
        return self.final_norm(x) if self.final_norm is not None else x

    def step(self, x, t: int, cache: dict, name: str):
        for i, layer in enumerate(self.layers):
            x = layer.step(x, t, cache, f"{name}.{i}")
        return self.final_norm(x) if self.final_norm is not None else x
