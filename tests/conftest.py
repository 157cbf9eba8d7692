"""Shared helpers: build small models in-process, and run fairseq's real console scripts."""
import argparse
import os
import subprocess
import sys

import pytest
import torch

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


def fairseq_cli(name, *args, cwd=None, check=True, stdin=None, timeout=600):
    """Run a fairseq console script from this interpreter's environment; returns the CompletedProcess."""
    exe = os.path.join(os.path.dirname(sys.executable), name)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run(
        [exe, *map(str, args)], cwd=cwd or REPO, input=stdin, capture_output=True, text=True, env=env,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def corpus():
    if not os.path.exists(os.path.join(CORPUS, "dict.txt")):
        pytest.fail(f"the shipped corpus is missing: {CORPUS} (rebuild with scripts/data/prepare_pydoc.sh)")
    return CORPUS
