"""`load_pretrained_model`: LLaVA's behaviour, checked against transformers and PEFT themselves."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from conftest import peft010_fp16_merged
from loadgraph.testing import KINDS, make_lora_adapter

IDS = torch.tensor([[1, 17, 42, 99, 7, 3, 250, 31, 8, 64]])


def _load(*args, **kwargs):
    from loadgraph import load_pretrained_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = load_pretrained_model(*args, **kwargs)
    return out, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def _reference(path: Path, dtype: torch.dtype, kind: str):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    cls = AutoModelForImageTextToText if kind == "llava" else AutoModelForCausalLM
    return cls.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa").eval()


def _logits(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**({"input_ids": IDS} | inputs)).logits


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_equals_transformers(kind, models, cache_dir):
    """LLaVA's defaults (float16, flash_attention_2, device_map auto) on a machine without flash-attn."""
    base = models(kind)
    (tokenizer, model, image_processor, context_len), warned = _load(str(base), None, f"tiny-{kind}", cache=cache_dir)
    fallback = [w for w in warned if "flash_attention_2" in w]
    assert len(fallback) == 1 and "sdpa" in fallback[0]
    assert model.config._attn_implementation == "sdpa" and model.dtype == torch.float16
    assert context_len == 256  # max_position_embeddings (of the text config for LLaVA)
    ref = _reference(base, torch.float16, kind)
    expected = _logits(ref)
    got = _logits(model)
    if kind == "llava":
        # LLaVA adds "<im_patch>" (mm_use_im_patch_token defaults to True) and grows the vocabulary.
        assert "<im_patch>" in tokenizer.get_vocab() and "<im_start>" not in tokenizer.get_vocab()
        assert got.shape[-1] == expected.shape[-1] + 1
        got = got[..., : expected.shape[-1]]
        from PIL import Image

        pixels = image_processor(images=Image.new("RGB", (40, 48), (120, 30, 200)), return_tensors="pt")["pixel_values"]
        assert tuple(pixels.shape) == (1, 3, 32, 32)
        ids = torch.tensor([[1] + [4] * 16 + [17, 42]])  # 16 image tokens (id 4) for a 32x32 image
        with torch.no_grad():
            with_image = model(input_ids=ids, pixel_values=pixels.half()).logits[..., : expected.shape[-1]]
            ref_image = ref(input_ids=ids, pixel_values=pixels.half()).logits
        assert torch.equal(with_image, ref_image)
    else:
        assert image_processor is None
    assert torch.equal(got, expected)


def test_lora_merge_equals_peft_and_second_call_is_cached(models, tmp_path, cache_dir, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = models("llama")
    adapter = make_lora_adapter(base, tmp_path / "lora", r=8, lora_alpha=16)
    args = dict(model_path=str(adapter), model_base=str(base), model_name="llama-lora", device_map="cpu", cache=cache_dir)
    t0 = time.perf_counter()
    (_, model, image_processor, _), _ = _load(**args)
    first = time.perf_counter() - t0
    assert {"merge", "verify"} <= set(model.loadgraph_artifact.built_stages)

    # LLaVA's builder merges with PEFT 0.10, which rounds the fp16 delta before adding it: so does the drop-in.
    ref = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float16)
    ref.load_state_dict(peft010_fp16_merged(base, adapter))
    ours = model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in ref.state_dict().items())
    assert torch.equal(_logits(model), _logits(ref.eval()))  # float16 merge, bit for bit
    current = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float16), str(adapter)).merge_and_unload()
    assert not all(torch.equal(ours[k], v) for k, v in current.state_dict().items())  # today's PEFT rounds once

    objects = sorted(p.name for p in (cache_dir / "objects").iterdir())
    t0 = time.perf_counter()
    (_, again, _, _), _ = _load(**args)
    second = time.perf_counter() - t0
    assert again.loadgraph_artifact.built_stages == [] and again.loadgraph_artifact.key == model.loadgraph_artifact.key
    assert sorted(p.name for p in (cache_dir / "objects").iterdir()) == objects
    assert torch.equal(_logits(again), _logits(model))
    assert second < first
    with capsys.disabled():
        print(f"\n[timing] LoRA load_pretrained_model: first call {first:.2f}s, second (cached) {second:.2f}s")


def test_lora_float32_equals_peft(models, tmp_path, cache_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = models("mistral")
    adapter = make_lora_adapter(base, tmp_path / "lora", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    (_, model, _, _), _ = _load(str(adapter), str(base), "mistral-lora", torch_dtype="float32", attn_implementation="sdpa", cache=cache_dir)
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), str(adapter)).merge_and_unload()
    assert torch.equal(_logits(model), _logits(ref.eval()))


def test_lora_name_without_base_warns(models, cache_dir):
    (_, model, _, _), warned = _load(str(models("llama")), None, "llama-lora", attn_implementation="sdpa", cache=cache_dir)
    assert any("`lora` in model name but no `model_base`" in w for w in warned)
    assert type(model).__name__ == "LlamaForCausalLM"


def test_adapter_without_base_is_refused(models, tmp_path, cache_dir):
    from loadgraph.loading.dispatch import LoadingError

    adapter = make_lora_adapter(models("llama"), tmp_path / "lora")
    with pytest.raises(LoadingError, match="pass its base as model_base"):
        _load(str(adapter), None, "llama", cache=cache_dir)


def _llava_projector(tmp_path: Path, fmt: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """A LLaVA pretraining-stage output: mm_projector weights under LLaVA's original names."""
    gen = torch.Generator().manual_seed(7)
    # tiny llava: vision hidden 32 -> text hidden 64, two linear layers (mm_projector.0 / .2)
    weights = {
        "model.mm_projector.0.weight": torch.randn(64, 32, generator=gen),
        "model.mm_projector.0.bias": torch.randn(64, generator=gen),
        "model.mm_projector.2.weight": torch.randn(64, 64, generator=gen),
        "model.mm_projector.2.bias": torch.randn(64, generator=gen),
    }
    out = tmp_path / f"llava-pretrain-{fmt}"
    out.mkdir()
    if fmt == "bin":
        torch.save(weights, out / "mm_projector.bin")
    else:
        from safetensors.torch import save_file

        save_file({k.replace("model.mm_projector.0", "multi_modal_projector.linear_1").replace("model.mm_projector.2", "multi_modal_projector.linear_2"): v for k, v in weights.items()}, str(out / "mm_projector.safetensors"))
    return out, weights


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_projector_only_checkpoint_loads_onto_base(fmt, models, tmp_path, cache_dir):

    projector, weights = _llava_projector(tmp_path, fmt)
    base = models("llava")
    # LLaVA's own mm_projector.bin loads without allow_pickle (weights_only=True, one notice)
    (_, model, image_processor, _), _ = _load(
        str(projector), str(base), "llava-v1.5-7b-pretrain", torch_dtype="float32", attn_implementation="sdpa", cache=cache_dir,
    )
    proj = model.model.multi_modal_projector
    assert torch.equal(proj.linear_1.weight, weights["model.mm_projector.0.weight"])
    assert torch.equal(proj.linear_2.bias, weights["model.mm_projector.2.bias"])
    assert image_processor is not None


def test_4bit_is_nf4_and_8bit_exclusive(models, tmp_path, cache_dir):
    import bitsandbytes as bnb

    from loadgraph.loading.dispatch import LoadingError

    base = models("qwen2")
    with pytest.raises(ValueError, match="exclusive"):
        _load(str(base), None, "qwen", load_8bit=True, load_4bit=True, cache=cache_dir)
    (_, model, _, _), _ = _load(str(base), None, "qwen-7b", load_4bit=True, attn_implementation="sdpa", device_map="cpu", cache=cache_dir)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.quant_state.quant_type == "nf4"
    assert layer.weight.quant_state.nested  # LLaVA asks for double quantization
    assert {"quantize", "verify"} <= set(model.loadgraph_artifact.built_stages)
    ref = _logits(_reference(base, torch.float16, "qwen2")).float()
    got = _logits(model).float()
    assert ((got - ref).norm() / ref.norm()).item() < 0.35
    (_, again, _, _), _ = _load(str(base), None, "qwen-7b", load_4bit=True, attn_implementation="sdpa", device_map="cpu", cache=cache_dir)
    assert again.loadgraph_artifact.built_stages == []
    assert issubclass(LoadingError, ValueError)


def test_8bit(models, cache_dir):
    import bitsandbytes as bnb

    (_, model, _, _), _ = _load(str(models("llama")), None, "llama", load_8bit=True, attn_implementation="sdpa", device_map="cpu", cache=cache_dir)
    assert isinstance(model.model.layers[1].mlp.down_proj, bnb.nn.Linear8bitLt)
    assert not isinstance(model.lm_head, bnb.nn.Linear8bitLt)  # the head stays unquantized


def test_dtype_and_device_map_arguments(models, cache_dir):
    from loadgraph.loading.dispatch import LoadingError

    base = str(models("gemma"))
    (_, model, _, _), _ = _load(base, None, "gemma", torch_dtype="bfloat16", device_map={"": "cpu"}, attn_implementation="eager", cache=cache_dir)
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="torch_dtype"):
        _load(base, None, "gemma", torch_dtype="float8", cache=cache_dir)
    if not torch.cuda.is_available():
        with pytest.raises(LoadingError, match="no CUDA device"):
            _load(base, None, "gemma", device_map="cuda", cache=cache_dir)


def test_customized_then_overwrite_config(models, cache_dir):
    from transformers import AutoConfig

    base = models("llama")
    custom = AutoConfig.from_pretrained(str(base))
    custom.rms_norm_eps = 0.1
    custom.hidden_act = "gelu"
    (_, model, _, _), _ = _load(
        str(base), None, "llama", torch_dtype="float32", attn_implementation="sdpa", cache=cache_dir,
        customized_config=custom, overwrite_config={"rms_norm_eps": 0.5},
    )
    assert model.config.rms_norm_eps == 0.5 and model.model.norm.variance_epsilon == 0.5  # overwrite last
    assert model.config.hidden_act == "gelu" and type(model.model.layers[0].mlp.act_fn).__name__ == "GELUActivation"
    assert custom.rms_norm_eps == 0.1  # the caller's config is not mutated

    (_, llava, _, ctx), _ = _load(
        str(models("llava")), None, "llava-tiny", torch_dtype="float32", attn_implementation="sdpa", cache=cache_dir,
        overwrite_config={"rms_norm_eps": 0.25, "mm_use_im_start_end": True, "max_sequence_length": 4096},
    )
    assert llava.config.text_config.rms_norm_eps == 0.25  # a text-model key goes to the text config
    assert ctx == 4096  # max_sequence_length wins over max_position_embeddings
    tokenizer_vocab = llava.get_input_embeddings().weight.shape[0]
    assert tokenizer_vocab == 512 + 3  # <im_patch>, <im_start>, <im_end>


def test_architecture_override_that_breaks_weights_is_refused(models, cache_dir):
    from loadgraph.errors import BuildError

    with pytest.raises(BuildError, match="could not place every tensor"):
        _load(str(models("llama")), None, "llama", torch_dtype="float32", attn_implementation="sdpa", cache=cache_dir,
              overwrite_config={"num_hidden_layers": 1})


def test_kwargs_pass_through_and_source_kwargs(models, cache_dir):
    (_, model, _, _), _ = _load(str(models("llama")), None, "llama", attn_implementation="sdpa", cache=cache_dir, output_hidden_states=True)
    assert model.config.output_hidden_states is True

    from loadgraph.loading.loader import plan_load

    plan = plan_load(str(models("llama")), None, "llama", load_8bit=False, load_4bit=False, dtype="float16", multimodal=False,
                     source_kwargs={"revision": "v1.0"}, verify=True)
    assert plan.spec.source.revision == "v1.0"  # describes the source: it enters the build, not from_pretrained


def test_name_dispatch(models, tmp_path, cache_dir):
    from loadgraph.loading.dispatch import LoadingError, SUPPORTED_KEYWORDS, read_config, resolve_architecture

    llama = read_config(models("llama"), "x")
    llava = read_config(models("llava"), "x")
    mixtral = read_config(models("mixtral"), "x")
    assert resolve_architecture("vicuna-7b", llama, "c").family == "llama"
    assert resolve_architecture("Mixtral-8x7B", mixtral, "c").family == "mixtral"
    arch = resolve_architecture("llava-v1.5-7b", llava, "c")
    assert arch.multimodal and arch.family == "llama" and arch.auto_class_name == "AutoModelForImageTextToText"
    # Beyond LLaVA: a name without keywords takes config.json's architecture.
    arch = resolve_architecture("my-finetune", mixtral, "c")
    assert arch.family == "mixtral" and not arch.from_name
    assert resolve_architecture("checkpoint-300", llava, "c").multimodal
    with pytest.raises(ValueError, match="names the 'mistral' family"):
        resolve_architecture("mistral-7b", llama, "c")
    with pytest.raises(ValueError, match="asks for a LLaVA"):
        resolve_architecture("llava-7b", llama, "c")
    original = {"model_type": "llava_llama", "mm_vision_tower": "openai/clip-vit-large-patch14-336", "architectures": ["LlavaLlamaForCausalLM"]}
    with pytest.raises(ValueError, match="original LLaVA checkpoint"):
        resolve_architecture("llava-v1.5-7b", original, "c")
    with pytest.raises(ValueError, match="llava-v1.6-mistral"):
        resolve_architecture("llava-v1.6-mistral-7b", llava, "c")  # a Llama text model under a mistral name

    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=64)).save_pretrained(gpt2)
    with pytest.raises(ValueError) as err:
        _load(str(gpt2), None, "my-model", cache=cache_dir)
    for keyword in SUPPORTED_KEYWORDS:
        assert keyword in str(err.value)
    assert issubclass(LoadingError, ValueError)


def test_context_length_rule():
    from types import SimpleNamespace

    from loadgraph.loading.options import context_length

    assert context_length(SimpleNamespace(max_sequence_length=4096, max_position_embeddings=2)) == 4096
    assert context_length(SimpleNamespace(max_position_embeddings=8192)) == 8192
    assert context_length(SimpleNamespace()) == 2048


def test_model_name_from_path():
    from loadgraph.loading.dispatch import model_name_from_path

    assert model_name_from_path("/ckpt/llava-v1.5-7b/") == "llava-v1.5-7b"
    assert model_name_from_path("/ckpt/llava-lora/checkpoint-500") == "llava-lora_checkpoint-500"


def test_import_is_lazy_and_exposes_loader():
    code = (
        "import sys, loadgraph; assert 'torch' not in sys.modules, 'import loadgraph pulled torch';"
        "f = loadgraph.load_pretrained_model; g = loadgraph.load; print(f.__module__, g.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["loadgraph.loading.loader", "loadgraph.loading.training"]


def test_executor_argument_is_checked(models, cache_dir):
    with pytest.raises(ValueError, match="unknown executor"):
        _load(str(models("llama")), None, "llama", executor="spark", cache=cache_dir)


def test_artifact_is_recorded(models, cache_dir):
    (_, model, _, _), _ = _load(str(models("llama")), None, "llama", attn_implementation="sdpa", cache=cache_dir)
    art = model.loadgraph_artifact
    manifest = json.loads((art.path / "manifest.json").read_text())
    assert manifest["key"] == art.key and art.path.parent == cache_dir / "objects"


def test_llava_lora_with_non_lora_trainables(models, tmp_path, cache_dir):
    """LLaVA's LoRA checkpoints carry the projector, trained alongside, in non_lora_trainables.bin."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    base = models("llava")
    adapter = make_lora_adapter(base, tmp_path / "llava-v1.5-7b-lora", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    gen = torch.Generator().manual_seed(3)
    trainables = {"base_model.model.model.mm_projector.0.weight": torch.randn(64, 32, generator=gen)}
    torch.save(trainables, adapter / "non_lora_trainables.bin")
    (_, model, processor, _), _ = _load(str(adapter), str(base), "llava-v1.5-7b-lora", torch_dtype="float32",
                                        attn_implementation="sdpa", cache=cache_dir, allow_pickle=True)
    assert torch.equal(model.model.multi_modal_projector.linear_1.weight, trainables["base_model.model.model.mm_projector.0.weight"])
    ref = AutoModelForImageTextToText.from_pretrained(str(base), dtype=torch.float32)
    ref = PeftModel.from_pretrained(ref, str(adapter)).merge_and_unload().eval()
    assert torch.equal(model.model.language_model.layers[1].self_attn.q_proj.weight, ref.model.language_model.layers[1].self_attn.q_proj.weight)
    assert processor is not None
