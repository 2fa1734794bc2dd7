"""Pure tensor math for quantization: arguments, qparams, the integer mapping, packing and error metrics."""

from typing import TYPE_CHECKING

from ..lazy_exports import lazy_exports
from .args import STRATEGIES, QuantArgs, QuantArgsError  # torch-free: the config checks use them

__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(["max_abs_error", "mse", "sqnr_db"], ".metrics"),
    **dict.fromkeys(["PACKABLE_BITS", "pack", "storage_bits", "unpack"], ".packing"),
    **dict.fromkeys(["code_dtype", "dequantize", "expand_qparam", "fake_quantize", "quantize", "quantize_with_error",
                     "zero_point_dtype"], ".primitives"),
    **dict.fromkeys(["check_finite", "compute_qparams", "dynamic_qparams", "min_max", "reduce_by_strategy",
                     "stored_zero_point"], ".qparams"),
})

if TYPE_CHECKING:
    from .metrics import max_abs_error, mse, sqnr_db
    from .packing import PACKABLE_BITS, pack, storage_bits, unpack
    from .primitives import (code_dtype, dequantize, expand_qparam, fake_quantize, quantize, quantize_with_error,
                             zero_point_dtype)
    from .qparams import check_finite, compute_qparams, dynamic_qparams, min_max, reduce_by_strategy, stored_zero_point

__all__ = [
    "PACKABLE_BITS",
    "STRATEGIES",
    "QuantArgs",
    "QuantArgsError",
    "check_finite",
    "code_dtype",
    "compute_qparams",
    "dequantize",
    "dynamic_qparams",
    "expand_qparam",
    "fake_quantize",
    "max_abs_error",
    "min_max",
    "mse",
    "pack",
    "quantize",
    "quantize_with_error",
    "reduce_by_strategy",
    "sqnr_db",
    "storage_bits",
    "stored_zero_point",
    "unpack",
    "zero_point_dtype",
]
