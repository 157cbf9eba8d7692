"""design.md §4.1 and §3: no future leakage, and right padding never changes a real position's output."""
import pytest
import torch

from conftest import build_model, log_probs, random_tokens

BOTTOM_UP = [
    # (pool_factors, scale_layers, pool_type, token_layers_before_pooling, shift_rule, adaptive)
    ("2", "1", "mean", 0, "complete", False),
    ("4", "2", "max", 1, "complete", False),
    ("4,4", "1,1", "mean", 0, "complete", False),
    ("4,4", "1,1", "linear", 0, "complete", True),
    ("2,3", "1,1", "max", 1, "complete", True),
    ("2,2,2", "1,1,1", "mean", 1, "complete", False),
    ("2,2,2", "1,1,1", "linear", 0, "complete", False),
    ("3,2,2", "1,1,1", "mean", 0, "complete", True),
    ("4,4", "1,1", "mean", 0, "hourglass", False),
    ("2,2,2", "1,1,1", "linear", 1, "hourglass", True),
    ("3,2", "1,1", "max", 0, "hourglass", False),
    # (..., bottom_up_combine): Hourglass-style residual upsampling, alone and with the attention aggregation
    ("4,4", "1,1", "mean", 1, "hourglass", False, "residual"),
    ("2,3", "1,1", "linear", 0, "complete", True, "residual"),
    ("2,2,2", "1,1,1", "max", 1, "complete", False, "both"),
    ("3,2", "1,2", "mean", 0, "hourglass", True, "both"),
]
TOP_DOWN = [
    ("2", "1", "mean", "add", "complete", False),
    ("4,4", "1,1", "linear", "add", "complete", True),
    ("2,3", "1,1", "max", "concat", "complete", False),
    ("2,2,2", "1,1,1", "mean", "concat", "complete", True),
    ("4,4", "1,1", "mean", "add", "hourglass", False),
    ("2,2,2", "1,1,1", "linear", "concat", "hourglass", True),
]
ADAPTIVE = dict(adaptive_input=True, adaptive_input_cutoff="10,20", adaptive_softmax_cutoff="10,20",
                tie_adaptive_weights=True, adaptive_input_factor=2, adaptive_softmax_factor=2)


def bottom_up_model(factors, layers, pool, before, rule, adaptive, combine="attention"):
    options = dict(pool_factors=factors, scale_layers=layers, pool_type=pool, token_layers_before_pooling=before,
                   shift_rule=rule, token_layers=1, bottom_up_combine=combine, **(ADAPTIVE if adaptive else {}))
    return build_model("msformer_lm_bottom_up", **options)


def top_down_model(factors, layers, pool, combine, rule, adaptive):
    options = dict(pool_factors=factors, scale_layers=layers, pool_type=pool, top_down_combine=combine,
                   shift_rule=rule, token_layers=1, **(ADAPTIVE if adaptive else {}))
    return build_model("msformer_lm_top_down", **options)


def retina_model(factors, windows, pool, layers, adaptive):
    options = dict(pool_factors=factors, retina_windows=windows, pool_type=pool, token_layers=layers,
                   **(ADAPTIVE if adaptive else {}))
    return build_model("msformer_lm_retina", **options)


CASES = [pytest.param(bottom_up_model, c, id="bottom_up-" + "-".join(map(str, c))) for c in BOTTOM_UP] + [
    pytest.param(top_down_model, c, id="top_down-" + "-".join(map(str, c))) for c in TOP_DOWN
]


def assert_no_leak(model, dictionary, length=37):
    """Perturbing tokens after t leaves positions <= t unchanged; d out_t / d input_{>t} == 0."""
    g = torch.Generator().manual_seed(1)
    tokens = random_tokens(dictionary, 2, length, g)
    reference = log_probs(model, tokens)
    for t in (0, 1, 5, 12, 17, length - 2):
        perturbed = tokens.clone()
        perturbed[:, t + 1 :] = random_tokens(dictionary, 2, length - t - 1, g)
        assert (perturbed[:, t + 1 :] != tokens[:, t + 1 :]).any()
        changed = log_probs(model, perturbed)
        torch.testing.assert_close(changed[:, : t + 1], reference[:, : t + 1], rtol=0, atol=1e-5)
        assert not torch.allclose(changed[:, t + 1 :], reference[:, t + 1 :]), "later positions must react"

    # gradients of output t (its final features: the softmax reads nothing else) w.r.t. the embedded inputs
    captured = {}
    hook = model.decoder.embed_tokens.register_forward_hook(lambda m, i, out: captured.update(emb=out))
    try:
        features, _ = model(tokens, features_only=True)  # (B, T, C)
    finally:
        hook.remove()
    emb = captured["emb"]
    for t in (0, 3, 16, length - 2):
        (grad,) = torch.autograd.grad(features[:, t].pow(2).sum(), emb, retain_graph=True)
        assert grad[:, t + 1 :].abs().max() == 0, f"output {t} depends on a later input"
        assert grad[:, t].abs().max() > 0, "output t must depend on input t"


@pytest.mark.parametrize("make_model,config", CASES)
def test_no_future_leakage(make_model, config):
    model, dictionary = make_model(*config)
    assert_no_leak(model, dictionary)


PADDING_CASES = CASES[2:4] + CASES[-2:] + [
    pytest.param(retina_model, ("4,4", "12,40,-1", "mean", 2, True), id="retina-12,40,-1"),
    pytest.param(retina_model, ("2,2", "6,14,22", "linear", 2, False), id="retina-6,14,22"),
]


@pytest.mark.parametrize("make_model,config", PADDING_CASES)
def test_right_padding_never_changes_real_positions(make_model, config):
    """A short row in a right-padded batch scores exactly as it does alone (any length, on or off the grid)."""
    model, dictionary = make_model(*config)
    g = torch.Generator().manual_seed(2)
    batch = random_tokens(dictionary, 3, 40, g)
    for length in (1, 7, 16, 23, 33):
        padded = batch.clone()
        padded[0, length:] = dictionary.pad()
        alone = log_probs(model, batch[:1, :length])
        in_batch = log_probs(model, padded)[:1, :length]
        torch.testing.assert_close(in_batch, alone, rtol=0, atol=1e-5)


RETINA = [
    # (pool_factors, retina_windows, pool_type, token_layers, adaptive) -- sample length 37, padded to the grid
    ("4", "8,-1", "mean", 2, False),
    ("4,4", "16,48,-1", "mean", 2, False),
    ("4,4", "12,40,-1", "max", 1, True),  # windows that do not divide the sample length
    ("2,2", "5,9,-1", "linear", 2, False),
    ("2,2", "6,14,22", "mean", 2, True),  # bounded last scale: the oldest tokens are not read at all
    ("3,2", "7,16,-1;20,40,-1", "mean", 2, False),  # per-layer windows
    ("2,2,2", "3,9,17,-1", "linear", 1, False),
]


@pytest.mark.parametrize("config", RETINA, ids=["-".join(map(str, c)) for c in RETINA])
def test_retina_no_future_leakage(config):
    model, dictionary = retina_model(*config)
    assert_no_leak(model, dictionary)


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
    with pytest.raises(ValueError, match="longer than the model's max_positions"):
        model(random_tokens(dictionary, 1, 101))
