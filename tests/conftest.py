"""Shared helpers and fixtures of the suite.

In-process (no fairseq CLI): build_model builds a small msformer_lm as fairseq does; random_tokens, log_probs,
generated_log_probs and sampled_log_probs score it.

fairseq's console scripts: fairseq_cli(name, *args) runs fairseq-train, -eval-lm, -generate, -interactive,
-preprocess or -hydra-train with this interpreter's environment and returns a CompletedProcess. Each run is a new
process forked from tests/cli_server.py, which has imported torch and fairseq once for the whole session (a plain
start spends ~4 CPU seconds on those imports; the suite makes ~100). MSFORMER_TESTS_SUBPROCESS=1 starts every run
as a plain subprocess instead, as does any test whose environment differs from the server's (say, PYTHONPATH).
train(corpus, save_dir, FAMILIES[family], updates, *flags) is fairseq-train with the CLI tests' settings.

Session fixtures any test file may use:
    corpus            the shipped corpus, data-bin/pydoc
    small_corpus      its first 400 train, 40 valid and 40 test lines, same dictionary (corpus_subset makes others)
    tiny_checkpoint   tiny_checkpoint(family) -> TinyCheckpoint(save_dir, path, log): a tiny model of
                      FAMILIES[family] ("bottom_up", "bottom_up_adaptive", "top_down_adaptive", "retina") trained
                      by fairseq-train for TINY_UPDATES updates on the shipped corpus, validated, once per session
                      for every test that only needs "a trained checkpoint". Shared: never write into save_dir
                      (copy it first, as test_cli's resume test does).
"""
import argparse
import atexit
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import NamedTuple

import pytest
import torch
from fairseq.data import data_utils, indexed_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_DIR = os.path.join(REPO, "fairseq_msformer")  # the same path the tests import the package from
CORPUS = os.path.join(REPO, "data-bin", "pydoc")
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts", "experiments"))

import benchmark  # noqa: E402  (builds models as fairseq's CLI does: dataclass defaults, a task's dictionaries)
import fairseq_msformer  # noqa: E402  (registers the model and the task)
from fairseq.models import ARCH_CONFIG_REGISTRY  # noqa: E402
from fairseq_msformer.models.config import MsformerLMConfig  # noqa: E402
from fairseq_msformer.models.msformer_lm import MsformerLanguageModel  # noqa: E402

assert os.path.dirname(fairseq_msformer.__file__) == USER_DIR

# One intra-op thread, here and in every fairseq CLI the tests start (OMP_NUM_THREADS, if set, wins): the tests'
# models are tiny, so an op takes microseconds and a second thread only adds synchronisation, and on a busy machine
# waits of milliseconds for a descheduled thread (the in-process sampling tests ran 7x slower with 2 threads than
# with 1 on a loaded 2-core machine; a tiny fairseq-train's training loop 3-5x).
THREADS = os.environ.get("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(THREADS))

WIKITEXT103_TYPES = 267_744  # fairseq's WikiText-103 dictionary (specials included), for the _wiki103 presets/configs
TINY_SIZES = dict(decoder_embed_dim=16, decoder_ffn_embed_dim=32, decoder_attention_heads=2, dropout=0.0)


def build_model(arch="msformer_lm_bottom_up", vocab_words=40, tokens_per_sample=64, seed=0, sizes=TINY_SIZES,
                **options):
    """An msformer_lm built the way fairseq builds it: CLI options > arch preset > dataclass defaults.

    `sizes` are passed like CLI options (tiny by default); sizes=None keeps the preset's own sizes.
    """
    torch.manual_seed(seed)
    args = argparse.Namespace(**{**(sizes or {}), **options})
    ARCH_CONFIG_REGISTRY[arch](args)
    benchmark.fill_dataclass_defaults(args, MsformerLMConfig)
    args.tokens_per_sample = tokens_per_sample
    task = benchmark.fake_task(vocab_words, tokens_per_sample)  # dictionary w0 .. w{vocab_words - 1}
    model = MsformerLanguageModel.build_model(args, task)
    return model.eval(), task.source_dictionary


def random_tokens(dictionary, bsz, length, generator=None):
    low = dictionary.nspecial
    return torch.randint(low, len(dictionary), (bsz, length), generator=generator)


def log_probs(model, tokens, **kwargs):
    net_output = model(tokens, **kwargs)
    return model.get_normalized_probs(net_output, log_probs=True)  # (B, T, V), fp32


def generated_log_probs(model, dictionary, tokens):
    """(L, V) log-probabilities of one full forward pass over a generated sequence `tokens` (L,), which ends with
    eos; the generator starts from eos, so row i scores tokens[i]."""
    inputs = torch.cat([tokens.new_tensor([dictionary.eos()]), tokens[:-1]]).unsqueeze(0)  # (1, L)
    with torch.no_grad():
        return log_probs(model, inputs)[0]


def sampled_log_probs(model, dictionary, tokens, k, sampled: slice):
    """Checks that every token of tokens[sampled] is among the k most likely under a full forward pass (pad, which
    the generator never emits, excluded) and returns each token's full-pass log-probability (L,)."""
    lprobs = generated_log_probs(model, dictionary, tokens)  # (L, V)
    lprobs[:, dictionary.pad()] = float("-inf")
    kth_best = lprobs.topk(k, dim=-1).values[:, -1]  # (L,)
    chosen = lprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (L,)
    assert (chosen[sampled] >= kth_best[sampled] - 1e-5).all(), f"a token outside the top {k} was sampled"
    return chosen


# ---------------------------------------------------------------- fairseq's console scripts

CLI_SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cli_server.py")
# console script -> "module:function", as installed (fairseq's entry_points.txt)
ENTRY_POINTS = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")
                if ep.name.startswith("fairseq-")}


class CliServer:
    """Client of tests/cli_server.py: one server per session, started by the first fairseq_cli call."""

    def __init__(self, env):
        self.env = env
        self.root = tempfile.mkdtemp(prefix="msformer-cli-")
        self.log = os.path.join(self.root, "server.log")
        with open(self.log, "w") as log:
            self.process = subprocess.Popen([sys.executable, CLI_SERVER], stdin=subprocess.PIPE,
                                            stdout=subprocess.DEVNULL, stderr=log, env=env, cwd=REPO)
        self.lock = threading.Lock()

    def run(self, command, request, cwd, stdin, timeout):
        """command: what a subprocess would run; request: cli_server.py's ("entry" or "script", and "argv").
        -> CompletedProcess."""
        folder = tempfile.mkdtemp(dir=self.root)
        try:
            with open(os.path.join(folder, "request.json"), "w") as f:
                json.dump({**request, "cwd": str(cwd)}, f)
            if stdin is not None:
                with open(os.path.join(folder, "stdin"), "w") as f:
                    f.write(stdin)
            with self.lock:
                self.process.stdin.write(folder.encode() + b"\n")
                self.process.stdin.flush()
            status = self.wait(folder, command, timeout)
            output = {}
            for name in ("stdout", "stderr"):
                with open(os.path.join(folder, name), errors="replace") as f:
                    output[name] = f.read()
            return subprocess.CompletedProcess(command, status, output["stdout"], output["stderr"])
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def wait(self, folder, command, timeout):
        deadline = time.monotonic() + timeout
        status_file = os.path.join(folder, "status")
        while not os.path.exists(status_file):
            if self.process.poll() is not None:
                with open(self.log) as log:
                    raise RuntimeError(f"tests/cli_server.py died ({self.process.returncode}):\n{log.read()[-3000:]}")
            if time.monotonic() > deadline:
                with open(os.path.join(folder, "pid")) as f:
                    os.killpg(int(f.read()), signal.SIGKILL)
                while not os.path.exists(status_file):
                    time.sleep(0.02)
                with open(os.path.join(folder, "stdout"), errors="replace") as out:
                    raise subprocess.TimeoutExpired(command, timeout, output=out.read())
            time.sleep(0.02)
        with open(status_file) as f:
            return int(f.read())

    def close(self):
        self.process.stdin.close()  # EOF: the server kills what still runs and exits
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        shutil.rmtree(self.root, ignore_errors=True)


_server = None
_server_lock = threading.Lock()


def forked(command, env):
    """The request for cli_server.py that runs `command`, or None where it must be a plain subprocess."""
    global _server
    name = os.path.basename(command[0])
    if os.environ.get("MSFORMER_TESTS_SUBPROCESS") == "1":
        return None, None
    if name in ENTRY_POINTS:
        request = {"entry": ENTRY_POINTS[name], "argv": command}
    elif command[0] == sys.executable and len(command) > 1 and command[1].endswith(".py"):
        request = {"script": command[1], "argv": command[1:]}  # python's sys.argv starts at the script
    else:
        return None, None
    with _server_lock:
        if _server is None:
            _server = CliServer(env)
            atexit.register(_server.close)
    if without_test_name(env) != without_test_name(_server.env):
        return None, None
    return _server, {**request, "env": env}


def without_test_name(env):
    """pytest names the running test in PYTEST_CURRENT_TEST, which acts at no import: not a difference that needs a
    fresh interpreter."""
    return {name: value for name, value in env.items() if name != "PYTEST_CURRENT_TEST"}


def fairseq_cli(name, *args, cwd=None, check=True, stdin=None, timeout=600):
    """Run a fairseq console script (or `python script.py ...` with name = this interpreter's basename) from this
    interpreter's environment; returns the CompletedProcess."""
    exe = os.path.join(os.path.dirname(sys.executable), name)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=THREADS)
    command = [exe, *map(str, args)]
    server, request = forked(command, env)
    if server is not None:
        proc = server.run(command, request, cwd or REPO, stdin, timeout)
    else:
        proc = subprocess.run(command, cwd=cwd or REPO, input=stdin, capture_output=True, text=True, env=env,
                              timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


# ---------------------------------------------------------------- fairseq-train on the shipped corpus

TASK = ["--user-dir", USER_DIR, "--task", "multiscale_language_modeling", "--cpu"]
ADAPTIVE = ["--adaptive-input", "--adaptive-input-cutoff", "2000,6000", "--adaptive-softmax-cutoff", "2000,6000",
            "--tie-adaptive-weights", "--criterion", "adaptive_loss", "--ddp-backend", "legacy_ddp"]
FAMILIES = {
    "bottom_up": ["--arch", "msformer_lm_bottom_up_tiny", "--token-layers-before-pooling", "1"],
    # the paper presets' bottom-up design: residual upsampling, linear pooling, hourglass shift
    "bottom_up_adaptive": ["--arch", "msformer_lm_bottom_up_tiny", "--pool-type", "linear", "--bottom-up-combine",
                           "residual", "--shift-rule", "hourglass", *ADAPTIVE],
    "top_down_adaptive": ["--arch", "msformer_lm_top_down_tiny", "--shift-rule", "hourglass", *ADAPTIVE],
    "retina": ["--arch", "msformer_lm_retina_tiny", "--retina-windows", "8,24,-1;16,40,-1"],
}
TINY_UPDATES = 10  # tiny_checkpoint's training length


def train(corpus, save_dir, arch_flags, updates, *flags, program=("fairseq-train",), **kwargs):
    """fairseq-train (or `program` with fairseq-train's arguments) with the tests' settings; `flags` come last, so
    they override them; kwargs go to fairseq_cli."""
    return fairseq_cli(
        *program, corpus, *TASK, *arch_flags, "--tokens-per-sample", "64", "--max-tokens", "1024",
        "--optimizer", "adam", "--lr", "2e-3", "--max-update", updates, "--max-valid-steps", "2",
        "--num-workers", "0", "--save-dir", save_dir, "--no-epoch-checkpoints", "--log-format", "simple",
        "--log-interval", "5", "--seed", "1", *flags, **kwargs,
    )


def checkpoint_weights(save_dir) -> dict:
    """The parameters and buffers in save_dir's checkpoint_last.pt, without fairseq's `_float_tensor` placeholders
    (AdaptiveInput/AdaptiveSoftmax: one uninitialised float that only marks the dtype and device)."""
    state = torch.load(os.path.join(save_dir, "checkpoint_last.pt"), map_location="cpu", weights_only=False)
    return {name: value for name, value in state["model"].items() if not name.endswith("_float_tensor")}


def max_difference(weights: dict, other: dict) -> float:
    """max |a - b| over every tensor of two checkpoint_weights."""
    assert weights.keys() == other.keys()
    return max((weights[name].double() - other[name].double()).abs().max().item() for name in weights)


@pytest.fixture(scope="session")
def corpus():
    if not os.path.exists(os.path.join(CORPUS, "dict.txt")):
        pytest.fail(f"the shipped corpus is missing: {CORPUS} (rebuild with scripts/data/prepare_pydoc.sh)")
    return CORPUS


def corpus_subset(corpus, folder, splits: dict):
    """A binarized corpus in `folder` with `corpus`'s dictionary; splits: {split: (split of corpus, n)}, each the
    first n lines of that split (each ending with eos, as fairseq-preprocess writes them). Returns folder."""
    os.makedirs(folder, exist_ok=True)
    os.symlink(os.path.join(corpus, "dict.txt"), os.path.join(folder, "dict.txt"))
    for split, (source, count) in splits.items():
        lines = data_utils.load_indexed_dataset(os.path.join(corpus, source), None)
        builder = indexed_dataset.make_builder(os.path.join(folder, f"{split}.bin"), impl="mmap", vocab_size=50000)
        for i in range(count):
            builder.add_item(lines[i])
        builder.finalize(os.path.join(folder, f"{split}.idx"))
    return folder


@pytest.fixture(scope="session")
def small_corpus(corpus, tmp_path_factory):
    """The shipped corpus cut down for tests that run a whole pipeline (train, validate, score every token): the
    first 400 train lines (~9k tokens), 40 valid and 40 test lines (~1k tokens each), the full dictionary."""
    return corpus_subset(corpus, tmp_path_factory.mktemp("small_corpus"),
                         {"train": ("train", 400), "valid": ("valid", 40), "test": ("test", 40)})


class TinyCheckpoint(NamedTuple):
    save_dir: str  # shared by every test of the session: read only
    path: str  # save_dir/checkpoint_last.pt
    log: str  # fairseq-train's stdout and stderr


@pytest.fixture(scope="session")
def tiny_checkpoint(corpus, tmp_path_factory):
    """tiny_checkpoint(family) -> TinyCheckpoint; each family trained once, when a test first asks for it."""
    trained = {}

    def checkpoint(family):
        if family not in trained:
            save_dir = tmp_path_factory.mktemp(f"tiny_{family}")
            proc = train(corpus, save_dir, FAMILIES[family], TINY_UPDATES)
            trained[family] = TinyCheckpoint(str(save_dir), str(save_dir / "checkpoint_last.pt"),
                                             proc.stdout + proc.stderr)
        return trained[family]

    return checkpoint
