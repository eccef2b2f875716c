"""Tiny random transformers models of each supported architecture, saved like hub checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loadgraph.testing.determinism import _seeded, _torch_dtype
from loadgraph.testing.tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, IMAGE_TOKEN, IMAGE_TOKEN_ID, PAD_TOKEN_ID, make_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedModel

KINDS: tuple[str, ...] = ("llama", "mistral", "mixtral", "qwen2", "gemma", "llava")

# Tiny CLIP vision tower of the LLaVA model: 32x32 images in 8x8 patches -> 16 image tokens.
_VISION_IMAGE_SIZE = 32
_VISION_PATCH_SIZE = 8


def _text_kwargs(vocab_size: int) -> dict[str, Any]:
    return dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
    )


def tiny_config(kind: str, vocab_size: int = 512) -> PreTrainedConfig:
    """A config of the given architecture small enough to build, save and run in milliseconds.

    Special-token ids match :func:`make_tokenizer`; LLaVA's ``image_token_id`` is ``IMAGE_TOKEN_ID``.
    """
    import transformers as tf

    text = _text_kwargs(vocab_size)
    if kind == "llama":
        return tf.LlamaConfig(**text, tie_word_embeddings=False)
    if kind == "mistral":
        return tf.MistralConfig(**text, sliding_window=None, tie_word_embeddings=False)
    if kind == "mixtral":
        return tf.MixtralConfig(
            **text, num_local_experts=4, num_experts_per_tok=2, sliding_window=None, tie_word_embeddings=False
        )
    if kind == "qwen2":
        return tf.Qwen2Config(**text, tie_word_embeddings=False)
    if kind == "gemma":
        return tf.GemmaConfig(**text, tie_word_embeddings=True)
    if kind == "llava":
        if IMAGE_TOKEN_ID >= vocab_size:
            raise ValueError(f"vocab_size {vocab_size} leaves no room for the image token id {IMAGE_TOKEN_ID}")
        vision = tf.CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=_VISION_IMAGE_SIZE,
            patch_size=_VISION_PATCH_SIZE,
            projection_dim=32,
        )
        text_config = tf.LlamaConfig(**text, tie_word_embeddings=False)
        num_patches = (_VISION_IMAGE_SIZE // _VISION_PATCH_SIZE) ** 2
        return tf.LlavaConfig(
            vision_config=vision,
            text_config=text_config,
            image_token_id=IMAGE_TOKEN_ID,
            image_seq_length=num_patches,  # "default" strategy drops CLS: one token per patch
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
            projector_hidden_act="gelu",
            tie_word_embeddings=False,
        )
    raise ValueError(f"unknown kind {kind!r}: expected one of {KINDS}")


def _auto_model_class(model_type: str) -> type:
    """The Auto class a user would load this checkpoint with (LLaVA and Qwen-VL are not causal-LM classes)."""
    import transformers as tf

    from loadgraph.loading.dispatch import MULTIMODAL_TYPES

    if model_type in MULTIMODAL_TYPES:
        return tf.AutoModelForImageTextToText
    return tf.AutoModelForCausalLM


def _write_llava_processor_files(out: Path, config: PreTrainedConfig) -> None:
    """Write ``processor_config.json`` exactly as ``LlavaProcessor.save_pretrained`` does in transformers 5.

    Written as JSON rather than through ``CLIPImageProcessor``/``LlavaProcessor``: in transformers 5
    instantiating ``CLIPImageProcessor`` needs PIL (or torchvision), which this environment lacks.
    The bytes equal those transformers writes when PIL is present (the tests check it there), so
    the file does not depend on what is installed; ``AutoProcessor`` loads it wherever PIL is.
    """
    side = config.vision_config.image_size
    processor = {
        "image_processor": {
            "crop_size": {"height": side, "width": side},
            "do_center_crop": True,
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],  # OpenAI CLIP's
            "image_processor_type": "CLIPImageProcessor",
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "resample": 3,  # bicubic
            "rescale_factor": 1 / 255,
            "size": {"shortest_edge": side},
        },
        "image_token": IMAGE_TOKEN,
        "num_additional_image_tokens": 1,  # CLIP's CLS token
        "patch_size": config.vision_config.patch_size,
        "processor_class": "LlavaProcessor",
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
    }
    text = json.dumps(processor, indent=2, sort_keys=True) + "\n"
    (out / "processor_config.json").write_text(text, encoding="utf-8")


def build_tiny_model(kind: str, *, dtype: str = "float32", seed: int = 0) -> PreTrainedModel:
    """The in-memory model that :func:`make_tiny_model` saves, for comparing against what loads back."""
    config = tiny_config(kind)
    with _seeded(seed):
        model = _auto_model_class(config.model_type).from_config(config)
    return model.to(_torch_dtype(dtype)).eval()


def make_tiny_model(
    kind: str,
    out_dir: str | Path,
    *,
    dtype: str = "float32",
    seed: int = 0,
    max_shard_size: str | int | None = "40KB",
    tokenizer: bool = True,
) -> Path:
    """Build a random model of ``kind`` from :func:`tiny_config` and save it like a hub checkpoint.

    The small default ``max_shard_size`` makes even a tiny model sharded, so per-shard code paths
    and the index are exercised. ``save_pretrained`` output is byte-deterministic for a given seed
    (its safetensors metadata is only ``{"format": "pt"}``; JSON files are written with sorted keys).
    """
    model = build_tiny_model(kind, dtype=dtype, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_kwargs: dict[str, Any] = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out, **save_kwargs)
    if tokenizer:
        make_tokenizer(out, model.config.get_text_config().vocab_size, image_token=kind == "llava")
    if kind == "llava":
        _write_llava_processor_files(out, model.config)
    return out
