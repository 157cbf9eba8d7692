"""scripts/experiments/gpu_check.py in its CPU mode (issue 14): the GPU check that a session with a device runs in one
go must keep working without one. One run on the shipped corpus (two models, tiny sizes, fp32, gloo) is checked
stage by stage; a run that cannot work on a CPU (--bf16: fairseq has no CPU bf16) must be recorded as a failure
without stopping the others.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO

SCRIPT = os.path.join(REPO, "scripts", "experiments", "gpu_check.py")
sys.path.insert(0, os.path.dirname(SCRIPT))
import gpu_check  # noqa: E402
PEAK_TFLOPS = 0.5  # a stand-in peak: the CPU has no entry in the bf16 table, and MFU must still be computed
UPDATES, LOG_INTERVAL, LENGTH = 8, 2, 128
C, F, LAYERS, HEADS = 32, 64, 2, 2


@pytest.fixture(scope="module")
def checked(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    args = ["--device", "cpu", "--data", corpus, "--out", out, "--models", "transformer_lm", "bottom_up",
            "--adaptive-runs", "bottom_up:bf16", "--updates", UPDATES, "--log-interval", LOG_INTERVAL,
            "--bench-lengths", LENGTH, "--profile-length", LENGTH, "--dim", C, "--ffn", F, "--layers", LAYERS,
            "--heads", HEADS, "--world-size", 2, "--torchrun-updates", 3, "--peak-tflops", PEAK_TFLOPS]
    proc = subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))  # one thread a process: they share 2 cores
    log = proc.stdout + proc.stderr
    assert os.path.exists(out / "results.json"), log[-4000:]
    with open(out / "results.json") as f:
        results = json.load(f)
    return proc, results, (out / "results.md").read_text(), log


def test_device_named_and_failure_recorded_without_stopping_the_rest(checked):
    proc, results, report, log = checked
    assert proc.returncode == 1, log[-3000:]  # one failure recorded: the bf16 run
    assert "gpu_check: 1 failure(s)" in proc.stderr
    [failure] = results["failures"]
    assert failure.startswith("train bottom_up adaptive bf16: exit code 1") and "xla_device" in failure, failure
    assert set(results["stages"]) == {"train", "bench", "torchrun"}
    info = results["device"]
    assert info["name"].startswith("CPU") and info["torch"] and info["fairseq"]
    assert f"# GPU check: {info['name']}" in report and f"torch {info['torch']}" in report
    assert f"- {failure}" in report


def test_training_runs_log_finite_falling_loss_speed_and_memory(checked):
    _, results, report, _ = checked
    runs = {(r["model"], r["precision"], r["adaptive"]): r for r in results["stages"]["train"]["runs"]}
    assert set(runs) == {("transformer_lm", "fp32", False), ("bottom_up", "fp32", False), ("bottom_up", "bf16", True)}
    for key in [("transformer_lm", "fp32", False), ("bottom_up", "fp32", False)]:
        run = runs[key]
        assert run["error"] is None, run
        updates = [u for u, _ in run["losses"]]
        losses = [loss for _, loss in run["losses"]]
        assert updates == list(range(LOG_INTERVAL, UPDATES + 1, LOG_INTERVAL))
        assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
        assert run["finite"] and run["falling"] and run["overflows"] == 0
        assert run["wps"] > 0 and run["peak_mib"] > 100  # resident set of a process holding torch and fairseq
        assert f"| {key[0]} | fp32 | {losses[0]:.2f} -> {losses[-1]:.2f} | yes, yes |" in report
    assert runs[("bottom_up", "bf16", True)]["losses"] == []


def test_benchmark_ratios_flop_counts_and_utilisation(checked):
    _, results, report, _ = checked
    bench = results["stages"]["bench"]
    points = {p["model"]: p for p in bench["points"]}
    assert set(points) == {"transformer_lm", "bottom_up"} and bench["lengths"] == {str(LENGTH): {
        "seconds": bench["lengths"][str(LENGTH)]["seconds"], "error": None}}
    base, family = points["transformer_lm"], points["bottom_up"]
    assert set(family["ratios"]) == {"tokens_per_s", "peak_mib", "saved_mib"} and base["ratios"] == {}
    for key, ratio in family["ratios"].items():
        assert ratio == pytest.approx(family[key] / base[key])
    # transformer_lm's step as FlopCounterMode counts it, written out: every linear layer three times (forward, input
    # and weight gradients) at 2 FLOPs per multiply-add, and SDPA's products of T x T by T x C per layer (masked
    # entries included): QK^T and AV forward, five backward (QK^T recomputed; dV, dP, dQ, dK). The forward alone,
    # attention left out, another length or another model's count misses it.
    vocab = len(open(os.path.join(REPO, "data-bin", "pydoc", "dict.txt")).readlines()) + 4  # fairseq's 4 specials
    linear = LAYERS * (4 * C * C + 2 * C * F) + C * vocab  # q, k, v, out; fc1, fc2; output projection
    attention = LAYERS * 2 * (2 + 5) * LENGTH**2 * C
    assert base["gflop_per_step"] * 1e9 == 6 * LENGTH * linear + attention
    assert family["gflop_per_step"] > 0 and family["gflop_per_step"] != base["gflop_per_step"]
    for p in (base, family):
        steps_per_s = p["tokens_per_s"] / LENGTH
        assert p["tflops"] == pytest.approx(p["gflop_per_step"] * 1e9 * steps_per_s / 1e12)
        assert p["mfu"] == pytest.approx(p["tflops"] / PEAK_TFLOPS)
        assert p["of_matmul"] is None  # no matmul ceiling measured on a CPU
        assert any("mm" in op for op in p["flops_by_op"])
    assert bench["peak_source"] == "--peak-tflops" and bench["probe"]["error"] is None
    profiles = {p["model"]: p for p in bench["profiles"]}
    assert set(profiles) == {"transformer_lm", "bottom_up"}
    assert any("scaled_dot_product" in op for op in profiles["bottom_up"]["attention"])  # our layers call SDPA
    assert profiles["bottom_up"]["top"] and 0 < sum(t["share"] for t in profiles["bottom_up"]["top"]) <= 1 + 1e-9
    speed = f"{family['tokens_per_s']:.0f} ({family['ratios']['tokens_per_s']:.2f}x)"
    assert f"| {LENGTH} | bottom_up | {speed} |" in report
    assert f"{family['mfu']:.1%}" in report


def test_torchrun_ranks_train_like_one_process(checked):
    _, results, report, _ = checked
    run = results["stages"]["torchrun"]
    assert run["error"] is None, run
    assert run["world_size"] == 2 and run["backend"] == "gloo" and run["init_logged"]
    assert len(run["rank_losses"]) == len(run["single_losses"]) == 3
    assert run["max_loss_difference"] <= 1e-3 and run["max_parameter_difference"] <= run["parameter_tolerance"]
    assert "## torchrun, gloo" in report


def test_preconditions_stop_with_one_line_each(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(["--device", "cuda", "--data", str(tmp_path), "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and not (tmp_path / "out").exists()
    assert all(line.startswith("gpu_check: ") for line in lines), lines  # one line each, no traceback
    assert f"gpu_check: corpus incomplete: {tmp_path / 'dict.txt'} is missing" in lines[-1]
    if not torch.cuda.is_available():
        assert lines[0].startswith("gpu_check: --device cuda, but torch") and len(lines) == 2, lines
