"""The layer-by-layer driver: algorithms called in order around one calibration pass per layer, codes computed
once and stored as chosen, quantized outputs propagated by default; config errors before any work."""

import dataclasses
import logging
import os

import pytest
import torch

from hfquant.config import ConfigError, validate
from hfquant.pipeline.calibrate import build_plan
from hfquant.pipeline.layerwise import make_chain, quantize_in_memory
from hfquant.pipeline.run import run
from hfquant.plugins import registries
from hfquant.quant import dequantize, quantize
from hfquant.registry import Registry
from tests.conftest import compose, tiny_overrides
from tests.pipeline.test_streaming import assert_same_folder


def _model(tiny_llm_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llm_dir).eval()


def _deep_model(tiny_llm_dir, layers: int = 3):
    """The tiny model's architecture with more decoder layers (random weights): a stream that lives past layer 1."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_llm_dir, num_hidden_layers=layers)).eval()


class _Windows:
    def __init__(self, ids):
        self.input_ids = ids

    def __len__(self):
        return self.input_ids.shape[0]


class Recorder:
    """A data-hungry weight editor that edits nothing: records what it was called with, and in what order."""

    requires_data, produces_codes = True, False
    calls = []

    def __init__(self):
        self.seen = {}

    def start_layer(self, ctx):
        Recorder.calls.append(("start", ctx.prefix))
        for name, module in ctx.targets.items():
            ctx.hook(module, lambda m, x, name=name: self.seen.setdefault(name, []).append(x.detach().clone()))

    def finish_layer(self, ctx):
        Recorder.calls.append(("finish", ctx.prefix, {n: mp.weight_codes is None for n, mp in ctx.plans.items()}))


def _registry():
    reg = Registry("algorithms")
    reg.add("rtn", registries().algorithms.get("rtn"), "test")
    reg.add("recorder", Recorder, "test")
    return reg


def _plan(model, scheme="w4a16"):
    minmax = registries().observers.get("minmax")
    sch = registries().schemes.get(scheme)
    if sch.weights.strategy == "group":
        sch = dataclasses.replace(sch, weights=sch.weights.replace(group_size=32))
    return build_plan(model, sch, "minmax", minmax, {}), lambda args: minmax(args)


def test_rtn_codes_are_the_observer_codes_and_the_error_is_theirs(tiny_llm_dir):
    model = _model(tiny_llm_dir)
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    plan, make_observer = _plan(model, "w8a16")
    stats = quantize_in_memory(model, plan, make_chain({"rtn": {}}), make_observer)
    err = energy = 0.0
    for name, mp in plan.modules.items():
        obs = make_observer(mp.weight_args)
        obs.observe(weights[name])
        scale, zp = obs.qparams()
        assert torch.equal(mp.weight_codes, quantize(weights[name], scale, zp, mp.weight_args))
        err += float((dequantize(mp.weight_codes, scale, zp, mp.weight_args) - weights[name]).pow(2).sum())
        energy += float(weights[name].pow(2).sum())
    assert stats["weight_relative_mse"] == pytest.approx(err / energy, rel=1e-6)


@pytest.mark.parametrize("propagate", ["quantized", "float"])
def test_each_layer_sees_the_previous_layers_outputs(tiny_llm_dir, propagate):
    torch.manual_seed(0)
    ids = torch.randint(2, 300, (3, 24))
    model = _model(tiny_llm_dir)
    float_inputs = []  # what layer 1's q_proj sees in the float model
    h = model.model.layers[1].self_attn.q_proj.register_forward_pre_hook(lambda m, a: float_inputs.append(a[0].clone()))
    with torch.no_grad():
        for i in range(3):
            model(input_ids=ids[i : i + 1])
    h.remove()
    plan, make_observer = _plan(model)
    Recorder.calls = []
    chain = make_chain({"recorder": {}}, propagate, registry=_registry())
    quantize_in_memory(model, plan, chain, make_observer, windows=_Windows(ids))
    recorder = chain.steps[0][1]
    seen = torch.cat(recorder.seen["model.layers.1.self_attn.q_proj"])
    expected = torch.cat(float_inputs)
    if propagate == "float":
        torch.testing.assert_close(seen, expected, rtol=1e-5, atol=1e-5)
    else:  # layer 0's quantized weights changed what layer 1 sees
        assert not torch.allclose(seen, expected, rtol=1e-4, atol=1e-4)
    # order: start → (pass) → finish per layer, weight editor before the appended rtn, which set every code
    assert chain.names == ["recorder", "rtn"]
    assert [c[:2] for c in Recorder.calls] == [("start", "model.layers.0."), ("finish", "model.layers.0."),
                                               ("start", "model.layers.1."), ("finish", "model.layers.1.")]
    assert all(Recorder.calls[1][2].values())  # no codes yet when the editor finishes
    assert all(mp.weight_codes is not None for mp in plan.modules.values())
    assert set(chain.handled.values()) == {"rtn"}


class FloatRecorder(Recorder):
    """Asks the driver for the float model's own outputs at each layer and records them."""

    wants_float_outputs = True

    def finish_layer(self, ctx):
        self.seen.setdefault(ctx.prefix, []).extend(out.clone() for out in ctx.float_outputs)


def test_float_outputs_are_the_float_models_own_while_quantized_inputs_drift(tiny_llm_dir):
    """With quantized propagation, each layer's `ctx.float_outputs` are what the untouched float model computes
    there (its hidden states after that layer), not the float layer on the drifted inputs — also on a second run
    with the same chain (the float stream starts again at the captured inputs)."""
    from hfquant.pipeline.layerwise import layer_output

    ids = torch.randint(2, 300, (3, 24), generator=torch.Generator().manual_seed(0))
    model = _deep_model(tiny_llm_dir, layers=3)
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    float_outputs = {}
    hooks = [layer.register_forward_hook(lambda m, a, out, i=i: float_outputs.setdefault(i, []).append(
        layer_output(out).clone())) for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for i in range(3):
            model(input_ids=ids[i : i + 1])
    for h in hooks:
        h.remove()
    plan, make_observer = _plan(model)
    reg = _registry()
    reg.add("float-recorder", FloatRecorder, "test")
    chain = make_chain({"float-recorder": {}}, "quantized", registry=reg)
    assert chain.wants_float_outputs
    for run in range(2):
        model.load_state_dict(pristine)  # quantized propagation wrote codes into the weights
        chain.steps[0][1].seen = {}
        quantize_in_memory(model, plan, chain, make_observer, windows=_Windows(ids))
        seen = chain.steps[0][1].seen
        for i in range(len(model.model.layers)):
            torch.testing.assert_close(torch.cat(seen[f"model.layers.{i}."]), torch.cat(float_outputs[i]),
                                       rtol=1e-5, atol=1e-5)
        assert chain.float_inputs is None  # released after the last layer
    assert not make_chain({"recorder": {}}, registry=reg).wants_float_outputs


def test_signround_float_model_targets_reach_the_codes(tiny_llm_dir):
    """Layer 0's inputs are the float model's, so both settings give its codes alike; from layer 1 on the targets
    differ (the float model's own outputs vs the float layer on drifted inputs), and so do the codes."""
    ids = torch.randint(2, 300, (4, 24), generator=torch.Generator().manual_seed(0))
    codes = {}
    for targets in ("float_layer", "float_model"):
        model = _deep_model(tiny_llm_dir, layers=3)
        plan, make_observer = _plan(model)
        quantize_in_memory(model, plan, make_chain({"signround": {"iters": 8, "batch_size": 2, "targets": targets}}),
                           make_observer, windows=_Windows(ids))
        codes[targets] = {n: mp.weight_codes for n, mp in plan.modules.items()}
    first = [n for n in codes["float_layer"] if n.startswith("model.layers.0.")]
    assert first and all(torch.equal(codes["float_layer"][n], codes["float_model"][n]) for n in first)
    assert any(not torch.equal(c, codes["float_model"][n]) for n, c in codes["float_layer"].items()
               if n.startswith("model.layers.2."))


@pytest.mark.parametrize("extra,message", [
    (["calibration=none", "algorithm=gptq"], "algorithm gptq learns from layer inputs and needs calibration data"),
    (["calibration=none", "algorithm=signround"], "algorithm signround learns from layer inputs and needs calibration data"),
    (["algorithm=[signround,gptq]"], "signround and gptq both choose the integer codes"),
    (["algorithm=signround", "algorithm.signround.iters=0"], "signround: iters must be a positive integer"),
    (["algorithm=signround", "algorithm.signround.targets=float"], "signround: targets must be one of float_model"),
    (["algorithm=signround", "algorithm.signround.learn_zero_point=true"],
     "algorithm.signround: learn_zero_point needs an asymmetric scheme (scheme 'w4a16' is symmetric"),
    (["algorithm=[gptq,awq]"], "gptq chooses the codes, so it must come last (e.g. algorithm=[awq,gptq])"),
    (["algorithm=[hqq,gptq]"], "hqq and gptq both choose the integer codes"),
    (["algorithm=gptq", "scheme=nf4", "backend=bitsandbytes"], "backend=bitsandbytes computes its own codes"),
    (["algorithm=gptq", "+algorithm.gptq.blok_size=3"], "algorithm.gptq: unknown option(s) ['blok_size']"),
    (["algorithm=awq", "scheme=w8a8-static"], "edits weights after static activation scales are observed"),
    (["propagate=sideways"], "propagate='sideways'; allowed: quantized"),
])
def test_bad_algorithm_requests_fail_at_config_time(tiny_llm_dir, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
        overrides = (["model=hub", f"model.path={tiny_llm_dir}", f"output_dir={tmp_path / 'out'}", *extra]
                     if "calibration=none" in extra else tiny_overrides(tiny_llm_dir, tmp_path / "out", *extra))
        validate(compose(overrides))
    assert not (tmp_path / "out").exists()


def test_algorithm_list_composes_in_order(tiny_llm_dir, tmp_path):
    spec = validate(compose(tiny_overrides(tiny_llm_dir, tmp_path / "o", "algorithm=[awq,gptq]", "algorithm.gptq.block_size=64")))
    assert list(spec.algorithms) == ["awq", "gptq"] and spec.algorithms["gptq"]["block_size"] == 64
    assert list(validate(compose(tiny_overrides(tiny_llm_dir, tmp_path / "o"))).algorithms) == ["rtn"]


@pytest.mark.parametrize("algorithm", ["gptq", "[awq,gptq]", "signround", "signround-float-layer-learn-zero"])
def test_streaming_gptq_equals_in_memory_byte_for_byte(tiny_llm_dir, tmp_path, algorithm):
    options = ["algorithm.signround.iters=6", "algorithm.signround.batch_size=2"] if "signround" in algorithm else []
    scheme, evaluate = ["scheme=w4a16"], ["evaluation=none"]
    learnt_zero = algorithm == "signround-float-layer-learn-zero"
    if learnt_zero:  # (plain signround: the float stream in both pipelines); learnt float16 zero points reload exactly
        algorithm = "signround"
        options += ["algorithm.signround.targets=float_layer", "algorithm.signround.learn_zero_point=true"]
        scheme = ["scheme=w4a16-asym", "scheme.weights.float_zero_point=true", "backend=cpu"]
        evaluate = ["evaluation.seq_len=64", "evaluation.max_windows=2", "++evaluation.out_of_domain=none"]
    common = ["model=hub", f"model.path={tiny_llm_dir}", *scheme, "scheme.weights.group_size=32",
              f"algorithm={algorithm}", *options, "calibration.generated=0", "calibration.seq_len=64",
              "calibration.num_samples=4"]
    mem = run(compose([f"output_dir={tmp_path / 'mem'}", "pipeline=in_memory", *common, *evaluate]))
    if learnt_zero:
        assert mem["reload_check"]["max_abs_logit_difference"] == 0.0
    common.append("evaluation=none")
    streamed = run(compose([f"output_dir={tmp_path / 'str'}", "pipeline=streaming", *common]))
    assert streamed["run"]["pipeline"] == "streaming" and "learned from layer inputs" in streamed["calibration"]["status"]
    assert "{" not in streamed["calibration"]["status"]  # the windows in words, not a dict repr
    assert_same_folder(tmp_path / "mem" / "model", tmp_path / "str" / "model")
    assert not [p.name for p in (tmp_path / "str").iterdir() if p.name.startswith(".tmp-spill-")]  # layer spills removed
    assert streamed["quantization"]["weight_sqnr_db"] == pytest.approx(mem["quantization"]["weight_sqnr_db"], rel=1e-9)
    assert mem["quantization"]["algorithms"] == algorithm.strip("[]").split(",")


def test_report_compares_with_round_to_nearest_in_and_out_of_domain(tiny_llm_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HFQUANT_CACHE", str(tmp_path / "cache"))  # its own cache: another test may score the same RTN
    report = run(compose(tiny_overrides(tiny_llm_dir, tmp_path / "r", "algorithm=gptq", "scheme.weights.group_size=32",
                                        "calibration.generated=2", "evaluation.out_of_domain=prose")))
    cmp = report["comparison"]
    assert cmp["out_of_domain"]["dataset"] == "prose" and cmp["out_of_domain"]["protocol"]["dataset"]["name"] == "prose"
    for part in (cmp["rtn"], cmp["out_of_domain"]["quantized"], cmp["out_of_domain"]["rtn"]):
        assert part["perplexity"]["perplexity"] > 0
    assert report["calibration"]["windows"]["generated"]["windows"] == 2
    assert report["calibration"]["windows"]["num_samples"] == 6  # 4 from the dataset + 2 the model wrote
    text = (tmp_path / "r" / "report.md").read_text()
    assert "round-to-nearest instead" in text and "out of calibration domain (prose)" in text
    card = (tmp_path / "r" / "model" / "README.md").read_text()
    assert report["calibration"]["windows"]["token_sha256"] in card and "gptq" in card
    assert not cmp["rtn"]["perplexity"].get("cached")
    again = run(compose(tiny_overrides(tiny_llm_dir, tmp_path / "r2", "algorithm=hqq", "scheme.weights.group_size=32",
                                       "evaluation.out_of_domain=prose")))["comparison"]
    assert again["rtn"]["perplexity"]["cached"] and again["out_of_domain"]["rtn"]["perplexity"]["cached"]
    assert again["rtn"]["perplexity"]["perplexity"] == cmp["rtn"]["perplexity"]["perplexity"]


def test_streaming_gptq_on_a_tokenizer_less_checkpoint_with_random_token_ids(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "ckpt")
    report = run(compose(["model=hub", f"model.path={tmp_path / 'ckpt'}", f"output_dir={tmp_path / 'out'}",
                          "evaluation=none", "algorithm=gptq", "calibration=random", "calibration.num_samples=2",
                          "calibration.seq_len=32", "scheme.weights.group_size=32"]))
    assert report["run"]["pipeline"] == "streaming" and report["quantization"]["algorithms"] == ["gptq"]
    assert report["calibration"]["windows"]["vocab_size"] == 300
    assert report["calibration"]["windows"]["dataset"]["name"] == "random"


def test_awq_refuses_an_unknown_layout_before_any_evaluation(tmp_path, tiny_tokenizer, caplog):
    """OPT blocks are not a layout AWQ folds into: said right after loading, not after the baselines."""
    from transformers import OPTConfig, OPTForCausalLM

    from hfquant.algorithm import AlgorithmError

    torch.manual_seed(0)
    OPTForCausalLM(OPTConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                             num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=256,
                             pad_token_id=1, bos_token_id=0, eos_token_id=1)).save_pretrained(tmp_path / "opt")
    tiny_tokenizer.save_pretrained(tmp_path / "opt")
    caplog.set_level(logging.INFO, logger="hfquant")
    with pytest.raises(AlgorithmError, match=r"awq cannot smooth model\.decoder\.layers\.0 \(OPTDecoderLayer\)"):
        run(compose(tiny_overrides(tmp_path / "opt", tmp_path / "out", "algorithm=awq", "scheme.weights.group_size=32",
                                   "pipeline=in_memory")))
    stages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stage:")]
    assert stages == ["stage: load"], stages


def test_streaming_spills_each_finished_layer_to_disk(tiny_llm_dir, tmp_path, monkeypatch):
    """Layer-by-layer streaming holds one layer in memory: each finished layer's compressed tensors go to a spill
    file until the writer reaches them (and the spill folder is gone afterwards, also on failure)."""
    from hfquant.pipeline import streaming

    seen = []
    original = streaming.ModuleQuantizer.spill

    def spill(self):
        before = len(self.ready)
        original(self)
        seen.append((before, len(self.ready), sorted(os.listdir(self.spill_dir))))

    monkeypatch.setattr(streaming.ModuleQuantizer, "spill", spill)
    left = []
    original_take = streaming.ModuleQuantizer.take_ready

    def take_ready(self, module):
        out = original_take(self, module)
        left.append(len(os.listdir(self.spill_dir)))
        return out

    monkeypatch.setattr(streaming.ModuleQuantizer, "take_ready", take_ready)
    run(compose(["model=hub", f"model.path={tiny_llm_dir}", f"output_dir={tmp_path / 'o'}", "evaluation=none",
                 "algorithm=gptq", "scheme.weights.group_size=32", "calibration.generated=0", "calibration.seq_len=32",
                 "calibration.num_samples=2", "pipeline=streaming"]))
    assert [(b, a) for b, a, _ in seen] == [(7, 0), (7, 0)]  # two layers of seven Linears, none left in memory
    assert seen[-1][2] == ["00000.safetensors", "00001.safetensors"]
    assert left[0] == 2 and left[6] == 1 and left[-1] == 0  # a file goes once the writer took all of its modules
    assert not [p for p in os.listdir(tmp_path / "o") if p.startswith(".tmp-spill-")]
