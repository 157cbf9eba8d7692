"""design.md §4.3: fairseq's own CLIs, end to end, on the shipped corpus, on a CPU.

Each family is trained for a few updates with fairseq-train, resumed from checkpoint_last.pt, scored with
fairseq-eval-lm (with and without --context-window) and sampled with fairseq-interactive, always with
--user-dir and --task as a user passes them.
"""
import math
import os
import re

import pytest

from conftest import USER_DIR, fairseq_cli

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


def train(corpus, save_dir, arch_flags, updates):
    return fairseq_cli(
        "fairseq-train", corpus, *TASK, *arch_flags, "--tokens-per-sample", "64", "--max-tokens", "1024",
        "--optimizer", "adam", "--lr", "2e-3", "--max-update", updates, "--max-valid-steps", "2",
        "--num-workers", "0", "--save-dir", save_dir, "--no-epoch-checkpoints", "--log-format", "simple",
        "--log-interval", "5", "--seed", "1",
    )


def eval_lm(corpus, checkpoint, *flags):
    """Perplexity on all of valid (a shard would cover different text with and without a context window)."""
    proc = fairseq_cli(
        "fairseq-eval-lm", corpus, *TASK, "--path", checkpoint, "--gen-subset", "valid", "--tokens-per-sample",
        "64", "--max-tokens", "4096", "--num-workers", "0", *flags,
    )
    match = re.search(r"Loss \(base 2\): ([\d.]+), Perplexity: ([\d.]+)", proc.stdout + proc.stderr)
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


def test_eval_lm_with_and_without_context_window(trained, corpus):
    _, save_dir, _ = trained
    checkpoint = os.path.join(save_dir, "checkpoint_last.pt")
    plain = eval_lm(corpus, checkpoint)
    with_context = eval_lm(corpus, checkpoint, "--context-window", "32")
    assert 1 < plain < 20000 and math.isfinite(plain)
    assert with_context <= plain * 1.001, f"context made perplexity worse: {with_context} > {plain}"


def word_probs(corpus, checkpoint, *flags):
    """fairseq-eval-lm --output-word-probs on 1/20 of valid, one sentence per sample: {sample id: [probs]}."""
    proc = fairseq_cli(
        "fairseq-eval-lm", corpus, *TASK, "--path", checkpoint, "--gen-subset", "valid", "--sample-break-mode",
        "eos", "--tokens-per-sample", "64", "--skip-invalid-size-inputs-valid-test", "--num-shards", "20",
        "--shard-id", "0", "--output-word-probs", "--num-workers", "0", *flags,
    )
    scores = {}
    for line in (proc.stdout + proc.stderr).splitlines():
        match = re.search(r"fairseq_cli\.eval_lm[:| ]+(\d+) (\S.*\[-?[\d.]+\].*)$", line)
        if match:
            scores[int(match.group(1))] = [float(p) for p in re.findall(r"\[(-?[\d.]+)\]", match.group(2))]
    assert len(scores) >= 20, (proc.stdout + proc.stderr)[-2000:]
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


def test_sampling_with_interactive_and_generate(trained, corpus, prompts_bin):
    """Top-k sampling through fairseq-interactive, top-p sampling through fairseq-generate."""
    _, save_dir, _ = trained
    common = ["--path", os.path.join(save_dir, "checkpoint_last.pt"), "--sampling", "--beam", "1",
              "--max-len-b", "12", "--seed", "3"]
    proc = fairseq_cli("fairseq-interactive", corpus, *TASK, *common, "--sampling-topk", "10",
                       "--tokenizer", "moses", "--moses-no-escape", stdin="The module provides\n")
    assert [line for line in proc.stdout.splitlines() if line.startswith("D-0\t")], proc.stdout[-2000:]

    proc = fairseq_cli("fairseq-generate", prompts_bin, *TASK, *common, "--sampling-topp", "0.9",
                       "--gen-subset", "test", "--sample-break-mode", "eos", "--prefix-size", "2",
                       "--batch-size", "3", "--required-batch-size-multiple", "1")  # else 3 prompts make 0 batches
    hypotheses = [line.split("\t") for line in proc.stdout.splitlines() if line.startswith("H-")]
    assert len(hypotheses) == 3, proc.stdout[-2000:]
    assert all(math.isfinite(float(score)) for _, score, _ in hypotheses)


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
