"""GGUF, the format llama.cpp (and Ollama, LM Studio, transformers' `gguf_file=`) reads: hfquant's codes written as
ggml blocks of 32 — no second quantization.

int8 symmetric → Q8_0 (fp16 d, 32 int8: w = d·x); int4 symmetric → Q4_0 (fp16 d, 16 bytes: w = d·(q − 8), element j
in the low nibble of byte j, element j + 16 in its high nibble). A block takes the scale of the hfquant group (or
row) it lies in, so any group size that is a multiple of 32 works, the ragged last group included; GGUF only needs
in_features % 32 == 0. The one loss — d is float16 — is taken *before* the codes are chosen: the run rounds every
scale to float16 (`round_scale`), so the file holds exactly the numbers hfquant computed and reported.

Llama-family tensor names (Llama, Mistral, Qwen2) and, for the `llama` architecture, llama.cpp's q/k row order (its
converter permutes the rows of q and k so that rotary pairs are adjacent; transformers' loader undoes it); hyper-parameters from config.json; a byte-level BPE
tokenizer (`tokenizer.json`) as GGUF's `gpt2` tokenizer model.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..quant import QuantArgs, unpack
from ..quant.qparams import scale_in_dtype

FORMAT_NAME = "gguf"
BLOCK = 32
#: Hugging Face model_type → GGUF architecture (Mistral is written as llama, as llama.cpp's converter does)
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
#: architectures whose q/k rows llama.cpp's converter reorders (interleaved rotary pairs); qwen2 keeps HF's order
PERMUTED_QK = {"llama"}
LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
EMBEDDING_TYPES = ("float", "q8_0")
Q8_EMBEDDING = QuantArgs(num_bits=8, strategy="group", group_size=BLOCK)  # ggml Q8_0: absmax/127 per 32, fp16 d
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def scheme_problem(scheme) -> Optional[str]:
    """Why GGUF (as written here) cannot hold `scheme`; None when it can."""
    w = scheme.weights
    if scheme.format != "int" or w is None:
        return "it stores integer weight codes (use scheme=w4a16 or w8a16)"
    if scheme.embedding is not None:
        return ("GGUF stores a quantized embedding in its own blocks of 32: use format.embedding=q8_0 instead of "
                "scheme.embedding")
    if scheme.input_activations is not None:
        return "llama.cpp quantizes activations itself; use a weight-only scheme (w4a16, w8a16)"
    if w.float_zero_point:
        return ("float zero points are stored as float16 by hfquant, and Q4_1 stores the offset s·z as float16: the "
                "two roundings do not agree; use integer zero points (scheme=w4a16-asym → Q4_1) or scheme=w4a16")
    if not w.symmetric and w.num_bits != 4:
        return "asymmetric codes are written as Q4_1 (4-bit); use a symmetric scheme for 8-bit (Q8_0)"
    if w.num_bits not in (4, 8):
        return f"{w.num_bits}-bit codes have no plain ggml block (Q4_0 holds 4-bit, Q8_0 8-bit)"
    if w.strategy == "group" and w.group_size % BLOCK:
        return f"group_size={w.group_size} is not a multiple of ggml's 32-element blocks (use 32, 64, 128, …)"
    if w.strategy not in ("group", "channel"):
        return f"strategy {w.strategy!r}: ggml blocks carry a scale per 32 columns of a row (use group or channel)"
    return None


def shape_problems(shapes: Dict[str, Tuple[int, int]]) -> List[str]:
    return [f"{name} has {cols} input columns, not a multiple of 32" for name, (_, cols) in shapes.items() if cols % BLOCK]


def round_scale(scale: torch.Tensor) -> torch.Tensor:
    """Scales as ggml's float16 `d` holds them (sign kept; never 0 or inf): applied before any code is computed."""
    return scale_in_dtype(scale, torch.float16)


def round_scale_q4_1(scale: torch.Tensor) -> torch.Tensor:
    """Q4_1 stores d and the offset m = s·(qmin − z) as float16: with s rounded to 7 significant bits (and kept
    within float16's exact range), s times any zero point 0..15 has at most 11 significant bits, so both are exact
    and the file holds hfquant's numbers (relative scale rounding ≤ 2^-8, taken before the codes are chosen)."""
    s = scale.to(torch.float32)
    mantissa, exponent = torch.frexp(s.abs().clamp(min=2.0 ** -17, max=2048.0))  # s·15 stays below float16's max
    rounded = torch.ldexp(torch.round(mantissa * 128) / 128, exponent)
    return torch.where(s < 0, -rounded, rounded)


def _block_scales(scale: torch.Tensor, args: QuantArgs, cols: int) -> torch.Tensor:
    """(out, cols/32): the scale of the group (or row) each 32-column block lies in."""
    rows = scale.shape[0]
    starts = torch.arange(0, cols, BLOCK)
    if args.strategy == "group":
        return scale.reshape(rows, -1)[:, starts // args.group_size]
    return scale.reshape(rows, 1).expand(rows, starts.numel())


def ggml_blocks(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, args: QuantArgs) -> Tuple[np.ndarray, str]:
    """(uint8 array (out, blocks · block bytes), "Q4_0" | "Q8_0" | "Q4_1") for codes (out, in) and their qparams."""
    rows, cols = codes.shape
    block_scale = _block_scales(scale, args, cols)
    d = block_scale.to(torch.float16).numpy().view(np.uint8).reshape(rows, -1, 2)
    if not args.symmetric:  # Q4_1: w = d·q + m with q = code − qmin and m = s·(qmin − z)
        offset = block_scale * (args.qmin - _block_scales(zero_point.to(torch.float32), args, cols))
        m16 = offset.to(torch.float16)
        if not torch.equal(m16.float(), offset):
            raise ValueError("Q4_1 offset not exact in float16: scales must go through round_scale_q4_1 first")
        q = (codes.to(torch.int16) - args.qmin).to(torch.uint8).numpy().reshape(rows, -1, BLOCK)
        qs = q[..., :16] | (q[..., 16:] << 4)
        m = m16.numpy().view(np.uint8).reshape(rows, -1, 2)
        return np.concatenate([d, m, qs], axis=-1).reshape(rows, -1), "Q4_1"
    centred = codes.to(torch.int16) - zero_point.to(torch.int16).reshape(rows, -1)[:, :1]  # symmetric: one zero point
    if args.num_bits == 8:
        x = centred.to(torch.int8).numpy().view(np.uint8).reshape(rows, -1, BLOCK)
        return np.concatenate([d, x], axis=-1).reshape(rows, -1), "Q8_0"
    q = (centred + 8).to(torch.uint8).numpy().reshape(rows, -1, BLOCK)
    qs = q[..., :16] | (q[..., 16:] << 4)
    return np.concatenate([d, qs], axis=-1).reshape(rows, -1), "Q4_0"


def q8_0_codes(weight: torch.Tensor):
    """(codes, float16-exact scales, zero points) of a float matrix as ggml's Q8_0 holds it (absmax/127 per 32)."""
    from ..quant import compute_qparams, min_max, quantize

    w = weight.float()
    scale, zero_point = compute_qparams(*min_max(w, Q8_EMBEDDING), Q8_EMBEDDING)
    scale = round_scale(scale)
    return quantize(w, scale, zero_point, Q8_EMBEDDING), scale, zero_point


def quantize_embeddings(model: torch.nn.Module) -> torch.nn.Module:
    """The token embedding (and an untied float lm_head) replaced by their Q8_0 values: what `embedding=q8_0`
    writes, for the reference forward the exported file is compared with."""
    from ..quant import dequantize

    layers = [model.get_input_embeddings()]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not layers[0].weight and isinstance(output.weight, torch.nn.Parameter):
        layers.append(output)
    with torch.no_grad():
        for layer in layers:
            codes, scale, zero_point = q8_0_codes(layer.weight)
            layer.weight.copy_(dequantize(codes, scale, zero_point, Q8_EMBEDDING).to(layer.weight.dtype))
    return model


def llama_rows(t, heads: int):
    """llama.cpp's converter order of q/k rows: each head's two rotary halves interleaved (works on any array whose
    first axis is the rows: weights, codes, scales)."""
    rows = t.shape[0]
    return t.reshape(heads, 2, rows // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def gguf_name(hf_name: str) -> Optional[str]:
    """GGUF tensor name for a Hugging Face Llama-family parameter (None: not written, e.g. rotary buffers)."""
    module, _, leaf = hf_name.rpartition(".")
    if module in TOP_NAMES:
        return f"{TOP_NAMES[module]}.{leaf}"
    parts = module.split(".")
    if len(parts) >= 4 and parts[0] == "model" and parts[1] == "layers":
        inner = ".".join(parts[3:])
        if inner in LAYER_NAMES:
            return f"blk.{parts[2]}.{LAYER_NAMES[inner]}.{leaf}"
    return None


# llama.cpp splits text before BPE with the regexes of a named pre-tokenizer (`tokenizer.ggml.pre`); its "default"
# splits punctuation runs and digits unlike any of these, so a wrong name tokenizes differently from the model's own
# tokenizer. The names below are recognised from tokenizer.json's `pre_tokenizer` by structure.
LLAMA3_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
                "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
QWEN2_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
               "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


def pre_tokenizer_name(pre: Optional[dict]) -> str:
    """llama.cpp's name for a byte-level BPE `pre_tokenizer` (tokenizer.json): "gpt-2" (ByteLevel's own regex),
    "smollm" (single digits, then ByteLevel's regex), "llama-bpe" (Llama 3's split), "qwen2" (Qwen2's split).
    Anything else is refused: llama.cpp would split text differently from the model's tokenizer."""
    steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre or {}]

    def byte_level(step, regex: bool) -> bool:
        return step.get("type") == "ByteLevel" and bool(step.get("use_regex", True)) == regex

    def split(step, pattern: str) -> bool:
        return (step.get("type") == "Split" and (step.get("pattern") or {}).get("Regex") == pattern
                and step.get("behavior") == "Isolated" and not step.get("invert", False))

    if len(steps) == 1 and byte_level(steps[0], True):
        return "gpt-2"
    if len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits") \
            and byte_level(steps[1], True):
        return "smollm"
    for name, pattern in (("llama-bpe", LLAMA3_SPLIT), ("qwen2", QWEN2_SPLIT)):
        if len(steps) == 2 and split(steps[0], pattern) and byte_level(steps[1], False):
            return name
    raise ValueError(f"GGUF export: tokenizer.json's pre_tokenizer {json.dumps(pre)[:300]} is none llama.cpp names "
                     "here (ByteLevel alone, digits + ByteLevel as SmolLM, Llama 3's or Qwen2's split), so llama.cpp "
                     "would split text differently from the model's tokenizer; model/ keeps hfquant's format "
                     "(format=auto loads everywhere hfquant is installed)")


def _tokenizer_metadata(writer, folder: str, config: dict) -> None:
    """A byte-level BPE `tokenizer.json` as GGUF's `gpt2` tokenizer model (tokens by id, merges, special ids)."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):  # transformers loads such a file; llama.cpp refuses it (it needs a vocabulary)
        import logging

        logging.getLogger("hfquant").warning("GGUF export: %s has no tokenizer.json, so the file has no vocabulary — "
                                             "transformers loads it, llama.cpp will refuse it", folder)
        return
    with open(path, encoding="utf-8") as f:
        tok = json.load(f)
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"GGUF export writes byte-level BPE tokenizers (gpt2 model); this one is {model.get('type')!r}")
    vocab = dict(model["vocab"])
    special = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    vocab.update(special)
    size = config.get("vocab_size") or max(vocab.values()) + 1  # the embedding's rows: GGUF has one token per row
    vocab = {text: index for text, index in vocab.items() if index < size}  # e.g. a pad token added past the rows
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [5] * size  # UNUSED until filled
    for text, index in vocab.items():
        tokens[index] = text
        types[index] = 3 if text in special and any(t["content"] == text and t.get("special") for t in tok["added_tokens"]) else 1
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tok.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    tcfg = {}
    if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as f:
            tcfg = json.load(f)

    def token_id(key: str, config_key: str):
        value = tcfg.get(key)
        text = value.get("content") if isinstance(value, dict) else value
        return vocab.get(text) if text in vocab else config.get(config_key)

    for key, config_key, add in (("bos_token", "bos_token_id", writer.add_bos_token_id),
                                 ("eos_token", "eos_token_id", writer.add_eos_token_id),
                                 ("pad_token", "pad_token_id", writer.add_pad_token_id)):
        found = token_id(key, config_key)
        if isinstance(found, int) and 0 <= found < size:
            add(found)
    writer.add_add_bos_token(bool(tcfg.get("add_bos_token", False)))
    template = tcfg.get("chat_template")
    if not template and os.path.isfile(os.path.join(folder, "chat_template.jinja")):
        with open(os.path.join(folder, "chat_template.jinja"), encoding="utf-8") as f:
            template = f.read()
    if isinstance(template, str) and template:
        writer.add_chat_template(template)


def _hyperparameters(writer, config: dict, arch: str) -> None:
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_dimension_count(head_dim)
    rope = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    writer.add_rope_freq_base(float(rope))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(config["vocab_size"])


FLOAT_TYPES = {"float32": ("F32", np.float32), "float16": ("F16", np.float16), "bfloat16": ("BF16", None)}


def export_folder(src: str, dst: str, file_name: Optional[str] = None, embedding: str = "float") -> dict:
    """Write `dst/<name>.gguf` from the hfquant folder `src` (its codes, scales and float tensors, in order). A plain
    float checkpoint folder (no quantization_config) is written with float tensors only — what llama.cpp's own
    quantizer starts from (scripts/bench_formats.py)."""
    import gguf

    from ..formats.stored_check import checked_modules
    from .folder_tensors import FolderTensors

    with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    qcfg = config.get("quantization_config") or {}
    model_type = qcfg.get("base_model_type", config.get("model_type"))
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise ValueError(f"GGUF export writes the Llama family ({', '.join(sorted(ARCHITECTURES))}); this model is {model_type!r}")
    modules, _ = checked_modules(qcfg["modules"]) if qcfg else ({}, [])
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    kinds = set()
    os.makedirs(dst)
    bits = {entry["weights"]["num_bits"] for entry in modules.values()}
    asym = any(not entry["weights"].get("symmetric", True) for entry in modules.values())
    name = file_name or f"model-{'F32' if not bits else 'Q8_0' if bits == {8} else 'Q4_1' if asym else 'Q4_0'}.gguf"
    writer = gguf.GGUFWriter(os.path.join(dst, name), arch, use_temp_file=True)
    writer.add_name(str(config.get("_name_or_path") or model_type))
    _hyperparameters(writer, config, arch)
    _tokenizer_metadata(writer, src, config)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    source = FolderTensors(src)
    for module, keys, _ in source.items(modules):
        rows_heads = None if arch not in PERMUTED_QK else \
            heads if ".self_attn.q_proj" in module else kv_heads if ".self_attn.k_proj" in module else None
        if keys is not None:
            args = QuantArgs.from_dict(modules[module]["weights"])
            packed = source.get(keys["weight_packed"])
            cols = packed.shape[1] * 8 // args.num_bits  # 4-bit rows are whole blocks of 32: even
            codes = unpack(packed, args, cols)
            scale, zp = source.get(keys["weight_scale"]), source.get(keys["weight_zero_point"])
            if rows_heads:
                codes, scale, zp = (llama_rows(t, rows_heads) for t in (codes, scale, zp))
            data, kind = ggml_blocks(codes, scale, zp, args)
            kinds.add(kind)
            writer.add_tensor(gguf_name(module + ".weight"), data, raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
            if "bias" in keys:
                writer.add_tensor(gguf_name(module + ".bias"), source.get(keys["bias"]).float().numpy())
            continue
        target = gguf_name(module)
        if target is None:
            continue
        tensor = source.get(module)
        if rows_heads:
            tensor = llama_rows(tensor, rows_heads)
        if embedding == "q8_0" and target in ("token_embd.weight", "output.weight") and tensor.dim() == 2:
            data, kind = ggml_blocks(*q8_0_codes(tensor), Q8_EMBEDDING)
            kinds.add(kind)
            writer.add_tensor(target, data, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            continue
        if tensor.dtype == torch.bfloat16:
            raw = tensor.contiguous().view(torch.int16).numpy().view(np.uint8)
            writer.add_tensor(target, raw.reshape(*tensor.shape[:-1], -1), raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            writer.add_tensor(target, tensor.numpy() if tensor.dtype in (torch.float32, torch.float16) else tensor.float().numpy())
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if not kinds else gguf.LlamaFileType.MOSTLY_Q4_0
                         if "Q4_0" in kinds else gguf.LlamaFileType.MOSTLY_Q4_1 if "Q4_1" in kinds
                         else gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"format": FORMAT_NAME, "file": name, "ggml_types": sorted(kinds), "modules": len(modules), "embedding": embedding,
            "architecture": arch, "bytes": os.path.getsize(os.path.join(dst, name)), "load": name}


def logits_without_hfquant(folder: str, input_ids: torch.Tensor, workdir: str) -> torch.Tensor:
    """Logits of the folder's .gguf loaded by transformers (`gguf_file=`, dequantized to float32) without hfquant."""
    from .consumer_check import logits_in_clean_process

    name = next(n for n in sorted(os.listdir(folder)) if n.endswith(".gguf"))
    return logits_in_clean_process(folder, input_ids, workdir, f"kwargs = dict(gguf_file={name!r}, dtype=torch.float32)")
