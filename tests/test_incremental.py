"""design.md §4.2: incremental decoding (per-scale caches) equals the full pass; beam search stays right."""
from types import SimpleNamespace

import pytest
import torch
from fairseq import search
from fairseq.sequence_generator import SequenceGenerator
from fairseq.tasks.language_modeling import LanguageModelingTask

from conftest import build_model, generated_log_probs, log_probs, random_tokens, sampled_log_probs

ADAPTIVE = dict(adaptive_input=True, adaptive_input_cutoff="10,20", adaptive_softmax_cutoff="10,20",
                tie_adaptive_weights=True, adaptive_input_factor=2, adaptive_softmax_factor=2)
CONFIGS = {  # 40 tokens cross several block boundaries at every scale of each config
    "bottom_up-2,2-before": ("msformer_lm_bottom_up", dict(pool_factors="2,2", scale_layers="1,2",
                                                           token_layers_before_pooling=1)),
    "bottom_up-4,4-linear": ("msformer_lm_bottom_up", dict(pool_factors="4,4", scale_layers="1,1",
                                                           pool_type="linear", **ADAPTIVE)),
    "bottom_up-4,2-hourglass": ("msformer_lm_bottom_up", dict(pool_factors="4,2", scale_layers="1,1",
                                                              shift_rule="hourglass", pool_type="max")),
    "bottom_up-2,2,2": ("msformer_lm_bottom_up", dict(pool_factors="2,2,2", scale_layers="1,1,1")),
    "bottom_up-4,2-residual": ("msformer_lm_bottom_up", dict(pool_factors="4,2", scale_layers="1,1",
                                                             bottom_up_combine="residual", shift_rule="hourglass",
                                                             token_layers_before_pooling=1)),
    "bottom_up-2,3-both": ("msformer_lm_bottom_up", dict(pool_factors="2,3", scale_layers="1,1",
                                                         bottom_up_combine="both", pool_type="linear")),
    "top_down-2,3-concat": ("msformer_lm_top_down", dict(pool_factors="2,3", scale_layers="1,1",
                                                         top_down_combine="concat")),
    "top_down-4,4-hourglass": ("msformer_lm_top_down", dict(pool_factors="4,4", scale_layers="1,1",
                                                            shift_rule="hourglass", pool_type="linear")),
    "top_down-2,2,2-adaptive": ("msformer_lm_top_down", dict(pool_factors="2,2,2", scale_layers="1,1,1",
                                                             decoder_learned_pos=True, **ADAPTIVE)),
    "retina-2,2-unbounded": ("msformer_lm_retina", dict(pool_factors="2,2", retina_windows="5,9,-1")),
    "retina-4,4-per-layer": ("msformer_lm_retina", dict(pool_factors="4,4", retina_windows="6,22,-1;12,40,-1")),
    "retina-2,2-bounded-linear": ("msformer_lm_retina", dict(pool_factors="2,2", retina_windows="3,7,15",
                                                             pool_type="linear", **ADAPTIVE)),
    "retina-3,2,2-max": ("msformer_lm_retina", dict(pool_factors="3,2,2", retina_windows="4,10,22,-1",
                                                    pool_type="max")),
}
# rotary positions (--rotary-positions): a decoding step rotates what it forms at t, the full pass at ready positions
CONFIGS.update({name + "-rotary": (arch, dict(options, rotary_positions=True)) for name, (arch, options) in list(CONFIGS.items())
                if name in ("bottom_up-2,2-before", "bottom_up-4,2-residual", "bottom_up-2,3-both", "bottom_up-2,2,2",
                            "top_down-2,3-concat", "top_down-4,4-hourglass", "retina-4,4-per-layer",
                            "retina-2,2-bounded-linear")})
CONFIGS.update({name + "-glu": (arch, dict(options, ffn_glu=True, activation_fn="gelu"))
                for name, (arch, options) in list(CONFIGS.items()) if name in ("bottom_up-2,3-both-rotary", "top_down-2,3-concat-rotary", "retina-4,4-per-layer-rotary")})
# rotating all of each head's dimensions (--rotary-fraction 1, local-attention's choice)
CONFIGS.update({name + "-all-dims": (arch, dict(options, rotary_fraction=1.0)) for name, (arch, options) in list(CONFIGS.items())
                if name in ("bottom_up-2,3-both-rotary-glu", "top_down-4,4-hourglass-rotary", "retina-4,4-per-layer-rotary-glu")})


# gated scales (--retina-gate): each scale read with its own softmax, mixed by the query's gates
CONFIGS.update({name + "-gate": (arch, dict(options, retina_gate=True)) for name, (arch, options) in list(CONFIGS.items())
                if name in ("retina-2,2-unbounded", "retina-2,2-bounded-linear", "retina-4,4-per-layer-rotary-glu-all-dims")})
# selected blocks (--retina-select): the cache keeps every token and coarsest block, the step ranks them as the
# full pass does
CONFIGS.update({name + "-select": (arch, dict(options, retina_select=2)) for name, (arch, options) in list(CONFIGS.items())
                if name.endswith("-gate")})

# bucketed windows (--retina-bucketed-window): the cache drops tokens a bucket at a time
CONFIGS.update({
    "retina-4,4-bucketed-gate": ("msformer_lm_retina", dict(pool_factors="4,4", retina_windows="8,24,-1",
                                                             retina_bucketed_window=True, retina_gate=True)),
    "retina-2,2-bucketed-bounded": ("msformer_lm_retina", dict(pool_factors="2,2", retina_windows="4,8,16",
                                                                retina_bucketed_window=True, rotary_positions=True)),
})

# no position vectors at the coarse scales (--no-scale-positions), with rotary positions placing the blocks
CONFIGS.update({name + "-no-scale-pos": (arch, dict(options, no_scale_positions=True))
                for name, (arch, options) in list(CONFIGS.items())
                if name in ("bottom_up-2,3-both-rotary", "top_down-4,4-hourglass-rotary", "retina-4,4-per-layer-rotary-glu-all-dims-gate")})


def model_for(name):
    arch, options = CONFIGS[name]
    return build_model(arch, token_layers=2, **options)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_incremental_equals_full_pass(name):
    model, dictionary = model_for(name)
    tokens = random_tokens(dictionary, 3, 40, torch.Generator().manual_seed(3))
    full = log_probs(model, tokens)
    state, steps = {}, []
    with torch.no_grad():
        for t in range(1, tokens.size(1) + 1):  # the generator passes the whole prefix at every step
            steps.append(log_probs(model, tokens[:, :t], incremental_state=state)[:, -1])
    torch.testing.assert_close(torch.stack(steps, dim=1), full.detach(), rtol=0, atol=1e-5)


def test_incremental_catches_up_on_a_whole_prompt():
    """A first call with a whole prompt (not one token) fills the caches position by position."""
    model, dictionary = model_for("bottom_up-2,2-before")
    tokens = random_tokens(dictionary, 2, 19, torch.Generator().manual_seed(4))
    full = log_probs(model, tokens)
    state = {}
    with torch.no_grad():
        log_probs(model, tokens[:, :11], incremental_state=state)
        last = log_probs(model, tokens, incremental_state=state)[:, -1]
    torch.testing.assert_close(last, full[:, -1].detach(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["bottom_up-4,2-hourglass", "bottom_up-4,2-residual", "top_down-2,2,2-adaptive",
                                  "retina-2,2-bounded-linear", "bottom_up-2,3-both-rotary", "retina-4,4-per-layer-rotary"])
def test_beam_search_scores_equal_full_pass(name):
    """SequenceGenerator with beam 4 (reorder_incremental_state at every step): each hypothesis's per-token
    scores equal what one full forward pass gives the same tokens."""
    model, dictionary = model_for(name)
    generator = SequenceGenerator([model], dictionary, beam_size=4, max_len_b=30, min_len=25)
    prefix = random_tokens(dictionary, 2, 5, torch.Generator().manual_seed(5))
    sample = {"net_input": {"src_tokens": prefix, "src_lengths": torch.full((2,), 5)}}
    with torch.no_grad():
        hypotheses = generator.generate([model], sample, prefix_tokens=prefix, bos_token=dictionary.eos())
        for row in hypotheses:
            assert len(row) == 4
            for hypo in row:
                lprobs = generated_log_probs(model, dictionary, hypo["tokens"])  # (L, V)
                scores = lprobs.gather(-1, hypo["tokens"].unsqueeze(-1)).squeeze(-1)
                torch.testing.assert_close(hypo["positional_scores"], scores, rtol=0, atol=1e-4)


MAX_LEN = 24  # generated hypotheses: at most 24 tokens, then eos


def interactive_batch(dictionary, prompts):
    """Prompts read together, as fairseq-interactive batches them (--buffer-size): the language_modeling task's
    own inference dataset (eos prepended, rows right-padded to the longest prompt) and its inference_step."""
    task = LanguageModelingTask(SimpleNamespace(add_bos_token=False), dictionary)
    rows = [torch.cat([p, p.new_tensor([dictionary.eos()])]) for p in prompts]  # encode_line appends eos
    dataset = task.build_dataset_for_inference(rows, [len(r) for r in rows])
    return task, dataset.collater([dataset[i] for i in range(len(rows))])


def generate(model, dictionary, prompts, seed=0, **options):
    """Hypotheses for a batch of prompts of any lengths: [per prompt: [hypothesis dicts]]."""
    task, sample = interactive_batch(dictionary, prompts)
    generator = SequenceGenerator([model], dictionary, max_len_b=MAX_LEN, **options)
    torch.manual_seed(seed)  # sampling draws from torch's generator
    with torch.no_grad():
        return task.inference_step(generator, [model], sample)


PROMPT_LENGTHS = (3, 13, 8)


def prompts_for(dictionary, seed=9):
    g = torch.Generator().manual_seed(seed)
    return [random_tokens(dictionary, 1, n, g)[0] for n in PROMPT_LENGTHS]


@pytest.mark.parametrize("beam", [1, 4])
@pytest.mark.parametrize("name", ["bottom_up-2,2-before", "bottom_up-4,2-residual", "top_down-4,4-hourglass",
                                  "retina-4,4-per-layer"])
def test_prompts_of_different_lengths_in_one_batch(name, beam):
    """Each prompt of a batch decodes exactly as it does alone, and every score equals a full forward pass."""
    model, dictionary = model_for(name)
    prompts = prompts_for(dictionary)
    batched = generate(model, dictionary, prompts, beam_size=beam)
    for prompt, hypotheses in zip(prompts, batched):
        (alone,) = generate(model, dictionary, [prompt], beam_size=beam)
        assert len(hypotheses) == len(alone) == beam
        for hypo, hypo_alone in zip(hypotheses, alone):
            assert torch.equal(hypo["tokens"][: len(prompt)], prompt), "the prompt is kept"
            assert torch.equal(hypo["tokens"], hypo_alone["tokens"]), "batching changed the continuation"
            torch.testing.assert_close(hypo["positional_scores"], hypo_alone["positional_scores"], rtol=0, atol=1e-4)
            lprobs = generated_log_probs(model, dictionary, hypo["tokens"])  # (L, V)
            scores = lprobs.gather(-1, hypo["tokens"].unsqueeze(-1)).squeeze(-1)
            torch.testing.assert_close(hypo["positional_scores"], scores, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["bottom_up-4,4-linear", "top_down-2,3-concat", "retina-2,2-unbounded"])
def test_sampling_with_top_k_1_is_greedy(name):
    model, dictionary = model_for(name)
    prompts = prompts_for(dictionary)
    greedy = generate(model, dictionary, prompts, beam_size=1)
    sampled = generate(model, dictionary, prompts, search_strategy=search.Sampling(dictionary, sampling_topk=1))
    for (g,), (s,) in zip(greedy, sampled):
        assert torch.equal(g["tokens"], s["tokens"])


@pytest.mark.parametrize("name", ["bottom_up-2,3-both", "top_down-2,2,2-adaptive", "retina-2,2-bounded-linear"])
def test_sampled_tokens_lie_in_the_top_k(name):
    """--sampling-topk 3: every generated token is one of the 3 most likely under a full forward pass (pad never),
    its reported score is that log-probability, and different seeds draw different continuations."""
    model, dictionary = model_for(name)
    prompts, k = prompts_for(dictionary), 3
    drawn = []
    for seed in (1, 2):
        hypotheses = generate(model, dictionary, prompts, seed=seed,
                              search_strategy=search.Sampling(dictionary, sampling_topk=k))
        for prompt, (hypo,) in zip(prompts, hypotheses):
            tokens = hypo["tokens"]
            sampled = slice(len(prompt), min(len(tokens), MAX_LEN))  # at MAX_LEN eos is forced, not sampled
            chosen = sampled_log_probs(model, dictionary, tokens, k, sampled)  # (L,)
            torch.testing.assert_close(hypo["positional_scores"], chosen, rtol=0, atol=1e-4)
            drawn.append(tokens)
    assert any(not torch.equal(a, b) for a, b in zip(drawn[:3], drawn[3:])), "sampling drew the same every time"
