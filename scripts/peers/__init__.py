"""Outside implementations of our families' ideas, as fairseq language models (a fairseq --user-dir).

  fairseq-train data-bin/pydoc --user-dir scripts/peers --task multiscale_language_modeling --arch peer_hourglass ...

Each module registers one model around one PyPI package (requirements-peers.txt, `make peers`); common.py holds
what they share with ours. Importing this package also registers ours (fairseq_msformer: the task and msformer_lm),
so one --user-dir serves both.
"""
import fairseq_msformer  # noqa: F401  (our task and models)

from . import hierarchical, hourglass, local, megabyte, nsa, xtransformers  # noqa: F401  (registration)
from .common import PEERS, package_version  # noqa: F401
