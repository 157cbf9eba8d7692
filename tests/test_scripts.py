"""The benchmark and the reproduction run end to end (tiny settings) and write what they promise."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPTS = os.path.join(REPO, "scripts")


def run(script, *args, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, os.path.join(SCRIPTS, script), *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_benchmark_side_by_side(tmp_path):
    out = run("experiments/benchmark.py", "--models", "transformer_lm", "bottom_up", "--modes", "train", "generate",
              "--lengths", "64", "--retina-lengths", "--generate-lengths", "16", "--dim", "32", "--ffn", "64",
              "--heads", "2", "--layers", "2", "--vocab", "100", "--repeats", "1", "--generate-steps", "2",
              "--target-length", "64", "--out", tmp_path)
    results = json.load(open(tmp_path / "benchmark.json"))["results"]
    assert {(r["model"], r["mode"]) for r in results} == {
        (m, mode) for m in ("transformer_lm", "bottom_up") for mode in ("train", "generate")}
    assert all("error" not in r for r in results), results
    train = {r["model"]: r for r in results if r["mode"] == "train"}
    assert all(r["saved_mib"] > 0 and r["tokens_per_s"] > 0 and r["peak_mib"] > 0 for r in train.values())
    assert "30 layers" in train["bottom_up"]["layout"]  # the paper preset, at the width asked for
    table = open(tmp_path / "benchmark.md").read()
    assert "MiB saved for backward" in table and "bottom_up at T=64: saved MiB" in table
    assert os.path.getsize(tmp_path / "benchmark.png") > 0
    assert "written:" in out


def test_reproduce_quick_is_resumable(tmp_path, small_corpus):
    out_dir, save_root = tmp_path / "out", tmp_path / "ckpt"
    # the pipeline, not the corpus, is under test: a corpus of ~1k tokens per evaluation split keeps its every-token
    # validations and eval-lm runs short
    options = ["--quick", "--data", small_corpus, "--threads", "1", "--out", out_dir, "--save-root", save_root]
    run("experiments/reproduce.py", *options)
    results = json.load(open(out_dir / "results.json"))
    assert set(results) == {"transformer_lm", "bottom_up"}
    for r in results.values():
        assert [c["updates"] for c in r["curve"]] == [4, 8]
        assert r["curve"][-1]["tokens"] > r["curve"][0]["tokens"] > 0
        assert 1 < r["valid_ppl"] < 20000 and 1 < r["test_ppl"] < 20000
        assert r["activation_mib"] > 0 and r["params"] > 0 and r["peak_rss_mib"] > 0
        assert r["train_seconds"] > 0 and r["train_tokens_per_s"] > 0
    for name in ("results.md", "learning_curves.png", "perplexity_vs_memory.png"):
        assert os.path.getsize(out_dir / name) > 0
    again = run("experiments/reproduce.py", *options)
    assert again.count("done earlier") == 2 and "[1/2]" not in again  # nothing trained again
    # a repeat at another seed: one more run, kept beside the first; the report gives the mean and spread
    repeated = run("experiments/reproduce.py", *options, "--only", "bottom_up", "--repeat-seeds", "2")
    assert repeated.count("done earlier") == 1 and "[2/2]" in repeated
    seed2 = json.load(open(out_dir / "runs" / "bottom_up.seed2.json"))
    assert seed2["settings"]["seed"] == 2 and seed2["valid_ppl"] != results["bottom_up"]["valid_ppl"]
    results = json.load(open(out_dir / "results.json"))
    bottom_up = results["bottom_up"]
    assert bottom_up["seeds"] == [1, 2] and bottom_up["valid_ppl"] == bottom_up["valid_ppls"][0]
    assert bottom_up["valid_ppl_mean"] == pytest.approx((bottom_up["valid_ppls"][0] + seed2["valid_ppl"]) / 2)
    assert "seeds" not in results["transformer_lm"]
    assert "(2 seeds:" in open(out_dir / "results.md").read()
    # memory measured again from the checkpoints (after a memory-only change): nothing trained, the rest kept
    remeasured = run("experiments/reproduce.py", *options, "--remeasure-memory")
    assert remeasured.count(" MiB saved for backward") == 2 and "[1/2]" not in remeasured
    after = json.load(open(out_dir / "results.json"))
    for name, r in after.items():
        assert r["activation_mib"] == pytest.approx(results[name]["activation_mib"], rel=0.01)
        assert r["valid_ppl"] == results[name]["valid_ppl"] and r["curve"] == results[name]["curve"]
    # the same model at another --seed into the same checkpoints: stops before fairseq-train resumes seed 1's run
    refused = subprocess.run([sys.executable, os.path.join(SCRIPTS, "experiments/reproduce.py"), *map(str, options),
                              "--only", "bottom_up", "--seed", "2", "--out", str(tmp_path / "other")],
                             capture_output=True, text=True)
    assert refused.returncode != 0 and "holds checkpoints of another run of this model (differs in seed)" in refused.stderr


def test_fast_subset_is_what_the_planted_bugs_run():
    """`make test-fast` (the Makefile's FAST_TESTS) runs exactly the in-process files planted_bugs.py runs against
    each bug: the edit-test loop is the part of the suite shown to catch them."""
    from test_data_scripts import load_script_module

    makefile = open(os.path.join(REPO, "Makefile")).read().replace("\\\n", " ")
    (fast,) = re.findall(r"^FAST_TESTS\s*:=(.*)$", makefile, re.MULTILINE)
    assert sorted(fast.split()) == sorted(load_script_module("checks/planted_bugs").DEFAULT_TESTS)


def test_planted_bugs_still_apply():
    """scripts/checks/planted_bugs.py plants each bug by replacing an exact text once: the package must still hold each
    text exactly once, or the script (run by hand, ~10 min) would stop instead of showing the suite catch it."""
    from test_data_scripts import load_script_module

    planted = load_script_module("checks/planted_bugs")
    assert len(planted.BUGS) >= 15
    for bug in planted.BUGS:
        source = open(os.path.join(REPO, planted.PACKAGE, bug.path)).read()
        assert source.count(bug.old) == 1, f"{bug.name}: update its text in scripts/checks/planted_bugs.py"
