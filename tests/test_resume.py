"""Exact resume (issue 9): fairseq-train interrupted after a checkpoint in the middle of an epoch and started again
ends with the parameters of an uninterrupted run with the same seed, dropout on, for every family, to the precision
fairseq's own transformer_lm achieves in the same test.

fairseq makes this possible by reseeding the RNG from --seed + the update count at every update and by saving the
epoch iterator's position; a model keeps it only if it has no RNG or state of its own that a restart would lose.
"""
import shutil

import pytest

from test_cli import FAMILIES, checkpoint_weights, max_difference, train

UPDATES = 6  # the run is interrupted after the checkpoint at UPDATES / 2, some 2400 updates before the epoch ends
TRANSFORMER_LM = ["--arch", "transformer_lm", "--decoder-layers", "3", "--decoder-embed-dim", "64",
                  "--decoder-ffn-embed-dim", "256", "--decoder-attention-heads", "4", "--decoder-input-dim", "64",
                  "--decoder-output-dim", "64", "--share-decoder-input-output-embed", "--dropout", "0.1"]
EPSILON = 1e-6  # when transformer_lm resumes bit for bit; another dropout stream moves weights ~1e-2 here


def resume_difference(corpus, folder, flags):
    """Max |parameter difference| after UPDATES updates between an uninterrupted run and one killed right after
    its checkpoint at UPDATES / 2 (the checkpoint_last.pt it would have left behind) and started again."""
    half = UPDATES // 2
    options = ["--save-interval-updates", half, "--max-tokens", "512", "--disable-validation"]
    uninterrupted, resumed = folder / "uninterrupted", folder / "resumed"
    train(corpus, uninterrupted, flags, UPDATES, *options)
    resumed.mkdir()
    shutil.copy(uninterrupted / f"checkpoint_1_{half}.pt", resumed / "checkpoint_last.pt")
    proc = train(corpus, resumed, flags, UPDATES, *options)
    assert f"(epoch 1 @ {half} updates)" in proc.stdout + proc.stderr, "did not resume from the checkpoint"
    return max_difference(checkpoint_weights(uninterrupted), checkpoint_weights(resumed))


@pytest.fixture(scope="module")
def transformer_lm_difference(corpus, tmp_path_factory):
    return resume_difference(corpus, tmp_path_factory.mktemp("transformer_lm"), TRANSFORMER_LM)


@pytest.mark.parametrize("family", ["bottom_up", "top_down_adaptive", "retina"])
def test_resume_mid_epoch_equals_an_uninterrupted_run(family, corpus, tmp_path, transformer_lm_difference):
    ours = resume_difference(corpus, tmp_path, FAMILIES[family])  # the tiny presets have dropout 0.1
    print(f"{family}: max |parameter difference| {ours:.3g} (transformer_lm {transformer_lm_difference:.3g})")
    assert transformer_lm_difference < 1e-3, "transformer_lm itself no longer resumes: the yardstick is broken"
    assert ours <= max(transformer_lm_difference, EPSILON)
