"""LLaMA-Factory YAMLs: translation to the native spec, and models made ready to train as it makes them."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from conftest import run_cli, write_spec
from loadgraph.errors import InputError
from loadgraph.testing import make_lora_adapter

IDS = torch.tensor([[1, 17, 42, 99, 7, 3, 250, 31]])


def _translate(doc: dict, trainable: bool = False):
    from loadgraph.llamafactory import translate_doc

    return translate_doc(doc, "lf.yaml", trainable=trainable)


# --------------------------------------------------------------------------------------------
# translation


def test_lora_export_yaml(tmp_path):
    t = _translate({
        "model_name_or_path": "meta-llama/Llama-2-7b-hf", "adapter_name_or_path": "saves/a, saves/b", "template": "llama2",
        "finetuning_type": "lora", "export_dir": "out/merged", "export_size": 2, "export_device": "cpu",
        "export_legacy_format": False, "infer_dtype": "bfloat16", "model_revision": "main",
    })
    assert t.build == {
        "name": "llamafactory", "source": {"model": "meta-llama/Llama-2-7b-hf"}, "dtype": "auto",
        "adapters": [{"path": "saves/a", "mode": "merge"}, {"path": "saves/b", "mode": "merge"}],
        # merged at the source dtype, then cast; the template shapes the exported tokenizer and Modelfile;
        # config.json gets the inference load's use_cache (use_kv_cache) and a composite's hidden_size
        "export": {"path": "out/merged", "max_shard_size": "2GB", "dtype": "bfloat16", "template": "llama2",
                   "use_cache": True, "top_level_hidden_size": True},
    }
    assert t.trainer == [] and t.keys["template"][0] == "build" and "export_device" in t.unused and t.training == {"finetuning_type": "lora"}


def test_qlora_yaml_attaches_or_merges_then_quantizes():
    doc = {"model_name_or_path": "base", "adapter_name_or_path": "saves/qlora", "quantization_bit": 4, "bf16": True}
    t = _translate(doc)
    # Not training: bf16 does not count; infer_optim_dtype(unknown) is fp32 on a host without CUDA.
    host = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float16" if torch.cuda.is_available() else "float32"
    assert t.build["quantize"] == {"method": "bnb-nf4", "double_quant": True, "compute_dtype": host, "quant_storage": host}
    assert t.build["adapters"] == [{"path": "saves/qlora", "mode": "attach"}]  # a quantized model is not merged into
    assert t.build["dtype"] == "auto"  # LLaMA-Factory loads with torch_dtype="auto"
    trained = _translate(doc, trainable=True)
    assert trained.build["quantize"]["compute_dtype"] == trained.build["quantize"]["quant_storage"] == "bfloat16"
    assert "bf16/pure_bf16" in trained.dtype_rule
    exported = _translate({**doc, "export_dir": "out", "quantization_type": "fp4", "double_quantization": False, "infer_dtype": "float16"})
    assert exported.build["adapters"] == [{"path": "saves/qlora", "mode": "merge"}]  # merged first, then quantized
    assert exported.build["quantize"] == {"method": "bnb-fp4", "double_quant": False, "compute_dtype": "float16", "quant_storage": "float16"}
    assert _translate({"model_name_or_path": "b", "quantization_bit": 8}).build["quantize"] == {"method": "bnb-int8"}
    with pytest.raises(InputError, match="single adapter"):
        _translate({**doc, "adapter_name_or_path": "a,b"})


def test_training_translation_resumes_the_last_adapter():
    doc = {"model_name_or_path": "base", "adapter_name_or_path": "a,b", "finetuning_type": "lora"}
    assert [a["mode"] for a in _translate(doc, trainable=True).build["adapters"]] == ["merge", "attach"]
    fresh = _translate({**doc, "create_new_adapter": True}, trainable=True)
    assert [a["mode"] for a in fresh.build["adapters"]] == ["merge", "merge"]
    with pytest.raises(InputError, match="only valid with finetuning_type lora"):
        _translate({**doc, "finetuning_type": "full"}, trainable=True)
    with pytest.raises(InputError, match="LoRA or OFT"):
        _translate({"model_name_or_path": "b", "quantization_bit": 4, "finetuning_type": "freeze"}, trainable=True)


def test_training_keys_and_cutoff_len():
    t = _translate({"model_name_or_path": "b", "finetuning_type": "freeze", "freeze_trainable_layers": 1, "cutoff_len": 4096,
                    "upcast_layernorm": True, "flash_attn": "fa2", "add_tokens": "<a>,<b>", "learning_rate": 1e-4, "dataset": "d"})
    assert t.training["model_max_length"] == 4096 and t.training["upcast_layernorm"] is True
    assert t.trainer == ["cutoff_len", "dataset", "learning_rate"]
    from loadgraph.loading.trainargs import TrainingArgs

    args = TrainingArgs(**t.training)
    assert args.add_tokens == ["<a>", "<b>"] and args.attn_implementation == "flash_attention_2"


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"rope_scaling": "linear"}, "rope_scaling: RoPE scaling"),
        ({"use_unsloth": True}, "use_unsloth"),
        ({"export_quantization_bit": 4, "export_quantization_dataset": "c4"}, "GPTQ export needs calibration"),
        ({"export_legacy_format": True}, "safetensors only"),
        ({"export_hub_model_id": "me/model"}, "does not push to the hub"),
        ({"quantization_bit": 4, "quantization_method": "hqq"}, "HQQ through transformers 5 is broken"),
        ({"quantization_bit": 4, "quantization_method": "eetq"}, "EETQ needs CUDA"),
        ({"quantization_bit": 3}, "use 4 or 8"),
        ({"stage": "rm"}, "value head"),
        ({"lora_rnak": 8}, "'lora_rnak' (did you mean 'lora_rank'?)"),
        ({"export_dir": "out", "add_tokens": "<x>"}, "do not resize the vocabulary"),
        ({"export_dir": "out", "template": "qwen4"}, "unknown LLaMA-Factory template 'qwen4'"),
        ({"export_dir": "out", "template": "chatglm3"}, "llamafactory-cli export fails on it too"),
    ],
)
def test_unsupported_and_unknown_keys_are_named(extra, message):
    from loadgraph.spec import parse_spec

    with pytest.raises(InputError) as err:
        parse_spec(_translate({"model_name_or_path": "b", **extra}).build, "lf.yaml")
    assert message in str(err.value)


def test_harmless_defaults_are_accepted():
    t = _translate({"model_name_or_path": "b", "rope_scaling": None, "use_unsloth": False, "infer_backend": "huggingface",
                    "export_legacy_format": False, "stage": "sft", "use_fast_tokenizer": True})
    assert t.build == {"name": "llamafactory", "source": {"model": "b"}, "dtype": "auto", "verify": False}
    assert "use_fast_tokenizer" in t.unused


def test_trainer_keys_cover_transformers_training_arguments():
    import dataclasses

    from transformers import Seq2SeqTrainingArguments

    from loadgraph.llamafactory_keys import HF_TRAINING_KEYS

    missing = {f.name for f in dataclasses.fields(Seq2SeqTrainingArguments)} - HF_TRAINING_KEYS
    assert not missing, f"add to HF_TRAINING_KEYS: {sorted(missing)}"


def test_parse_spec_warns_about_trainer_keys(models, tmp_path):
    from loadgraph.spec import load_spec_file

    spec = write_spec(tmp_path / "train.yaml", {"model_name_or_path": str(models("llama")), "dataset": "alpaca", "learning_rate": 1e-4})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (target,) = load_spec_file(spec)
    assert any("dataset, learning_rate" in str(w.message) for w in caught)
    assert target.source.model == str(models("llama"))


def test_cli_build_and_plan_explain(models, tmp_path):
    """`loadgraph build` of a LLaMA-Factory LoRA export YAML equals PEFT's merge_and_unload."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = models("llama")
    adapter = make_lora_adapter(base, tmp_path / "saves" / "lora", r=4, lora_alpha=8)
    spec = write_spec(tmp_path / "export.yaml", {
        "model_name_or_path": str(base), "adapter_name_or_path": "saves/lora", "template": "llama3",
        "finetuning_type": "lora", "export_dir": "merged", "export_size": 1, "infer_dtype": "float32",
    })
    plan = run_cli("plan", spec, "--explain", "--cache", tmp_path / "cache")
    assert plan.returncode == 0, plan.stderr
    assert "merge" in plan.stdout and '"template"' in plan.stdout and "LLaMA-Factory" in plan.stdout
    build = run_cli("build", spec, "--executor", "local", "--cache", tmp_path / "cache")
    assert build.returncode == 0, build.stderr
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), str(adapter)).merge_and_unload()
    with torch.no_grad():
        assert torch.equal(merged(IDS).logits, ref(IDS).logits)
    bad = write_spec(tmp_path / "bad.yaml", {"model_name_or_path": str(base), "shift_attn": True})
    proc = run_cli("build", bad, "--executor", "local", "--cache", tmp_path / "cache")
    assert proc.returncode == 2 and "shift_attn" in proc.stderr


# --------------------------------------------------------------------------------------------
# training preparation: which parameters train, in which dtype, with checkpointing


def _trainable(model) -> dict[str, torch.dtype]:
    return {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}


def _load(doc: dict, cache, **kw):
    from loadgraph import load

    return load(doc, trainable=True, cache=cache, **kw)


def test_lora_all_targets_every_linear_but_the_head(models, cache_dir):
    loaded = _load({"model_name_or_path": str(models("llama", "bfloat16")), "finetuning_type": "lora", "lora_target": "all",
                    "lora_rank": 4, "bf16": True}, cache_dir)
    model = loaded.model
    trainable = _trainable(model)
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert set(trainable.values()) == {torch.float32}  # trainable params upcast
    assert {p.dtype for n, p in model.named_parameters() if not p.requires_grad} == {torch.bfloat16}
    assert model.peft_config["default"].lora_alpha == 8 and model.peft_config["default"].r == 4  # alpha = 2 * rank
    assert model.base_model.model.is_gradient_checkpointing and model.config.use_cache is False
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_qlora_quantized_base_with_fp32_lora(models, cache_dir):
    import bitsandbytes as bnb

    loaded = _load({"model_name_or_path": str(models("mistral")), "finetuning_type": "lora", "quantization_bit": 4,
                    "lora_target": "q_proj,v_proj", "fp16": True}, cache_dir)
    model = loaded.model
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q.base_layer, bnb.nn.Linear4bit) and not q.base_layer.weight.requires_grad
    trainable = _trainable(model)
    assert trainable and set(trainable.values()) == {torch.float32}
    assert all(("q_proj" in n or "v_proj" in n) and ".lora_" in n for n in trainable)
    model(input_ids=IDS, labels=IDS).loss.backward()


def test_freeze_trains_the_last_layers(models, cache_dir):
    loaded = _load({"model_name_or_path": str(models("qwen2", "bfloat16")), "finetuning_type": "freeze", "freeze_trainable_layers": 1,
                    "freeze_extra_modules": "embed_tokens", "bf16": True, "upcast_layernorm": True}, cache_dir)
    trainable = _trainable(loaded.model)
    assert trainable and all(n.startswith("model.layers.1.") or n == "model.embed_tokens.weight" for n in trainable)
    assert "model.embed_tokens.weight" in trainable and "model.layers.1.mlp.down_proj.weight" in trainable
    assert set(trainable.values()) == {torch.float32}
    frozen = {n: p.dtype for n, p in loaded.model.named_parameters() if not p.requires_grad}
    assert frozen["model.layers.0.input_layernorm.weight"] == torch.float32  # upcast_layernorm
    assert frozen["model.layers.0.self_attn.q_proj.weight"] == torch.bfloat16
    with pytest.raises(ValueError, match="not found"):
        _load({"model_name_or_path": str(models("qwen2")), "finetuning_type": "freeze", "freeze_trainable_modules": "attention"}, cache_dir)


def test_full_and_disabled_checkpointing(models, cache_dir):
    loaded = _load({"model_name_or_path": str(models("gemma", "bfloat16")), "finetuning_type": "full", "disable_gradient_checkpointing": True,
                    "pure_bf16": True, "bf16": True}, cache_dir)
    params = dict(loaded.model.named_parameters())
    assert all(p.requires_grad for p in params.values())
    assert {p.dtype for p in params.values()} == {torch.bfloat16}  # pure_bf16: no fp32 upcast
    assert not loaded.model.is_gradient_checkpointing and loaded.model.config.use_cache is False  # LLaMA-Factory: never while training


def test_oft(models, cache_dir):
    loaded = _load({"model_name_or_path": str(models("llama")), "finetuning_type": "oft", "oft_target": "q_proj,v_proj"}, cache_dir)
    trainable = _trainable(loaded.model)
    assert trainable and all(".oft_" in n for n in trainable)


def test_added_tokens_resize_and_train_embeddings(models, cache_dir):
    loaded = _load({"model_name_or_path": str(models("llama")), "finetuning_type": "lora", "add_special_tokens": "<tool>",
                    "add_tokens": "<a>", "cutoff_len": 8192}, cache_dir)
    tok, model = loaded.tokenizer, loaded.model
    assert "<tool>" in tok.get_vocab() and len(tok) == 514 and tok.model_max_length == 8192
    assert model.get_input_embeddings().weight.shape[0] == 576  # padded to a multiple of 64
    trainable = _trainable(model)
    assert any("embed_tokens.modules_to_save" in n for n in trainable) and any("lm_head.modules_to_save" in n for n in trainable)


def test_llava_lora_leaves_vision_and_projector_frozen(models, cache_dir):
    loaded = _load({"model_name_or_path": str(models("llava")), "finetuning_type": "lora"}, cache_dir)
    trainable = _trainable(loaded.model)
    assert trainable and all("language_model" in n for n in trainable)
    assert loaded.processor is not None
    full = _load({"model_name_or_path": str(models("llava")), "finetuning_type": "full", "freeze_multi_modal_projector": False}, cache_dir)
    names = _trainable(full.model)
    assert any("multi_modal_projector" in n for n in names) and not any("vision_tower" in n for n in names)


def test_resume_attached_adapter(models, tmp_path, cache_dir):
    from safetensors.torch import load_file

    base = models("llama")
    adapter = make_lora_adapter(base, tmp_path / "lora", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    loaded = _load({"model_name_or_path": str(base), "adapter_name_or_path": str(adapter), "finetuning_type": "lora"}, cache_dir)
    assert loaded.artifact.manifest["stage"] == "attach"
    model = loaded.model
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    trainable = _trainable(model)
    assert len(trainable) == len(saved)  # the resumed adapter is what trains, not a new one
    a = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert torch.equal(a, saved["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].float())


def test_native_spec_with_training_overrides(models, cache_dir):
    loaded = _load({"source": {"model": str(models("llama"))}, "verify": False}, cache_dir,
                   training={"finetuning_type": "lora", "lora_target": ["down_proj"], "lora_rank": 2})
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in _trainable(loaded.model)} == {"down_proj"}
    inference = __import__("loadgraph").load({"source": {"model": str(models("llama"))}, "verify": False}, cache=cache_dir)
    assert inference.training is None and not any(p.requires_grad for p in inference.model.parameters())
    assert inference.key == loaded.key


def test_explain_lists_every_destination(tmp_path):
    from loadgraph.llamafactory import explain_file

    path = write_spec(tmp_path / "lf.yaml", {"model_name_or_path": "b", "lora_rank": 16, "dataset": "d", "cache_dir": "/x"})
    doc = explain_file(path).explain()
    assert doc["training"] == {"lora_rank": 16} and doc["trainer"] == ["dataset"] and "cache_dir" in doc["unused"]
    assert json.dumps(doc)  # JSON-safe for --explain
    assert explain_file(write_spec(tmp_path / "native.yaml", {"source": {"model": "b"}})) is None


def test_qlora_inference_attaches_the_adapter(models, tmp_path, cache_dir):
    """LLaMA-Factory never merges into a quantized model: the adapter rides along as a PeftModel."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from loadgraph import load

    base = models("llama")
    adapter = make_lora_adapter(base, tmp_path / "qlora", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    loaded = load({"model_name_or_path": str(base), "adapter_name_or_path": str(adapter), "quantization_bit": 4}, cache=cache_dir)
    assert loaded.artifact.manifest["stage"] == "attach" and loaded.artifact.attached_adapters
    assert isinstance(loaded.model, PeftModel) and not any(p.requires_grad for p in loaded.model.parameters())
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    b = loaded.model.base_model.model.model.layers[1].self_attn.v_proj.lora_B["default"].weight
    assert torch.equal(b, saved["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].float())
    with torch.no_grad():
        assert torch.isfinite(loaded.model(input_ids=IDS).logits).all()


@pytest.mark.parametrize("name, want", [
    # Template's jinja: system slot, then each turn (eos slots become the eos token's text).
    ("default", "System: Be brief.{eos}\nHuman: hi{eos}\nAssistant:hello{eos}\n"),
    # Llama2Template's jinja: the system slot fused into the first user turn (whose slots start with bos).
    ("llama2", "{bos}[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nhi [/INST]hello{eos}"),
])
def test_jinja_chat_template_renders_the_slots(name, want, tmp_path):
    """The jinja an export writes (make peer-check compares its bytes with llamafactory-cli export's)."""
    from transformers import AutoTokenizer

    from loadgraph.llamafactory_templates import TEMPLATES
    from loadgraph.stages.export_chat import jinja_template
    from loadgraph.testing import make_tokenizer

    tok = AutoTokenizer.from_pretrained(str(make_tokenizer(tmp_path, 300)))
    tok.chat_template = jinja_template(tok, {"name": name, **TEMPLATES[name]})
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert tok.apply_chat_template(messages, tokenize=False) == want.format(eos=tok.eos_token, bos=tok.bos_token or "")
