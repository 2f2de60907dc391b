"""vlmc: an open deployment toolchain for vision-language models."""

__version__ = "0.1.0"
