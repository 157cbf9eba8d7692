"""Training survives being killed (issue 15): fairseq-train killed with SIGKILL during an update, during validation
and while a checkpoint is being written, several times, and started again each time with the same command, ends
with the parameters of an uninterrupted run (dropout on), for one tiny model of each family. No start fails, and
after every kill every checkpoint file loads and checkpoint_last.pt holds the newest complete checkpoint.

The moments are aimed, not left to luck. The harness follows the run's log as it is written and kills at a seeded
random delay after the line that opens the phase: into an update, a validation, or a checkpoint's save (at most
half the phase's shortest duration in the uninterrupted run). The copy of a checkpoint to checkpoint_last.pt takes
a few milliseconds, too short to aim at from outside, so it has a breakpoint: the run's os.sendfile (what
shutil.copyfile copies with) stops after a random part of the bytes and waits there for the kill. Afterwards the
log says where each kill landed, and every kind of moment must have been hit for every family.

fairseq alone loses checkpoint_last.pt to that kill: it writes the first file of a save atomically but copies it to
checkpoint_last.pt in place, and the same command then fails to start (test_fairseq_alone_...). The plugin makes
those copies atomic (fairseq_msformer/checkpoints.py). `python tests/test_kill_resume.py N` measures how often a
kill at a uniformly random moment of a save, no breakpoint, loses it: N kills with fairseq alone, N with the plugin.

Every run is fairseq_cli.train.cli_main, the function the fairseq-train script calls, with fairseq-train's exact
command line, in a process forked from one that has already imported fairseq and torch: a fresh interpreter spends
some 5 s of CPU on those imports, and this file starts fairseq-train 20-odd times.
"""
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import CORPUS, REPO, USER_DIR, corpus_subset
from test_cli import FAMILIES, TASK, checkpoint_weights, max_difference
from test_resume import EPSILON, TRANSFORMER_LM

SPLITS = {"train": ("train", 2000), "valid": ("valid", 40)}  # the first lines of the shipped corpus's splits

UPDATES = 16  # every run stops here
SAVE_EVERY = 2  # --save-interval-updates: every 2 updates a validation, then checkpoint_1_N.pt, copied to _best, _last
FIRST_KILL = 4  # kills are at updates 4, 6, ...: after the first checkpoint, so every start after a kill resumes
KINDS = ("update", "validation", "save", "checkpoint_last")  # save: up to its first file; then its copy to _last
MAX_KILLS = (UPDATES - FIRST_KILL) // SAVE_EVERY  # 6: each kind once, and two more for kills that missed their phase
FAIRSEQ_ALONE = ["--task", "language_modeling", "--cpu"]  # no --user-dir: fairseq's own checkpointing

FORK_SERVER = r"""
import json, os, sys, time, traceback
import fairseq_cli.train, torch._dynamo  # most of a fairseq-train start (torch.optim imports _dynamo when first used)
for request in map(json.loads, sys.stdin):
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        log = os.open(request["log"], os.O_WRONLY | os.O_APPEND)
        os.dup2(log, 1)
        os.dup2(log, 2)
        sys.argv = request["argv"]
        if request["breakpoint"]:
            source, target, fraction = request["breakpoint"]
            sendfile = os.sendfile  # what shutil.copyfile, and so fairseq's PathManager.copy, copies with

            def sendfile_to_breakpoint(out_fd, in_fd, offset, count):
                if (os.readlink(f"/proc/self/fd/{in_fd}").endswith(source)
                        and os.path.basename(os.readlink(f"/proc/self/fd/{out_fd}")).startswith(target)):
                    part = sendfile(out_fd, in_fd, offset, max(1, int(os.fstat(in_fd).st_size * fraction)))
                    print(f"kill_resume breakpoint: {part} bytes of {source} written to {target}", flush=True)
                    time.sleep(60)
                    return part
                return sendfile(out_fd, in_fd, offset, count)

            os.sendfile = sendfile_to_breakpoint
        try:
            status = fairseq_cli.train.cli_main() or 0
        except SystemExit as exit:
            status = exit.code if isinstance(exit.code, int) else 1
        except BaseException:
            traceback.print_exc()
            status = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    print(pid, flush=True)
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    with open(request["log"] + ".tmp", "w") as out:
        out.write(str(status))
    os.replace(request["log"] + ".tmp", request["log"] + ".status")
"""

# A log line, and the phase fairseq-train is in from that line to the next one of them.
PHASE_LINES = [
    (re.compile(r"Start iterating over samples|\| train_inner \||Saved checkpoint "), "update"),
    (re.compile(r"begin validation on"), "validation"),
    (re.compile(r"valid on '"), "between validation and save"),
    (re.compile(r"Preparing to save checkpoint|Saving checkpoint to"), "save"),
    (re.compile(r"Finished saving checkpoint to"), "copies"),  # the first file is complete, now copied to the others
    (re.compile(r"^kill_resume breakpoint:"), "checkpoint_last"),  # Kill.breakpoint: the copy to checkpoint_last
]


def train_argv(data, save_dir, arch_flags, task_flags=TASK):
    """fairseq-train's command line: the tests' settings (conftest.train) with 128-token batches, a log line per
    update, and a validated checkpoint every SAVE_EVERY updates (checkpoint_1_N.pt, copied to checkpoint_best.pt and
    checkpoint_last.pt)."""
    return ["fairseq-train", data, *task_flags, *arch_flags, "--tokens-per-sample", "64", "--max-tokens", "128",
            "--optimizer", "adam", "--lr", "2e-3", "--max-update", UPDATES, "--max-valid-steps", "2",
            "--num-workers", "0", "--save-dir", save_dir, "--no-epoch-checkpoints", "--log-format", "simple",
            "--log-interval", "1", "--seed", "1", "--save-interval-updates", SAVE_EVERY]


def logged_update(line):
    """The update count of a training log line (fairseq logs one after each update here), else None."""
    match = re.search(r"\| train_inner \|.*num_updates=(\d+),", line)
    return int(match.group(1)) if match else None


class Kill:
    """A SIGKILL at update `update` of a run: `delay` seconds into the update itself (after the log line of the update
    before), into its validation or into its checkpoint's save; or, for "checkpoint_last", while that checkpoint is
    being copied to checkpoint_last.pt, at a breakpoint after `fraction` of the bytes."""

    def __init__(self, kind, update, delay=0.0, fraction=0.5):
        self.kind, self.update, self.delay, self.fraction = kind, update, delay, fraction
        self.armed = False  # validation: the update's own log line was seen, its validation comes next

    def breakpoint(self):
        """(source file, target name, fraction) for the fork server, or None."""
        if self.kind == "checkpoint_last":
            return [f"/checkpoint_1_{self.update}.pt", "checkpoint_last", self.fraction]
        return None

    def opens(self, line) -> bool:
        """Whether the phase to kill opens at this log line."""
        if self.kind == "update":
            return logged_update(line) == self.update - 1
        if self.kind == "save":
            return f"Preparing to save checkpoint for epoch 1 @ {self.update} updates" in line
        if self.kind == "checkpoint_last":
            return line.startswith("kill_resume breakpoint:")
        if logged_update(line) == self.update:
            self.armed = True
        return self.armed and "begin validation on" in line


class ForkServer:
    """Starts fairseq-train runs as the module's docstring says; each writes its output to a log file."""

    def __init__(self):
        # one thread: a tiny model gains nothing from a second, and a busy machine's spinning OpenMP threads cost
        # several times the CPU of the work (the uninterrupted and the killed runs use the same, so they compare)
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self.process = subprocess.Popen([sys.executable, "-c", FORK_SERVER], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)

    def run(self, argv, log_path, kill=None):
        """One fairseq-train run, killed as `kill` says if given: (exit code, [(seconds since start, log line)])."""
        open(log_path, "w").close()
        started = time.monotonic()
        request = {"argv": [str(arg) for arg in argv], "log": str(log_path), "breakpoint": kill and kill.breakpoint()}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        pid = int(self.process.stdout.readline())
        kill_at, lines, partial = None, [], ""
        with open(log_path) as log:
            while not os.path.exists(f"{log_path}.status"):
                chunk = log.read()
                *complete, partial = (partial + chunk).split("\n")
                now = time.monotonic()
                lines += [(now - started, line) for line in complete]
                if kill and kill_at is None and any(map(kill.opens, complete)):
                    kill_at = now + kill.delay
                if kill_at is not None and now >= kill_at:
                    with contextlib.suppress(ProcessLookupError):  # it ended first: the caller sees its exit code
                        os.kill(pid, signal.SIGKILL)
                    kill = kill_at = None
                if not chunk:
                    time.sleep(0.001)
            lines += [(time.monotonic() - started, line) for line in (partial + log.read()).split("\n") if line]
        with open(f"{log_path}.status") as status:
            return int(status.read()), lines

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=60)


def phase_at_end(lines) -> str:
    """The phase a killed run was in: the one its last phase line opened."""
    phase = "startup"
    for _, line in lines:
        for pattern, name in PHASE_LINES:
            if pattern.search(line):
                phase = name
    return phase


def checkpoint_updates(path) -> int:
    state = torch.load(path, map_location="cpu", weights_only=False)
    return state["optimizer_history"][-1]["num_updates"]


def saved_updates(lines) -> list:
    """The update counts of the checkpoints a run finished saving (checkpoint_last.pt included)."""
    matches = (re.search(r"Saved checkpoint .* @ (\d+) updates", line) for _, line in lines)
    return [int(match.group(1)) for match in matches if match]


def spans(lines, opening, closing) -> list:
    """Seconds from each line matching `opening` to the next line matching `closing`."""
    durations, opened = [], None
    for seen, line in lines:
        if opened is not None and re.search(closing, line):
            durations.append(seen - opened)
            opened = None
        if re.search(opening, line):
            opened = seen
    return durations


def shortest_phases(lines) -> dict:
    """The shortest duration of each kind of moment in an uninterrupted run's log, to aim the kills inside them: an
    update that follows one without a validation, a validation, a save up to its first file complete."""
    updates = [(seen, logged_update(line)) for seen, line in lines if logged_update(line) is not None]
    return {
        "update": min(seen - before for (before, n), (seen, _) in zip(updates, updates[1:]) if n % SAVE_EVERY),
        "validation": min(spans(lines, r"begin validation on", r"valid on '")),
        "save": min(spans(lines, r"Preparing to save checkpoint", r"Finished saving checkpoint to")),
    }


def checkpoints_held(save_dir) -> dict:
    """{file name: its update count} for every checkpoint file; one that does not load is a lost checkpoint."""
    held = {}
    for name in sorted(os.listdir(save_dir)):
        if name.endswith(".pt"):
            try:
                held[name] = checkpoint_updates(os.path.join(save_dir, name))
            except Exception as error:  # what fairseq-train would meet when it loads it
                raise AssertionError(f"{name} was lost to the kill: {type(error).__name__}: {error}") from error
    return held


def tail(lines, count=40) -> str:
    return "\n".join(line for _, line in lines[-count:])


def assert_started_from(lines, save_dir, updates):
    expected = (f"Loaded checkpoint {save_dir}/checkpoint_last.pt (epoch 1 @ {updates} updates)" if updates
                else "No existing checkpoint found")
    assert any(expected in line for _, line in lines), f"expected '{expected}':\n{tail(lines)}"


@pytest.fixture(scope="module")
def data(corpus, tmp_path_factory):
    # 2,000 lines of train are ~430 batches of 128 tokens: every run stays inside the first epoch
    return corpus_subset(corpus, str(tmp_path_factory.mktemp("data")), SPLITS)


@pytest.fixture(scope="module")
def server():
    fork_server = ForkServer()
    yield fork_server
    fork_server.close()


def kill_and_resume(server, argv, save_dir, logs, rng, shortest) -> list:
    """Kills fairseq-train at one moment of each kind, in a random order, a kill at a later update for any that
    missed its moment, and starts it again with the same command after each; returns the kills as (kind aimed at,
    update, delay or part of the copy, phase it landed in, update count checkpoint_last.pt held)."""
    plan, kills, resumed_from = list(KINDS), [], 0
    rng.shuffle(plan)
    for update in range(FIRST_KILL, UPDATES, SAVE_EVERY):
        if not plan:
            break
        kind = plan.pop(0)
        if kind == "checkpoint_last":
            kill = Kill(kind, update, fraction=rng.uniform(0.05, 0.95))
        else:
            kill = Kill(kind, update, delay=rng.uniform(0, 0.5) * shortest[kind])
        code, lines = server.run(argv, logs / f"killed_at_{update}.log", kill)
        assert code == -signal.SIGKILL, f"the run ended ({code}) before its kill:\n{tail(lines)}"
        assert_started_from(lines, save_dir, resumed_from)
        landed = phase_at_end(lines)
        held = checkpoints_held(save_dir)
        newest_complete = max(saved_updates(lines), default=resumed_from)
        assert newest_complete <= held["checkpoint_last.pt"] <= update, (newest_complete, held, update)
        if landed == "checkpoint_last":  # its copy was cut short: the previous checkpoint_last.pt is still whole
            assert held["checkpoint_last.pt"] < update, held
        resumed_from = held["checkpoint_last.pt"]
        kills.append((kind, update, round(kill.fraction if kind == "checkpoint_last" else kill.delay, 4), landed,
                      resumed_from))
        if landed != kind:
            plan.append(kind)
    assert not plan, f"no kill landed {plan} within {MAX_KILLS} kills: {kills}"
    code, lines = server.run(argv, logs / "completed.log")
    assert code == 0, tail(lines)
    assert_started_from(lines, save_dir, resumed_from)
    return kills


@pytest.mark.parametrize("family", ["bottom_up", "top_down_adaptive", "retina"])
def test_killed_runs_resume_to_the_parameters_of_an_uninterrupted_run(family, server, data, tmp_path):
    uninterrupted, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    code, lines = server.run(train_argv(data, uninterrupted, FAMILIES[family]), tmp_path / "uninterrupted.log")
    assert code == 0, tail(lines)
    rng = random.Random(f"kill {family}")  # the same kills on every run of the test
    kills = kill_and_resume(server, train_argv(data, killed, FAMILIES[family]), killed, tmp_path, rng,
                            shortest_phases(lines))
    difference = max_difference(checkpoint_weights(uninterrupted), checkpoint_weights(killed))
    print(f"{family}: {len(kills)} kills (kind aimed at, update, delay s or part copied, landed in, resumed from): "
          f"{kills}; max |parameter difference| {difference:.3g}")
    assert difference <= EPSILON


def test_fairseq_alone_loses_checkpoint_last_to_a_kill_during_its_copy(server, data, tmp_path):
    """Why the plugin makes checkpoint copies atomic, and proof that the kills above reach the copy: the same kill,
    with fairseq's own checkpointing (transformer_lm, no --user-dir), leaves a truncated checkpoint_last.pt, and the
    same command then fails instead of resuming."""
    argv = train_argv(data, tmp_path, TRANSFORMER_LM, FAIRSEQ_ALONE)
    code, lines = server.run(argv, tmp_path / "killed.log", Kill("checkpoint_last", FIRST_KILL))
    assert code == -signal.SIGKILL and phase_at_end(lines) == "checkpoint_last"
    with pytest.raises(Exception):
        checkpoint_updates(tmp_path / "checkpoint_last.pt")
    code, lines = server.run(argv, tmp_path / "restarted.log")
    assert code != 0 and "failed reading zip archive" in "\n".join(line for _, line in lines)


def measure(kills):
    """Kills at uniformly random moments from the first log line of a save to a quarter past the longest save of an
    uninterrupted run, `kills` times with fairseq alone and as many with the plugin loaded (same model and task);
    prints where they landed and how many lost checkpoint_last.pt or checkpoint_best.pt."""
    import tempfile
    server, rng = ForkServer(), random.Random("measure")
    with tempfile.TemporaryDirectory() as root:
        data = corpus_subset(CORPUS, f"{root}/data", SPLITS)
        for setting, task_flags in (("fairseq alone", FAIRSEQ_ALONE),
                                    ("plugin loaded", ["--user-dir", USER_DIR, *FAIRSEQ_ALONE])):
            code, lines = server.run(train_argv(data, f"{root}/{setting}", TRANSFORMER_LM, task_flags),
                                     f"{root}/{setting}.log")
            assert code == 0, tail(lines)
            saves = spans(lines, r"Preparing to save checkpoint", r"Saved checkpoint ")
            landed = {"save": 0, "copies": 0, "after it": 0}
            lost = {"checkpoint_last.pt": 0, "checkpoint_best.pt": 0}
            for i in range(kills):
                save_dir = f"{root}/{setting}{i}"
                argv = train_argv(data, save_dir, TRANSFORMER_LM, task_flags)
                kill = Kill("save", FIRST_KILL, delay=rng.uniform(0, 1.25 * max(saves)))
                code, lines = server.run(argv, f"{save_dir}.log", kill)
                assert code == -signal.SIGKILL, tail(lines)
                phase = phase_at_end(lines)
                landed[phase if phase in landed else "after it"] += 1
                for name in lost:
                    try:
                        checkpoint_updates(os.path.join(save_dir, name))
                    except Exception:
                        lost[name] += 1
            print(f"{setting}: saves of {min(saves) * 1000:.0f}-{max(saves) * 1000:.0f} ms; {kills} kills, landed in "
                  f"the first file's write {landed['save']}, in the copies {landed['copies']}, after the save "
                  f"{landed['after it']}; lost " + ", ".join(f"{name} {count}" for name, count in lost.items()))
    server.close()


if __name__ == "__main__":
    measure(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
