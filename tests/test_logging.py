"""fairseq-train's loggers with our model: --tensorboard-logdir works out of the box (tensorboardX is in
requirements.txt), --wandb-project logs through wandb when it is importable and is only a warning when not.

wandb is never contacted: a stand-in module on PYTHONPATH either records what fairseq sends it or hides an
installed wandb, so both cases run on any machine.
"""
import json
import os
import struct

from tensorboardX.proto import event_pb2

from conftest import USER_DIR, fairseq_cli

FAKE_WANDB = '''"""Stand-in for wandb: records each call fairseq makes, one JSON line each, in $FAKE_WANDB_LOG."""
import json, os


def _record(call, **values):
    with open(os.environ["FAKE_WANDB_LOG"], "a") as f:
        f.write(json.dumps({"call": call, **values}, default=str) + "\\n")


class _Config:
    def update(self, values):
        _record("config.update", keys=sorted(values))


config = _Config()


def init(project=None, reinit=None, name=None):
    _record("init", project=project, name=name)


def log(values, step=None):
    _record("log", values=values, step=step)
'''
NO_WANDB = 'raise ImportError("wandb is hidden by tests/test_logging.py")\n'


def train(corpus, save_dir, *flags):
    """Two updates of the tiny bottom-up model, validation after them."""
    proc = fairseq_cli(
        "fairseq-train", corpus, "--user-dir", USER_DIR, "--task", "multiscale_language_modeling", "--cpu",
        "--arch", "msformer_lm_bottom_up_tiny", "--tokens-per-sample", "128", "--max-tokens", "512",
        "--optimizer", "adam", "--lr", "1e-3", "--max-update", "2", "--max-valid-steps", "1", "--num-workers", "0",
        "--log-format", "simple", "--log-interval", "1", "--save-dir", save_dir, "--no-epoch-checkpoints", *flags,
    )
    return proc.stdout + proc.stderr


def with_module_on_path(monkeypatch, directory, name, source):
    """Put <directory>/<name>.py first on the PYTHONPATH of the processes this test starts."""
    directory.mkdir()
    (directory / f"{name}.py").write_text(source)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(directory), os.environ.get("PYTHONPATH")])))


def scalar_tags(logdir):
    """Tags of the scalars in a tensorboard log directory (event files are TFRecords of Event protos)."""
    tags = set()
    for name in os.listdir(logdir):
        data = (logdir / name).read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])  # then a 4-byte CRC, the record, a CRC
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            tags.update(value.tag for value in event.summary.value if value.HasField("simple_value"))
            offset += 12 + length + 4
    return tags


def test_tensorboard_logs_and_a_missing_wandb_is_only_a_warning(corpus, tmp_path, monkeypatch):
    with_module_on_path(monkeypatch, tmp_path / "no_wandb", "wandb", NO_WANDB)
    logdir = tmp_path / "tensorboard"
    log = train(corpus, tmp_path / "checkpoints", "--tensorboard-logdir", logdir, "--wandb-project", "msformer")

    assert "Please install tensorboardX" not in log and "tensorboard not found" not in log
    for split in ("train_inner", "train", "valid"):  # fairseq writes one log directory per stats group
        assert {"loss", "ppl"} <= scalar_tags(logdir / split), split
    assert "wandb not found" in log  # fairseq's warning; training went on
    assert (tmp_path / "checkpoints" / "checkpoint_last.pt").is_file()


def test_wandb_project_logs_through_wandb(corpus, tmp_path, monkeypatch):
    with_module_on_path(monkeypatch, tmp_path / "fake_wandb", "wandb", FAKE_WANDB)
    monkeypatch.setenv("FAKE_WANDB_LOG", str(tmp_path / "wandb.jsonl"))
    train(corpus, tmp_path / "run-1", "--wandb-project", "msformer")

    calls = [json.loads(line) for line in (tmp_path / "wandb.jsonl").read_text().splitlines()]
    assert calls[0] == {"call": "init", "project": "msformer", "name": "run-1"}  # the run is named after save_dir
    updates = [c for c in calls if c["call"] == "config.update"]
    assert updates and {"model", "task"} <= set(updates[0]["keys"])
    logged = {key for c in calls if c["call"] == "log" for key in c["values"]}
    assert {"train_inner/loss", "train/loss", "valid/loss"} <= logged
