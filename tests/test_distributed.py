"""Multi-process training on a CPU (issue 9): each family trained by two fairseq-train processes, one per rank, as
design.md §6 describes (gloo, --distributed-no-spawn, legacy_ddp).

Two ranks with --update-freq 1 make exactly the updates of one process with --update-freq 2: fairseq deals the
epoch's batches out in turn (rank r gets batches r, r + 2, ...; one process groups batches 2u and 2u + 1 into
update u), sums the gradients of both and divides by the summed sample size. Dropout is off: fairseq seeds every
rank with --seed + the update count, so the two ranks draw the same masks, whereas one process draws its second
micro-batch's masks after the first's.
"""
import os
import re
import socket
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from test_cli import FAMILIES, checkpoint_weights, max_difference, train

UPDATES = 4
LOSS_TOLERANCE = 1e-3  # fairseq logs the loss with 3 decimals
PARAMETER_TOLERANCE = 1e-6  # two ranks against one process: the same sums in a different order, through 4 Adam steps
COMMON = ["--dropout", "0", "--max-tokens", "512", "--log-interval", "1", "--disable-validation"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distributed(rank: int, port: int):
    return ["--distributed-world-size", "2", "--distributed-rank", rank, "--distributed-init-method",
            f"tcp://127.0.0.1:{port}", "--distributed-no-spawn", "--distributed-backend", "gloo",
            "--ddp-backend", "legacy_ddp"]


def losses(log: str) -> list:
    """The train loss of every update, from fairseq's --log-interval 1 lines ('loss=13.879, ... num_updates=2')."""
    found = {int(u): float(loss) for loss, u in re.findall(r"train_inner.*?\bloss=([\d.]+),.*?num_updates=(\d+)", log)}
    return [found[u] for u in sorted(found)]


@pytest.mark.parametrize("family", ["bottom_up", "top_down_adaptive", "retina"])
def test_two_ranks_train_like_one_process_with_twice_the_batch(family, corpus, tmp_path):
    port = free_port()
    rank_dirs = [tmp_path / f"rank{rank}" for rank in (0, 1)]
    for folder in rank_dirs:
        folder.mkdir()  # fairseq creates the save dir on rank 0 only
    launcher = (os.path.basename(sys.executable), os.path.abspath(__file__))  # fairseq-train, every rank saving

    def run_rank(rank):
        return train(corpus, rank_dirs[rank], FAMILIES[family], UPDATES, *COMMON, *distributed(rank, port),
                     program=launcher, timeout=300)

    with ThreadPoolExecutor(2) as pool:
        ranks = list(pool.map(run_rank, (0, 1)))
    # the same launcher, so the single process also runs on one thread: the same reduction order inside each
    # matmul as the ranks (with 2 threads, Adam turns reordered roundings of near-zero gradients into ~1e-5..3e-4)
    single = train(corpus, tmp_path / "single", FAMILIES[family], UPDATES, *COMMON, "--update-freq", "2",
                   program=launcher, timeout=300)

    log = ranks[0].stdout + ranks[0].stderr
    assert "distributed init (rank 1)" in ranks[1].stdout + ranks[1].stderr and "wpb 1024" in log, log[-3000:]
    assert max_difference(checkpoint_weights(rank_dirs[0]), checkpoint_weights(rank_dirs[1])) == 0, "the ranks diverged"
    two_ranks, one_process = losses(log), losses(single.stdout + single.stderr)
    assert len(two_ranks) == len(one_process) == UPDATES
    assert max(abs(a - b) for a, b in zip(two_ranks, one_process)) <= LOSS_TOLERANCE, (two_ranks, one_process)
    difference = max_difference(checkpoint_weights(rank_dirs[0]), checkpoint_weights(tmp_path / "single"))
    print(f"{family}: losses {two_ranks} (2 ranks) vs {one_process} (1 process); max |parameter difference| "
          f"{difference:.3g}")
    assert difference <= PARAMETER_TOLERANCE


if __name__ == "__main__":
    # One rank of fairseq-train that saves its own checkpoint (fairseq saves on rank 0 only), so that the test can
    # compare the ranks' parameters; otherwise fairseq-train's own entry point, unchanged.
    from fairseq.trainer import Trainer
    from fairseq_cli.train import cli_main

    Trainer.should_save_checkpoint_on_current_rank = property(lambda self: True)
    torch.set_num_threads(1)  # two ranks share the machine's 2 cores; more threads only wait for each other
    cli_main()
