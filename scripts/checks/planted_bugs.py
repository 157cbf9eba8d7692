"""Plant small, realistic mistakes in a copy of the package, one at a time, and show the test suite catches each.

A test suite is only as good as the bugs it would catch. Each entry of BUGS is one edit of the source (a string
replaced once) of the kind multi-scale models are prone to: a block marked ready a token early or late, an
upsample that forgets the shift, a dropped scale, a cache beam search does not reorder, a retina span one block
short... For each, the repository's tests and package are copied to a scratch folder, the edit is applied there
(the checkout is never touched), and the in-process tests run with `pytest -x`; the bug counts as caught when they
fail. A bug the suite does not catch is a hole in the suite: the script exits 1.

    python scripts/checks/planted_bugs.py                    # every bug (about 10 minutes on 2 cores)
    python scripts/checks/planted_bugs.py --only late_ready  # some of them
    python scripts/checks/planted_bugs.py --list
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = "fairseq_msformer"
# the fast, in-process part of the suite (the CLI tests add minutes and test fairseq's plumbing, not the models);
# test_options first: about half a minute, and it stops many planted bugs (pooling, ready positions, retina reads,
# combines, dropout at evaluation) before the exhaustive sweeps start
SUITE_TIMEOUT = 1800  # seconds: a planted bug that makes the tests hang counts as caught
DEFAULT_TESTS = ["tests/test_options.py", "tests/test_causality.py", "tests/test_influence.py",
                 "tests/test_incremental.py", "tests/test_retina.py", "tests/test_precision.py"]


class Bug(NamedTuple):
    name: str
    path: str  # inside the package
    old: str  # must occur exactly once in the file
    new: str
    what: str


BUGS = [
    # (shifting every scale's ready positions alike, tokens included, changes nothing: the bugs move blocks only)
    Bug("early_ready", "modules/scales.py", "else (j + 1) * k - 1", "else (j + 1) * k - 1 - (k > 1)",
        "complete rule: a block is marked ready one token before its last token"),
    Bug("late_ready", "modules/scales.py", "else (j + 1) * k - 1", "else (j + 1) * k - 1 + (k > 1)",
        "complete rule: a block is read one token after it completes (no leak, just stale)"),
    Bug("hourglass_late", "modules/scales.py", "return j * k if self.hourglass", "return j * k + (k > 1) if self.hourglass",
        "hourglass rule: blocks are read one token later than the shift allows (no leak, just stale)"),
    Bug("newest_block_late", "modules/scales.py", "else (t + 1) // k - 1", "else t // k - 1",
        "incremental decoding: the newest ready block index is one short at block ends"),
    Bug("unshifted_hourglass_pool", "modules/pooling.py", "            x = shift_right(x, self.factor - 1)\n",
        "            pass\n", "hourglass rule: pooling forgets the r - 1 shift (the block holds its future)"),
    Bug("hourglass_step_unshifted", "modules/pooling.py", "if buffer is None and self.hourglass_shift:",
        "if False:", "incremental decoding: the hourglass pooling buffer starts without its shifted-in zeros"),
    Bug("upsample_off_by_one", "modules/scales.py", "searchsorted(coarse_ready, fine_ready, right=True) - 1",
        "searchsorted(coarse_ready, fine_ready, right=False) - 1",
        "upsampling: a fine element at a block's ready position reads the previous block"),
    Bug("mask_one_ahead", "modules/scales.py", "key_ready.unsqueeze(0) <= query_ready.unsqueeze(1)",
        "key_ready.unsqueeze(0) <= query_ready.unsqueeze(1) + 1", "block mask: a key ready at t + 1 is visible at t"),
    Bug("top_down_drops_context", "models/top_down.py", "        return inputs + context\n",
        "        return inputs\n", "top-down (add): the upsampled coarser scale is computed but never added"),
    Bug("bottom_up_drops_coarsest", "models/bottom_up.py", "for s, h in enumerate(blocks, start=1):",
        "for s, h in enumerate(blocks[:-1], start=1):", "bottom-up (residual): the coarsest scale is never added"),
    Bug("top_down_stale_cache", "models/top_down.py", '                cache[f"newest{s}"] = h\n',
        "                pass\n", "top-down decoding: a new coarse state is not cached for later steps"),
    Bug("block_position_offset", "models/bottom_up.py", "positions(h, offset=self.grid.newest_block(s, t))",
        "positions(h, offset=self.grid.newest_block(s, t) + 1)",
        "bottom-up decoding: a new block gets the next block's position vector"),
    Bug("cache_not_reordered", "models/decoder.py", "{name: value.index_select(0, new_order) for",
        "{name: value for", "beam search: the per-scale caches are not reordered with the beams"),
    Bug("retina_span_short", "modules/retina_attention.py", "b = bounds[-1] - blocks[s - 1] * k[s]",
        "b = bounds[-1] - (blocks[s - 1] - 1) * k[s]", "retina: each bounded scale reads one block fewer"),
    Bug("retina_window_short", "modules/retina_attention.py", "(t - window + 1) // k[1] * k[1]",
        "(t - window + 1 + k[1]) // k[1] * k[1]", "retina: the full-resolution window ends one block early"),
    Bug("retina_horizon_overread", "models/config.py", "blocks.append(-(-span // block_lengths[s]))",
        "blocks.append(-(-span // block_lengths[s]) + 1)",
        "retina: --retina-windows horizons become one block too many per scale"),
    Bug("retina_chunk_mask_open", "modules/retina_attention.py", "allowed = (q_lo <= j) & (j <= t.view(n, chunk, 1))",
        "allowed = (q_lo <= j) & (j <= t.view(n, chunk, 1) + 1)",
        "retina (blockwise): a query also sees the next token in its chunk"),
    Bug("attention_dropout_at_eval", "modules/attention.py",
        "dropout_p=self.attention_dropout if self.training else 0.0", "dropout_p=self.attention_dropout",
        "attention dropout stays on at evaluation (scores change from call to call)"),
    Bug("retina_dropout_at_eval", "modules/retina_attention.py",
        "heads, dropout = self.attn.num_heads, self.attn.attention_dropout if self.training else 0.0",
        "heads, dropout = self.attn.num_heads, self.attn.attention_dropout",
        "retina's blockwise attention keeps its dropout at evaluation"),
    Bug("padding_on_the_left", "models/decoder.py", "x = F.pad(x, (0, 0, 0, grid_pad))",
        "x = F.pad(x, (0, 0, grid_pad, 0))", "off-grid inputs are padded on the left: real positions move"),
    # --- an option accepted but ignored (the model stays causal and correct, just not what was asked for)
    Bug("retina_windows_layer0", "models/config.py", "return layers * args.token_layers if len(groups) == 1 else layers",
        "return layers * args.token_layers if len(groups) == 1 else [layers[0]] * len(layers)",
        "per-layer --retina-windows: every layer gets the first layer's windows"),
    Bug("scale_layers_first_entry", "models/bottom_up.py", "LayerStack(args, n) for n in plan.scale_layers",
        "LayerStack(args, plan.scale_layers[0]) for n in plan.scale_layers",
        "bottom-up: every coarse scale gets the first entry of --scale-layers"),
    Bug("retina_tiny_overrides_windows", "models/msformer_lm.py",
        '    _defaults(args, token_layers=2, retina_windows="16,48,-1")\n',
        '    _defaults(args, token_layers=2)\n    args.retina_windows = "16,48,-1"\n',
        "the retina tiny preset overwrites a --retina-windows given on the command line"),
    Bug("retina_value_pool_default", "modules/retina_attention.py",
        "self.value_pools = nn.ModuleList(BlockPool(r, args.pool_type, dim)",
        'self.value_pools = nn.ModuleList(BlockPool(r, "mean", dim)',
        "retina: values are mean-pooled whatever --pool-type says (keys follow it)"),
    Bug("retina_recompute_misread", "modules/retina_attention.py", 'getattr(args, "no_retina_recompute", False)',
        'getattr(args, "no_recompute", False)', "--no-retina-recompute read under another name: silently ignored"),
    Bug("adaptive_softmax_takes_dropout", "models/decoder.py", "dropout=args.adaptive_softmax_dropout,",
        "dropout=args.dropout,", "the adaptive softmax tails use --dropout instead of --adaptive-softmax-dropout"),
    # --- rotary positions and the gated FFN (issue 16)
    Bug("rotary_block_index", "models/top_down.py",
        "h = self.stacks[s](inputs, inner_states, ready)",
        "h = self.stacks[s](inputs, inner_states, torch.arange(inputs.size(1), device=x.device))",
        "top-down: a scale's layers rotate blocks by their index, not by the token position they are ready at"),
    Bug("retina_rotary_query_unrotated", "modules/retina_attention.py",
        "queries = self.attn.project_queries(x, positions)  # (B, C*Q, C)", "queries = self.attn.q_proj(x)",
        "retina: the full pass leaves the queries unrotated (decoding rotates them)"),
    Bug("glu_too_wide", "modules/attention.py",
        "inner = args.decoder_ffn_embed_dim * 2 // 3 if self.glu else args.decoder_ffn_embed_dim",
        "inner = args.decoder_ffn_embed_dim",
        "--ffn-glu: halves as wide as the plain FFN (1.5x its parameters, not the same)"),
    Bug("rotary_fraction_ignored", "modules/positions.py",
        "self.dim = max(2, int(round(head_dim * fraction, 6)) // 2 * 2)", "self.dim = max(2, head_dim // 2 // 2 * 2)",
        "--rotary-fraction is accepted but half of each head's dimensions is always rotated"),
    Bug("retina_gate_reads_empty_scale", "modules/gated_chunks.py",
        "g = gates[:, :, rows].reshape(bsz, heads, n, layout.chunk, -1) * group.present",
        "g = gates[:, :, rows].reshape(bsz, heads, n, layout.chunk, -1)",
        "--retina-gate: a query that reads nothing of a scale still adds that scale's unmasked (future) read"),
    Bug("retina_gate_one_softmax", "modules/retina_attention.py", "if self.gate is None:\n            read",
        "if True:\n            read",
        "--retina-gate is accepted but the blockwise pass keeps one softmax over every scale (decoding gates them)"),
    Bug("retina_select_inside_window", "modules/retina_attention.py",
        "return ends.unsqueeze(0) <= window_start.unsqueeze(1)",
        "return ends.unsqueeze(0) <= window_start.unsqueeze(1) + block_lengths[-1]",
        "--retina-select: a query may pick the block its window starts in, up to K - 1 tokens after it"),
    Bug("retina_select_ignored", "modules/retina_attention.py", "        if self.select:\n            read",
        "        if False:\n            read",
        "--retina-select is accepted but the blockwise pass reads no selected block (decoding does)"),
    # --- the gated scales' hand-written backward (gated_chunks.py)
    Bug("gated_backward_no_row_term", "modules/gated_chunks.py",
        "d_scores.append(weights * (d_weights - (d_weights * weights).sum(-1, keepdim=True)))",
        "d_scores.append(weights * d_weights)",
        "--retina-gate: the softmax's backward forgets the row term (gradients wrong, the forward right)"),
    Bug("gated_backward_gate_grad_unmasked", "modules/gated_chunks.py",
        "grad_gates[:, :, rows] = (torch.cat(d_g, dim=-1) * group.present)",
        "grad_gates[:, :, rows] = (torch.cat(d_g, dim=-1))",
        "--retina-gate: a gate of a scale the query reads nothing of gets a gradient from the opened softmax"),
    Bug("gated_backward_dropout_unscaled", "modules/gated_chunks.py", "d_weights = d_weights * kept / (1 - dropout)",
        "d_weights = d_weights * kept", "--retina-gate with attention dropout: the backward forgets the 1 / (1 - p)"),
    Bug("gated_backward_gate_grad_undropped", "modules/gated_chunks.py",
        "d_g.append((mixed * d_mixed).sum(-1, keepdim=True))", "d_g.append((weights * d_mixed).sum(-1, keepdim=True))",
        "--retina-gate with attention dropout: the gates' gradient reads the weights before dropout"),
    Bug("retina_bucket_one_short", "modules/retina_attention.py",
        "start = (t // window - 1) * window if bucketed", "start = (t // window) * window if bucketed",
        "--retina-bucketed-window: the window starts at the query's own bucket (a bucket short: 1 .. W tokens)"),
    Bug("retina_bucket_step_unbucketed", "modules/retina_attention.py",
        "bounds = retina_bounds(t, lengths, self.window, self.blocks, self.bucketed)",
        "bounds = retina_bounds(t, lengths, self.window, self.blocks)",
        "--retina-bucketed-window: decoding steps read the block-aligned window, the full pass the bucketed one"),
    Bug("scale_positions_kept", "modules/positions.py", 'if getattr(args, "no_scale_positions", False):',
        "if False:", "--no-scale-positions is accepted but the coarse scales keep their position vectors"),
    # --- a mixed-precision invariant broken while the output stays close to fp32
    Bug("linear_pool_half_stream", "modules/pooling.py", "return self.proj(x.reshape(bsz, n // r, r * dim)).to(x.dtype)",
        "return self.proj(x.reshape(bsz, n // r, r * dim))",
        "--amp: linear pooling starts the coarser scale's residual stream in half precision"),
    Bug("top_down_concat_half_stream", "models/top_down.py",
        "return self.combine[s](torch.cat([inputs, context], dim=-1)).to(inputs.dtype)",
        "return self.combine[s](torch.cat([inputs, context], dim=-1))",
        "--amp: top-down's concat projection starts the finer scale's residual stream in half precision"),
    Bug("ffn_residual_in_place", "modules/attention.py", "return x + self.dropout(self.fc2(self.activation_dropout(h)))",
        "return self.dropout(self.fc2(self.activation_dropout(h))).add_(x)",
        "the FFN's residual add done in place on the branch: under --amp every stream drops to half precision"),
    Bug("block_positions_table_dtype", "modules/positions.py", "return x + self.weight[offset:end].to(x).unsqueeze(0)",
        "return x + self.weight[offset:end].unsqueeze(0)",
        "block positions add in their table's dtype: --amp retina's pooled keys turn fp32 beside half ones"),
]


def plant(bug, scratch: str):
    """Copy tests, scripts and package to `scratch` and apply the bug there (None: the unmodified control)."""
    for folder in ("tests", "scripts", PACKAGE):
        shutil.copytree(os.path.join(REPO, folder), os.path.join(scratch, folder),
                        ignore=shutil.ignore_patterns("__pycache__"))
    os.symlink(os.path.join(REPO, "data-bin"), os.path.join(scratch, "data-bin"))
    if bug is None:
        return
    path = os.path.join(scratch, PACKAGE, bug.path)
    source = open(path).read()
    if source.count(bug.old) != 1:
        raise SystemExit(f"planted_bugs.py: error: {bug.name}: the text to replace occurs {source.count(bug.old)} "
                         f"times in {PACKAGE}/{bug.path} (the source changed: update BUGS)")
    open(path, "w").write(source.replace(bug.old, bug.new))


def run_suite(scratch: str, tests):
    """pytest -x on the copy; returns (a test failed, the first failing test or pytest's last line, exit code)."""
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=scratch,
            capture_output=True, text=True, timeout=SUITE_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        return True, f"(the tests hung for {SUITE_TIMEOUT} s)", None
    lines = proc.stdout.splitlines()
    # a failing test (or a module that no longer imports) names itself; a crash without one is not a catch
    failed = [line.split(" ")[1] for line in lines if line.startswith(("FAILED ", "ERROR "))]
    return bool(failed), (failed[0] if failed else lines[-1] if lines else ""), proc.returncode


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="plant only these bugs (see --list)")
    parser.add_argument("--tests", nargs="+", default=DEFAULT_TESTS, help="test files to run against each bug")
    parser.add_argument("--list", action="store_true", help="list the bugs and exit")
    args = parser.parse_args()
    names = {bug.name for bug in BUGS}
    if args.only and set(args.only) - names:
        parser.error(f"--only: unknown bug(s) {sorted(set(args.only) - names)}; see --list")
    if args.list:
        for bug in BUGS:
            print(f"{bug.name:28} {bug.path:32} {bug.what}")
        return
    bugs = [bug for bug in BUGS if not args.only or bug.name in args.only]

    with tempfile.TemporaryDirectory(prefix="planted-none-") as scratch:  # the control: no bug, the suite passes
        plant(None, scratch)
        failed, test, exit_code = run_suite(scratch, args.tests)
    if failed or exit_code != 0:
        raise SystemExit(f"planted_bugs.py: error: the tests fail without any planted bug ({test}): fix that first")
    print(f"[0/{len(bugs)}] no bug (control): {test.strip('= ')}", flush=True)

    rows, missed = [], []
    for i, bug in enumerate(bugs, start=1):
        with tempfile.TemporaryDirectory(prefix=f"planted-{bug.name}-") as scratch:
            plant(bug, scratch)
            start = time.time()
            caught, test, _ = run_suite(scratch, args.tests)
            seconds = time.time() - start
        verdict = "caught" if caught else "MISSED"
        test = test if caught else "-"
        print(f"[{i}/{len(bugs)}] {bug.name}: {verdict} in {seconds:.0f} s by {test}", flush=True)
        rows.append(f"| `{bug.name}` | {bug.what} | {verdict} | `{test}` |")
        if not caught:
            missed.append(bug.name)
    print("\n| bug | what | result | first failing test |\n|---|---|---|---|")
    print("\n".join(rows))
    print(f"\n{len(bugs) - len(missed)} of {len(bugs)} planted bugs caught" + (f"; missed: {missed}" if missed else ""))
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
