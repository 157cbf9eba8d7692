"""Retina's gated scales (--retina-gate), blockwise, with a hand-written backward.

Each query reads every scale s through its own softmax and mixes the scales' outputs with sigmoid gates:

    out = sum_s g_s * P_s @ V_s,    P_s = softmax(Q K_s^T / sqrt(D)) over the keys of s it may read

Query chunks gather the keys they read (``ChunkGroup.flat_index``), so a chunk's gathered keys and values are
copies, about (W + Q + blocks) / Q times the size of the originals (~4x at W = Q = 64). Plain autograd would
keep those copies for backward; checkpointing the whole attention instead costs a second forward pass, and its
autograd bookkeeping, in backward. This Function keeps only the un-gathered queries, keys, values and gates and
gathers again in backward (an index_select, cheap). The softmax weights P_s (H * L numbers per query) are computed
again there too (one matmul and the softmaxes; the default: the memory of checkpointing, most of its speed back),
or kept from forward (``keep_weights``, --no-retina-recompute: ~1.1x the model's activation memory, ~5% faster).

Backward, per scale s (A_s = dOut V_s^T serves both the gate and the weights, so O_s = P_s V_s is never needed):
    dg_s = rowsum(P_s * A_s)               dV_s = P_s^T (g_s dOut)            dP_s = g_s A_s
    dS_s = P_s * (dP_s - rowsum(dP_s * P_s))                                  dQ += dS_s K_s,  dK_s = dS_s^T Q
Attention dropout multiplies P_s by a kept mask / (1 - p) after the softmax; the mask is kept (one byte per weight).
Work is laid out head-major, (B, H, chunks, ...): gathered keys and chunked queries are then views of contiguous
memory that the batched matmuls read directly, and one mask (n, Q, L) broadcasts over B and H.
"""
import torch

from .attention import MultiScaleAttention

merge_heads = MultiScaleAttention.merge_heads  # (B, H, N, D) -> (B, N, H*D), split_heads undone


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, H, N, D), contiguous (one copy)."""
    bsz, n, _ = x.shape
    return x.view(bsz, n, heads, -1).transpose(1, 2).contiguous()


def scale_weights(q_group, k, group, dtype) -> list:
    """Each scale's softmax weights, [(B, H, n, Q, L_s)], of chunk queries (B, H, n, Q, D) over their gathered keys
    (B, H, n, L, D); the softmax computed in fp32 (fp64 for fp64 inputs), the weights returned in `dtype`."""
    exact = torch.promote_types(dtype, torch.float32)
    scores = (q_group @ k.transpose(-1, -2)).masked_fill_(group.opened_hidden, float("-inf"))  # (B, H, n, Q, L)
    return [torch.softmax(part, dim=-1, dtype=exact).to(dtype) for part in scores.split(group.widths, dim=-1)]


def chunk_groups(layout, q, keys, values, gates):
    """Per chunk group of `layout`, what forward and backward both read: (group, rows, index, q_group, k, v, g) with
    rows the group's query rows, index (n*L,) its gather index, q_group (B, H, n, Q, D), its gathered keys and values
    k, v (B, H, n, L, D) and g (B, H, n, Q, S) the gates, zero for a scale a query reads nothing of."""
    bsz, heads, _, dim = q.shape
    start = 0
    for group in layout.groups:
        n, index = group.chunks, group.flat_index.flatten()
        rows = slice(start, start + n * layout.chunk)
        k = keys.index_select(2, index).view(bsz, heads, n, -1, dim)
        v = values.index_select(2, index).view(bsz, heads, n, -1, dim)
        q_group = q[:, :, rows].view(bsz, heads, n, layout.chunk, dim)
        g = gates[:, :, rows].reshape(bsz, heads, n, layout.chunk, -1) * group.present
        yield group, rows, index, q_group, k, v, g
        start = rows.stop


class GatedChunkAttention(torch.autograd.Function):
    """queries (B, C*Q, C), gates (B, C*Q, H, S), per-scale keys then values (B, T / K_s, C) -> (B, H, C*Q, D).
    `layout` is a RetinaLayout (its groups' gather indices and masks). keep_weights: keep the softmax weights for
    backward (fast) or compute them again there (less memory). Saved for backward: the inputs as given (callers
    that also save them, --retina-select's branch, then share them) and, with keep_weights, the weights."""

    @staticmethod
    def forward(ctx, queries, gates, layout, heads: int, dropout: float, keep_weights: bool, *keys_values):
        # one dtype throughout (the queries': the model's, or autocast's for the projections), and autocast off in
        # here: backward, which autocast does not reach, must find the dtypes forward computed in
        with torch.autocast(queries.device.type, enabled=False):
            q, keys, values, g = GatedChunkAttention.head_major(queries, gates, heads, keys_values)
            out, saved = GatedChunkAttention.attend(q, keys, values, g, layout, dropout, keep_weights)
        ctx.layout, ctx.heads, ctx.dropout, ctx.keep_weights = layout, heads, dropout, keep_weights
        ctx.save_for_backward(queries, gates, *keys_values, *saved)
        ctx.scales = len(keys_values) // 2
        return out

    @staticmethod
    def head_major(queries, gates, heads, keys_values):
        """-> q (B, H, C*Q, D) scaled by 1/sqrt(D), keys and values (B, H, N, D) every scale end to end, gates
        (B, H, C*Q, S); one dtype (the queries')."""
        scales, dtype = len(keys_values) // 2, queries.dtype
        keys = split_heads(torch.cat(keys_values[:scales], dim=1).to(dtype), heads)  # (B, H, sum_s T / K_s, D)
        values = split_heads(torch.cat(keys_values[scales:], dim=1).to(dtype), heads)
        q = split_heads(queries * (queries.size(-1) // heads) ** -0.5, heads)
        return q, keys, values, gates.to(dtype).transpose(1, 2)

    @staticmethod
    def attend(q, keys, values, gates, layout, dropout, keep_weights):
        """Head-major forward -> (out (B, H, C*Q, D), what backward needs besides the inputs)."""
        outputs, saved = [], []
        for group, _, _, q_group, k, v, g in chunk_groups(layout, q, keys, values, gates):
            out = q_group.new_zeros(q_group.shape)  # (B, H, n, Q, D)
            for s, (weights, v_s) in enumerate(zip(scale_weights(q_group, k, group, q.dtype),
                                                   v.split(group.widths, dim=3))):
                # attention dropout: the kept mask is saved (one byte per weight) whether or not the weights are;
                # drawn in fp32 (bf16 random numbers are coarse enough to keep 0.898 at p = 0.1)
                kept = torch.rand(weights.shape, device=weights.device) >= dropout if dropout > 0 else None
                mixed = weights * kept / (1 - dropout) if kept is not None else weights
                out += (mixed @ v_s) * g[..., s : s + 1]  # (B, H, n, Q, D)
                saved += ([weights] if keep_weights else []) + ([kept] if kept is not None else [])
            outputs.append(out.flatten(2, 3))  # (B, H, n*Q, D)
        return torch.cat(outputs, dim=2), saved

    @staticmethod
    def backward(ctx, grad_out):
        queries, gates, *rest = ctx.saved_tensors
        keys_values, saved = rest[: 2 * ctx.scales], rest[2 * ctx.scales :]
        with torch.autocast(queries.device.type, enabled=False):
            q, keys, values, g = GatedChunkAttention.head_major(queries, gates, ctx.heads, keys_values)
            grads = GatedChunkAttention.gradients(grad_out, q, keys, values, g, saved, ctx)
        grad_q, grad_keys, grad_values, grad_gates = (merge_heads(x) for x in grads)  # (B, N, C); gates (B, C*Q, H*S)
        sizes = [x.size(1) for x in keys_values[: ctx.scales]]
        # autograd casts each gradient to its input's dtype
        return (grad_q * (queries.size(-1) // ctx.heads) ** -0.5, grad_gates.view_as(gates), None, None, None, None,
                *grad_keys.split(sizes, dim=1), *grad_values.split(sizes, dim=1))

    @staticmethod
    def gradients(grad_out, q, keys, values, gates, saved, ctx):
        """Head-major backward -> gradients of q, keys, values, gates (each as its head-major input)."""
        dropout = ctx.dropout
        grad_q, grad_gates = torch.zeros_like(q), torch.zeros_like(gates)
        grad_keys, grad_values = torch.zeros_like(keys), torch.zeros_like(values)
        saved = iter(saved)
        for group, rows, index, q_group, k, v, g in chunk_groups(ctx.layout, q, keys, values, gates):  # gathered again
            d_out = grad_out[:, :, rows].reshape(q_group.shape)  # (B, H, n, Q, D)
            recomputed = None if ctx.keep_weights else iter(scale_weights(q_group, k, group, q.dtype))
            d_g, d_scores, d_v = [], [], []
            for s, v_s in enumerate(v.split(group.widths, dim=3)):
                weights = next(saved) if recomputed is None else next(recomputed)  # (B, H, n, Q, L_s)
                kept = next(saved) if dropout > 0 else None
                mixed = weights * kept / (1 - dropout) if kept is not None else weights
                d_mixed = d_out @ v_s.transpose(-1, -2)  # (B, H, n, Q, L_s): dOut V_s^T, before the gate
                # dg_s = rowsum(dOut * P_s V_s) = rowsum(P_s * dOut V_s^T): no second P_s V_s matmul
                d_g.append((mixed * d_mixed).sum(-1, keepdim=True))  # (B, H, n, Q, 1)
                d_v.append(mixed.transpose(-1, -2) @ (d_out * g[..., s : s + 1]))  # (B, H, n, L_s, D)
                d_weights = d_mixed * g[..., s : s + 1]  # (B, H, n, Q, L_s)
                if kept is not None:
                    d_weights = d_weights * kept / (1 - dropout)
                d_scores.append(weights * (d_weights - (d_weights * weights).sum(-1, keepdim=True)))
            d_scores = torch.cat(d_scores, dim=-1)  # (B, H, n, Q, L)
            grad_q[:, :, rows] = (d_scores @ k).flatten(2, 3)
            grad_keys.index_add_(2, index, (d_scores.transpose(-1, -2) @ q_group).flatten(2, 3))
            grad_values.index_add_(2, index, torch.cat(d_v, dim=3).flatten(2, 3))
            grad_gates[:, :, rows] = (torch.cat(d_g, dim=-1) * group.present).flatten(2, 3)
        return grad_q, grad_keys, grad_values, grad_gates


def attend_chunks_gated(layout, heads, queries, gates, dropout, keep_weights, *keys_values):
    """Gated blockwise retina attention: queries (B, C*Q, C), gates (B, C*Q, H, S) in (0, 1) -> (B, C*Q, C).

    `keys_values` are the per-scale keys (B, T / K_s, C) followed by the per-scale values; keep_weights: see
    GatedChunkAttention."""
    out = GatedChunkAttention.apply(queries, gates, layout, heads, dropout, keep_weights, *keys_values)
    return merge_heads(out)  # (B, H, C*Q, D) -> (B, C*Q, C)
