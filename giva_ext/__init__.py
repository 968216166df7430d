"""giva_ext: GiVA adapters for PyTorch (gradient-informed bases, trainable vectors only)."""
from .version import __version__
from .functional import giva_linear
from .layer import GiVALinear

__all__ = ["__version__", "giva_linear", "GiVALinear"]
