"""design.md §4.4: bad configurations stop before training with one clear line and write no checkpoint."""
import ast
import glob
import os

import pytest
import torch
from fairseq.data import Dictionary

from conftest import USER_DIR, WIKITEXT103_TYPES, build_model, fairseq_cli, log_probs, random_tokens
from fairseq_msformer import MsformerConfigError

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
    (["--rotary-positions", "--rotary-fraction", "0"], "fairseq-msformer: error: --rotary-fraction: must be in (0, 1]"),
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


# ---------------------------------------------------------------- every check in models/config.py, in-process
# (options as a CLI user passes them to the generic --arch msformer_lm_<family>, message the error must start with)
CHECKS = [
    (dict(pool_factors="4,x"), "--pool-factors: expected comma-separated integers, got '4,x'"),
    (dict(pool_factors="", scale_layers=""), "--pool-factors: at least one coarse scale"),
    (dict(pool_factors="1,4"), "--pool-factors: every pooling factor must be >= 2"),
    (dict(pool_factors="8,16"), "--pool-factors: the coarsest block (128 tokens = 8*16) is longer than a sample"),
    (dict(pool_type="avg"), "--pool-type: unknown pooling type 'avg'"),
    (dict(shift_rule="late"), "--shift-rule: unknown rule 'late'"),
    (dict(scale_layers="1"), "--scale-layers: needs one layer count per pooling factor (2)"),
    (dict(scale_layers="1,0"), "--scale-layers: every coarse scale needs >= 1 layer"),
    (dict(token_layers=-1), "--token-layers: must be >= 0"),
    (dict(token_layers_before_pooling=-2), "--token-layers-before-pooling: must be >= 0"),
    (dict(decoder_attention_heads=0), "--decoder-attention-heads: must be >= 1"),
    (dict(rotary_positions=True, rotary_fraction=1.5), "--rotary-fraction: must be in (0, 1], got 1.5"),
    (dict(decoder_attention_heads=3), "--decoder-attention-heads: 3 heads do not divide --decoder-embed-dim 16"),
    (dict(max_target_positions=32), "--max-target-positions: 32 is below --tokens-per-sample 64"),
    (dict(adaptive_input=True, adaptive_input_cutoff="20,10"), "--adaptive-input-cutoff: cutoffs must be positive"),
    (dict(adaptive_softmax_cutoff="10,99"), "--adaptive-softmax-cutoff: cutoff 99 is above the vocabulary size"),
    (dict(adaptive_softmax_cutoff="5,10,20", adaptive_softmax_factor=4),
     "--adaptive-softmax-factor: 4 shrinks the last adaptive band"),
    (dict(adaptive_input=True), "--adaptive-input-cutoff: required with --adaptive-input"),
    (dict(share_decoder_input_output_embed=True, adaptive_softmax_cutoff="10"),
     "--share-decoder-input-output-embed: not with adaptive input/softmax"),
    (dict(tie_adaptive_weights=True, adaptive_input=True, adaptive_input_cutoff="10"),
     "--tie-adaptive-weights: needs --adaptive-input and --adaptive-softmax-cutoff"),
    (dict(tie_adaptive_weights=True, adaptive_input=True, adaptive_input_cutoff="10", adaptive_softmax_cutoff="20"),
     "--tie-adaptive-weights: adaptive input and softmax need the same cutoffs and factors"),
    (dict(arch="msformer_lm_retina", token_layers=0), "--token-layers: retina needs at least one"),
    (dict(arch="msformer_lm_retina", shift_rule="hourglass"), "--shift-rule: retina reads complete blocks only"),
    (dict(arch="msformer_lm_retina", retina_select=2), "--retina-select: the selected blocks are a gated branch"),
    (dict(arch="msformer_lm_retina", retina_select=-1, retina_gate=True), "--retina-select: must be >= 0"),
    (dict(arch="msformer_lm_retina", pool_factors="4,4", retina_windows="6,22,-1", retina_bucketed_window=True),
     "--retina-bucketed-window: window 6 is not a multiple of the first pooling factor (4)"),
    (dict(arch="msformer_lm_retina", token_layers=2, retina_windows="8,24,-1;8,24,-1;8,24,-1"),
     "--retina-windows: give one group of windows for all layers or one per layer (2), got 3"),
    (dict(arch="msformer_lm_retina", retina_windows="8,24"), "--retina-windows: '8,24' needs one window per scale"),
    (dict(arch="msformer_lm_retina", retina_windows="8,-1,-1"), "--retina-windows: '8,-1,-1' has an empty scale"),
    (dict(arch="msformer_lm_retina", retina_windows="128,256,-1"), "--retina-windows: window 128 is larger than"),
    (dict(arch="msformer_lm_retina", retina_windows="16,12,-1"), "--retina-windows: '16,12,-1' is unordered"),
    (dict(arch="msformer_lm_retina", retina_windows="16,18,-1"), "--retina-windows: '16,18,-1' overlaps"),
]
CONFIG_SOURCE = os.path.join(USER_DIR, "models", "config.py")


def raise_site(options):
    """Build a model with `options`; returns (message, line of models/config.py that raised it)."""
    options = dict(options)
    with pytest.raises(MsformerConfigError) as error:
        build_model(options.pop("arch", "msformer_lm_bottom_up"), vocab_words=40, **options)
    line = next(entry.lineno + 1 for entry in reversed(error.traceback) if str(entry.path) == CONFIG_SOURCE)
    return str(error.value), line


@pytest.mark.parametrize("options,message", CHECKS, ids=[m.split(":")[0] + "-" + str(o) for o, m in CHECKS])
def test_each_check_stops_with_one_line_naming_the_option(options, message):
    text, _ = raise_site(options)
    assert text.startswith(message) and "\n" not in text, text


def test_every_check_in_config_has_a_case():
    """Each `raise MsformerConfigError` in models/config.py is reached by one of CHECKS: a new check needs a case."""
    tree = ast.parse(open(CONFIG_SOURCE).read())
    raises = {node.lineno for node in ast.walk(tree) if isinstance(node, ast.Raise) and node.exc is not None
              and "MsformerConfigError" in ast.unparse(node.exc)}
    assert len(raises) > 20, "the checks were not found: has models/config.py changed its error class?"
    reached = {raise_site(options)[1] for options, _ in CHECKS}
    assert raises - reached == set(), f"checks in models/config.py without a test case: lines {sorted(raises - reached)}"


# ---------------------------------------------------------------- the large presets, at their own size
PRESETS = [  # (arch, dictionary size, tokens per sample): WikiText-103's; None: the shipped corpus's
    ("msformer_lm_bottom_up_wiki103", WIKITEXT103_TYPES, 512),
    ("msformer_lm_top_down_wiki103", WIKITEXT103_TYPES, 512),
    ("msformer_lm_retina_wiki103", WIKITEXT103_TYPES, 512),
    ("msformer_lm_bottom_up_paper", None, 2048), ("msformer_lm_top_down_paper", None, 2048),
]


@pytest.mark.parametrize("arch,types,tokens_per_sample", PRESETS, ids=[p[0] for p in PRESETS])
def test_large_preset_builds_and_runs(arch, types, tokens_per_sample, corpus):
    """Each preset is built once at its own width, depth and vocabulary (~0.5-1 GB of fp32 weights; this machine
    has 24 GB) and scores one short input; a full-length forward pass is left to benchmark.py."""
    types = types or len(Dictionary.load(os.path.join(corpus, "dict.txt")))
    # build_model's dictionary holds fairseq's 4 special symbols and vocab_words words
    model, dictionary = build_model(arch, vocab_words=types - 4, tokens_per_sample=tokens_per_sample, sizes=None)
    params = sum(p.numel() for p in model.parameters())
    assert params > 50e6, f"{arch}: {params / 1e6:.1f}M parameters is not paper scale"
    tokens = random_tokens(dictionary, 1, 2 * model.decoder.grid.grid + 3)  # off the grid
    with torch.no_grad():
        lprobs = log_probs(model, tokens)
    assert lprobs.shape == (1, tokens.size(1), len(dictionary)) and torch.isfinite(lprobs).all()
