"""Half precision: every family runs in bfloat16 end to end (what --bf16 / --memory-efficient-bf16 do to the
weights and buffers), so no fp32 tensor is created in forward. CPU bf16 stands in for the GPU here; fp16 and
--bf16 through fairseq-train need CUDA and are run on a GPU machine, not in this suite."""
import pytest
import torch

from conftest import build_model, log_probs, random_tokens

FAMILIES = [
    ("msformer_lm_bottom_up", dict(pool_factors="2,2", scale_layers="1,1", token_layers_before_pooling=1,
                                   pool_type="linear")),
    ("msformer_lm_top_down", dict(pool_factors="4,2", scale_layers="1,1", shift_rule="hourglass",
                                  top_down_combine="concat")),
    ("msformer_lm_retina", dict(pool_factors="2,2", retina_windows="5,9,-1", pool_type="max")),
]


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
