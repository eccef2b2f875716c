"""The tiny-checkpoint factories: real HF layouts, loadable without loss, and byte-deterministic."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from loadgraph import testing as lt  # noqa: E402
from loadgraph.testing.tiny_models import _auto_model_class  # noqa: E402

SENTENCE = "The engineer merges the weights before lunch."


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def _load(d: Path, kind: str, **kwargs):
    cls = _auto_model_class(lt.tiny_config(kind).model_type)
    return cls.from_pretrained(d, output_loading_info=True, **kwargs)


def _assert_clean(info: dict) -> None:
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info[key], (key, info[key])


def _inputs(kind: str) -> dict[str, torch.Tensor]:
    ids = [lt.BOS_TOKEN_ID, 10, 11, 12, 13, 14, 15]
    if kind != "llava":
        return {"input_ids": torch.tensor([ids])}
    config = lt.tiny_config(kind)
    side = config.vision_config.image_size
    image = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    ids = ids[:1] + [config.image_token_id] * config.image_seq_length + ids[1:]
    return {"input_ids": torch.tensor([ids]), "pixel_values": image}


@pytest.mark.parametrize("kind", lt.KINDS)
def test_tiny_model_roundtrip(kind: str, tmp_path: Path) -> None:
    a = lt.make_tiny_model(kind, tmp_path / "a")
    b = lt.make_tiny_model(kind, tmp_path / "b")
    shards = sorted(p.name for p in a.glob("*.safetensors"))
    assert len(shards) > 1 and (a / "model.safetensors.index.json").is_file()
    index = json.loads((a / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards and index["metadata"]["total_size"] > 0
    assert _files(a) == _files(b), "same seed must give byte-identical files"

    loaded, info = _load(a, kind)
    _assert_clean(info)
    reference = lt.build_tiny_model(kind)
    with torch.no_grad():
        assert torch.equal(loaded(**_inputs(kind)).logits, reference(**_inputs(kind)).logits)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a)
    ids = tok(SENTENCE)["input_ids"]
    assert ids[0] == lt.BOS_TOKEN_ID and max(ids) < lt.tiny_config(kind).get_text_config().vocab_size
    assert tok.decode(ids, skip_special_tokens=True) == SENTENCE
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 3, 0)
    if kind == "llava":
        assert tok.convert_tokens_to_ids(lt.IMAGE_TOKEN) == loaded.config.image_token_id
        assert tok(lt.IMAGE_TOKEN, add_special_tokens=False)["input_ids"] == [lt.IMAGE_TOKEN_ID]


def test_tiny_model_seed_and_dtype(tmp_path: Path) -> None:
    a = lt.make_tiny_model("llama", tmp_path / "a", dtype="bfloat16", seed=1, max_shard_size=None, tokenizer=False)
    b = lt.make_tiny_model("llama", tmp_path / "b", dtype="bfloat16", seed=2, max_shard_size=None, tokenizer=False)
    assert (a / "model.safetensors").is_file() and not (a / "model.safetensors.index.json").exists()
    assert json.loads((a / "config.json").read_text())["dtype"] == "bfloat16"
    assert (a / "model.safetensors").read_bytes() != (b / "model.safetensors").read_bytes()
    model, info = _load(a, "llama")
    _assert_clean(info)
    assert model.dtype == torch.bfloat16


def test_llava_processor_files(tmp_path: Path) -> None:
    d = lt.make_tiny_model("llava", tmp_path / "m", max_shard_size=None)
    config = lt.tiny_config("llava")
    processor = json.loads((d / "processor_config.json").read_text())
    side = config.vision_config.image_size
    assert processor["image_processor"]["crop_size"] == {"height": side, "width": side}
    assert processor["patch_size"] == config.vision_config.patch_size
    if importlib.util.find_spec("PIL") is None:
        pytest.skip("transformers 5 needs PIL (or torchvision) to instantiate CLIPImageProcessor")
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(d)
    image = Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 50, 3), dtype=np.uint8))
    inputs = proc(text=f"{lt.IMAGE_TOKEN} hi", images=image, return_tensors="pt")
    assert int((inputs["input_ids"] == lt.IMAGE_TOKEN_ID).sum()) == config.image_seq_length
    assert tuple(inputs["pixel_values"].shape) == (1, 3, side, side)
    proc.save_pretrained(tmp_path / "resaved")  # what transformers itself writes
    assert (tmp_path / "resaved" / "processor_config.json").read_bytes() == (d / "processor_config.json").read_bytes()


def test_tokenizer_small_vocab(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lt.make_tokenizer(tmp_path, vocab_size=128))
    assert len(tok) <= 128
    ids = tok(SENTENCE)["input_ids"]
    assert max(ids) < 128 and tok.decode(ids, skip_special_tokens=True) == SENTENCE
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<s>user: hi</s>\nassistant: "
    parts = [{"type": "image"}, {"type": "text", "text": " hi"}]
    assert tok.apply_chat_template([{"role": "user", "content": parts}], tokenize=False) == "<s>user: <image> hi</s>\n"


@pytest.mark.parametrize("tie", [False, True])
def test_llama_checkpoint(tie: bool, tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(hidden_size=64, num_layers=2, intermediate_size=96, vocab_size=320, num_heads=4, num_kv_heads=2)
    d = lt.make_llama_checkpoint(tmp_path / "a", max_shard_size="40KB", tie_word_embeddings=tie, **shape)
    again = lt.make_llama_checkpoint(tmp_path / "b", max_shard_size="40KB", tie_word_embeddings=tie, **shape)
    assert _files(d) == _files(again)
    assert len(list(d.glob("model-*-of-*.safetensors"))) > 1
    model, info = LlamaForCausalLM.from_pretrained(d, output_loading_info=True)
    _assert_clean(info)
    assert model.dtype == torch.bfloat16 and torch.equal(model.model.norm.weight, torch.ones(64, dtype=torch.bfloat16))
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 6, 7]])).logits).all()

    # Same layout as transformers' own save_pretrained of a fresh model of that config.
    reference = LlamaForCausalLM(LlamaConfig.from_pretrained(d)).to(torch.bfloat16)
    reference.save_pretrained(tmp_path / "ref", max_shard_size="40KB")
    ref_files = _files(tmp_path / "ref")
    ours = _files(d)
    for name in ("model.safetensors.index.json", "config.json", "generation_config.json"):
        assert ours[name] == ref_files[name], name
    assert {n for n in ours if n.endswith(".safetensors")} == {n for n in ref_files if n.endswith(".safetensors")}

    single = lt.make_llama_checkpoint(tmp_path / "single", tokenizer=False, **shape)
    assert [p.name for p in single.glob("*.safetensors")] == ["model.safetensors"]


ADAPTERS = {
    "default": ("llama", {}),
    "embedding+modules_to_save": (
        "llama",
        {"target_modules": ["q_proj", "v_proj", "embed_tokens"], "modules_to_save": ["lm_head"]},
    ),
    "dora+rslora+patterns bf16": (
        "llama",
        {"use_dora": True, "use_rslora": True, "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"v_proj": 32},
         "dtype": "bfloat16"},
    ),
    "qwen2 bias": ("qwen2", {"bias": "all", "target_modules": ["q_proj", "k_proj", "o_proj"]}),
    "llava": ("llava", {"r": 4}),
    # PEFT 0.21 reaches Mixtral's fused experts (not nn.Linear in transformers 5) via target_parameters.
    "mixtral all-linear": ("mixtral", {}),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {kind: lt.make_tiny_model(kind, root / kind) for kind in ("llama", "qwen2", "llava", "mixtral")}


@pytest.mark.parametrize("case", list(ADAPTERS))
def test_lora_adapter(case: str, bases: dict[str, Path], tmp_path: Path) -> None:
    from peft import PeftModel

    kind, kwargs = ADAPTERS[case]
    out = lt.make_lora_adapter(bases[kind], tmp_path / "a", **kwargs)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    again = lt.make_lora_adapter(bases[kind], tmp_path / "b", **kwargs)
    assert _files(out) == _files(again)

    dtype = getattr(torch, kwargs.get("dtype", "float32"))
    base, _ = _load(bases[kind], kind, dtype=dtype)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, out).merge_and_unload()
    after = merged.state_dict()
    assert set(after) == set(before)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed
    if kind == "mixtral":
        assert any("experts" in k for k in changed)
    if "embed_tokens" in kwargs.get("target_modules", []):
        assert "model.embed_tokens.weight" in changed and "lm_head.weight" in changed


def test_adapter_config_is_process_independent(bases: dict[str, Path], tmp_path: Path) -> None:
    """"all-linear" becomes sets inside PEFT; their saved order must not depend on the hash seed."""
    here = lt.make_lora_adapter(bases["mixtral"], tmp_path / "here")
    code = (
        "import sys; from loadgraph import testing as lt; "
        "lt.make_lora_adapter(sys.argv[1], sys.argv[2])"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "HF_HUB_OFFLINE": "1"}
    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "-c", code, str(bases["mixtral"]), str(tmp_path / "there")],
        check=True, env=env, cwd=root, capture_output=True,
    )
    assert _files(here) == _files(tmp_path / "there")
