"""Retina attention: the blockwise kernel equals a plain per-query reference, and reads each position once."""
import argparse

import pytest
import torch

from fairseq_msformer.modules import ScaleGrid
from fairseq_msformer.modules.retina_attention import RetinaAttention, retina_bounds


def make_attention(factors, window, blocks, pool_type="mean"):
    torch.manual_seed(0)
    args = argparse.Namespace(decoder_embed_dim=16, decoder_attention_heads=2, attention_dropout=0.0,
                              pool_type=pool_type, max_target_positions=256, decoder_learned_pos=True)
    return RetinaAttention(args, ScaleGrid(factors), window, blocks).eval()


def reference(attn, x):
    """Per query: gather its keys span by span, check they tile the past once, attend densely."""
    keys, values = attn.scale_keys_values(x)  # per scale (B, T / K_s, C)
    queries = attn.attn.q_proj(x)
    lengths = attn.grid.block_lengths
    t_all = torch.arange(x.size(1))
    bounds = retina_bounds(t_all, lengths, attn.window, attn.blocks)
    heads, outputs = attn.attn.num_heads, []
    for t in range(x.size(1)):
        spans = [(0, int(bounds[0][t]), t + 1)] + [
            (s, int(bounds[s][t]) // k, int(bounds[s - 1][t]) // k) for s, k in enumerate(lengths) if s > 0
        ]
        covered = [p for s, lo, hi in spans for p in range(lo * lengths[s], hi * lengths[s])]
        assert len(covered) == len(set(covered)), f"position read twice by query {t}"
        assert sorted(covered) == list(range(min(covered), t + 1)), f"gap in what query {t} reads"
        assert t + 1 - int(bounds[0][t]) >= min(attn.window, t + 1), "full-resolution window too short"
        if attn.blocks[-1] < 0:
            assert min(covered) == 0, "an unbounded last scale reads back to the first token"
        k = torch.cat([keys[s][:, lo:hi] for s, lo, hi in spans], dim=1)  # (B, L_t, C)
        v = torch.cat([values[s][:, lo:hi] for s, lo, hi in spans], dim=1)
        q = queries[:, t : t + 1]
        split = lambda y: y.view(y.size(0), y.size(1), heads, -1).transpose(1, 2)  # noqa: E731
        out = torch.softmax(split(q) @ split(k).transpose(-1, -2) / split(q).size(-1) ** 0.5, -1) @ split(v)
        outputs.append(out.transpose(1, 2).reshape(x.size(0), 1, -1))
    return attn.attn.out_proj(torch.cat(outputs, dim=1))


@pytest.mark.parametrize(
    "factors,window,blocks,length",
    [([4], 8, [-1], 64), ([4, 4], 16, [3, -1], 96), ([2, 2], 5, [2, 4], 48), ([3, 2], 7, [4, -1], 60),
     ([2, 2, 2], 3, [3, 2, -1], 64), ([4, 4], 40, [5, -1], 80)],
)
def test_blockwise_retina_equals_reference(factors, window, blocks, length):
    attn = make_attention(factors, window, blocks)
    x = torch.randn(2, length, 16)
    torch.testing.assert_close(attn.self_attention(x), reference(attn, x), rtol=1e-5, atol=1e-5)


def test_retina_keys_per_query_do_not_grow_with_length():
    """The gathered keys per chunk stay ~W + Q + blocks for a bounded last scale, ~T / K for an unbounded one."""
    from fairseq_msformer.modules.retina_attention import RetinaLayout

    def keys_per_chunk(length, blocks):
        layout = RetinaLayout(length, [1, 4, 16], 64, blocks, 32, "cpu")
        return layout.groups[-1].mask.size(-1)  # the last group reads the most

    assert keys_per_chunk(4096, [8, 16]) == keys_per_chunk(1024, [8, 16])
    grown = keys_per_chunk(4096, [8, -1]) - keys_per_chunk(1024, [8, -1])
    assert grown <= (4096 - 1024) // 16 + 1  # the unbounded last scale adds T / K_2 keys, nothing else


def test_recomputed_gather_gives_the_same_gradients():
    """Training recomputes the gather in backward (less memory); outputs and gradients are unchanged."""
    attn = make_attention([4, 4], 16, [3, -1]).train()
    x = torch.randn(2, 64, 16, requires_grad=True)
    grads = []
    for recompute in (True, False):
        attn.recompute = recompute
        out = attn.self_attention(x)
        grads.append((out.detach(), *torch.autograd.grad(out.pow(2).sum(), [x, attn.attn.k_proj.weight])))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
