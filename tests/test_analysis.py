"""scripts/analysis/analyze_attention.py and scripts/analysis/analyze_memories.py on tiny checkpoints trained by fairseq-train: the
numbers they report are consistent with the models (recomputed here independently where possible)."""
import json
import os
import sys

import pytest
import torch

from conftest import REPO, USER_DIR, fairseq_cli

sys.path.insert(0, os.path.join(REPO, "scripts", "analysis"))
import analysis_common  # noqa: E402
import analyze_attention  # noqa: E402
import analyze_memories  # noqa: E402

TINY = ["--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "2"]
ADAPTIVE = ["--adaptive-input", "--adaptive-input-cutoff", "2000,6000", "--adaptive-softmax-cutoff", "2000,6000",
            "--tie-adaptive-weights", "--criterion", "adaptive_loss", "--ddp-backend", "legacy_ddp"]
MODELS = {
    # the paper's aggregation layer (tokens + blocks in one attention) and residual upsampling; adaptive softmax
    "bottom_up": ["--arch", "msformer_lm", "--family", "bottom_up", "--pool-factors", "4,4", "--scale-layers", "1,1",
                  "--token-layers", "1", "--bottom-up-combine", "both", "--shift-rule", "hourglass", *TINY, *ADAPTIVE],
    "retina": ["--arch", "msformer_lm", "--family", "retina", "--pool-factors", "4,4", "--token-layers", "2",
               "--retina-windows", "8,24,-1", "--share-decoder-input-output-embed", *TINY],
    "transformer_lm": ["--arch", "transformer_lm", "--decoder-layers", "2", "--decoder-normalize-before", *TINY],
}
LENGTH = 64


@pytest.fixture(scope="module")
def checkpoints(corpus, tmp_path_factory):
    """One tiny checkpoint per model, trained by fairseq-train for 3 updates."""
    paths = {}
    for name, flags in MODELS.items():
        save_dir = tmp_path_factory.mktemp(name)
        fairseq_cli("fairseq-train", corpus, "--user-dir", USER_DIR, "--task", "multiscale_language_modeling", "--cpu",
                    *flags, "--tokens-per-sample", LENGTH, "--max-tokens", "512", "--optimizer", "adam", "--lr", "2e-3",
                    "--max-update", "3", "--disable-validation", "--num-workers", "0", "--save-dir", save_dir,
                    "--no-epoch-checkpoints", "--seed", "1", timeout=300)
        paths[name] = os.path.join(save_dir, "checkpoint_last.pt")
    return paths


@pytest.mark.parametrize("name", sorted(MODELS))
def test_attention_shares_sum_to_one_per_query(checkpoints, corpus, name, tmp_path):
    results = analyze_attention.main([checkpoints[name], corpus, "--sequences", "2", "--out", str(tmp_path)])
    assert os.path.getsize(tmp_path / "attention.png") > 0 and (tmp_path / "attention.md").exists()
    reported = json.load(open(tmp_path / "attention.json"))["layers"]
    assert [r["layer"] for r in reported] == [r["layer"] for r in results]

    # per query, with the script's own recorder: every query's mass sums to 1 over scales and over distances,
    # nothing goes to a key that is not yet ready, and the probabilities rebuild the layer's output
    model, task = analysis_common.load_checkpoint(checkpoints[name], corpus)
    _, tokens, _ = analysis_common.sample_sequences(task, "valid", 2, LENGTH, seed=1)
    layers = analysis_common.model_layers(model)
    num_scales = len(analysis_common.block_lengths(model))
    edges, _ = analyze_attention.distance_edges(LENGTH)
    recorder = analyze_attention.AttentionRecorder(layers)
    with torch.no_grad():
        model(tokens)
    recorder.close()
    for layer, result in zip(layers, results):
        amap = analyze_attention.layer_attention(model, layer, recorder)
        by_scale, by_distance, _ = analyze_attention.attention_shares(amap, num_scales, edges)
        assert torch.allclose(by_scale.sum(-1), torch.ones(()), atol=1e-5), layer.name
        assert torch.allclose(by_distance.sum(-1), torch.ones(()), atol=1e-5), layer.name
        future = amap.key_ready[None, :] > amap.query_ready[:, None]  # (Tq, Tk)
        assert amap.probs[..., future].abs().max() == 0 if future.any() else True, layer.name
        assert amap.output_error < 1e-4, (layer.name, amap.output_error)
        assert abs(sum(result["scale_share"]) - 1) < 1e-5 and abs(sum(result["distance_share"]) - 1) < 1e-5
    if name == "bottom_up":  # the aggregation layer reads tokens and both coarse scales
        aggregation = next(r for r in results if r["kind"] == "aggregation")
        assert all(share > 0 for share in aggregation["scale_share"])
    if name == "retina":  # full-resolution window and pooled blocks
        assert all(r["scale_share"][0] < 1 and r["scale_share"][1] > 0 for r in results)


def independent_vocabulary_check(model, vectors, scores):
    """The script's vocabulary scores against fairseq's own output layer: the output projection itself, or, with an
    adaptive softmax, fairseq's log-probabilities up to one normaliser per cluster (constant within a cluster)."""
    softmax = model.decoder.adaptive_softmax
    if getattr(model.decoder, "project_out_dim", None) is not None:  # transformer_lm's default 512-d output
        vectors = vectors @ model.decoder.project_out_dim.weight.t()
    if softmax is None:
        expected = vectors @ model.decoder.output_projection.weight.t()
        assert torch.allclose(scores, expected, atol=1e-4)
        return
    log_probs = softmax.get_log_prob(vectors.unsqueeze(0), None).squeeze(0)  # (F, V)
    difference = scores - log_probs
    bounds = [0] + softmax.cutoff
    for lo, hi in zip(bounds, bounds[1:]):
        spread = difference[:, lo:hi].max(1).values - difference[:, lo:hi].min(1).values
        assert spread.max() < 1e-3, (lo, hi, spread.max())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_memories_report_the_top_activations_and_promoted_tokens(checkpoints, corpus, name, tmp_path):
    top_k = 5
    analyze_memories.main([checkpoints[name], corpus, "--sequences", "6", "--top-k", str(top_k),
                           "--keys-per-layer", "4", "--permutations", "2", "--out", str(tmp_path)])
    report = json.load(open(tmp_path / "memories.json"))
    assert os.path.getsize(tmp_path / "memories.png") > 0 and (tmp_path / "memories.md").exists()

    # recompute every key's coefficients on the same sequences with hooks of our own
    model, task = analysis_common.load_checkpoint(checkpoints[name], corpus)
    task.load_dataset("train")
    dataset = task.dataset("train")
    tokens = torch.stack([dataset[i]["source"][:LENGTH] for i in report["dataset_indices"]])  # (N, T)
    targets = torch.stack([dataset[i]["target"][:LENGTH] for i in report["dataset_indices"]])
    layers = analysis_common.model_layers(model)
    coefficients = {}

    def keep(fc1, args, out, layer):
        out = out.transpose(0, 1) if name == "transformer_lm" else out  # fairseq's layers run time-first
        coefficients[layer.name] = layer.module.activation_fn(out)  # (N, N_s, F)

    hooks = [layer.module.fc1.register_forward_hook(lambda *a, layer=layer: keep(*a, layer)) for layer in layers]
    with torch.no_grad():
        model(tokens)
    for hook in hooks:
        hook.remove()

    lengths = analysis_common.block_lengths(model)
    for layer, result in zip(layers, report["layers"]):
        assert result["layer"] == layer.name
        c = coefficients[layer.name]  # (N, N_s, F)
        ready = analysis_common.ready_positions(model, layer.scale, LENGTH // lengths[layer.scale])
        for sample in result["sampled_keys"]:
            key, triggers = sample["key"], sample["triggers"]
            expected = c[:, :, key].flatten().topk(top_k).values
            reported = torch.tensor([t["coefficient"] for t in triggers])
            assert torch.allclose(reported, expected, atol=1e-5), (layer.name, key)
            for t in triggers:  # each trigger is where the model produced that coefficient, and its tokens
                assert abs(c[t["sequence"], t["element"], key].item() - t["coefficient"]) < 1e-5
                assert t["ready"] == int(ready[t["element"]])
                assert t["last_token"] == int(tokens[t["sequence"], t["ready"]])
                assert t["next_token"] == int(targets[t["sequence"], t["ready"]])

        values = layer.module.fc2.weight.t().detach()  # (F, C) the value vectors
        with torch.no_grad():
            scores = analysis_common.vocabulary_scores(model, values)  # (F, V)
            independent_vocabulary_check(model, values, scores)
        for sample in result["sampled_keys"]:
            top = scores[sample["key"]].topk(report["value_tokens"])
            assert sample["value_tokens"] == top.indices.tolist(), (layer.name, sample["key"])
        assert 0 <= result["agreement_top1"] <= 1 and abs(result["shallow_share"] + result["semantic_share"] - 1) < 1e-6


@pytest.mark.parametrize("script", [analyze_attention, analyze_memories])
def test_missing_paths_stop_with_one_line(script, corpus, tmp_path):
    with pytest.raises(SystemExit, match="error: no checkpoint at"):
        script.main([str(tmp_path / "missing.pt"), corpus])
    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match="is not a binarized corpus"):
        script.main([str(tmp_path / "model.pt"), str(tmp_path)])
