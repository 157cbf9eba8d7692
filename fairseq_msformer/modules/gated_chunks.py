"""Retina's gated scales (--retina-gate), blockwise, with a hand-written backward that keeps the attention weights.

Each query reads every scale s through its own softmax and mixes the scales' outputs with sigmoid gates:

    out = sum_s g_s * P_s @ V_s,    P_s = softmax(Q K_s^T / sqrt(D)) over the keys of s it may read

Query chunks gather the keys they read (``ChunkGroup.flat_index``), so a chunk's gathered keys and values are
copies, about (W + Q + blocks) / Q times the size of the originals (~6x at W = 64, Q = 32). Plain autograd would
keep those copies for backward, and recomputing the whole attention in backward (checkpointing) costs a second
forward pass. This Function keeps the weights P_s (H * L numbers per query) and the un-gathered keys and values,
and gathers again in backward (an index_select, cheap): one backward pass, no second forward.

Backward, per scale s (O_s = P_s V_s is recomputed, one matmul, rather than kept):
    dg_s = rowsum(dOut * O_s)              dV_s = P_s^T (g_s dOut)            dP_s = (g_s dOut) V_s^T
    dS_s = P_s * (dP_s - rowsum(dP_s * P_s))                                  dQ += dS_s K_s,  dK_s = dS_s^T Q
Attention dropout multiplies P_s by a kept mask / (1 - p) after the softmax; the mask is kept (one byte per weight).
Work is laid out head-major, (B, H, chunks, ...): gathered keys and chunked queries are then views of contiguous
memory that the batched matmuls read directly, and one mask (n, Q, L) broadcasts over B and H.
"""
import torch


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, H, N, D), contiguous (one copy)."""
    bsz, n, _ = x.shape
    return x.view(bsz, n, heads, -1).transpose(1, 2).contiguous()


class GatedChunkAttention(torch.autograd.Function):
    """q (B, H, C*Q, D) already scaled by 1/sqrt(D), keys/values (B, H, N, D) every scale end to end, gates
    (B, H, C*Q, S) -> (B, H, C*Q, D). `layout` is a RetinaLayout (its groups' gather indices and masks)."""

    @staticmethod
    def forward(ctx, q, keys, values, gates, layout, dropout: float):
        # one dtype throughout (q's: the model's, or autocast's for the projections), and autocast off in here:
        # backward, which autocast does not reach, must find the dtypes forward computed in
        with torch.autocast(q.device.type, enabled=False):
            return GatedChunkAttention.attend(ctx, q, keys.to(q.dtype), values.to(q.dtype), gates.to(q.dtype), layout,
                                              dropout)

    @staticmethod
    def attend(ctx, q, keys, values, gates, layout, dropout: float):
        bsz, heads, _, dim = q.shape
        q_len, outputs, saved, start = layout.chunk, [], [], 0
        exact = torch.promote_types(q.dtype, torch.float32)  # softmax in fp32 (or fp64) even for half inputs
        for group in layout.groups:
            n, index = group.chunks, group.flat_index.flatten()  # (n*L,)
            k = keys.index_select(2, index).view(bsz, heads, n, -1, dim)  # (B, H, n, L, D)
            v = values.index_select(2, index).view(bsz, heads, n, -1, dim)
            q_group = q[:, :, start : start + n * q_len].view(bsz, heads, n, q_len, dim)  # (B, H, n, Q, D)
            g = gates[:, :, start : start + n * q_len].reshape(bsz, heads, n, q_len, -1) * group.present  # (..,Q,S)
            scores = (q_group @ k.transpose(-1, -2)).masked_fill_(group.opened_hidden, float("-inf"))  # (.., Q, L)
            out = q_group.new_zeros(q_group.shape)
            for s, (part, v_s) in enumerate(zip(scores.split(group.widths, dim=-1), v.split(group.widths, dim=3))):
                weights = torch.softmax(part, dim=-1, dtype=exact).to(q.dtype)  # (B, H, n, Q, L_s)
                kept = torch.rand_like(weights) >= dropout if dropout > 0 else None
                mixed = weights * kept / (1 - dropout) if kept is not None else weights
                out += (mixed @ v_s) * g[..., s : s + 1]  # (B, H, n, Q, D)
                saved += [weights] + ([kept] if kept is not None else [])
            outputs.append(out.view(bsz, heads, n * q_len, dim))
            start += n * q_len
        ctx.layout, ctx.dropout = layout, dropout
        ctx.save_for_backward(q, keys, values, gates, *saved)
        return torch.cat(outputs, dim=2)

    @staticmethod
    def backward(ctx, grad_out):
        q, keys, values, gates, *saved = ctx.saved_tensors
        layout, dropout = ctx.layout, ctx.dropout
        bsz, heads, _, dim = q.shape
        grad_q, grad_gates = torch.zeros_like(q), torch.zeros_like(gates)
        grad_keys, grad_values = torch.zeros_like(keys), torch.zeros_like(values)
        saved, q_len, start = iter(saved), layout.chunk, 0
        for group in layout.groups:
            n, index = group.chunks, group.flat_index.flatten()
            rows = slice(start, start + n * q_len)
            k = keys.index_select(2, index).view(bsz, heads, n, -1, dim)  # gathered again: (B, H, n, L, D)
            v = values.index_select(2, index).view(bsz, heads, n, -1, dim)
            q_group = q[:, :, rows].view(bsz, heads, n, q_len, dim)
            d_out = grad_out[:, :, rows].reshape(bsz, heads, n, q_len, dim)
            g = gates[:, :, rows].reshape(bsz, heads, n, q_len, -1) * group.present  # (B, H, n, Q, S)
            d_g, d_scores, d_v = [], [], []
            for s, (k_s, v_s) in enumerate(zip(k.split(group.widths, dim=3), v.split(group.widths, dim=3))):
                weights = next(saved)  # (B, H, n, Q, L_s)
                kept = next(saved) if dropout > 0 else None
                mixed = weights * kept / (1 - dropout) if kept is not None else weights
                d_g.append(((mixed @ v_s) * d_out).sum(-1, keepdim=True))  # (B, H, n, Q, 1)
                d_read = d_out * g[..., s : s + 1]  # the gradient reaching P_s V_s
                d_v.append(mixed.transpose(-1, -2) @ d_read)  # (B, H, n, L_s, D)
                d_weights = d_read @ v_s.transpose(-1, -2)  # (B, H, n, Q, L_s)
                if kept is not None:
                    d_weights = d_weights * kept / (1 - dropout)
                d_scores.append(weights * (d_weights - (d_weights * weights).sum(-1, keepdim=True)))
            d_scores = torch.cat(d_scores, dim=-1)  # (B, H, n, Q, L)
            grad_q[:, :, rows] = (d_scores @ k).view(bsz, heads, n * q_len, dim)
            grad_keys.index_add_(2, index, (d_scores.transpose(-1, -2) @ q_group).flatten(2, 3))
            grad_values.index_add_(2, index, torch.cat(d_v, dim=3).flatten(2, 3))
            grad_gates[:, :, rows] = (torch.cat(d_g, dim=-1) * group.present).view(bsz, heads, n * q_len, -1)
            start += n * q_len
        return grad_q, grad_keys, grad_values, grad_gates, None, None  # autograd casts each to its input's dtype


def attend_chunks_gated(layout, heads, queries, gates, dropout, *keys_values):
    """Gated blockwise retina attention: queries (B, C*Q, C), gates (B, C*Q, H, S) in (0, 1) -> (B, C*Q, C).

    `keys_values` are the per-scale keys (B, T / K_s, C) followed by the per-scale values."""
    scales = len(keys_values) // 2
    bsz, _, dim = queries.shape
    keys = split_heads(torch.cat(keys_values[:scales], dim=1), heads)  # (B, H, sum_s T / K_s, D)
    values = split_heads(torch.cat(keys_values[scales:], dim=1), heads)
    q = split_heads(queries * (dim // heads) ** -0.5, heads)  # (B, H, C*Q, D), scaled once
    out = GatedChunkAttention.apply(q, keys, values, gates.transpose(1, 2), layout, dropout)  # (B, H, C*Q, D)
    return out.transpose(1, 2).reshape(bsz, -1, dim)
