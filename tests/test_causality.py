"""design.md §4.1 and §3: no future leakage, and right padding never changes a real position's output.

Leak checks are exhaustive: every position t of a sample whose length is off the grid, with dropout on (the
same masks on both sides: a fixed seed before each forward), both by perturbing the future and by gradients.
"""
import pytest
import torch

from conftest import build_model, log_probs, random_tokens

BOTTOM_UP = [
    # (pool_factors, scale_layers, pool_type, token_layers_before_pooling, shift_rule, adaptive[, combine])
    ("2", "1", "mean", 0, "complete", False),
    ("3", "1", "linear", 0, "hourglass", False),
    ("4", "2", "max", 1, "complete", False),
    ("4,4", "1,1", "mean", 0, "complete", False),
    ("4,4", "1,1", "linear", 0, "complete", True),
    ("2,3", "1,1", "max", 1, "complete", True),
    ("2,3,4", "1,1,1", "linear", 1, "complete", False),
    ("2,3,4", "1,1,1", "mean", 0, "hourglass", False),
    ("2,2,2", "1,1,1", "mean", 1, "complete", False),
    ("3,2,2", "1,1,1", "mean", 0, "complete", True),
    ("4,4", "1,1", "mean", 0, "hourglass", False),
    ("2,2,2", "1,1,1", "linear", 1, "hourglass", True),
    ("3,2", "1,1", "max", 0, "hourglass", False),
    # Hourglass-style residual upsampling, alone and with the attention aggregation
    ("4,4", "1,1", "mean", 1, "hourglass", False, "residual"),
    ("2,3", "1,1", "linear", 0, "complete", True, "residual"),
    ("3,4", "1,1", "linear", 0, "hourglass", False, "residual"),
    ("2,2,2", "1,1,1", "max", 1, "complete", False, "both"),
    ("3,2", "1,2", "mean", 0, "hourglass", True, "both"),
]
TOP_DOWN = [
    # (pool_factors, scale_layers, pool_type, top_down_combine, shift_rule, adaptive)
    ("2", "1", "mean", "add", "complete", False),
    ("3", "1", "max", "add", "hourglass", False),
    ("4,4", "1,1", "linear", "add", "complete", True),
    ("2,3", "1,1", "max", "concat", "complete", False),
    ("2,3,4", "1,1,1", "linear", "add", "complete", False),
    ("2,3,4", "1,1,1", "mean", "concat", "hourglass", False),
    ("2,2,2", "1,1,1", "mean", "concat", "complete", True),
    ("4,4", "1,1", "mean", "add", "hourglass", False),
    ("2,2,2", "1,1,1", "linear", "concat", "hourglass", True),
]
RETINA = [
    # (pool_factors, retina_windows, pool_type, token_layers, adaptive)
    ("4", "8,-1", "mean", 2, False),
    ("3", "5,-1", "max", 2, False),
    ("4,4", "16,48,-1", "mean", 2, False),
    ("4,4", "12,40,-1", "max", 1, True),  # windows that do not divide the sample length
    ("2,2", "5,9,-1", "linear", 2, False),
    ("2,2", "6,14,22", "mean", 2, True),  # bounded last scale: the oldest tokens are not read at all
    ("3,2", "7,16,-1;20,40,-1", "mean", 2, False),  # per-layer windows
    ("2,3,4", "3,9,24,-1", "linear", 1, False),
    ("2,2,2", "3,9,17,-1", "linear", 1, False),
]
ADAPTIVE = dict(adaptive_input=True, adaptive_input_cutoff="10,20", adaptive_softmax_cutoff="10,20",
                tie_adaptive_weights=True, adaptive_input_factor=2, adaptive_softmax_factor=2)
DROPOUT = dict(dropout=0.1, attention_dropout=0.1, activation_dropout=0.1)


def bottom_up_model(factors, layers, pool, before, rule, adaptive, combine="attention", **extra):
    options = dict(pool_factors=factors, scale_layers=layers, pool_type=pool, token_layers_before_pooling=before,
                   shift_rule=rule, token_layers=1, bottom_up_combine=combine, **(ADAPTIVE if adaptive else {}))
    return build_model("msformer_lm_bottom_up", **options, **extra)


def top_down_model(factors, layers, pool, combine, rule, adaptive, **extra):
    options = dict(pool_factors=factors, scale_layers=layers, pool_type=pool, top_down_combine=combine,
                   shift_rule=rule, token_layers=1, **(ADAPTIVE if adaptive else {}))
    return build_model("msformer_lm_top_down", **options, **extra)


def retina_model(factors, windows, pool, layers, adaptive, **extra):
    options = dict(pool_factors=factors, retina_windows=windows, pool_type=pool, token_layers=layers,
                   **(ADAPTIVE if adaptive else {}))
    return build_model("msformer_lm_retina", **options, **extra)


def case_id(family, config):
    return family + "-" + "-".join(map(str, config))


CASES = (
    [pytest.param(bottom_up_model, c, id=case_id("bottom_up", c)) for c in BOTTOM_UP]
    + [pytest.param(top_down_model, c, id=case_id("top_down", c)) for c in TOP_DOWN]
    + [pytest.param(retina_model, c, id=case_id("retina", c)) for c in RETINA]
)


def features(model, tokens, seed):
    """Final features (B, T, C) with dropout masks fixed by `seed` (same shape -> same masks)."""
    torch.manual_seed(seed)
    return model(tokens, features_only=True)[0]


def assert_no_leak(model, dictionary, length):
    """For EVERY t: perturbing tokens after t leaves positions <= t unchanged, and d out_t / d input_{>t} == 0.

    Each t is one row of a batch (row t probes position t), so a whole sweep is two forwards and one backward;
    with dropout on, both forwards draw the same masks (same seed, same shape), row by row.
    """
    g = torch.Generator().manual_seed(1)
    tokens = random_tokens(dictionary, 1, length, g).repeat(length, 1)  # (T, T): row t probes position t
    perturbed = tokens.clone()
    for t in range(length - 1):
        perturbed[t, t + 1 :] = random_tokens(dictionary, 1, length - t - 1, g)
    with torch.no_grad():
        reference, changed = features(model, tokens, seed=7), features(model, perturbed, seed=7)  # (T, T, C)
    for t in range(length - 1):
        torch.testing.assert_close(changed[t, : t + 1], reference[t, : t + 1], rtol=0, atol=1e-5,
                                   msg=lambda m: f"a position <= {t} saw a later token: {m}")
        assert not torch.allclose(changed[t, t + 1 :], reference[t, t + 1 :]), "later positions must react"

    # gradients of output t (its final features: the softmax reads nothing else) w.r.t. the embedded inputs
    captured = {}
    hook = model.decoder.embed_tokens.register_forward_hook(lambda m, i, out: captured.update(emb=out))
    try:
        out = features(model, tokens, seed=7)  # (T, T, C)
    finally:
        hook.remove()
    probes = torch.arange(length)
    (grad,) = torch.autograd.grad(out[probes, probes].pow(2).sum(), captured["emb"])  # (T, T, C): row t = d out_t
    depends = grad.abs().sum(-1) > 0  # (T outputs, T inputs)
    leaks = (depends & ~torch.ones(length, length, dtype=torch.bool).tril()).nonzero().tolist()
    assert not leaks, f"(output, later input) pairs that depend: {leaks[:10]}"
    assert depends.diagonal().all(), "output t must depend on input t"


@pytest.mark.parametrize("make_model,config", CASES)
def test_no_future_leakage_at_any_position(make_model, config):
    """Inference mode, and length 41: off every grid used here, so the decoder pads inside."""
    model, dictionary = make_model(*config)
    assert_no_leak(model, dictionary, length=41)


@pytest.mark.parametrize("make_model,config", CASES)
def test_no_future_leakage_with_dropout(make_model, config):
    """Training mode with dropout everywhere (embeddings, residuals, attention weights, FFN)."""
    model, dictionary = make_model(*config, **DROPOUT)
    assert_no_leak(model.train(), dictionary, length=41)


# rotary positions (--rotary-positions) rotate queries and keys by ready positions: every other config of each
# family, every shift rule, combine mode and pooling type among them; every other one of those with gated FFNs too,
# and every third one rotating all of each head's dimensions (--rotary-fraction 1)
ROTARY_CASES = [pytest.param(*case.values, {"ffn_glu": i % 2 == 1, "rotary_fraction": 1.0 if i % 3 == 2 else 0.5},
                             id=case.id + ("-rotary-glu" if i % 2 else "-rotary") + ("-all-dims" if i % 3 == 2 else ""))
                for i, case in enumerate(CASES[::2])]


@pytest.mark.parametrize("make_model,config,extra", ROTARY_CASES)
def test_no_future_leakage_with_rotary_positions(make_model, config, extra):
    model, dictionary = make_model(*config, rotary_positions=True, **extra, **DROPOUT)
    assert_no_leak(model.train(), dictionary, length=41)
    assert_no_leak(model.eval(), dictionary, length=41)


# retina's options, each over every retina config it allows, rotary positions on every other one, in training and
# in inference mode:
# - gated scales (--retina-gate): a scale a query reads nothing of is computed over unmasked keys and multiplied by
#   zero;
# - selected blocks (--retina-select): a query picks among blocks that end before its window, by scores of its own
#   query (1 or 3 blocks);
# - bucketed windows (--retina-bucketed-window): the window starts a bucket before the query's own (configs whose
#   windows are multiples of the first pooling factor), gated or not, with selected blocks on one.
def bucketable(config):
    factors, windows = config[0], config[1]
    return all(int(group.split(",")[0]) % int(factors.split(",")[0]) == 0 for group in windows.split(";"))


RETINA_OPTION_CASES = (
    [pytest.param(c, {"retina_gate": True, "rotary_positions": i % 2 == 1, "ffn_glu": i % 2 == 1},
                  id=case_id("retina", c) + "-gate") for i, c in enumerate(RETINA)]
    + [pytest.param(c, {"retina_gate": True, "rotary_positions": i % 2 == 0, "retina_select": 1 + 2 * (i % 2)},
                    id=case_id("retina", c) + "-select") for i, c in enumerate(RETINA)]
    + [pytest.param(c, {"retina_bucketed_window": True, "retina_gate": i % 2 == 1, "rotary_positions": i % 2 == 0,
                        "retina_select": 2 if i == 3 else 0}, id=case_id("retina", c) + "-bucketed")
       for i, c in enumerate(filter(bucketable, RETINA))]
)


def applied(layer, extra):
    """Whether a retina layer carries the options of `extra` (so a case cannot pass with an option ignored)."""
    return ((layer.gate is not None) == extra.get("retina_gate", False)
            and layer.select == extra.get("retina_select", 0)
            and layer.bucketed == extra.get("retina_bucketed_window", False))


@pytest.mark.parametrize("config,extra", RETINA_OPTION_CASES)
def test_no_future_leakage_with_retina_options(config, extra):
    model, dictionary = retina_model(*config, **extra, **DROPOUT)
    assert all(applied(layer.attn, extra) for layer in model.decoder.body.layers)
    assert_no_leak(model.train(), dictionary, length=41)
    assert_no_leak(model.eval(), dictionary, length=41)


@pytest.mark.parametrize("make_model,config", CASES[1::6])
def test_no_future_leakage_without_scale_positions(make_model, config):
    """--no-scale-positions with rotary positions: the blocks are placed by their ready positions alone."""
    model, dictionary = make_model(*config, no_scale_positions=True, rotary_positions=True, **DROPOUT)
    assert_no_leak(model.train(), dictionary, length=41)


@pytest.mark.parametrize("make_model,config", CASES[::4])
def test_evaluation_turns_every_dropout_off(make_model, config):
    """Built with dropout everywhere, a model in eval mode scores exactly as its twin without dropout (same
    weights), while in training mode it does not: no dropout path ignores the mode."""
    with_dropout, dictionary = make_model(*config, **DROPOUT)
    without, _ = make_model(*config)
    tokens = random_tokens(dictionary, 2, 41, torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = log_probs(without, tokens)
        torch.testing.assert_close(log_probs(with_dropout.eval(), tokens), reference, rtol=0, atol=1e-6)
        assert not torch.allclose(log_probs(with_dropout.train(), tokens), reference, atol=1e-3)


def give_pad_a_nonzero_embedding(model, dictionary):
    """fairseq zeroes the pad row; a real one makes 'padded in the batch' differ from the decoder's own padding."""
    embed = model.decoder.embed_tokens
    table = embed.embeddings[0][0] if hasattr(embed, "embeddings") else embed  # AdaptiveInput: band 0 holds pad
    with torch.no_grad():
        table.weight[dictionary.pad()] = torch.randn(table.weight.size(1), generator=torch.Generator().manual_seed(0))
    pad = torch.tensor([[dictionary.pad()]])
    assert embed(pad).abs().sum() > 0


PADDING_CASES = [CASES[i] for i in (3, 5, 7, 10, 14, 17)] + [
    case for case in CASES if case.id in ("top_down-2,3,4-1,1,1-linear-add-complete-False",
                                          "top_down-2,2,2-1,1,1-linear-concat-hourglass-True",
                                          "retina-4,4-12,40,-1-max-1-True", "retina-2,2-6,14,22-mean-2-True",
                                          "retina-2,3,4-3,9,24,-1-linear-1-False")
]


@pytest.mark.parametrize("make_model,config", PADDING_CASES)
def test_right_padding_never_changes_real_positions(make_model, config):
    """A short row in a right-padded batch scores exactly as it does alone, for lengths on and off the grid.

    The pad row is non-zero and the rows are padded to different lengths than the row alone would be, so the two
    sides really compute different things at the padded positions."""
    model, dictionary = make_model(*config)
    give_pad_a_nonzero_embedding(model, dictionary)
    g = torch.Generator().manual_seed(2)
    batch = random_tokens(dictionary, 3, 53, g)
    unpadded = log_probs(model, batch)[0]  # (53, V)
    for length in (1, 7, 16, 23, 33, 48):
        padded = batch.clone()
        padded[0, length:] = dictionary.pad()
        padded[1, length + (53 - length) // 2 :] = dictionary.pad()  # another row with a different length
        alone = log_probs(model, batch[:1, :length])[0]
        in_batch = log_probs(model, padded)[0]
        torch.testing.assert_close(in_batch[:length], alone, rtol=0, atol=1e-5)
        # the pads are real, non-zero inputs: they do change what the model computes after the row ends
        assert not torch.allclose(in_batch[length:], unpadded[length:])


@pytest.mark.parametrize("arch,options", [
    ("msformer_lm_bottom_up", dict(pool_factors="4,4", scale_layers="1,1")),
    ("msformer_lm_top_down", dict(pool_factors="4,4", scale_layers="1,1", shift_rule="hourglass")),
    ("msformer_lm_retina", dict(pool_factors="4,4", retina_windows="8,24,-1")),
])
def test_longest_input_off_the_grid(arch, options):
    """max_positions = 100 is not a multiple of the 16-token grid: inputs of 97..100 tokens are padded to 112,
    and every scale's position table must cover the padded blocks; longer inputs get a clear error."""
    model, dictionary = build_model(arch, tokens_per_sample=100, decoder_learned_pos=True, **options)
    tokens = random_tokens(dictionary, 2, 100)
    for length in (97, 100):
        assert torch.isfinite(log_probs(model, tokens[:, :length])).all()
    with pytest.raises(ValueError, match="longer than (the|this) model's"):
        model(random_tokens(dictionary, 1, 101))
