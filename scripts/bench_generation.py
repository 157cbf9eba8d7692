#!/usr/bin/env python
"""Benchmark incremental generation: msformer families against fairseq's transformer_lm (issue 4, item 3).

Four language models of the same width, vocabulary and total depth are built in-process the way fairseq builds
them (a Namespace of options, the --arch preset, dataclass defaults, then Model.build_model(args, task)):

  transformer_lm  fairseq's TransformerLanguageModel, --decoder-layers L
  bottom_up       msformer_lm_bottom_up: token layers before pooling 0, scale layers "a,b", aggregation 1,
                  token layers n   (a + b + 1 + n = L)
  top_down        msformer_lm_top_down:  scale layers "a,b", token layers n   (a + b + n = L)
  retina          msformer_lm_retina:    token layers L, retina windows "W,...,-1"

For each prefix length P (default 128, 512, 1024, 2048), every model's incremental_state is filled with the
prefix one position at a time (decoder(tokens[:, :t+1], incremental_state=state), t = 0 .. P-1, features only),
and then:

  cache bytes   sum of numel * element_size over every tensor in the incremental_state (nested dicts
                walked), measured right after the prefix, before any timed step;
  ms / token    the state is copied (copy.deepcopy) and --warmup + --steps single-token steps run on the copy,
                each passing the whole prefix (B, P + i + 1) as fairseq's SequenceGenerator does and taking
                log-probabilities of the newest position (decoder forward with the output projection, then
                model.get_normalized_probs(log_probs=True)); the median of the --steps timed ones is reported.
                The copy is thrown away, so timed steps never count as prefix: the next length continues
                filling the original state from P.

The models take their timed steps round-robin (model 1 step i, model 2 step i, ...), so load from other
processes on the machine falls on all of them alike; the ratios printed are from this one run.

Targets (PASS/MISS printed, no figures hard-coded):
  * every family's ms/token <= transformer_lm's at every length (--tolerance allows a relative margin, 0 default);
  * retina's cache grows like W + T/K: it stays under the bound layers * 2 * C * bytes * (W + K_1 + sum over the
    bounded coarse scales of (horizon_s / K_s + K_{s+1} / K_s + 1) + P / K_{S-1} + 1 + pooling buffers) at every
    length (each scale caches its blocks from b_s(t) on, see RetinaAttention.step), and between
    the two longest lengths it adds at most 1/K_{S-1} (+10%) cached positions per layer per token
    (transformer_lm adds 1 per layer per token).

  python scripts/bench_generation.py
  python scripts/bench_generation.py --profile retina --profile-length 2048   # plus a per-op profile of a step
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
from fairseq.models.transformer_lm import (  # noqa: E402
    TransformerLanguageModel,
    TransformerLanguageModelConfig,
    base_lm_architecture,
)

from fairseq_msformer.models.config import MsformerLMConfig, int_list  # noqa: E402
from fairseq_msformer.models.msformer_lm import MsformerLanguageModel  # noqa: E402

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
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="time target: family <= (1 + tolerance) x transformer_lm")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads; 0 = leave torch's default. One by default: batch-1 generation is "
                        "a stream of small ops, and on a small shared machine OpenMP threads that wait on each "
                        "other behind other processes' load inflate every op unpredictably")
    p.add_argument("--profile", nargs="*", default=None, choices=[BASELINE, *FAMILIES], metavar="MODEL",
                   help="after the table, profile single steps of these models (torch.profiler, per-op table)")
    p.add_argument("--profile-length", type=int, default=2048, help="prefix length of the profiled steps")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.dim % args.heads:
        p.error(f"--dim {args.dim} is not divisible by --heads {args.heads}")
    if sorted(args.lengths) != args.lengths:
        p.error("--lengths must increase (one cache is filled and reused across lengths)")
    if BASELINE not in args.models:
        p.error("--models must include transformer_lm (the reference)")
    if args.profile is not None and not args.profile:
        args.profile = [m for m in args.models if m != BASELINE]
    return args


# ---------------------------------------------------------------- building the models the way fairseq does


def make_task(vocab_words: int, tokens_per_sample: int):
    d = Dictionary()
    for i in range(vocab_words):
        d.add_symbol(f"w{i}")
    return SimpleNamespace(source_dictionary=d, target_dictionary=d,
                           args=SimpleNamespace(tokens_per_sample=tokens_per_sample))


def fill_dataclass_defaults(args, config_cls):
    """What fairseq's CLI does for options not on the command line: the dataclass default (interpolations,
    '${task...}', are left None here and set explicitly)."""
    for f in fields(config_cls):
        if not hasattr(args, f.name) or getattr(args, f.name) is None:
            default = f.default if f.default is not MISSING else (
                f.default_factory() if f.default_factory is not MISSING else None)
            setattr(args, f.name, None if isinstance(default, str) and default.startswith("${") else default)


def common_options(opts, max_positions):
    return dict(decoder_embed_dim=opts.dim, decoder_ffn_embed_dim=opts.ffn, decoder_attention_heads=opts.heads,
                dropout=0.0, max_target_positions=max_positions, tokens_per_sample=max_positions)


def build_transformer_lm(opts, task, max_positions):
    args = argparse.Namespace(**common_options(opts, max_positions), decoder_layers=opts.layers,
                              decoder_input_dim=opts.dim, decoder_output_dim=opts.dim)
    base_lm_architecture(args)  # the transformer_lm preset
    fill_dataclass_defaults(args, TransformerLanguageModelConfig)
    model = TransformerLanguageModel.build_model(args, task)
    config = (f"transformer_lm: decoder_layers={args.decoder_layers}, dim={args.decoder_embed_dim}, "
              f"heads={args.decoder_attention_heads}, ffn={args.decoder_ffn_embed_dim}, "
              f"pre-norm={args.decoder_normalize_before}, learned_pos={args.decoder_learned_pos}, "
              f"tied_io={args.share_decoder_input_output_embed}, max_positions={args.max_target_positions}")
    return model, config


def build_msformer(family, opts, task, max_positions):
    options = common_options(opts, max_positions)
    options["pool_factors"] = opts.pool_factors
    if family == "bottom_up":
        options.update(scale_layers=opts.bottom_up_scale_layers, token_layers=opts.bottom_up_token_layers,
                       token_layers_before_pooling=0)
        depth = sum(int_list("", opts.bottom_up_scale_layers)) + 1 + opts.bottom_up_token_layers
        layers = (f"token_layers_before_pooling=0, scale_layers={opts.bottom_up_scale_layers}, aggregation=1, "
                  f"token_layers={opts.bottom_up_token_layers}")
    elif family == "top_down":
        options.update(scale_layers=opts.top_down_scale_layers, token_layers=opts.top_down_token_layers)
        depth = sum(int_list("", opts.top_down_scale_layers)) + opts.top_down_token_layers
        layers = f"scale_layers={opts.top_down_scale_layers}, token_layers={opts.top_down_token_layers}"
    else:
        options.update(token_layers=opts.layers, retina_windows=opts.retina_windows)
        depth = opts.layers
        layers = f"token_layers={opts.layers}, retina_windows={opts.retina_windows}"
    args = argparse.Namespace(**options)
    ARCH_CONFIG_REGISTRY[f"msformer_lm_{family}"](args)
    fill_dataclass_defaults(args, MsformerLMConfig)
    model = MsformerLanguageModel.build_model(args, task)
    config = (f"{family}: {layers} -> {depth} layers, pool_factors={args.pool_factors}, dim={args.decoder_embed_dim}, "
              f"heads={args.decoder_attention_heads}, ffn={args.decoder_ffn_embed_dim}, "
              f"pool={args.pool_type}, rule={args.shift_rule}, tied_io={args.share_decoder_input_output_embed}, "
              f"max_positions={args.max_target_positions}")
    return model, config, depth


# ---------------------------------------------------------------- measuring


def tensors_in(state):
    """Every tensor in an incremental_state (dicts nested to any depth, lists/tuples too)."""
    if isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, dict):
        for value in state.values():
            yield from tensors_in(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from tensors_in(value)


def cache_bytes(state) -> int:
    return sum(t.numel() * t.element_size() for t in tensors_in(state))


def storage_bytes(state) -> int:
    """Bytes of the distinct storages behind the cached tensors (views keep their whole storage alive)."""
    seen = {}
    for t in tensors_in(state):
        s = t.untyped_storage()
        seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
    return sum(seen.values())


def fill(model, tokens, state, start, end):
    """Positions start .. end-1 into the cache, one at a time (fairseq's TransformerDecoder in incremental mode
    runs only the last position of what it is given)."""
    for t in range(start, end):
        model.decoder(tokens[:, : t + 1], incremental_state=state, features_only=True)


def generation_step(model, prefix, state):
    """One SequenceGenerator step of one model: decoder over the whole prefix (incremental), log-probs of the
    newest position."""
    out = model.decoder(prefix, incremental_state=state)
    out = (out[0][:, -1:, :], out[1])
    return model.get_normalized_probs(out, log_probs=True)


def retina_breakdown(state, family_body):
    """Retina: cached elements per scale, averaged over layers (keys; values are the same size)."""
    num_layers = len(family_body.layers)
    counts = {}
    for cache in state.values():
        for name, value in cache.items():
            parts = name.split(".")
            if len(parts) == 2 and parts[0].startswith("layer") and parts[1][:1] == "k" and parts[1][1:].isdigit():
                counts[int(parts[1][1:])] = counts.get(int(parts[1][1:]), 0) + value.size(1)
    return {s: c / num_layers for s, c in sorted(counts.items())}


def retina_bound(opts, model, length):
    """Upper bound on retina's cache bytes if it grows like W + T / K_{S-1} (no figure measured here)."""
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
    per_element = 2 * opts.dim * 4 * opts.batch_size  # keys and values, fp32
    return len(model.decoder.body.layers) * elements * per_element + 64  # + the (B, 1) length counter


def profile_step(name, model, tokens, state, length, steps=4):
    from torch.profiler import ProfilerActivity, profile, record_function

    print(f"\n=== profile: {name}, {steps} steps after a prefix of {length} ===")
    st = copy.deepcopy(state)
    generation_step(model, tokens[:, : length + 1], st)  # warm
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        for i in range(steps):
            with record_function("generation_step"):
                generation_step(model, tokens[:, : length + 2 + i], st)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
    print(table)


def main(argv=None):
    opts = parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    extra = opts.warmup + opts.steps + 8
    max_positions = max(opts.lengths) + extra
    if opts.profile:
        max_positions = max(max_positions, opts.profile_length + 16)
    task = make_task(opts.vocab, max_positions)

    models, configs = {}, []
    for name in opts.models:
        torch.manual_seed(opts.seed)
        if name == BASELINE:
            model, config = build_transformer_lm(opts, task, max_positions)
        else:
            model, config, depth = build_msformer(name, opts, task, max_positions)
            if depth != opts.layers:
                config += f"   [depth {depth} != transformer_lm's {opts.layers}]"
        models[name] = model.eval()
        params = sum(p.numel() for p in model.parameters())
        configs.append(f"  {config}, params={params / 1e6:.1f}M")
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, batch={opts.batch_size}, "
          f"vocab={len(task.source_dictionary)}, steps={opts.steps} (+{opts.warmup} warmup) per length, "
          f"fp32 CPU, load avg {os.getloadavg()[0]:.2f}")
    print("models:")
    print("\n".join(configs))

    g = torch.Generator().manual_seed(opts.seed)
    nspecial = task.source_dictionary.nspecial
    tokens = torch.randint(nspecial, len(task.source_dictionary), (opts.batch_size, max_positions), generator=g)

    states = {name: {} for name in models}
    times, sizes, storages, breakdown = {}, {}, {}, {}
    done = 0
    wall = time.perf_counter()
    with torch.no_grad():
        for length in opts.lengths:
            for name, model in models.items():
                fill(model, tokens, states[name], done, length)
                sizes[name, length] = cache_bytes(states[name])
                storages[name, length] = storage_bytes(states[name])
                if name == "retina":
                    breakdown[length] = retina_breakdown(states[name], model.decoder.body)
            done = length
            copies = {name: copy.deepcopy(states[name]) for name in models}
            samples = {name: [] for name in models}
            for i in range(opts.warmup + opts.steps):
                prefix = tokens[:, : length + i + 1]
                for name, model in models.items():
                    start = time.perf_counter()
                    generation_step(model, prefix, copies[name])
                    elapsed = time.perf_counter() - start
                    if i >= opts.warmup:
                        samples[name].append(elapsed)
            for name in models:
                times[name, length] = 1e3 * statistics.median(samples[name])
            del copies
            print(f"  P={length}: filled and timed ({time.perf_counter() - wall:.0f}s so far)", flush=True)

    names = list(models)
    width = 16
    header = "P".rjust(6) + " | " + " | ".join(n.rjust(width) for n in names)
    print("\nms per generated token (median of %d steps; decoder + log-softmax, B=%d)" % (opts.steps, opts.batch_size))
    print(header)
    print("-" * len(header))
    for length in opts.lengths:
        print(f"{length:6d} | " + " | ".join(f"{times[n, length]:{width}.2f}" for n in names))

    print("\ncache MiB after the prefix (sum of numel * element_size over the incremental_state)")
    print(header)
    print("-" * len(header))
    for length in opts.lengths:
        print(f"{length:6d} | " + " | ".join(f"{sizes[n, length] / MIB:{width}.3f}" for n in names))
    if any(storages[k] != sizes[k] for k in sizes):
        print("  (storage behind those tensors, views counted at their storage size: "
              + ", ".join(f"{n} {storages[n, opts.lengths[-1]] / MIB:.3f}" for n in names)
              + f" MiB at P={opts.lengths[-1]})")
    first, last = opts.lengths[0], opts.lengths[-1]
    print(f"cache({last}) / cache({first}): "
          + ", ".join(f"{n} {sizes[n, last] / sizes[n, first]:.2f}x" for n in names)
          + f"   (P ratio {last / first:.0f}x)")

    per_position = {}
    if len(opts.lengths) >= 2:
        a, b = opts.lengths[-2], opts.lengths[-1]
        for n in names:
            layers = models[n].decoder.body.layers if n == "retina" else None
            num_layers = len(layers) if layers is not None else opts.layers
            per_position[n] = (sizes[n, b] - sizes[n, a]) / (b - a) / (2 * opts.dim * 4 * opts.batch_size) / num_layers
        print(f"cache growth {a} -> {b}, cached positions added per layer per token (keys+values of width C): "
              + ", ".join(f"{n} {per_position[n]:.3f}" for n in names))

    if breakdown:
        k = models["retina"].decoder.grid.block_lengths
        print("\nretina: cached elements per layer and scale (keys) after the prefix")
        print("P".rjust(6) + " | " + " | ".join(f"scale {s} (K={k[s]})".rjust(14) for s in range(len(k)))
                + " | " + "bound MiB".rjust(10))
        for length in opts.lengths:
            row = breakdown[length]
            print(f"{length:6d} | " + " | ".join(f"{row.get(s, 0):14.1f}" for s in range(len(k)))
                  + f" | {retina_bound(opts, models['retina'], length) / MIB:10.3f}")

    print("\nratios: family ms/token / transformer_lm ms/token (same run, steps interleaved)")
    results = []
    for n in names[1:]:
        cells = []
        for length in opts.lengths:
            ratio = times[n, length] / times[BASELINE, length]
            ok = ratio <= 1.0 + opts.tolerance
            results.append(ok)
            cells.append(f"P={length}: {ratio:.2f} {'PASS' if ok else 'MISS'}")
        print(f"  {n:10s} " + "   ".join(cells))

    if "retina" in models:
        model = models["retina"]
        k_last = model.decoder.grid.block_lengths[-1]
        within = all(sizes["retina", L] <= retina_bound(opts, model, L) for L in opts.lengths)
        slope_ok = per_position.get("retina", 0.0) <= 1.1 / k_last
        ok = within and slope_ok
        results.append(ok)
        print(f"\nretina cache ~ W + T/K: under the bound at every P: {'yes' if within else 'no'}; "
              f"{per_position.get('retina', float('nan')):.3f} positions/layer/token vs 1/K_{{S-1}} = "
              f"{1 / k_last:.3f} (transformer_lm {per_position.get(BASELINE, float('nan')):.3f}): "
              f"{'PASS' if ok else 'MISS'}")
    print(f"\noverall: {sum(results)}/{len(results)} targets met; wall {time.perf_counter() - wall:.0f}s, "
          f"load avg {os.getloadavg()[0]:.2f}")

    if opts.profile:
        with torch.no_grad():
            for name in opts.profile:
                state = {}
                fill(models[name], tokens, state, 0, opts.profile_length)
                profile_step(name, models[name], tokens, state, opts.profile_length)


if __name__ == "__main__":
    main()
