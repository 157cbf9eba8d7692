#!/usr/bin/env python
"""Feed-forward layers as key-value memories (Geva et al. 2021), for every layer of every scale of a checkpoint.

A layer's FFN is FFN(x) = sum_i f(k_i . x) v_i: row i of fc1 is a key k_i, column i of fc2 its value v_i, and
f(k_i . x) (after the activation) is the key's memory coefficient at an element x. Over sampled sequences of a split
(the training data by default), for every key of every layer (msformer_lm of any family, or fairseq's
transformer_lm for comparison):
  triggers   the --top-k elements with the largest coefficient. An element is a prefix of the text: a token, or at a
             coarse scale a block, whose prefix ends at the block's ready position (the last token it may depend
             on); the report shows the prefix's last tokens, the block it falls in ([...]) and the next token.
  values     the tokens a value promotes: the top of v_i read through the output embedding (analysis_common.
             vocabulary_scores: v . E as in the paper; with an adaptive softmax, the cluster's logit plus the word's
             logit inside the cluster, no final LayerNorm).
  agreement  the paper's agreement rate: the share of keys whose value's top token is the token that follows the
             key's top trigger; and a looser one, the share of (key, trigger) pairs among the top-k whose next token
             is among the value's --value-tokens top tokens. Each next to a baseline that pairs every value with
             another key's triggers (a permutation), which is what frequent tokens alone would give.
  patterns   Geva et al. annotate each key's trigger prefixes as "shallow" (they share their last word or n-gram) or
             "semantic" (they share a topic or context, not the ending). Automatic version: a key is shallow when
             at least --shallow-share of its top-k triggers end in the same token, semantic (context) otherwise;
             also the mean share of its triggers that end in its most common last token.
Keys that never activate in the sample (dead ReLU units) are counted and left out of the rates.

Writes memories.md (the table and sampled keys with their triggers and values), memories.json and memories.png.

  python scripts/analysis/analyze_memories.py checkpoints/reproduce/main/bottom_up/checkpoint_best.pt data-bin/pydoc
"""
import argparse
import json
import os
import time

import torch

from analysis_common import (
    add_common_args, block_lengths, finish_common_args, load_and_sample, model_layers, progress, ready_positions,
    vocabulary_scores, words,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, split="train", sequences=256)
    p.add_argument("--top-k", type=int, default=25, help="triggers kept per key (default: %(default)s, as the paper)")
    p.add_argument("--value-tokens", type=int, default=10, help="top tokens kept per value vector (default: %(default)s)")
    p.add_argument("--keys-per-layer", type=int, default=3, help="sampled keys shown in the report, per layer (default: %(default)s)")
    p.add_argument("--shallow-share", type=float, default=0.5,
                   help="a key is 'shallow' when at least this share of its triggers end in the same token "
                        "(default: %(default)s)")
    p.add_argument("--permutations", type=int, default=20, help="random pairings averaged for the baselines (default: %(default)s)")
    p.add_argument("--context", type=int, default=10, help="tokens of each trigger prefix shown in the report (default: %(default)s)")
    return finish_common_args(p.parse_args(argv))


# ---------------------------------------------------------------- triggers: top-k coefficients per key
class KeyRecorder:
    """Forward hooks keeping every layer's memory coefficients f(fc1(x)) (B, N, F) for one forward pass."""

    def __init__(self, layers):
        self.coefficients, self.handles = {}, []
        for layer in layers:
            hook = self.keep(layer.name, layer.module, time_first=layer.kind == "fairseq")
            self.handles.append(layer.module.fc1.register_forward_hook(hook))

    def keep(self, name, module, time_first):
        def hook(fc1, args, output):
            coefficients = module.activation_fn(output)
            # fairseq's transformer layers run time-first (T, B, F); msformer's batch-first (B, N, F)
            self.coefficients[name] = coefficients.transpose(0, 1) if time_first else coefficients
        return hook

    def close(self):
        for handle in self.handles:
            handle.remove()


class TopTriggers:
    """Running top-k of each key's coefficient over the elements seen so far (flat element indices)."""

    def __init__(self, k: int):
        self.k, self.values, self.index = k, None, None

    def update(self, coefficients: torch.Tensor, first: int):
        """coefficients (M, F) of elements first .. first + M - 1."""
        index = torch.arange(first, first + coefficients.size(0)).unsqueeze(1).expand_as(coefficients)
        if self.values is not None:
            coefficients = torch.cat([self.values, coefficients])
            index = torch.cat([self.index, index])
        self.values, rows = coefficients.topk(min(self.k, coefficients.size(0)), dim=0)  # (k, F)
        self.index = index.gather(0, rows)


def collect_triggers(model, layers, tokens, batch_size, k):
    """-> per layer name: (values (k, F), flat element index (k, F)); element e of a layer with N elements per
    sequence is element e % N of sequence e // N."""
    recorder, top = KeyRecorder(layers), {layer.name: TopTriggers(k) for layer in layers}
    try:
        for start in range(0, len(tokens), batch_size):
            progress(f"  sequences {start + 1}-{min(start + batch_size, len(tokens))} of {len(tokens)}")
            with torch.no_grad():
                model(tokens[start : start + batch_size])
            for layer in layers:
                coefficients = recorder.coefficients[layer.name]  # (b, N, F)
                top[layer.name].update(coefficients.flatten(0, 1), start * coefficients.size(1))
    finally:
        recorder.close()
    return {name: (t.values, t.index) for name, t in top.items()}


# ---------------------------------------------------------------- values, agreement, patterns
def value_tokens(model, layer, n: int):
    """-> (scores (F, n), token ids (F, n)): each value vector's top tokens through the output embedding."""
    with torch.no_grad():
        scores = vocabulary_scores(model, layer.module.fc2.weight.t())  # fc2.weight (C, F) -> (F, V)
    return scores.topk(n, dim=1)


def same_last_token(last: torch.Tensor) -> torch.Tensor:
    """last (k, keys) the last tokens of each key's triggers -> (keys,) the share that end in the most common one."""
    return (last.unsqueeze(0) == last.unsqueeze(1)).sum(0).max(0).values.float() / last.size(0)


def layer_statistics(values, ready_token, next_token, promoted, every_last_token, opts, generator):
    """values (k, F) top coefficients; ready_token / next_token (k, F) the last token of each trigger prefix and
    the token after it; promoted (F, n) each value's top tokens; every_last_token (M,) the last token of every
    element of the layer's scale in the sample (for the pattern baseline). Rates over live keys only."""
    live = values[0] > 0  # (F,) keys that activate at all in the sample
    top_next, last, nxt, prom = next_token[0, live], ready_token[:, live], next_token[:, live], promoted[live]
    keys = int(live.sum())

    def agreement(value_rows):  # value_rows: (keys,) which value is paired with each key's triggers
        top1 = (prom[value_rows, 0] == top_next).float().mean().item()  # the paper's rate
        in_top = (nxt.t().unsqueeze(2) == prom[value_rows].unsqueeze(1)).any(2)  # (keys, k)
        return top1, in_top.float().mean().item()

    top1, top_n = agreement(torch.arange(keys))
    shuffled = [agreement(torch.randperm(keys, generator=generator)) for _ in range(opts.permutations)]
    same_last = same_last_token(last)  # (keys,)
    shallow = (same_last >= opts.shallow_share).float()
    # baseline: the same measures for k elements drawn at random in place of each key's triggers
    drawn = every_last_token[torch.randint(len(every_last_token), last.shape, generator=generator)]
    same_last_random = same_last_token(drawn)
    return {"keys": live.numel(), "dead_keys": int((~live).sum()),
            "agreement_top1": top1, "agreement_top1_baseline": sum(s[0] for s in shuffled) / len(shuffled),
            "agreement_top_n": top_n, "agreement_top_n_baseline": sum(s[1] for s in shuffled) / len(shuffled),
            "shallow_share": shallow.mean().item(), "semantic_share": 1 - shallow.mean().item(),
            "mean_same_last_token": same_last.mean().item(),
            "shallow_share_baseline": (same_last_random >= opts.shallow_share).float().mean().item(),
            "mean_same_last_token_baseline": same_last_random.mean().item()}


def analyze(model, tokens, targets, indices, opts):
    layers = model_layers(model)
    progress(f"memory coefficients of {len(layers)} layers over {len(tokens)} x {tokens.size(1)} tokens")
    triggers = collect_triggers(model, layers, tokens, opts.batch_size, opts.top_k)
    lengths = block_lengths(model)
    generator = torch.Generator().manual_seed(opts.seed)
    results = []
    for layer in layers:
        values, flat = triggers[layer.name]  # (k, F)
        per_sequence = tokens.size(1) // lengths[layer.scale]
        sequence, element = flat // per_sequence, flat % per_sequence
        every_ready = ready_positions(model, layer.scale, per_sequence)  # (N,) where each element's prefix ends
        ready = every_ready[element]  # (k, F)
        ready_token, next_token = tokens[sequence, ready], targets[sequence, ready]
        scores, promoted = value_tokens(model, layer, opts.value_tokens)  # (F, n)
        stats = layer_statistics(values, ready_token, next_token, promoted, tokens[:, every_ready].flatten(), opts,
                                 generator)
        live = (values[0] > 0).nonzero().squeeze(1)
        shown = live[torch.randperm(len(live), generator=generator)[: opts.keys_per_layer]].sort().values
        samples = []
        for key in shown.tolist():
            samples.append({
                "key": key,
                "triggers": [{"sequence": int(sequence[r, key]), "dataset_index": indices[int(sequence[r, key])],
                              "element": int(element[r, key]), "ready": int(ready[r, key]),
                              "coefficient": float(values[r, key]), "last_token": int(ready_token[r, key]),
                              "next_token": int(next_token[r, key])} for r in range(values.size(0))],
                "value_tokens": promoted[key].tolist(), "value_scores": scores[key].tolist(),
            })
        results.append({"layer": layer.name, "scale": layer.scale, "block_length": lengths[layer.scale], **stats,
                        "sampled_keys": samples})
        progress(f"  {layer.name}: agreement {stats['agreement_top1']:.3f} (baseline "
                 f"{stats['agreement_top1_baseline']:.3f}), shallow {stats['shallow_share']:.2f}")
    return results


# ---------------------------------------------------------------- outputs
def md(text: str) -> str:
    """Markdown-safe token text (the corpus is Python documentation: backticks, pipes, stars...)."""
    for ch in "\\`*_[]<>|#":
        text = text.replace(ch, "\\" + ch)
    return text


def show_prefix(dictionary, tokens, trigger, block_length, context):
    """'... prefix [block] -> next' for one trigger (the block brackets only at coarse scales)."""
    row, ready = tokens[trigger["sequence"]], trigger["ready"]
    block_start = max(0, ready - block_length + 1)
    start = max(0, min(block_start, ready - context + 1))
    before = " ".join(words(dictionary, row[start:block_start]))
    block = " ".join(words(dictionary, row[block_start : ready + 1]))
    text = f"{md(before)} [{md(block)}]" if block_length > 1 else f"{md(before)} **{md(block)}**"
    return f"{'… ' if start > 0 else ''}{text.strip()} → {md(dictionary[trigger['next_token']])}"


def write_outputs(opts, dictionary, indices, tokens, results, seconds):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(opts.out, exist_ok=True)
    names = [r["layer"] for r in results]
    x = range(len(results))
    fig, (patterns, agreement, alive) = plt.subplots(1, 3, figsize=(max(13, 5 + 1.0 * len(results)), 4.4),
                                                     gridspec_kw={"width_ratios": [2, 2, 1]})
    shallow = [r["shallow_share"] for r in results]
    patterns.bar(x, shallow, color="tab:orange", label="shallow (triggers share their last token)")
    patterns.bar(x, [r["semantic_share"] for r in results], bottom=shallow, color="tab:blue",
                 label="semantic (context)")
    patterns.plot(x, [r["mean_same_last_token"] for r in results], "k.-", label="mean share ending in the same token")
    patterns.plot(x, [r["mean_same_last_token_baseline"] for r in results], "k.:",
                  label="  baseline (random elements)")
    patterns.set_ylim(0, 1.45)
    patterns.set_title(f"key patterns (top {opts.top_k} triggers per key)", fontsize=9)
    agreement.plot(x, [100 * r["agreement_top1"] for r in results], "o-", color="tab:green",
                   label="value's top token = next token of top trigger")
    agreement.plot(x, [100 * r["agreement_top1_baseline"] for r in results], "o:", color="tab:green",
                   label="  baseline (values paired with other keys)")
    agreement.plot(x, [100 * r["agreement_top_n"] for r in results], "s-", color="tab:purple",
                   label=f"trigger's next token in value's top {opts.value_tokens}")
    agreement.plot(x, [100 * r["agreement_top_n_baseline"] for r in results], "s:", color="tab:purple",
                   label="  baseline")
    agreement.set_ylabel("%")
    agreement.set_title("agreement between keys and values", fontsize=9)
    alive.bar(x, [1 - r["dead_keys"] / r["keys"] for r in results], color="tab:gray")
    alive.set_ylim(0, 1.05)
    alive.set_title("share of keys that fire at least once", fontsize=9)
    for ax in (patterns, agreement, alive):
        ax.set_xticks(list(x), names, rotation=60, ha="right", fontsize=8)
    for ax in (patterns, agreement):
        ax.legend(fontsize=7, loc="upper center", ncol=2)
    agreement.set_ylim(0, max(5, 1.5 * max(100 * r["agreement_top_n"] for r in results)))
    fig.suptitle(f"{opts.name}: FFN key-value memories ({opts.sequences} x {opts.length} tokens of {opts.split})",
                 fontsize=10)
    fig.tight_layout()
    figure = os.path.join(opts.out, "memories.png")
    fig.savefig(figure, dpi=110)
    plt.close(fig)

    with open(os.path.join(opts.out, "memories.json"), "w") as f:
        json.dump({"checkpoint": opts.checkpoint, "name": opts.name, "split": opts.split, "length": opts.length,
                   "sequences": opts.sequences, "seed": opts.seed, "top_k": opts.top_k,
                   "value_tokens": opts.value_tokens, "shallow_share_threshold": opts.shallow_share,
                   "dataset_indices": indices, "layers": results}, f, indent=1)

    lines = [f"# FFN key-value memories: {opts.name}", "",
             f"`{os.path.relpath(opts.checkpoint)}`; {opts.sequences} sequences of {opts.length} tokens of {opts.split} "
             f"(seed {opts.seed}); top {opts.top_k} triggers per key; values read through the output embedding "
             f"(`scripts/analysis/analyze_memories.py --help` says how). Layers in forward order; `/K` = a layer running on "
             f"K-token blocks, whose triggers are blocks (the prefix up to the block's ready position). "
             f"{seconds:.0f} s.", "", "![memories](memories.png)", "",
             f"| layer | live keys | agreement (top trigger) | baseline | next token in value's top {opts.value_tokens} "
             f"| baseline | shallow | semantic | mean share ending in the same token | baseline |", "|" + "---|" * 10]
    for r in results:
        lines.append(f"| {r['layer']} | {r['keys'] - r['dead_keys']}/{r['keys']} | {100 * r['agreement_top1']:.1f}% | "
                     f"{100 * r['agreement_top1_baseline']:.1f}% | {100 * r['agreement_top_n']:.1f}% | "
                     f"{100 * r['agreement_top_n_baseline']:.1f}% | {r['shallow_share']:.2f} | "
                     f"{r['semantic_share']:.2f} | {r['mean_same_last_token']:.2f} | "
                     f"{r['mean_same_last_token_baseline']:.2f} |")
    lines += ["", "## Sampled keys", "",
              "Each key's five strongest triggers (the prefix's last tokens, the block it falls in at coarse scales, "
              "→ the next token) and the tokens its value promotes.", ""]
    for r in results:
        for sample in r["sampled_keys"]:
            promoted = ", ".join(md(w) for w in words(dictionary, sample["value_tokens"]))
            lines += [f"**{r['layer']}, key {sample['key']}** — value promotes: {promoted}", ""]
            for trigger in sample["triggers"][:5]:
                lines.append(f"- {trigger['coefficient']:.2f}: "
                             + show_prefix(dictionary, tokens, trigger, r["block_length"], opts.context))
            lines.append("")
    with open(os.path.join(opts.out, "memories.md"), "w") as f:
        f.write("\n".join(lines))
    return figure


def main(argv=None):
    opts = parse_args(argv)
    started = time.time()
    model, task, indices, tokens, targets = load_and_sample(opts)  # tokens, targets (N, T)
    results = analyze(model, tokens, targets, indices, opts)
    figure = write_outputs(opts, task.source_dictionary, indices, tokens, results, time.time() - started)
    progress(f"written: {os.path.join(opts.out, 'memories.md')}, {figure} ({time.time() - started:.0f} s)")
    return results


if __name__ == "__main__":
    main()
