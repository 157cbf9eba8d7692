from . import multiscale_language_modeling  # noqa: F401  (registers multiscale_language_modeling)
