"""`QuantEmbedding`: an embedding table stored as int8 codes with one scale per row (per token), the option
`scheme.embedding=int8` — in small models the (tied) embedding is a fifth of the weights and would otherwise
stay float32 after every Linear is quantized.

The codes stay int8 in memory (a lookup needs no packing) and are written in hfquant's packed form
(`weight_packed`, `weight_scale`, `weight_zero_point`, as a `QuantLinear`), so a folder's stored-tensor check
and digests treat it like any quantized module. A tied `lm_head` is an 8-bit per-channel Linear over the same
codes and scales: on the `cpu` backend both modules share one int8 tensor in memory.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..quant.primitives import zero_point_dtype
from ..quant import QuantArgs, compute_qparams, dequantize, min_max, pack, quantize, unpack

EMBEDDING_SCHEMES = {"int8": QuantArgs(num_bits=8, symmetric=True, strategy="channel")}
KIND = "embedding"  # the `kind` of a quantization_config entry that is an embedding, not a Linear


def embedding_args(name: Optional[str]) -> Optional[QuantArgs]:
    """The QuantArgs of `scheme.embedding` (None: the embedding stays in floating point)."""
    return None if name is None else EMBEDDING_SCHEMES[name]


class QuantEmbedding(torch.nn.Module):
    """hfquant's stored form: packed codes (8-bit: code − qmin as bytes), a scale and zero point per row;
    `forward(ids)` dequantizes only the rows looked up. The `cpu` backend swaps it for `Int8Embedding`."""

    def __init__(self, num_embeddings: int, embedding_dim: int, weight_args: QuantArgs, padding_idx=None,
                 dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        if weight_args.num_bits != 8 or weight_args.strategy != "channel":
            raise ValueError(f"QuantEmbedding stores 8-bit codes with one scale per row, not {weight_args}")
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.weight_args, self.dtype = weight_args, dtype
        self.register_buffer("weight_packed", torch.zeros(num_embeddings, embedding_dim, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.ones(num_embeddings, 1, dtype=torch.float32, device=device))
        self.register_buffer("weight_zero_point", torch.zeros(num_embeddings, 1, dtype=zero_point_dtype(weight_args), device=device))

    @classmethod
    def from_embedding(cls, embedding: torch.nn.Embedding, weight_args: QuantArgs, round_scale=None) -> "QuantEmbedding":
        """Round-to-nearest codes per row (an embedding row is only ever looked up: there is no layer input to
        correct errors against); `round_scale` first fixes scales to the precision the backend computes in."""
        w = embedding.weight.detach()
        scale, zero_point = compute_qparams(*min_max(w, weight_args), weight_args)
        if round_scale is not None:
            scale = round_scale(scale)
        module = cls(embedding.num_embeddings, embedding.embedding_dim, weight_args, embedding.padding_idx,
                     dtype=w.dtype, device=w.device)
        module.weight_packed.copy_(pack(quantize(w, scale, zero_point, weight_args), weight_args))
        module.weight_scale.copy_(scale.reshape(-1, 1).float())
        module.weight_zero_point.copy_(zero_point.reshape(-1, 1).to(module.weight_zero_point.dtype))
        return module

    def codes(self) -> torch.Tensor:
        """The integer codes (rows, dim)."""
        return unpack(self.weight_packed, self.weight_args, self.embedding_dim)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes(), self.weight_scale, self.weight_zero_point, self.weight_args, dtype=dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = unpack(self.weight_packed[input_ids], self.weight_args, self.embedding_dim).to(torch.float32)
        zero = self.weight_zero_point[input_ids].to(torch.float32)
        return ((rows - zero) * self.weight_scale[input_ids]).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits=8, per-row scales"
