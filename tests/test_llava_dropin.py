"""LLaVA drop-in: LLaVA-format checkpoints (full and LoRA, every family) through load_pretrained_model.

Fixtures are written in LLaVA's on-disk format by loadgraph.testing_llava; `make llava-check`
compares the same fixtures against LLaVA's real builder.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loadgraph import load_pretrained_model
from loadgraph.testing_llava import FAMILIES, VOCAB, image_tensor, make_fixture, prompt_ids


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("llava-dropin")


def _load(fx: dict, cache: Path, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = load_pretrained_model(fx["model_path"], fx["model_base"], fx["model_name"], device="cpu", use_flash_attn=True, cache=cache, **kw)
    return out, [str(w.message) for w in caught]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_loads_with_llava_api(family, lora, root):
    fx = make_fixture(root / family, family, lora=lora)
    (tokenizer, model, image_processor, context_len), notes = _load(fx, root / "cache")
    assert type(model).__name__ == FAMILIES[family][2]
    assert model.get_vision_tower().is_loaded and model.get_vision_tower().image_processor is image_processor
    model.get_vision_tower().load_model()  # LLaVA's scripts call it when not loaded: a no-op here
    assert model.get_model().mm_projector is model.model.multi_modal_projector
    side = model.config.vision_config.image_size
    ids = prompt_ids(tokenizer)
    assert (ids == -200).sum() == 1
    logits = model(ids, images=image_tensor(side).half(), image_sizes=[(side, side)]).logits
    patches = (side // model.config.vision_config.patch_size) ** 2
    assert logits.shape == (1, ids.shape[1] - 1 + patches, VOCAB)  # LLaVA's width: no <image> row, no pad to 64
    out = model.generate(ids, images=image_tensor(side).half(), image_sizes=[(side, side)], do_sample=False, max_new_tokens=4)
    assert out.shape == (1, 5) and torch.isfinite(logits).all()
    if lora:
        assert sum("non_lora_trainables.bin" in n for n in notes) == 1  # one notice, no opt-in
        trainables = torch.load(Path(fx["model_path"]) / "non_lora_trainables.bin", weights_only=True)
        key = next(k for k in trainables if k.endswith("mm_projector.2.weight"))
        assert torch.equal(model.model.multi_modal_projector.linear_2.weight, trainables[key])
        _check_lora_is_peft_merge(fx, model)
        assert "merge" in model.loadgraph_artifact.built_stages or not model.loadgraph_artifact.built_stages
    again, _ = _load(fx, root / "cache")
    assert again[1].loadgraph_artifact.built_stages == []  # second call: every node from the cache


def _check_lora_is_peft_merge(fx: dict, model) -> None:
    """The language model equals PEFT 0.10's fp16 merge (LLaVA's builder) of the adapter onto model_base."""
    from conftest import peft010_fp16_merged

    mine = model.state_dict()
    for name, tensor in peft010_fp16_merged(fx["model_base"], fx["model_path"]).items():
        ours = mine["lm_head.weight" if name == "lm_head.weight" else "model.language_model." + name.removeprefix("model.")]
        assert torch.equal(ours, tensor), name


@pytest.mark.parametrize("projector", ["linear", "mlp3x_gelu"])
def test_projector_depths(projector, root):
    fx = make_fixture(root / projector, "llama", lora=False, projector=projector)
    (_, model, _, _), _ = _load(fx, root / "cache")
    state = load_file(str(Path(fx["model_path"]) / "model.safetensors"))
    proj = model.model.multi_modal_projector
    if projector == "linear":
        assert torch.equal(proj.linear_1.weight, state["model.mm_projector.weight"]) and not hasattr(proj, "linear_2")
    else:
        assert torch.equal(proj.linear_3.bias, state["model.mm_projector.4.bias"])


def test_refusals(root, tmp_path):
    from loadgraph.loading.dispatch import LoadingError

    fx = make_fixture(root / "refuse", "llama", lora=True)
    with pytest.raises(LoadingError, match="model_base"):
        load_pretrained_model(fx["model_path"], None, fx["model_name"], cache=tmp_path / "c")
    mpt = tmp_path / "llava-mpt"
    mpt.mkdir()
    config = json.loads((Path(fx["model_path"]) / "config.json").read_text())
    (mpt / "config.json").write_text(json.dumps({**config, "model_type": "llava_mpt", "architectures": ["LlavaMptForCausalLM"]}))
    from loadgraph.errors import InputError

    with pytest.raises(InputError, match="MosaicML"):
        load_pretrained_model(str(mpt), None, "llava-mpt-7b", cache=tmp_path / "c")
    pickled = tmp_path / "vicuna-pickled"
    pickled.mkdir()
    torch.save({"w": torch.zeros(2)}, pickled / "pytorch_model.bin")
    (pickled / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(InputError, match=r"allow_pickle=True"):
        load_pretrained_model(str(pickled), None, "vicuna-7b", cache=tmp_path / "c")
    with pytest.raises(ValueError, match="prefetch"):
        load_pretrained_model("nobody-org/llava-none", None, "llava-none", cache=tmp_path / "c")


def test_overrides_in_llava_vocabulary(root):
    """overwrite_config / customized_config keys as LLaVA spells them reach transformers' names."""
    from loadgraph.loading.dispatch import LoadingError

    fx = make_fixture(root / "overrides", "llama", lora=False)
    legacy = {"type": "linear", "factor": 2.0}
    (tokenizer, model, _, _), _ = _load(fx, root / "cache", overwrite_config={"mm_vision_select_layer": -1, "mm_vision_select_feature": "cls_patch",
                                                                       "rope_scaling": legacy})
    text = model.config.text_config
    assert (model.config.vision_feature_layer, model.config.vision_feature_select_strategy) == (-1, "full")
    assert text.rope_parameters["rope_type"] == "linear" and text.rope_parameters["factor"] == 2.0 and text.rope_parameters["rope_theta"] > 0
    rotary = model.model.language_model.rotary_emb
    assert rotary.rope_type == "linear" and rotary.attention_scaling == 1.0
    side = model.config.vision_config.image_size
    ids = prompt_ids(tokenizer)
    logits = model(ids, images=image_tensor(side).half()).logits
    assert logits.shape[1] == ids.shape[1] - 1 + (side // model.config.vision_config.patch_size) ** 2 + 1  # cls_patch keeps CLS
    # customized_config as LLaVA's config.json dict: only what differs from the checkpoint's applies
    custom = {**json.loads((Path(fx["model_path"]) / "config.json").read_text()), "mm_vision_select_layer": -3}
    (_, model, _, _), _ = _load(fx, root / "cache", customized_config=custom, overwrite_config={"rope_scaling": None})
    assert model.config.vision_feature_layer == -3 and model.config.text_config.rope_parameters["rope_type"] == "default"
    with pytest.raises(LoadingError, match="rope_scaling"):
        _load(fx, root / "cache", overwrite_config={"rope_scaling": {"type": "linear"}})
    from loadgraph.errors import InputError

    with pytest.raises(InputError, match="mm_projector_type"):
        _load(fx, root / "cache", overwrite_config={"mm_projector_type": "linear"})



def test_slow_tokenizer_where_llava_asks_use_fast_false(root):
    """A tokenizer.model-only checkpoint (Vicuna, llava-v1.5): LLaVA's builder gets transformers 4's slow
    LlamaTokenizer; here LlamaSlowTokenizer (sentencepiece), whose ids are sentencepiece's own."""
    import sentencepiece as spm

    from loadgraph.loading.slow_tokenizer import LlamaSlowTokenizer

    fx = make_fixture(root / "spm", "llama", lora=False, sentencepiece=True)
    (tokenizer, model, _, _), _ = _load(fx, root / "cache")
    assert isinstance(tokenizer, LlamaSlowTokenizer) and not tokenizer.is_fast
    sp = spm.SentencePieceProcessor(model_file=str(Path(fx["model_path"]) / "tokenizer.model"))
    # BOS, no EOS, sentencepiece's dummy prefix; a leading space stays a piece (transformers 5's LlamaTokenizer drops it)
    for text in ("The cat sat on 12 mats.\nWhat next?", " leading space"):
        assert tokenizer(text).input_ids == [sp.bos_id(), *sp.encode(text)], text
        assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text
    ids = prompt_ids(tokenizer)
    side = model.config.vision_config.image_size
    assert model.generate(ids, images=image_tensor(side).half(), do_sample=False, max_new_tokens=2).shape == (1, 3)
    from loadgraph.loading.loader import wants_slow_tokenizer

    # LLaVA's builder: use_fast=False but for MPT and a full LLaVA-Mistral (name, model_base given, multimodal)
    assert [wants_slow_tokenizer(*a) for a in (("llava-mistral-7b", False, True), ("llava-mistral-7b-lora", True, True),
                                               ("llava-mpt-7b", False, True), ("vicuna-7b", False, False))] == [False, True, False, True]


def test_anyres_llava_next(root):
    """LLaVA-1.6: image_newline on transformers' LlavaNext; a crop grid chosen from LLaVA's [width, height]
    pinpoints, each grid row closed by image_newline. (The LoRA form, newline from non_lora_trainables: llava-check.)"""
    from transformers import LlavaNextForConditionalGeneration

    fx = make_fixture(root / "anyres", "llama", lora=False, anyres=True)
    (tokenizer, model, _, _), _ = _load(fx, root / "cache")
    assert isinstance(model, LlavaNextForConditionalGeneration) and type(model).__name__ == "LlavaLlamaForCausalLM"
    assert torch.equal(model.model.image_newline, load_file(str(Path(fx["model_path"]) / "model.safetensors"))["model.image_newline"])
    side = model.config.vision_config.image_size
    wide, tall = (3 * side + 2, side - 10), (side - 10, 3 * side + 2)  # PIL sizes (width, height)
    # the [96, 32] pinpoint fits the wide picture: a base image + 3 crops side by side; the tall one [32, 64]: 2 crops stacked
    crops = {wide: 4, tall: 3}
    for size, n in crops.items():
        images = image_tensor(side).half().expand(n, -1, -1, -1).unsqueeze(0).contiguous()
        features = model._image_features(images, [size])[0]
        newline_rows = int((features == model.model.image_newline.to(features)).all(-1).sum())
        per_side = side // model.config.vision_config.patch_size
        grid_rows = per_side * (1 if size == wide else 2)
        assert 0 < newline_rows <= grid_rows  # one per remaining grid row after unpadding
    out = model.generate(prompt_ids(tokenizer), images=images, image_sizes=[tall], do_sample=False, max_new_tokens=3)
    assert out.shape == (1, 4)
    # LLaVA's unpad truncates 47 * 12 / 188 = 2.9999999999999996 to 2 rows kept; transformers' rounds it to 3
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    from loadgraph.loading.llava_api import unpad_features

    grid = torch.zeros(1, 4, 12)
    assert unpad_features(grid, 188, 47).shape == (1, 2, 12) and unpad_image(grid, (47, 188)).shape == (1, 4, 12)
