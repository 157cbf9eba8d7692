#!/usr/bin/env python
"""Benchmark incremental generation: msformer families against fairseq's transformer_lm (issue 4, item 3).

Four LMs of the same width, vocabulary and depth L, built in-process the way fairseq builds them (a Namespace of
options, the --arch preset, dataclass defaults, then Model.build_model(args, task)):
  transformer_lm  fairseq's TransformerLanguageModel, --decoder-layers L
  bottom_up       msformer_lm_bottom_up: scale layers "a,b", aggregation 1, token layers n   (a + b + 1 + n = L)
  top_down        msformer_lm_top_down:  scale layers "a,b", token layers n   (a + b + n = L)
  retina          msformer_lm_retina:    token layers L, retina windows "W,...,-1"

For each prefix length P, every model's incremental_state is filled one position at a time (the decoder given
tokens[:, :t+1], features only), then:
  cache bytes  sum of numel * element_size over the incremental_state's tensors, right after the prefix;
  ms / token   median of --steps single-token steps (after --warmup) on a deepcopy of the state, each passing the
               whole prefix as fairseq's SequenceGenerator does: decoder, then get_normalized_probs(log_probs=True)
               of the newest position. The copy is thrown away: the next length fills the original from P.
The models take their timed steps round-robin, so load from other processes falls on all of them alike.
--threads defaults to 1: batch-1 generation is a stream of small ops, which 2 threads on a small shared machine
(waiting on each other behind other processes' load) make erratic.

Targets (PASS/MISS, no figures hard-coded):
  * every family's ms/token <= transformer_lm's (x (1 + --tolerance)) at every P;
  * retina's cache grows like W + T/K: under the bound layers * 2 * C * bytes * (W + K_1 + sum over bounded coarse
    scales of (horizon_s / K_s + K_{s+1} / K_s + 1) + P / K_{S-1} + 1 + pooling buffers) at every P, and at most
    1/K_{S-1} (+10%) cached positions per layer per token added between the two longest P.

  python scripts/bench_generation.py [--lengths 128 512 1024 2048] [--models transformer_lm retina]
"""
import argparse
import copy
import os
import statistics
import sys
import time
from dataclasses import MISSING, fields
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import fairseq_msformer  # noqa: E402,F401  (registers msformer_lm, its presets and the task)
from fairseq.data import Dictionary  # noqa: E402
from fairseq.models import ARCH_CONFIG_REGISTRY  # noqa: E402
from fairseq.models.transformer_lm import TransformerLanguageModel, base_lm_architecture  # noqa: E402
from fairseq.models.transformer_lm import TransformerLanguageModelConfig  # noqa: E402
from fairseq_msformer.models.config import MsformerLMConfig, int_list  # noqa: E402
from fairseq_msformer.models.msformer_lm import MsformerLanguageModel  # noqa: E402
from fairseq_msformer.modules import TransformerBlock  # noqa: E402

MIB = 2.0**20
FAMILIES = ("bottom_up", "top_down", "retina")
BASELINE = "transformer_lm"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024, 2048], help="prefix lengths P")
    p.add_argument("--steps", type=int, default=16, help="timed single-token steps per length (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones, per length")
    p.add_argument("--batch-size", type=int, default=1, help="batch size B")
    p.add_argument("--vocab", type=int, default=10000, help="vocabulary words (plus fairseq's 4 specials)")
    p.add_argument("--dim", type=int, default=512, help="model width C")
    p.add_argument("--heads", type=int, default=8, help="attention heads")
    p.add_argument("--ffn", type=int, default=2048, help="feed-forward inner dimension")
    p.add_argument("--layers", type=int, default=8, help="transformer_lm decoder layers (total depth)")
    p.add_argument("--pool-factors", default="4,4", help="msformer: pooling factors")
    p.add_argument("--bottom-up-scale-layers", default="3,2", help="bottom_up: layers per coarse scale")
    p.add_argument("--bottom-up-token-layers", type=int, default=2, help="bottom_up: token layers after aggregation")
    p.add_argument("--top-down-scale-layers", default="3,3", help="top_down: layers per coarse scale")
    p.add_argument("--top-down-token-layers", type=int, default=2, help="top_down: token-level layers")
    p.add_argument("--retina-windows", default="64,256,-1", help="retina: horizons per scale (W first)")
    p.add_argument("--models", nargs="+", default=[BASELINE, *FAMILIES], choices=[BASELINE, *FAMILIES])
    p.add_argument("--tolerance", type=float, default=0.0, help="time target: family <= (1 + tolerance) x baseline")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.dim % args.heads:
        p.error(f"--dim {args.dim} is not divisible by --heads {args.heads}")
    if sorted(args.lengths) != args.lengths:
        p.error("--lengths must increase (one cache is filled and reused across lengths)")
    if BASELINE not in args.models:
        p.error("--models must include transformer_lm (the reference)")
    return args


# ---------------------------------------------------------------- building the models the way fairseq does
def fill_dataclass_defaults(args, config_cls):
    """As fairseq's CLI for options not given: the dataclass default ('${task...}' interpolations: None)."""
    for f in fields(config_cls):
        if not hasattr(args, f.name) or getattr(args, f.name) is None:
            default = f.default if f.default is not MISSING else (
                f.default_factory() if f.default_factory is not MISSING else None)
            setattr(args, f.name, None if isinstance(default, str) and default.startswith("${") else default)


def build(name, opts, task, max_positions):
    """-> (model in eval mode, one-line description)."""
    options = dict(decoder_embed_dim=opts.dim, decoder_ffn_embed_dim=opts.ffn, decoder_attention_heads=opts.heads,
                   dropout=0.0, max_target_positions=max_positions, tokens_per_sample=max_positions)
    if name == BASELINE:
        args = argparse.Namespace(**options, decoder_layers=opts.layers, decoder_input_dim=opts.dim,
                                  decoder_output_dim=opts.dim)
        base_lm_architecture(args)  # the transformer_lm preset
        fill_dataclass_defaults(args, TransformerLanguageModelConfig)
        model = TransformerLanguageModel.build_model(args, task)
        layers = (f"decoder_layers={args.decoder_layers}, pre-norm={args.decoder_normalize_before}, "
                  f"learned_pos={args.decoder_learned_pos}")
        depth = len(model.decoder.layers)
    else:
        family = {"bottom_up": dict(token_layers_before_pooling=0, scale_layers=opts.bottom_up_scale_layers,
                                    token_layers=opts.bottom_up_token_layers),
                  "top_down": dict(scale_layers=opts.top_down_scale_layers, token_layers=opts.top_down_token_layers),
                  "retina": dict(token_layers=opts.layers, retina_windows=opts.retina_windows)}[name]
        args = argparse.Namespace(**options, **family, pool_factors=opts.pool_factors)
        ARCH_CONFIG_REGISTRY[f"msformer_lm_{name}"](args)
        fill_dataclass_defaults(args, MsformerLMConfig)
        model = MsformerLanguageModel.build_model(args, task)
        depth = sum(isinstance(m, TransformerBlock) for m in model.modules())  # bottom_up: + the aggregation
        layers = ", ".join(f"{k}={v}" for k, v in family.items()) + (
            f", pool_factors={args.pool_factors}, pool={args.pool_type}, rule={args.shift_rule}")
    params = sum(p.numel() for p in model.parameters())
    config = (f"{name}: {layers} -> {depth} layers, dim={args.decoder_embed_dim}, "
              f"heads={args.decoder_attention_heads}, ffn={args.decoder_ffn_embed_dim}, "
              f"tied_io={args.share_decoder_input_output_embed}, max_positions={args.max_target_positions}, "
              f"params={params / 1e6:.1f}M")
    if depth != opts.layers:
        config += f"   [depth {depth} != transformer_lm's {opts.layers}]"
    return model.eval(), config


# ---------------------------------------------------------------- measuring
def tensors_in(state):
    """Every tensor in an incremental_state (dicts, lists and tuples nested to any depth)."""
    if isinstance(state, torch.Tensor):
        return [state]
    values = state.values() if isinstance(state, dict) else state if isinstance(state, (list, tuple)) else []
    return [t for value in values for t in tensors_in(value)]


def cache_bytes(state):
    """(sum of numel * element_size, bytes of the distinct storages behind them: views keep theirs alive)."""
    tensors, storages = tensors_in(state), {}
    for t in tensors:
        s = t.untyped_storage()
        storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
    return sum(t.numel() * t.element_size() for t in tensors), sum(storages.values())


def fill(model, tokens, state, start, end):
    """Positions start .. end-1 into the cache, one at a time (an incremental decoder runs its last position)."""
    for t in range(start, end):
        model.decoder(tokens[:, : t + 1], incremental_state=state, features_only=True)


def generation_step(model, prefix, state):
    """One SequenceGenerator step: the decoder given the whole prefix (incremental), log-probs of the newest."""
    out = model.decoder(prefix, incremental_state=state)
    return model.get_normalized_probs((out[0][:, -1:, :], out[1]), log_probs=True)


def retina_breakdown(state, num_layers):
    """Retina: cached keys per scale (RetinaAttention.step's "layer{i}.k{s}"), averaged over layers."""
    counts = {}
    for cache in state.values():
        for name, value in cache.items():
            layer, _, kind = name.partition(".")
            if layer.startswith("layer") and kind[:1] == "k" and kind[1:].isdigit():
                counts[int(kind[1:])] = counts.get(int(kind[1:]), 0) + value.size(1)
    return {s: c / num_layers for s, c in sorted(counts.items())}


def bytes_per_position(opts):
    return 2 * opts.dim * 4 * opts.batch_size  # keys and values of width C, fp32


def retina_bound(opts, model, length):
    """Upper bound on retina's cache bytes if it grows like W + T / K_{S-1} (from the options, not measured)."""
    grid = model.decoder.grid
    k = grid.block_lengths
    horizons = int_list("--retina-windows", opts.retina_windows)  # one group (this script's configuration)
    elements = horizons[0] + k[1]  # tokens: W .. W + K_1 - 1
    for s in range(1, len(k)):
        if horizons[s] == -1:
            elements += length / k[s] + 1  # all older blocks: at most T / K_s
        else:  # blocks from b_s(t) on (those inside finer windows are kept for later queries), + alignment
            elements += horizons[s] / k[s] + k[min(s + 1, len(k) - 1)] / k[s] + 1
        elements += grid.pool_factors[s - 1]  # pooling buffer of raw keys/values waiting for a block
    return len(model.decoder.body.layers) * elements * bytes_per_position(opts) + 64  # + the (B, 1) counter


def fake_task(vocab_words: int, max_positions: int) -> SimpleNamespace:
    """What build_model reads from a fairseq task: the dictionaries and tokens_per_sample."""
    vocab = Dictionary()
    for i in range(vocab_words):
        vocab.add_symbol(f"w{i}")
    return SimpleNamespace(source_dictionary=vocab, target_dictionary=vocab,
                           args=SimpleNamespace(tokens_per_sample=max_positions))


def main(argv=None):
    opts = parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    max_positions = max(opts.lengths) + opts.warmup + opts.steps + 8
    task = fake_task(opts.vocab, max_positions)
    vocab = task.source_dictionary
    models, configs = {}, []
    for name in opts.models:
        torch.manual_seed(opts.seed)
        models[name], config = build(name, opts, task, max_positions)
        configs.append(f"  {config}")
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, batch={opts.batch_size}, "
          f"vocab={len(vocab)}, steps={opts.steps} (+{opts.warmup} warmup) per length, fp32 CPU, "
          f"load avg {os.getloadavg()[0]:.2f}\nmodels:\n" + "\n".join(configs))
    g = torch.Generator().manual_seed(opts.seed)
    tokens = torch.randint(vocab.nspecial, len(vocab), (opts.batch_size, max_positions), generator=g)

    states, times, sizes, storages, breakdown = {name: {} for name in models}, {}, {}, {}, {}
    done, wall = 0, time.perf_counter()
    with torch.no_grad():
        for length in opts.lengths:
            for name, model in models.items():
                fill(model, tokens, states[name], done, length)
                sizes[name, length], storages[name, length] = cache_bytes(states[name])
                if name == "retina":
                    breakdown[length] = retina_breakdown(states[name], len(model.decoder.body.layers))
            done = length
            copies = {name: copy.deepcopy(states[name]) for name in models}
            samples = {name: [] for name in models}
            for i in range(opts.warmup + opts.steps):
                prefix = tokens[:, : length + i + 1]
                for name, model in models.items():  # round-robin
                    start = time.perf_counter()
                    generation_step(model, prefix, copies[name])
                    if i >= opts.warmup:
                        samples[name].append(time.perf_counter() - start)
            for name in models:
                times[name, length] = 1e3 * statistics.median(samples[name])
            del copies
            print(f"  P={length}: filled and timed ({time.perf_counter() - wall:.0f}s so far)", flush=True)

    names, first, last = list(models), opts.lengths[0], opts.lengths[-1]
    header = "P".rjust(6) + " | " + " | ".join(n.rjust(16) for n in names)
    for title, cell in ((f"ms per generated token (median of {opts.steps} steps; decoder + log-softmax, "
                         f"B={opts.batch_size})", lambda n, L: f"{times[n, L]:16.2f}"),
                        ("cache MiB after the prefix (sum of numel * element_size over the incremental_state)",
                         lambda n, L: f"{sizes[n, L] / MIB:16.3f}")):
        print(f"\n{title}\n{header}\n" + "-" * len(header))
        for length in opts.lengths:
            print(f"{length:6d} | " + " | ".join(cell(n, length) for n in names))
    if any(storages[k] != sizes[k] for k in sizes):
        print("  (storage behind those tensors, views counted at their storage size: "
              + ", ".join(f"{n} {storages[n, last] / MIB:.3f}" for n in names) + f" MiB at P={last})")
    print(f"cache({last}) / cache({first}): " + ", ".join(f"{n} {sizes[n, last] / sizes[n, first]:.2f}x" for n in names)
          + f"   (P ratio {last / first:.0f}x)")

    per_position = {}
    if len(opts.lengths) >= 2:
        a, b = opts.lengths[-2], last
        for n in names:  # per transformer_lm layer (retina has as many)
            per_position[n] = (sizes[n, b] - sizes[n, a]) / (b - a) / bytes_per_position(opts) / opts.layers
        print(f"cache growth {a} -> {b}, cached positions added per layer per token (keys+values of width C): "
              + ", ".join(f"{n} {per_position[n]:.3f}" for n in names))

    if breakdown:
        k = models["retina"].decoder.grid.block_lengths
        print("\nretina: cached elements per layer and scale (keys) after the prefix")
        print("P".rjust(6) + " | " + " | ".join(f"scale {s} (K={k[s]})".rjust(14) for s in range(len(k)))
              + " | " + "bound MiB".rjust(10))
        for length in opts.lengths:
            print(f"{length:6d} | " + " | ".join(f"{breakdown[length].get(s, 0):14.1f}" for s in range(len(k)))
                  + f" | {retina_bound(opts, models['retina'], length) / MIB:10.3f}")

    print("\nratios: family ms/token / transformer_lm ms/token (same run, steps interleaved)")
    results = []
    for n in (n for n in names if n != BASELINE):
        ratios = [times[n, length] / times[BASELINE, length] for length in opts.lengths]
        results += [r <= 1.0 + opts.tolerance for r in ratios]
        print(f"  {n:10s} " + "   ".join(f"P={length}: {r:.2f} {'PASS' if ok else 'MISS'}" for length, r, ok
                                         in zip(opts.lengths, ratios, results[-len(ratios):])))
    if "retina" in models:
        k_last = models["retina"].decoder.grid.block_lengths[-1]
        within = all(sizes["retina", L] <= retina_bound(opts, models["retina"], L) for L in opts.lengths)
        results.append(within and per_position.get("retina", 0.0) <= 1.1 / k_last)
        print(f"\nretina cache ~ W + T/K: under the bound at every P: {'yes' if within else 'no'}; "
              f"{per_position.get('retina', float('nan')):.3f} positions/layer/token vs 1/K_{{S-1}} = "
              f"{1 / k_last:.3f} (transformer_lm {per_position.get(BASELINE, float('nan')):.3f}): "
              f"{'PASS' if results[-1] else 'MISS'}")
    print(f"\noverall: {sum(results)}/{len(results)} targets met; wall {time.perf_counter() - wall:.0f}s, "
          f"load avg {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
