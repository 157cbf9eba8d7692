"""design.md §4.2: decoding token by token with incremental_state equals one full forward pass."""
import pytest
import torch

from conftest import build_model, log_probs, random_tokens

CONFIGS = [
    ("msformer_lm_bottom_up", dict(pool_factors="2,2", scale_layers="1,1", token_layers_before_pooling=1)),
    ("msformer_lm_bottom_up", dict(pool_factors="4,2", scale_layers="1,1", shift_rule="hourglass")),
    ("msformer_lm_top_down", dict(pool_factors="2,3", scale_layers="1,1", top_down_combine="concat")),
    ("msformer_lm_retina", dict(pool_factors="2,2", retina_windows="5,9,-1")),
]


@pytest.mark.parametrize("arch,options", CONFIGS, ids=[f"{a}-{i}" for i, (a, _) in enumerate(CONFIGS)])
def test_incremental_equals_full_pass(arch, options):
    model, dictionary = build_model(arch, token_layers=1, **options)
    tokens = random_tokens(dictionary, 3, 29, torch.Generator().manual_seed(3))
    full = log_probs(model, tokens)
    state = {}
    steps = []
    for t in range(1, tokens.size(1) + 1):  # the generator passes the whole prefix at every step
        steps.append(log_probs(model, tokens[:, :t], incremental_state=state)[:, -1])
    torch.testing.assert_close(torch.stack(steps, dim=1), full, rtol=0, atol=1e-5)
