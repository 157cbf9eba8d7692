from . import msformer_lm  # noqa: F401  (registers msformer_lm and its architectures)
