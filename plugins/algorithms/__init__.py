"""Built-in algorithms: which integer codes each target gets (rtn, gptq, hqq) and weight edits (awq, smoothquant)."""
