"""LLaVA's own checkpoint format (liuhaotian/llava-v1.5-7b and its kin) and its mapping to transformers'.

An original LLaVA checkpoint is a language model checkpoint whose config.json carries `mm_*`
fields: the language model under `model.*` / `lm_head`, the projector under
`model.mm_projector.*` (an nn.Sequential: `linear` or `mlpNx_gelu`), and the vision tower
*named* (`mm_vision_tower`), not stored. transformers cannot load it. The mapping here follows
transformers' own conversion script (models/llava/convert_llava_weights_to_hf.py:
KEYS_TO_MODIFY_MAPPING, an `<image>` token and a `<pad>` token added, embeddings resized to a
multiple of 64 with rows drawn from N(mean, 1e-5 * covariance) of the existing rows) and then
lets transformers' own loading/saving renames decide the final on-disk names.

Everything here reads config.json and names only; tensors are the convert stage's business.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from loadgraph.errors import InputError

# config.json model types LLaVA's (and LLaVA-NeXT's) code registers (v1.5 checkpoints were saved as plain "llava").
_TEXT_TYPE = {"llava": "llama", "llava_llama": "llama", "llava_mistral": "mistral", "llava_mixtral": "mixtral", "llava_qwen": "qwen2", "llava_gemma": "gemma"}
_ARCH_TEXT_TYPE = {"LlavaLlamaForCausalLM": "llama", "LlavaMistralForCausalLM": "mistral", "LlavaMixtralForCausalLM": "mixtral",
                   "LlavaQwenForCausalLM": "qwen2", "LlavaGemmaForCausalLM": "gemma"}
# Why llava_mpt is refused: LLaVA's MPT is its own copy of MosaicML's remote-code MPT.
MPT_REASON = (
    "llava_mpt is LLaVA's copy of MosaicML's remote-code MPT (fused Wqkv, ALiBi, its own module names); transformers' "
    "Llava cannot hold that language model and LLaVA itself dropped MPT after v1.0; convert it with LLaVA's own code"
)
# LLaVA's config keys -> transformers' Llava config keys (overwrite_config / customized_config use LLaVA's).
CONFIG_KEYS = {"mm_vision_select_layer": "vision_feature_layer", "mm_vision_select_feature": "vision_feature_select_strategy"}
# LLaVA keys that would change the module tree the weights were saved for: an override cannot hold.
ARCHITECTURE_KEYS = ("mm_projector_type", "mm_hidden_size", "mm_vision_tower")
PROJECTOR_PREFIX = "model.mm_projector."
TOWER_PREFIX = "model.vision_tower."  # only present when a finetune saved an unfrozen tower
RESIZE_MULTIPLE = 64  # the conversion script pads the vocabulary to a multiple of 64
COVARIANCE_SCALE = 1e-5
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
# LLaVA's mm_vision_select_feature -> transformers' vision_feature_select_strategy
_SELECT_STRATEGY = {"patch": "default", "cls_patch": "full"}
_MLP_GELU = re.compile(r"^mlp(\d+)x_gelu$")


def is_original_llava(config: dict) -> bool:
    """LLaVA's own format: mm_* fields on a language-model config, no transformers sub-configs."""
    if "text_config" in config or "vision_config" in config:
        return False
    archs = config.get("architectures") or []
    return "mm_vision_tower" in config or "mm_projector_type" in config or any(a.startswith("Llava") and a.endswith("ForCausalLM") for a in archs)


@dataclass(frozen=True)
class OriginalLlava:
    """What an original LLaVA config.json says, validated before any work."""

    text_type: str  # transformers model type of the language model: llama | mistral
    projector_type: str  # linear | mlp2x_gelu
    vision_tower: str | None
    select_layer: int
    select_strategy: str
    aspect_ratio: str
    use_im_start_end: bool
    use_im_patch_token: bool
    patch_merge_type: str = "flat"  # flat | spatial | spatial_unpad (LLaVA-1.6)
    grid_pinpoints: tuple[tuple[int, int], ...] = ()  # anyres resolutions, LLaVA's (width, height)

    @property
    def next(self) -> bool:
        """LLaVA-1.6's unpadded merge: a learnt `image_newline`, which transformers' LlavaNext holds."""
        return "unpad" in self.patch_merge_type

    @property
    def projector_act(self) -> str:
        return "gelu" if self.projector_type != "linear" else "linear"


def parse_original(config: dict, origin: str, layout: str = "hf") -> OriginalLlava:
    archs = config.get("architectures") or []
    if config.get("model_type") == "llava_mpt" or "LlavaMptForCausalLM" in archs:
        raise InputError(f"{origin}: {MPT_REASON}")
    text_type = next((_ARCH_TEXT_TYPE[a] for a in archs if a in _ARCH_TEXT_TYPE), None) or _TEXT_TYPE.get(config.get("model_type", ""))
    if text_type is None:
        raise InputError(
            f"{origin}: LLaVA checkpoint with model_type {config.get('model_type')!r} / architectures {archs}: only "
            f"{', '.join(sorted(_ARCH_TEXT_TYPE))} language models convert to transformers' Llava"
        )
    projector = config.get("mm_projector_type", "linear")
    match = _MLP_GELU.match(projector)
    if projector == "linear" or (match and match.group(1) == "1"):
        projector = "linear"
    elif not (match and (match.group(1) == "2" or layout == "llava")):
        raise InputError(
            f"{origin}: mm_projector_type {projector!r} has no transformers Llava equivalent (its projector is Linear-act-Linear); "
            "only linear and mlp2x_gelu convert (load_pretrained_model holds any mlpNx_gelu)"
        )
    feature = config.get("mm_vision_select_feature", "patch")
    if feature not in _SELECT_STRATEGY:
        raise InputError(f"{origin}: mm_vision_select_feature {feature!r} is not one of {sorted(_SELECT_STRATEGY)}")
    aspect = config.get("image_aspect_ratio", "square") or "square"
    merge = config.get("mm_patch_merge_type", "flat") or "flat"
    if layout == "llava" and merge not in ("flat", "spatial", "spatial_unpad"):
        raise InputError(f"{origin}: mm_patch_merge_type {merge!r} is not one of LLaVA's flat, spatial, spatial_unpad")
    pinpoints = grid_pinpoints(config.get("image_grid_pinpoints"), origin) if str(aspect).startswith("anyres") else ()
    if layout == "llava" and str(aspect).startswith("anyres") and (aspect != "anyres" or not pinpoints):
        raise InputError(f"{origin}: image_aspect_ratio {aspect!r} needs image_grid_pinpoints (LLaVA-1.6's plain 'anyres' is what loads)")
    if layout == "hf" and (str(aspect).startswith("anyres") or merge != "flat"):
        raise InputError(
            f"{origin}: image_aspect_ratio {aspect!r} / mm_patch_merge_type {config.get('mm_patch_merge_type')!r} is LLaVA-NeXT "
            "(anyres); this stage converts to LlavaForConditionalGeneration only (load_pretrained_model loads it on LlavaNext)"
        )
    return OriginalLlava(
        text_type=text_type,
        projector_type=projector,
        vision_tower=config.get("mm_vision_tower"),
        select_layer=int(config.get("mm_vision_select_layer", -2)),
        select_strategy=_SELECT_STRATEGY[feature],
        aspect_ratio=str(aspect),
        use_im_start_end=bool(config.get("mm_use_im_start_end", False)),
        use_im_patch_token=bool(config.get("mm_use_im_patch_token", True)),
        patch_merge_type=merge,
        grid_pinpoints=pinpoints,
    )


def grid_pinpoints(value, origin: str) -> tuple[tuple[int, int], ...]:
    """LLaVA's image_grid_pinpoints: a list of [width, height], or its string form (LLaVA literal_evals it)."""
    import ast

    try:
        points = ast.literal_eval(value) if isinstance(value, str) else value
        return tuple((int(w), int(h)) for w, h in points)
    except (ValueError, TypeError, SyntaxError):
        raise InputError(f"{origin}: image_grid_pinpoints {value!r} is not a list of [width, height] pairs") from None


def translated_overrides(overrides: dict, origin: str = "overwrite_config") -> dict:
    """LLaVA-vocabulary config overrides plus their transformers names (the LLaVA key stays too:
    LLaVA's own helpers, e.g. process_images, read `model.config.image_aspect_ratio` and kin)."""
    out = dict(overrides)
    for key, name in CONFIG_KEYS.items():
        if key not in overrides:
            continue
        value = overrides[key]
        if key == "mm_vision_select_feature":  # LLaVA's values differ too: patch -> default, cls_patch -> full
            if value not in _SELECT_STRATEGY:
                raise InputError(f"{origin}: mm_vision_select_feature {value!r} is not one of {sorted(_SELECT_STRATEGY)}")
            value = _SELECT_STRATEGY[value]
        out[name] = value
    return out


def original_name(name: str) -> str:
    """LLaVA's renaming of the tensors it saves beside a LoRA (non_lora_trainables.bin):
    `base_model.model.model.mm_projector.0.weight` -> `model.mm_projector.0.weight`."""
    name = name.removeprefix("base_model.")
    return name[len("model."):] if name.startswith("model.model.") or name.startswith("model.lm_head.") else name


def legacy_name(original: str, projector_type: str, layout: str = "hf") -> str | None:
    """An original LLaVA tensor name -> the llava-hf checkpoint name the conversion script gives it.

    None for tensors the converted model does not have (rotary caches, LLaVA-NeXT's image_newline).
    """
    if original == "model.image_newline":  # LLaVA-1.6's newline embedding: LlavaNext's own parameter
        return "model.image_newline" if layout == "llava" else None
    if original.endswith(".inv_freq") or ".vision_resampler" in original:
        return None
    if original.startswith(PROJECTOR_PREFIX):
        rest = original[len(PROJECTOR_PREFIX):]
        if projector_type == "linear":
            return f"multi_modal_projector.linear_1.{rest}"
        index, _, leaf = rest.partition(".")
        # nn.Sequential(Linear, GELU, Linear, GELU, Linear...): Linear k sits at index 2k.
        if not index.isdigit() or int(index) % 2 or (layout == "hf" and int(index) > 2):
            raise InputError(f"tensor {original!r}: an mlpNx_gelu projector has Linear layers at even indices only ({projector_type})")
        return f"multi_modal_projector.linear_{int(index) // 2 + 1}.{leaf}"
    if original.startswith(TOWER_PREFIX):
        # model.vision_tower.vision_tower.vision_model.X (LLaVA's CLIPVisionTower wraps the CLIP model)
        return "vision_tower." + tower_name(original[len(TOWER_PREFIX):].removeprefix("vision_tower."))
    if original.startswith("model."):
        return "language_model." + original
    if original.startswith("lm_head."):
        return "language_model." + original
    return original  # left for transformers' renaming to accept or refuse


def tower_name(name: str) -> str:
    """A CLIP checkpoint name relative to the vision tower module (CLIPModel's or CLIPVisionModel's)."""
    return name.removeprefix("vision_model.")


def tower_keeps(name: str) -> bool:
    """Tensors of a CLIP checkpoint that LLaVA's vision tower (a CLIPVisionModel) uses."""
    return not name.startswith(("text_model.", "text_projection", "visual_projection", "logit_scale"))


def resized_vocab(vocab_size: int, tokens: int) -> int:
    """Rows after adding tokens: the conversion script's resize_token_embeddings(V + 2, pad_to_multiple_of=64)."""
    needed = max(vocab_size, tokens)
    return -(-needed // RESIZE_MULTIPLE) * RESIZE_MULTIPLE if needed > vocab_size else vocab_size


def text_config_dict(config: dict, text_type: str) -> dict:
    """The language model's own config: the LLaVA config less LLaVA's fields (kept by the target class's keys)."""
    from transformers import CONFIG_MAPPING

    known = set(CONFIG_MAPPING[text_type]().to_dict())
    text = {k: v for k, v in config.items() if k in known and k not in ("architectures", "model_type", "transformers_version", "_name_or_path")}
    text["model_type"] = text_type
    return text


def vision_config_dict(config: dict, origin: str) -> dict:
    if config.get("model_type") == "clip" and isinstance(config.get("vision_config"), dict):
        return {**config["vision_config"], "model_type": "clip_vision_model"}
    if config.get("model_type") == "clip_vision_model":
        return {k: v for k, v in config.items() if k not in ("architectures", "transformers_version", "_name_or_path")}
    raise InputError(f"{origin}: mm_vision_tower must be a CLIP checkpoint (model_type clip or clip_vision_model), got {config.get('model_type')!r}")
