"""fairseq-msformer: multi-scale Transformer language models for fairseq (load with --user-dir)."""
from .errors import MsformerConfigError, install_cli_error_hook

install_cli_error_hook()

from . import models, tasks  # noqa: E402,F401  (registers the model, its architectures and the task)
