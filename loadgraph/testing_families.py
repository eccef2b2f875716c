"""Tiny checkpoints of the families LLaMA-Factory's examples name (Qwen3, Qwen3-MoE, Qwen3.5,
Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE), from transformers' own config classes.

Same contract as loadgraph.testing: built offline, deterministic, saved with save_pretrained
plus the shared tiny tokenizer, so that a test can point an example YAML at a checkpoint of the
architecture it names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loadgraph.testing import make_tokenizer
from loadgraph.testing.determinism import _seeded, _torch_dtype
from loadgraph.testing.tiny_models import _text_kwargs

FAMILIES = ("qwen3", "qwen3_moe", "qwen3_5", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}


def family_config(kind: str, vocab_size: int = 512) -> Any:
    import transformers as tf

    text = {**_text_kwargs(vocab_size), "tie_word_embeddings": False}
    if kind == "qwen3":
        return tf.Qwen3Config(**text)
    if kind == "qwen3_moe":
        return tf.Qwen3MoeConfig(**text, **_MOE, decoder_sparse_step=1)
    if kind == "qwen3_5":
        return tf.Qwen3_5TextConfig(**text, layer_types=["linear_attention", "full_attention"])
    if kind in ("qwen2_vl", "qwen2_5_vl"):
        vision = {"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 4, "mlp_ratio": 2, "patch_size": 4, "spatial_merge_size": 2,
                  "temporal_patch_size": 2, "in_channels": 3}
        if kind == "qwen2_5_vl":
            vision = {**vision, "out_hidden_size": 64, "intermediate_size": 64, "fullatt_block_indexes": [1], "window_size": 16}
            vision.pop("embed_dim"), vision.pop("mlp_ratio")
        else:
            vision["hidden_size"] = 64  # Qwen2-VL's merger projects to the text hidden size
        cls = tf.Qwen2VLConfig if kind == "qwen2_vl" else tf.Qwen2_5_VLConfig
        rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
        return cls(text_config={**text, "rope_parameters": rope}, vision_config=vision, image_token_id=5, video_token_id=6,
                   vision_start_token_id=7, vision_end_token_id=8, tie_word_embeddings=False)
    if kind in ("qwen3_vl", "qwen3_vl_moe"):
        vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "out_hidden_size": 64, "patch_size": 4,
                  "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 64, "deepstack_visual_indexes": [0]}
        rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True, "rope_theta": 10000.0}
        text_config = {**text, "rope_parameters": rope, **(_MOE if kind == "qwen3_vl_moe" else {})}
        cls = tf.Qwen3VLConfig if kind == "qwen3_vl" else tf.Qwen3VLMoeConfig
        return cls(text_config=text_config, vision_config=vision, image_token_id=5, video_token_id=6,
                   vision_start_token_id=7, vision_end_token_id=8, tie_word_embeddings=False)
    raise ValueError(f"unknown family {kind!r}: expected one of {FAMILIES}")


def make_family_model(kind: str, out_dir: str | Path, *, dtype: str = "float32", seed: int = 0, max_shard_size: str = "40KB") -> Path:
    """Save a random tiny `kind` model and the tiny tokenizer under `out_dir`."""
    import transformers as tf

    config = family_config(kind)
    auto = tf.AutoModelForImageTextToText if hasattr(config, "vision_config") else tf.AutoModelForCausalLM
    with _seeded(seed):
        model = auto.from_config(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.to(_torch_dtype(dtype)).save_pretrained(out, max_shard_size=max_shard_size)
    make_tokenizer(out, config.get_text_config().vocab_size)
    if hasattr(config, "vision_config"):
        # The image processor a Qwen-VL checkpoint ships, at the fixture's patch sizes.
        vision = config.vision_config
        tf.Qwen2VLImageProcessor(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                                 temporal_patch_size=vision.temporal_patch_size).save_pretrained(out)
    return out
