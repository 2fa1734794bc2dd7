"""Streaming weight-only quantization: a safetensors checkpoint → an hfquant folder, one tensor at a time.

Weight-only schemes observe weights, not activations, so no forward pass is needed and the model never has to
exist in memory: the architecture is built on the meta device (for names, dtypes, tied weights and the state
dict order), each checkpoint tensor is read, quantized and written to its output shard, then dropped. Peak
memory is about one tensor plus its quantization temporaries, whatever the model size.

The folder is byte-identical to what the in-memory path saves for the same scheme and backend: the same
observer and `QuantLinear.from_linear` compute the numbers, the state dict order is the model's own, shards
are split by the same function `save_pretrained` uses, and `StreamingSafetensorsWriter` lays files out as
safetensors does (`tests/pipeline/test_streaming.py` compares whole folders).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..formats.qlinear import QuantLinear
from ..formats.safetensors_stream import SafetensorsReader, StreamingSafetensorsWriter
from ..plan import ModulePlan, QuantPlan, target_modules
from ..plugins import registries
from .load import DTYPES
from ..formats.config_guard import guard_config_json
from .faults import fault_point
from .integrity import NonFiniteError, count_nonfinite, is_finite, nonfinite_message
from .pickled import OneOpen, PickleCheckpointError, PickleReader, legacy_problem, refusal
from .pickled import candidates as pickle_candidates
from .pickled import weight_files as pickle_weight_files
from .output import partial_dir, publish
from .layerwise import make_chain, quantize_module
from .save import quantization_config
from ..errors import HfquantError

log = logging.getLogger("hfquant")
SPILL_SEP = "::"  # module name :: its tensor, as keys of a spill file

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class StreamingError(HfquantError, ValueError):
    """The checkpoint or the request cannot be streamed; the message says why and what to run instead."""


def streaming_problem(spec, backend_name: str) -> Optional[str]:
    """Why this run cannot use the streaming pipeline (decided from the config alone), or None."""
    backend = registries().backends.get(backend_name)
    if not getattr(backend, "streaming", False):
        able = [n for n in registries().backends.names() if getattr(registries().backends.get(n), "streaming", False)]
        return f"backend {backend_name!r} does not write tensor by tensor (backends that do: {', '.join(able) or 'none'})"
    if spec.evaluation is not None:
        return "evaluation needs the model in memory; evaluation=none quantizes and saves only"
    if spec.model.get("device_map") is not None:
        return "model.device_map places a loaded model; streaming never loads one"
    if spec.scheme.embedding is not None:
        return f"scheme.embedding={spec.scheme.embedding} is quantized in memory; scheme.embedding=null streams"
    if spec.algorithms_need_data and spec.scheme.needs_calibration_data:
        return (f"algorithm {', '.join(spec.algorithms)} with static activation scales (scheme {spec.scheme.name}) "
                "needs two layer-by-layer passes; streaming runs one")
    return checkpoint_problem(spec.model)


def checkpoint_problem(model: dict) -> Optional[str]:
    """Why a local checkpoint's files cannot be streamed (read before any output is written), or None. Hub ids
    are known only once downloaded; a pickle-only folder without `model.allow_pickle` is refused by either
    pipeline's loader with the same message."""
    from .load import resolve_path

    if model.get("gguf_file") or not model.get("allow_pickle"):
        return None
    try:
        folder = resolve_path(str(model.get("path")))
    except HfquantError:
        return None  # the loader reports a missing package
    if not os.path.isdir(folder) or any(f.endswith(".safetensors") for f in os.listdir(folder)):
        return None
    return legacy_problem(folder)


def checkpoint_files(folder: str, allow_pickle: bool = False) -> Dict[str, str]:
    """Tensor name → safetensors file, from the index or the single weights file; pickle `.bin` files when the
    folder has no safetensors and `allow_pickle` (else the loader's refusal)."""
    index = os.path.join(folder, INDEX_NAME)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(folder, file) for name, file in weight_map.items()}
    found = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    single = WEIGHTS_NAME if WEIGHTS_NAME in found else (found[0] if len(found) == 1 else None)
    if single:
        path = os.path.join(folder, single)
        return {name: path for name in SafetensorsReader(path).tensors}
    bins = pickle_candidates(folder)
    if bins and not allow_pickle:  # refused before anything is unpickled, as the in-memory loader does
        raise StreamingError(refusal(folder, bins))
    if bins:
        try:
            return pickle_weight_files(folder)
        except PickleCheckpointError as exc:
            raise StreamingError(str(exc)) from None
    raise StreamingError(f"{folder!r} has no {WEIGHTS_NAME} or {INDEX_NAME} (safetensors files there: {found or 'none'}); "
                         "streaming reads safetensors (and, with model.allow_pickle=true, pickle .bin) checkpoints "
                         "only — use pipeline=in_memory for other formats")


@dataclass
class Skeleton:
    """The model built without data: names, dtypes, shapes and tied weights."""

    model: torch.nn.Module
    config: object
    dtype: torch.dtype


def build_skeleton(folder: str, task: str, dtype: str, trust_remote_code: bool, first_float_dtype,
                   real_buffers: bool = False) -> Skeleton:
    """The architecture from `folder`'s config with every weight on the meta device; `real_buffers` keeps
    buffers (rotary tables, position ids) real, as sequential calibration needs to run the model."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if dtype == "auto":
        chosen = getattr(config, "dtype", None) or first_float_dtype or torch.float32
        chosen = getattr(torch, chosen) if isinstance(chosen, str) else chosen
    else:
        chosen = DTYPES[dtype]
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModel
    with init_empty_weights(include_buffers=not real_buffers):
        model = auto.from_config(config, dtype=chosen, trust_remote_code=trust_remote_code)
    return Skeleton(model.eval(), config, chosen)


def meta_tensors(entries: Dict[str, Tuple[torch.dtype, Tuple[int, ...]]]) -> Dict[str, torch.Tensor]:
    """Data-free stand-ins for (dtype, shape) entries: what transformers' and huggingface_hub's helpers take."""
    return {k: torch.empty(shape, dtype=dt, device="meta") for k, (dt, shape) in entries.items()}


def _tied_free_state(model) -> Dict[str, torch.Tensor]:
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    return remove_tied_weights_from_state_dict(model.state_dict(), model)


def _backend_key_order(backend, plan_scheme, mp: ModulePlan, in_features: int, bias: bool, dtype) -> List[str]:
    """The order in which `backend`'s module for this Linear writes its state dict (probed on a small copy)."""
    linear = torch.nn.Linear(in_features, 32, bias=bias, dtype=dtype)
    holder = torch.nn.Module()
    holder.add_module("m", linear)
    probe = QuantPlan(plan_scheme, "minmax")
    scale_shape = QuantLinear(in_features, 32, bias, mp.weight_args, device="meta").weight_scale.shape
    probe.modules["m"] = ModulePlan("m", mp.weight_args, (torch.ones(scale_shape), torch.zeros(scale_shape, dtype=torch.int32)),
                                    mp.input_args, None)
    backend.convert(holder, probe)
    return [k[len("m."):] for k in holder.state_dict()]


class StreamPlan:
    """What to write: every output tensor's dtype and shape, in the model's state dict order, and where each
    comes from (a checkpoint tensor, or a quantized module)."""

    def __init__(self, skeleton: Skeleton, scheme, backend, files: Dict[str, str]) -> None:
        model = skeleton.model
        self.targets = target_modules(model, scheme)
        state = _tied_free_state(model)
        missing = [k for k in state if k not in files]
        if missing:
            raise StreamingError(
                f"the checkpoint lacks {len(missing)} tensor(s) that {type(model).__name__} has (e.g. {missing[0]!r}); "
                "the in-memory loader would initialise them, which streaming cannot reproduce — use pipeline=in_memory"
            )
        extra = sorted(set(files) - set(state))
        if extra:
            log.warning("ignoring %d checkpoint tensor(s) the model does not use (e.g. %s), as from_pretrained would", len(extra), extra[0])
        self.entries: Dict[str, Tuple[torch.dtype, Tuple[int, ...]]] = {}
        self.source: Dict[str, str] = {}  # output key → checkpoint key (plain tensors)
        self.owner: Dict[str, Tuple[str, str]] = {}  # output key → (module, key inside the module)
        self.module_plans: Dict[str, ModulePlan] = {}
        orders: Dict[tuple, List[str]] = {}
        for key, tensor in state.items():
            module_name, _, leaf = key.rpartition(".")
            if module_name not in self.targets:
                self.entries[key] = (tensor.dtype, tuple(tensor.shape))
                self.source[key] = key
                continue
            if leaf != "weight":
                continue  # the module's whole block is emitted at its weight
            linear = self.targets[module_name]
            mp = ModulePlan(module_name, scheme.weights, input_args=scheme.input_activations)
            self.module_plans[module_name] = mp
            has_bias = linear.bias is not None
            shapes = {k: (t.dtype, tuple(t.shape)) for k, t in QuantLinear(
                linear.in_features, linear.out_features, has_bias, mp.weight_args, mp.input_args,
                dtype=skeleton.dtype, device="meta").state_dict().items()}
            sig = (linear.in_features, has_bias, repr(mp.weight_args), repr(mp.input_args))
            if sig not in orders:
                orders[sig] = _backend_key_order(backend, scheme, mp, linear.in_features, has_bias, skeleton.dtype)
            for sub in orders[sig]:
                if sub not in shapes:
                    raise StreamingError(f"backend {backend.name!r} saves {sub!r}, which is not part of hfquant's format")
                self.entries[f"{module_name}.{sub}"] = shapes[sub]
                self.owner[f"{module_name}.{sub}"] = (module_name, sub)
        self.entries = saved_order(model, self.entries)
        for name in self.targets:
            if f"{name}.weight" not in files:
                raise StreamingError(f"{name}.weight is tied to another tensor; quantizing it unties them, which "
                                     "streaming cannot do — add it to scheme.ignore or use pipeline=in_memory")
        self.total_parameters = sum(p.numel() for n, p in model.named_parameters() if n.rpartition(".")[0] not in self.targets
                                    or not n.endswith(".weight"))
        self.baseline_bytes = sum(t.numel() * t.element_size() for t in state.values())


def saved_order(model, entries: Dict[str, Tuple[torch.dtype, Tuple[int, ...]]]):
    """`entries` in the order `save_pretrained` hands them to the shard splitter: a model loaded by
    `from_pretrained` passes its state dict through `revert_weight_conversion`, which sorts the keys (and would
    rename them, had the checkpoint needed renaming — such checkpoints are refused above)."""
    from transformers.core_model_loading import revert_weight_conversion

    meta = meta_tensors(entries)
    had = getattr(model, "_weight_conversions", None)
    model._weight_conversions = []  # what from_pretrained leaves when no conversion applied to the checkpoint
    try:
        reverted = revert_weight_conversion(model, meta)
    finally:
        model._weight_conversions = had
    if set(reverted) != set(entries):
        raise StreamingError(f"transformers renames {type(model).__name__}'s weights when saving; streaming cannot "
                             "reproduce that — use pipeline=in_memory")
    return {k: entries[k] for k in reverted}


class TensorSource:
    """Checkpoint tensors by name, read one at a time."""

    def __init__(self, files: Dict[str, str]) -> None:
        self.files = files
        pickles = OneOpen()  # pickle files are memory-mapped one at a time
        self.readers = {path: PickleReader(path, pickles) if path.endswith(".bin") else SafetensorsReader(path)
                        for path in sorted(set(files.values()))}

    def get(self, name: str) -> torch.Tensor:
        """The tensor, refused by name when it holds NaN/Inf: found as it is read (for quantizing, passing
        through or sequential calibration), not minutes later as a result that does not reproduce."""
        tensor = self.readers[self.files[name]].get(name)
        if not is_finite(tensor):
            where = f"checkpoint {os.path.dirname(self.files[name])!r} ({os.path.basename(self.files[name])})"
            raise NonFiniteError(nonfinite_message([(name, count_nonfinite(tensor), tensor.numel())], where))
        return tensor

    def dtype(self, name: str) -> torch.dtype:
        return self.readers[self.files[name]].tensors[name].torch_dtype

    def tensor_bytes(self, name: str) -> int:
        info = self.readers[self.files[name]].tensors[name]
        return math.prod(info.shape) * torch.empty((), dtype=info.torch_dtype).element_size()

    def nbytes(self) -> int:
        return sum(os.path.getsize(p) for p in self.readers)


class ModuleQuantizer:
    """One Linear's tensors → its saved tensors: the run's algorithm chain chooses the codes exactly as the
    in-memory driver does (`layerwise.quantize_module`), the format's pure `compress` lays them out."""

    def __init__(self, chain, make_observer, round_scale, dtype: torch.dtype, scheme, fmt) -> None:
        self.chain, self.make_observer, self.round_scale = chain, make_observer, round_scale
        self.dropped = []  # algorithm=auto: algorithms the model's layout ruled out, with why
        self.dtype, self.scheme, self.format = dtype, scheme, fmt
        self.ready: Dict[str, Dict[str, torch.Tensor]] = {}  # modules compressed layer by layer, not yet written
        self.edited: Dict[str, torch.Tensor] = {}  # non-target tensors a weight editor changed (folded norms)
        self.spill_dir: Optional[str] = None  # where `spill` moves `ready` modules (None: they stay in memory)
        self._spilled: Dict[str, str] = {}  # module → the spill file holding its tensors
        self._pending: Dict[str, int] = {}  # spill file → modules in it not taken yet (deleted at 0: disk stays ~1×)
        self._files = 0

    def spill(self) -> None:
        """Move every compressed module from memory to one safetensors file in `spill_dir`: layer by layer runs
        finish all layers before the writer can place their tensors in shard order, and a 7B model's packed
        codes would otherwise all wait in memory."""
        if self.spill_dir is None or not self.ready:
            return
        path = os.path.join(self.spill_dir, f"{self._files:05d}.safetensors")
        self._files += 1
        save_file({f"{module}{SPILL_SEP}{sub}": t.contiguous() for module, tensors in self.ready.items()
                   for sub, t in tensors.items()}, path)
        self._spilled.update({module: path for module in self.ready})
        self._pending[path] = len(self.ready)
        self.ready.clear()

    def has_ready(self, module: str) -> bool:
        return module in self.ready or module in self._spilled

    def take_ready(self, module: str) -> Dict[str, torch.Tensor]:
        """A compressed module's tensors (read back from its spill file when it was spilled), forgotten here."""
        if module in self.ready:
            return self.ready.pop(module)
        path = self._spilled.pop(module)
        with safe_open(path, framework="pt") as f:
            head = module + SPILL_SEP
            tensors = {key[len(head):]: f.get_tensor(key) for key in f.keys() if key.startswith(head)}
        self._pending[path] -= 1
        if not self._pending[path]:
            os.remove(path)
            del self._pending[path]
        return tensors

    @torch.no_grad()
    def __call__(self, mp: ModulePlan, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        weight = weight.to(self.dtype)
        bias = None if bias is None else bias.to(self.dtype)
        if mp.weight_codes is None:
            linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta", dtype=self.dtype)
            linear.weight = torch.nn.Parameter(weight, requires_grad=False)
            quantize_module(self.chain, mp, linear, self.scheme, self.make_observer, self.round_scale)
        out = self.format.compress(mp, {"weight": weight, **({"bias": bias} if bias is not None else {})})
        # compressed: neither the codes nor the per-group scales need stay in memory. The scales (with int32 zero
        # points, 8 bytes per group of 128) were kept once, and grew a 28 GiB w4a16 stream's RSS by ~0.9 GiB.
        mp.weight_codes = mp.weight_qparams = None
        return out

    def stats(self) -> dict:
        return self.chain.stats()


class ReadAhead:
    """The checkpoint's tensors in the order the writer will ask for them, the next one read (and checked for
    NaN/Inf) on a thread while the current one is quantized and written: reading is the other half of a
    streamed run's time, and both torch's copy out of the memory map and the page faults behind it release the
    GIL. One tensor ahead at most, and none larger than `max_bytes` (an embedding or lm_head is read when asked
    for: read ahead next to another one in flight it raised a 28 GiB run's peak RSS to 2 GiB). A name asked out
    of order is read directly."""

    max_bytes = 128 * 2**20

    def __init__(self, source: TensorSource, order: List[str]) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.source, self.order = source, order
        self.position = {name: i for i, name in enumerate(order)}
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hfquant-read-ahead")
        self.pending: Optional[Tuple[str, Any]] = None
        self.lock = threading.Lock()  # one read at a time: pickle checkpoints map one file at a time (OneOpen)
        self._submit(0)

    def _read(self, name: str) -> torch.Tensor:
        with self.lock:
            return self.source.get(name)

    def _submit(self, index: int) -> None:
        self.pending = None
        if index < len(self.order):
            name = self.order[index]
            if self.source.tensor_bytes(name) <= self.max_bytes:
                self.pending = (name, self.pool.submit(self._read, name))

    def get(self, name: str) -> torch.Tensor:
        if self.pending is not None and self.pending[0] == name:
            future = self.pending[1]
            self._submit(self.position[name] + 1)  # start the next read before waiting for this one
            return future.result()
        tensor = self._read(name)
        if name in self.position:
            if self.pending is not None:
                self.pending[1].cancel()
            self._submit(self.position[name] + 1)
        return tensor

    def close(self) -> None:
        if self.pending is not None:
            self.pending[1].cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)


class WriteBehind:
    """Each output tensor written on a thread while the next one is read and quantized (`pwrite` releases the
    GIL); at most one write in flight, so memory grows by one tensor. `wait()` returns when it is on disk and
    raises what the write raised."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hfquant-write-behind")
        self.pending = None

    def write(self, writer, name: str, tensor: torch.Tensor) -> None:
        self.wait()
        self.pending = self.pool.submit(writer.write, name, tensor)

    def wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def drain(self) -> None:
        """Wait for the write in flight, ignoring its error: called while another error is already on its way
        out, which is the one to report (and the writer's file must not close under a running write)."""
        try:
            self.wait()
        except Exception:
            pass

    def close(self) -> None:
        self.drain()
        self.pool.shutdown(wait=True)


def read_order(plan: StreamPlan, shards: Dict[str, List[str]], source: TensorSource, quantizer: ModuleQuantizer) -> List[str]:
    """The source tensors `write_shards` will read, in its order (what the layer-by-layer pass already handled —
    compressed modules, edited tensors — is not read again)."""
    order, seen = [], set()
    for names in shards.values():
        for name in names:
            if name in plan.source:
                if plan.source[name] not in quantizer.edited:
                    order.append(plan.source[name])
                continue
            module = plan.owner[name][0]
            if module in seen or quantizer.has_ready(module):
                continue
            seen.add(module)
            order.append(f"{module}.weight")
            if f"{module}.bias" in source.files:
                order.append(f"{module}.bias")
    return order


def write_shards(folder: str, plan: StreamPlan, source: TensorSource, quantizer: ModuleQuantizer, max_shard_size) -> dict:
    """Write every output shard (and the index when there is more than one), one tensor at a time, timing the
    reads and writes (the parts not hidden behind the read-ahead and write-behind threads) and the quantization
    for the report."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from tqdm.auto import tqdm

    split = split_torch_state_dict_into_shards(meta_tensors(plan.entries), filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)
    done: Dict[str, Dict[str, torch.Tensor]] = {}  # quantized modules whose tensors are not all written yet
    seconds = {"read_s": 0.0, "quantize_s": 0.0, "write_s": 0.0}  # where the time goes, for the report

    def timed(key, fn, *args):
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            seconds[key] += time.perf_counter() - start

    bar = tqdm(total=len(plan.entries), desc="stream quantize", unit="tensor", leave=False)
    # The reader and writer threads keep about one core busy (copies out of the page cache, page faults, pwrite);
    # torch's pool gets the rest: on 2 vCPUs, one quantizing thread was 1.1–1.3× faster than two fighting them.
    # Set before the reader starts, so no pool is sized for all the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1))
    reads = ReadAhead(source, read_order(plan, split.filename_to_tensors, source, quantizer))
    writes = WriteBehind()
    try:
        for shard, names in split.filename_to_tensors.items():
            with StreamingSafetensorsWriter(os.path.join(folder, shard), {n: plan.entries[n] for n in names}, {"format": "pt"}) as writer:
                try:
                    for name in names:
                        tensor = _output_tensor(name, plan, reads, source, quantizer, done, timed)
                        timed("write_s", writes.write, writer, name, tensor)
                        del tensor
                        bar.update()
                except BaseException:
                    writes.drain()
                    raise
                timed("write_s", writes.wait)  # the shard's last tensor is on disk before the writer closes it
    finally:
        torch.set_num_threads(threads)
        try:
            writes.close()
        finally:
            reads.close()
    bar.close()
    if split.is_sharded:
        index = {"metadata": {"total_parameters": plan.total_parameters, **split.metadata}, "weight_map": split.tensor_to_filename}
        with open(os.path.join(folder, INDEX_NAME), "w", encoding="utf-8") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return {"shards": len(split.filename_to_tensors), "bytes": split.metadata["total_size"], **seconds}


def _output_tensor(name: str, plan: StreamPlan, reads: ReadAhead, source: TensorSource, quantizer: ModuleQuantizer,
                   done: Dict[str, Dict[str, torch.Tensor]], timed) -> torch.Tensor:
    """What is written under `name`: a checkpoint tensor passed through (or as a weight editor left it), or one of
    its module's quantized tensors — the module is read and quantized when the first of them is needed."""
    if name in plan.source:
        dtype = plan.entries[name][0]
        edited = quantizer.edited.pop(plan.source[name], None)
        tensor = edited if edited is not None else timed("read_s", reads.get, plan.source[name])
        return tensor.to(dtype) if tensor.dtype.is_floating_point else tensor
    module, sub = plan.owner[name]
    if module not in done and quantizer.has_ready(module):
        done[module] = quantizer.take_ready(module)
    if module not in done:
        bias_key = f"{module}.bias"
        weight = timed("read_s", reads.get, f"{module}.weight")
        bias = timed("read_s", reads.get, bias_key) if bias_key in source.files else None
        done[module] = timed("quantize_s", quantizer, plan.module_plans[module], weight, bias)
        del weight, bias
    tensor = done[module].pop(sub)
    if not done[module]:
        del done[module]
    return tensor


def stream_quantize(folder: str, spec, backend_name: str, tokenizer, output_dir: str, max_shard_size,
                    calibrate=None, windows=None) -> dict:
    """Quantize the checkpoint in `folder` into `<output_dir>/model` without loading the model. `calibrate(source,
    dtype)` returns static input qparams by module (sequential calibration) for schemes that need them;
    `windows` feed algorithms that learn from layer inputs, run one decoder layer at a time."""
    m = spec.model
    files = checkpoint_files(folder, bool(m.get("allow_pickle", False)))
    try:
        source = TensorSource(files)
    except PickleCheckpointError as exc:
        raise StreamingError(str(exc)) from None
    first_float = next((source.dtype(n) for n in files if source.dtype(n).is_floating_point), None)
    skeleton = build_skeleton(folder, m.get("task", "causal-lm"), m.get("dtype", "float32"),
                              bool(m.get("trust_remote_code", False)), first_float)
    from .quantize import check_format_fits, scale_rounding

    check_format_fits(skeleton.model, spec.scheme, spec.format)  # before any tensor is quantized
    backend = registries().backends.get(backend_name)()
    plan = StreamPlan(skeleton, spec.scheme, backend, files)
    if spec.scheme.needs_calibration_data:
        if calibrate is None:
            raise StreamingError(f"scheme {spec.scheme.name!r} needs calibrated activation scales")
        for name, qparams in calibrate(source, skeleton.dtype).items():
            plan.module_plans[name].input_qparams = qparams
    quant_plan = QuantPlan(spec.scheme, spec.observer, dict(spec.observer_options), dict(plan.module_plans))
    observer_cls = registries().observers.get(spec.observer)
    quantizer = ModuleQuantizer(make_chain(spec.algorithms, spec.propagate),
                                lambda args: observer_cls(args, **spec.observer_options),
                                scale_rounding(backend_name, spec.format, skeleton.dtype, spec.scheme, spec.format_options),
                                skeleton.dtype, spec.scheme,
                                registries().formats.get(getattr(backend, "format", "hfquant"))(spec.scheme))
    try:
        if quantizer.chain.requires_data:
            from .sequential import quantize_sequentially

            if windows is None:
                raise StreamingError(f"algorithm {', '.join(quantizer.chain.names)} needs calibration windows")
            quantizer.spill_dir = tempfile.mkdtemp(prefix=".tmp-spill-", dir=output_dir)  # a partial: swept if killed
            quantize_sequentially(folder, source, spec, windows, skeleton.dtype, quantizer, plan.module_plans)
        return _write_output(folder, spec, backend, backend_name, tokenizer, output_dir, max_shard_size, skeleton,
                             plan, quant_plan, source, quantizer)
    finally:
        if quantizer.spill_dir is not None:
            shutil.rmtree(quantizer.spill_dir, ignore_errors=True)


def _write_output(folder, spec, backend, backend_name, tokenizer, output_dir, max_shard_size, skeleton, plan,
                  quant_plan, source, quantizer) -> dict:
    from transformers import GenerationConfig

    log.info("streaming %d tensors (%d quantized modules) from %s", len(plan.entries), len(plan.module_plans), folder)
    tmp = partial_dir(output_dir)
    try:
        written = write_shards(tmp, plan, source, quantizer, max_shard_size)
        config = skeleton.config
        config.dtype = str(skeleton.dtype).split(".")[1]
        config.architectures = [type(skeleton.model).__name__]
        config.quantization_config = quantization_config(quant_plan, backend_name)
        config.save_pretrained(tmp)
        guard_config_json(tmp)
        if skeleton.model.can_generate():
            if os.path.isfile(os.path.join(folder, "generation_config.json")):
                generation = GenerationConfig.from_pretrained(folder)
            else:
                generation = GenerationConfig.from_model_config(config)
            generation.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        fault_point("save:written")
        publish(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    params = sum(p.numel() for p in skeleton.model.parameters())
    return {
        "quantization": dict(quantizer.stats(), modules=len(plan.module_plans), ignore=list(spec.scheme.ignore),
                             algorithms=quantizer.chain.names, propagate=spec.propagate,
                             **({"algorithms_dropped": quantizer.dropped} if quantizer.dropped else {}),
                             streamed={"input_bytes": source.nbytes(), **written}),
        "parameters": params,
        "baseline_bytes": plan.baseline_bytes,
    }
