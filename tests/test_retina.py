"""Retina attention: the blockwise kernel equals a dense reference written from design.md §3, and the module's
real reads (measured by gradients) are the positions, resolutions and horizons the options ask for."""
import argparse

import pytest
import torch

from fairseq_msformer.modules import ScaleGrid
from fairseq_msformer.modules.retina_attention import RetinaAttention


def make_attention(factors, window, blocks, pool_type="mean", gate=False, bucketed=False):
    torch.manual_seed(0)
    args = argparse.Namespace(decoder_embed_dim=16, decoder_attention_heads=2, attention_dropout=0.0,
                              pool_type=pool_type, max_target_positions=256, decoder_learned_pos=True,
                              retina_gate=gate, retina_bucketed_window=bucketed)
    return RetinaAttention(args, ScaleGrid(factors), window, blocks).eval()


def reading_plan(t, block_lengths, window, blocks, bucketed=False):
    """What query t reads, written from design.md §3 (independently of retina_bounds): [(scale, first, end)].

    Tokens: the last `window` at full resolution, the window's start moved back to a K_1 boundary so that all
    older positions fall in whole blocks (bucketed: everything from the start of the `window`-token bucket before
    t's own, as local-attention's look-back). Scale s: n_s whole blocks older than what finer scales read, then
    further back to a K_{s+1} boundary (so scale s + 1 starts on one of its own blocks); n = -1 on the last scale:
    all older.
    """
    if bucketed:
        own_bucket = t - t % window
        start = max(0, own_bucket - window)
    else:
        start = max(0, (t - window + 1) // block_lengths[1] * block_lengths[1])
    spans = [(0, start, t + 1)]
    for s in range(1, len(block_lengths)):
        n = blocks[s - 1]
        first = 0 if n < 0 else start - n * block_lengths[s]
        if n >= 0 and s + 1 < len(block_lengths):
            first -= first % block_lengths[s + 1]
        first = max(first, 0)
        spans.append((s, first, start))
        start = first
    return spans


def plan_keys(spans, block_lengths):
    """The keys a plan reads: one per token of the window, one per block of a coarser scale: [(scale, tokens)]."""
    return [(s, range(p, p + block_lengths[s])) for s, first, end in spans for p in range(first, end, block_lengths[s])]


def reference(attn, x):
    """Dense per-query attention over the plan's keys: a block's key/value is the mean of its tokens' projected
    keys/values (mean pooling), plus its scale's position vector on the key. One softmax over all keys; with gated
    scales (--retina-gate) a softmax per scale, the scales' outputs weighted by sigmoid(gate(x)) per head."""
    lengths, heads = attn.grid.block_lengths, attn.attn.num_heads
    k_tok, v_tok, queries = attn.attn.k_proj(x), attn.attn.v_proj(x), attn.attn.q_proj(x)  # (B, T, C)
    split = lambda y: y.view(y.size(0), y.size(1), heads, -1).transpose(1, 2)  # noqa: E731  (B, H, N, D)
    gates = None if attn.gate is None else torch.sigmoid(attn.gate(x)).view(x.size(0), x.size(1), heads, -1)
    outputs = []
    for t in range(x.size(1)):
        keys, values, scale_of = [], [], []
        for s, tokens in plan_keys(reading_plan(t, lengths, attn.window, attn.blocks, attn.bucketed), lengths):
            k, v = k_tok[:, tokens].mean(1), v_tok[:, tokens].mean(1)  # (B, C)
            if s > 0:
                k = k + attn.key_positions[s - 1].weight[tokens[0] // lengths[s]]
            keys.append(k)
            values.append(v)
            scale_of.append(s)
        k, v, q = split(torch.stack(keys, 1)), split(torch.stack(values, 1)), split(queries[:, t : t + 1])
        scores = q @ k.transpose(-1, -2) / q.size(-1) ** 0.5  # (B, H, 1, L_t)
        if gates is None:
            out = torch.softmax(scores, -1) @ v  # (B, H, 1, D)
        else:
            out = 0
            for s in sorted(set(scale_of)):
                cols = [i for i, scale in enumerate(scale_of) if scale == s]
                read = torch.softmax(scores[..., cols], -1) @ v[:, :, cols]  # (B, H, 1, D)
                out = out + read * gates[:, t, :, s].view(x.size(0), heads, 1, 1)
        outputs.append(out.transpose(1, 2).reshape(x.size(0), 1, -1))
    return attn.attn.out_proj(torch.cat(outputs, dim=1))


CONFIGS = [  # (factors, window, blocks, length); lengths marked * are not a multiple of the query chunk
    ([4], 8, [-1], 64), ([4, 4], 16, [3, -1], 96), ([2, 2], 5, [2, 4], 48), ([3, 2], 7, [4, -1], 60),
    ([2, 2, 2], 3, [3, 2, -1], 64), ([4, 4], 40, [5, -1], 80),
    ([4, 4], 40, [5, -1], 64), ([4], 24, [-1], 52), ([3, 2], 20, [2, -1], 48), ([2, 2], 12, [3, 2], 44),  # *
]


# --retina-bucketed-window: windows that are multiples of K_1 (query chunks of W: the buckets), the last one with
# a padded chunk (64 = 40 + 24)
BUCKETED = [([4], 8, [-1], 64), ([4, 4], 16, [3, -1], 96), ([2, 2], 6, [2, 4], 48), ([3, 2], 6, [4, -1], 60),
            ([4, 4], 40, [5, -1], 64)]
REFERENCE_CASES = [(*c, False) for c in CONFIGS] + [(*c, True) for c in BUCKETED]


@pytest.mark.parametrize("factors,window,blocks,length,bucketed", REFERENCE_CASES)
def test_blockwise_retina_equals_reference(factors, window, blocks, length, bucketed):
    attn = make_attention(factors, window, blocks, bucketed=bucketed)
    x = torch.randn(2, length, 16)
    torch.testing.assert_close(attn.self_attention(x), reference(attn, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("factors,window,blocks,length,bucketed", REFERENCE_CASES[:3] + REFERENCE_CASES[6:8]
                         + REFERENCE_CASES[-2:])
def test_gated_retina_and_its_gradients_equal_reference(factors, window, blocks, length, bucketed):
    """--retina-gate: blockwise, with its hand-written backward (gated_chunks.py), equals the dense reference in
    output and in the gradients of the input and of every parameter."""
    attn = make_attention(factors, window, blocks, gate=True, bucketed=bucketed).train()
    x = torch.randn(2, length, 16, requires_grad=True)
    params = [p for p in attn.parameters() if p.requires_grad]
    got, want = attn.self_attention(x), reference(attn, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(got)  # a loss that weighs every output differently
    # allow_unused: the reference leaves out a position table of blocks no query reads (the module's gradient: 0)
    for p, a, b in zip([x, *params], torch.autograd.grad((got * weights).sum(), [x, *params], allow_unused=True),
                       torch.autograd.grad((want * weights).sum(), [x, *params], allow_unused=True)):
        torch.testing.assert_close(a, b if b is not None else torch.zeros_like(p), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("keep_weights", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gated_chunk_attention_passes_gradcheck(dropout, keep_weights):
    """The hand-written backward against finite differences (float64), with attention dropout too (same seed), the
    softmax weights computed again in backward or kept (--no-retina-recompute)."""
    from fairseq_msformer.modules.gated_chunks import GatedChunkAttention
    from fairseq_msformer.modules.retina_attention import RetinaLayout

    layout = RetinaLayout(32, [1, 2, 4], 4, [2, -1], 4, "cpu")  # 8 chunks of 4 queries, 3 scales
    torch.manual_seed(0)
    queries = torch.randn(1, 32, 4, dtype=torch.double, requires_grad=True)  # 2 heads of 2 dimensions
    gates = torch.rand(1, 32, 2, 3, dtype=torch.double, requires_grad=True)
    keys_values = [torch.randn(1, n, 4, dtype=torch.double, requires_grad=True) for n in (32, 16, 8) * 2]

    def attention(queries, gates, *keys_values):
        torch.manual_seed(1)  # the same dropout mask at every call
        return GatedChunkAttention.apply(queries, gates, layout, 2, dropout, keep_weights, *keys_values)

    assert torch.autograd.gradcheck(attention, (queries, gates, *keys_values))


def test_some_configs_need_chunk_padding():
    padded = [length % make_attention(f, w, b).chunk != 0 for f, w, b, length in CONFIGS]
    assert sum(padded) >= 3, "the reference comparison must cover query chunks that run past the sequence"


def measured_reads(attn, length):
    """Per query t, the keys the module actually reads, from gradients: positions with a non-zero gradient of
    output t, grouped into runs of identical gradients (a mean-pooled block passes one gradient to all its tokens)."""
    x = torch.randn(1, length, attn.attn.q_proj.in_features).repeat(length, 1, 1).requires_grad_()  # row t: query t
    out = attn.self_attention(x)  # (T, T, C)
    t = torch.arange(length)
    (grad,) = torch.autograd.grad(out[t, t].pow(2).sum(), x)  # (T, T, C): row t = d out_t / d x
    reads = []
    for q in range(length):
        keys, u = [], 0
        while u < length:
            if grad[q, u].abs().sum() == 0:
                u += 1
                continue
            run = u + 1
            while run < length and torch.equal(grad[q, run], grad[q, u]):
                run += 1
            keys.append(range(u, run))
            u = run
        reads.append(keys)
    return reads


@pytest.mark.parametrize("factors,windows,length,blocks_per_scale", [  # blocks: ceil((h_s - h_{s-1}) / K_s), by hand
    ([2, 2], "6,14,30", 48, [4, 4]), ([4, 4], "10,30,-1", 96, [5, -1]), ([3, 2], "5,17,-1", 60, [4, -1]),
    ([2, 2, 2], "3,9,25,41", 64, [3, 4, 2]),
])
def test_each_scale_reads_its_configured_horizon_at_its_resolution(factors, windows, length, blocks_per_scale):
    """--retina-windows W,h_1,..: the last W tokens one by one, then scale s's blocks back to h_s tokens (at
    least), each position once; the module's real reads (from gradients) equal the reading plan exactly."""
    from fairseq_msformer.models.config import retina_plan

    args = argparse.Namespace(retina_windows=windows, token_layers=1)
    ((window, blocks),) = retina_plan(args, factors, length)
    assert window == int(windows.split(",")[0]) and blocks == blocks_per_scale, "horizons converted wrongly"
    attn = make_attention(factors, window, blocks)
    lengths = attn.grid.block_lengths
    horizons = [int(h) for h in windows.split(",")]
    for t, keys in enumerate(measured_reads(attn, length)):
        planned = plan_keys(reading_plan(t, lengths, window, blocks), lengths)
        assert sorted(map(tuple, keys)) == sorted(tuple(k) for _, k in planned), f"query {t} reads otherwise"
        assert keys[-1][-1] == t and all(len(k) == 1 for k in keys[-min(window, t + 1):]), "window at full resolution"
        for s, tokens in planned:
            assert tokens[-1] <= t and len(tokens) == lengths[s], "only complete blocks"
        for s, h in enumerate(horizons):
            oldest = min(k[0] for scale, k in planned if scale <= s)
            assert oldest <= max(t - h + 1, 0) if h > 0 else oldest == 0, f"scale {s} falls short of its horizon {h}"


def test_retina_keys_per_query_do_not_grow_with_length():
    """The gathered keys per chunk stay ~W + Q + blocks for a bounded last scale, ~T / K for an unbounded one."""
    from fairseq_msformer.modules.retina_attention import RetinaLayout

    def keys_per_chunk(length, blocks):
        layout = RetinaLayout(length, [1, 4, 16], 64, blocks, 32, "cpu")
        return layout.groups[-1].mask.size(-1)  # the last group reads the most

    assert keys_per_chunk(4096, [8, 16]) == keys_per_chunk(1024, [8, 16])
    grown = keys_per_chunk(4096, [8, -1]) - keys_per_chunk(1024, [8, -1])
    assert grown == (4096 - 1024) // 16  # the unbounded last scale adds T / K_2 keys, nothing else


@pytest.mark.parametrize("gate", [False, True])
def test_recomputed_gather_gives_the_same_gradients(gate):
    """Training recomputes the gather in backward (less memory); outputs and gradients are unchanged."""
    attn = make_attention([4, 4], 16, [3, -1], gate=gate).train()
    x = torch.randn(2, 64, 16, requires_grad=True)
    grads = []
    for recompute in (True, False):
        attn.recompute = recompute
        out = attn.self_attention(x)
        grads.append((out.detach(), *torch.autograd.grad(out.pow(2).sum(), [x, attn.attn.k_proj.weight])))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_selected_block_survives_a_half_precision_score_overflow():
    """--retina-select ranks blocks in fp32: a selectable block whose fp16 score q . k (80,000 here) overflows to
    inf is still read, not dropped as if it were unselectable."""
    from fairseq_msformer.modules.retina_attention import attend_selected

    query = torch.full((1, 1, 8), 100.0).half()  # (B, N, C), 2 heads of 4 dims
    tokens = torch.full((1, 4, 8), 100.0).half()  # one block of 4 tokens
    block_keys = torch.full((1, 1, 8), 100.0).half()
    assert torch.isinf(query @ block_keys.transpose(1, 2)).all()
    out = attend_selected(query, torch.ones(1, 1, 2, 1).half(), tokens, torch.ones(1, 4, 8).half(), block_keys, 4,
                          torch.ones(1, 1, dtype=torch.bool), 1, 2, 0.0)
    torch.testing.assert_close(out.float(), torch.ones(1, 1, 8))
