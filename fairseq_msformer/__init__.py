"""fairseq-msformer: multi-scale Transformer language models for fairseq (load with --user-dir)."""
from .checkpoints import install_atomic_checkpoint_copies
from .errors import MsformerConfigError, install_cli_error_hook

install_cli_error_hook()
install_atomic_checkpoint_copies()  # checkpoint_last.pt survives a kill during its save

from . import models, tasks  # noqa: E402,F401  (registers the model, its architectures and the task)
