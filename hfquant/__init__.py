"""hfquant: post-training quantization for Hugging Face models — calibrate, quantize, evaluate, save, push.

Public API for users and plugin authors; the tensor math lives in `hfquant.quant`.
"""

from typing import TYPE_CHECKING

from .import_hooks import after_import, import_registering
from .hookspecs import hookimpl
from .lazy_exports import lazy_exports
from .registry import PluginError, UnknownNameError
from .scheme import QuantScheme, SchemeError

# Names whose modules import torch load on first use, so `hfquant --help` can answer without torch.
__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(["Algorithm", "AlgorithmError", "LayerContext"], ".algorithm"),
    **dict.fromkeys(["compile_decoding", "eager_decoding"], ".decoding"),
    "Format": ".format",
    "Observer": ".observer",
    **dict.fromkeys(["QuantArgs", "QuantArgsError", "compute_qparams", "dequantize", "fake_quantize", "quantize"],
                    ".quant"),
})

if TYPE_CHECKING:  # what IDEs and type checkers see
    from .algorithm import Algorithm, AlgorithmError, LayerContext
    from .decoding import compile_decoding, eager_decoding
    from .format import Format
    from .observer import Observer
    from .quant import QuantArgs, QuantArgsError, compute_qparams, dequantize, fake_quantize, quantize

__version__ = "0.1.0"


def load_quantized(path: str, task: str = "causal-lm", **kwargs):
    """Reload a folder saved by hfquant (`<output_dir>/model`)."""
    from .pipeline.save import load_quantized as _load

    return _load(path, task, **kwargs)


# `import hfquant` is what makes `AutoModelForCausalLM.from_pretrained(<hfquant folder>)` work. These modules
# register themselves when imported, and are imported as soon as transformers loads the modules they extend,
# which keeps transformers (~1.5 s) out of `import hfquant` and `hfquant --help`.
after_import("transformers.models.auto.configuration_auto", import_registering("hfquant.formats.config_guard"))
after_import("transformers.quantizers.auto", import_registering("hfquant.formats.transformers_integration"))

__all__ = [
    "Algorithm",
    "AlgorithmError",
    "Format",
    "LayerContext",
    "Observer",
    "PluginError",
    "QuantArgs",
    "QuantArgsError",
    "QuantScheme",
    "SchemeError",
    "UnknownNameError",
    "__version__",
    "compile_decoding",
    "compute_qparams",
    "dequantize",
    "eager_decoding",
    "fake_quantize",
    "get_observer",
    "get_scheme",
    "hookimpl",
    "load_quantized",
    "quantize",
]


def get_observer(name: str):
    """The observer class registered as `name` (built-in or from an installed plugin)."""
    from .plugins import registries

    return registries().observers.get(name)


def get_scheme(name: str) -> QuantScheme:
    """The scheme preset registered as `name`."""
    from .plugins import registries

    return registries().schemes.get(name)
