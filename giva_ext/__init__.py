"""giva_ext: GiVA adapters for PyTorch (gradient-informed bases, trainable vectors only)."""
from .version import __version__
from .config import GiVAConfig
from .functional import giva_linear
from .init import init_bases
from .interop import export_lora, import_vera
from .layer import GiVALinear
from .model import (apply_giva, find_targets, giva_layers, merge, merge_and_unload,
                    trainable_parameters, unmerge)
from .rsvd import randomized_svd
from .serialization import load_adapter, save_adapter

__all__ = [
    "__version__", "GiVAConfig", "GiVALinear", "apply_giva", "export_lora", "find_targets",
    "giva_layers", "giva_linear", "import_vera", "init_bases", "load_adapter", "merge",
    "merge_and_unload", "randomized_svd", "save_adapter", "trainable_parameters", "unmerge",
]
