"""Which architecture a LLaVA-style `model_name` asks for, checked against config.json.

LLaVA's builder picks a model class from keywords in `model_name` ("llava", "mixtral", "mistral",
...) and trusts the name. transformers already knows the class from config.json, so here the
name chooses the *family* and config.json must agree: a name that says "mistral" over a Llama
checkpoint is an error, not a silently wrong model. A name with no known keyword falls back to
config.json's architecture (beyond LLaVA), and an architecture outside the supported families
raises ValueError naming the keywords.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadgraph.errors import InputError


class LoadingError(InputError, ValueError):
    """Bad arguments to the loader (exit code 2 under the CLI; a ValueError for LLaVA callers)."""


# Language families, in LLaVA's precedence order ("mixtral" before "mistral"), with the
# transformers model types each admits.
LANGUAGE_FAMILIES: dict[str, tuple[str, ...]] = {
    "mixtral": ("mixtral",),
    "mistral": ("mistral",),
    "gemma": ("gemma", "gemma2", "gemma3_text"),
    "qwen": ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "qwen3_5_text", "qwen3_5_moe_text",
             "qwen2_vl_text", "qwen2_5_vl_text", "qwen3_vl_text", "qwen3_vl_moe_text"),
    "llama": ("llama",),
}
MULTIMODAL_TYPES: tuple[str, ...] = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
# Names LLaVA's model zoo uses for the same families.
ALIASES: dict[str, str] = {"zephyr": "mistral", "vicuna": "llama"}
SUPPORTED_KEYWORDS: tuple[str, ...] = ("llava", "lora", *LANGUAGE_FAMILIES, *ALIASES)


@dataclass(frozen=True)
class Architecture:
    family: str  # a LANGUAGE_FAMILIES key: the language model's family
    model_type: str  # config.json's top-level model_type
    multimodal: bool
    from_name: bool  # True when model_name's keywords chose it, False when config.json did

    @property
    def auto_class_name(self) -> str:
        return "AutoModelForImageTextToText" if self.multimodal else "AutoModelForCausalLM"


def model_name_from_path(model_path: str) -> str:
    """LLaVA's `get_model_name_from_path`: the last path part, with its parent for checkpoint-N dirs."""
    parts = str(model_path).strip("/").split("/")
    return f"{parts[-2]}_{parts[-1]}" if parts[-1].startswith("checkpoint-") and len(parts) > 1 else parts[-1]


def read_config(checkpoint_dir: Path, what: str) -> dict[str, Any]:
    path = checkpoint_dir / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoadingError(f"{what}: {checkpoint_dir} has no config.json; point at a Hugging Face checkpoint directory") from None
    except ValueError as exc:
        raise LoadingError(f"{path}: not valid JSON ({exc})") from None


def _family_of(model_type: str | None) -> str | None:
    return next((fam for fam, types in LANGUAGE_FAMILIES.items() if model_type in types), None)


def _supported_message() -> str:
    types = ", ".join(t for ts in LANGUAGE_FAMILIES.values() for t in ts)
    return (
        f"supported model_name keywords: {', '.join(SUPPORTED_KEYWORDS)}; "
        f"supported config.json model types: {', '.join(MULTIMODAL_TYPES)}, {types}"
    )


def resolve_architecture(model_name: str, config: dict[str, Any], config_origin: str, multimodal: bool = False) -> Architecture:
    """The family `model_name` names (or config.json's, when it names none), checked against config.json."""
    name = model_name.lower()
    model_type = config.get("model_type")
    if "mm_vision_tower" in config:
        # LLaVA's own format (llava_llama, ...): a language model plus mm_* fields, which
        # transformers cannot load. Say so rather than report a family mismatch.
        raise LoadingError(
            f"{config_origin}: an original LLaVA checkpoint ({model_type!r} with mm_vision_tower); convert it to the "
            "transformers LLaVA format first (transformers' convert_llava_weights_to_hf)"
        )
    is_multimodal_config = model_type in MULTIMODAL_TYPES or "vision_config" in config
    text_type = (config.get("text_config") or {}).get("model_type", "llama") if is_multimodal_config else model_type
    config_family = _family_of(text_type)

    wants_llava = "llava" in name or multimodal
    keyword = next((k for k in (*LANGUAGE_FAMILIES, *ALIASES) if k in name), None)
    named_family = ALIASES.get(keyword, keyword) if keyword else None

    if wants_llava and not is_multimodal_config:
        raise LoadingError(
            f"model_name {model_name!r} asks for a LLaVA (multimodal) model but {config_origin} is a {model_type!r} "
            "language model; drop 'llava' from model_name or point at a LLaVA checkpoint"
        )
    if named_family is not None:
        if config_family != named_family:
            raise LoadingError(
                f"model_name {model_name!r} names the {named_family!r} family but {config_origin} holds a "
                f"{text_type!r} model; fix model_name (it chooses the architecture, as in LLaVA) or the path"
            )
        return Architecture(named_family, model_type, is_multimodal_config, from_name=True)
    if wants_llava:
        # LLaVA's default language model is Llama; an HF LLaVA config says which one it really is.
        if config_family is None:
            raise LoadingError(f"{config_origin}: LLaVA text model type {text_type!r} is not supported; {_supported_message()}")
        return Architecture(config_family, model_type, True, from_name=True)
    if config_family is None or (is_multimodal_config and model_type not in MULTIMODAL_TYPES):
        raise LoadingError(
            f"model_name {model_name!r} matches no supported architecture and {config_origin} is a "
            f"{model_type!r} model; {_supported_message()}"
        )
    return Architecture(config_family, model_type, is_multimodal_config, from_name=False)
