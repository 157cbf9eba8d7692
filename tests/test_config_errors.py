"""design.md §4.4: bad configurations stop before training with one clear line and write no checkpoint."""
import glob
import os

import pytest

from conftest import USER_DIR, fairseq_cli

TINY = ["--arch", "msformer_lm_bottom_up_tiny", "--tokens-per-sample", "64"]
BAD = [
    (["--pool-factors", "1,4"], "fairseq-msformer: error: --pool-factors: every pooling factor must be >= 2"),
    (["--pool-factors", "8,16"], "fairseq-msformer: error: --pool-factors: the coarsest block (128 tokens"),
    (["--pool-factors", "", "--scale-layers", ""], "fairseq-msformer: error: --pool-factors: at least one coarse scale"),
    (["--scale-layers", "1"], "fairseq-msformer: error: --scale-layers: needs one layer count per pooling factor"),
    (["--scale-layers", "1,0"], "fairseq-msformer: error: --scale-layers: every coarse scale needs >= 1 layer"),
    (["--pool-type", "avg"], "error: argument --pool-type: invalid choice: 'avg'"),
    (["--decoder-attention-heads", "0"], "fairseq-msformer: error: --decoder-attention-heads: must be >= 1"),
    (["--adaptive-input", "--adaptive-input-cutoff", "100,99999"],
     "fairseq-msformer: error: --adaptive-input-cutoff: cutoff 99999 is above the vocabulary size"),
    (["--arch", "msformer_lm_top_down_tiny", "--scale-layers", "0,1"],
     "fairseq-msformer: error: --scale-layers: every coarse scale needs >= 1 layer"),
    (["--arch", "msformer_lm_retina_tiny", "--retina-windows", "128,256,-1"],
     "fairseq-msformer: error: --retina-windows: window 128 is larger than a sample"),
    (["--arch", "msformer_lm_retina_tiny", "--retina-windows", "16,0,-1"],
     "fairseq-msformer: error: --retina-windows: '16,0,-1' has an empty scale"),
    (["--arch", "msformer_lm_retina_tiny", "--retina-windows", "16,12,-1"],
     "fairseq-msformer: error: --retina-windows: '16,12,-1' is unordered"),
    (["--arch", "msformer_lm_retina_tiny", "--retina-windows", "16,18,-1"],
     "fairseq-msformer: error: --retina-windows: '16,18,-1' overlaps"),
    (["--adaptive-softmax-cutoff", "99999", "--criterion", "adaptive_loss"],
     "fairseq-msformer: error: --adaptive-softmax-cutoff: cutoff 99999 is above the vocabulary size"),
]


@pytest.mark.parametrize("flags,message", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_config_fails_early_with_one_line(corpus, tmp_path, flags, message):
    save_dir = tmp_path / "ckpt"
    proc = fairseq_cli(
        "fairseq-train", corpus, "--user-dir", USER_DIR, "--task", "multiscale_language_modeling", *TINY, *flags,
        "--cpu", "--optimizer", "adam", "--max-update", "5", "--max-tokens", "512", "--num-workers", "0",
        "--save-dir", save_dir, check=False,
    )
    assert proc.returncode != 0
    error_lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and message in error_lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "begin training" not in proc.stdout + proc.stderr
    assert not glob.glob(os.path.join(save_dir, "*.pt"))
