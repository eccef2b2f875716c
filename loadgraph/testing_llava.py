"""Tiny checkpoints in LLaVA's own on-disk format, for tests and `make llava-check`.

What LLaVA's training writes: a full model (language model under `model.*`, projector under
`model.mm_projector.*`, the CLIP tower named by `mm_vision_tower`), or a LoRA output
(`config.json` of the LLaVA model, `adapter_config.json` + `adapter_model.safetensors` with
`base_model.model.model.layers...` keys, `non_lora_trainables.bin` with
`base_model.model.model.mm_projector.*`) beside a separate language model (`model_base`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from loadgraph.testing import build_tiny_model, make_tokenizer, tiny_config

VOCAB = 512
VISION_HIDDEN = 32
# family -> (loadgraph.testing kind, LLaVA model_type, LLaVA class)
FAMILIES = {
    "llama": ("llama", "llava_llama", "LlavaLlamaForCausalLM"),
    "mistral": ("mistral", "llava_mistral", "LlavaMistralForCausalLM"),
    "mixtral": ("mixtral", "llava_mixtral", "LlavaMixtralForCausalLM"),
    "qwen": ("qwen2", "llava_qwen", "LlavaQwenForCausalLM"),
    "gemma": ("gemma", "llava_gemma", "LlavaGemmaForCausalLM"),
}


PEFT_010_KEYS = ("peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "r", "target_modules", "lora_alpha",
                 "lora_dropout", "fan_in_fan_out", "bias", "use_rslora", "modules_to_save", "init_lora_weights", "layers_to_transform",
                 "layers_pattern", "rank_pattern", "alpha_pattern", "megatron_config", "megatron_core", "loftq_config", "use_dora")


def make_tower(out: Path) -> Path:
    from transformers import CLIPImageProcessor, CLIPVisionModel

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(7)
    tower = CLIPVisionModel(tiny_config("llava").vision_config).eval()
    tower.save_pretrained(out)
    # Hub CLIP towers (openai/clip-vit-*) name their tensors vision_model.*, which every
    # transformers version reads (transformers 5 saves them without the prefix, which 4.x does not).
    state = {"vision_model." + k: v.contiguous() for k, v in tower.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    side = tower.config.image_size
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(out)
    return out


def projector_state(projector: str, hidden: int, seed: int, prefix: str = "model.mm_projector.") -> dict[str, torch.Tensor]:
    """LLaVA's nn.Sequential projector: `linear`, or mlpNx_gelu (Linear at indices 0, 2, ...)."""
    g = torch.Generator().manual_seed(seed)
    if projector == "linear":
        return {f"{prefix}weight": torch.randn(hidden, VISION_HIDDEN, generator=g) * 0.1, f"{prefix}bias": torch.randn(hidden, generator=g) * 0.1}
    depth = int(projector.removeprefix("mlp").split("x")[0])
    out = {}
    for i in range(depth):
        out[f"{prefix}{2 * i}.weight"] = torch.randn(hidden, VISION_HIDDEN if i == 0 else hidden, generator=g) * 0.1
        out[f"{prefix}{2 * i}.bias"] = torch.randn(hidden, generator=g) * 0.1
    return out


# LLaVA-1.6's anyres settings at the tiny tower's 32-pixel crops; [width, height] pairs, not symmetric,
# so that a (width, height) / (height, width) mix-up shows.
ANYRES = {"image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad", "image_grid_pinpoints": [[32, 64], [96, 32], [64, 64]]}


def llava_config(family: str, lm_config: dict, projector: str, tower: Path) -> dict:
    _, model_type, cls = FAMILIES[family]
    config = dict(lm_config)
    config.update(
        architectures=[cls], model_type=model_type, mm_vision_tower=str(tower), mm_hidden_size=VISION_HIDDEN,
        mm_projector_type=projector, mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        mm_use_im_start_end=False, mm_use_im_patch_token=False, mm_patch_merge_type="flat",
        image_aspect_ratio="pad", tune_mm_mlp_adapter=False, tokenizer_model_max_length=2048, tokenizer_padding_side="right",
        use_cache=True,
    )
    config.pop("dtype", None)
    config["torch_dtype"] = "float16"
    return config


def make_fixture(root: Path, family: str, *, lora: bool, projector: str = "mlp2x_gelu", adapter_dtype: torch.dtype = torch.float16,
                 sentencepiece: bool = False, anyres: bool = False) -> dict:
    """One LLaVA checkpoint; returns {"model_path", "model_base", "model_name"} as LLaVA's scripts pass them.

    `sentencepiece`: the tokenizer is a tokenizer.model only, as Vicuna and llava-v1.5 ship it.
    `anyres`: LLaVA-1.6 (anyres grid, spatial_unpad merge, a trained `model.image_newline`).
    """
    kind = FAMILIES[family][0]
    tower = make_tower(root / "clip-tiny")
    name = f"llava-{family}-{projector}-{'lora' if lora else 'full'}" + ("-spm" if sentencepiece else "") + ("-anyres" if anyres else "")
    out = root / name
    if out.exists():
        import shutil

        shutil.rmtree(out)
    lm = build_tiny_model(kind, seed=3).to(torch.float16)
    assert lm.config.vocab_size == VOCAB
    lm_config = json.loads(lm.config.to_json_string())
    hidden = lm.config.hidden_size
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({**llava_config(family, lm_config, projector, tower), **(ANYRES if anyres else {})}, indent=2))
    proj = {k: v.to(torch.float16) for k, v in projector_state(projector, hidden, seed=11).items()}
    if anyres:
        proj["model.image_newline"] = (torch.randn(hidden, generator=torch.Generator().manual_seed(13)) * 0.1).to(torch.float16)
    if not lora:
        state = {**_on_disk_state(lm, root / f".{name}-lm"), **proj}
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        (sentencepiece_tokenizer if sentencepiece else _tokenizer)(out)
        return {"model_path": str(out), "model_base": None, "model_name": name}
    base = root / (f"{family}-base" + ("-spm" if sentencepiece else ""))
    if not base.exists():
        lm.save_pretrained(base)
        (sentencepiece_tokenizer if sentencepiece else _tokenizer)(base)
    _lora_adapter(lm, out, adapter_dtype)
    torch.save({"base_model.model." + k: v for k, v in proj.items()}, out / "non_lora_trainables.bin")
    return {"model_path": str(out), "model_base": str(base), "model_name": name}


def _on_disk_state(lm, scratch: Path) -> dict[str, torch.Tensor]:
    """The language model's tensors under the names a checkpoint holds them (transformers' save
    reverts its in-memory fusions: Mixtral's experts go back to per-expert w1/w2/w3, as LLaVA saved them)."""
    import shutil

    from safetensors.torch import load_file

    lm.save_pretrained(scratch)
    try:
        return {k: v for f in sorted(scratch.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    finally:
        shutil.rmtree(scratch)


def _tokenizer(out: Path) -> None:
    """make_tokenizer's tokenizer.json, under a class name transformers 4.x (LLaVA's) knows too."""
    make_tokenizer(out, VOCAB)
    path = out / "tokenizer_config.json"
    doc = json.loads(path.read_text())
    doc["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(doc, indent=2))
    # tokenizers < 0.20 (LLaVA's 0.15) reads BPE merges only as "a b" strings; newer ones read both.
    tok_path = out / "tokenizer.json"
    tok = json.loads(tok_path.read_text())
    model = tok.get("model", {})
    if model.get("type") == "BPE":
        model["merges"] = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        model.pop("ignore_merges", None)
    tok_path.write_text(json.dumps(tok, ensure_ascii=False))


def sentencepiece_tokenizer(out: Path, vocab: int = VOCAB) -> None:
    """A Llama-style sentencepiece BPE (byte fallback, identity normalizer, dummy prefix, split digits)
    trained on loadgraph.testing's corpus: tokenizer.model + tokenizer_config.json, no tokenizer.json."""
    import io

    import sentencepiece as spm

    from loadgraph.testing.tokenizer import _corpus

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=buf, vocab_size=vocab, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        num_threads=1, unk_id=0, bos_id=1, eos_id=2, pad_id=3, add_dummy_prefix=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True, minloglevel=2)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    doc = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
           "add_bos_token": True, "add_eos_token": False, "legacy": False, "clean_up_tokenization_spaces": False, "model_max_length": 2048}
    (out / "tokenizer_config.json").write_text(json.dumps(doc, indent=2))


def _lora_adapter(lm, out: Path, dtype: torch.dtype) -> None:
    """A PEFT LoRA over the language model (LLaVA's LM names are the plain model's), random B."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                        lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(lm.float(), config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    state = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items() if "lora_" in k}
    state = {k.replace(".default", ""): v for k, v in state.items()}
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    doc = config.to_dict()
    # The keys a LLaVA-era (peft 0.10) adapter_config.json has: that PEFT refuses any other key.
    doc = {k: (sorted(v) if isinstance(v, set) else v) for k, v in doc.items() if k in PEFT_010_KEYS}
    doc["base_model_name_or_path"] = None
    (out / "adapter_config.json").write_text(json.dumps(doc, indent=2, default=str))
    lm.half()


def prompt_ids(tokenizer, text: str = "hello world", image: bool = True) -> torch.Tensor:
    """LLaVA's tokenizer_image_token: the prompt's pieces around "<image>" with -200 between."""
    pieces = [tokenizer(p).input_ids for p in f"<image>\n{text}".split("<image>")] if image else [tokenizer(text).input_ids]
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if i:
            ids.append(-200)
        ids.extend(piece)
    return torch.tensor([ids])


def image_tensor(side: int = 30, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 3, side, side, generator=g)
