"""design.md §3: output t depends on EVERY coarse block the causality rule says is ready at t, and on no other.

The no-leak tests only show that nothing is read too early. These show the coarse scales are really used, and
read as soon as the rule allows: a block read one token late, one read early, or a scale dropped altogether
(say, a combine step that forgets the upsampled context) each fail here.

The ready positions are written out below from design.md, not taken from the package's ScaleGrid, so an
off-by-one there cannot move the expectation along with the model. The two rules expect different tables
(hourglass: block j of K-token blocks at jK; complete: at (j+1)K - 1), so "the hourglass rule is fresher" is
checked too.
"""
import pytest
import torch

from conftest import build_model, random_tokens


def ready_positions(rule, block_length, n):
    """(n,) the first position at which block j of a scale with `block_length`-token blocks may be read."""
    j = torch.arange(n)
    if rule == "complete":  # block j covers [jK, (j+1)K): complete at its last token
        return (j + 1) * block_length - 1
    return j * block_length  # hourglass: shifted right by K - 1 before pooling, so it holds tokens <= jK


def coarse_stacks(model):
    """The modules whose outputs are the states of coarse scales 1 .. S-1 (B, T / K_s, C)."""
    body = model.decoder.body
    return list(body.scales) if hasattr(body, "scales") else list(body.stacks)[1:]


CASES = [
    # (arch, options)
    *[("msformer_lm_bottom_up", dict(pool_factors=f, scale_layers=n, shift_rule=rule, bottom_up_combine=combine,
                                     token_layers_before_pooling=before, pool_type=pool))
      for f, n, rule, combine, before, pool in [
          ("4,4", "1,1", "complete", "attention", 0, "mean"),
          ("4,4", "1,1", "hourglass", "attention", 1, "linear"),
          ("2,3", "1,1", "complete", "residual", 1, "max"),
          ("4,2", "1,1", "hourglass", "residual", 0, "linear"),
          ("2,3,2", "1,1,1", "complete", "both", 0, "mean"),
          ("3,2", "1,1", "hourglass", "both", 1, "mean"),
      ]],
    *[("msformer_lm_top_down", dict(pool_factors=f, scale_layers=n, shift_rule=rule, top_down_combine=combine,
                                    pool_type=pool))
      for f, n, rule, combine, pool in [
          ("4,4", "1,1", "complete", "add", "mean"),
          ("4,4", "1,1", "hourglass", "add", "linear"),
          ("2,3", "1,1", "complete", "concat", "max"),
          ("2,3,2", "1,1,1", "hourglass", "concat", "mean"),
      ]],
]


@pytest.mark.parametrize("arch,options", CASES, ids=[
    f"{arch.split('_lm_')[1]}-{o['pool_factors']}-{o['shift_rule']}-"
    f"{o.get('bottom_up_combine', o.get('top_down_combine'))}" for arch, o in CASES
])
def test_output_t_reads_exactly_the_blocks_ready_at_t(arch, options):
    model, dictionary = build_model(arch, token_layers=1, **options)
    grid = [1]
    for r in map(int, options["pool_factors"].split(",")):
        grid.append(grid[-1] * r)
    length = grid[-1] * -(-40 // grid[-1])  # on the grid: no internal padding to reason about
    tokens = random_tokens(dictionary, 1, length, torch.Generator().manual_seed(8)).repeat(length, 1)  # row t: probe t

    states = {}  # scale -> its states (top-down runs the coarsest first)
    hooks = [stack.register_forward_hook(lambda m, i, out, s=s: states.setdefault(s, out))
             for s, stack in enumerate(coarse_stacks(model), start=1)]
    try:
        out, _ = model(tokens, features_only=True)  # (T, T, C)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(states) == len(grid) - 1, "every coarse scale runs once"
    probes = torch.arange(length)
    scales = sorted(states)
    grads = torch.autograd.grad(out[probes, probes].pow(2).sum(), [states[s] for s in scales], allow_unused=True)
    rule = options["shift_rule"]
    for s, grad in zip(scales, grads):
        assert grad is not None, f"scale {s} does not reach the output at all"
        reads = grad.abs().sum(-1) > 0  # (T outputs, T / K_s blocks): output t depends on block j
        expected = ready_positions(rule, grid[s], reads.size(1)).unsqueeze(0) <= probes.unsqueeze(1)
        early = (reads & ~expected).nonzero().tolist()
        late = (expected & ~reads).nonzero().tolist()
        assert not early, f"scale {s}: (output, block) read before the block is ready: {early[:8]}"
        assert not late, f"scale {s}: (output, block) not read though the block is ready: {late[:8]}"

