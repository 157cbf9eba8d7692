"""Configuration errors reach the user as one line, before any training starts (design.md §4.4)."""
import sys


class MsformerConfigError(ValueError):
    """A bad model/task option; the message names the option, e.g. '--pool-factors: ...'."""


def install_cli_error_hook():
    """Print MsformerConfigError as one line instead of a traceback when it ends a fairseq CLI.

    Only the top-level (uncaught) report changes: code that calls the package still gets the exception.
    """
    previous = sys.excepthook
    if getattr(previous, "_msformer", False):
        return

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, MsformerConfigError):
            print(f"fairseq-msformer: error: {exc}", file=sys.stderr)
        else:
            previous(exc_type, exc, tb)

    hook._msformer = True
    sys.excepthook = hook
