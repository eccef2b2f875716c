"""What transformers' configs say about a quantization: the `quantization_config` object and dict
`from_pretrained` gets, and the config.json / generation_config.json texts `save_pretrained` writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .quant_settings import QuantSettings


def transformers_quant_config(settings: QuantSettings):
    """The transformers config object that `from_pretrained(quantization_config=...)` would get."""
    from transformers import BitsAndBytesConfig, FineGrainedFP8Config

    skip = list(settings.skip_modules) or None
    if settings.method == "fp8":
        return FineGrainedFP8Config(weight_block_size=list(settings.fp8_block_size), modules_to_not_convert=skip)
    if settings.method == "bnb-int8":
        return BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_threshold=settings.llm_int8_threshold, llm_int8_skip_modules=skip
        )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=settings.method.removeprefix("bnb-"),
        bnb_4bit_use_double_quant=settings.double_quant,
        bnb_4bit_compute_dtype=settings.compute_dtype,
        bnb_4bit_quant_storage=settings.quant_storage,
        llm_int8_threshold=settings.llm_int8_threshold,
        llm_int8_skip_modules=skip,
    )


def as_json_dict(config_obj) -> dict[str, Any]:
    # Round-trip through JSON so enums (quant_method) and tuples read exactly as config.json holds them.
    return json.loads(json.dumps(config_obj.to_dict()))


def quantization_config(settings: QuantSettings) -> dict[str, Any]:
    """Exactly what transformers writes into config.json["quantization_config"] for these settings.

    (`QuantPlan.quant_config` is the same dict taken after transformers' quantizer has seen the
    model; they only differ where FP8 renames a legacy skip-module name.)
    """
    return as_json_dict(transformers_quant_config(settings))


def render_config_files(base_dir: str, dtype: torch.dtype, model_class: type, quant_config: dict) -> dict[str, str]:
    """config.json / generation_config.json texts of the quantized model, as save_pretrained writes them.

    Mirrors from_pretrained + save_pretrained: the load dtype goes on the config and its
    sub-configs, the class name into `architectures`, the quantizer's config into
    `quantization_config`; the generation config is the base's file, else derived from the config.
    """
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(base_dir)
    config.dtype = dtype
    for key in config.sub_configs:
        if (sub := getattr(config, key, None)) is not None:
            sub.dtype = dtype
    config.architectures = [model_class.__name__]
    config.quantization_config = dict(quant_config)
    files = {"config.json": config.to_json_string(use_diff=True)}
    if model_class.can_generate():
        if (Path(base_dir) / "generation_config.json").is_file():
            generation = GenerationConfig.from_pretrained(base_dir)
        else:
            generation = GenerationConfig.from_model_config(config)
        files["generation_config.json"] = generation.to_json_string(use_diff=True)
    return files
