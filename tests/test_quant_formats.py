"""Per-tensor quantization against transformers' own quantize-on-load + save_pretrained (CPU).

Reference: `from_pretrained(base, quantization_config=BitsAndBytesConfig(...), device_map="cpu")`
then `save_pretrained`. Ours: the base safetensors read tensor by tensor through a QuantPlan.
They must hold the same tensors (names, dtypes, shapes, bytes) and the same config.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from loadgraph.formats.bnb import dequantize, quantize_tensor_4bit, quantize_tensor_int8  # noqa: E402
from loadgraph.formats.fp8 import dequantize_fp8, fp8_quantization_config, quantize_tensor_fp8  # noqa: E402
from loadgraph.formats.quant_config import quantization_config  # noqa: E402
from loadgraph.formats.quant_plan import plan_quantization, quantizable_tensors  # noqa: E402
from loadgraph.formats.quant_settings import QuantizeError, QuantSettings, refuse_unsupported  # noqa: E402

transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    CLIPVisionConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MixtralConfig,
    MixtralForCausalLM,
)

# Hidden sizes are multiples of 64 (bnb's 4-bit block); the FP8 Llama has every Linear a multiple of 128.
LLAMA = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False)


# ---------------------------------------------------------------------------------------------
# tiny models
# ---------------------------------------------------------------------------------------------


def _save(model: torch.nn.Module, path: Path, dtype: torch.dtype) -> Path:
    model.to(dtype).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    out: dict[str, Path] = {}
    for name in ("float16", "bfloat16", "float32"):
        torch.manual_seed(0)
        out[f"llama-{name}"] = _save(LlamaForCausalLM(LlamaConfig(**LLAMA)), root / f"llama-{name}", getattr(torch, name))
    torch.manual_seed(1)
    out["llama-tied"] = _save(
        LlamaForCausalLM(LlamaConfig(**{**LLAMA, "tie_word_embeddings": True})), root / "llama-tied", torch.bfloat16
    )
    torch.manual_seed(2)
    out["llama-fp8"] = _save(
        LlamaForCausalLM(LlamaConfig(**{**LLAMA, "num_key_value_heads": 4})), root / "llama-fp8", torch.bfloat16
    )
    torch.manual_seed(3)
    mixtral = MixtralConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=256, num_local_experts=4, num_experts_per_tok=2)
    out["mixtral"] = _save(MixtralForCausalLM(mixtral), root / "mixtral", torch.bfloat16)
    torch.manual_seed(4)
    llava = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=32, patch_size=8, projection_dim=64),
        text_config=LlamaConfig(**{**LLAMA, "num_hidden_layers": 1, "vocab_size": 320}),
        image_token_index=300,
    )
    out["llava"] = _save(LlavaForConditionalGeneration(llava), root / "llava", torch.bfloat16)
    torch.manual_seed(5)
    gpt2 = GPT2Config(n_embd=128, n_layer=1, n_head=4, vocab_size=256, n_positions=64, bos_token_id=0, eos_token_id=0)
    out["gpt2"] = _save(GPT2LMHeadModel(gpt2), root / "gpt2", torch.float16)
    return out


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _bnb_kwargs(settings: QuantSettings) -> dict:
    """The BitsAndBytesConfig a user would pass to transformers for these settings."""
    skip = list(settings.skip_modules) or None
    if settings.method == "bnb-int8":
        return dict(load_in_8bit=True, llm_int8_skip_modules=skip)
    return dict(
        load_in_4bit=True,
        bnb_4bit_quant_type=settings.method.removeprefix("bnb-"),
        bnb_4bit_use_double_quant=settings.double_quant,
        bnb_4bit_compute_dtype=settings.compute_dtype,
        bnb_4bit_quant_storage=settings.quant_storage,
        llm_int8_skip_modules=skip,
    )


def reference(base: Path, settings: QuantSettings, out: Path, cls=AutoModelForCausalLM):
    """transformers' own result: quantize on load (CPU), then save_pretrained."""
    kwargs = {} if settings.dtype == "auto" else {"dtype": getattr(torch, settings.dtype)}
    model = cls.from_pretrained(
        base, quantization_config=BitsAndBytesConfig(**_bnb_kwargs(settings)), device_map="cpu", **kwargs
    )
    model.save_pretrained(out)
    return model


def ours(base: Path, settings: QuantSettings, out: Path, model_class=None):
    """What the engine does: plan once, then stream the base tensor by tensor, shard by shard."""
    plan = plan_quantization(base, settings, model_class=model_class)
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(base / "model.safetensors"), "pt") as shard:
        for name in shard.keys():
            tensors.update(plan.convert(name, shard.get_tensor(name)))
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    plan.write_configs(out)
    return plan


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_same_checkpoint(ours_dir: Path, ref_dir: Path) -> None:
    with safe_open(str(ours_dir / "model.safetensors"), "pt") as a, safe_open(str(ref_dir / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for name in b.keys():
            x, y = a.get_tensor(name), b.get_tensor(name)
            assert (x.dtype, x.shape) == (y.dtype, y.shape), name
            assert torch.equal(_raw(x), _raw(y)), f"{name}: bytes differ"
    # Same tensors and the same writer metadata give the very same file.
    digest = [hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest() for d in (ours_dir, ref_dir)]
    assert digest[0] == digest[1]
    for config in ("config.json", "generation_config.json"):
        assert (ours_dir / config).exists() == (ref_dir / config).exists(), config
        if (ref_dir / config).exists():
            assert (ours_dir / config).read_text() == (ref_dir / config).read_text(), config


def load_checked(path: Path, cls=AutoModelForCausalLM):
    """Load a pre-quantized checkpoint and fail on any key problem (not raising proves nothing)."""
    model, info = cls.from_pretrained(path, device_map="cpu", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model


def logits(model, vocab: int = 256) -> torch.Tensor:
    ids = torch.arange(12).reshape(1, 12) * 7 % vocab
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


# ---------------------------------------------------------------------------------------------
# bitsandbytes: byte identity with transformers
# ---------------------------------------------------------------------------------------------

BNB_CASES = [
    pytest.param(base, QuantSettings(method, double_quant=dq), id=f"{base}-{method}{'-dq' if dq else ''}")
    for base in ("llama-float16", "llama-bfloat16", "llama-float32")
    for method, dq in (("bnb-nf4", False), ("bnb-nf4", True), ("bnb-fp4", False), ("bnb-int8", False))
] + [
    # the load dtype changes the bytes: transformers casts before quantizing
    pytest.param("llama-float32", QuantSettings("bnb-nf4", double_quant=True, dtype="bfloat16"), id="fp32-as-bf16-nf4"),
    pytest.param("llama-bfloat16", QuantSettings("bnb-int8", dtype="float16"), id="bf16-as-fp16-int8"),
    # a user skip list replaces transformers' default skips (lm_head then gets quantized too);
    # entries match as a prefix, a regex or a suffix of the module name (transformers' rules)
    pytest.param("llama-bfloat16", QuantSettings("bnb-nf4", skip_modules=("up_proj",)), id="skip-up-nf4"),
    pytest.param("llama-bfloat16", QuantSettings("bnb-nf4", quant_storage="bfloat16", compute_dtype="bfloat16"),
                 id="bf16-storage-nf4"),
    pytest.param("llama-tied", QuantSettings("bnb-int8"), id="tied-int8"),
    pytest.param("llama-tied", QuantSettings("bnb-fp4", double_quant=True), id="tied-fp4-dq"),
]


@pytest.mark.parametrize("base_name, settings", BNB_CASES)
def test_bnb_byte_identical_to_transformers(models, tmp_path, base_name, settings):
    base = models[base_name]
    ref_model = reference(base, settings, tmp_path / "ref")
    plan = ours(base, settings, tmp_path / "ours")
    assert_same_checkpoint(tmp_path / "ours", tmp_path / "ref")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())["quantization_config"]
    assert written == quantization_config(settings) == plan.quant_config

    # The default skips: lm_head and (tied) embeddings stay full precision.
    quantized = plan.quantized_names()
    assert "model.embed_tokens.weight" not in quantized
    assert ("lm_head.weight" in quantized) == bool(settings.skip_modules)
    if settings.skip_modules:
        assert not any("up_proj" in name for name in quantized)
        assert any("down_proj" in name for name in quantized)

    torch.testing.assert_close(logits(load_checked(tmp_path / "ours")), logits(ref_model), rtol=0, atol=1e-5)


def test_mixtral_experts_stay_unquantized(models, tmp_path):
    base, settings = models["mixtral"], QuantSettings("bnb-nf4", double_quant=True)
    ref_model = reference(base, settings, tmp_path / "ref")
    plan = ours(base, settings, tmp_path / "ours")
    assert_same_checkpoint(tmp_path / "ours", tmp_path / "ref")

    # Fused experts (and the router) are not nn.Linear in transformers 5: they pass through untouched.
    quantized = quantizable_tensors(base, settings)
    assert quantized == plan.quantized_names()
    assert quantized and all(".self_attn." in name for name in quantized)
    with safe_open(str(base / "model.safetensors"), "pt") as b, safe_open(str(tmp_path / "ours/model.safetensors"), "pt") as o:
        experts = [k for k in b.keys() if ".experts." in k]
        assert len(experts) == 12
        for name in experts + ["model.layers.0.block_sparse_moe.gate.weight"]:
            assert torch.equal(_raw(b.get_tensor(name)), _raw(o.get_tensor(name)))
        written_bytes = sum(o.get_tensor(k).nbytes for k in o.keys())
        written_names = set(o.keys())

    # What an engine needs for a sharded index identical to transformers' own. (Saved before any
    # forward: bnb's CPU forward repacks the weights and a later save writes another quant state.)
    ref_model.save_pretrained(tmp_path / "ref-sharded", max_shard_size="200KB")
    index = json.loads((tmp_path / "ref-sharded" / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_parameters": plan.total_parameters, "total_size": written_bytes}
    assert set(index["weight_map"]) == written_names

    torch.testing.assert_close(logits(load_checked(tmp_path / "ours")), logits(ref_model), rtol=0, atol=1e-5)


def test_llava_names_follow_transformers(models, tmp_path):
    """LLaVA's in-memory names (model.language_model.*) differ from its on-disk ones (language_model.model.*)."""
    base, settings = models["llava"], QuantSettings("bnb-nf4", double_quant=True)
    cls = LlavaForConditionalGeneration
    ref_model = reference(base, settings, tmp_path / "ref", cls=cls)
    plan = ours(base, settings, tmp_path / "ours", model_class=cls)
    assert_same_checkpoint(tmp_path / "ours", tmp_path / "ref")
    quantized = plan.quantized_names()
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in quantized
    assert "vision_tower.encoder.layers.0.mlp.fc1.weight" in quantized
    assert "language_model.lm_head.weight" not in quantized
    assert plan.tensors["language_model.model.layers.0.mlp.up_proj.weight"].memory_name == (
        "model.language_model.layers.0.mlp.up_proj.weight"
    )
    torch.testing.assert_close(logits(load_checked(tmp_path / "ours", cls), 320), logits(ref_model, 320), rtol=0, atol=1e-5)

    # A plan travels to workers (Ray pickles it) and gives the same tensors there.
    shipped = pickle.loads(pickle.dumps(plan))
    name = "language_model.model.layers.0.mlp.up_proj.weight"
    with safe_open(str(base / "model.safetensors"), "pt") as shard:
        weight = shard.get_tensor(name)
    again, first = shipped.convert(name, weight), plan.convert(name, weight)
    assert set(again) == set(first) and all(torch.equal(_raw(again[k]), _raw(first[k])) for k in first)


def test_gpt2_conv1d_is_quantized_transposed(models, tmp_path):
    base, settings = models["gpt2"], QuantSettings("bnb-nf4")
    reference(base, settings, tmp_path / "ref")
    plan = ours(base, settings, tmp_path / "ours")
    assert plan.tensors["transformer.h.0.attn.c_attn.weight"].transpose
    assert_same_checkpoint(tmp_path / "ours", tmp_path / "ref")


# ---------------------------------------------------------------------------------------------
# per-tensor functions and dequantize
# ---------------------------------------------------------------------------------------------


def test_tensor_functions_and_dequantize():
    torch.manual_seed(0)
    weight = torch.randn(128, 256, dtype=torch.bfloat16)
    name = "model.layers.0.mlp.up_proj.weight"

    nf4 = quantize_tensor_4bit(name, weight, QuantSettings("bnb-nf4", double_quant=True))
    assert set(nf4) == {name} | {f"{name}.{s}" for s in (
        "absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")}
    assert nf4[name].dtype == torch.uint8 and nf4[name].shape == (128 * 256 // 2, 1)
    back = dequantize(name, nf4)
    assert back.dtype == torch.bfloat16 and back.shape == weight.shape
    # nf4's largest gap between levels is ~0.34 of the block absmax: error under half of it
    blocks = weight.float().reshape(-1, 64)
    err = (back.float() - weight.float()).reshape(-1, 64).abs()
    assert (err <= 0.18 * blocks.abs().amax(dim=1, keepdim=True) + 1e-3).all()

    int8 = quantize_tensor_int8(name, weight, QuantSettings("bnb-int8"))
    assert set(int8) == {name, "model.layers.0.mlp.up_proj.SCB", "model.layers.0.mlp.up_proj.weight_format"}
    assert int8[name].dtype == torch.int8 and int8["model.layers.0.mlp.up_proj.SCB"].dtype == torch.float32
    back8 = dequantize(name, int8)
    row_step = int8["model.layers.0.mlp.up_proj.SCB"][:, None] / 127
    assert ((back8 - weight.float()).abs() <= row_step * 0.5 + 1e-2 * weight.float().abs() + 1e-6).all()

    with pytest.raises(QuantizeError):
        quantize_tensor_4bit("model.norm.weight", torch.ones(128), QuantSettings("bnb-nf4"))


# ---------------------------------------------------------------------------------------------
# FP8
# ---------------------------------------------------------------------------------------------


def test_fp8_loads_with_transformers_on_cpu(models, tmp_path):
    base, settings = models["llama-fp8"], QuantSettings("fp8")
    plan = ours(base, settings, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["quantization_config"] == fp8_quantization_config() == plan.quant_config
    assert config["quantization_config"]["quant_method"] == "fp8"
    assert config["quantization_config"]["weight_block_size"] == [128, 128]

    name = "model.layers.0.mlp.down_proj.weight"
    with safe_open(str(tmp_path / "ours/model.safetensors"), "pt") as o, safe_open(str(base / "model.safetensors"), "pt") as b:
        assert "lm_head.weight_scale_inv" not in o.keys() and o.get_tensor("lm_head.weight").dtype == torch.bfloat16
        weight, scale = o.get_tensor(name), o.get_tensor("model.layers.0.mlp.down_proj.weight_scale_inv")
        assert weight.dtype == torch.float8_e4m3fn and weight.shape == (128, 256)
        assert scale.dtype == torch.float32 and scale.shape == (1, 2)
        original = b.get_tensor(name)
    assert torch.equal(dequantize_fp8(weight, scale), dequantize_fp8(*quantize_tensor_fp8(name, original).values()))

    # transformers loads it on CPU by dequantizing to the load dtype (bf16); it must be close to the original.
    loaded = load_checked(tmp_path / "ours")
    original_model = AutoModelForCausalLM.from_pretrained(base, device_map="cpu")
    for key, value in original_model.state_dict().items():
        got = loaded.state_dict()[key]
        assert got.dtype == torch.bfloat16, key
        # e4m3 keeps 3 mantissa bits: <= 1/16 relative rounding, plus subnormals near zero, plus bf16
        tolerance = 0.07 * value.float().abs() + value.float().abs().max() * 2**-9
        assert ((got.float() - value.float()).abs() <= tolerance).all(), key
    close = torch.nn.functional.cosine_similarity(logits(loaded).flatten(), logits(original_model).flatten(), dim=0)
    assert close > 0.99


def test_fp8_mixtral_experts_quantized_per_expert(models, tmp_path):
    """FP8 (unlike bnb) quantizes fused experts; per expert it gives the bytes of the fused op."""
    base, settings = models["mixtral"], QuantSettings("fp8", fp8_block_size=(64, 64))
    plan = ours(base, settings, tmp_path / "ours")
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in plan.quantized_names()
    assert "model.layers.0.block_sparse_moe.gate.weight" not in plan.quantized_names()
    with safe_open(str(tmp_path / "ours/model.safetensors"), "pt") as o:
        assert o.get_tensor("model.layers.0.block_sparse_moe.experts.0.w1.weight").dtype == torch.float8_e4m3fn
        assert o.get_tensor("model.layers.0.block_sparse_moe.experts.0.w1.weight_scale_inv").shape == (4, 2)
    loaded = load_checked(tmp_path / "ours")
    original = AutoModelForCausalLM.from_pretrained(base, device_map="cpu")
    fused = loaded.state_dict()["model.layers.0.mlp.experts.gate_up_proj"].float()
    want = original.state_dict()["model.layers.0.mlp.experts.gate_up_proj"].float()
    assert ((fused - want).abs() <= 0.07 * want.abs() + want.abs().max() * 2**-9).all()

    # The merged op on the fused tensor gives the same bytes as ours per expert.
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize
    from types import SimpleNamespace

    op = Fp8Quantize(SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=[64, 64])))
    with safe_open(str(base / "model.safetensors"), "pt") as b, safe_open(str(tmp_path / "ours/model.safetensors"), "pt") as o:
        prefix = "model.layers.0.block_sparse_moe.experts"
        stacked = torch.stack([torch.cat([b.get_tensor(f"{prefix}.{e}.w1.weight"), b.get_tensor(f"{prefix}.{e}.w3.weight")])
                               for e in range(4)])
        merged = op._quantize_one("gate_up_proj", stacked)
        for e in range(4):
            assert torch.equal(_raw(merged["gate_up_proj"][e, :256]), _raw(o.get_tensor(f"{prefix}.{e}.w1.weight")))
            assert torch.equal(merged["gate_up_proj_scale_inv"][e, 4:], o.get_tensor(f"{prefix}.{e}.w3.weight_scale_inv"))


def test_fp8_refuses_untileable_shapes(models):
    # k_proj is 64x128: not a multiple of the default 128x128 block
    with pytest.raises(QuantizeError, match="k_proj.*FP8 block"):
        plan_quantization(models["llama-bfloat16"], QuantSettings("fp8"))


# ---------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, cuda, match",
    [
        ("hqq", False, "random weights"),
        ("hqq", True, "random weights"),
        ("eetq", False, "CUDA"),
        ("eetq", True, "EetqConfig"),
        ("gptq", True, "calibration.*gptqmodel"),
        ("awq", False, "calibration.*autoawq"),
        ("bnb-nf8", False, "unknown"),
    ],
)
def test_refuse_unsupported(method, cuda, match):
    with pytest.raises(QuantizeError, match=match):
        refuse_unsupported(method, cuda_available=cuda)
    with pytest.raises(QuantizeError):
        QuantSettings(method)


def test_supported_methods_pass_and_errors_are_input_errors():
    from loadgraph.errors import InputError

    for method in ("bnb-nf4", "bnb-fp4", "bnb-int8", "fp8"):
        refuse_unsupported(method, cuda_available=False)
    assert issubclass(QuantizeError, InputError) and issubclass(QuantizeError, ValueError)
    with pytest.raises(QuantizeError, match="blocksize"):
        QuantSettings("bnb-nf4", blocksize=48)


def test_refuses_quantized_base_and_missing_tensors(models, tmp_path):
    base, settings = models["llama-bfloat16"], QuantSettings("bnb-nf4")
    ours(base, settings, tmp_path / "quantized")
    with pytest.raises(QuantizeError, match="already has a quantization_config"):
        plan_quantization(tmp_path / "quantized", settings)

    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    with safe_open(str(base / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(QuantizeError, match="lacks 1 parameter"):
        plan_quantization(broken, settings)
