#!/usr/bin/env python
"""Benchmark whole models: fairseq's transformer_lm against the multi-scale families, side by side in one run.

Models (same width, heads, FFN, vocabulary; built the way fairseq builds them: a Namespace of options, the --arch
preset, dataclass defaults, then Model.build_model(args, task)):
  transformer_lm  fairseq's TransformerLanguageModel, --layers L, pre-norm, input/output dims = width
  bottom_up       --bottom-up-arch (default msformer_lm_bottom_up_paper, 30 layers)
  top_down        --top-down-arch (default msformer_lm_top_down_paper, 30 layers)
  retina          msformer_lm_retina with L token layers, --retina-windows
  peer_*          outside implementations (scripts/peers; make peers), each at the layout of its family's model
                  here (PEER_LAYOUTS; --peer-options to change): `--models peers` adds all six as columns
For each model and sample length T (retina also at --retina-lengths), one fresh child process measures:
  params          parameters, embeddings and softmax included
  saved MiB       bytes autograd saves for backward in one training step (forward, cross-entropy, backward), each
                  storage counted once, parameters left out (torch.autograd.graph.saved_tensors_hooks)
  peak MiB        CUDA peak allocation on a GPU; peak resident memory of the child on a CPU (the interpreter,
                  torch and the model included: compare differences, not absolute values)
  train tok/s     B * T / median step time of --repeats training steps after one warm-up
  eval tok/s      fairseq-eval-lm's scoring: forward (no grad) + log-probs of the targets, B * T / median time
  gen ms/token    incremental decoding (fairseq's SequenceGenerator step: decoder on the whole prefix with
                  incremental_state, log-probs of the newest position) after a prefix of --generate-lengths; a
                  peer without a decoding cache recomputes the prefix at every step (what its wrapper does), so
                  its step is timed as one full pass over the prefix, and the table marks it
Writes benchmark.json, benchmark.md and two PNGs (memory and speed against T) to --out, and checks the targets for
the paper presets at --target-length: at most 0.70x transformer_lm's saved MiB and at least 2x its train tok/s.

  python scripts/experiments/benchmark.py                       # width 256, L = 14, T = 512 .. 4096 (retina to 8192), CPU
  python scripts/experiments/benchmark.py --device cuda --dtype bfloat16 --out docs/benchmark-gpu
  python scripts/experiments/benchmark.py --lengths 512 --modes train --models transformer_lm bottom_up   # a quick look
"""
import argparse
import json
import multiprocessing
import os
import resource
import statistics
import sys
import time
from dataclasses import MISSING, fields
from types import SimpleNamespace

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
MIB = 2.0**20
BASELINE = "transformer_lm"
FAMILIES = ("bottom_up", "top_down", "retina")
MODES = ("train", "eval", "generate")


def peer_layouts(opts):
    """Each peer (scripts/peers) at the layout of its family's model in this benchmark: the paper presets' 30
    layers for the pooling peers (12 at /4 + 14 at /16 + 4 token; 14 at /16 + 12 at /4 + 4 token), L layers for the
    retina and vanilla peers, windows as --retina-windows' full-resolution W."""
    window = int(opts.retina_windows.split(",")[0])
    return {
        "peer_hourglass": dict(hourglass_shorten_factors="4,4", hourglass_layers="0,12,14,0,4"),
        "peer_hierarchical": dict(sht_depth=10, sht_hierarchies="1,4,16"),  # 10 layers x 3 hierarchies = 30 blocks
        "peer_megabyte": dict(megabyte_layers="14,12,4", megabyte_patch_sizes="4,4"),
        "peer_nsa": dict(nsa_layers=opts.layers, nsa_sliding_window=window, nsa_compress_block=16,
                         nsa_compress_stride=16, nsa_selection_block=16, nsa_selected_blocks=4),
        "peer_local": dict(local_layers=opts.layers, local_window=window),
        "peer_xtransformers": dict(xt_layers=opts.layers),
    }


PEER_MODELS = ("peer_hourglass", "peer_hierarchical", "peer_megabyte", "peer_nsa", "peer_local", "peer_xtransformers")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=[BASELINE, *FAMILIES], choices=[BASELINE, *FAMILIES, *PEER_MODELS, "peers"],
                   help="models as columns; 'peers' stands for every outside implementation (make peers)")
    p.add_argument("--peer-options", default="", help="override the peers' layouts: "
                                                      "'peer_nsa.nsa_selected_blocks=8 peer_local.local_window=256'")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="what to measure")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096], help="sample lengths T")
    p.add_argument("--retina-lengths", type=int, nargs="*", default=[8192], help="further lengths, retina only")
    p.add_argument("--generate-lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096],
                   help="prefix lengths for generation (the cache is filled one token at a time: ~6 minutes on a CPU)")
    p.add_argument("--dim", type=int, default=256, help="model width C")
    p.add_argument("--ffn", type=int, default=1024, help="feed-forward inner dimension")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--layers", type=int, default=14, help="transformer_lm layers L (and retina's token layers)")
    p.add_argument("--bottom-up-arch", default="msformer_lm_bottom_up_paper", help="bottom_up preset")
    p.add_argument("--top-down-arch", default="msformer_lm_top_down_paper", help="top_down preset")
    p.add_argument("--our-options", default="", help="options for all three of our families, e.g. "
                                                      "'rotary_positions=True ffn_glu=True activation_fn=gelu'")
    p.add_argument("--bottom-up-options", default="", help="override the preset: 'scale_layers=8,18 token_layers=2'")
    p.add_argument("--top-down-options", default="", help="override the preset: 'scale_layers=12,14 token_layers=4'")
    p.add_argument("--retina-windows", default="64,256,-1", help="retina: horizons per scale (W first)")
    p.add_argument("--pool-factors", default=None, help="override the presets' pooling factors")
    p.add_argument("--vocab", type=int, default=10000, help="vocabulary words (plus fairseq's 4 specials)")
    p.add_argument("--batch-size", type=int, default=1, help="batch size B")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per point (median reported)")
    p.add_argument("--generate-steps", type=int, default=8, help="timed generation steps per point")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="parameters and activations (losses and softmax stay fp32, as fairseq's)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads on a CPU (0: torch's default)")
    p.add_argument("--target-length", type=int, default=2048, help="T at which the paper presets' targets apply")
    p.add_argument("--out", default=os.path.join(REPO, "docs", "benchmark"), help="results folder")
    p.add_argument("--seed", type=int, default=0)
    opts = p.parse_args(argv)
    opts.models = list(dict.fromkeys(m for name in opts.models for m in (PEER_MODELS if name == "peers" else [name])))
    return opts


# ---------------------------------------------------------------- building models the way fairseq does
def fill_dataclass_defaults(args, config_cls):
    """As fairseq's CLI for options not given: the dataclass default ('${task...}' interpolations: None)."""
    for f in fields(config_cls):
        if not hasattr(args, f.name) or getattr(args, f.name) is None:
            default = f.default if f.default is not MISSING else (
                f.default_factory() if f.default_factory is not MISSING else None)
            setattr(args, f.name, None if isinstance(default, str) and default.startswith("${") else default)


def fake_task(vocab_words: int, max_positions: int) -> SimpleNamespace:
    """What build_model reads from a fairseq task: the dictionaries and tokens_per_sample."""
    from fairseq.data import Dictionary

    vocab = Dictionary()
    for i in range(vocab_words):
        vocab.add_symbol(f"w{i}")
    return SimpleNamespace(source_dictionary=vocab, target_dictionary=vocab,
                           args=SimpleNamespace(tokens_per_sample=max_positions))


def build(name, opts, task, max_positions):
    """-> (model, one-line description of its layout)."""
    import fairseq_msformer  # noqa: F401  (registers msformer_lm and its presets)
    from fairseq.models import ARCH_CONFIG_REGISTRY
    from fairseq.models.transformer_lm import TransformerLanguageModel, TransformerLanguageModelConfig
    from fairseq_msformer.models.config import MsformerLMConfig
    from fairseq_msformer.models.msformer_lm import MsformerLanguageModel

    options = dict(decoder_embed_dim=opts.dim, decoder_ffn_embed_dim=opts.ffn, decoder_attention_heads=opts.heads,
                   dropout=0.0, max_target_positions=max_positions, tokens_per_sample=max_positions)
    if name in PEER_MODELS:
        return build_peer(name, opts, task, options)
    if name == BASELINE:
        args = argparse.Namespace(**options, decoder_layers=opts.layers, decoder_input_dim=opts.dim,
                                  decoder_output_dim=opts.dim, decoder_normalize_before=True)
        ARCH_CONFIG_REGISTRY["transformer_lm"](args)
        fill_dataclass_defaults(args, TransformerLanguageModelConfig)
        model = TransformerLanguageModel.build_model(args, task)
        return model, f"{args.decoder_layers} token layers"
    arch = {"bottom_up": opts.bottom_up_arch, "top_down": opts.top_down_arch, "retina": "msformer_lm_retina"}[name]
    if name == "retina":
        options.update(token_layers=opts.layers, retina_windows=opts.retina_windows)
    if opts.pool_factors:
        options["pool_factors"] = opts.pool_factors
    options.update(parse_overrides(opts.our_options))
    options.update(parse_overrides({"bottom_up": opts.bottom_up_options, "top_down": opts.top_down_options}.get(name, "")))
    args = argparse.Namespace(**options)
    ARCH_CONFIG_REGISTRY[arch](args)
    fill_dataclass_defaults(args, MsformerLMConfig)
    model = MsformerLanguageModel.build_model(args, task)
    extras = [label for label, on in (("rotary", args.rotary_positions), (f"{args.activation_fn} GLU", args.ffn_glu))
              if on]
    return model, f"{arch}: {count_layers(model)} layers ({', '.join([layout(args)] + extras)})"


def parse_overrides(text):
    """'key=value ...' as dataclass field names -> {key: value}: digits become ints, True/False booleans, the rest
    stays a string (comma lists such as scale_layers=8,18 are strings in the dataclass too)."""
    options = {}
    for item in text.split():
        key, _, value = item.partition("=")
        options[key] = int(value) if value.isdigit() else {"True": True, "False": False}.get(value, value)
    return options


def build_peer(name, opts, task, options):
    """An outside implementation through its fairseq wrapper (scripts/peers), built as fairseq builds it."""
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import peers
    from fairseq.models import ARCH_MODEL_REGISTRY

    options.update(peer_layouts(opts)[name])
    for item in opts.peer_options.split():  # peer.key=value
        target, _, assignment = item.partition(".")
        if target == name:
            options.update(parse_overrides(assignment))
    model_cls = ARCH_MODEL_REGISTRY[name]
    args = argparse.Namespace(**options)
    fill_dataclass_defaults(args, model_cls.__dataclass)
    model = model_cls.build_model(args, task)
    body = model.decoder.body
    implementation = peers.package_version(peers.PEERS[name][1])
    return model, f"{implementation}: {body.layout} ({body.layers} attention+FFN blocks)"


def recomputes_prefix(model):
    """True for a peer whose wrapper has no decoding cache (each generation step is a full pass)."""
    return getattr(getattr(model.decoder, "body", None), "has_cache", True) is False


def count_layers(model):
    """Transformer layers of an msformer model (every scale, the aggregation layer included), a transformer_lm, or
    a peer (scripts/peers: its trunk counts its attention+FFN blocks)."""
    from fairseq_msformer.modules import TransformerBlock

    peer_layers = getattr(getattr(model.decoder, "body", None), "layers", None)
    if isinstance(peer_layers, int):
        return peer_layers
    blocks = sum(isinstance(m, TransformerBlock) for m in model.modules())
    return blocks or len(model.decoder.layers)


def layout(args):
    """'2 token + 12 at /4 + 12 at /16 + aggregation + 3 token' for the pooling families."""
    from fairseq_msformer.models.config import int_list
    from fairseq_msformer.modules import ScaleGrid

    if args.family == "retina":
        return f"{args.token_layers} token layers, windows {args.retina_windows}, pool {args.pool_factors}"
    grid = ScaleGrid(int_list("--pool-factors", args.pool_factors))
    coarse = [f"{n} at /{k}" for n, k in zip(int_list("--scale-layers", args.scale_layers), grid.block_lengths[1:])]
    if args.family == "top_down":
        return " + ".join(coarse[::-1] + [f"{args.token_layers} token"])
    before = [f"{args.token_layers_before_pooling} token"] if args.token_layers_before_pooling else []
    return " + ".join(before + coarse + [f"aggregation ({args.bottom_up_combine})", f"{args.token_layers} token"])


# ---------------------------------------------------------------- measuring
def saved_bytes(step, excluded):
    """Run step() and return the bytes of the distinct storages autograd saved, those in `excluded` left out."""
    import torch

    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in excluded:
            storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(storages.values())


def timed(step, repeats, device):
    """Median seconds of `repeats` calls of step() (the caller has warmed it up)."""
    import torch

    samples = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def next_token_log_probs(model, prefix, incremental_state=None):
    """One generation step: the decoder over `prefix` (B, t) (only its newest token when the cache holds the rest),
    then the log-probabilities of the next token (B, 1, V)."""
    out = model.decoder(prefix, incremental_state=incremental_state)
    return model.get_normalized_probs((out[0][:, -1:], out[1]), log_probs=True)


def log_probs_of_targets(model, tokens):
    """What fairseq-eval-lm's SequenceScorer computes per batch: fp32 log-probs of every target token."""
    import torch

    net_output = model(tokens[:, :-1])
    if getattr(model.decoder, "adaptive_softmax", None) is not None:
        return model.get_normalized_probs(net_output, log_probs=True).gather(-1, tokens[:, 1:, None])
    return torch.log_softmax(net_output[0].float(), dim=-1).gather(-1, tokens[:, 1:, None])


def measure(name, mode, length, opts_dict):
    """In a fresh process (run_point): build the model, measure one (mode, length) point, return a dict."""
    import torch
    import torch.nn.functional as F

    opts = argparse.Namespace(**opts_dict)
    if opts.threads and opts.device == "cpu":
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    max_positions = max([*opts.lengths, *opts.retina_lengths, *opts.generate_lengths]) + opts.generate_steps + 16
    task = fake_task(opts.vocab, max_positions)
    model, description = build(name, opts, task, max_positions)
    dtype = getattr(torch, opts.dtype)
    model = model.to(device=opts.device, dtype=dtype)
    vocab = task.source_dictionary
    g = torch.Generator().manual_seed(opts.seed)
    tokens = torch.randint(vocab.nspecial, len(vocab), (opts.batch_size, length + 1), generator=g).to(opts.device)
    result = {"model": name, "mode": mode, "length": length, "layout": description,
              "params": sum(p.numel() for p in model.parameters())}
    if opts.device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    if mode == "train":
        model.train()

        def step():
            model.zero_grad(set_to_none=True)
            logits = model(tokens[:, :-1])[0].float()
            F.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1)).backward()

        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        result["saved_mib"] = saved_bytes(step, params) / MIB  # also the warm-up step
        result["tokens_per_s"] = opts.batch_size * length / timed(step, opts.repeats, opts.device)
    elif mode == "eval":
        model.eval()
        with torch.no_grad():
            log_probs_of_targets(model, tokens)  # warm-up
            seconds = timed(lambda: log_probs_of_targets(model, tokens), opts.repeats, opts.device)
        result["tokens_per_s"] = opts.batch_size * length / seconds
    elif recomputes_prefix(model):  # generate, no cache: a step is the whole prefix again, newest position scored
        model.eval()
        result["recomputes_prefix"] = True
        with torch.no_grad():
            step = lambda: next_token_log_probs(model, tokens[:, :length])  # noqa: E731  (the step after T - 1 tokens)
            step(), step()  # two warm-up steps
            result["ms_per_token"] = 1e3 * timed(step, opts.generate_steps, opts.device)
    else:  # generate: fill the cache to the prefix, then time single-token steps
        model.eval()
        state = {}
        with torch.no_grad():
            for t in range(length):
                model.decoder(tokens[:, : t + 1], incremental_state=state, features_only=True)
            extra = torch.randint(vocab.nspecial, len(vocab), (opts.batch_size, opts.generate_steps + 2),
                                  generator=g).to(opts.device)
            prefix = torch.cat([tokens[:, :length], extra], dim=1)
            ends = iter(range(length + 1, prefix.size(1) + 1))  # each step adds one token to the cached prefix
            step = lambda: next_token_log_probs(model, prefix[:, :next(ends)], state)  # noqa: E731
            step(), step()  # two warm-up steps
            result["ms_per_token"] = 1e3 * timed(step, opts.generate_steps, opts.device)
    if opts.device == "cuda":
        result["peak_mib"] = torch.cuda.max_memory_allocated() / MIB
    else:
        result["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def put_result(queue, fn, args):
    queue.put(fn(*args))


def in_fresh_process(fn, *args):
    """fn(*args) in a spawned process (nothing is inherited, so its peak memory is its own): (result, None), or
    (None, why) if it failed. For small results: the child's queue is read after it has exited."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=put_result, args=(queue, fn, args))
    child.start()
    child.join()
    if child.exitcode != 0 or queue.empty():
        return None, f"exit code {child.exitcode}"
    return queue.get(), None


def run_point(name, mode, length, opts):
    """measure() in a fresh process, so that peak memory is this point's alone."""
    result, error = in_fresh_process(measure, name, mode, length, vars(opts))
    return result or {"model": name, "mode": mode, "length": length, "error": error}


# ---------------------------------------------------------------- reporting
def points_of(opts):
    for mode in opts.modes:
        lengths = opts.generate_lengths if mode == "generate" else opts.lengths
        for length in lengths:
            for name in opts.models:
                yield name, mode, length
        if mode != "generate" and "retina" in opts.models:
            for length in opts.retina_lengths:
                yield "retina", mode, length


def markdown(results, opts):
    by = {(r["model"], r["mode"], r["length"]): r for r in results}
    names = list(opts.models)
    out = [f"Device {opts.device}, {opts.dtype}, batch {opts.batch_size}, width {opts.dim}, FFN {opts.ffn}, "
           f"{opts.heads} heads, vocab {opts.vocab + 4}, threads {opts.threads}; one run, median of "
           f"{opts.repeats} steps per point. Ratios to {BASELINE} in brackets.\n"]
    layouts = {r["model"]: (r.get("layout"), r.get("params")) for r in results if "layout" in r}
    out.append("| model | layout | params |\n|---|---|---|")
    out += [f"| {n} | {layouts[n][0]} | {layouts[n][1] / 1e6:.2f}M |" for n in names if n in layouts]
    recompute = sorted({r["model"] for r in results if r.get("recomputes_prefix")})

    def cell(name, mode, length, key, fmt):
        r = by.get((name, mode, length))
        if r is None or key not in r:
            return "-" if r is None else "error"
        base = by.get((BASELINE, mode, length), {}).get(key)
        ratio = f" ({r[key] / base:.2f}x)" if base and name != BASELINE else ""
        return format(r[key], fmt) + ratio + ("*" if r.get("recomputes_prefix") else "")

    sections = [("train", "saved_mib", ".1f", "MiB saved for backward (training step)"),
                ("train", "peak_mib", ".0f", "peak MiB (" + ("CUDA allocation" if opts.device == "cuda"
                                                             else "resident, whole child process") + ")"),
                ("train", "tokens_per_s", ".0f", "training tokens/s"),
                ("eval", "tokens_per_s", ".0f", "eval-lm scoring tokens/s"),
                ("generate", "ms_per_token", ".2f", "generation ms/token after a prefix of T")]
    for mode, key, fmt, title in sections:
        lengths = sorted({r["length"] for r in results if r["mode"] == mode})
        if not lengths:
            continue
        note = ""
        if mode == "generate" and recompute:
            note = (f" (* {', '.join(recompute)}: no decoding cache, every step recomputes the prefix: timed as one "
                    f"full pass over it)")
        header = [f"{n} ({layouts[n][1] / 1e6:.2f}M)" if n in layouts else n for n in names]  # parameters
        out.append(f"\n**{title}**{note}\n\n| T | " + " | ".join(header) + " |\n|---|" + "---|" * len(names))
        out += [f"| {L} | " + " | ".join(cell(n, mode, L, key, fmt) for n in names) + " |" for L in lengths]
    return "\n".join(out) + "\n"


def targets(results, opts):
    """The issue's targets for the paper presets at --target-length: <= 0.70x saved MiB, >= 2x train tok/s."""
    by = {(r["model"], r["mode"], r["length"]): r for r in results}
    base = by.get((BASELINE, "train", opts.target_length))
    lines = []
    for name in ("bottom_up", "top_down"):
        r = by.get((name, "train", opts.target_length))
        if not base or not r or "saved_mib" not in r or "saved_mib" not in base:
            continue
        memory, speed = r["saved_mib"] / base["saved_mib"], r["tokens_per_s"] / base["tokens_per_s"]
        verdict = "PASS" if memory <= 0.70 else "MISS"
        lines.append(f"{name} at T={opts.target_length}: saved MiB {memory:.2f}x ({verdict}"
                     f" <= 0.70x), train tokens/s {speed:.2f}x ({'PASS' if speed >= 2 else 'MISS'} >= 2x)")
    return lines


def plot(results, opts):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("train", "saved_mib", "MiB saved for backward"), ("train", "tokens_per_s", "training tokens/s"),
              ("eval", "tokens_per_s", "eval-lm scoring tokens/s")]
    panels = [p for p in panels if any(r["mode"] == p[0] and p[1] in r for r in results)]
    if not panels:
        return []
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    axes = [axes] if len(panels) == 1 else axes
    for ax, (mode, key, title) in zip(axes, panels):
        for name in opts.models:
            pts = sorted((r["length"], r[key]) for r in results
                         if r["model"] == name and r["mode"] == mode and key in r)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sample length T")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    if len(opts.models) > 5:  # peers as columns: the legend beside the panels, not over the lines
        axes[-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    else:
        axes[0].legend()
    fig.suptitle(f"{opts.device} {opts.dtype}, width {opts.dim}, batch {opts.batch_size}")
    fig.tight_layout()
    path = os.path.join(opts.out, "benchmark.png")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return [path]


def main(argv=None):
    opts = parse_args(argv)
    os.makedirs(opts.out, exist_ok=True)
    points = list(points_of(opts))
    print(f"{len(points)} points, each in a fresh process; load avg {os.getloadavg()[0]:.2f}", flush=True)
    results, wall = [], time.perf_counter()
    for i, (name, mode, length) in enumerate(points, start=1):
        r = run_point(name, mode, length, opts)
        results.append(r)
        shown = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items() if k not in ("layout",)}
        print(f"[{i}/{len(points)}, {time.perf_counter() - wall:.0f}s] {shown}", flush=True)
    report = markdown(results, opts)
    checks = targets(results, opts)
    report += "".join(f"\n- {line}" for line in checks) + ("\n" if checks else "")
    with open(os.path.join(opts.out, "benchmark.json"), "w") as f:
        json.dump({"options": vars(opts), "results": results}, f, indent=1)
    with open(os.path.join(opts.out, "benchmark.md"), "w") as f:
        f.write(report)
    plots = plot(results, opts)
    print("\n" + report + f"\nwritten: benchmark.json, benchmark.md {' '.join(plots)} in {opts.out}; "
          f"wall {time.perf_counter() - wall:.0f}s, load avg {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
