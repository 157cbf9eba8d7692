#!/usr/bin/env python
"""The paper's trade-off in miniature: fairseq's transformer_lm (L layers) against deeper multi-scale models.

Every model of a suite is trained by fairseq-train on the shipped corpus (data-bin/pydoc) with the same data, token
budget, seed, optimizer and schedule, then scored by fairseq-eval-lm on valid and test (--context-window). For each
model the results hold: parameters, valid/test perplexity, the learning curve (valid perplexity every
--validate-every updates against tokens and against training seconds), bytes saved for backward by one training
step of the real model and criterion on a batch of the training shape (activation memory), the training process's
peak resident memory, training tokens/s (tokens / training seconds, validation and checkpointing excluded: see
read_log), and wall time. Outputs: runs/<model>.json, results.json, results.md (the table) and PNGs (learning
curves; perplexity against activation memory) in --out.

Resumable: a model whose runs/<model>.json has the same settings is skipped; an interrupted one resumes
from its checkpoint_last.pt (fairseq's own resume), and the learning curve keeps the entries of the updates that
survived. Models run one after another, each with --threads threads.

  python scripts/experiments/reproduce.py                     # suite "main" (make reproduce), about an hour on a 2-core CPU
  python scripts/experiments/reproduce.py --suite ablation    # the bottom-up design ablation, ~50 minutes
  python scripts/experiments/reproduce.py --quick --out /tmp/q   # a few updates of tiny models (the tests)
  python scripts/experiments/reproduce.py --only transformer_lm bottom_up   # a subset (the others' results stay)
  python scripts/experiments/reproduce.py --suite peers --threads 1   # outside implementations beside ours (docs/peers)

The peers suite (make peers first) runs the packages of scripts/peers at the main suite's budget beside the vanilla
frontier (transformer_lm at 2, 4, 6, 8 layers) and our main models; each entry also names its family and
implementation, and two plots put every model against the frontier (perplexity vs activation memory and vs
training time). A model whose options and settings equal a main-suite run in docs/main is taken from there.
"""
import argparse
import glob
import json
import logging
import os
import re
import shlex
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASELINE = "transformer_lm"
PEERS_DIR = os.path.join(REPO, "scripts", "peers")

# ---------------------------------------------------------------- the experiment
# Shared by every model: width 128, FFN 512, 4 heads, dropout 0.1, adaptive input and softmax (tied), pre-norm.
# transformer_lm gets --decoder-input-dim/--decoder-output-dim equal to the width (else it keeps 512-d embeddings).
def shared_options(dim, ffn, heads):
    """(options every model gets, options transformer_lm also gets) at one size."""
    model = ["--decoder-embed-dim", str(dim), "--decoder-ffn-embed-dim", str(ffn), "--decoder-attention-heads",
             str(heads), "--dropout", "0.1", "--adaptive-input", "--adaptive-input-cutoff", "2000,6000",
             "--adaptive-softmax-cutoff", "2000,6000", "--tie-adaptive-weights"]
    baseline = ["--decoder-input-dim", str(dim), "--decoder-output-dim", str(dim), "--decoder-normalize-before"]
    return model, baseline


BOTTOM_UP = ["--arch", "msformer_lm_bottom_up", "--pool-factors", "4,4"]
# The bottom-up design chosen from 500-update pilots, and the ablation's starting point, Hourglass-shaped: 1 token
# layer, 2 layers at /4, 8 at /16, residual upsampling with the hourglass shift, then the aggregation layer (a token
# layer): 12 layers, 2 of them at token level (transformer_lm has 4), so less activation memory than transformer_lm.
BOTTOM_UP_BEST = ["--scale-layers", "2,8", "--token-layers-before-pooling", "1", "--token-layers", "0",
                  "--bottom-up-combine", "residual", "--shift-rule", "hourglass", "--pool-type", "mean"]
BEST_LAYOUT = "1 token + 2 at /4 + 8 at /16 + aggregation = 12"


def with_changed(args, **changes):
    """A copy of fairseq-train arguments with some options' values changed (each option must be there)."""
    args = list(args)
    for option, value in changes.items():
        flag = "--" + option.replace("_", "-")
        args[args.index(flag) + 1] = str(value)
    return args


def variant(**changes):
    """BOTTOM_UP_BEST with some options changed (the ablation)."""
    return with_changed(BOTTOM_UP + BOTTOM_UP_BEST, **changes)


TRANSFORMER_LM_4 = (["--arch", "transformer_lm", "--decoder-layers", "4"], "4 token layers")
SUITES = {
    # L = 4 token layers for transformer_lm; the pooling families have more than 2L = 8 layers, 2 at token level.
    "main": {
        BASELINE: TRANSFORMER_LM_4,
        "bottom_up": (BOTTOM_UP + BOTTOM_UP_BEST, BEST_LAYOUT),
        "top_down": (["--arch", "msformer_lm_top_down", "--pool-factors", "4,4", "--scale-layers", "2,8",
                      "--token-layers", "2", "--shift-rule", "hourglass"], "8 at /16 + 2 at /4 + 2 token = 12"),
        "retina": (["--arch", "msformer_lm_retina", "--pool-factors", "4,4", "--token-layers", "4",
                    "--retina-windows", "64,256,-1"], "4 token layers (W=64, /4 to 256, /16 beyond)"),
        # the ablation's best bottom-up (what the presets use), at the full budget
        "bottom_up_linear": (variant(pool_type="linear", token_layers_before_pooling=0, token_layers=1),
                             "2 at /4 + 8 at /16 + aggregation + 1 token = 12, linear pooling"),
        # and with the finer first scale the ablation found (blocks of 2 and 16 tokens): more memory, still < 1x
        "bottom_up_2_8": (variant(pool_type="linear", token_layers_before_pooling=0, token_layers=1, pool_factors="2,8"),
                          "2 at /2 + 8 at /16 + aggregation + 1 token = 12, linear pooling"),
    },
    # One change at a time from the chosen bottom-up design (what the paper leaves open).
    "ablation": {
        BASELINE: TRANSFORMER_LM_4,
        "transformer_lm_3": (["--arch", "transformer_lm", "--decoder-layers", "3"], "3 token layers"),
        "chosen": (BOTTOM_UP + BOTTOM_UP_BEST, BEST_LAYOUT),
        "attention_aggregation": (variant(bottom_up_combine="attention"), "aggregation layer reads blocks (paper)"),
        "residual_and_attention": (variant(bottom_up_combine="both"), "residual upsampling + aggregation attention"),
        "complete_rule": (variant(shift_rule="complete"), "complete-block rule instead of the hourglass shift"),
        "token_layer_after": (variant(token_layers_before_pooling=0, token_layers=1),
                              "0 token layers before pooling, 1 after the aggregation"),
        "max_pooling": (variant(pool_type="max"), "max pooling"),
        "linear_pooling": (variant(pool_type="linear"), "linear pooling (concat + project)"),
        "layers_5_5": (variant(scale_layers="5,5"), "5 at /4 + 5 at /16 instead of 2 + 8"),
        "pool_factors_2_8": (variant(pool_factors="2,8"), "blocks of 2 and 16 tokens instead of 4 and 16"),
        "three_scales": (variant(pool_factors="4,4,4", scale_layers="2,4,4"),
                         "blocks of 4, 16 and 64 tokens: 2 + 4 + 4 coarse layers"),
        "linear_after_2_8": (variant(pool_type="linear", token_layers_before_pooling=0, token_layers=1,
                                     pool_factors="2,8"), "linear pooling, token layer after, blocks of 2 and 16"),
        # the two single changes that helped most, together (what the presets use)
        "linear_and_token_layer_after": (variant(pool_type="linear", token_layers_before_pooling=0, token_layers=1),
                                         "linear pooling, and the token layer after the aggregation"),
    },
}

RETINA_LOCAL_LIKE = ["--rotary-positions", "--rotary-fraction", "1", "--ffn-glu", "--activation-fn", "gelu"]


def peer(arch, *options):
    return ["--arch", arch, *options]


# Outside implementations (scripts/peers) at the main suite's sizes, each matched to its family's main model as far
# as the package allows (docs/peers.md says where it cannot), and the vanilla frontier. Peers and the frontier
# first: our models' entries are normally reused from docs/main (same options and settings).
SUITES["peers"] = {
    "peer_hourglass": (peer("peer_hourglass", "--hourglass-shorten-factors", "4,4", "--hourglass-layers", "1,2,8,0,1"),
                       "1 token + 2 at /4 + 8 at /16 + 1 token = 12, mean pool / repeat"),
    "peer_xtransformers": (peer("peer_xtransformers", "--xt-layers", "4"), "4 layers, rotary"),
    "peer_local": (peer("peer_local", "--local-layers", "4", "--local-window", "64"), "4 layers, window 64"),
    "peer_megabyte": (peer("peer_megabyte", "--megabyte-layers", "8,2,2", "--megabyte-patch-sizes", "4,4"),
                      "8 at /16 + 2 at /4 + 2 token = 12"),
    "transformer_lm_2": (["--arch", "transformer_lm", "--decoder-layers", "2"], "2 token layers"),
    BASELINE: TRANSFORMER_LM_4,
    "transformer_lm_6": (["--arch", "transformer_lm", "--decoder-layers", "6"], "6 token layers"),
    "transformer_lm_8": (["--arch", "transformer_lm", "--decoder-layers", "8"], "8 token layers"),
    "peer_nsa": (peer("peer_nsa", "--nsa-layers", "4", "--nsa-sliding-window", "64", "--nsa-compress-block", "16",
                      "--nsa-compress-stride", "16", "--nsa-selection-block", "16", "--nsa-selected-blocks", "4"),
                 "4 layers: window 64, compressed 16-token blocks, 4 x 16 selected"),
    "peer_hierarchical": (peer("peer_hierarchical", "--sht-depth", "4", "--sht-hierarchies", "1,4,16"),
                          "4 layers x hierarchies 1/4/16 = 12 blocks"),
    "peer_hourglass_resampling": (peer("peer_hourglass", "--hourglass-shorten-factors", "4,4", "--hourglass-layers",
                                       "1,2,8,0,1", "--hourglass-attn-resampling"),
                                  "as peer_hourglass + the package's attention resampling (4 more blocks)"),
    **{name: SUITES["main"][name] for name in ("bottom_up", "top_down", "retina", "bottom_up_linear", "bottom_up_2_8")},
    # x-transformers' lead over transformer_lm is its rotary positions (400-update pilots: without them it is
    # transformer_lm's equal); ours with --rotary-positions, each family's main model otherwise unchanged
    **{name + "_rotary": (SUITES["main"][name][0] + ["--rotary-positions"], SUITES["main"][name][1] + ", rotary")
       for name in ("bottom_up_2_8", "top_down", "retina")},
    # and local-attention's gated FFN (GEGLU, the same parameters as ours): local-attention, a window of 64 tokens
    # and nothing more, led every other model by far in its run
    **{name + "_rotary_glu": (SUITES["main"][name][0] + ["--rotary-positions", "--ffn-glu", "--activation-fn", "gelu"],
                              SUITES["main"][name][1] + ", rotary, GEGLU")
       for name in ("bottom_up_2_8", "top_down", "retina")},
    # retina still trailed local-attention (+1.0%), which rotates every dimension of a head (ours: half, as
    # x-transformers) and reads 64 to 127 tokens back at full resolution (its window and the one before it)
    "retina_rotary_full_glu": (SUITES["main"]["retina"][0] + RETINA_LOCAL_LIKE, "4 token layers (W=64, /4 to 256, "
                               "/16 beyond), rotary on all dims, GEGLU"),
    # NSA's learned compression of older blocks: keys and values pooled by a learned projection, not averaged
    "retina_linear_rotary_full_glu": (SUITES["main"]["retina"][0] + RETINA_LOCAL_LIKE + ["--pool-type", "linear"],
                                      "4 token layers (W=64, /4 to 256, /16 beyond), linear pooling, rotary on all "
                                      "dims, GEGLU"),
    # a shorter fine window: both local-attention and retina learned more slowly with a longer one (W = 128)
    "retina_w32_rotary_full_glu": (with_changed(SUITES["main"]["retina"][0], retina_windows="32,256,-1")
                                   + RETINA_LOCAL_LIKE,
                                   "4 token layers (W=32, /4 to 256, /16 beyond), rotary on all dims, GEGLU"),
    # NSA's gated branches: each scale its own softmax, mixed by per-head gates of the query (the window's softmax
    # mass is no longer shared with up to 16 + T / 16 older blocks)
    "retina_gate_rotary_full_glu": (SUITES["main"]["retina"][0] + RETINA_LOCAL_LIKE + ["--retina-gate"],
                                    "4 token layers (W=64, /4 to 256, /16 beyond), gated scales, rotary on all dims, "
                                    "GEGLU"),
    # local-attention's window on top of the gates: the full-resolution window starts a 64-token bucket before the
    # query's own (64-127 tokens back, exactly what peer_local reads), so retina reads what local-attention reads and
    # older blocks besides; a chunk's queries share their blocks, so fewer padded keys are scored
    "retina_bucket_gate_rotary_full_glu": (SUITES["main"]["retina"][0] + RETINA_LOCAL_LIKE
                                           + ["--retina-gate", "--retina-bucketed-window"],
                                           "4 token layers (W=64 bucketed, /4 to 256, /16 beyond), gated scales, "
                                           "rotary on all dims, GEGLU"),
    # NSA's selected blocks on top of the gates: each query also reads 4 older 16-token blocks token by token, those
    # its query ranks highest (peer_nsa's setting: 4 selected blocks of 16), for exact copying from far back
    "retina_select_rotary_full_glu": (SUITES["main"]["retina"][0] + RETINA_LOCAL_LIKE
                                      + ["--retina-gate", "--retina-select", "4"],
                                      "4 token layers (W=64, /4 to 256, /16 beyond), gated scales + 4 selected 16-token "
                                      "blocks, rotary on all dims, GEGLU"),
    # no absolute position vector added to the pooled keys (rotary positions already place every block by its ready
    # position; the vector's norm is about that of a pooled key, so it can drown the block's content)
    "retina_noscalepos_rotary_full_glu": (SUITES["main"]["retina"][0] + RETINA_LOCAL_LIKE + ["--no-scale-positions"],
                                          "4 token layers (W=64, /4 to 256, /16 beyond), no block position vectors, "
                                          "rotary on all dims, GEGLU"),
    # a longer fine window (local-attention reads 64-127 tokens at full resolution, retina W = 64: 64-67); with the
    # peer at the same longer window: both learned more slowly early on (updates 200-300), run to the end here
    "retina_w128_rotary_full_glu": (with_changed(SUITES["main"]["retina"][0], retina_windows="128,320,-1")
                                    + RETINA_LOCAL_LIKE,
                                    "4 token layers (W=128, /4 to 320, /16 beyond), rotary on all dims, GEGLU"),
    "peer_local_128": (peer("peer_local", "--local-layers", "4", "--local-window", "128"), "4 layers, window 128"),
}
FRONTIER = ("transformer_lm_2", BASELINE, "transformer_lm_6", "transformer_lm_8")  # vanilla depth: the yardstick
SUITE_UPDATES = {"main": 1200, "ablation": 400, "peers": 1200}
QUICK = {  # tiny stand-ins with the same families (the tests run these)
    BASELINE: (["--arch", "transformer_lm", "--decoder-layers", "1"], "1 token layer"),
    "bottom_up": (["--arch", "msformer_lm_bottom_up", "--pool-factors", "2,2", "--scale-layers", "1,1",
                   "--token-layers", "1"], "1 at /2 + 1 at /4 + aggregation + 1 token = 4"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--suite", default="main", choices=sorted(SUITES), help="which set of models")
    p.add_argument("--only", nargs="+", help="train and score only these models of the suite")
    p.add_argument("--out", help="results folder (default: docs/<suite>, or a temporary-style folder with --quick)")
    p.add_argument("--save-root", help="checkpoints and logs (default: checkpoints/reproduce/<suite>)")
    p.add_argument("--data", default=os.path.join(REPO, "data-bin", "pydoc"), help="binarized corpus")
    p.add_argument("--updates", type=int, help=f"training updates per model (same for all; default {SUITE_UPDATES})")
    p.add_argument("--tokens-per-sample", type=int, default=512, help="training sample length T")
    p.add_argument("--max-tokens", type=int, default=4096, help="tokens per update (batch = max-tokens / T)")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam peak learning rate (inverse_sqrt schedule)")
    p.add_argument("--warmup-updates", type=int, default=200, help="linear warm-up updates")
    p.add_argument("--validate-every", type=int, default=100, help="updates between validations (the curves)")
    p.add_argument("--context-window", type=int, default=256, help="fairseq-eval-lm --context-window")
    p.add_argument("--threads", type=int, default=2, help="OMP threads per training run")
    p.add_argument("--seed", type=int, default=1, help="the seed of every model's run (the tables' figures)")
    p.add_argument("--repeat-seeds", type=int, nargs="+", default=[],
                   help="also train each model with these seeds (runs/<model>.seed<N>.json): the tables then give "
                        "the mean and spread of valid perplexity over all its seeds")
    p.add_argument("--quick", action="store_true", help="tiny models, a few updates: checks the pipeline")
    p.add_argument("--remeasure-memory", action="store_true",
                   help="train nothing: measure again the activation memory (and parameters) of the finished runs "
                        "from their checkpoint_last.pt under --save-root, after a change that moves memory and "
                        "nothing else (the runs keep their perplexities and curves)")
    opts = p.parse_args(argv)
    opts.updates = opts.updates or SUITE_UPDATES[opts.suite]
    if opts.quick:
        opts.updates, opts.tokens_per_sample, opts.max_tokens = 8, 64, 512
        opts.warmup_updates, opts.validate_every, opts.context_window = 4, 4, 32
    opts.out = opts.out or os.path.join(REPO, "docs", opts.suite + ("-quick" if opts.quick else ""))
    opts.save_root = opts.save_root or os.path.join(REPO, "checkpoints", "reproduce",
                                                    opts.suite + ("-quick" if opts.quick else ""))
    if opts.validate_every <= 0 or opts.updates % opts.validate_every:
        p.error("--updates must be a multiple of --validate-every")
    known = QUICK if opts.quick else SUITES[opts.suite]
    unknown = sorted(set(opts.only or []) - set(known))
    if unknown:
        p.error(f"--only: {', '.join(unknown)} not in this suite ({', '.join(known)})")
    if not os.path.exists(os.path.join(opts.data, "dict.txt")):
        p.error(f"--data: no binarized corpus at {opts.data} (dict.txt missing)")
    return opts


def models_of(opts):
    """name -> (fairseq-train model arguments, layout description)."""
    suite = QUICK if opts.quick else SUITES[opts.suite]
    shared, dims = shared_options(32, 64, 2) if opts.quick else shared_options(128, 512, 4)
    models = {}
    for name, (args, layout) in suite.items():
        if opts.only and name not in opts.only:
            continue
        models[name] = (args + shared + (dims if "transformer_lm" in args else []), layout)
    return models


def user_dir(model_args):
    """scripts/peers for an outside implementation (it registers ours too), else our package."""
    arch = model_args[model_args.index("--arch") + 1]
    return PEERS_DIR if arch.startswith("peer_") else os.path.join(REPO, "fairseq_msformer")


def family_and_implementation(model_args):
    """('bottom_up' | 'top_down' | 'retina' | 'vanilla', 'ours' | 'package==version') of a model's --arch."""
    arch = model_args[model_args.index("--arch") + 1]
    if arch.startswith("peer_"):
        sys.path.insert(0, os.path.dirname(PEERS_DIR))
        import peers

        family, package = peers.PEERS[arch]
        return family, peers.package_version(package)
    if arch.startswith("transformer_lm"):
        import fairseq

        return "vanilla", f"fairseq=={fairseq.__version__}"
    for family in ("bottom_up", "top_down", "retina"):
        if family in arch:
            return family, "ours"
    raise ValueError(f"no family known for --arch {arch}")


def train_command(opts, name, model_args):
    save_dir = os.path.join(opts.save_root, name)
    return [
        fairseq_script("fairseq-train"), opts.data, "--user-dir", user_dir(model_args),
        "--task", "multiscale_language_modeling", "--cpu", *model_args,
        "--tokens-per-sample", str(opts.tokens_per_sample), "--sample-break-mode", "none",
        "--max-tokens", str(opts.max_tokens), "--criterion", "adaptive_loss", "--ddp-backend", "legacy_ddp",
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--clip-norm", "1.0", "--lr", str(opts.lr),
        "--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(opts.warmup_updates), "--warmup-init-lr", "1e-5",
        "--max-update", str(opts.updates), "--seed", str(opts.seed), "--num-workers", "0",
        "--validate-interval-updates", str(opts.validate_every), "--validate-interval", "100000",
        "--save-interval-updates", str(opts.validate_every), "--keep-interval-updates", "1",
        "--no-epoch-checkpoints", "--save-dir", save_dir,
        "--log-format", "json", "--log-interval", str(max(1, opts.validate_every // 5)),
        "--log-file", os.path.join(save_dir, "train.log"),
    ]


def fairseq_script(name):
    return os.path.join(os.path.dirname(sys.executable), name)


def run_child(command, env):
    """Run a command to the end, printing its progress; returns (exit code, peak resident MiB of that process,
    seconds, output). fairseq-train writes its own log (--log-file)."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    output = []
    for line in proc.stdout:
        output.append(line)
        progress = progress_line(line)
        if progress:
            print("    " + progress, flush=True)
    _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024, time.perf_counter() - start, "".join(output)


def progress_line(line):
    """A short line for fairseq-train's train_inner and valid entries (and errors), else None."""
    match = re.search(r"\| (train_inner|valid) \| (\{.*\})", line)
    if not match:
        return line.rstrip() if "error" in line.lower() else None
    stats = json.loads(match.group(2))
    if match.group(1) == "valid":
        return f"update {stats.get('valid_num_updates')}: valid ppl {stats.get('valid_ppl')}"
    return f"update {stats.get('num_updates')}: train ppl {stats.get('ppl')}, {stats.get('wps')} tokens/s"


# ---------------------------------------------------------------- reading fairseq's logs
LOG_ENTRY = re.compile(r'^(\{".*\})\s*$')  # --log-file holds the json lines alone (no time or tag)


def read_log(path):
    """Learning curve from fairseq's json log, and the cumulative (train seconds, tokens) at the last update.

    Seconds of an interval between two train_inner entries are its tokens / fairseq's wps, which is exact to
    0.1 token/s; but fairseq's wps meter also runs through a validation (and a checkpoint save, or the start of a
    resumed run), so for the interval that follows one the train_wall meter (train steps only, whole seconds) is
    used instead. A resumed run repeats the updates after its last checkpoint; the later entries win, so time
    spent on work lost to the interruption is not counted."""
    train, valid = {}, {}
    with open(path) as f:
        for line in f:
            match = LOG_ENTRY.search(line)
            if not match:
                continue
            stats = json.loads(match.group(1))
            if "num_updates" in stats and "loss" in stats:  # train_inner
                update = int(stats["num_updates"])
                train = {u: v for u, v in train.items() if u < update}  # drop entries a resume redid
                train[update] = (float(stats["train_wall"]), float(stats["wpb"]), float(stats["wps"]))
            elif "valid_ppl" in stats:
                valid[int(stats["valid_num_updates"])] = float(stats["valid_ppl"])
    seconds = tokens = 0.0
    previous, cumulative = 0, {}
    for update in sorted(train):
        train_wall, wpb, wps = train[update]
        interval_tokens = wpb * (update - previous)
        after_pause = previous == 0 or previous in valid
        seconds += train_wall if after_pause or wps <= 0 else interval_tokens / wps
        tokens += interval_tokens
        cumulative[update], previous = (seconds, tokens), update
    curve = []
    for update in sorted(valid):
        known = [u for u in cumulative if u <= update]
        if known:
            s, t = cumulative[max(known)]
            curve.append({"updates": update, "tokens": t, "train_seconds": s, "valid_ppl": valid[update]})
    return curve, cumulative[max(cumulative)] if cumulative else (0.0, 0.0)


def parse_eval(output):
    ppl = re.search(r"Loss \(base 2\): ([\d.]+), Perplexity: ([\d.]+)", output)
    speed = re.search(r"Evaluated ([\d,]+) tokens in ([\d.]+)s \(([\d.]+) tokens/s\)", output)
    if not ppl or not speed:
        raise RuntimeError("fairseq-eval-lm printed no perplexity:\n" + output[-3000:])
    return float(ppl.group(2)), float(speed.group(3))


# ---------------------------------------------------------------- measuring a trained model
def activation_memory(checkpoint, data, tokens_per_sample, max_tokens, threads, model_user_dir=None):
    """MiB saved for backward by one training step (the checkpoint's model and criterion, train mode) on a batch
    of the training shape (max_tokens / T sequences of T tokens from the validation set), the parameter count and
    the number of layers. Run it in a fresh process (benchmark.in_fresh_process): it loads a whole model."""
    import torch
    from benchmark import count_layers, saved_bytes  # (benchmark puts the repository on sys.path)
    import fairseq_msformer  # noqa: F401  (registers msformer_lm and the task)
    from fairseq import checkpoint_utils, utils

    if model_user_dir:  # the peers' models
        utils.import_user_module(argparse.Namespace(user_dir=model_user_dir))

    torch.set_num_threads(threads)
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([checkpoint], arg_overrides={"data": data})
    model = models[0].train()
    criterion = task.build_criterion(cfg.criterion)
    task.load_dataset("valid")
    dataset = task.dataset("valid")
    bsz = max(1, max_tokens // tokens_per_sample)
    rows = [dataset[i]["source"][:tokens_per_sample] for i in range(bsz)]
    length = min(len(r) for r in rows)
    tokens = torch.stack([r[:length] for r in rows])  # (B, T)
    target = torch.stack([dataset[i]["target"][:length] for i in range(bsz)])
    sample = {"net_input": {"src_tokens": tokens, "src_lengths": torch.full((bsz,), length)},
              "target": target, "ntokens": target.numel(), "nsentences": bsz}

    def step():
        model.zero_grad(set_to_none=True)
        loss, _, _ = criterion(model, sample)
        loss.backward()

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return {"activation_mib": saved_bytes(step, params) / 2**20,
            "params": sum(p.numel() for p in model.parameters()),
            "layers": count_layers(model)}


def measure(opts, checkpoint, model_user_dir=None):
    """activation_memory in a fresh process."""
    from benchmark import in_fresh_process

    result, error = in_fresh_process(activation_memory, checkpoint, opts.data, opts.tokens_per_sample,
                                     opts.max_tokens, opts.threads, model_user_dir)
    if error:
        raise RuntimeError(f"measuring {checkpoint} failed ({error})")
    return result


def evaluate(opts, checkpoint, split, env, model_user_dir=os.path.join(REPO, "fairseq_msformer")):
    command = [fairseq_script("fairseq-eval-lm"), opts.data, "--user-dir", model_user_dir,
               "--task", "multiscale_language_modeling", "--cpu", "--path", checkpoint, "--gen-subset", split,
               "--tokens-per-sample", str(opts.tokens_per_sample), "--context-window", str(opts.context_window),
               "--max-tokens", str(4 * opts.max_tokens), "--num-workers", "0"]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"fairseq-eval-lm failed:\n{proc.stderr[-3000:]}")
    return parse_eval(proc.stdout + proc.stderr)


def claim_save_dir(save_dir, settings, model_args):
    """fairseq-train resumes from any checkpoint_last.pt in its --save-dir: a folder left by another run of this
    model (another seed, say) would be resumed and scored as this one. Each folder records the run it holds
    (run.json); a folder that holds another run stops the suite with one line and is left as it is."""
    os.makedirs(save_dir, exist_ok=True)
    marker, claim = os.path.join(save_dir, "run.json"), {"settings": settings, "train_args": model_args}
    if os.path.exists(marker):
        held = json.load(open(marker))
        if held != claim:
            changed = sorted(k for k in set(held["settings"]) | set(settings)
                             if held["settings"].get(k) != settings.get(k)) or ["model options"]
            sys.exit(f"reproduce.py: error: {save_dir} holds checkpoints of another run of this model (differs in "
                     f"{', '.join(changed)}); remove it or pass another --save-root")
    with open(marker, "w") as f:
        json.dump(claim, f)


def run_model(opts, name, model_args, layout, env):
    save_dir = os.path.join(opts.save_root, name)
    claim_save_dir(save_dir, settings_of(opts), model_args)
    command = train_command(opts, name, model_args)
    print(f"== {name}: {layout}\n   {' '.join(shlex.quote(c) for c in command)}", flush=True)
    code, peak_mib, seconds, output = run_child(command, env)
    if code != 0:
        raise RuntimeError(f"fairseq-train failed for {name} (exit {code}):\n" + output[-3000:])
    curve, (train_seconds, tokens) = read_log(os.path.join(save_dir, "train.log"))
    checkpoint = os.path.join(save_dir, "checkpoint_last.pt")
    result = {"name": name, "layout": layout, "train_args": model_args, "curve": curve,
              "train_seconds": train_seconds, "train_tokens": tokens,
              "train_tokens_per_s": tokens / train_seconds if train_seconds else None,
              "peak_rss_mib": peak_mib, "process_seconds_last_run": seconds}
    result.update(measure(opts, checkpoint, user_dir(model_args)))
    for split in ("valid", "test"):
        result[f"{split}_ppl"], result[f"{split}_eval_tokens_per_s"] = evaluate(opts, checkpoint, split, env,
                                                                                user_dir(model_args))
    print(f"   {name}: valid ppl {result['valid_ppl']:.2f}, test ppl {result['test_ppl']:.2f}, "
          f"{result['params'] / 1e6:.2f}M params, {result['activation_mib']:.1f} MiB saved for backward, "
          f"{result['train_tokens_per_s']:.0f} train tokens/s", flush=True)
    return result


# ---------------------------------------------------------------- reporting
def ppl_at_seconds(curve, seconds):
    """Valid perplexity at `seconds` of training, linear between validations (None before the first)."""
    points = [(c["train_seconds"], c["valid_ppl"]) for c in curve]
    for (s0, p0), (s1, p1) in zip(points, points[1:]):
        if s0 <= seconds <= s1:
            return p0 + (p1 - p0) * (seconds - s0) / (s1 - s0) if s1 > s0 else p1
    return points[-1][1] if points and abs(points[-1][0] - seconds) < 1e-6 else None


def seconds_to_reach(curve, ppl):
    """Training seconds at which the in-training valid perplexity first reaches `ppl` (linear between
    validations), or None if it never does."""
    points = [(c["train_seconds"], c["valid_ppl"]) for c in curve]
    for (s0, p0), (s1, p1) in zip([(0.0, float("inf"))] + points, points):
        if p1 <= ppl:
            return s1 if p0 == float("inf") else s0 + (s1 - s0) * (p0 - ppl) / (p0 - p1)
    return None


def table(results, opts):
    base = results.get(BASELINE)
    equal_wall = min(r["train_seconds"] for r in results.values())
    peers_table = all("implementation" in r for r in results.values())
    lines = [
        f"| model | {'family | implementation | ' if peers_table else ''}layers | params | valid ppl | test ppl | "
        f"valid ppl at {equal_wall / 60:.1f} min | "
        f"min to {BASELINE}'s final valid ppl | activation MiB | peak RSS MiB | train tokens/s | eval tokens/s | "
        f"train min |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if peers_table else ""),
    ]
    target = base["curve"][-1]["valid_ppl"] if base and base["curve"] else None
    for r in results.values():
        def ratio(key):
            return f" ({r[key] / base[key]:.2f}x)" if base and r is not base else ""
        at_wall = ppl_at_seconds(r["curve"], equal_wall)
        reach = seconds_to_reach(r["curve"], target) if target else None
        lines.append(
            f"| {r['name']} | {peer_columns(r) if peers_table else ''}{r['layout']} | {r['params'] / 1e6:.2f}M | {r['valid_ppl']:.2f} | {r['test_ppl']:.2f} | "
            f"{'-' if at_wall is None else f'{at_wall:.2f}'} | {'-' if reach is None else f'{reach / 60:.1f}'} | "
            f"{r['activation_mib']:.1f}{ratio('activation_mib')} | {r['peak_rss_mib']:.0f}{ratio('peak_rss_mib')} | "
            f"{r['train_tokens_per_s']:.0f}{ratio('train_tokens_per_s')} | "
            f"{r['valid_eval_tokens_per_s']:.0f}{ratio('valid_eval_tokens_per_s')} | {r['train_seconds'] / 60:.1f} |")
    threads = "/".join(str(t) for t in sorted({r["threads"] for r in results.values()}))
    batch = max(1, opts.max_tokens // opts.tokens_per_sample)
    notes = (f"\n{opts.updates} updates of {opts.max_tokens} tokens (T = {opts.tokens_per_sample}), seed {opts.seed}, "
             f"one run per model (runs at other seeds: the per-family tables), {threads} thread(s), CPU fp32. "
             f"Perplexity: fairseq-eval-lm --tokens-per-sample {opts.tokens_per_sample} --context-window "
             f"{opts.context_window}. Activation MiB: bytes saved for backward by one training step (model + adaptive_loss) on {batch} x {opts.tokens_per_sample} tokens; "
             f"peak RSS: the fairseq-train process. Train tokens/s: training tokens / training seconds (validation "
             f"and checkpointing excluded; see read_log). Ratios are to {BASELINE}. 'valid ppl at' and 'min to': "
             f"in-training validation (no context window), linear between validations every {opts.validate_every} "
             f"updates.\n")
    return "\n".join(lines) + "\n" + notes


FAMILY_TITLES = {"bottom_up": "bottom-up", "top_down": "top-down", "retina": "retina", "vanilla": "vanilla"}


def family_tables(results):
    """One Markdown table per family (the README's): ours, the outside implementations of the same idea and
    transformer_lm; under it, our best model (lowest valid ppl) against each peer in valid perplexity and activation
    memory. The vanilla table judges our best model of any family against the vanilla peers. Our best model is the
    lowest at --seed; a verdict compares the mean valid perplexity over seeds where both models were run at the
    same several seeds (--repeat-seeds), else the two runs at --seed, and says which. Training speed is left to the
    benchmark: the runs of a suite may meet different machine loads."""
    base = results.get(BASELINE)
    ours_all = [r for r in results.values() if r["implementation"] == "ours"]
    sections = []
    for family, title in FAMILY_TITLES.items():
        rows = [r for r in results.values() if r["family"] == family]
        if not rows:
            continue
        if base is not None and base not in rows:
            rows.append(base)
        lines = [f"#### {title}", "",
                 "| model | implementation | layers | params | valid ppl | valid ppl over seeds (mean ± sd) | "
                 "test ppl | activation MiB |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            ratio = f" ({r['activation_mib'] / base['activation_mib']:.2f}x)" if base and r is not base else ""
            lines.append(f"| {r['name']} | {r['implementation']} | {r['layout']} | {r['params'] / 1e6:.2f}M | "
                         f"{r['valid_ppl']:.2f} | {over_seeds(r)} | {r['test_ppl']:.2f} | "
                         f"{r['activation_mib']:.1f}{ratio} |")
        ours = [r for r in rows if r["implementation"] == "ours"] if family != "vanilla" else ours_all
        peers = [r for r in rows if r["implementation"] != "ours" and r["name"] not in FRONTIER]
        if ours and peers:
            best = min(ours, key=lambda r: r["valid_ppl"])
            lines.append("")
            for peer in peers:
                key, basis = judged(best, peer)
                ppl, memory = best[key] / peer[key], best["activation_mib"] / peer["activation_mib"]
                lost = [name for name, won in (("perplexity", ppl < 1), ("memory", memory <= 1)) if not won]
                verdict = "**ours leads**" if not lost else f"**ours does not lead** ({', '.join(lost)})"
                if key == "valid_ppl_mean" and abs(best[key] - peer[key]) < max(best["valid_ppl_std"],
                                                                                   peer["valid_ppl_std"]):
                    verdict += ", by less than one standard deviation of the seeds: not a clear difference"
                lines.append(f"- {'our best model of any family, ' if family == 'vanilla' else ''}{best['name']} "
                             f"against {peer['name']}: valid ppl {ppl - 1:+.1%} ({basis}), activation memory "
                             f"{memory:.2f}x: {verdict}")
        sections.append("\n".join(lines))
    return "\n\n".join(sections) + "\n"


def judged(a, b):
    """(result key, what it is) a verdict between two models compares: the means over seeds when both were run at
    the same seeds, else the runs at --seed (a mean against one run would mix a seed's luck into one side only)."""
    if a.get("seeds") and a.get("seeds") == b.get("seeds"):
        return "valid_ppl_mean", f"means of {len(a['seeds'])} seeds each"
    return "valid_ppl", "one run each at --seed"


def over_seeds(r):
    if "seeds" not in r:
        return "-"
    runs = r["valid_ppls"]
    return f"{r['valid_ppl_mean']:.2f} ± {r['valid_ppl_std']:.2f} ({len(runs)} seeds: {min(runs):.2f}-{max(runs):.2f})"


def peer_columns(r):
    reused = f" (from {os.path.dirname(os.path.dirname(r['reused_from']))})" if r.get("reused_from") else ""
    return f"{r['family']} | {r['implementation']}{reused} | "


def plot_frontier(results, out):
    """Valid perplexity against activation memory and against training time: the vanilla frontier (transformer_lm
    by depth) as a line, every other model a point coloured by family, ours filled, outside implementations hollow
    (one marker per model within a family)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"vanilla": "tab:gray", "bottom_up": "tab:blue", "top_down": "tab:orange", "retina": "tab:green"}
    frontier = [results[n] for n in FRONTIER if n in results]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, key, scale, label in ((axes[0], "activation_mib", 1.0, "activation memory\n(MiB saved for backward per step)"),
                                  (axes[1], "train_seconds", 1 / 60, "training minutes\n(train steps only; machine load may differ between runs)")):
        points = sorted((r[key] * scale, r["valid_ppl"], r["layers"], r["params"]) for r in frontier)
        ax.plot([p[0] for p in points], [p[1] for p in points], "-o", color="black", lw=1.5, ms=5,
                label=f"transformer_lm at {'/'.join(str(p[2]) for p in sorted(points, key=lambda p: p[2]))} layers "
                      "(vanilla frontier)")
        for x, y, layers, params in points:
            ax.annotate(f"{layers}L, {params / 1e6:.2f}M", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        seen = {}  # (family, ours) -> models drawn so far: each gets its own marker
        for r in results.values():
            if r["name"] in FRONTIER:
                continue
            ours = r["implementation"] == "ours"
            colour = colours[r["family"]]
            index = seen[(r["family"], ours)] = seen.get((r["family"], ours), -1) + 1
            ax.scatter(r[key] * scale, r["valid_ppl"], s=55, marker="oDv^<>"[index % 6] if ours else "sPX*h8"[index % 6],
                       facecolors=colour if ours else "none", edgecolors=colour, linewidths=1.5,
                       label=f"{r['name']} ({r['family']}, {'ours' if ours else r['implementation']}, "
                             f"{r['params'] / 1e6:.2f}M params)")
        ax.set_xlabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("validation perplexity (fairseq-eval-lm)")
    axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.suptitle("Against the vanilla frontier (lower left is better): filled = ours, hollow = outside "
                 "implementations; colour = family")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "frontier.png"), dpi=110, bbox_inches="tight")
    plt.close(fig)


def palette(n):
    import matplotlib.pyplot as plt

    return plt.cm.tab20.colors if n > 10 else plt.cm.tab10.colors


def plot(results, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax in axes:
        ax.set_prop_cycle(color=palette(len(results)))
    for r in results.values():
        tokens = [c["tokens"] / 1e6 for c in r["curve"]]
        minutes = [c["train_seconds"] / 60 for c in r["curve"]]
        ppl = [c["valid_ppl"] for c in r["curve"]]
        label = f"{r['name']} ({r['layers']} layers)"
        axes[0].plot(tokens, ppl, marker="o", ms=3, label=label)
        axes[1].plot(minutes, ppl, marker="o", ms=3, label=label)
    later = [c["valid_ppl"] for r in results.values() for c in r["curve"][2:]]
    if later:  # the first validations are far above the rest: show where the models differ
        axes[0].set_ylim(min(later) * 0.97, max(later) * 1.05)
    axes[0].set_xlabel("training tokens (millions)")
    axes[1].set_xlabel("training minutes (train steps only; machine load may differ between runs)")
    axes[0].set_ylabel("validation perplexity")
    for ax in axes:
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    if len(results) > 6:  # many variants: the legend beside the panels, not over the curves
        axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    else:
        axes[0].legend()
    fig.suptitle("Learning curves (valid perplexity, fairseq's in-training validation)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "learning_curves.png"), dpi=110, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.set_prop_cycle(color=palette(len(results)))
    for r in results.values():
        ax.scatter(r["activation_mib"], r["valid_ppl"], s=40, label=f"{r['name']} ({r['layers']} layers)")
    ax.margins(0.15)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_xlabel("activation memory: MiB saved for backward per training step")
    ax.set_ylabel("validation perplexity (fairseq-eval-lm)")
    ax.grid(True, alpha=0.3)
    ax.set_title("Perplexity against memory (lower left is better)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "perplexity_vs_memory.png"), dpi=110)
    plt.close(fig)


def settings_of(opts, seed=None):
    """What a finished run must share with the current invocation to be reused (not where files go, not threads),
    at `seed` (default: --seed)."""
    settings = {k: v for k, v in vars(opts).items() if k not in ("only", "out", "save_root", "threads", "repeat_seeds",
                                                                   "remeasure_memory")}
    return settings if seed is None else {**settings, "seed": seed}


def run_name(opts, name, seed):
    """A model's run at one seed: its name at --seed, '<name>.seed<N>' at a repeat seed."""
    return name if seed == opts.seed else f"{name}.seed{seed}"


def main(argv=None):
    opts = parse_args(argv)
    runs_dir = os.path.join(opts.out, "runs")  # one file per model: several invocations can share a suite
    os.makedirs(runs_dir, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(opts.threads), MKL_NUM_THREADS=str(opts.threads),
               PYTHONUNBUFFERED="1")
    runs = [(name, seed, model) for name, model in models_of(opts).items()
            for seed in [opts.seed] + [s for s in opts.repeat_seeds if s != opts.seed]]
    start = time.perf_counter()
    for i, (model, seed, (model_args, layout)) in enumerate(runs, start=1):
        name = run_name(opts, model, seed)
        path = os.path.join(runs_dir, name + ".json")
        seed_opts = argparse.Namespace(**{**vars(opts), "seed": seed})
        settings = settings_of(seed_opts)
        old = json.load(open(path)) if os.path.exists(path) else None
        finished = old if old and old.get("settings") == settings and old.get("train_args") == model_args else None
        if opts.remeasure_memory:
            remeasure_memory(seed_opts, name, path, finished)
            continue
        if finished:
            print(f"== {name}: done earlier ({path}), skipped", flush=True)
            continue
        result = same_run_in_main(seed_opts, model, model_args)
        if result:
            print(f"== {name}: same options and settings as {result['reused_from']}, taken from there", flush=True)
        else:
            print(f"[{i}/{len(runs)}] {time.perf_counter() - start:.0f}s so far", flush=True)
            result = run_model(seed_opts, name, model_args, layout, env)
            result["threads"] = opts.threads
        result["settings"] = settings
        result["family"], result["implementation"] = family_and_implementation(model_args)
        write_json(path, result)
    report(opts)


def write_json(path, result):
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)  # a crash never leaves a half-written result


def remeasure_memory(opts, name, path, result):
    """--remeasure-memory: one finished run's activation memory (None: no finished run with these settings) measured
    again from its checkpoint, written back."""
    folder = os.path.join(opts.save_root, name)
    checkpoint, marker = os.path.join(folder, "checkpoint_last.pt"), os.path.join(folder, "run.json")
    if result is None:
        why = "no finished run"
    elif result.get("reused_from"):
        why = "taken from " + result["reused_from"]
    elif not os.path.exists(checkpoint):
        why = f"no {checkpoint}"
    elif os.path.exists(marker) and json.load(open(marker)) != {"settings": result["settings"],
                                                               "train_args": result["train_args"]}:
        why = f"{folder} holds another run"  # the run a folder holds: claim_save_dir
    else:
        before = result["activation_mib"]
        result.update(measure(opts, checkpoint, user_dir(result["train_args"])))
        print(f"== {name}: {before:.1f} -> {result['activation_mib']:.1f} MiB saved for backward", flush=True)
        write_json(path, result)
        return
    print(f"== {name}: not measured again ({why})", flush=True)


def comparable(settings):
    """Settings that decide a run's numbers: all but the suite's name; the corpus as a path inside the repository."""
    same = {k: v for k, v in settings.items() if k != "suite"}
    same["data"] = os.path.relpath(os.path.realpath(settings["data"]), REPO)
    return same


def same_run_in_main(opts, name, model_args):
    """For the peers suite: the main suite's finished run of this model at opts.seed (docs/main, or
    docs/main-seed<N> for another seed) if its options and settings are the same (then it is the same experiment),
    else None."""
    if opts.suite != "peers" or opts.quick:
        return None
    for folder in ("main", f"main-seed{opts.seed}"):
        path = os.path.join(REPO, "docs", folder, "runs", name + ".json")
        if not os.path.exists(path):
            continue
        main_run = json.load(open(path))
        if main_run.get("train_args") == model_args and comparable(main_run["settings"]) == comparable(settings_of(opts)):
            return {**main_run, "reused_from": os.path.relpath(path, REPO)}
    return None


def with_repeats(opts, result):
    """The run at --seed, plus (when the model was also run at other seeds with the same settings) "seeds" and,
    over all of them, "valid_ppls", "test_ppls", "valid_ppl_mean" and "valid_ppl_std" (sample standard deviation)."""
    name, runs = result["name"], {opts.seed: result}
    for path in sorted(glob.glob(os.path.join(opts.out, "runs", glob.escape(name) + ".seed*.json"))):
        repeat = json.load(open(path))
        seed = repeat.get("settings", {}).get("seed")
        if repeat["settings"] == settings_of(opts, seed) and repeat.get("train_args") == result["train_args"]:
            runs[seed] = repeat
    if len(runs) < 2:
        return result
    seeds = sorted(runs)
    valid = [runs[s]["valid_ppl"] for s in seeds]
    return {**result, "seeds": seeds, "valid_ppls": valid, "test_ppls": [runs[s]["test_ppl"] for s in seeds],
            "valid_ppl_mean": statistics.mean(valid), "valid_ppl_std": statistics.stdev(valid)}


def report(opts):
    """results.json, results.md and the plots from every finished model of the suite (in the suite's order)."""
    results, settings = {}, settings_of(opts)
    for name in models_of(argparse.Namespace(**{**vars(opts), "only": None})):
        path = os.path.join(opts.out, "runs", name + ".json")
        if os.path.exists(path):
            result = json.load(open(path))
            if result.get("settings") == settings:
                results[name] = with_repeats(opts, result)
    if not results:
        return
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # a peer package turns the root logger to DEBUG
    with open(os.path.join(opts.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(opts.out, "results.md"), "w") as f:
        f.write(table(results, opts))
        if all("implementation" in r for r in results.values()):
            f.write("\n### By family\n\n" + family_tables(results))
    plot(results, opts.out)
    if any(name in results for name in FRONTIER) and any("implementation" in r for r in results.values()):
        plot_frontier(results, opts.out)
    print("\n" + table(results, opts) + f"\nwritten to {opts.out}", flush=True)


if __name__ == "__main__":
    main()
