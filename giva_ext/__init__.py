"""giva_ext: GiVA adapters for PyTorch (gradient-informed bases, trainable vectors only)."""
from .version import __version__
from .adapters import (active_adapter, add_adapter, adapter_names, delete_adapter,
                       disable_adapters, mixed_adapters, set_adapter)
from .checks import check_finite
from .config import GiVAConfig
from .functional import giva_linear
from .init import init_bases
from .interop import export_lora, import_vera
from .layer import GiVALinear
from .model import (apply_giva, find_targets, giva_layers, merge, merge_and_unload,
                    trainable_parameters, unmerge, wrapped_layers)
from .rsvd import randomized_svd
from .serialization import load_adapter, load_adapters, save_adapter, save_adapters

__all__ = [
    "__version__", "GiVAConfig", "GiVALinear", "active_adapter", "adapter_names", "add_adapter",
    "apply_giva", "check_finite", "delete_adapter", "disable_adapters", "export_lora",
    "find_targets", "giva_layers", "giva_linear", "import_vera", "init_bases", "load_adapter",
    "load_adapters", "merge", "merge_and_unload", "mixed_adapters", "randomized_svd",
    "save_adapter", "save_adapters", "set_adapter", "trainable_parameters", "unmerge",
    "wrapped_layers",
]
