#!/usr/bin/env python
"""One prepared check of the GPU path (issue 14): mixed-precision training, speed and FLOP utilisation, torchrun.

Three stages, each run in processes of its own under a time limit: a failing or timed-out run is recorded in the
results and the next one runs; no run goes past --budget seconds from the start (one that would is skipped and
recorded so). They run in the order torchrun, bench, train (the training runs, in priority order, take what the
budget leaves) and are reported in the order below.
  train     fairseq-train on the corpus, every model in each of --precisions (in that order), then --adaptive-runs
            (adaptive input and softmax, where fairseq users report fp16 overflow): loss finite and falling, words/s
            (fairseq's wps, median of the logged intervals after the first), peak memory (CUDA: the largest
            torch.cuda.max_memory_allocated of the run; CPU: peak resident set), gradient overflows, last loss scale
  bench     scripts/experiments/benchmark.py, one run per --bench-lengths (training step: tokens/s, CUDA peak MiB,
            MiB saved for backward, ratios to transformer_lm); then one training step of each benchmarked model
            under torch.utils.flop_counter.FlopCounterMode: FLOPs per step as run (recomputation and every
            attention call included), achieved FLOP/s = FLOPs per step x steps/s, and model FLOP utilisation (MFU)
            against the device's bf16 dense peak (--peak-tflops, else the table PEAK_BF16_TFLOPS) and against a
            bf16 8192^3 matmul measured here; and the operators with the most self time in one profiled step at
            --profile-length, with the attention operators called (which SDPA kernel ran)
  torchrun  fairseq-train under torchrun with NCCL (gloo on a CPU): W ranks (default 2 where 2 GPUs are visible or on
            a CPU, else 1: NCCL refuses two ranks on one GPU) with --update-freq 2/W against one process with
            --update-freq 2, dropout off: equal losses and parameters (README, Multi-GPU)
Writes results.json and results.md (the device named in both), benchmark/T<length>/ and logs/ to --out (default
docs/gpu/<device>/). With --stages naming only some stages, the others are kept from a results.json already in --out
(same device), and so are the earlier successful training runs that are not rerun.
Exit status: 0 when every check passed, 1 when a failure was recorded (results are written either way), 2 when a
precondition is missing (one line each).

  scripts/experiments/gpu_check.sh                      # on the GPU machine (docs/gpu.md: the device tool's command)
  python scripts/experiments/gpu_check.py --device cpu --out /tmp/gpu_check   # tiny sizes, fp32, gloo (the test)
  python scripts/experiments/gpu_check.py --stages train --precisions amp     # rerun some runs into the same folder

Internal entry points (how the stages launch their processes):
  gpu_check.py fairseq-train ARGS...   fairseq-train itself, recording peak memory and the process group's backend
                                       in $GPU_CHECK_PEAK_FILE (torchrun runs this for each rank)
  gpu_check.py probe OUT LENGTHS PROFILE_LENGTH -- BENCHMARK_ARGS...
                                       FLOP counts, matmul ceiling and profiles, one JSON object per line in OUT
"""
import argparse
import ast
import datetime
import json
import math
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)
import benchmark  # noqa: E402  (builds the models the benchmark measures; its names BASELINE, FAMILIES)

USER_DIR = os.path.join(REPO, "fairseq_msformer")
MODELS = (benchmark.BASELINE, *benchmark.FAMILIES)
STAGES = ("train", "bench", "torchrun")
PRECISION_FLAGS = {"fp32": [], "fp16": ["--fp16"], "bf16": ["--bf16"], "amp": ["--amp"]}
ADAPTIVE_FLAGS = ["--adaptive-input", "--adaptive-input-cutoff", "2000,6000", "--adaptive-softmax-cutoff",
                  "2000,6000", "--tie-adaptive-weights", "--criterion", "adaptive_loss", "--ddp-backend", "legacy_ddp"]
# Dense bf16 tensor-core peaks from the vendors' datasheets (TFLOP/s, without sparsity), matched as substrings of
# torch.cuda.get_device_name(), most specific first. --peak-tflops overrides.
PEAK_BF16_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0)]
# torchrun stage: (max |loss difference|, max |parameter difference|) between the ranks and one process. fp32: the
# log's 3 decimals (a last digit rounded the other way) and float noise. Half precision: the same sums can still round
# differently where a CUDA kernel accumulates in a varying order (atomics in efficient attention's backward); a bf16
# weight near 1 moves in steps of 2^-7.
TORCHRUN_TOLERANCES = {"fp32": (1.5e-3, 1e-5), "half": (2e-2, 2e-2)}
# Sizes per device: the GPU gets the paper presets' width and full depth, the CPU a smoke-test size (the test).
PROFILES = {
    "cuda": dict(dim=512, ffn=2048, heads=8, layers=14, bottom_up_options="", top_down_options="",
                 retina_windows="64,256,-1", precisions=["bf16", "fp16", "amp"],
                 adaptive_runs=["transformer_lm:fp16", "bottom_up:fp16"], tokens_per_sample=512, max_tokens=16384,
                 updates=200, log_interval=20, lr=5e-4, warmup=50, bench_lengths=[2048, 4096, 8192],
                 profile_length=4096,
                 bench_dtype="bfloat16", repeats=3, torchrun_precision="bf16", torchrun_updates=20, run_timeout=120,
                 bench_timeout=240, budget=450),
    "cpu": dict(dim=32, ffn=64, heads=2, layers=2, bottom_up_options="scale_layers=1,1 token_layers=1",
                top_down_options="scale_layers=1,1 token_layers=1", retina_windows="8,24,-1", precisions=["fp32"],
                adaptive_runs=[], tokens_per_sample=64, max_tokens=512, updates=16, log_interval=4, lr=2e-3,
                warmup=0, bench_lengths=[128], profile_length=128, bench_dtype="float32", repeats=1,
                torchrun_precision="fp32", torchrun_updates=4, run_timeout=180, bench_timeout=180, budget=600),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__[__doc__.index("\n"):],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="where everything runs (default cuda)")
    p.add_argument("--out", help="results folder (default docs/gpu/<device name>/)")
    p.add_argument("--data", default=os.path.join(REPO, "data-bin", "pydoc"),
                   help="binarized corpus (fairseq-preprocess; default the shipped data-bin/pydoc)")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="stages to run (default all)")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS),
                   help="models trained and benchmarked (transformer_lm is the yardstick of the ratios)")
    p.add_argument("--precisions", nargs="+", choices=sorted(PRECISION_FLAGS),
                   help="fairseq-train precision flags, in order of priority (GPU: bf16 fp16 amp; CPU: fp32)")
    p.add_argument("--adaptive-runs", nargs="*", metavar="MODEL:PRECISION",
                   help="extra training runs with adaptive input and softmax (GPU: transformer_lm:fp16 bottom_up:fp16)")
    sizes = p.add_argument_group("model sizes (shared by the training and the benchmark; defaults per --device)")
    sizes.add_argument("--dim", type=int, help="model width C (GPU 512, the paper presets')")
    sizes.add_argument("--ffn", type=int, help="feed-forward inner dimension")
    sizes.add_argument("--heads", type=int, help="attention heads")
    sizes.add_argument("--layers", type=int, help="transformer_lm layers, and retina's token layers (GPU 14)")
    sizes.add_argument("--bottom-up-options", help="override msformer_lm_bottom_up_paper, e.g. 'scale_layers=6,7' "
                                                   "(GPU: none, the full 30 layers)")
    sizes.add_argument("--top-down-options", help="override msformer_lm_top_down_paper, e.g. 'scale_layers=6,7'")
    sizes.add_argument("--retina-windows", help="retina horizons per scale, W first")
    train = p.add_argument_group("train and torchrun stages")
    train.add_argument("--tokens-per-sample", type=int, help="training sample length")
    train.add_argument("--max-tokens", type=int, help="tokens per batch")
    train.add_argument("--updates", type=int, help="updates per training run (GPU 200)")
    train.add_argument("--log-interval", type=int, help="updates per logged loss / wps")
    train.add_argument("--lr", type=float, help="Adam learning rate (inverse_sqrt schedule after --warmup)")
    train.add_argument("--warmup", type=int, help="warm-up updates (0: constant rate)")
    train.add_argument("--torchrun-precision", choices=sorted(PRECISION_FLAGS), help="precision of the torchrun stage")
    train.add_argument("--torchrun-updates", type=int, help="updates compared in the torchrun stage")
    train.add_argument("--world-size", type=int, help="torchrun ranks (default: 2 with 2+ GPUs or on a CPU, else 1)")
    bench = p.add_argument_group("bench stage")
    bench.add_argument("--bench-lengths", type=int, nargs="+", help="sample lengths T (GPU: 2048 4096 8192)")
    bench.add_argument("--bench-batch-size", type=int, default=1, help="batch size of the benchmark (default 1)")
    bench.add_argument("--bench-dtype", choices=["float32", "bfloat16", "float16"],
                       help="benchmark dtype (GPU bfloat16)")
    bench.add_argument("--repeats", type=int, help="timed benchmark steps per point (median)")
    bench.add_argument("--profile-length", type=int, help="T of the profiled step (GPU 4096)")
    bench.add_argument("--peak-tflops", type=float, help="the device's bf16 dense peak in TFLOP/s (default: table)")
    limits = p.add_argument_group("time limits, seconds")
    limits.add_argument("--run-timeout", type=int, help="per fairseq-train run (and per torchrun launch)")
    limits.add_argument("--bench-timeout", type=int, help="per benchmark length, and for the FLOP probe")
    limits.add_argument("--budget", type=int, help="no run goes on past this many seconds from the start: the last is "
                                                    "cut short, later ones are skipped (GPU 450)")
    opts = p.parse_args(argv)
    for key, value in PROFILES[opts.device].items():
        if getattr(opts, key) is None:
            setattr(opts, key, value)
    for item in opts.adaptive_runs:
        model, _, precision = item.partition(":")
        if model not in MODELS or precision not in PRECISION_FLAGS:
            p.error(f"--adaptive-runs {item}: expected MODEL:PRECISION with MODEL in {MODELS} and PRECISION in "
                    f"{sorted(PRECISION_FLAGS)}")
    return opts


# ---------------------------------------------------------------- device and preconditions
def device_info(opts):
    import torch

    info = {"torch": torch.__version__, "python": platform.python_version(), "host": socket.gethostname()}
    info["fairseq"] = fairseq_version()
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                        text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None  # the device tool copies the working tree without .git
    if opts.device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(name=torch.cuda.get_device_name(0), count=torch.cuda.device_count(), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), capability=f"sm_{props.major}{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count)
        try:
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:
            info["nccl"] = None
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.split("\n")[0] or None
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    else:
        info.update(name=f"CPU {platform.processor() or platform.machine()}", count=os.cpu_count())
    return info


def fairseq_version():
    """fairseq's version as its __init__ reads it (version.py, else version.txt), without importing fairseq here
    (seconds of imports; the stages import it); None if it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("fairseq")
    if spec is None:
        return None
    folder = spec.submodule_search_locations[0]
    for name, pattern in (("version.py", r"__version__\s*=\s*['\"]([^'\"]+)"), ("version.txt", r"(\S+)")):
        try:
            with open(os.path.join(folder, name)) as f:
                match = re.search(pattern, f.read())
        except OSError:
            continue
        if match:
            return match.group(1)
    return "unknown version"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def check_preconditions(opts):
    """One line per missing precondition (empty: all good)."""
    import torch

    problems = []
    if opts.device == "cuda" and not torch.cuda.is_available():
        problems.append(f"--device cuda, but torch {torch.__version__} sees no CUDA device "
                        f"(CUDA build: {torch.version.cuda}); use --device cpu for the CPU check")
    for name in ("dict.txt", "train.bin", "train.idx"):
        if not os.path.exists(os.path.join(opts.data, name)):
            problems.append(f"corpus incomplete: {os.path.join(opts.data, name)} is missing "
                            "(rebuild with scripts/data/prepare_pydoc.sh)")
            break
    if fairseq_version() is None:
        problems.append(f"fairseq is not installed for {sys.executable}; on the GPU machine start this through "
                        "scripts/experiments/gpu_check.sh, which installs the wheels carried in .whl/")
    if "torchrun" in opts.stages and not torch.distributed.is_available():
        problems.append("torch.distributed is not available in this torch build (torchrun stage)")
    return problems


def bf16_peak(opts, info):
    """(TFLOP/s or None, where it came from)."""
    if opts.peak_tflops:
        return opts.peak_tflops, "--peak-tflops"
    for key, tflops in PEAK_BF16_TFLOPS:
        if opts.device == "cuda" and key in info.get("name", ""):
            return tflops, f"datasheet, dense bf16 ({key})"
    return None, f"unknown for {info.get('name')}: pass --peak-tflops"


# ---------------------------------------------------------------- running processes
class Runner:
    """Runs child processes under a per-run time limit and the overall --budget, logging each to logs/."""

    def __init__(self, opts):
        self.opts, self.start = opts, time.perf_counter()
        self.logs = os.path.join(opts.out, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.scratch = tempfile.mkdtemp(prefix="gpu_check-")  # checkpoints: compared, then removed (main)

    def elapsed(self):
        return time.perf_counter() - self.start

    def run(self, name, cmd, timeout, env=None):
        """-> dict(returncode, seconds, log, error); error is None on success. The log file is logs/<name>.log."""
        left = self.opts.budget - self.elapsed()
        if left < 10:
            return dict(returncode=None, seconds=0.0, log="", error=f"skipped: the {self.opts.budget} s budget was "
                                                                     f"spent ({self.elapsed():.0f} s)")
        timeout = min(timeout, int(left))  # the budget bounds the whole check, the last run included
        print(f"[{self.elapsed():5.0f}s] {name} ...", flush=True)
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        started = time.perf_counter()
        # a session of its own, so that a timeout kills the whole tree (torchrun's ranks, the benchmark's spawned
        # children), not just the launcher: an orphan would hold the GPU through the later runs
        proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=full_env, start_new_session=True)
        try:
            log, _ = proc.communicate(timeout=timeout)
            code = proc.returncode
            error = None if code == 0 else f"exit code {code}: {last_error_line(log)}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
            code, error = None, f"timed out after {timeout} s"
        finally:
            if proc.poll() is None:  # interrupted (Ctrl-C): take the tree down with us
                os.killpg(proc.pid, signal.SIGKILL)
        seconds = time.perf_counter() - started
        with open(os.path.join(self.logs, f"{name}.log"), "w") as f:
            f.write(" ".join(map(str, cmd)) + "\n\n" + log)
        print(f"[{self.elapsed():5.0f}s] {name}: {'ok' if error is None else error} ({seconds:.0f} s)", flush=True)
        return dict(returncode=code, seconds=round(seconds, 1), log=log, error=error)


def last_error_line(log: str) -> str:
    """The last line that names an error (a traceback's last line), else the last line."""
    lines = [line for line in log.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if re.search(r"(Error|Exception|error:|Killed)", line):
            return line.strip()[:300]
    return lines[-1].strip()[:300] if lines else "(no output)"


# ---------------------------------------------------------------- fairseq-train command lines
def model_flags(name, opts, adaptive=False):
    """The fairseq-train flags of one model, the same model as benchmark.build builds from the same sizes."""
    sizes = ["--decoder-embed-dim", opts.dim, "--decoder-ffn-embed-dim", opts.ffn,
             "--decoder-attention-heads", opts.heads]
    if name == benchmark.BASELINE:
        flags = ["--arch", "transformer_lm", "--decoder-layers", opts.layers, "--decoder-input-dim", opts.dim,
                 "--decoder-output-dim", opts.dim, "--decoder-normalize-before", *sizes]
    elif name == "retina":
        flags = ["--arch", "msformer_lm_retina", "--token-layers", opts.layers, "--retina-windows",
                 opts.retina_windows, *sizes]
    else:
        arch, overrides = {"bottom_up": ("msformer_lm_bottom_up_paper", opts.bottom_up_options),
                           "top_down": ("msformer_lm_top_down_paper", opts.top_down_options)}[name]
        flags = ["--arch", arch, *sizes]
        for item in overrides.split():  # 'scale_layers=6,7' -> --scale-layers 6,7
            key, _, value = item.partition("=")
            flags += [f"--{key.replace('_', '-')}", value]
    return flags + (ADAPTIVE_FLAGS if adaptive else [])


def train_flags(opts, save_dir, updates, log_interval):
    schedule = (["--lr-scheduler", "inverse_sqrt", "--warmup-updates", opts.warmup, "--warmup-init-lr", "1e-7"]
                if opts.warmup else [])
    return [opts.data, "--user-dir", USER_DIR, "--task", "multiscale_language_modeling",
            "--tokens-per-sample", opts.tokens_per_sample, "--max-tokens", opts.max_tokens, "--optimizer", "adam",
            "--adam-betas", "(0.9, 0.98)", "--lr", opts.lr, *schedule, "--max-update", updates,
            "--disable-validation", "--num-workers", "0", "--seed", "1", "--log-format", "json",
            "--log-interval", log_interval, "--save-dir", save_dir, "--no-epoch-checkpoints"]


def device_flags(opts):
    # one process per run: on a multi-GPU machine fairseq would otherwise spawn a rank per GPU
    return ["--cpu"] if opts.device == "cpu" else ["--distributed-world-size", "1"]


SELF = [sys.executable, os.path.abspath(__file__)]
FAIRSEQ_TRAIN = [*SELF, "fairseq-train"]  # fairseq-train through fairseq_train_main below


def parse_train_log(log: str):
    """fairseq's --log-format json train_inner lines -> [{update, loss, wps, loss_scale}], and overflow count."""
    points = []
    for line in log.splitlines():
        match = re.search(r"\| train_inner \| (\{.*\})\s*$", line)
        if match:
            record = json.loads(match.group(1))
            points.append(dict(update=int(record["num_updates"]), loss=float(record["loss"]),
                               wps=float(record["wps"]), loss_scale=float(record["loss_scale"])
                               if "loss_scale" in record else None))
    overflows = len(re.findall(r"gradient overflow detected|AMP: overflow detected", log))
    return points, overflows


def remove_stale(*paths):
    """Files an earlier check left in --out, which a failing run would otherwise seem to have written."""
    for path in paths:
        if os.path.exists(path):
            os.remove(path)


def read_peak(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------- stage: train
def stage_train(opts, runner, earlier=None):
    """Runs in order of priority (every model in the first precision, then the next precision, then the adaptive
    runs), so that a spent budget skips the last. Successful runs of an `earlier` train stage that are not rerun
    are kept."""
    runs = [(m, p, False) for p in opts.precisions for m in opts.models]
    runs += [(m, p, True) for m, _, p in (r.partition(":") for r in opts.adaptive_runs)]
    results = [r for r in (earlier or {}).get("runs", [])
               if not r["error"] and (r["model"], r["precision"], r["adaptive"]) not in runs]
    for model, precision, adaptive in runs:
        name = f"train-{model}{'-adaptive' if adaptive else ''}-{precision}"
        peak_file = os.path.join(runner.logs, f"{name}.peak.json")
        remove_stale(peak_file)
        cmd = [*FAIRSEQ_TRAIN, *train_flags(opts, runner.scratch, opts.updates, opts.log_interval), "--no-save",
               *device_flags(opts), *model_flags(model, opts, adaptive), *PRECISION_FLAGS[precision]]
        run = runner.run(name, cmd, opts.run_timeout, env={"GPU_CHECK_PEAK_FILE": peak_file})
        points, overflows = parse_train_log(run["log"])
        losses = [p["loss"] for p in points]
        wps = [p["wps"] for p in points[1:]] or [p["wps"] for p in points]  # the first interval holds the warm-up
        result = dict(model=model, precision=precision, adaptive=adaptive, seconds=run["seconds"], error=run["error"],
                      losses=[[p["update"], p["loss"]] for p in points],
                      finite=bool(losses) and all(math.isfinite(x) for x in losses),
                      falling=len(losses) >= 2 and losses[-1] < losses[0],
                      wps=statistics.median(wps) if wps else None,
                      peak_mib=read_peak(peak_file).get("peak_mib"), overflows=overflows,
                      loss_scale=points[-1]["loss_scale"] if points else None)
        if run["error"] is None and not (result["finite"] and result["falling"]):
            result["error"] = f"loss not finite and falling: {losses}"
        results.append(result)
    return dict(runs=results)


# ---------------------------------------------------------------- stage: bench
def benchmark_argv(opts, length, out):
    return ["--models", *opts.models, "--modes", "train", "--lengths", length, "--retina-lengths",
            "--generate-lengths", length, "--dim", opts.dim, "--ffn", opts.ffn, "--heads", opts.heads,
            "--layers", opts.layers, "--bottom-up-options", opts.bottom_up_options, "--top-down-options",
            opts.top_down_options, "--retina-windows", opts.retina_windows, "--vocab", vocab_words(opts),
            "--batch-size", opts.bench_batch_size, "--repeats", opts.repeats, "--device", opts.device,
            "--dtype", opts.bench_dtype, "--target-length", length, "--out", out]


def vocab_words(opts):
    """Words of the corpus dictionary (benchmark.py adds fairseq's 4 specials), so both stages build one model."""
    with open(os.path.join(opts.data, "dict.txt"), encoding="utf-8") as f:
        return sum(1 for _ in f)


def benchmark_results(out, log):
    """benchmark.json's results, else those its progress lines printed before it stopped ('[3/4, 12s] {...}')."""
    try:
        with open(os.path.join(out, "benchmark.json")) as f:
            return json.load(f)["results"]
    except (OSError, ValueError, KeyError):
        found = []
        for match in re.finditer(r"^\[\d+/\d+, \d+s\] (\{.*\})$", log, flags=re.M):
            try:
                found.append(ast.literal_eval(match.group(1)))
            except (ValueError, SyntaxError):
                pass
        return found


def stage_bench(opts, runner, info):
    lengths, points = {}, []
    for length in opts.bench_lengths:
        out = os.path.join(opts.out, "benchmark", f"T{length}")
        remove_stale(os.path.join(out, "benchmark.json"))
        run = runner.run(f"bench-T{length}", [sys.executable, os.path.join(HERE, "benchmark.py"),
                                              *benchmark_argv(opts, length, out)], opts.bench_timeout)
        found = [r for r in benchmark_results(out, run["log"]) if r.get("mode") == "train"]
        lengths[length] = dict(seconds=run["seconds"], error=run["error"])
        points += [{k: r.get(k) for k in ("model", "length", "tokens_per_s", "peak_mib", "saved_mib", "params",
                                          "layout", "error")} for r in found]
    measured = {(p["model"], p["length"]) for p in points if p.get("tokens_per_s")}
    probe_out = os.path.join(runner.logs, "probe.jsonl")
    remove_stale(probe_out)
    probe_lengths = sorted({length for _, length in measured})
    probe = dict(error="no benchmark point to count")
    if probe_lengths:
        run = runner.run("probe", [*SELF, "probe", probe_out, ",".join(map(str, probe_lengths)),
                                   opts.profile_length, "--",
                                   *benchmark_argv(opts, probe_lengths[0], os.devnull)], opts.bench_timeout)
        probe = dict(seconds=run["seconds"], error=run["error"])
    records = []
    if os.path.exists(probe_out):
        with open(probe_out) as f:
            records = [json.loads(line) for line in f if line.strip()]
    flops = {(r["model"], r["length"]): r for r in records if r["kind"] == "flops"}
    profiles = [r for r in records if r["kind"] == "profile"]
    probe["errors"] = [f"{r['model']} T={r['length']}: {r['error']}" for r in records if r["kind"] == "error"]
    matmul = next((r["tflops"] for r in records if r["kind"] == "matmul"), None)
    peak, peak_source = bf16_peak(opts, info)
    baseline = {p["length"]: p for p in points if p["model"] == benchmark.BASELINE}
    for p in points:
        counted = flops.get((p["model"], p["length"]))
        base = baseline.get(p["length"], {})
        p["ratios"] = {k: p[k] / base[k] for k in ("tokens_per_s", "peak_mib", "saved_mib")
                       if p.get(k) and base.get(k) and p["model"] != benchmark.BASELINE}
        if counted and p.get("tokens_per_s"):
            steps_per_s = p["tokens_per_s"] / (opts.bench_batch_size * p["length"])
            p["gflop_per_step"] = counted["flops"] / 1e9
            p["tflops"] = counted["flops"] * steps_per_s / 1e12
            p["mfu"] = p["tflops"] / peak if peak else None
            p["of_matmul"] = p["tflops"] / matmul if matmul else None
            p["flops_by_op"] = counted["by_op"]
    return dict(lengths=lengths, points=points, probe=probe, profiles=profiles, matmul_tflops=matmul,
                peak_tflops=peak, peak_source=peak_source, batch_size=opts.bench_batch_size, dtype=opts.bench_dtype)


def probe_main(argv):
    """`gpu_check.py probe OUT LENGTHS PROFILE_LENGTH -- BENCHMARK_ARGS`: for each model and length, the FLOPs of one
    training step as benchmark.py runs it (FlopCounterMode counts what runs: recomputation, every attention call);
    on CUDA a bf16 matmul ceiling; one profiled step per model at PROFILE_LENGTH. Appends JSON lines to OUT as it
    goes, so a crash or a timeout keeps what was counted."""
    import torch

    count_cpu_attention(torch)
    out, lengths, profile_length = argv[0], [int(x) for x in argv[1].split(",")], int(argv[2])
    opts = benchmark.parse_args(argv[argv.index("--") + 1:])
    device = opts.device

    def emit(record):
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")

    if device == "cuda":
        try:
            emit(dict(kind="matmul", tflops=matmul_tflops(torch)))
        except Exception as e:  # the MFU against the datasheet peak does not need it
            emit(dict(kind="error", model="matmul ceiling", length=8192, error=f"{type(e).__name__}: {str(e)[:300]}"))
    for length in sorted(set(lengths) | {profile_length}):
        for name in opts.models:
            try:
                probe_model(torch, opts, name, length, length in lengths, length == profile_length, emit)
            except Exception as e:  # out of memory, say: the other models and lengths are still counted
                emit(dict(kind="error", model=name, length=length, error=f"{type(e).__name__}: {str(e)[:300]}"))
            if device == "cuda":
                torch.cuda.empty_cache()


def probe_model(torch, opts, name, length, count, profile, emit):
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(opts.seed)
    # benchmark.measure's table size (it covers every length of the run; only learned positions read it)
    max_positions = max([*opts.lengths, *opts.retina_lengths, *opts.generate_lengths]) + opts.generate_steps + 16
    max_positions = max(max_positions, length + 16)
    task = benchmark.fake_task(opts.vocab, max_positions)
    model = benchmark.build(name, opts, task, max_positions)[0]
    model = model.to(device=opts.device, dtype=getattr(torch, opts.dtype)).train()
    vocab = task.source_dictionary
    tokens = torch.randint(vocab.nspecial, len(vocab), (opts.batch_size, length + 1), device=opts.device)

    def step():  # benchmark.measure's training step
        model.zero_grad(set_to_none=True)
        logits = model(tokens[:, :-1])[0].float()
        F.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1)).backward()

    if count:
        counter = FlopCounterMode(display=False)
        with counter:
            step()
        by_op = {str(op): n for op, n in counter.get_flop_counts().get("Global", {}).items()}
        emit(dict(kind="flops", model=name, length=length, flops=counter.get_total_flops(), by_op=by_op))
    if profile:
        step()  # warm-up outside the profile
        emit(dict(kind="profile", model=name, length=length, **profile_step(torch, step, opts.device)))


def count_cpu_attention(torch):
    """FlopCounterMode counts the CUDA SDPA kernels (flash, efficient, cudnn; the math fallback as its bmm calls)
    but not the CPU's flash kernel, which would leave attention out of the CPU figures: count it the same way."""
    from torch.utils import flop_counter

    aten = torch.ops.aten
    forward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if forward is None or forward in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(forward)
    def cpu_flash(query, key, value, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_flop_count(query, key, value)

    @flop_counter.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def cpu_flash_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


def matmul_tflops(torch, n=8192, repeats=10):
    """bf16 n x n x n matmul rate on this GPU (random data, mean of `repeats` after 3 warm-ups): the practical
    ceiling next to the datasheet peak."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (begin.elapsed_time(end) / 1e3) / 1e12


def profile_step(torch, step, device, top=12):
    """One step under torch.profiler: the operators with the most self time on the device (CPU: on the CPU), and
    every attention operator called (which SDPA kernel ran: flash, efficient, cudnn or the math fallback)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()

    def self_us(e):
        if device == "cuda":
            return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        return e.self_cpu_time_total

    ops = [e for e in events if e.key.startswith("aten::")]
    total = sum(self_us(e) for e in ops) or 1
    ranked = sorted(ops, key=self_us, reverse=True)[:top]
    attention = {e.key: e.count for e in ops if "attention" in e.key or "scaled_dot_product" in e.key}
    return dict(total_ms=total / 1e3, top=[dict(op=e.key, ms=self_us(e) / 1e3, share=self_us(e) / total,
                                                calls=e.count) for e in ranked], attention=attention)


# ---------------------------------------------------------------- stage: torchrun
def stage_torchrun(opts, runner):
    import torch

    world = opts.world_size or (2 if opts.device == "cpu" or torch.cuda.device_count() >= 2 else 1)
    model = next((m for m in opts.models if m != benchmark.BASELINE), opts.models[0])
    backend = "gloo" if opts.device == "cpu" else "nccl"
    common = [*model_flags(model, opts), *PRECISION_FLAGS[opts.torchrun_precision], "--dropout", "0",
              "--no-save-optimizer-state"]  # the parameters are compared; Adam's state would be GBs at paper size
    saves = {k: os.path.join(runner.scratch, f"torchrun-{k}") for k in ("ranks", "single")}
    peak_file = os.path.join(runner.logs, "torchrun-ranks.peak.json")
    remove_stale(*(f"{peak_file}.rank{r}" for r in range(world)))
    ranks_flags = [*train_flags(opts, saves["ranks"], opts.torchrun_updates, 1), *common,
                   "--update-freq", 2 // world, "--distributed-world-size", world, "--distributed-backend", backend]
    if opts.device == "cpu":
        # fairseq's own torchrun inference takes rank % torch.cuda.device_count(): given the init method, it
        # takes each rank from --distributed-rank, which the fairseq-train entry point reads from torchrun's RANK
        ranks_flags += ["--cpu", "--ddp-backend", "legacy_ddp", "--distributed-init-method", "env://",
                        "--distributed-no-spawn"]
    elif world == 1:
        # fairseq treats world size 1 as a single process and would never create the NCCL group
        ranks_flags += ["--distributed-init-method", "env://", "--distributed-no-spawn"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", world,
                os.path.abspath(__file__), "fairseq-train"]
    ranks = runner.run("torchrun-ranks", [*torchrun, *ranks_flags], opts.run_timeout,
                       env={"GPU_CHECK_PEAK_FILE": peak_file})
    # the same thread count as torchrun gives each rank, so that CPU matmuls sum in the same order
    single = runner.run("torchrun-single", [*FAIRSEQ_TRAIN, *train_flags(opts, saves["single"], opts.torchrun_updates,
                                                                        1), *common, "--update-freq", 2,
                                            *device_flags(opts)], opts.run_timeout,
                        env={"OMP_NUM_THREADS": "1"} if opts.device == "cpu" else None)
    rank_losses = [p["loss"] for p in parse_train_log(ranks["log"])[0]]
    single_losses = [p["loss"] for p in parse_train_log(single["log"])[0]]
    rank0 = read_peak(peak_file + ".rank0")
    result = dict(world_size=world, backend=rank0.get("backend"), requested_backend=backend, model=model,
                  precision=opts.torchrun_precision, ranks_error=ranks["error"], single_error=single["error"],
                  seconds=round(ranks["seconds"] + single["seconds"], 1), rank_losses=rank_losses,
                  single_losses=single_losses,
                  init_logged="distributed init (rank 0): env://" in ranks["log"], peak_mib=rank0.get("peak_mib"))
    if rank_losses and len(rank_losses) == len(single_losses):
        result["max_loss_difference"] = max(abs(a - b) for a, b in zip(rank_losses, single_losses))
    try:
        result["max_parameter_difference"] = checkpoint_difference(saves["ranks"], saves["single"])
    except (OSError, RuntimeError, KeyError, AssertionError) as e:
        result["max_parameter_difference"] = None
        result["parameter_error"] = f"{type(e).__name__}: {e}"
    loss_tolerance, tolerance = TORCHRUN_TOLERANCES["fp32" if opts.torchrun_precision == "fp32" else "half"]
    result.update(loss_tolerance=loss_tolerance, parameter_tolerance=tolerance)
    problems = [e for e in (ranks["error"], single["error"]) if e]
    if not problems:
        if result["backend"] != backend or not result["init_logged"]:
            problems.append(f"the ranks did not run a {backend} process group (saw {result['backend']})")
        if len(rank_losses) != opts.torchrun_updates or len(single_losses) != opts.torchrun_updates:
            problems.append(f"expected {opts.torchrun_updates} logged updates each, got {len(rank_losses)} and "
                            f"{len(single_losses)}")
        elif result["max_loss_difference"] > loss_tolerance:
            problems.append(f"losses differ by {result['max_loss_difference']:.3g} (tolerance {loss_tolerance})")
        if result["max_parameter_difference"] is None or result["max_parameter_difference"] > tolerance:
            problems.append(f"parameters differ by {result['max_parameter_difference']} (tolerance {tolerance})")
    result["error"] = "; ".join(problems) or None
    return result


def checkpoint_difference(dir_a, dir_b):
    """max |a - b| over the parameters of two checkpoint_last.pt (fairseq's `_float_tensor` markers left out)."""
    import torch

    def weights(folder):
        state = torch.load(os.path.join(folder, "checkpoint_last.pt"), map_location="cpu", weights_only=False)
        return {k: v for k, v in state["model"].items() if not k.endswith("_float_tensor")}

    a, b = weights(dir_a), weights(dir_b)
    assert a.keys() == b.keys(), "the checkpoints hold different parameters"
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


# ---------------------------------------------------------------- the fairseq-train entry point
def fairseq_train_main(argv):
    """fairseq-train with peak memory and the process group's backend written to $GPU_CHECK_PEAK_FILE at exit.

    fairseq's trainer resets CUDA's peak counter after every update (it logs gb_free per update), so the peak of the
    whole run is the largest value seen before any reset."""
    import torch
    import torch.distributed as dist
    from fairseq_cli.train import cli_main

    peak = [0]
    if torch.cuda.is_available():
        reset = torch.cuda.reset_peak_memory_stats

        def reset_keeping_peak(device=None):
            peak[0] = max(peak[0], torch.cuda.max_memory_allocated(device))
            reset(device)

        torch.cuda.reset_peak_memory_stats = reset_keeping_peak
    rank = os.environ.get("RANK")
    if rank is not None and "--distributed-init-method" in argv and "--distributed-rank" not in argv:
        argv = [*argv, "--distributed-rank", rank]
    sys.argv = ["fairseq-train", *argv]
    try:
        cli_main()
    finally:
        path = os.environ.get("GPU_CHECK_PEAK_FILE")
        if path:
            if torch.cuda.is_available():
                peak_mib = max(peak[0], torch.cuda.max_memory_allocated()) / 2**20
            else:
                peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            record = dict(peak_mib=peak_mib, backend=dist.get_backend() if dist.is_initialized() else None,
                          world_size=dist.get_world_size() if dist.is_initialized() else 1)
            with open(path if rank is None else f"{path}.rank{rank}", "w") as f:
                json.dump(record, f)


# ---------------------------------------------------------------- report
def fmt(value, spec=".0f", none="-"):
    return none if value is None else format(value, spec)


def markdown(results):
    info, opts = results["device"], results["options"]
    cuda = f", CUDA {info.get('cuda')}, cuDNN {info.get('cudnn')}, NCCL {info.get('nccl')}, driver " \
           f"{info.get('driver')}, {info.get('capability')}, {info.get('memory_gib')} GiB" if "cuda" in info else ""
    out = [f"# GPU check: {info['name']}\n",
           f"{info['name']} (x{info.get('count')}){cuda}; torch {info['torch']}, fairseq {info.get('fairseq')}, "
           f"Python {info['python']}; commit {info.get('commit')}; {results['started']}, {results['wall_s']:.0f} s "
           f"in all. Produced by `{results['command']}` (scripts/experiments/gpu_check.py). One run of each "
           f"point: timings are single measurements.\n"]
    failures = results["failures"]
    out.append("**Failures**: " + ("none" if not failures else "") + "".join(f"\n- {f}" for f in failures) + "\n")
    stages = {name: stage for name, stage in results["stages"].items() if not stage.get("crashed")}
    if "train" in stages:
        out.append(f"## fairseq-train, {opts['updates']} updates of {opts['max_tokens']} tokens (T = "
                   f"{opts['tokens_per_sample']}), width {opts['dim']}\n\n| model | precision | loss first -> last | "
                   "finite, falling | words/s | peak MiB | overflows | last loss scale | s | error |\n"
                   "|---|---|---|---|---|---|---|---|---|---|")
        for r in stages["train"]["runs"]:
            losses = r["losses"]
            loss = f"{losses[0][1]:.2f} -> {losses[-1][1]:.2f}" if losses else "-"
            out.append(f"| {r['model']}{' adaptive' if r['adaptive'] else ''} | {r['precision']} | {loss} | "
                       f"{'yes' if r['finite'] else 'NO'}, {'yes' if r['falling'] else 'NO'} | {fmt(r['wps'])} | "
                       f"{fmt(r['peak_mib'])} | {r['overflows']} | {fmt(r['loss_scale'], 'g')} | {r['seconds']:.0f} | "
                       f"{r['error'] or ''} |")
        out.append("")
    if "bench" in stages:
        b = stages["bench"]
        out.append(f"## Training step, {b['dtype']}, batch {b['batch_size']} (scripts/experiments/benchmark.py)\n\n"
                   f"Ratios to transformer_lm in brackets. TFLOP/s = FLOPs of one step (FlopCounterMode) x steps/s; "
                   f"MFU against {fmt(b['peak_tflops'], '.0f')} TFLOP/s ({b['peak_source']}); 'of matmul' against a "
                   f"bf16 8192^3 matmul measured here ({fmt(b['matmul_tflops'], '.0f')} TFLOP/s).\n\n"
                   "| T | model | tokens/s | peak MiB | saved MiB | GFLOP/step | TFLOP/s | MFU | of matmul |\n"
                   "|---|---|---|---|---|---|---|---|---|")

        def cell(p, key, spec):
            ratio = p["ratios"].get(key)
            return fmt(p.get(key), spec) + (f" ({ratio:.2f}x)" if ratio else "")

        for p in sorted(b["points"], key=lambda p: (p["length"], MODELS.index(p["model"]))):
            out.append(f"| {p['length']} | {p['model']} | {cell(p, 'tokens_per_s', '.0f')} | "
                       f"{cell(p, 'peak_mib', '.0f')} | {cell(p, 'saved_mib', '.0f')} | "
                       f"{fmt(p.get('gflop_per_step'), '.1f')} | {fmt(p.get('tflops'), '.2f')} | "
                       f"{fmt(p.get('mfu'), '.1%')} | {fmt(p.get('of_matmul'), '.1%')} |")
        errors = [f"T={t}: {v['error']}" for t, v in b["lengths"].items() if v["error"]]
        errors += [f"probe: {b['probe']['error']}"] if b["probe"].get("error") else []
        errors += [f"probe {e}" for e in b["probe"].get("errors", [])]
        out.append("".join(f"\n- {e}" for e in errors))
        for prof in b["profiles"]:
            out.append(f"\n**{prof['model']}, T = {prof['length']}: operators by self time in one step "
                       f"({prof['total_ms']:.1f} ms in aten operators)**; attention calls: "
                       f"{', '.join(f'{k} x{v}' for k, v in prof['attention'].items()) or 'none'}\n\n"
                       "| operator | ms | share | calls |\n|---|---|---|---|")
            out += [f"| {t['op']} | {t['ms']:.2f} | {t['share']:.1%} | {t['calls']} |" for t in prof["top"]]
        out.append("")
    if "torchrun" in stages:
        t = stages["torchrun"]
        out.append(f"## torchrun, {t['requested_backend']}\n\n{t['world_size']} rank(s) with --update-freq "
                   f"{2 // t['world_size']} against one process with --update-freq 2: {t['model']}, "
                   f"{t['precision']}, {len(t['rank_losses'])} updates, dropout 0. Process group backend seen: "
                   f"{t['backend']}; max |loss difference| {fmt(t.get('max_loss_difference'), '.3g')}, max "
                   f"|parameter difference| {fmt(t.get('max_parameter_difference'), '.3g')} (tolerances "
                   f"{t['loss_tolerance']:g} and {t['parameter_tolerance']:g}); rank 0 peak {fmt(t['peak_mib'])} MiB; "
                   f"{t['seconds']:.0f} s. "
                   f"Error: {t['error'] or 'none'}." + (
                       " With one rank fairseq does not wrap the model in DistributedDataParallel: the process group's "
                       "set-up and fairseq's first all_reduce ran over it, gradient all-reduce needs 2 GPUs."
                       if t["world_size"] == 1 else "") + "\n")
    return "\n".join(out)


def failures_of(stages):
    found = [f"{name}: crashed: {stage['error']}" for name, stage in stages.items() if stage.get("crashed")]
    stages = {name: stage for name, stage in stages.items() if not stage.get("crashed")}
    for r in stages.get("train", {}).get("runs", []):
        if r["error"]:
            found.append(f"train {r['model']}{' adaptive' if r['adaptive'] else ''} {r['precision']}: {r['error']}")
    bench = stages.get("bench")
    if bench:
        found += [f"bench T={t}: {v['error']}" for t, v in bench["lengths"].items() if v["error"]]
        found += [f"bench {p['model']} T={p['length']}: {p['error']}" for p in bench["points"] if p.get("error")]
        found += [f"bench probe: {bench['probe']['error']}"] if bench["probe"].get("error") else []
        found += [f"bench probe {e}" for e in bench["probe"].get("errors", [])]
    if stages.get("torchrun", {}).get("error"):
        found.append(f"torchrun: {stages['torchrun']['error']}")
    return found


def earlier_stages(opts, info):
    """The stages of a results.json already in --out, if it was written on the same device; else {}."""
    try:
        with open(os.path.join(opts.out, "results.json")) as f:
            earlier = json.load(f)
    except (OSError, ValueError):
        return {}
    return earlier.get("stages", {}) if earlier.get("device", {}).get("name") == info["name"] else {}


def main(argv=None):
    opts = parse_args(argv)
    problems = check_preconditions(opts)
    for line in problems:
        print(f"gpu_check: {line}", file=sys.stderr)
    if problems:
        sys.exit(2)
    info = device_info(opts)
    opts.out = os.path.abspath(opts.out or os.path.join(REPO, "docs", "gpu", slug(info["name"])))
    os.makedirs(opts.out, exist_ok=True)
    print(f"gpu_check on {info['name']}: stages {' '.join(opts.stages)}, budget {opts.budget} s, out {opts.out}",
          flush=True)
    runner, started = Runner(opts), datetime.datetime.now().isoformat(timespec="seconds")
    earlier = earlier_stages(opts, info)
    stages = {k: v for k, v in earlier.items() if k not in opts.stages}  # a rerun of some stages keeps the others
    calls = {"torchrun": lambda: stage_torchrun(opts, runner),
             "bench": lambda: stage_bench(opts, runner, info),
             "train": lambda: stage_train(opts, runner, earlier.get("train"))}
    # the short single-shot stages first; the training runs, in priority order, take what the budget leaves
    for name in ("torchrun", "bench", "train"):
        if name in opts.stages:
            try:
                stages[name] = calls[name]()
            except Exception as e:  # a bug of this script in one stage must not cost the others their machine time
                traceback.print_exc()
                stages[name] = dict(error=f"{type(e).__name__}: {e}", crashed=True)
    shutil.rmtree(runner.scratch, ignore_errors=True)
    results = dict(device=info, started=started,
                   wall_s=runner.elapsed(), command=shlex.join(["gpu_check.py", *(argv or sys.argv[1:])]),
                   options={k: v for k, v in vars(opts).items()}, stages=stages, failures=failures_of(stages))
    with open(os.path.join(opts.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    report = markdown(results)
    with open(os.path.join(opts.out, "results.md"), "w") as f:
        f.write(report)
    print("\n" + report + f"\nwritten: results.json, results.md in {opts.out}", flush=True)
    if results["failures"]:
        print(f"gpu_check: {len(results['failures'])} failure(s), listed in results.md", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["fairseq-train"]:
        fairseq_train_main(sys.argv[2:])
    elif sys.argv[1:2] == ["probe"]:
        probe_main(sys.argv[2:])
    else:
        main()
