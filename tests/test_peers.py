"""The outside implementations run through fairseq (scripts/peers): causal, decodable, trainable by fairseq-train and
scored by fairseq-eval-lm, each inside our embeddings and output layer.

Run as a script (what test_train_and_eval_lm_every_peer does), this file trains every peer for a few updates with
fairseq-train's own entry point and scores it with fairseq-eval-lm's, all in one interpreter: starting fairseq
twice per peer would cost more than the runs themselves on 2 cores.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from conftest import CORPUS, REPO, THREADS, benchmark

sys.path.insert(0, os.path.join(REPO, "scripts"))
import peers  # noqa: E402  (registers the peer models)
from fairseq.models import ARCH_MODEL_REGISTRY  # noqa: E402

PEERS_DIR = os.path.join(REPO, "scripts", "peers")
# Tiny settings per peer, every scale and branch in use at T = 40: several blocks at each pooling level, windows
# shorter than the sample, more compressed blocks than are selected.
TINY = {
    "peer_hourglass": dict(hourglass_shorten_factors="2,4", hourglass_layers="1,1,1,1,1",
                           hourglass_attn_resampling=True),
    "peer_hierarchical": dict(sht_depth=2, sht_hierarchies="1,2,8", sht_window_sizes="8,0,0"),
    "peer_megabyte": dict(megabyte_layers="1,1,1", megabyte_patch_sizes="2,4"),
    "peer_nsa": dict(nsa_layers=2, nsa_sliding_window=8, nsa_compress_block=4, nsa_compress_stride=4,
                     nsa_selection_block=4, nsa_selected_blocks=2),
    "peer_local": dict(local_layers=2, local_window=8),
    "peer_xtransformers": dict(xt_layers=2),
}
SIZES = dict(decoder_embed_dim=32, decoder_ffn_embed_dim=128, decoder_attention_heads=2, dropout=0.0)


def test_every_registered_peer_is_tested():
    assert set(TINY) == set(peers.PEERS)


def build_peer(name, vocab_words=40, tokens_per_sample=64, seed=0, **options):
    """A peer built the way fairseq builds it: given options > dataclass defaults, a task's dictionary."""
    torch.manual_seed(seed)
    model_cls = ARCH_MODEL_REGISTRY[name]
    args = argparse.Namespace(**{**SIZES, **TINY[name], **options}, tokens_per_sample=tokens_per_sample)
    benchmark.fill_dataclass_defaults(args, model_cls.__dataclass)
    task = benchmark.fake_task(vocab_words, tokens_per_sample)
    return model_cls.build_model(args, task).eval(), task.source_dictionary


def log_probs(model, tokens):
    return model.get_normalized_probs(model(tokens), log_probs=True)  # (B, T, V)


@pytest.mark.parametrize("name", sorted(TINY))
def test_no_future_leak(name):
    """Changing tokens from position t on leaves every output before t as it was (and does change outputs from t:
    the perturbation reaches the model), at block boundaries of every scale and inside blocks."""
    model, vocab = build_peer(name)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(vocab.nspecial, len(vocab), (2, 40), generator=g)
    with torch.no_grad():
        clean = log_probs(model, tokens)
        for t in (1, 4, 9, 16, 17, 33):
            perturbed = tokens.clone()
            perturbed[:, t:] = torch.randint(vocab.nspecial, len(vocab), (2, 40 - t), generator=g)
            out = log_probs(model, perturbed)
            torch.testing.assert_close(out[:, :t], clean[:, :t], rtol=0, atol=1e-5, msg=f"{name}: leak before {t}")
            assert (out[:, t:] - clean[:, t:]).abs().max() > 1e-4, f"{name}: perturbing from {t} changed nothing"


@pytest.mark.parametrize("name", sorted(TINY))
def test_incremental_decoding_equals_full_pass_with_beam_reordering(name):
    """fairseq's generator feeds the growing prefix with incremental_state and reorders it between steps (beam
    search): the log-probs of each step equal the full pass over the sequences as reordered."""
    model, vocab = build_peer(name)
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(vocab.nspecial, len(vocab), (2, 18), generator=g)
    swap = torch.tensor([1, 0])
    state, steps = {}, []
    with torch.no_grad():
        for t in range(18):
            if t == 9:  # beams change places mid-sequence: so must every cache
                model.decoder.reorder_incremental_state_scripting(state, swap)
                tokens = tokens.index_select(0, swap)
                steps = [s.index_select(0, swap) for s in steps]
            out = model.decoder(tokens[:, : t + 1], incremental_state=state)
            steps.append(model.get_normalized_probs(out, log_probs=True)[:, -1])
        full = log_probs(model, tokens)
    torch.testing.assert_close(torch.stack(steps, dim=1), full, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_trunk_parameter_learns(name):
    """One backward pass reaches every parameter of the package's trunk (none detached or left unused)."""
    model, vocab = build_peer(name)
    model.train()
    tokens = torch.randint(vocab.nspecial, len(vocab), (2, 33), generator=torch.Generator().manual_seed(3))
    log_probs(model, tokens[:, :-1]).gather(-1, tokens[:, 1:, None]).sum().neg().backward()
    # None, not zero: some gradients are zero by construction (Hourglass's post-valley attention reads one key, so
    # its queries and keys do not matter); fixed rotary tables need none
    dead = [n for n, p in model.decoder.body.named_parameters() if p.requires_grad and p.grad is None]
    assert not dead, f"{name}: no gradient reaches {dead}"


def test_benchmark_measures_peers_as_it_measures_ours():
    """benchmark.py's peer columns: a cached peer decodes through its cache, one without recomputes the prefix
    (and says so); both train with bytes saved for backward, and their layout names the package version."""
    opts = benchmark.parse_args(["--models", "peer_local", "peer_xtransformers", "--dim", "32", "--ffn", "128",
                                 "--heads", "2", "--layers", "2", "--vocab", "50", "--lengths", "32",
                                 "--retina-lengths", "--generate-lengths", "16", "--repeats", "1",
                                 "--generate-steps", "2", "--retina-windows", "8,32,-1"])
    results = []
    for name, recomputes in (("peer_local", True), ("peer_xtransformers", False)):
        generated = benchmark.measure(name, "generate", 16, vars(opts))
        assert generated.get("recomputes_prefix", False) is recomputes and generated["ms_per_token"] > 0
        trained = benchmark.measure(name, "train", 32, vars(opts))
        assert trained["saved_mib"] > 0 and trained["params"] > 0
        assert trained["layout"].startswith(peers.package_version(peers.PEERS[name][1]))
        results += [generated, trained]
    table = benchmark.markdown(results, opts)
    assert "(* peer_local: no decoding cache" in table and table.count("*") - table.count("**") * 2 == 2, table


# ---------------------------------------------------------------- fairseq-train + fairseq-eval-lm, every peer
def cli_options(options):
    return [a for k, v in options.items() for a in (
        [f"--{k.replace('_', '-')}"] if v is True else [] if v is False else [f"--{k.replace('_', '-')}", str(v)])]


def train_and_score(name, save_dir):
    """fairseq-train (3 updates, adaptive input and softmax tied, as the suite's models) then fairseq-eval-lm on a
    shard of valid, through the console scripts' own code; -> (updates, valid perplexity)."""
    from fairseq import checkpoint_utils, options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import eval_lm, train

    common = [CORPUS, "--user-dir", PEERS_DIR, "--task", "multiscale_language_modeling", "--cpu",
              "--tokens-per-sample", "32", "--num-workers", "0"]
    sys.argv = ["fairseq-train", *common, "--arch", name, *cli_options({**SIZES, **TINY[name]}),
                "--adaptive-input", "--adaptive-input-cutoff", "2000,6000", "--adaptive-softmax-cutoff", "2000,6000",
                "--tie-adaptive-weights", "--criterion", "adaptive_loss", "--ddp-backend", "legacy_ddp",
                "--max-tokens", "128", "--optimizer", "adam", "--lr", "1e-3", "--max-update", "3", "--seed", "1",
                "--save-dir", save_dir, "--no-epoch-checkpoints", "--disable-validation", "--log-format", "json"]
    train.cli_main()
    checkpoint = os.path.join(save_dir, "checkpoint_last.pt")
    updates = checkpoint_utils.load_checkpoint_to_cpu(checkpoint)["optimizer_history"][-1]["num_updates"]
    sys.argv = ["fairseq-eval-lm", *common, "--path", checkpoint, "--gen-subset", "valid", "--context-window", "16",
                "--max-tokens", "1024", "--num-shards", "80", "--shard-id", "0"]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_eval_lm_parser()))
    results = eval_lm.main(cfg)  # what call_main does in one CPU process, keeping the result
    return updates, results["perplexity"]


def test_train_and_eval_lm_every_peer(corpus):
    env = dict(os.environ, OMP_NUM_THREADS=THREADS, PYTHONUNBUFFERED="1")  # conftest's thread count
    with tempfile.TemporaryDirectory() as save_root:  # its own folder: pytest prunes old tmp_paths of other runs
        proc = subprocess.run([sys.executable, __file__, save_root], capture_output=True, text=True, env=env,
                              cwd=os.path.dirname(__file__), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = {r["name"]: r for r in map(json.loads, proc.stdout.splitlines()[-len(TINY):])}
    assert set(results) == set(TINY)
    vocab = sum(1 for _ in open(os.path.join(corpus, "dict.txt"))) + 4
    for r in results.values():
        assert r["updates"] == 3, r
        assert 1 < r["valid_ppl"] < 2 * vocab, r  # a real score (3 updates need not beat a uniform guess)


if __name__ == "__main__":
    save_root, outputs = sys.argv[1], []  # (train_and_score sets sys.argv for each entry point)
    start = time.perf_counter()
    for peer in sorted(TINY):
        updates, ppl = train_and_score(peer, os.path.join(save_root, peer))
        outputs.append(json.dumps({"name": peer, "updates": updates, "valid_ppl": float(ppl)}))
        print(f"{peer}: {time.perf_counter() - start:.1f}s", file=sys.stderr)
    print("\n".join(outputs))
