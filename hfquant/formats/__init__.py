"""hfquant's on-disk format: `QuantLinear` modules in a save_pretrained folder, registered with transformers."""

from .qlinear import QuantLinear
from .transformers_integration import FORMAT_VERSION, HfQuantConfig, register_with_transformers, replace_linears

__all__ = ["FORMAT_VERSION", "HfQuantConfig", "QuantLinear", "register_with_transformers", "replace_linears"]
