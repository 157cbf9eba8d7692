"""Half precision (issues 9 and 15): every family runs forward and backward in bfloat16 and float16, the way fairseq's
mixed-precision paths run it, and stays as close to fp32 as fairseq's own transformer_lm of the same size does.

  --fp16 / --memory-efficient-fp16 / --bf16 / --memory-efficient-bf16   weights and buffers in half precision:
                                          here a half model (its logits must come out in half precision)
  --amp                                   fp32 weights, matmuls in half precision: here torch.autocast on the CPU

The CPU stands in for the GPU: --fp16, --bf16 and --amp through fairseq-train need CUDA (design.md §6) and are run
on a GPU machine, not in this suite. An error bound alone lets a dtype slip pass while the error stays small, so the
invariants of the mixed-precision audit (commit 3f88897, README "Mixed precision") are asserted directly, per module:

  * under autocast the residual streams stay fp32: every Transformer layer, layer stack and family body takes and
    returns fp32, as in transformer_lm; the projections that start a stream (linear pooling, top-down's concat
    combine) hand back their input's dtype, while every other projection computes in the autocast dtype;
  * pooling (mean, max, linear, hourglass-shifted, incremental), causal upsampling, block positions (learned,
    sinusoidal, and grown past their table) and top-down's combine keep their input's dtype, whatever the
    parameters' dtype (retina pools half-precision keys of an fp32 model under autocast);
  * attention runs in SDPA with query, keys and values of one dtype (the autocast or model dtype) and a boolean
    mask or none; every softmax outside it (fairseq's normalisation) returns fp32;
  * a half model computes in half precision at every module boundary, its sinusoidal tables grow in half, its
    logits are half; incremental caches hold keys/values in the compute dtype and stream states in the stream's.
"""
import copy
import os
import re
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from fairseq.modules import FairseqDropout
from torch.overrides import TorchFunctionMode

from conftest import REPO, build_model, log_probs, random_tokens
from fairseq_msformer.models.bottom_up import BottomUp
from fairseq_msformer.models.retina import Retina
from fairseq_msformer.models.top_down import TopDown
from fairseq_msformer.modules import (
    BlockPool, CausalUpsample, LayerStack, MultiScaleAttention, ScalePositions, TransformerBlock,
)
from test_options import sdpa_calls

sys.path.insert(0, os.path.join(REPO, "scripts", "experiments"))
import benchmark  # noqa: E402  (builds fairseq's transformer_lm the way the benchmarks compare against it)


# ---------------------------------------------------------------- the invariants, asserted per module
# (first: they are quick, and scripts/checks/planted_bugs.py stops at the first failing test)
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
# (module dtype, input dtype, autocast dtype or None): an fp32 model's streams and a retina model's keys under
# --amp, and a half model (--fp16 / --bf16)
DTYPE_SETTINGS = [(torch.float32, torch.float32, half) for half in HALF.values()] + \
    [(torch.float32, half, half) for half in HALF.values()] + [(half, half, None) for half in HALF.values()]


def pooling_step(pool_type, hourglass=False):
    pool = BlockPool(2, pool_type, 16, hourglass_shift=hourglass)

    def run(x):  # feed (B, 1, C) elements until the first block comes out
        cache = {}
        for t in range(x.size(1)):
            block = pool.step(x[:, t : t + 1], cache, "pool")
            if block is not None:
                return block
    return pool, run


def itself(module):
    return module, module


def top_down_combine(combine):
    model, _ = build_model("msformer_lm_top_down", pool_factors="2,2", scale_layers="1,1", top_down_combine=combine)
    body = model.decoder.body
    return body, lambda x: body.with_context(0, x, x.flip(1))


def upsample(newest=False):
    up = CausalUpsample(16)
    if newest:  # incremental decoding before any coarse block is ready: the "no context" vector
        return up, lambda x: up.newest({}, "newest1", x[:, :1])
    return up, lambda x: up(x[:, :3], torch.tensor([-1, -1, 0, 0, 1, 1, 2, 2]))


def positions(learned, rows=8, offset=0):
    table = ScalePositions(rows, 16, learned)
    return table, lambda x: table(x, offset=offset)  # positions offset .. offset + 7: the table grows past `rows`


OPS = {  # name -> () -> (module, x (B, 8, C) -> output)
    "mean_pool": lambda: itself(BlockPool(2, "mean", 16)),
    "max_pool_hourglass": lambda: itself(BlockPool(4, "max", 16, hourglass_shift=True)),
    "linear_pool": lambda: itself(BlockPool(2, "linear", 16)),
    "linear_pool_hourglass": lambda: itself(BlockPool(4, "linear", 16, hourglass_shift=True)),
    "linear_pool_step": lambda: pooling_step("linear"),
    "mean_pool_step_hourglass": lambda: pooling_step("mean", hourglass=True),
    "upsample": lambda: upsample(),
    "upsample_no_context_yet": lambda: upsample(newest=True),
    "learned_positions": lambda: positions(True),
    "sinusoidal_positions": lambda: positions(False),
    "sinusoidal_positions_grown": lambda: positions(False, rows=4, offset=3),
    "top_down_add": lambda: top_down_combine("add"),
    "top_down_concat": lambda: top_down_combine("concat"),
}


def setting_id(setting):
    module_dtype, input_dtype, autocast = (str(d).replace("torch.", "") if d else "off" for d in setting)
    return f"module-{module_dtype}-input-{input_dtype}-autocast-{autocast}"


@pytest.mark.parametrize("module_dtype,input_dtype,autocast", DTYPE_SETTINGS, ids=map(setting_id, DTYPE_SETTINGS))
@pytest.mark.parametrize("op", OPS)
def test_op_keeps_its_input_dtype(op, module_dtype, input_dtype, autocast):
    module, run = OPS[op]()
    module.to(module_dtype)
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(0)).to(input_dtype)
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None), torch.no_grad():
        out = run(x)
    assert out.dtype == input_dtype, f"{op}: {input_dtype} in, {out.dtype} out"
    if op == "sinusoidal_positions_grown":
        assert module.weight.size(0) >= 3 + 8, "the table did not grow"
        assert module.weight.dtype == module_dtype, "a grown sinusoidal table must keep the model's dtype"


def family_id(arch, options):
    return arch + ("-gate" if options.get("retina_gate") else "") + ("-rotary-glu" if options.get("rotary_positions") else "")


DTYPE_FAMILIES = [  # every stream-starting projection and dtype-keeping op in use
    ("msformer_lm_bottom_up", dict(pool_factors="2,2", scale_layers="1,1", token_layers_before_pooling=1,
                                   pool_type="linear", bottom_up_combine="both")),
    ("msformer_lm_top_down", dict(pool_factors="4,2", scale_layers="1,1", shift_rule="hourglass",
                                  top_down_combine="concat", pool_type="linear")),
    ("msformer_lm_retina", dict(pool_factors="2,2", retina_windows="5,9,-1", pool_type="linear")),
    # rotary positions and gated FFNs (their cos/sin tables are built in fp32 and cast to the activations' dtype)
    ("msformer_lm_bottom_up", dict(pool_factors="2,2", scale_layers="1,1", bottom_up_combine="both",
                                   rotary_positions=True, ffn_glu=True, activation_fn="gelu")),
    ("msformer_lm_retina", dict(pool_factors="2,2", retina_windows="5,9,-1", rotary_positions=True, ffn_glu=True)),
]
STREAMS = (TransformerBlock, LayerStack, BottomUp, TopDown, Retina)  # residual streams in, residual streams out
KEEPS_DTYPE = (BlockPool, CausalUpsample, ScalePositions, FairseqDropout)


def floating_dtypes(value) -> list:
    """dtypes of the floating-point tensors in a module's inputs or output (tuples, lists, dicts: recursively)."""
    if torch.is_tensor(value):
        return [value.dtype] if value.is_floating_point() else []
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else []
    return [dtype for item in items for dtype in floating_dtypes(item)]


def boundary_dtypes(model, run):
    """Calls run() with a hook on every module: [(name, module, input dtypes, output dtypes)] per call, the SDPA
    calls [(q, k, v, kwargs)], and the output dtypes of every softmax-like torch function called."""
    records, handles = [], []
    for name, module in model.named_modules():
        handles.append(module.register_forward_hook(
            lambda m, args, kwargs, out, name=name: records.append(
                (name, m, floating_dtypes([args, kwargs]), floating_dtypes(out))), with_kwargs=True))
    softmax_outputs = []

    class SoftmaxDtypes(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if "softmax" in getattr(func, "__name__", ""):
                softmax_outputs.append(out.dtype)
            return out

    try:
        with sdpa_calls() as attention, SoftmaxDtypes():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return records, attention, softmax_outputs


def check_attention(attention, dtype):
    assert attention, "no attention went through SDPA"
    for q, k, v, kwargs in attention:
        assert q.dtype == k.dtype == v.dtype == dtype, f"SDPA on {q.dtype}/{k.dtype}/{v.dtype}, not {dtype}"
        mask = kwargs.get("attn_mask")
        assert mask is None or mask.dtype == torch.bool, f"an attention mask in {mask.dtype}"


def cache_dtypes(model, tokens, context):
    """{cache entry: dtype} after incremental decoding of every position of `tokens` (floating entries only)."""
    state = {}
    with context, torch.no_grad():
        for t in range(1, tokens.size(1) + 1):
            model(tokens[:, :t], incremental_state=state)
    (cache,) = state.values()
    return {name: value.dtype for name, value in cache.items() if value.is_floating_point()}


def is_key_or_value(entry: str) -> bool:
    """Cached attention keys/values (projections: the compute dtype), not stream states (pool buffers, newest
    coarse states): 'scale1.0.k', 'aggregate.blocks.v', retina's 'layer0.k2' and pooling buffers 'layer0.vbuf1'."""
    return re.fullmatch(r"[kv](buf)?\d*", entry.rsplit(".", 1)[-1]) is not None


@pytest.mark.parametrize("half", HALF)
@pytest.mark.parametrize("arch,options", DTYPE_FAMILIES, ids=[family_id(*f) for f in DTYPE_FAMILIES])
def test_autocast_keeps_residual_streams_fp32(arch, options, half):
    """--amp: per module, streams fp32 in and out, dtype-keeping ops keep theirs, every projection half; attention
    and caches as the audit set them; logits in the autocast dtype, normalised in fp32."""
    dtype = HALF[half]
    model, dictionary = build_model(arch, token_layers=2, **options)
    tokens = random_tokens(dictionary, 2, 23, torch.Generator().manual_seed(6))
    results = {}
    with torch.autocast("cpu", dtype=dtype):  # training mode, as --amp trains (retina: recomputed attention)
        records, attention, softmaxes = boundary_dtypes(
            model.train(), lambda: results.update(lprobs=log_probs(model, tokens), logits=model(tokens)[0]))
    seen = set()
    for name, module, inputs, outputs in records:
        seen.add(type(module))
        if isinstance(module, STREAMS):
            assert set(inputs + outputs) == {torch.float32}, f"{name}: a residual stream in {set(inputs + outputs)}"
        elif isinstance(module, KEEPS_DTYPE):
            assert outputs == inputs[:1], f"{name} ({type(module).__name__}): {inputs[0]} in, {outputs} out"
        elif isinstance(module, (nn.Linear, MultiScaleAttention)):
            assert outputs == [dtype], f"{name}: a projection in {outputs} under autocast {dtype}"
    assert {TransformerBlock, BlockPool, ScalePositions, nn.Linear} <= seen, "the checks above saw too little"
    check_attention(attention, dtype)
    assert softmaxes and set(softmaxes) == {torch.float32}, softmaxes
    assert results["logits"].dtype == dtype and results["lprobs"].dtype == torch.float32

    caches = cache_dtypes(model.eval(), tokens[:, :9], torch.autocast("cpu", dtype=dtype))  # blocks of every scale
    wrong = {k: d for k, d in caches.items() if d != (dtype if is_key_or_value(k) else torch.float32)}
    assert caches and not wrong, wrong
    assert arch.endswith("retina") or any(not is_key_or_value(k) for k in caches), "no stream state cached"


@pytest.mark.parametrize("half", HALF)
@pytest.mark.parametrize("arch,options", DTYPE_FAMILIES, ids=[family_id(*f) for f in DTYPE_FAMILIES])
def test_half_model_computes_in_half_at_every_module(arch, options, half):
    """--fp16 / --bf16: no module takes or returns another floating dtype, also past the training length (the
    sinusoidal tables grow in half); attention and caches in half; logits half, normalised in fp32."""
    dtype = HALF[half]
    model, dictionary = build_model(arch, token_layers=2, tokens_per_sample=32, **options)
    model = model.to(dtype)
    tokens = random_tokens(dictionary, 2, 45, torch.Generator().manual_seed(6))  # longer than the 32-token tables
    tables = [m for m in model.modules() if isinstance(m, ScalePositions)]
    rows = [table.weight.size(0) for table in tables]
    results = {}
    records, attention, softmaxes = boundary_dtypes(
        model, lambda: results.update(lprobs=log_probs(model, tokens), logits=model(tokens)[0]))
    wrong = [(name, inputs, outputs) for name, _, inputs, outputs in records if set(inputs + outputs) - {dtype}]
    assert records and not wrong, wrong[:5]
    assert [table.weight.size(0) for table in tables] > rows, "the input did not outgrow the block tables"
    assert all(table.weight.dtype == dtype for table in tables)
    check_attention(attention, dtype)
    assert softmaxes and set(softmaxes) == {torch.float32}, softmaxes
    assert results["logits"].dtype == dtype and results["lprobs"].dtype == torch.float32
    caches = cache_dtypes(model, tokens[:, :9], torch.autocast("cpu", enabled=False))
    assert caches and set(caches.values()) == {dtype}, caches


# ---------------------------------------------------------------- the error, against transformer_lm's
FAMILIES = [
    ("msformer_lm_bottom_up", dict(pool_factors="2,2", scale_layers="1,1", token_layers_before_pooling=1,
                                   pool_type="linear")),
    ("msformer_lm_top_down", dict(pool_factors="4,2", scale_layers="1,1", shift_rule="hourglass",
                                  top_down_combine="concat")),
    ("msformer_lm_retina", dict(pool_factors="2,2", retina_windows="5,9,-1", pool_type="max")),
    ("msformer_lm_top_down", dict(pool_factors="4,2", scale_layers="1,1", rotary_positions=True, ffn_glu=True,
                                  activation_fn="gelu")),
    # gated scales: a hand-written backward that must find forward's dtypes under autocast. (Not --retina-select:
    # its top-k choice is discontinuous, bf16 rounding flips near-tied picks: max |delta log p| ~0.14, mean as fp16)
    ("msformer_lm_retina", dict(pool_factors="2,2", retina_windows="5,9,-1", retina_gate=True,
                                rotary_positions=True)),
]

# Our half-precision log-probabilities may deviate from fp32 by at most this many times as much as transformer_lm's
# (mean and max |delta log p| over every position and word). Rounding errors of independent operations add up like
# the square root of their number; at the same layer count a family adds a few rounded operations per layer on a
# token's path (pooling, upsampling and combine projections, per-scale norms), at most about twice as many, i.e.
# ~1.4x the error. A dtype bug (a softmax or a mask in half precision, an fp32 table cast down late) costs several
# times more, so 2x keeps the test tight without asking a deeper computation to round less.
YARDSTICK_FACTOR = 2.0


@pytest.mark.parametrize("arch,options", FAMILIES, ids=[family_id(*f) for f in FAMILIES])
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
@pytest.mark.parametrize("arch,options", FAMILIES, ids=[family_id(*f) for f in FAMILIES])
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
