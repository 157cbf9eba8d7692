#!/usr/bin/env python
"""Where attention goes, layer by layer: the share of each query's attention mass on each scale and on each distance.

For every layer of a checkpoint (msformer_lm of any family, or fairseq's transformer_lm for comparison), over sampled
sequences of the training length:
  scales    the share of attention on token keys and on the blocks of each coarse scale. A layer at scale s reads
            only its own scale; the bottom-up aggregation layer (--bottom-up-combine attention|both) splits its mass
            between tokens and every coarse scale; a retina layer between its full-resolution window (tokens) and
            the pooled blocks of each coarser scale.
  distance  the share of attention on keys at distance d = t_query - t_key + 1 tokens, between the two elements'
            ready positions (the last token each may depend on; 1 = the query's own token), in buckets 1, 2-4, 5-16,
            17-64, ... (powers of 4). This is the evidence for or against Rae & Razavi (2020): do lower layers
            attend only to short range?
Shares are averaged over heads and every query of every sampled sequence (early queries cannot reach far: that is
part of the average). The attention modules use F.scaled_dot_product_attention and return no weights, so the
probabilities are recomputed here from each layer's recorded input, with the same projections and mask; every
layer's output is rebuilt from them and checked against the output the model produced ("max output error").
transformer_lm's weights come from fairseq's own MultiheadAttention (need_head_weights).

Writes attention.md, attention.json and attention.png (heatmaps) to --out.

  python scripts/analysis/analyze_attention.py checkpoints/reproduce/main/bottom_up/checkpoint_best.pt data-bin/pydoc
"""
import argparse
import json
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from analysis_common import (
    add_common_args, block_lengths, finish_common_args, heatmap, load_and_sample, model_layers, progress,
    ready_positions,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, split="valid", sequences=16)
    return finish_common_args(p.parse_args(argv))


# ---------------------------------------------------------------- recomputing attention probabilities
class AttentionRecorder:
    """Forward hooks keeping, per layer, what its attention read and what it produced (one forward pass)."""

    def __init__(self, layers):
        self.inputs, self.outputs, self.handles = {}, {}, []
        for layer in layers:
            if layer.kind == "fairseq":  # fairseq's MultiheadAttention is called with keyword arguments only
                attention, output_of = layer.module.self_attn, layer.module.self_attn
            else:  # msformer: the TransformerBlock's arguments; its attention's output projection
                attention = layer.module
                output_of = layer.module.attn.attn.out_proj if layer.kind == "retina" else layer.module.attn.out_proj
            self.handles.append(attention.register_forward_pre_hook(self.keep_input(layer.name), with_kwargs=True))
            self.handles.append(output_of.register_forward_hook(self.keep_output(layer.name)))

    def keep_input(self, name):
        def hook(module, args, kwargs):
            self.inputs[name] = (args, kwargs)
        return hook

    def keep_output(self, name):
        def hook(module, args, output):
            self.outputs[name] = output[0] if isinstance(output, tuple) else output
        return hook

    def close(self):
        for handle in self.handles:
            handle.remove()


@dataclass
class AttentionMap:
    probs: torch.Tensor        # (B, H, Tq, Tk) attention probabilities, 0 where masked
    key_scale: torch.Tensor    # (Tk,) scale of each key (0: tokens)
    key_ready: torch.Tensor    # (Tk,) ready position of each key
    query_ready: torch.Tensor  # (Tq,)
    allowed: torch.Tensor      # (Tq, Tk) bool: the keys each query may read
    output_error: float        # max |output rebuilt from probs - output of the model|


def softmax_attention(attn, query, keys, values, allowed):
    """MultiScaleAttention's computation with explicit probabilities: query (B, Tq, C), keys/values (B, H, Tk, D),
    allowed (Tq, Tk) bool -> probs (B, H, Tq, Tk) and the attention output (B, Tq, C)."""
    q = attn.split_heads(attn.q_proj(query))  # (B, H, Tq, D)
    scores = q @ keys.transpose(-1, -2) / math.sqrt(q.size(-1))  # SDPA's default scale
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    out = (probs @ values).transpose(1, 2).flatten(2)  # (B, Tq, C)
    return probs, attn.out_proj(out)


def retina_mask(attn, length):
    """Dense (T, sum_s T / K_s) mask of what each query of a RetinaAttention reads, and the keys' scales and ready
    positions (the grid's, complete rule: block j of scale s is ready at (j + 1) K_s - 1), from the same
    retina_bounds."""
    from fairseq_msformer.modules.retina_attention import retina_bounds

    lengths = attn.grid.block_lengths
    t = torch.arange(length)
    bounds = retina_bounds(t, lengths, attn.window, attn.blocks, attn.bucketed)  # per scale (T,)
    allowed, scales, ready = [], [], []
    for s, k in enumerate(lengths):
        j = torch.arange(length // k)
        if s == 0:  # the window [b_0, t] at full resolution
            allowed.append((bounds[0][:, None] <= j) & (j <= t[:, None]))
        else:  # complete blocks of scale s inside [b_s, b_{s-1})
            allowed.append((bounds[s][:, None] <= j * k) & ((j + 1) * k <= bounds[s - 1][:, None]))
        scales.append(torch.full_like(j, s))
        ready.append(attn.grid.ready(s, len(j)))
    return torch.cat(allowed, dim=1), torch.cat(scales), torch.cat(ready)


@torch.no_grad()
def layer_attention(model, layer, recorder) -> AttentionMap:
    args, kwargs = recorder.inputs[layer.name]
    produced = recorder.outputs[layer.name]
    if layer.kind == "fairseq":
        attention = layer.module.self_attn
        # fairseq's fast path (torch's multi_head_attention_forward) only returns head-averaged weights; the flag
        # below sends the call down fairseq's own implementation, which honours need_head_weights
        fast_path_allowed, attention.skip_embed_dim_check = attention.skip_embed_dim_check, True
        try:
            out, weights = attention(**{**kwargs, "need_weights": True, "need_head_weights": True})
        finally:
            attention.skip_embed_dim_check = fast_path_allowed
        probs = weights.transpose(0, 1)  # (H, B, T, T) -> (B, H, T, T)
        n = probs.size(-1)
        zeros, positions = torch.zeros(n, dtype=torch.long), torch.arange(n)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        return AttentionMap(probs, zeros, positions, positions, causal, (out - produced).abs().max().item())

    block = layer.module
    h = block.attn_norm(args[0])  # (B, N, C): what the attention's queries (and own-scale keys) read
    n = h.size(1)
    if layer.kind == "retina":
        retina = block.attn
        allowed, key_scale, key_ready = retina_mask(retina, n)
        keys, values = retina.scale_keys_values(h)  # per scale (B, T / K_s, C)
        split = retina.attn.split_heads
        keys, values = split(torch.cat(keys, dim=1)), split(torch.cat(values, dim=1))  # (B, H, L, D)
        probs, out = softmax_attention(retina.attn, h, keys, values, allowed)
        query_ready = torch.arange(n)
    else:
        attn = block.attn
        query_ready = ready_positions(model, layer.scale, n)
        if layer.kind == "aggregation":  # tokens read [tokens; blocks of scale 1; blocks of scale 2; ...]
            extra, allowed = kwargs["extra_memory"], kwargs["mask"]
            memory = torch.cat([h, extra], dim=1)  # (B, T + sum_s T / K_s, C)
            lengths = block_lengths(model)
            counts = [n] + [n // k for k in lengths[1:]]
            key_scale = torch.cat([torch.full((c,), s) for s, c in enumerate(counts)])
            key_ready = torch.cat([ready_positions(model, s, c) for s, c in enumerate(counts)])
        else:  # causal self-attention within the layer's own scale
            memory = h
            allowed = torch.ones(n, n, dtype=torch.bool).tril()
            key_scale, key_ready = torch.full((n,), layer.scale), query_ready
        keys, values = attn.keys_values(memory)
        probs, out = softmax_attention(attn, h, keys, values, allowed)
    return AttentionMap(probs, key_scale, key_ready, query_ready, allowed, (out - produced).abs().max().item())


# ---------------------------------------------------------------- shares
def distance_edges(length: int):
    """Upper edges of the distance buckets 1, 2-4, 5-16, ... (powers of 4) up to `length`, and their labels."""
    edges = [1]
    while edges[-1] < length:
        edges.append(min(edges[-1] * 4, length))
    labels = ["1"] + [f"{lo + 1}-{hi}" for lo, hi in zip(edges, edges[1:])]
    return torch.tensor(edges), labels


def attention_shares(amap: AttentionMap, num_scales: int, edges: torch.Tensor):
    """Per query: the share of attention on each scale (B, H, Tq, S), on each distance bucket (B, H, Tq, NB), and
    the mean distance (B, H, Tq). Masked keys have probability 0, so they add nothing wherever they fall."""
    probs = amap.probs
    by_scale = probs @ F.one_hot(amap.key_scale, num_scales).to(probs)  # (B, H, Tq, S)
    distance = amap.query_ready[:, None] - amap.key_ready[None, :] + 1  # (Tq, Tk)
    bucket = torch.bucketize(distance.clamp(min=1), edges)  # (Tq, Tk): 0 for d = 1, 1 for 2-4, ...
    by_distance = probs.new_zeros(*probs.shape[:3], len(edges))
    by_distance.scatter_add_(-1, bucket.expand_as(probs), probs)  # (B, H, Tq, NB)
    mean_distance = (probs * distance.clamp(min=0).to(probs)).sum(-1)  # (B, H, Tq)
    return by_scale, by_distance, mean_distance


def uniformity(amap: AttentionMap):
    """-> (entropy / log(keys allowed) per query (B, H, Tq'), over queries that may read >= 2 keys: 1 = uniform;
    the mean distance each query (Tq,) would have if it spread its attention evenly over the keys it may read)."""
    allowed = amap.allowed.to(amap.probs)
    count = allowed.sum(-1)  # (Tq,)
    entropy = -(amap.probs * amap.probs.clamp(min=1e-30).log()).sum(-1)  # (B, H, Tq)
    several = count >= 2
    ratio = entropy[..., several] / count[several].log()
    distance = (amap.query_ready[:, None] - amap.key_ready[None, :] + 1).clamp(min=0).to(allowed)
    return ratio, (allowed * distance).sum(-1) / count


def uniform_reference(length: int, edges: torch.Tensor) -> dict:
    """The distance shares of causal attention spread evenly over all earlier tokens: a layer's row above this one
    leans towards short range, below it towards long range."""
    allowed = torch.ones(length, length, dtype=torch.bool).tril()
    probs = (allowed / allowed.sum(-1, keepdim=True)).view(1, 1, length, length)
    positions = torch.arange(length)
    amap = AttentionMap(probs, torch.zeros(length, dtype=torch.long), positions, positions, allowed, 0.0)
    _, by_distance, mean_distance = attention_shares(amap, 1, edges)
    return {"layer": "ref: uniform over earlier tokens", "distance_share": by_distance.mean((0, 1, 2)).tolist(),
            "mean_distance": mean_distance.mean().item(), "uniform_mean_distance": mean_distance.mean().item(),
            "entropy_ratio": 1.0}


def analyze(model, tokens, batch_size, edges):
    """-> per layer: mean shares over heads and queries, per-head shares, mean distance, and the two checks."""
    layers = model_layers(model)
    num_scales = len(block_lengths(model))
    recorder = AttentionRecorder(layers)
    sums = {}
    try:
        for start in range(0, len(tokens), batch_size):
            progress(f"  sequences {start + 1}-{min(start + batch_size, len(tokens))} of {len(tokens)}")
            with torch.no_grad():
                model(tokens[start : start + batch_size])
            for layer in layers:
                amap = layer_attention(model, layer, recorder)
                by_scale, by_distance, mean_distance = attention_shares(amap, num_scales, edges)
                entropy_ratio, uniform_distance = uniformity(amap)
                acc = sums.setdefault(layer.name, {"scale": 0, "distance": 0, "mean_distance": 0.0, "queries": 0,
                                                   "entropy_ratio": 0.0, "entropy_queries": 0,
                                                   "uniform_distance": 0.0, "total_error": 0.0, "output_error": 0.0})
                acc["entropy_ratio"] += entropy_ratio.sum().item()
                acc["entropy_queries"] += entropy_ratio.numel()
                acc["uniform_distance"] += uniform_distance.sum().item() * by_scale.size(0)
                acc["scale"] = acc["scale"] + by_scale.sum((0, 2))  # (H, S)
                acc["distance"] = acc["distance"] + by_distance.sum((0, 2))  # (H, NB)
                acc["mean_distance"] += mean_distance.sum().item()
                acc["queries"] += by_scale.size(0) * by_scale.size(2)  # per head
                total = amap.probs.sum(-1)  # (B, H, Tq): 1 for every query
                acc["total_error"] = max(acc["total_error"], (total - 1).abs().max().item())
                acc["output_error"] = max(acc["output_error"], amap.output_error)
    finally:
        recorder.close()
    results = []
    for layer in layers:
        acc = sums[layer.name]
        heads = acc["scale"].size(0)
        per_head_scale, per_head_distance = acc["scale"] / acc["queries"], acc["distance"] / acc["queries"]
        results.append({
            "layer": layer.name, "scale": layer.scale, "kind": layer.kind,
            "scale_share": per_head_scale.mean(0).tolist(), "distance_share": per_head_distance.mean(0).tolist(),
            "scale_share_per_head": per_head_scale.tolist(), "distance_share_per_head": per_head_distance.tolist(),
            "mean_distance": acc["mean_distance"] / (acc["queries"] * heads),
            "uniform_mean_distance": acc["uniform_distance"] / acc["queries"],
            "entropy_ratio": acc["entropy_ratio"] / acc["entropy_queries"],
            "max_total_error": acc["total_error"], "max_output_error": acc["output_error"],
        })
    return results


# ---------------------------------------------------------------- outputs
def scale_labels(model):
    return ["tokens"] + [f"/{k} blocks" for k in block_lengths(model)[1:]]


def write_outputs(opts, model, results, reference, distance_labels, seconds):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(opts.out, exist_ok=True)
    scales = scale_labels(model)
    rows = [r["layer"] for r in results]
    multi_scale = len(scales) > 1
    widths = ([len(scales) + 0.5] if multi_scale else []) + [len(distance_labels) + 1.5]
    fig, axes = plt.subplots(1, len(widths), figsize=(2.5 + 0.75 * sum(widths), 1.8 + 0.32 * len(rows)),
                             gridspec_kw={"width_ratios": widths}, squeeze=False, layout="constrained")
    axes = list(axes[0])
    if multi_scale:
        blank = [float("nan")] * len(scales)  # a row level with the distance panel's reference row
        heatmap(axes.pop(0), [r["scale_share"] for r in results] + [blank], rows + [""], scales,
                "share of attention per scale")
    distance = [r["distance_share"] + [r["mean_distance"] / r["uniform_mean_distance"], r["entropy_ratio"]]
                for r in results + [reference]]
    image = heatmap(axes[0], distance, rows + [reference["layer"]],
                    distance_labels + ["mean d\n/ even", "entropy\n/ even"],
                    "share per distance d (tokens); last two columns: relative to attention spread evenly")
    axes[0].axhline(len(rows) - 0.5, color="white", linewidth=2)
    if multi_scale:  # layer names on the right, clear of the scale panel
        axes[0].yaxis.tick_right()
    fig.suptitle(f"{opts.name}: where attention goes ({opts.sequences} x {opts.length} tokens of {opts.split})",
                 fontsize=10)
    fig.colorbar(image, ax=axes, fraction=0.03)
    figure = os.path.join(opts.out, "attention.png")
    fig.savefig(figure, dpi=110)
    plt.close(fig)

    with open(os.path.join(opts.out, "attention.json"), "w") as f:
        json.dump({"checkpoint": opts.checkpoint, "name": opts.name, "split": opts.split, "sequences": opts.sequences,
                   "length": opts.length, "seed": opts.seed, "scales": scales, "distance_buckets": distance_labels,
                   "layers": results, "uniform_reference": reference}, f, indent=1)

    lines = [f"# Where attention goes: {opts.name}", "",
             f"`{os.path.relpath(opts.checkpoint)}`; {opts.sequences} sequences of {opts.length} tokens of "
             f"{opts.split} (seed {opts.seed}); shares averaged over heads and queries; distance d = t_query - t_key + 1 "
             f"between ready positions, in tokens (1 = the query's own token). Layers in forward order; `/K` = a layer "
             f"running on K-token blocks. {seconds:.0f} s.", "", "![attention](attention.png)", ""]
    header = ["layer", *(scales if multi_scale else []), *distance_labels, "mean d", "uniform mean d",
              "entropy / uniform"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = [r["layer"], *([f"{x:.3f}" for x in r["scale_share"]] if multi_scale else []),
                 *[f"{x:.3f}" for x in r["distance_share"]], f"{r['mean_distance']:.1f}",
                 f"{r['uniform_mean_distance']:.1f}", f"{r['entropy_ratio']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    cells = [reference["layer"], *([""] * len(scales) if multi_scale else []),
             *[f"{x:.3f}" for x in reference["distance_share"]], f"{reference['mean_distance']:.1f}",
             f"{reference['uniform_mean_distance']:.1f}", "1.00"]
    lines.append("| " + " | ".join(cells) + " |")
    worst_total = max(r["max_total_error"] for r in results)
    worst_output = max(r["max_output_error"] for r in results)
    lines += ["", f"Checks: every query's probabilities sum to 1 within {worst_total:.1e}; the outputs rebuilt from "
                  f"them match the model's within {worst_output:.1e}.", ""]
    with open(os.path.join(opts.out, "attention.md"), "w") as f:
        f.write("\n".join(lines))
    return figure


def main(argv=None):
    opts = parse_args(argv)
    started = time.time()
    model, _, _, tokens, _ = load_and_sample(opts)  # tokens (N, T)
    edges, labels = distance_edges(opts.length)
    progress(f"attention of {len(model_layers(model))} layers over {len(tokens)} x {opts.length} tokens")
    results = analyze(model, tokens, opts.batch_size, edges)
    reference = uniform_reference(opts.length, edges)
    figure = write_outputs(opts, model, results, reference, labels, time.time() - started)
    progress(f"written: {os.path.join(opts.out, 'attention.md')}, {figure} ({time.time() - started:.0f} s)")
    return results


if __name__ == "__main__":
    main()
