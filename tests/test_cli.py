"""design.md §4.3: fairseq's own CLIs, end to end, on the shipped corpus, on a CPU.

Each family is trained for a few updates with fairseq-train (once per session: conftest's tiny_checkpoint),
resumed from checkpoint_last.pt, scored with fairseq-eval-lm (with and without --context-window, in padded batches
and at eval-lm's default sample length), sampled with fairseq-generate and continued with fairseq-interactive,
always with --user-dir and --task as a user passes them.
"""
import math
import os
import re
import shutil

import pytest
import torch
from fairseq import checkpoint_utils
from fairseq.data import data_utils

from conftest import (  # noqa: F401  (FAMILIES .. train: also imported from here by the resume/distributed tests)
    FAMILIES, TASK, TINY_UPDATES, USER_DIR, build_model, checkpoint_weights, corpus_subset, fairseq_cli, log_probs,
    max_difference, random_tokens, sampled_log_probs, train,
)


def eval_lm(corpus, checkpoint, *flags, tokens_per_sample=64):
    """Perplexity on all of valid (a shard would cover different text with and without a context window).

    tokens_per_sample=None leaves fairseq-eval-lm's own default (1024)."""
    samples = [] if tokens_per_sample is None else ["--tokens-per-sample", tokens_per_sample]
    proc = fairseq_cli(
        "fairseq-eval-lm", corpus, *TASK, "--path", checkpoint, "--gen-subset", "valid", *samples,
        "--max-tokens", "4096", "--num-workers", "0", *flags,
    )
    log = proc.stdout + proc.stderr
    evaluated = re.search(r"Evaluated ([\d,]+) tokens", log)
    assert evaluated and int(evaluated.group(1).replace(",", "")) > 0, f"no token was scored:\n{log[-2000:]}"
    match = re.search(r"Loss \(base 2\): ([\d.]+), Perplexity: ([\d.]+)", log)
    assert match, proc.stderr[-2000:]
    return float(match.group(2))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def trained(request, tiny_checkpoint):
    """(family, its session-wide TinyCheckpoint): trained for TINY_UPDATES updates, read only."""
    return request.param, tiny_checkpoint(request.param)


def test_train_writes_checkpoints_and_logs_progress(trained):
    _, checkpoint = trained
    assert os.path.exists(checkpoint.path)
    assert f"num_updates={TINY_UPDATES}" in checkpoint.log or f"num_updates {TINY_UPDATES}" in checkpoint.log
    assert re.search(r"valid on 'valid' subset \| loss [\d.]+ \| ppl [\d.]+", checkpoint.log)


def test_resume_continues_from_checkpoint_last(trained, corpus, tmp_path):
    family, checkpoint = trained
    save_dir = shutil.copytree(checkpoint.save_dir, tmp_path / "resumed")  # the shared one stays as it is
    proc = train(corpus, save_dir, FAMILIES[family], updates=TINY_UPDATES + 5)
    log = proc.stdout + "\n" + proc.stderr
    assert re.search(rf"[Ll]oaded checkpoint .*checkpoint_last\.pt \(epoch 1 @ {TINY_UPDATES} updates\)", log), \
        log[-3000:]
    assert f"num_updates {TINY_UPDATES + 5}" in log


@pytest.fixture(scope="module")
def eval_bin(corpus, tmp_path_factory):
    """The first 12 lines of valid (~300 tokens) as a 'test' subset: small enough to score token by token here."""
    return corpus_subset(corpus, tmp_path_factory.mktemp("eval_bin"), {"test": ("valid", 12)})


def word_scores(data, checkpoint, *flags):
    """fairseq-eval-lm --output-word-probs: ({sample id: [natural-log prob of each word]}, its log); without BPE a
    word is a token."""
    proc = fairseq_cli("fairseq-eval-lm", data, *TASK, "--path", checkpoint, "--output-word-probs", "--num-workers",
                       "0", *flags)
    log = proc.stdout + proc.stderr
    scores = {}
    for line in log.splitlines():
        match = re.search(r"fairseq_cli\.eval_lm[:| ]+(\d+) (\S.*\[-?[\d.]+\].*)$", line)
        if match:
            scores[int(match.group(1))] = [float(p) for p in re.findall(r"\[(-?[\d.]+)\]", match.group(2))]
    return scores, log


@pytest.mark.parametrize("context_window", [0, 24])
def test_eval_lm_scores_every_token_as_one_full_pass(trained, eval_bin, context_window):
    """Each token's score from fairseq-eval-lm (batched, right-padded rows; with --context-window, blocks of
    64 - C targets behind the C tokens before them) equals one forward pass of the model alone over exactly that
    context, to 1e-4; every token of the subset is scored once."""
    _, trained_checkpoint = trained
    flags = ["--context-window", context_window] if context_window else []
    scores, _ = word_scores(eval_bin, trained_checkpoint.path, "--gen-subset", "test", "--tokens-per-sample", "64",
                            "--max-tokens", "256", *flags)  # 4 rows a batch, padded
    model = load_model(trained_checkpoint.path, eval_bin)
    lines = data_utils.load_indexed_dataset(str(eval_bin / "test"), None)
    stream = torch.cat([lines[i] for i in range(len(lines))])  # the targets, eos after every line
    block = 64 - context_window
    assert sorted(scores) == list(range(-(-len(stream) // block))), "one sample per block, every block scored"
    for i, from_cli in scores.items():
        start, end = i * block, min((i + 1) * block, len(stream))
        first = max(start - context_window, 0)
        expected = full_pass_scores(model, stream, first, end)[start - first :]  # (end - start,)
        assert len(from_cli) == end - start
        assert (torch.tensor(from_cli) - expected).abs().max() < 1e-4, f"sample {i}"


def load_model(checkpoint, data):
    (model,), _ = checkpoint_utils.load_model_ensemble([checkpoint], arg_overrides={"data": str(data)})
    return model.eval()


def full_pass_scores(model, stream, first, end):
    """(end - first,) natural-log probability of each token of stream[first:end] under one forward pass of the
    model alone over exactly those positions; its inputs are the stream shifted right by one, eos first, as
    fairseq's language-modeling datasets feed it."""
    inputs = torch.cat([stream.new_tensor([model.decoder.dictionary.eos()]), stream[:-1]])  # (N,)
    with torch.no_grad():
        lprobs = log_probs(model, inputs[first:end].unsqueeze(0))[0]  # (end - first, V)
    return lprobs.gather(-1, stream[first:end].unsqueeze(-1)).squeeze(-1)


def test_eval_lm_padding_never_changes_a_score(trained, corpus):
    """Sentences of 1/20 of valid scored in padded batches (--sample-break-mode eos, --max-tokens 2048: one
    sentence a row, right-padded to the longest of its batch) get the word scores each sentence gets alone in one
    forward pass of the model, to 1e-4."""
    _, trained_checkpoint = trained
    batched, log = word_scores(
        corpus, trained_checkpoint.path, "--gen-subset", "valid", "--sample-break-mode", "eos", "--tokens-per-sample",
        "64", "--skip-invalid-size-inputs-valid-test", "--num-shards", "20", "--shard-id", "0", "--max-tokens", "2048",
    )
    assert len(batched) >= 20, log[-2000:]
    model = load_model(trained_checkpoint.path, corpus)
    sentences = data_utils.load_indexed_dataset(os.path.join(corpus, "valid"), None)  # sample id = sentence index
    lengths = set()
    for sample_id, from_cli in batched.items():
        sentence = sentences[sample_id]  # ends with eos
        lengths.add(len(sentence))
        alone = full_pass_scores(model, sentence, 0, len(sentence))
        assert len(from_cli) == len(sentence)
        assert (torch.tensor(from_cli) - alone).abs().max() < 1e-4, sample_id
    assert len(lengths) > 5, "sentences of different lengths, so rows really are padded"


@pytest.fixture(scope="module")
def prompts_bin(corpus, tmp_path_factory):
    """A prompts file binarized with the corpus dictionary: what a user does to continue their own prompts."""
    folder = tmp_path_factory.mktemp("prompts")
    prompts = folder / "prompts.txt"
    prompts.write_text("The function returns a\nThis module defines\nFor example , the\n")
    fairseq_cli("fairseq-preprocess", "--only-source", "--srcdict", os.path.join(corpus, "dict.txt"),
                "--testpref", prompts, "--destdir", folder / "bin", "--workers", "1")
    return folder / "bin"


def generated(proc):
    """fairseq-generate's output: {sample id: (tokens, base-2 positional scores)}."""
    lines = proc.stdout.splitlines()
    tokens = {int(line.split("\t")[0][2:]): line.split("\t")[2].split() for line in lines if line.startswith("H-")}
    scores = {int(line.split("\t")[0][2:]): [float(x) for x in line.split("\t")[1].split()]
              for line in lines if line.startswith("P-")}
    return {i: (tokens[i], scores[i]) for i in tokens}


def test_sampling_draws_from_the_top_k(trained, corpus, prompts_bin):
    """fairseq-generate on three prompts of different lengths in one batch: --sampling-topk 1 gives greedy's
    output; with --sampling-topk 5 every generated token is one of the 5 most likely under a full forward pass of
    the checkpoint, and each reported score is that token's log-probability (4 decimals, base 2)."""
    _, trained_checkpoint = trained
    checkpoint = trained_checkpoint.path
    common = [prompts_bin, *TASK, "--path", checkpoint, "--gen-subset", "test", "--sample-break-mode", "eos",
              "--beam", "1", "--max-len-b", "16", "--batch-size", "3", "--required-batch-size-multiple", "1"]
    greedy = generated(fairseq_cli("fairseq-generate", *common))
    assert generated(fairseq_cli("fairseq-generate", *common, "--sampling", "--sampling-topk", "1")) == greedy

    sampled = generated(fairseq_cli("fairseq-generate", *common, "--sampling", "--sampling-topk", "5", "--seed", "3"))
    assert len(sampled) == 3 and sampled != greedy
    model = load_model(checkpoint, corpus)
    dictionary = model.decoder.dictionary
    prompts = data_utils.load_indexed_dataset(str(prompts_bin / "test"), None)
    for i, (words, scores) in sampled.items():
        target = torch.tensor([dictionary.index(w) for w in words] + [dictionary.eos()])
        prompt_length = len(prompts[i]) - 1  # the binarized line ends with eos
        assert words[:prompt_length] == dictionary.string(prompts[i][:-1]).split(), "the prompt is kept"
        new = slice(prompt_length, min(len(target), 16))  # at the length limit eos is forced, not sampled
        chosen = sampled_log_probs(model, dictionary, target, 5, new)  # (L,)
        assert len(scores) == len(target)
        assert max(abs(a - b) for a, b in zip(scores, (chosen / math.log(2)).tolist())) < 1e-3


# fairseq-eval-lm, -generate and -interactive set the task up from their own command line (design.md §6): without
# --tokens-per-sample they take 1024, whatever the checkpoint was trained with (64 here).

SHORT_PROMPTS = "The built-in function\nA list comprehension is a concise way to build lists , and\n"
LONG_PROMPT = (  # 82 tokens after Moses tokenization: longer than any training sample
    "The standard library contains built-in modules , written in C , that provide access to system functionality "
    "such as file input and output that would otherwise be inaccessible to Python programmers , as well as modules "
    "written in Python that provide standardized solutions for many problems that occur in everyday programming . "
    "Some of these modules are explicitly designed to encourage and enhance the portability of Python programs by "
    "abstracting away platform-specifics into platform-neutral APIs .\n"
)


def test_interactive_continues_prompts(trained, corpus):
    """fairseq-interactive with its own default sample length (1024) and beam 3: short prompts are Moses-tokenized
    ("built-in" -> "built @-@ in"), continued and detokenized back; a prompt longer than any training sample is
    continued too (sinusoidal token and block positions grow on demand)."""
    _, trained_checkpoint = trained
    proc = fairseq_cli(
        "fairseq-interactive", corpus, *TASK, "--path", trained_checkpoint.path, "--tokenizer", "moses",
        "--moses-no-escape", "--beam", "3", "--max-len-b", "90", stdin=SHORT_PROMPTS + LONG_PROMPT,
    )
    lines = proc.stdout.splitlines()
    tokenized = {int(line.split("\t")[0][2:]): line.split("\t")[1:] for line in lines if line.startswith("H-")}
    detokenized = {int(line.split("\t")[0][2:]): line.split("\t")[1:] for line in lines if line.startswith("D-")}
    assert sorted(tokenized) == sorted(detokenized) == [0, 1, 2], proc.stdout[-2000:]  # one hypothesis a prompt
    prompt_tokens = ["The", "built", "@-@", "in", "function"]
    assert tokenized[0][1].split()[: len(prompt_tokens)] == prompt_tokens
    assert len(tokenized[0][1].split()) > len(prompt_tokens), "nothing was generated after the prompt"
    assert detokenized[0][1].startswith("The built-in function")
    assert len(tokenized[2][1].split()) >= 82  # the whole long prompt, then the model's tokens
    assert all(math.isfinite(float(score)) for score, _ in tokenized.values())


def test_eval_lm_with_its_default_sample_length(trained, corpus):
    """Models trained on 64-token samples score eval-lm's default 1024-token samples behind a 100-token context
    window (every token is scored: eval_lm checks the count). (fairseq-generate runs without --tokens-per-sample in
    test_sampling_draws_from_the_top_k, fairseq-interactive in test_interactive_continues_prompts.)"""
    _, trained_checkpoint = trained
    shard = ["--num-shards", "20", "--shard-id", "0"]  # 3-4 samples of 1024 tokens are enough, and fast
    perplexity = eval_lm(corpus, trained_checkpoint.path, *shard, "--context-window", "100", tokens_per_sample=None)
    assert 1 < perplexity and math.isfinite(perplexity)


LONGER_THAN_TRAINED = [
    ("msformer_lm_bottom_up", dict(pool_factors="2,4", scale_layers="1,1", token_layers_before_pooling=1,
                                   bottom_up_combine="both")),
    ("msformer_lm_top_down", dict(pool_factors="4,2", scale_layers="1,1", shift_rule="hourglass")),
    ("msformer_lm_retina", dict(pool_factors="2,2", retina_windows="5,9,-1", token_layers=2)),
]


@pytest.mark.parametrize("arch,options", LONGER_THAN_TRAINED, ids=[a for a, _ in LONGER_THAN_TRAINED])
def test_sinusoidal_positions_grow_past_the_trained_length(arch, options):
    """What eval-lm and generation past the trained length rely on, in-process: a model built for 32-token samples
    scores 90 tokens exactly as the same weights built for 128 (token and block tables grown on demand equal
    tables built long enough), and decoding token by token past 32 equals the full pass."""
    short, dictionary = build_model(arch, tokens_per_sample=32, **options)
    long, _ = build_model(arch, tokens_per_sample=128, **options)  # same seed: the same weights
    tokens = random_tokens(dictionary, 2, 90, torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = log_probs(short, tokens)
        assert torch.allclose(full, log_probs(long, tokens), atol=1e-6)
        state = {}
        steps = [log_probs(short, tokens[:, :t], incremental_state=state)[:, -1] for t in range(1, 91)]
    assert (torch.stack(steps, 1) - full).abs().max() < 1e-5


@pytest.fixture(scope="module")
def learned_positions_checkpoint(corpus, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("learned_positions")
    train(corpus, save_dir, [*FAMILIES["retina"], "--decoder-learned-pos"], updates=1)
    return os.path.join(save_dir, "checkpoint_last.pt")


def test_learned_positions_stop_with_one_line_naming_the_option(learned_positions_checkpoint, corpus):
    """Learned tables cover the training length only: eval-lm's default (1024) stops when the model is loaded,
    before any data is read, with one line naming the option to pass (as do generate and interactive); with it,
    eval-lm runs."""
    proc = fairseq_cli("fairseq-eval-lm", corpus, *TASK, "--path", learned_positions_checkpoint, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "fairseq-msformer: error: --tokens-per-sample: 1024 tokens per sample, but this model's learned positions "
        "cover 64; pass --tokens-per-sample 64 or less (--context-window is taken out of it)"
    )
    eval_lm(corpus, learned_positions_checkpoint, "--num-shards", "20", "--shard-id", "0")
