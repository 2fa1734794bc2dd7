"""`QuantLinear`: hfquant's storage format as a module — packed integer codes, scales and zero points.

Its state dict is exactly what lands in safetensors: ``weight_packed`` (uint8, 4-bit codes two per byte),
``weight_scale`` (float32), ``weight_zero_point`` (int8, uint8 for unsigned codes, float16 for float zero points), optional ``input_scale`` / ``input_zero_point``
for static activations, and ``bias``. The forward pass dequantizes (the `fake` backend's reference math);
faster backends replace it.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..quant import QuantArgs, dequantize, dynamic_qparams, fake_quantize, pack, quantize, unpack, zero_point_dtype


class QuantLinear(torch.nn.Module):
    """A Linear layer whose weight is stored as integer codes; activations optionally fake-quantized."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        weight_args: QuantArgs,
        input_args: Optional[QuantArgs] = None,
        dtype: torch.dtype = torch.float32,
        device=None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_args, self.input_args = weight_args, input_args
        packed_cols = -(-in_features * weight_args.num_bits // 8)
        scale_shape = _qparam_shape(weight_args, out_features, in_features)
        self.register_buffer("weight_packed", torch.zeros(out_features, packed_cols, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones(scale_shape, dtype=torch.float32, device=device))
        # Zero points lie in [qmin, qmax], so they take the codes' own one-byte type (float16 when they are floats).
        self.register_buffer("weight_zero_point", torch.zeros(scale_shape, dtype=zero_point_dtype(weight_args), device=device))
        if input_args is not None and not input_args.dynamic:
            self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=device))
            self.register_buffer("input_zero_point", torch.zeros((), dtype=torch.int32, device=device))
        self.bias = torch.nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self._dequantized: Optional[torch.Tensor] = None

    @classmethod
    def from_linear(
        cls,
        linear: torch.nn.Linear,
        weight_args: QuantArgs,
        weight_scale: torch.Tensor,
        weight_zero_point: torch.Tensor,
        input_args: Optional[QuantArgs] = None,
        input_qparams=None,
        codes: Optional[torch.Tensor] = None,
    ) -> "QuantLinear":
        """Quantize `linear`'s weight with the given qparams (computed by an observer); `codes` if the caller
        already has them (from `quantize_with_error`)."""
        w = linear.weight.detach()
        # built on meta and given uninitialised memory: every tensor is written below (zero-filling first cost a
        # sixth of quantizing a streamed tensor)
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, weight_args, input_args,
                     dtype=w.dtype, device="meta").to_empty(device=w.device)
        if codes is None:
            codes = quantize(w, weight_scale, weight_zero_point, weight_args)
        pack(codes, weight_args, out=module.weight_packed)
        module.weight_scale.copy_(weight_scale.reshape(module.weight_scale.shape).float())
        module.weight_zero_point.copy_(weight_zero_point.reshape(module.weight_zero_point.shape).to(module.weight_zero_point.dtype))
        if input_qparams is not None:
            module.input_scale.copy_(input_qparams[0].reshape(()).float())
            module.input_zero_point.copy_(input_qparams[1].reshape(()).to(torch.int32))
        elif input_args is not None and not input_args.dynamic:  # static, not observed yet: the defaults
            module.input_scale.fill_(1.0)
            module.input_zero_point.zero_()
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    def codes(self) -> torch.Tensor:
        """The integer weight codes, unpacked (out, in)."""
        return unpack(self.weight_packed, self.weight_args, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """scale · (codes − zero point), cached until the buffers change (`_load_from_state_dict` resets it)."""
        cached = self._dequantized
        if cached is None or cached.dtype != dtype or cached.device != self.weight_packed.device:
            cached = dequantize(self.codes(), self.weight_scale, self.weight_zero_point, self.weight_args, dtype=dtype)
            self._dequantized = cached
        return cached

    def _load_from_state_dict(self, *args, **kwargs):
        self._dequantized = None
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._dequantized = None
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_args is not None:
            if self.input_args.dynamic:
                scale, zp = dynamic_qparams(x, self.input_args)
            else:
                scale, zp = self.input_scale, self.input_zero_point
            x = fake_quantize(x, scale, zp, self.input_args)
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def extra_repr(self) -> str:
        a = self.weight_args
        act = "" if self.input_args is None else f", input_bits={self.input_args.num_bits}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={a.num_bits}, "
                f"strategy={a.strategy}{'' if a.group_size is None else f', group_size={a.group_size}'}{act}")


def _qparam_shape(args: QuantArgs, rows: int, cols: int):
    if args.strategy == "tensor":
        return ()
    if args.strategy == "channel":
        return (rows, 1)
    if args.strategy == "group":
        return (rows, -(-cols // args.group_size))
    raise ValueError(f"weights cannot use strategy {args.strategy!r}")


def quantize_into(model: torch.nn.Module, plan, make: Callable[["QuantLinear"], torch.nn.Module] = lambda q: q,
                  round_scale: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, desc: str = "quantize"):
    """Replace every Linear in `plan` by `make(QuantLinear)` built from the plan's qparams and the codes the
    algorithms chose (shared by backends that keep hfquant's format; `round_scale` lets a kernel fix scales to the
    precision it computes in — the algorithms already applied it, and it is idempotent)."""
    from tqdm.auto import tqdm

    for name, mp in tqdm(plan.modules.items(), desc=desc, unit="module", leave=False):
        scale, zp = mp.weight_qparams
        if round_scale is not None:
            scale = round_scale(scale)
        q = QuantLinear.from_linear(model.get_submodule(name), mp.weight_args, scale, zp, mp.input_args, mp.input_qparams,
                                    codes=mp.weight_codes)
        model.set_submodule(name, make(q))
    return model


def integer_format_problem(scheme) -> Optional[str]:
    """Why `scheme` cannot be stored as hfquant integer codes, or None (shared by backends keeping this format)."""
    if scheme.format != "int":
        return f"scheme format {scheme.format!r} is not integer codes (use the backend that defines it)"
    if scheme.weights is None:
        return "activation-only schemes are not supported: the storage format quantizes weights"
    return None
