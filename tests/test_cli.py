"""design.md §4.3: fairseq's own CLIs, end to end, on the shipped corpus, on a CPU.

Each family is trained for a few updates with fairseq-train, resumed from checkpoint_last.pt, scored with
fairseq-eval-lm (with and without --context-window) and sampled with fairseq-interactive, always with
--user-dir and --task as a user passes them.
"""
import math
import os
import re

import pytest
import torch
from fairseq import checkpoint_utils
from fairseq.data import data_utils, indexed_dataset

from conftest import USER_DIR, build_model, fairseq_cli, log_probs, random_tokens, sampled_log_probs

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
def trained(request, corpus, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp(request.param)
    proc = train(corpus, save_dir, FAMILIES[request.param], updates=10)
    return request.param, save_dir, proc.stdout + proc.stderr


def test_train_writes_checkpoints_and_logs_progress(trained):
    family, save_dir, log = trained
    assert os.path.exists(os.path.join(save_dir, "checkpoint_last.pt"))
    assert "num_updates=10" in log or "num_updates 10" in log
    assert re.search(r"valid on 'valid' subset \| loss [\d.]+ \| ppl [\d.]+", log)


def test_resume_continues_from_checkpoint_last(trained, corpus):
    family, save_dir, _ = trained
    log = "\n".join(vars(train(corpus, save_dir, FAMILIES[family], updates=15))[k] for k in ("stdout", "stderr"))
    assert re.search(r"[Ll]oaded checkpoint .*checkpoint_last\.pt \(epoch 1 @ 10 updates\)", log), log[-3000:]
    assert "num_updates 15" in log


@pytest.fixture(scope="module")
def eval_bin(corpus, tmp_path_factory):
    """The first 12 lines of valid (~300 tokens) as a 'test' subset: small enough to score token by token here."""
    folder = tmp_path_factory.mktemp("eval_bin")
    os.symlink(os.path.join(corpus, "dict.txt"), folder / "dict.txt")
    lines = data_utils.load_indexed_dataset(os.path.join(corpus, "valid"), None)
    builder = indexed_dataset.make_builder(str(folder / "test.bin"), impl="mmap", vocab_size=50000)
    for i in range(12):
        builder.add_item(lines[i])  # each line ends with eos, as fairseq-preprocess writes it
    builder.finalize(str(folder / "test.idx"))
    return folder


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
    _, save_dir, _ = trained
    checkpoint = os.path.join(save_dir, "checkpoint_last.pt")
    flags = ["--context-window", context_window] if context_window else []
    scores, _ = word_scores(eval_bin, checkpoint, "--gen-subset", "test", "--tokens-per-sample", "64",
                            "--max-tokens", "256", *flags)  # 4 rows a batch, padded
    (model,), _ = checkpoint_utils.load_model_ensemble([checkpoint], arg_overrides={"data": str(eval_bin)})
    model.eval()
    lines = data_utils.load_indexed_dataset(str(eval_bin / "test"), None)
    stream = torch.cat([lines[i] for i in range(len(lines))])  # the targets, eos after every line
    inputs = torch.cat([stream.new_tensor([model.decoder.dictionary.eos()]), stream[:-1]])  # shifted right by one
    block = 64 - context_window
    assert sorted(scores) == list(range(-(-len(stream) // block))), "one sample per block, every block scored"
    for i, from_cli in scores.items():
        start, end = i * block, min((i + 1) * block, len(stream))
        first = max(start - context_window, 0)
        with torch.no_grad():
            lprobs = log_probs(model, inputs[first:end].unsqueeze(0))[0, start - first :]  # (end - start, V)
        expected = lprobs.gather(-1, stream[start:end].unsqueeze(-1)).squeeze(-1)
        assert len(from_cli) == end - start
        assert (torch.tensor(from_cli) - expected).abs().max() < 1e-4, f"sample {i}"


def word_probs(corpus, checkpoint, *flags):
    """fairseq-eval-lm --output-word-probs on 1/20 of valid, one sentence per sample: {sample id: [probs]}."""
    scores, log = word_scores(
        corpus, checkpoint, "--gen-subset", "valid", "--sample-break-mode", "eos", "--tokens-per-sample", "64",
        "--skip-invalid-size-inputs-valid-test", "--num-shards", "20", "--shard-id", "0", *flags,
    )
    assert len(scores) >= 20, log[-2000:]
    return scores


def test_eval_lm_padding_never_changes_a_score(trained, corpus):
    """Sentences scored alone (--batch-size 1, no padding) and in padded batches get the same word scores."""
    _, save_dir, _ = trained
    checkpoint = os.path.join(save_dir, "checkpoint_last.pt")
    alone = word_probs(corpus, checkpoint, "--batch-size", "1")
    batched = word_probs(corpus, checkpoint, "--max-tokens", "2048")
    common = alone.keys() & batched.keys()  # --num-shards shards batches, so the two runs overlap in part
    assert len(common) >= 5
    for sample_id in common:
        probs = alone[sample_id]
        assert len(probs) == len(batched[sample_id])
        assert max(abs(a - b) for a, b in zip(probs, batched[sample_id])) < 1e-4, sample_id


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
    _, save_dir, _ = trained
    checkpoint = os.path.join(save_dir, "checkpoint_last.pt")
    common = [prompts_bin, *TASK, "--path", checkpoint, "--gen-subset", "test", "--sample-break-mode", "eos",
              "--beam", "1", "--max-len-b", "16", "--batch-size", "3", "--required-batch-size-multiple", "1"]
    greedy = generated(fairseq_cli("fairseq-generate", *common))
    assert generated(fairseq_cli("fairseq-generate", *common, "--sampling", "--sampling-topk", "1")) == greedy

    sampled = generated(fairseq_cli("fairseq-generate", *common, "--sampling", "--sampling-topk", "5", "--seed", "3"))
    assert len(sampled) == 3 and sampled != greedy
    (model,), _ = checkpoint_utils.load_model_ensemble([checkpoint], arg_overrides={"data": corpus})
    model.eval()
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


def test_interactive_continues_a_prompt(trained, corpus):
    _, save_dir, _ = trained
    proc = fairseq_cli(
        "fairseq-interactive", corpus, *TASK, "--path", os.path.join(save_dir, "checkpoint_last.pt"),
        "--tokenizer", "moses", "--moses-no-escape", "--beam", "3", "--max-len-b", "12",
        stdin="The built-in function\nA list comprehension is a concise way to build lists , and\n",
    )
    lines = proc.stdout.splitlines()
    tokenized = [line.split("\t") for line in lines if line.startswith("H-")]
    detokenized = [line.split("\t") for line in lines if line.startswith("D-")]
    assert len(tokenized) == len(detokenized) == 2, proc.stdout[-2000:]
    prompt_tokens = ["The", "built", "@-@", "in", "function"]
    assert tokenized[0][2].split()[: len(prompt_tokens)] == prompt_tokens
    assert len(tokenized[0][2].split()) > len(prompt_tokens), "nothing was generated after the prompt"
    assert detokenized[0][2].startswith("The built-in function")
    assert all(math.isfinite(float(score)) for _, score, _ in tokenized)


# ---------------------------------------------------------------- the CLIs' own defaults
# fairseq-eval-lm, -generate and -interactive set the task up from their own command line (design.md §6): without
# --tokens-per-sample they take 1024, whatever the checkpoint was trained with (64 here).

LONG_PROMPT = (  # 82 tokens after Moses tokenization: longer than any training sample
    "The standard library contains built-in modules , written in C , that provide access to system functionality "
    "such as file input and output that would otherwise be inaccessible to Python programmers , as well as modules "
    "written in Python that provide standardized solutions for many problems that occur in everyday programming . "
    "Some of these modules are explicitly designed to encourage and enhance the portability of Python programs by "
    "abstracting away platform-specifics into platform-neutral APIs .\n"
)


def test_eval_lm_and_interactive_with_their_default_sample_length(trained, corpus):
    """Models trained on 64-token samples score eval-lm's default 1024-token samples behind a 100-token context
    window (every token is scored: eval_lm checks the count), and fairseq-interactive continues a prompt longer than
    any training sample: sinusoidal token and block positions grow on demand. (fairseq-generate runs without
    --tokens-per-sample in test_sampling_draws_from_the_top_k.)"""
    _, save_dir, _ = trained
    checkpoint = os.path.join(save_dir, "checkpoint_last.pt")
    shard = ["--num-shards", "20", "--shard-id", "0"]  # 3-4 samples of 1024 tokens are enough, and fast
    perplexity = eval_lm(corpus, checkpoint, *shard, "--context-window", "100", tokens_per_sample=None)
    assert 1 < perplexity and math.isfinite(perplexity)

    proc = fairseq_cli("fairseq-interactive", corpus, *TASK, "--path", checkpoint, "--tokenizer", "moses",
                       "--moses-no-escape", "--beam", "1", "--max-len-b", "90", stdin=LONG_PROMPT)
    tokenized = [line.split("\t") for line in proc.stdout.splitlines() if line.startswith("H-")]
    assert len(tokenized) == 1, proc.stdout[-2000:]
    _, score, tokens = tokenized[0]
    assert len(tokens.split()) >= 82 and math.isfinite(float(score))  # the whole prompt, then the model's tokens


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
