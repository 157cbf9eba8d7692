"""Half precision (issue 9): every family runs forward and backward in bfloat16 and float16, the way fairseq's
mixed-precision paths run it, and stays as close to fp32 as fairseq's own transformer_lm of the same size does.

  --fp16 / --memory-efficient-fp16 / --bf16 / --memory-efficient-bf16   weights and buffers in half precision:
                                          here a half model (its logits must come out in half precision)
  --amp                                   fp32 weights, matmuls in half precision: here torch.autocast on the CPU

The CPU stands in for the GPU: --fp16, --bf16 and --amp through fairseq-train need CUDA (design.md §6) and are run
on a GPU machine, not in this suite. Masks are boolean, pooled/upsampled/gathered states keep the activation dtype,
attention runs in SDPA (fp32 softmax statistics) and fairseq normalises the output in fp32.
"""
import copy
import os
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO, build_model, log_probs, random_tokens
from fairseq_msformer.modules import MultiScaleAttention, TransformerBlock

sys.path.insert(0, os.path.join(REPO, "scripts", "experiments"))
import benchmark  # noqa: E402  (builds fairseq's transformer_lm the way the benchmarks compare against it)

FAMILIES = [
    ("msformer_lm_bottom_up", dict(pool_factors="2,2", scale_layers="1,1", token_layers_before_pooling=1,
                                   pool_type="linear")),
    ("msformer_lm_top_down", dict(pool_factors="4,2", scale_layers="1,1", shift_rule="hourglass",
                                  top_down_combine="concat")),
    ("msformer_lm_retina", dict(pool_factors="2,2", retina_windows="5,9,-1", pool_type="max")),
]

# Our half-precision log-probabilities may deviate from fp32 by at most this many times as much as transformer_lm's
# (mean and max |delta log p| over every position and word). Rounding errors of independent operations add up like
# the square root of their number; at the same layer count a family adds a few rounded operations per layer on a
# token's path (pooling, upsampling and combine projections, per-scale norms), at most about twice as many, i.e.
# ~1.4x the error. A dtype bug (a softmax or a mask in half precision, an fp32 table cast down late) costs several
# times more, so 2x keeps the test tight without asking a deeper computation to round less.
YARDSTICK_FACTOR = 2.0


@pytest.mark.parametrize("arch,options", FAMILIES, ids=[a for a, _ in FAMILIES])
def test_bfloat16_forward_and_incremental(arch, options):
    model, dictionary = build_model(arch, token_layers=2, decoder_learned_pos=True, **options)
    tokens = random_tokens(dictionary, 2, 23, torch.Generator().manual_seed(6))
    reference = log_probs(model, tokens).detach()
    model = model.to(torch.bfloat16)
    logits, _ = model(tokens)
    assert logits.dtype == torch.bfloat16
    full = log_probs(model, tokens).detach()  # fairseq normalises in fp32
    assert torch.isfinite(full).all()
    assert (full - reference).abs().max() < 0.1, "bf16 drifted from fp32 beyond rounding"
    state = {}
    with torch.no_grad():
        steps = [log_probs(model, tokens[:, :t], incremental_state=state)[:, -1] for t in range(1, 24)]
    assert (torch.stack(steps, 1) - full).abs().max() < 0.1


def transformer_lm_like(model, vocab_words=40):
    """fairseq's transformer_lm with our model's width, FFN, heads and layer count (input/output dims = width)."""
    ffn = next(m for m in model.modules() if isinstance(m, TransformerBlock)).fc1  # (width -> FFN)
    heads = next(m for m in model.modules() if isinstance(m, MultiScaleAttention)).num_heads
    size = SimpleNamespace(dim=ffn.in_features, ffn=ffn.out_features, heads=heads, layers=benchmark.count_layers(model))
    tlm, _ = benchmark.build("transformer_lm", size, benchmark.fake_task(vocab_words, 64), 64)
    return tlm


def half_precision_deviation(model, tokens, mode: str, dtype: torch.dtype):
    """Forward and backward of a copy of `model` as a half model (mode 'model') or under autocast (mode 'autocast'):
    finite gradients required; returns (mean, max) |log p - log p_fp32| over (B, T, V)."""
    reference = log_probs(model, tokens).detach()  # fp32
    model = copy.deepcopy(model)
    if mode == "model":
        model, context = model.to(dtype), torch.autocast("cpu", enabled=False)
    else:
        context = torch.autocast("cpu", dtype=dtype)
    with context:
        lprobs = log_probs(model, tokens)  # (B, T, V), fp32 either way
    nll = -lprobs[:, :-1].gather(-1, tokens[:, 1:].unsqueeze(-1)).mean()
    nll.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) > len(list(model.parameters())) // 2
    assert all(torch.isfinite(g).all() for g in grads), f"{mode} {dtype}: non-finite gradients"
    delta = (lprobs.detach() - reference).abs()
    return delta.mean().item(), delta.max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", ["autocast", "model"])
@pytest.mark.parametrize("arch,options", FAMILIES, ids=[a for a, _ in FAMILIES])
def test_half_precision_training_step_as_close_to_fp32_as_transformer_lm(arch, options, mode, dtype):
    """Forward and backward (training mode, every position of an off-grid batch) under autocast (--amp) and as a
    half model (--fp16 / --bf16); log-probabilities against fp32, with transformer_lm of the same size alongside."""
    model, dictionary = build_model(arch, token_layers=2, **options)
    tokens = random_tokens(dictionary, 3, 61, torch.Generator().manual_seed(6))
    ours = half_precision_deviation(model.train(), tokens, mode, dtype)
    yardstick = half_precision_deviation(transformer_lm_like(model).train(), tokens, mode, dtype)
    print(f"{arch} {mode} {dtype}: mean/max |delta log p| ours {ours[0]:.4f}/{ours[1]:.4f}, "
          f"transformer_lm {yardstick[0]:.4f}/{yardstick[1]:.4f}")
    for name, ours_value, tlm_value in zip(("mean", "max"), ours, yardstick):
        assert ours_value <= YARDSTICK_FACTOR * tlm_value, (
            f"{mode} {dtype}: {name} |delta log p| {ours_value:.4f} is more than {YARDSTICK_FACTOR}x "
            f"transformer_lm's {tlm_value:.4f}"
        )
