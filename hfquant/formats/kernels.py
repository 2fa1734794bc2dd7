"""CPU kernel modules built from a `QuantLinear`; they save back into hfquant's format, so a folder written
by the `cpu` backend is the same format as any other, and reloads onto the same kernels.

Only the kernel's own integer tensors stay resident (plus the packed codes for int4, 0.5 byte/weight), never
a dequantized float copy.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..quant import native, pack, unpack
from .qembedding import QuantEmbedding
from .qlinear import QuantLinear

KERNEL_GROUPS = (256, 128, 64, 32)
# From this many rows (tokens) on, weight-only layers dequantize and run one dense GEMM: torch's int8pack /
# int4pack kernels are tuned for decode and fall below fp32 from ~64 rows (measured: docs/benchmarks.md).
DENSE_FROM_ROWS = 32


DENSE_CHUNK = 1 << 24  # weights dequantized at most this many elements at a time (64 MB in float32)
FLOAT_SLICE = 1 << 19  # int8 weights over 2x this many elements are dequantized in float32 slices of this size
# int4 weights are dequantized for prefill in slices of this many bytes (2**23 bf16 or 2**22 float32 weights), by the
# native loop or the torch ops alike, so both give the same outputs (a GEMM's last bits can depend on its width). The
# fastest of 1–32 MiB summed over Llama-7B's three layer shapes at 512 rows, in both dtypes; one size in elements was
# not (2**23 elements: the fastest in bf16, 6% slower in float32; scripts/bench_prefill.py --slice-sweep)
INT4_SLICE_BYTES = 1 << 24


def by_output_rows(out_features: int, in_features: int, gemm, slice_elements: Optional[int] = None,
                   whole_up_to: Optional[int] = None) -> torch.Tensor:
    """`gemm(rows)` over slices of output rows of about `slice_elements` weights (default `DENSE_CHUNK`), written
    into one output: the dequantized copy of a large weight (a 128k-row lm_head) exists a slice at a time, never
    whole. One call, no copy, for weights of at most `whole_up_to` elements (default: one slice)."""
    slice_elements = DENSE_CHUNK if slice_elements is None else slice_elements
    whole_up_to = slice_elements if whole_up_to is None else whole_up_to
    if out_features * in_features <= whole_up_to:
        return gemm(slice(None))
    step = max(1, slice_elements // max(1, in_features))
    first = gemm(slice(0, step))
    out = first.new_empty(*first.shape[:-1], out_features)
    out[..., :step] = first
    for a in range(step, out_features, step):
        out[..., a:a + step] = gemm(slice(a, a + step))
    return out


def _cpu_supports(*features: str) -> bool:
    """Whether torch reports any of these CPU features (`torch.cpu._is_<feature>_supported`; False where absent)."""
    cpu = getattr(torch, "cpu", None)
    return any(bool(getattr(cpu, f"_is_{feature}_supported", lambda: False)()) for feature in features)


def bf16_gemm_is_fast() -> bool:
    """bf16 GEMM beats fp32 only with hardware bf16 dot products (AVX512-BF16 or AMX); elsewhere it is emulated."""
    return _cpu_supports("avx512_bf16", "amx_tile")


def int8_matmul_is_fast() -> bool:
    """`torch._int_mm` is fast only with int8 dot-product instructions (VNNI or AMX); without them (e.g. an AVX2-only
    CPU) it is a scalar loop, ~50x slower than a float32 GEMM at 512 rows (measured: docs/benchmarks.md)."""
    return _cpu_supports("vnni", "amx_tile")


_BF16_FAST = None
_INT8_FAST = None


def int8_matmul_fast() -> bool:
    global _INT8_FAST
    if _INT8_FAST is None:
        _INT8_FAST = int8_matmul_is_fast()
    return _INT8_FAST


def dense_dtype() -> torch.dtype:
    """What a dense (prefill) GEMM computes in: bf16 — the kernels' own activation precision — where the CPU
    has bf16 dot products, float32 elsewhere."""
    global _BF16_FAST
    if _BF16_FAST is None:
        _BF16_FAST = bf16_gemm_is_fast()
    return torch.bfloat16 if _BF16_FAST else torch.float32


def kernel_group_size(group_size: int, in_features: int):
    """The largest int4pack group size that tiles both the scheme's groups and the (possibly ragged) row;
    e.g. groups of 128 over 576 columns run as 64-column kernel groups sharing each scale."""
    for g in KERNEL_GROUPS:
        if group_size % g == 0 and in_features % g == 0 and (in_features % group_size) % g == 0:
            return g
    return None


class _KernelDtypes(torch.nn.Module):
    """Buffers keep their dtypes through `.to(dtype)`, `.half()`, `.double()` (device moves still apply): the
    kernels need their codes and bf16 scales as built, and a saved folder its exact float32 scales. Without this a
    loaded folder's `model.to(torch.float16)` (which transformers allows) made every kernel fail ("expected scalar
    type BFloat16") and a cast and back rounded the saved scales. Outputs come back in the input's dtype."""

    def _apply(self, fn, *args, **kwargs):
        kept = {name: b for name, b in self._buffers.items() if b is not None}
        super()._apply(fn, *args, **kwargs)
        for name, before in kept.items():
            after = self._buffers[name]
            if after is not None and after.dtype != before.dtype:
                self._buffers[name] = before.to(after.device)
        return self


class _KernelLinear(_KernelDtypes):
    """Common parts: keeps the `QuantLinear` args and writes hfquant-format keys on save."""

    def __init__(self, q: QuantLinear) -> None:
        super().__init__()
        self.in_features, self.out_features = q.in_features, q.out_features
        self.weight_args, self.input_args = q.weight_args, q.input_args
        self.register_buffer("weight_scale", q.weight_scale.clone())
        self.register_buffer("weight_zero_point", q.weight_zero_point.clone())
        self.bias = q.bias

    def codes(self) -> torch.Tensor:  # (out, in) integer codes
        raise NotImplementedError

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y = self.dense(x2) if x2.shape[0] >= self.dense_from_rows else self.kernel(x2)
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    dense_from_rows = DENSE_FROM_ROWS

    def kernel(self, x2: torch.Tensor) -> torch.Tensor:  # (rows, in) → (rows, out) on the integer kernel
        raise NotImplementedError

    def dense(self, x2: torch.Tensor) -> torch.Tensor:  # many rows: the weights dequantized for one GEMM
        return self.kernel(x2)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight_packed"] = pack(self.codes(), self.weight_args)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={type(self).__name__}"


class Int8WeightLinear(_KernelLinear):
    """w8a16: `torch._weight_int8pack_mm(x_bf16, w_int8 (out, in), scale_bf16)`."""

    def __init__(self, q: QuantLinear) -> None:
        super().__init__(q)
        self.register_buffer("weight_int8", q.codes().to(torch.int8).contiguous(), persistent=False)
        self.register_buffer("_scale_bf16", q.weight_scale.reshape(-1).to(torch.bfloat16), persistent=False)

    def codes(self):
        return self.weight_int8

    def kernel(self, x2):
        return torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.weight_int8, self._scale_bf16)

    def dense(self, x2):
        dtype = dense_dtype()
        x2 = x2.to(dtype)
        if dtype == torch.float32:
            return self._dense_float32(x2)
        # int8 codes are exact in bf16, and the per-row scale factors out of the sum: (x · codes) · scale
        return by_output_rows(self.out_features, self.in_features, lambda rows: F.linear(
            x2, self.weight_int8[rows].to(dtype)) * self._scale_bf16[rows].to(dtype))

    def _dense_float32(self, x2):
        """codes · scale in one pass (int8 × float32 promotes), then the GEMM; a large weight (a 49k-row lm_head) in
        slices of `FLOAT_SLICE` elements: 2.1x faster than 64 MB pieces scaled afterwards on an AVX2 CPU, and
        faster than its fp32 GEMM."""
        scale = self._scale_bf16.float()[:, None]
        return by_output_rows(self.out_features, self.in_features,
                              lambda rows: F.linear(x2, self.weight_int8[rows] * scale[rows]),
                              slice_elements=FLOAT_SLICE, whole_up_to=2 * FLOAT_SLICE)


class Int4WeightLinear(_KernelLinear):
    """w4a16: `torch._weight_int4pack_mm_for_cpu` with w = (q_u − 8)·scale + zero, q_u = code + 8, zero = −scale·zp."""

    def __init__(self, q: QuantLinear) -> None:
        super().__init__(q)
        args = q.weight_args
        g = kernel_group_size(args.group_size, q.in_features)
        if g is None:
            raise ValueError(f"no int4 kernel group size tiles in_features={q.in_features} with group_size={args.group_size}")
        self.kernel_group = g
        self.register_buffer("weight_packed", q.weight_packed.clone())
        # The kernel computes w = (q_u - 8) * scale + zero with q_u in 0..15. Our codes are c in [qmin, qmax] with
        # w = scale * (c - zp); q_u = c - qmin, so zero = -scale * zp (signed) or scale * (8 - zp) (unsigned).
        codes_u = (q.codes().to(torch.int32) - args.qmin).contiguous()
        self.register_buffer("_packed_kernel", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes_u, 1), persistent=False)
        repeat = args.group_size // g
        scale = q.weight_scale.repeat_interleave(repeat, dim=1)[:, : q.in_features // g]
        zp = q.weight_zero_point.to(torch.float32).repeat_interleave(repeat, dim=1)[:, : q.in_features // g]
        zero = -scale * zp if args.signed else scale * (8 - zp)
        sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # (groups, out, 2)
        self.register_buffer("_scales_zeros", sz, persistent=False)

    def codes(self):
        return unpack(self.weight_packed, self.weight_args, self.in_features)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # weight_packed is a persistent buffer here already: the plain Module behaviour writes it.
        torch.nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)

    def kernel(self, x2):
        return torch._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), self._packed_kernel, self.kernel_group,
                                                 self._scales_zeros)

    def dense(self, x2):
        # w = (q_u − 8)·scale + zero per kernel group, from the packed bytes (low nibble first), for one GEMM
        dtype = dense_dtype()
        x2 = x2.to(dtype)

        lib = native.library()

        def rows_of(rows):
            packed = self.weight_packed[rows]
            w = native.dequant_int4(packed, self.in_features, self.kernel_group, self._scales_zeros, rows.start or 0,
                                    dtype, lib) if lib is not None else None
            return F.linear(x2, self.dequantize_eager(packed, rows).to(dtype) if w is None else w)

        return by_output_rows(self.out_features, self.in_features, rows_of,
                              slice_elements=INT4_SLICE_BYTES // dtype.itemsize)

    def dequantize_eager(self, packed: torch.Tensor, rows: slice) -> torch.Tensor:
        """The dense path's weights in float32 with torch ops, where the one-pass native loop is not available (no C
        compiler, `HFQUANT_NATIVE_KERNELS=0`): the same values; a Llama-7B-sized layer's 512-row forward takes
        1.5–1.8x as long this way with a bf16 GEMM, 1.1–1.2x with a float32 one (scripts/bench_prefill.py)."""
        sz = self._scales_zeros.transpose(0, 1)[rows]  # (rows, groups, 2)
        n = packed.shape[0]
        # both nibbles written straight into their float slots (one strided copy each, no stacked byte tensor: 6.8x
        # faster on an AVX2 CPU than the first version), then one multiply-add per weight: (q_u − 8)·scale + zero
        q = torch.empty(n, packed.shape[1], 2, dtype=torch.float32, device=packed.device)
        q[..., 0].copy_((packed & 15).view(torch.int8) - 8)
        q[..., 1].copy_((packed >> 4).view(torch.int8) - 8)
        q = q.reshape(n, -1)[:, : self.in_features].reshape(n, -1, self.kernel_group)
        return torch.addcmul(sz[:, :, 1:].float(), q, sz[:, :, :1].float()).reshape(n, self.in_features)


class Int8DynamicLinear(_KernelLinear):
    """w8a8: int8 activations quantized per token (symmetric) at run time × int8 weights. With int8 dot products
    (VNNI or AMX) on `torch._int_mm` (int32 sums) at every size. Without them (an AVX2-only CPU, where `_int_mm` is a
    scalar loop) decode rows go through torch's int8-weight kernel with the activation codes as bf16 (exact: |c| ≤
    127) and a unit scale — the same integer products summed in float32, the sum rounded to bf16 (≤ 2**-8 relative,
    far below the per-token int8 step) — and prefill rows through a float32 GEMM over the codes (exact below
    2**24). See `int8_matmul_is_fast` and docs/benchmarks.md."""

    def __init__(self, q: QuantLinear) -> None:
        super().__init__(q)
        self.integer_mm = int8_matmul_fast()
        # (out, in) on every path: torch._int_mm reads the transposed view, 1.5-2x faster at one row than (in, out)
        # storage and within ±10% at prompt sizes (docs/benchmarks.md, w8a8 on Machine C)
        self.register_buffer("weight_int8", q.codes().to(torch.int8).contiguous(), persistent=False)
        self.register_buffer("_scale_row", q.weight_scale.reshape(1, -1).float(), persistent=False)
        if not self.integer_mm:
            self.register_buffer("_unit_scale", torch.ones(q.out_features, dtype=torch.bfloat16), persistent=False)
        # per instance (the class default is DENSE_FROM_ROWS): with VNNI torch._int_mm stays ahead of a float GEMM at
        # every size measured
        self.dense_from_rows = float("inf") if self.integer_mm else DENSE_FROM_ROWS

    def codes(self):
        return self.weight_int8

    def kernel(self, x2):
        xq, s_x = _quantize_per_token(x2)
        if self.integer_mm:
            acc = torch._int_mm(xq.to(torch.int8), self.weight_int8.t())
        else:
            acc = torch._weight_int8pack_mm(xq.to(torch.bfloat16), self.weight_int8, self._unit_scale).float()
        return acc * (s_x * self._scale_row)

    def dense(self, x2):  # forward comes here only without int8 dot products (dense_from_rows is infinite with them)
        if self.integer_mm:
            return self.kernel(x2)  # torch._int_mm stays ahead of a float GEMM at every size
        xq, s_x = _quantize_per_token(x2)
        acc = by_output_rows(self.out_features, self.in_features, lambda rows: F.linear(xq, self.weight_int8[rows].float()))
        return acc * (s_x * self._scale_row)


def _quantize_per_token(x2: torch.Tensor):
    """The reference's per-token codes and scale amax / 127 (raised to the smallest normal, like `_usable`) in as
    few ops as possible: at decode each costs 1.5-5 µs against 10-40 µs for the integer matmul itself. No clamp:
    |x| ≤ amax, so |x / s| ≤ 127 up to the roundings of amax / 127 and x / s (< 127.0001), which round to 127.
    An all-zero token gets a tiny scale instead of 1; its codes and output are 0 either way."""
    x2 = x2.float()
    s_x = x2.abs().amax(dim=-1, keepdim=True).clamp_min_(_SMALLEST_AMAX) / 127.0
    return torch.round(x2 / s_x), s_x


_SMALLEST_AMAX = 127.0 * torch.finfo(torch.float32).tiny

KERNEL_CLASSES = (Int8WeightLinear, Int4WeightLinear, Int8DynamicLinear)


def kernel_module_for(q: QuantLinear) -> torch.nn.Module:
    """The CPU kernel module for a `QuantLinear` (same numbers, integer kernels)."""
    w, a = q.weight_args, q.input_args
    if a is not None:
        return Int8DynamicLinear(q)
    if w.num_bits == 8:
        return Int8WeightLinear(q)
    if w.num_bits == 4:
        return Int4WeightLinear(q)
    raise ValueError(f"no CPU kernel for {w.num_bits}-bit weights")


class Int8Embedding(_KernelDtypes):
    """`scheme.embedding=int8` on the cpu backend: int8 codes resident (shared with a tied lm_head's kernel),
    per-row scales; saves hfquant's `QuantEmbedding` keys."""

    def __init__(self, q: QuantEmbedding) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = q.num_embeddings, q.embedding_dim, q.padding_idx
        self.weight_args, self.dtype = q.weight_args, q.dtype
        self.register_buffer("weight_int8", q.codes().contiguous(), persistent=False)
        self.register_buffer("weight_scale", q.weight_scale.clone())
        self.register_buffer("weight_zero_point", q.weight_zero_point.clone())

    def codes(self) -> torch.Tensor:
        return self.weight_int8

    def _apply(self, fn, *args, **kwargs):
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype  # `model.half()` makes the looked-up rows float16
        return super()._apply(fn, *args, **kwargs)

    def forward(self, input_ids):
        rows = self.weight_int8[input_ids].to(torch.float32) - self.weight_zero_point[input_ids].to(torch.float32)
        return (rows * self.weight_scale[input_ids]).to(self.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight_packed"] = pack(self.weight_int8, self.weight_args)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits=8, per-row scales, kernel=Int8Embedding"


def embedding_kernel_for(q: QuantEmbedding) -> Int8Embedding:
    return Int8Embedding(q)


def share_tied_codes(model: torch.nn.Module, ties: dict) -> None:
    """{lm_head name: embedding name}: a tied lm_head's int8 kernel reads the embedding's codes (one tensor in
    memory), when both hold the same codes and scales — which a folder written with `tied_to` does."""
    for head_name, embedding_name in ties.items():
        head, embedding = model.get_submodule(head_name), model.get_submodule(embedding_name)
        if not (isinstance(head, Int8WeightLinear) and isinstance(embedding, Int8Embedding)):
            continue
        if torch.equal(head.weight_int8, embedding.weight_int8) and torch.equal(head.weight_scale.reshape(-1),
                                                                                embedding.weight_scale.reshape(-1)):
            head.weight_int8 = embedding.weight_int8


def to_cpu_kernels(model: torch.nn.Module, ties: dict = None) -> torch.nn.Module:
    """Swap every `QuantLinear` / `QuantEmbedding` for its CPU kernel module (after a folder saved by the `cpu`
    backend loads); `ties` ({lm_head: embedding}) share one int8 tensor."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            model.set_submodule(name, kernel_module_for(module))
        elif isinstance(module, QuantEmbedding):
            model.set_submodule(name, embedding_kernel_for(module))
    share_tied_codes(model, ties or {})
    return model


def to_reference(model: torch.nn.Module) -> torch.nn.Module:
    """Swap every CPU kernel module back for a `QuantLinear` with the same codes, scales and zero points: the
    reference math (float dequantization), e.g. to compare a folder exported for another engine exactly."""
    for name, module in list(model.named_modules()):
        if isinstance(module, _KernelLinear):
            q = QuantLinear(module.in_features, module.out_features, module.bias is not None, module.weight_args,
                            module.input_args, dtype=module.weight_scale.dtype if module.bias is None else module.bias.dtype)
            pack(module.codes(), module.weight_args, out=q.weight_packed)
            q.weight_scale.copy_(module.weight_scale)
            q.weight_zero_point.copy_(module.weight_zero_point)
            if module.bias is not None:
                q.bias.data.copy_(module.bias.detach())
            model.set_submodule(name, q)
        elif isinstance(module, Int8Embedding):
            q = QuantEmbedding(module.num_embeddings, module.embedding_dim, module.weight_args, module.padding_idx,
                               dtype=module.dtype)
            pack(module.weight_int8, module.weight_args, out=q.weight_packed)
            q.weight_scale.copy_(module.weight_scale)
            q.weight_zero_point.copy_(module.weight_zero_point)
            model.set_submodule(name, q)
    return model
