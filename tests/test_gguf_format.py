"""GGUF export: hfquant's codes as ggml blocks (checked against the gguf package's own dequantizer), llama.cpp's
q/k row order (undone by transformers' loader), and whole runs whose file transformers loads without hfquant."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from hfquant.formats.gguf_export import ggml_blocks, gguf_name, llama_rows, round_scale, round_scale_q4_1
from hfquant.pipeline.run import run
from hfquant.quant import QuantArgs, compute_qparams, dequantize, min_max, quantize
from tests.conftest import compose, tiny_overrides

ARGS = [QuantArgs(num_bits=4, strategy="group", group_size=64, full_range=True),
        QuantArgs(num_bits=4, strategy="group", group_size=32),
        QuantArgs(num_bits=4, symmetric=True, signed=False, strategy="group", group_size=32),
        QuantArgs(num_bits=8, strategy="channel"),
        QuantArgs(num_bits=8, strategy="group", group_size=64),
        QuantArgs(num_bits=4, symmetric=False, strategy="group", group_size=32),
        QuantArgs(num_bits=4, symmetric=False, signed=False, strategy="group", group_size=64)]


@pytest.mark.parametrize("args", ARGS, ids=lambda a: f"{a.num_bits}-{a.strategy}-{a.group_size}-{'s' if a.signed else 'u'}")
def test_blocks_dequantize_to_hfquants_values_exactly(args):
    w = torch.randn(6, 96, generator=torch.Generator().manual_seed(0))  # 96 = one group of 64 + a ragged group of 32
    scale, zp = compute_qparams(*min_max(w, args), args)
    scale = round_scale(scale) if args.symmetric else round_scale_q4_1(scale)
    codes = quantize(w, scale, zp, args)
    data, kind = ggml_blocks(codes, scale, zp, args)
    assert kind == ("Q8_0" if args.num_bits == 8 else "Q4_0" if args.symmetric else "Q4_1")
    ggml = quants.dequantize(data, getattr(GGMLQuantizationType, kind))
    assert np.array_equal(ggml, dequantize(codes, scale, zp, args).numpy())


def test_q4_1_scales_make_every_offset_exact_in_float16():
    s = round_scale_q4_1(torch.tensor([0.0123456, 3.3e-7, 1.7, 9999.0]))
    for z in range(16):
        assert torch.equal((s * z).half().float(), s * z) and torch.equal(s.half().float(), s)


def test_round_scale_is_float16_with_its_sign_and_never_zero():
    s = torch.tensor([0.1, -0.3, 1e-12, -1e-12, 1e6])
    r = round_scale(s)
    assert torch.equal(r, r.half().float()) and torch.equal(torch.sign(r), torch.sign(s)) and bool((r != 0).all())
    assert float(r[-1]) == 65504.0


def test_llama_rows_are_what_transformers_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.arange(32 * 3, dtype=np.float32).reshape(32, 3)
    for heads in (4, 2):
        permuted = llama_rows(torch.from_numpy(w), heads).numpy()
        assert not np.array_equal(permuted, w)
        assert np.array_equal(LlamaTensorProcessor()._reverse_permute_weights(permuted, heads, heads), w)


def test_tensor_names():
    assert gguf_name("model.layers.3.self_attn.q_proj.weight") == "blk.3.attn_q.weight"
    assert gguf_name("model.layers.0.post_attention_layernorm.weight") == "blk.0.ffn_norm.weight"
    assert gguf_name("model.embed_tokens.weight") == "token_embd.weight" and gguf_name("lm_head.weight") == "output.weight"
    assert gguf_name("model.rotary_emb.inv_freq") is None


@pytest.mark.parametrize("scheme, pipeline, shard", [("w4a16", "in_memory", "5GB"), ("w8a16", "in_memory", "20KB"),
                                                    ("w4a16", "streaming", "20KB"), ("w4a16-asym", "in_memory", "5GB")])
def test_gguf_run_writes_a_file_transformers_loads_without_hfquant(tiny_llm_dir, tmp_path, scheme, pipeline, shard):
    out = tmp_path / "run"
    common = [f"scheme={scheme}", "format=gguf", f"pipeline={pipeline}", f"max_shard_size={shard}",
              *(["scheme.weights.group_size=32"] if scheme.startswith("w4a16") else [])]
    if pipeline == "streaming":
        overrides = ["model=hub", f"model.path={tiny_llm_dir}", f"output_dir={out}", "calibration=none", "algorithm=rtn",
                     "evaluation=none", *common]
    else:
        overrides = tiny_overrides(tiny_llm_dir, out, *common)
    report = run(compose(overrides))
    export = report["export"]
    assert export["check"]["ok"] and export["check"]["max_abs_logit_difference"] <= 1e-4
    assert export["ggml_types"] == (["Q8_0"] if scheme == "w8a16" else ["Q4_1"] if scheme == "w4a16-asym" else ["Q4_0"])
    files = sorted(p.name for p in (out / "model").iterdir())
    assert files == ["README.md", export["file"]]
    assert "gguf" in (out / "model" / "README.md").read_text()


def test_a_float_checkpoint_exports_to_f32_gguf_with_the_same_logits(tiny_llm_dir, tmp_path):
    """What llama.cpp's own quantizer starts from in scripts/bench_formats.py: every tensor F32, the same model."""
    from transformers import AutoModelForCausalLM

    from hfquant.formats.gguf_export import export_folder, logits_without_hfquant

    summary = export_folder(tiny_llm_dir, str(tmp_path / "f32"))
    assert summary["file"] == "model-F32.gguf" and summary["ggml_types"] == [] and summary["modules"] == 0
    ids = torch.arange(1, 40)[None]
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(tiny_llm_dir).eval()(input_ids=ids).logits[0]
    got = logits_without_hfquant(str(tmp_path / "f32"), ids, str(tmp_path))
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)


def test_qwen2_with_attention_biases_exports_and_loads(tiny_tokenizer, tmp_path):
    """Qwen2: GGUF architecture qwen2, q/k/v biases, rows in Hugging Face order (no llama permutation)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=1)
    path = tmp_path / "qwen2"
    Qwen2ForCausalLM(cfg).eval().save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    report = run(compose(["model=hub", f"model.path={path}", f"output_dir={tmp_path / 'run'}", "scheme=w4a16",
                          "scheme.weights.group_size=32", "format=gguf", "calibration=none", "algorithm=rtn",
                          "evaluation.seq_len=64", "evaluation.max_windows=2", "++evaluation.out_of_domain=none"]))
    assert report["export"]["architecture"] == "qwen2" and report["export"]["check"]["max_abs_logit_difference"] <= 1e-4


def test_embedding_as_q8_0_halves_the_embedding_and_is_checked(tiny_llm_dir, tmp_path):
    common = ["scheme=w4a16", "scheme.weights.group_size=32", "format=gguf"]
    plain = run(compose(tiny_overrides(tiny_llm_dir, tmp_path / "a", *common)))
    small = run(compose(tiny_overrides(tiny_llm_dir, tmp_path / "b", *common, "format.embedding=q8_0")))
    assert small["export"]["ggml_types"] == ["Q4_0", "Q8_0"] and small["export"]["embedding"] == "q8_0"
    assert small["export"]["check"]["max_abs_logit_difference"] <= 1e-4
    assert small["quantized"]["size"]["bytes_on_disk"] < plain["quantized"]["size"]["bytes_on_disk"]


def test_format_options_are_checked_at_config_time():
    from hfquant.config import ConfigError, validate

    with pytest.raises(ConfigError, match=r"embedding='q4'.*allowed: float, q8_0"):
        validate(compose(["output_dir=/tmp/x", "format=gguf", "format.embedding=q4"]))


def test_a_bf16_model_is_compared_in_float32_as_transformers_loads_gguf(tiny_llm_dir, tmp_path):
    report = run(compose(tiny_overrides(tiny_llm_dir, tmp_path / "run", "scheme=w4a16", "scheme.weights.group_size=32",
                                        "format=gguf", "model.dtype=bfloat16")))
    assert report["export"]["check"]["max_abs_logit_difference"] <= 1e-4


def _pre_tokenizer_json(pre_tokenizer) -> dict:
    """tokenizer.json's `pre_tokenizer` as the tokenizers library writes it."""
    import json

    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    return json.loads(tok.to_str())["pre_tokenizer"]


def test_pre_tokenizer_names_are_recognised_by_structure():
    """llama.cpp's "default" splits punctuation runs and digits unlike the model's tokenizer (on the embedded model it
    tokenized 3 of 5 probe texts differently, docs/formats.md); each known layout gets llama.cpp's own name."""
    from tokenizers import Regex, pre_tokenizers as pt

    from hfquant.formats.gguf_export import LLAMA3_SPLIT, QWEN2_SPLIT, pre_tokenizer_name

    assert pre_tokenizer_name(_pre_tokenizer_json(pt.ByteLevel(add_prefix_space=False))) == "gpt-2"
    assert pre_tokenizer_name(_pre_tokenizer_json(pt.Sequence([
        pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)]))) == "smollm"
    for name, pattern in (("llama-bpe", LLAMA3_SPLIT), ("qwen2", QWEN2_SPLIT)):
        pre = pt.Sequence([pt.Split(Regex(pattern), behavior="isolated"),
                           pt.ByteLevel(add_prefix_space=False, use_regex=False)])
        assert pre_tokenizer_name(_pre_tokenizer_json(pre)) == name
    with pytest.raises(ValueError, match="llama.cpp would split text differently"):
        pre_tokenizer_name(_pre_tokenizer_json(pt.Sequence([pt.Digits(individual_digits=False),
                                                            pt.ByteLevel(add_prefix_space=False)])))


def test_the_written_file_names_the_models_pre_tokenizer(tiny_llm_dir, tmp_path):
    from gguf import GGUFReader

    from hfquant.formats.gguf_export import export_folder

    summary = export_folder(tiny_llm_dir, str(tmp_path / "f32"))
    field = GGUFReader(str(tmp_path / "f32" / summary["file"])).fields["tokenizer.ggml.pre"]
    assert bytes(field.parts[field.data[0]]).decode() == "gpt-2"  # the tests' tokenizer: ByteLevel alone
