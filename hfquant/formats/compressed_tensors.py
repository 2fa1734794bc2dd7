"""compressed-tensors, the format transformers and vLLM read: hfquant's codes and scales laid out as its
`pack-quantized` format (weight-only int4 / int8), or `int-quantized` for w8a8 (int8 weights as an int8 `weight`,
activations quantized per token at run time by the engine).

No second quantization: the bytes are hfquant's own. Codes are signed in [qmin, qmax]; compressed-tensors stores
them offset into the unsigned range (+2^(b−1)) and packed little-endian into int32 (element k of a row at bits
b·k of the row's bit stream) — exactly hfquant's packed bytes (stored value code − qmin, low bits first) read as
int32, padded to whole words. Unsigned hfquant codes c with zero point zp are the signed codes c − 2^(b−1) with
zero point zp − 2^(b−1): the same bytes. Dequantization there is (q − z)·s, as here.

What its consumers cannot run is refused before any work (`scheme_problem`, `shape_problems`): groups that do
not divide a Linear's columns (compressed-tensors raises on the first forward), float zero points (its zero
points are integers), static activation scales, and bit widths other than 4 and 8.

Activations (w8a8) are the engine's to quantize, and engines differ: vLLM's int8 kernels, like hfquant, scale each
token by absmax/127; transformers' compressed-tensors forward by absmax/127.5 (its symmetric range is (127 − (−128))/2),
which maps a token's largest value to ±127.5 and rounds or clips it to 127 / −128. The folder's weights are the same
for both; the reload check therefore compares transformers with hfquant's codes under transformers' activation
rounding (`ct_activation_reference`), and the card says so.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from ..quant import QuantArgs
from ..quant.qparams import scale_in_dtype

FORMAT_NAME = "compressed-tensors"
PACKED = "pack-quantized"
INT = "int-quantized"


def scheme_problem(scheme) -> Optional[str]:
    """Why compressed-tensors cannot hold `scheme` (None when it can); shapes are checked by `shape_problems`."""
    w, a = scheme.weights, scheme.input_activations
    if scheme.format != "int" or w is None:
        return "it stores integer weight codes (use an int scheme such as w4a16, w4a16-asym, w8a16 or w8a8)"
    if scheme.embedding is not None:
        return "its engines read quantized Linears only; set scheme.embedding=null"
    if w.num_bits not in (4, 8):
        return f"{w.num_bits}-bit weights: its engines read 4- and 8-bit codes"
    if w.float_zero_point:
        return "its zero points are integers; remove scheme.weights.float_zero_point"
    if w.strategy not in ("group", "channel"):
        return (f"weight strategy {w.strategy!r}: vLLM's weight-only kernels read group or channel scales "
                "(use scheme=w8a16 or a group scheme)")
    if a is not None:
        if not (a.num_bits == 8 and a.dynamic and a.strategy == "token" and a.symmetric and a.signed):
            return ("its int8 activation kernels quantize each token at run time (symmetric, per token): static or "
                    "other activation settings are not exported (use scheme=w8a8)")
        if not (w.num_bits == 8 and w.strategy == "channel" and w.symmetric and w.signed):
            return "with int8 activations its kernels read int8 symmetric per-channel weights (use scheme=w8a8)"
    return None


def shape_problems(shapes: Dict[str, Tuple[int, int]], weights: QuantArgs) -> List[str]:
    """Modules (name → (out, in)) whose shapes its loaders cannot run: a ragged last group (compressed-tensors
    needs in_features % group_size == 0), or asymmetric zero points packed along rows that do not fill whole
    int32 words (vLLM needs out_features % (32 / bits) == 0)."""
    problems = []
    for name, (rows, cols) in shapes.items():
        if weights.strategy == "group" and cols % weights.group_size:
            problems.append(f"{name} has {cols} input columns, not a multiple of group_size={weights.group_size}")
        elif not weights.symmetric and rows % (32 // weights.num_bits):
            problems.append(f"{name} has {rows} output rows; asymmetric zero points need a multiple of "
                            f"{32 // weights.num_bits}")
    return problems


def divisors_hint(shapes: Iterable[Tuple[int, int]], group_size: int) -> str:
    """A group size (a power of two ≤ the asked one) dividing every module's columns, for the error message."""
    cols = [c for _, c in shapes]
    for g in (128, 64, 32, 16):
        if g <= group_size and all(c % g == 0 for c in cols):
            return f"scheme.weights.group_size={g} divides every quantized Linear"
    return "no power-of-two group size divides every quantized Linear: use strategy=channel"


def _as_int32_words(packed: torch.Tensor) -> torch.Tensor:
    """hfquant's packed bytes (rows of uint8) read as little-endian int32 words, each row zero-padded to 4 bytes."""
    rows, width = packed.shape
    buffer = torch.zeros(rows, width + (-width) % 4, dtype=torch.uint8)  # a fresh row-major buffer: views as int32
    buffer[:, :width] = packed
    words = buffer.view(torch.int32)  # little-endian, as safetensors and compressed-tensors assume
    if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
        raise RuntimeError("compressed-tensors export needs a little-endian machine")
    return words


def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes (rows, n) packed along dim 0 (zero points: packed along output rows), offset by 2^(bits−1)."""
    from ..quant import pack

    unsigned = QuantArgs(num_bits=bits, symmetric=False, signed=True)
    return _as_int32_words(pack(codes.t().contiguous().to(torch.int8), unsigned)).t().contiguous()


def module_tensors(weights: QuantArgs, inputs: Optional[QuantArgs], stored: Dict[str, torch.Tensor],
                   in_features: int, scale_dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """compressed-tensors' tensors for one Linear from hfquant's (`weight_packed`, `weight_scale`,
    `weight_zero_point`, optional `bias`). `scale_dtype` is the model's dtype (what its loaders allocate)."""
    packed, scale = stored["weight_packed"], stored["weight_scale"]
    rows = packed.shape[0]
    half = 2 ** (weights.num_bits - 1)
    out: Dict[str, torch.Tensor] = {}
    scale = scale.reshape(rows, -1) if scale.dim() else scale.reshape(1)
    if inputs is not None:  # int-quantized: the signed codes themselves, one scale per output channel
        from ..quant import unpack

        out["weight"] = unpack(packed, weights, in_features).to(torch.int8)
        out["weight_scale"] = scale.to(scale_dtype)
        if "bias" in stored:
            out["bias"] = stored["bias"]
        return out
    out["weight_packed"] = _as_int32_words(packed)
    out["weight_scale"] = scale.to(scale_dtype)
    out["weight_shape"] = torch.tensor([rows, in_features], dtype=torch.int64)
    if not weights.symmetric:
        zp = stored["weight_zero_point"].to(torch.int16).reshape(rows, -1)
        signed_zp = zp if weights.signed else zp - half
        out["weight_zero_point"] = _pack_rows(signed_zp, weights.num_bits)
    if "bias" in stored:
        out["bias"] = stored["bias"]
    return out


def _args_dict(args: QuantArgs) -> dict:
    return {"num_bits": args.num_bits, "type": "int", "symmetric": args.symmetric,
            "group_size": args.group_size if args.strategy == "group" else None, "strategy": args.strategy,
            "dynamic": args.dynamic, "actorder": None, "block_structure": None, "observer": None,
            "observer_kwargs": {}}


def quantization_config(weights: QuantArgs, inputs: Optional[QuantArgs], ignore: List[str]) -> dict:
    """`quantization_config` for config.json: one group targeting every Linear except `ignore` (exact names)."""
    layout = PACKED if inputs is None else INT
    group = {"targets": ["Linear"], "weights": _args_dict(weights),
             "input_activations": None if inputs is None else _args_dict(inputs),
             "output_activations": None, "format": layout}
    return {"quant_method": FORMAT_NAME, "format": layout, "quantization_status": "compressed",
            "config_groups": {"group_0": group}, "ignore": sorted(ignore), "kv_cache_scheme": None,
            "global_compression_ratio": None}


COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "added_tokens.json", "README.md")


def _linear_shapes(config: dict) -> Dict[str, Tuple[int, int]]:
    """(out, in) of every nn.Linear of the model `config` describes (built on meta: no memory, no download)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "quantization_config"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def export_folder(src: str, dst: str) -> dict:
    """Write `dst` (a new folder) in compressed-tensors from the hfquant folder `src`: the same shard names, the same
    non-quantized tensors, every quantized module's tensors re-laid-out (written with its first tensor's shard)."""
    from safetensors.torch import save_file

    from .folder_tensors import FolderTensors
    from .stored_check import checked_modules

    with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    qcfg = config["quantization_config"]
    modules, _ = checked_modules(qcfg["modules"])
    kinds = {json.dumps(entry, sort_keys=True) for entry in modules.values()}
    if len(kinds) != 1:
        raise ValueError("compressed-tensors export writes one config group; these modules differ in their settings")
    entry = next(iter(modules.values()))
    weights = QuantArgs.from_dict(entry["weights"])
    inputs = QuantArgs.from_dict(entry["input_activations"]) if entry.get("input_activations") else None
    config["model_type"] = qcfg.get("base_model_type", config["model_type"])
    scale_dtype = model_dtype(config)
    shapes = _linear_shapes(config)
    ignore = [n for n in shapes if n not in modules]
    config["quantization_config"] = quantization_config(weights, inputs, ignore)
    source = FolderTensors(src)
    os.makedirs(dst)
    weight_map: Dict[str, str] = {}
    current, tensors = None, {}

    def flush():
        if current is not None:
            save_file(tensors, os.path.join(dst, current), metadata={"format": "pt"})
            weight_map.update({k: current for k in tensors})
            tensors.clear()

    for name, keys, shard in source.items(modules):  # shard by shard: one output shard in memory at a time
        if shard != current:
            flush()
            current = shard
        if keys is None:
            tensors[name] = source.get(name)
            continue
        stored = {leaf: source.get(key) for leaf, key in keys.items()}
        made = module_tensors(weights, inputs, stored, shapes[name][1], scale_dtype)
        if not torch.equal(made["weight_scale"].float().reshape(-1), stored["weight_scale"].float().reshape(-1)):
            raise ValueError(f"{name}: its scales are not representable in the model's dtype ({scale_dtype}); the run "
                             "rounds them before choosing codes, so this is a bug: report it with --verbose output")
        tensors.update({f"{name}.{k}": v for k, v in made.items()})
    flush()
    if len(source.shards) > 1:
        with open(os.path.join(dst, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": source.metadata, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in COPIED_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    return {"format": FORMAT_NAME, "group_format": config["quantization_config"]["format"], "modules": len(modules),
            "load": load_instructions(config), "ignore": ignore, "scale_dtype": str(scale_dtype).replace("torch.", "")}


def model_dtype(config: dict) -> torch.dtype:
    """The dtype config.json declares (what compressed-tensors' loaders allocate scales in)."""
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32").replace("torch.", "")
    return getattr(torch, name) if isinstance(getattr(torch, name, None), torch.dtype) else torch.float32


def round_scale_to(dtype: torch.dtype):
    """Scales as a `dtype` tensor holds them, for models whose scales are stored in bf16/fp16 (None for float32)."""
    if dtype == torch.float32 or not dtype.is_floating_point:
        return None
    return lambda scale: scale_in_dtype(scale, dtype)


def load_instructions(config: dict) -> str:
    """How transformers must be told to load the folder: asymmetric zero points need `dequantize=True` (its default
    load keeps modules compressed and refuses their packed zero points with a size mismatch, transformers 5.24)."""
    group = config["quantization_config"]["config_groups"]["group_0"]
    return "dequantize" if not group["weights"]["symmetric"] else "default"


def logits_without_hfquant(folder: str, input_ids: torch.Tensor, workdir: str) -> torch.Tensor:
    """Logits of `folder` loaded by plain transformers (+ compressed-tensors) without hfquant, as `load_instructions`
    says (asymmetric folders with `CompressedTensorsConfig(dequantize=True)`)."""
    from .consumer_check import logits_in_clean_process

    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        how = load_instructions(json.load(f))
    load = ("from transformers import CompressedTensorsConfig\n"
            "kwargs = dict(dtype='auto', quantization_config=CompressedTensorsConfig(dequantize=True))"
            if how == "dequantize" else "kwargs = dict(dtype='auto')")
    return logits_in_clean_process(folder, input_ids, workdir, load)


def ct_activation_reference(model: torch.nn.Module) -> torch.nn.Module:
    """hfquant's reference model with transformers' compressed-tensors activation rounding (absmax/127.5 per token,
    computed by compressed-tensors' own functions) in place of hfquant's (absmax/127): what transformers computes from
    the exported codes, to compare with it exactly. Weight-only models are returned as they are."""
    import types

    import torch.nn.functional as F
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    from .qlinear import QuantLinear

    def forward(self, x):
        scale, zero_point = compute_dynamic_scales_and_zp(value=x, args=self.ct_input_args, module=self)
        x = fake_quantize(x=x, scale=scale, zero_point=zero_point, args=self.ct_input_args)
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    for module in model.modules():
        if isinstance(module, QuantLinear) and module.input_args is not None:
            module.ct_input_args = QuantizationArgs(**_args_dict(module.input_args))
            module.forward = types.MethodType(forward, module)
    return model

