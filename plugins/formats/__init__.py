"""Built-in formats: `hfquant` (packed integer codes, reloaded with hfquant installed) and `bitsandbytes`
(transformers' native NF4 / FP4 / LLM.int8 serialization, reloaded without hfquant)."""
