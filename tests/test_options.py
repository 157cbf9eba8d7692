"""Every model option takes effect (issue 15): an option that is accepted but ignored fails a test here.

The options are enumerated from MsformerLMConfig, so a new option without a case fails
`test_option_changes_the_model_as_its_help_says`. Each case builds models at two (or more) values and checks the
difference its help text promises against the option's value, not against an attribute the model sets itself:
per scale or per layer where the option is (pooling factors, layers per scale, retina windows per layer), by what
the built model computes (pooling outputs recomputed from their inputs, Transformer layers counted by the length
they run at, SDPA's heads and dropout, retina reads measured by gradients). "<family> only" options must leave the
other families' models unchanged. The plumbing in front of the model is checked too: every option parses from
fairseq's command line into the model config, and no --arch preset overrides an option given explicitly.
"""
import argparse
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import fields
from typing import NamedTuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq import options as fairseq_options
from fairseq import utils
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY
from fairseq.modules import AdaptiveInput, AdaptiveSoftmax, LearnedPositionalEmbedding

from conftest import CORPUS, USER_DIR, build_model, random_tokens
from fairseq_msformer import MsformerConfigError
from fairseq_msformer.models.bottom_up import BottomUp
from fairseq_msformer.models.config import MsformerLMConfig
from fairseq_msformer.models.msformer_lm import MsformerLanguageModel
from fairseq_msformer.models.retina import Retina
from fairseq_msformer.models.top_down import TopDown
from fairseq_msformer.modules import (
    BlockPool, CausalUpsample, LayerStack, MultiScaleAttention, ScalePositions, TransformerBlock,
)
from fairseq_msformer.modules.positions import NoScalePositions, RotaryPositions
from test_retina import measured_reads, plan_keys, reading_plan

OPTIONS = [f.name for f in fields(MsformerLMConfig) if f.name != "_name"]  # _name: fairseq's registry key
HELP = {f.name: f.metadata.get("help", "") for f in fields(MsformerLMConfig)}
FAMILIES = {"bottom_up": BottomUp, "top_down": TopDown, "retina": Retina}
# small models that still have every part: two coarse scales, a layer at each, two retina layers
BASE = {
    "bottom_up": dict(pool_factors="2,2", scale_layers="1,1", token_layers=1),
    "top_down": dict(pool_factors="2,2", scale_layers="1,1", token_layers=1),
    "retina": dict(pool_factors="2,2", token_layers=2, retina_windows="4,8,-1"),
}
TOKENS_PER_SAMPLE = 32
LENGTH = 29  # off every grid used here: the decoder pads to the coarsest block


def build(kind, arch=None, seed=0, **options):
    """A tiny msformer_lm of family `kind` (conftest.build_model: CLI options > preset > dataclass defaults)."""
    model, _ = build_model(arch or "msformer_lm_" + kind, tokens_per_sample=options.pop("tokens_per_sample",
                           TOKENS_PER_SAMPLE), seed=seed, **{**BASE[kind], **options})
    return model


def tokens_for(model, length=LENGTH):
    return random_tokens(model.decoder.dictionary, 2, length, torch.Generator().manual_seed(1))


def calls(model, *types, length=LENGTH, seed=0):
    """Every call of a module of `types` during one forward pass (no grad): name -> [(args, kwargs, output)]."""
    records, handles = defaultdict(list), []
    for name, module in model.named_modules():
        if isinstance(module, types):
            handles.append(module.register_forward_hook(
                lambda m, args, kwargs, out, name=name: records[name].append((args, kwargs, out)), with_kwargs=True))
    torch.manual_seed(seed)
    try:
        with torch.no_grad():
            model(tokens_for(model, length))
    finally:
        for handle in handles:
            handle.remove()
    return records


@contextmanager
def sdpa_calls():
    """Every F.scaled_dot_product_attention call inside the block: [(q, k, v, kwargs)] (the package calls it through
    torch.nn.functional, so patching the module attribute sees each call)."""
    seen, real = [], F.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        seen.append((q, k, v, kwargs))
        return real(q, k, v, **kwargs)

    F.scaled_dot_product_attention = recording
    try:
        yield seen
    finally:
        F.scaled_dot_product_attention = real


def logits(model, length=LENGTH):
    with torch.no_grad():
        return model(tokens_for(model, length))[0]


def shapes(model):
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def parameter_count(model):
    return sum(p.numel() for p in model.parameters())


def same_model(a, b):
    return shapes(a) == shapes(b) and torch.equal(logits(a), logits(b))


def layers_by_length(model, length=LENGTH):
    """Transformer layers run per sequence length, i.e. per scale: {positions: layers}."""
    return Counter(args[0].size(1) for records in calls(model, TransformerBlock, length=length).values()
                   for args, _, _ in records)


def rerun(model, other, types, train=False, seeds=(0, 0)):
    """Runs each module of `types` of `model` and the same-named module of `other` on the inputs `model`'s
    module got in a forward pass; returns {name: the two outputs differ} (train mode: seeded per run)."""
    recorded = calls(model, types)
    modules = [dict(model.named_modules()), dict(other.named_modules())]
    differs = {}
    for name, records in recorded.items():
        args, kwargs, _ = records[0]
        outputs = []
        for named, seed in zip(modules, seeds):
            module = named[name].train(train)
            torch.manual_seed(seed)
            with torch.no_grad():
                outputs.append(module(*args, **kwargs))
            module.eval()
        differs[name] = not torch.equal(*outputs)
    return differs


# ---------------------------------------------------------------- one case per option
class Case(NamedTuple):
    check: callable
    values: tuple  # two values the option differs by (the "<family> only" test builds the other families with them)
    cli: object  # a non-default value, as fairseq's argparse returns it


CASES = {}


def case(option, *values, cli=None):
    def register(check):
        CASES[option] = Case(check, values, values[-1] if cli is None else cli)
        return check
    return register


@case("family", "bottom_up", "retina")
def check_family():
    for family, body in FAMILIES.items():
        assert type(build(family, arch="msformer_lm", family=family).decoder.body) is body
        for arch in ARCH_CONFIG_REGISTRY:  # every preset named after the family builds that family
            if arch.startswith(f"msformer_lm_{family}"):
                args = argparse.Namespace()
                ARCH_CONFIG_REGISTRY[arch](args)
                assert args.family == family, arch


def check_pools(model, factors, pool_type, hourglass):
    """Every pooling call (the body's pools; retina's key and value pools in each layer) against a reference written
    from the options: [shift right by r - 1 with zeros (hourglass)], then r elements -> one by mean, max or the
    module's projection of their concatenation; scale s pools by factors[s - 1]."""
    pooled, modules = calls(model, BlockPool), dict(model.named_modules())
    per_scale = Counter()
    for name, records in pooled.items():
        index = int(name.rsplit(".", 1)[1])  # pools.i, key_pools.i, value_pools.i: scale i + 1
        r, shift = factors[index], hourglass and ".attn." not in name  # retina pools whole blocks, unshifted
        per_scale[index] += len(records)
        for (x,), _, out in records:
            bsz, n, dim = x.shape
            if shift:
                x = torch.cat([x.new_zeros(bsz, r - 1, dim), x[:, : n - r + 1]], dim=1)
            if pool_type == "linear":
                proj = modules[name].proj
                assert proj is not None, f"{name}: no projection for linear pooling"
                expected = proj(x.reshape(bsz, n // r, r * dim))
            else:
                blocks = x.reshape(bsz, n // r, r, dim)
                expected = blocks.mean(2) if pool_type == "mean" else blocks.amax(2)
            torch.testing.assert_close(out, expected, msg=f"{name}: not {pool_type} pooling by {r}")
    layers = len(model.decoder.body.layers) if isinstance(model.decoder.body, Retina) else 1
    per_layer = 2 if isinstance(model.decoder.body, Retina) else 1  # keys and values
    assert per_scale == {i: layers * per_layer for i in range(len(factors))}, per_scale


RETINA_WINDOWS = {2: "6,18,-1", 3: "6,18,40,-1"}  # one horizon per scale, each span >= one block


@case("pool_factors", "2,3", "3,2")
def check_pool_factors():
    for family in FAMILIES:
        for factors in ([2, 3], [3, 2], [2, 2, 2]):
            text = ",".join(map(str, factors))
            extra = (dict(retina_windows=RETINA_WINDOWS[len(factors)]) if family == "retina"
                     else dict(scale_layers=",".join("1" * len(factors))))
            model = build(family, pool_factors=text, **extra)
            block_lengths = [1] + [int(torch.tensor(factors[:s + 1]).prod()) for s in range(len(factors))]
            assert model.decoder.grid.block_lengths == block_lengths
            check_pools(model, factors, "mean", hourglass=False)
            if family != "retina":  # scale s's layers run at T / K_s positions
                padded = -(-LENGTH // block_lengths[-1]) * block_lengths[-1]
                assert set(layers_by_length(model)) == {padded // k for k in block_lengths}


@case("scale_layers", "1,2", "2,1")
def check_scale_layers():
    for family, before_softmax in (("bottom_up", 1 + 1), ("top_down", 1)):  # bottom-up: aggregation + token layer
        for counts in ([1, 2], [2, 1], [3, 1]):  # 32-token grid, blocks of 2 and 4: 16 and 8 positions
            model = build(family, scale_layers=",".join(map(str, counts)))
            assert layers_by_length(model) == {32: before_softmax, 16: counts[0], 8: counts[1]}, counts
    assert same_model(build("retina", scale_layers="1,2"), build("retina", scale_layers="3,1")), "retina: unused"


@case("token_layers", 1, 3)
def check_token_layers():
    for n in (1, 3):
        assert layers_by_length(build("bottom_up", token_layers=n))[32] == 1 + n  # + the aggregation layer
        assert layers_by_length(build("top_down", token_layers=n))[32] == n
        assert layers_by_length(build("retina", token_layers=n)) == {32: n}


@case("token_layers_before_pooling", 0, 2)
def check_token_layers_before_pooling():
    for n in (0, 2):
        assert layers_by_length(build("bottom_up", token_layers_before_pooling=n))[32] == n + 1 + 1


@case("pool_type", "mean", "max", "linear")
def check_pool_type():
    for family in FAMILIES:
        built = {pool_type: build(family, pool_type=pool_type) for pool_type in ("mean", "max", "linear")}
        for pool_type, model in built.items():
            check_pools(model, [2, 2], pool_type, hourglass=False)
        extra = parameter_count(built["linear"]) - parameter_count(built["mean"])
        pools = sum(isinstance(m, BlockPool) for m in built["linear"].modules())
        assert extra == pools * (2 * 16 * 16 + 16), "linear pooling: one (r*C -> C) projection per pooling module"


@case("shift_rule", "complete", "hourglass")
def check_shift_rule():
    for family in ("bottom_up", "top_down"):
        for rule in ("complete", "hourglass"):
            model = build(family, shift_rule=rule, pool_type="max")
            check_pools(model, [2, 2], "max", hourglass=rule == "hourglass")
            ready = model.decoder.grid.ready(1, 3)  # blocks of 2 tokens: ready at their last token, or at jK
            assert ready.tolist() == ([1, 3, 5] if rule == "complete" else [0, 2, 4])


def output(records, name):
    return records[name][0][2]  # the first call's output


@case("bottom_up_combine", "attention", "residual")
def check_bottom_up_combine():
    """attention: the aggregation layer reads tokens and every block (32 + 16 + 8 keys); residual: it reads tokens
    only, and each coarse scale's upsampled states are projected and added to the token stream first; both: both."""
    for combine, keys in (("attention", 56), ("residual", 32), ("both", 56)):
        model = build("bottom_up", bottom_up_combine=combine)
        seen = calls(model, LayerStack, TransformerBlock, MultiScaleAttention, nn.Linear)
        assert [args[1].size(1) for args, _, _ in seen["decoder.body.aggregate.attn"]] == [keys], combine
        tokens = output(seen, "decoder.body.token_layers_before")  # (B, 32, C) the token stream before pooling
        if combine != "attention":
            tokens = tokens + sum(output(seen, f"decoder.body.up_projs.{s}") for s in range(2))
        ((aggregated, *_), _, _), = seen["decoder.body.aggregate"]
        torch.testing.assert_close(aggregated, tokens, msg=f"{combine}: the aggregation layer's input")


@case("top_down_combine", "add", "concat")
def check_top_down_combine():
    """Scale s's layers read its pooled embeddings (+ block positions) combined with the coarser scale's upsampled
    states: added, or concatenated and projected (2C -> C)."""
    for combine in ("add", "concat"):
        model = build("top_down", top_down_combine=combine)
        seen = calls(model, TopDown, ScalePositions, CausalUpsample, LayerStack)
        ((embeddings, _), _, _), = seen["decoder.body"]
        inputs = [embeddings, output(seen, "decoder.body.positions.0")]  # scale 0: tokens; scale 1: pooled, placed
        for s in range(2):
            upsampled = output(seen, f"decoder.body.upsamples.{s}")
            expected = inputs[s] + upsampled if combine == "add" else \
                model.decoder.body.combine[s](torch.cat([inputs[s], upsampled], dim=-1))
            ((stack_input, *_), _, _), = seen[f"decoder.body.stacks.{s}"]
            torch.testing.assert_close(stack_input, expected, msg=f"{combine}: scale {s}'s input")
        assert hasattr(model.decoder.body, "combine") == (combine == "concat")


RETINA_LAYERS = {  # --retina-windows group -> (window, blocks per coarse scale), by hand for blocks of 2 and 4
    "4,8,-1": (4, [2, -1]), "6,16,24": (6, [5, 2]), "2,6,-1": (2, [2, -1]), "8,12,-1": (8, [2, -1]),
}


@case("retina_windows", "4,8,-1;6,16,24;2,6,-1", "4,8,-1;8,12,-1;2,6,-1")
def check_retina_windows():
    """Layer i reads what its own group says (reads measured by gradients, test_retina.measured_reads): changing
    layer 1's group changes layer 1 and no other; one group serves every layer."""
    for windows in ("4,8,-1;6,16,24;2,6,-1", "4,8,-1;8,12,-1;2,6,-1", "6,16,24"):
        groups = windows.split(";") * (3 if ";" not in windows else 1)
        model = build("retina", token_layers=3, retina_windows=windows)
        for i, (group, layer) in enumerate(zip(groups, model.decoder.body.layers)):
            window, blocks = RETINA_LAYERS[group]
            for t, keys in enumerate(measured_reads(layer.attn, 24)):
                planned = [tokens for _, tokens in plan_keys(reading_plan(t, [1, 2, 4], window, blocks), [1, 2, 4])]
                assert sorted(map(tuple, keys)) == sorted(map(tuple, planned)), f"{windows}: layer {i}, query {t}"


@case("retina_bucketed_window", False, True)
def check_retina_bucketed_window():
    """Reads measured by gradients: query t reads its tokens from the start of the 4-token bucket before its own
    (4 + 1 .. 8 tokens, local-attention's look-back), and older positions as the blocks the plan names; without
    the option, its last 4 .. 5 tokens (the window's start on a 2-token block)."""
    for bucketed in (False, True):
        layer = build("retina", retina_bucketed_window=bucketed).decoder.body.layers[0].attn
        window, blocks = RETINA_LAYERS["4,8,-1"]
        for t, keys in enumerate(measured_reads(layer, 24)):
            start = max(0, t - t % 4 - 4) if bucketed else max(0, (t - 3) // 2 * 2)
            assert [k for k in keys if len(k) == 1 and k[0] >= start] == [range(u, u + 1) for u in range(start, t + 1)]
            planned = [tokens for _, tokens in plan_keys(reading_plan(t, [1, 2, 4], window, blocks, bucketed),
                                                         [1, 2, 4])]
            assert sorted(map(tuple, keys)) == sorted(map(tuple, planned)), f"bucketed={bucketed}, query {t}"


@case("retina_gate", False, True)
def check_retina_gate():
    """Each scale gets its own softmax: with every gate held at 1, a query that reads one scale only (positions
    0-4 with windows 4,8,-1: tokens only) gets what the single softmax gives it, and one that reads several
    scales does not (two softmaxes summed are not one over their union)."""
    plain = build("retina").eval()
    gated = build("retina", retina_gate=True).eval()
    missing = gated.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(".attn.gate." in key for key in missing), missing
    for layer in gated.decoder.body.layers:
        nn.init.zeros_(layer.attn.gate.weight)
        nn.init.constant_(layer.attn.gate.bias, 30.0)  # sigmoid(30) = 1 in float32
    tokens = tokens_for(plain)
    with torch.no_grad():
        a, b = plain(tokens, features_only=True)[0], gated(tokens, features_only=True)[0]
    torch.testing.assert_close(b[:, :5], a[:, :5])
    assert not torch.allclose(b[:, 8:], a[:, 8:], atol=1e-3)


@case("retina_select", 0, 2)
def check_retina_select():
    """Each query also reads, token by token, the N coarsest blocks (4 tokens here) that end before its window
    and rank highest: reads measured by gradients, where a pooled block passes one gradient to all its tokens and a
    token read on its own a gradient of its own. N = 0: no older token is read on its own; N = 1: the tokens of
    exactly one such block; N at least the number of blocks: every such block, whole."""
    window, _ = RETINA_LAYERS["4,8,-1"]
    for n in (0, 1, 2, 8):
        layer = build("retina", retina_gate=True, retina_select=n).decoder.body.layers[0].attn
        for t, keys in enumerate(measured_reads(layer, 24)):
            start = max(0, (t - window + 1) // 2 * 2)  # the window's first token (moved back to a 2-token block)
            selectable = [set(range(4 * j, 4 * j + 4)) for j in range(6) if 4 * (j + 1) <= start]
            alone = {k[0] for k in keys if len(k) == 1 and k[0] < start}  # older tokens read on their own
            picked = [block for block in selectable if block <= alone]
            assert len(picked) == min(n, len(selectable)) and alone == set().union(*picked), f"N = {n}, query {t}"


@case("no_retina_recompute", False, True)
def check_no_retina_recompute():
    """Keeping the gathered keys/values for backward saves more for backward; outputs and gradients are unchanged."""
    results = []
    for keep in (False, True):
        model = build("retina", no_retina_recompute=keep).train()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            out = model(tokens_for(model))[0]
        grads = torch.autograd.grad(out.pow(2).sum(), list(model.parameters()))
        results.append((sum(saved), out.detach(), grads))
    (recomputed, out_a, grads_a), (kept, out_b, grads_b) = results
    assert kept > recomputed, f"--no-retina-recompute saves {kept} bytes for backward, recompute {recomputed}"
    torch.testing.assert_close(out_a, out_b)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b)


def widened(shape, old, new):
    return tuple(n // old * new if n % old == 0 else n for n in shape)


@case("decoder_embed_dim", 12, 20)
def check_decoder_embed_dim():
    """Every width-sized axis of every parameter follows the option (ffn 28 and the 44-word vocabulary do not)."""
    options = dict(decoder_ffn_embed_dim=28, pool_type="linear")
    for family, extra in (("bottom_up", dict(bottom_up_combine="both")), ("top_down", dict(top_down_combine="concat")),
                          ("retina", {})):
        narrow = build(family, decoder_embed_dim=12, **options, **extra)
        wide = build(family, decoder_embed_dim=20, **options, **extra)
        assert shapes(wide) == {name: widened(shape, 12, 20) for name, shape in shapes(narrow).items()}
        assert any(12 in shape for shape in shapes(narrow).values()) and logits(wide).shape[-1] == 44


@case("decoder_ffn_embed_dim", 28, 36)
def check_decoder_ffn_embed_dim():
    for family in FAMILIES:
        for ffn in (28, 36):
            blocks = [m for m in build(family, decoder_ffn_embed_dim=ffn).modules() if isinstance(m, TransformerBlock)]
            assert blocks and all(b.fc1.weight.shape == (ffn, 16) and b.fc2.weight.shape == (16, ffn) for b in blocks)


@case("decoder_attention_heads", 1, 4)
def check_decoder_attention_heads():
    """Every attention call (every layer, every scale, retina's chunks) splits the width into this many heads."""
    for family in FAMILIES:
        for heads in (1, 4):
            model = build(family, decoder_attention_heads=heads)
            with sdpa_calls() as seen:
                logits(model)
            layers = sum(isinstance(m, TransformerBlock) for m in model.modules())
            assert len(seen) >= layers and {q.size(1) for q, _, _, _ in seen} == {heads}, (family, heads)


@case("activation_fn", "relu", "gelu")
def check_activation_fn():
    for family in FAMILIES:
        relu, gelu = build(family, activation_fn="relu"), build(family, activation_fn="gelu")
        for model, name in ((relu, "relu"), (gelu, "gelu")):
            ffns = [m for m in model.modules() if isinstance(m, TransformerBlock)]
            assert all(m.activation_fn is utils.get_activation_fn(name) for m in ffns)
        differs = rerun(relu, gelu, TransformerBlock)  # same weights, same inputs: each layer's FFN differs
        assert differs and all(differs.values()), differs


@case("ffn_glu", False, True)
def check_ffn_glu():
    """Every Transformer layer's FFN (--decoder-ffn-embed-dim 30, gelu): with --ffn-glu, fc1 makes two halves of
    2/3 x 30 = 20 and the sublayer adds fc2(first half * gelu(second half)): the weights of a plain 30-wide FFN;
    without, fc2(gelu(fc1 h)). Recomputed from each layer's own weights on random inputs."""
    for family in FAMILIES:
        counts = []
        for glu in (False, True):
            model = build(family, ffn_glu=glu, decoder_ffn_embed_dim=30, activation_fn="gelu")
            counts.append(parameter_count(model))
            inner = 20 if glu else 30
            blocks = {name: m for name, m in model.named_modules() if isinstance(m, TransformerBlock)}
            assert blocks and all(b.fc1.weight.shape == (2 * inner if glu else inner, 16)
                                  and b.fc2.weight.shape == (16, inner) for b in blocks.values())
            for name, block in blocks.items():
                x = torch.randn(2, 8, 16)
                with torch.no_grad():
                    h = block.fc1(block.ffn_norm(x))
                    inner = h[..., :20] * F.gelu(h[..., 20:]) if glu else F.gelu(h)
                    torch.testing.assert_close(block.feed_forward(x), x + block.fc2(inner), msg=name)
        blocks = sum(isinstance(m, TransformerBlock) for m in model.modules())
        assert counts[1] - counts[0] == blocks * 10, counts  # 30 biases of fc1 become 2 x 20


def stochastic_layers(model):
    """{layer: its training-mode output differs between two seeds on the same input}."""
    return rerun(model, model, TransformerBlock, train=True, seeds=(1, 2))


@case("dropout", 0.0, 0.25)
def check_dropout():
    for family in FAMILIES:
        for p in (0.0, 0.25):
            model = build(family, dropout=p)
            residual = [m.dropout for m in model.modules() if isinstance(m, TransformerBlock)]
            assert all(d.p == p for d in residual + [model.decoder.dropout_module]), (family, p)
            assert set(stochastic_layers(model).values()) == {p > 0}, (family, p)


@case("attention_dropout", 0.0, 0.25)
def check_attention_dropout():
    """Every attention call drops attention weights with this p in training, and none at evaluation."""
    for family in FAMILIES:
        for p in (0.0, 0.25):
            model = build(family, attention_dropout=p)
            for train in (True, False):
                with sdpa_calls() as seen:
                    torch.manual_seed(0)
                    with torch.no_grad():
                        model.train(train)(tokens_for(model))
                assert seen and {kw["dropout_p"] for _, _, _, kw in seen} == {p if train else 0.0}, (family, p, train)
            model.eval()
            assert set(stochastic_layers(model).values()) == {p > 0}, (family, p)


@case("activation_dropout", 0.0, 0.25)
def check_activation_dropout():
    for family in FAMILIES:
        for p in (0.0, 0.25):
            model = build(family, activation_dropout=p)
            assert all(m.activation_dropout.p == p for m in model.modules() if isinstance(m, TransformerBlock))
            assert set(stochastic_layers(model).values()) == {p > 0}, (family, p)


def position_parameters(model):
    return {name for name, module in model.named_modules() for p, _ in module.named_parameters(recurse=False)
            if isinstance(module, (ScalePositions, LearnedPositionalEmbedding))}


@case("decoder_learned_pos", False, True)
def check_decoder_learned_pos():
    """Learned: the token table and every coarse scale's block table (retina's key positions too) are parameters."""
    for family in FAMILIES:
        sinusoidal, learned = build(family), build(family, decoder_learned_pos=True)
        assert position_parameters(sinusoidal) == set()
        tables = {name for name, m in learned.named_modules() if isinstance(m, ScalePositions)}
        assert position_parameters(learned) == tables | {"decoder.embed_positions"} and len(tables) >= 2
        assert isinstance(learned.decoder.embed_positions, LearnedPositionalEmbedding)
        added = set(shapes(learned)) - set(shapes(sinusoidal))
        assert added == {name + ".weight" for name in position_parameters(learned)}


@case("rotary_positions", False, True)
def check_rotary_positions():
    """Rotary: no new parameters, other outputs, and every rotation happens at the ready positions written out here
    from design.md (a token at t; block j of scale s at (j+1)K_s - 1, or j*K_s with the hourglass rule): per
    self-attention its queries and keys, the aggregation layer's keys over tokens and both scales, retina's keys
    per scale and its (chunk-padded) queries. Blocks of 2 and 4 tokens, 29 tokens padded to 32."""
    tokens = tuple(range(32))
    def blocks(k, hourglass=False):
        return tuple(j * k if hourglass else (j + 1) * k - 1 for j in range(32 // k))
    expected = {  # positions of each rotation -> how many rotations in one forward pass
        ("bottom_up", "complete"): {blocks(2): 2, blocks(4): 2, tokens: 3, tokens + blocks(2) + blocks(4): 1},
        ("bottom_up", "hourglass"): {blocks(2, True): 2, blocks(4, True): 2, tokens: 3,
                                     tokens + blocks(2, True) + blocks(4, True): 1},
        ("top_down", "complete"): {blocks(4): 2, blocks(2): 2, tokens: 2},
        ("top_down", "hourglass"): {blocks(4, True): 2, blocks(2, True): 2, tokens: 2},
        ("retina", "complete"): {tokens: 4, blocks(2): 2, blocks(4): 2},  # 2 layers
    }
    real = RotaryPositions.forward
    for (family, rule), rotations in expected.items():
        plain, rotary = build(family, shift_rule=rule), build(family, shift_rule=rule, rotary_positions=True)
        assert shapes(plain) == shapes(rotary) and not torch.equal(logits(plain), logits(rotary))
        seen = Counter()

        def recording(module, x, positions):
            seen[tuple(positions.tolist())] += 1
            return real(module, x, positions)

        RotaryPositions.forward = recording
        try:
            logits(rotary)
        finally:
            RotaryPositions.forward = real
        assert seen == Counter(rotations), (family, rule, seen)


@case("rotary_fraction", 0.5, 1.0, 0.25)
def check_rotary_fraction():
    """With --rotary-positions, every rotation (queries and keys, every scale) turns the first fraction x head_dim
    of each head's dimensions (head_dim 8: 4, 8, 2) and leaves the rest as they are; away from position 0 every
    turned pair moves."""
    real = RotaryPositions.forward
    for family in FAMILIES:
        models = {f: build(family, rotary_positions=True, rotary_fraction=f) for f in (0.5, 1.0, 0.25)}
        assert not torch.equal(logits(models[0.5]), logits(models[1.0]))
        for fraction, model in models.items():
            turned = set()

            def recording(module, x, positions):
                out = real(module, x, positions)
                moved = (out != x)[:, positions > 0]  # (B, N', H, D)
                turned.add(tuple(moved.flatten(0, 2).any(0).tolist()))
                return out

            RotaryPositions.forward = recording
            try:
                logits(model)
            finally:
                RotaryPositions.forward = real
            rotated = int(8 * fraction)  # the tiny models' heads: 16 / 2 = 8 dimensions
            assert turned == {(True,) * rotated + (False,) * (8 - rotated)}, (family, fraction, turned)


def test_rotary_scores_depend_on_distance_only():
    """RotaryPositions: a rotated query at p and key at p' score by p - p' alone, whether half of each head's
    dimensions is rotated (x-transformers' default; the second half left as it is) or all of them."""
    for fraction, rotated in ((0.5, 4), (1.0, 8)):
        rotary, q, k = RotaryPositions(8, fraction), torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8)
        def score(p, p_key):
            rq, rk = rotary(q, torch.tensor([p])), rotary(k, torch.tensor([p_key]))
            assert torch.equal(rq[..., rotated:], q[..., rotated:])
            assert torch.equal(rq[..., :rotated], q[..., :rotated]) == (p == 0)
            return (rq * rk).sum(-1)
        torch.testing.assert_close(score(7, 3), score(104, 100))
        torch.testing.assert_close(score(0, 0), (q * k).sum(-1))
        assert not torch.allclose(score(7, 3), score(7, 5))


def body_input(model):
    """(B, T, C) what the family body receives: scaled token embeddings (+ positions), before grid padding."""
    (records,) = calls(model, BottomUp, TopDown, Retina).values()
    ((x, _inner_states), _, _), = records
    return x[:, :LENGTH]


@case("no_token_positional_embeddings", False, True)
def check_no_token_positional_embeddings():
    """No token positions: the body gets the scaled embeddings alone; the coarse scales keep theirs."""
    for family in FAMILIES:
        with_positions, without = build(family), build(family, no_token_positional_embeddings=True)
        tokens = tokens_for(without)
        with torch.no_grad():
            embedded = 16**0.5 * without.decoder.embed_tokens(tokens)
        assert without.decoder.embed_positions is None and torch.equal(body_input(without), embedded)
        positions = with_positions.decoder.embed_positions(tokens)  # (B, T, C) fairseq's sinusoidal positions
        assert positions.abs().sum() > 0
        torch.testing.assert_close(body_input(with_positions), embedded + positions)
        scale_positions = [calls(m, ScalePositions) for m in (with_positions, without)]
        assert scale_positions[0].keys() == scale_positions[1].keys() and len(scale_positions[0]) >= 2


@case("no_scale_positions", False, True)
def check_no_scale_positions():
    """Every coarse scale's blocks (retina: pooled keys) go on without their position vector; tokens keep theirs."""
    for family in FAMILIES:
        with_positions, without = build(family), build(family, no_scale_positions=True)
        added, passed = calls(with_positions, ScalePositions), calls(without, NoScalePositions)
        assert len(added) >= 2 and added.keys() == passed.keys(), (family, added.keys(), passed.keys())
        assert all(not torch.equal(args[0], out) for records in added.values() for args, _, out in records)
        assert all(torch.equal(args[0], out) for records in passed.values() for args, _, out in records)
        assert without.decoder.embed_positions is not None and not same_model(with_positions, without)


@case("no_scale_embedding", False, True)
def check_no_scale_embedding():
    for family in FAMILIES:
        for off, scale in ((False, 16**0.5), (True, 1.0)):
            model = build(family, no_scale_embedding=off, no_token_positional_embeddings=True)
            with torch.no_grad():
                assert torch.equal(body_input(model), scale * model.decoder.embed_tokens(tokens_for(model)))


@case("share_decoder_input_output_embed", False, True)
def check_share_decoder_input_output_embed():
    for family in FAMILIES:
        separate, shared = build(family), build(family, share_decoder_input_output_embed=True)
        assert shared.decoder.output_projection.weight is shared.decoder.embed_tokens.weight
        assert separate.decoder.output_projection.weight is not separate.decoder.embed_tokens.weight
        assert parameter_count(separate) - parameter_count(shared) == 44 * 16


ADAPTIVE = dict(adaptive_input=True, adaptive_input_cutoff="10,20")


def band_shapes(adaptive_input):
    """[(words, dims)] of each AdaptiveInput band's embedding table."""
    return [tuple(band[0].weight.shape) for band in adaptive_input.embeddings]


@case("adaptive_input", False, True)
def check_adaptive_input():
    for family in FAMILIES:
        plain, adaptive = build(family, adaptive_input_cutoff="10,20"), build(family, **ADAPTIVE)
        assert type(plain.decoder.embed_tokens) is nn.Embedding
        assert isinstance(adaptive.decoder.embed_tokens, AdaptiveInput)


@case("adaptive_input_factor", 2.0, 4.0, cli=2.0)
def check_adaptive_input_factor():
    for family in FAMILIES:  # band i has 16 // factor**i dimensions (44 words: bands of 10, 10 and 24)
        for factor, dims in ((2.0, [16, 8, 4]), (4.0, [16, 4, 1])):
            model = build(family, **ADAPTIVE, adaptive_input_factor=factor)
            assert band_shapes(model.decoder.embed_tokens) == list(zip([10, 10, 24], dims)), factor


@case("adaptive_input_cutoff", "10,20", "12,30")
def check_adaptive_input_cutoff():
    for family in FAMILIES:
        for cutoff, words in (("10,20", [10, 10, 24]), ("12,30", [12, 18, 14]), ("10", [10, 34])):
            model = build(family, adaptive_input=True, adaptive_input_cutoff=cutoff)
            assert [w for w, _ in band_shapes(model.decoder.embed_tokens)] == words, cutoff


def adaptive_softmax(family, **options):
    return build(family, adaptive_softmax_cutoff="10,20", **options).decoder.adaptive_softmax


def tail_shapes(softmax):
    """[(inner dims, words)] of each AdaptiveSoftmax tail band: (C -> dims) projection, then (dims -> words)."""
    return [(band[0].weight.shape[0], band[-1].weight.shape[0]) for band in softmax.tail]


@case("adaptive_softmax_cutoff", None, "10,20")
def check_adaptive_softmax_cutoff():
    for family in FAMILIES:
        assert build(family).decoder.adaptive_softmax is None
        for cutoff, tails in (("10,20", [(4, 10), (1, 24)]), ("12", [(4, 32)])):
            decoder = build(family, adaptive_softmax_cutoff=cutoff).decoder
            softmax = decoder.adaptive_softmax
            assert isinstance(softmax, AdaptiveSoftmax) and decoder.output_projection is None
            assert softmax.cutoff == [int(c) for c in cutoff.split(",")] + [44] and tail_shapes(softmax) == tails


@case("adaptive_softmax_dropout", 0.0, 0.2)
def check_adaptive_softmax_dropout():
    for family in FAMILIES:
        for p in (0.0, 0.2):
            softmax = adaptive_softmax(family, adaptive_softmax_dropout=p)
            tail_dropouts = [m.p for m in softmax.tail.modules() if isinstance(m, nn.Dropout)]
            assert softmax.dropout_module.p == p and tail_dropouts == [p, p], (family, p)


@case("adaptive_softmax_factor", 2.0, 4.0, cli=2.0)
def check_adaptive_softmax_factor():
    for family in FAMILIES:  # tail band i (from 1) projects to 16 // factor**i dimensions
        for factor, dims in ((2.0, [8, 4]), (4.0, [4, 1])):
            softmax = adaptive_softmax(family, adaptive_softmax_factor=factor)
            assert [d for d, _ in tail_shapes(softmax)] == dims, factor


TIED = dict(ADAPTIVE, adaptive_softmax_cutoff="10,20")


def tied(model):
    """The adaptive input's parameters the adaptive softmax uses as well: [(band, 'embedding' | 'projection')]."""
    softmax = {id(p) for p in model.decoder.adaptive_softmax.parameters()}
    return sorted((band, kind) for band, seq in enumerate(model.decoder.embed_tokens.embeddings)
                  for kind, p in (("embedding", seq[0].weight), ("projection", seq[1].weight)) if id(p) in softmax)


@case("tie_adaptive_weights", False, True)
def check_tie_adaptive_weights():
    for family in FAMILIES:
        assert tied(build(family, **TIED)) == []
        assert tied(build(family, **TIED, tie_adaptive_weights=True)) == [(b, "embedding") for b in range(3)]


@case("tie_adaptive_proj", False, True)
def check_tie_adaptive_proj():
    embeddings = [(band, "embedding") for band in range(3)]
    for family in FAMILIES:  # fairseq ties the tail bands' projections (band 0 reaches the head at the model width)
        for tie_proj, projections in ((False, []), (True, [(1, "projection"), (2, "projection")])):
            model = build(family, **TIED, tie_adaptive_weights=True, tie_adaptive_proj=tie_proj)
            assert tied(model) == sorted(embeddings + projections), tie_proj


def table_rows(model):
    """Rows of the learned token table (fairseq adds pad + 1) and of each coarse scale's block table."""
    scales = [m.weight.size(0) for m in model.decoder.body.modules() if isinstance(m, ScalePositions)]
    return model.decoder.embed_positions.weight.size(0), scales


@case("max_target_positions", None, 48, cli=48)
def check_max_target_positions():
    for family in FAMILIES:
        assert build(family).decoder.max_positions() == 100_000  # sinusoidal: fairseq's limit unless set
        assert build(family, max_target_positions=48).decoder.max_positions() == 48
        longer = build(family, decoder_learned_pos=True, max_target_positions=48)
        assert table_rows(longer)[0] == 48 + 2 and set(table_rows(longer)[1]) == {24, 12}  # blocks of 2 and 4
        logits(longer, length=48)
        with pytest.raises(MsformerConfigError, match="--tokens-per-sample"):
            logits(build(family, decoder_learned_pos=True), length=48)  # the default: the 32-token samples


@case("tokens_per_sample", 32, 40, cli=40)
def check_tokens_per_sample():
    """Learned positions cover the training length (no --max-target-positions): the tables and max_positions."""
    for family in FAMILIES:
        for length in (32, 40):
            model = build(family, decoder_learned_pos=True, tokens_per_sample=length)
            assert model.decoder.max_positions() == length and table_rows(model)[0] == length + 2
            assert set(table_rows(model)[1]) == {length // 2, length // 4}


@pytest.mark.parametrize("option", OPTIONS)
def test_option_changes_the_model_as_its_help_says(option):
    assert option in CASES, f"--{option.replace('_', '-')} has no case in tests/test_options.py: add one that " \
                            f"fails if the option were ignored"
    CASES[option].check()


def test_no_case_for_an_option_that_does_not_exist():
    assert set(CASES) - set(OPTIONS) == set()


# ---------------------------------------------------------------- "<family> only" options leave the others alone
ONLY = [(option, family) for option in OPTIONS for family in FAMILIES
        if any(HELP[option].startswith(f"{other.replace('_', '-')} only:") for other in FAMILIES if other != family)]


@pytest.mark.parametrize("option,family", ONLY, ids=[f"{o}-{f}" for o, f in ONLY])
def test_family_only_option_leaves_the_other_families_unchanged(option, family):
    a, b = CASES[option].values[:2]
    assert same_model(build(family, **{option: a}), build(family, **{option: b}))


def test_family_only_options_are_found():
    assert {o for o, _ in ONLY} == {"token_layers_before_pooling", "bottom_up_combine", "top_down_combine",
                                    "retina_windows", "retina_bucketed_window", "retina_gate", "retina_select",
                                    "no_retina_recompute"}


# ---------------------------------------------------------------- the plumbing in front of build_model
def cli_flags(option, value):
    flag = "--" + option.replace("_", "-")
    return [flag] if value is True else [flag, str(value)]


def test_every_option_reaches_the_model_config_from_the_command_line():
    """fairseq-train's parser (with the task's --tokens-per-sample / --max-target-positions), then fairseq's
    conversion to the config build_model receives: each option given holds its value in both."""
    given = {option: CASES[option].cli for option in OPTIONS}
    defaults = {f.name: f.default for f in fields(MsformerLMConfig)}
    assert all(str(given[o]) != str(defaults[o]) for o in OPTIONS), "each case's cli value must differ from the default"
    argv = [CORPUS, "--user-dir", USER_DIR, "--task", "multiscale_language_modeling", "--arch", "msformer_lm"]
    for option, value in given.items():
        argv += cli_flags(option, value)
    args = fairseq_options.parse_args_and_arch(fairseq_options.get_training_parser(), argv)
    model_config = convert_namespace_to_omegaconf(args).model
    for option, value in given.items():
        assert getattr(args, option) == value, f"--{option}: parsed as {getattr(args, option)!r}"
        assert model_config[option] == value, f"--{option}: the model config holds {model_config[option]!r}"


MSFORMER_ARCHS = [arch for arch, model in ARCH_MODEL_REGISTRY.items() if model is MsformerLanguageModel]


@pytest.mark.parametrize("arch", MSFORMER_ARCHS)
def test_preset_keeps_every_option_given_explicitly(arch):
    """CLI flags win over an --arch preset (fairseq's pattern); only the family is the preset's to set."""
    given = {option: object() for option in OPTIONS if option != "family" or arch == "msformer_lm"}
    args = argparse.Namespace()
    for option, value in given.items():
        setattr(args, option, value)
    ARCH_CONFIG_REGISTRY[arch](args)
    overridden = sorted(option for option, value in given.items() if getattr(args, option) is not value)
    assert overridden == [], f"{arch} overrides {overridden} given on the command line"
    assert len(MSFORMER_ARCHS) >= 12


@pytest.mark.parametrize("arch", ["msformer_lm_retina", "msformer_lm_bottom_up_tiny", "msformer_lm"])
def test_checkpoint_saved_before_options_existed_loads_with_their_defaults(arch):
    """fairseq rebuilds a model from the config saved in its checkpoint (models.build_model, from_checkpoint=True);
    a config from before an option existed lacks it. With every option missing but the sizes, the model builds
    as the defaults say, the same as one given every default."""
    from fairseq import models
    from omegaconf import open_dict

    argv = [CORPUS, "--user-dir", USER_DIR, "--task", "multiscale_language_modeling", "--arch", arch,
            "--tokens-per-sample", "256", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
            "--decoder-attention-heads", "2"] + (["--family", "retina"] if arch == "msformer_lm" else [])
    full = convert_namespace_to_omegaconf(
        fairseq_options.parse_args_and_arch(fairseq_options.get_training_parser(), argv)).model
    old = full.copy()
    kept = {"_name", "family", "decoder_embed_dim", "decoder_ffn_embed_dim", "decoder_attention_heads",
            "tokens_per_sample", "max_target_positions"}
    with open_dict(old):
        for option in OPTIONS:
            if option not in kept:
                del old[option]
    task = build_model.__globals__["benchmark"].fake_task(40, 256)
    torch.manual_seed(0)
    loaded = models.build_model(old, task, from_checkpoint=True)
    torch.manual_seed(0)
    fresh = models.build_model(full, task, from_checkpoint=True)
    assert same_model(loaded.eval(), fresh.eval())
