"""Loader options in LLaVA's vocabulary, turned into what transformers 5 accepts.

Each function normalises one argument and fails with a message naming it, so that a typo in
`torch_dtype` is an error rather than LLaVA's `pdb.set_trace()`.
"""

from __future__ import annotations

import warnings
from typing import Any

from loadgraph.loading.dispatch import LoadingError

DTYPES = ("float16", "bfloat16", "float32", "auto")
FLASH_ATTENTION = {"flash_attention_2": "is_flash_attn_2_available", "flash_attention_3": "is_flash_attn_3_available"}
ATTENTION = ("eager", "sdpa", "flex_attention", *FLASH_ATTENTION)


def spec_dtype(torch_dtype: Any) -> str:
    """"float16" | "bfloat16" | "float32" | "auto" (or the torch.dtype) -> the spec's dtype name."""
    import torch

    if isinstance(torch_dtype, torch.dtype):
        torch_dtype = str(torch_dtype).removeprefix("torch.")
    if torch_dtype not in DTYPES:
        raise LoadingError(f"torch_dtype: {torch_dtype!r} is not one of {', '.join(DTYPES)}")
    return torch_dtype


def torch_dtype_of(name: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def device_map_arg(device_map: Any) -> Any:
    """"auto" | "cpu" | "cuda" | "cuda:N" | dict, checked against the devices this process has."""
    import torch

    if isinstance(device_map, dict) or device_map in ("auto", "cpu", None):
        return device_map
    if isinstance(device_map, str) and (device_map == "cuda" or device_map.startswith("cuda:")):
        if not torch.cuda.is_available():
            raise LoadingError(f"device_map={device_map!r} but torch sees no CUDA device here; use 'cpu' or 'auto'")
        return device_map
    if isinstance(device_map, (str, torch.device, int)):
        return device_map
    raise LoadingError(f"device_map: {device_map!r} is not 'auto', 'cpu', 'cuda' or a {{module: device}} dict")


def attention_arg(attn_implementation: str | None) -> str | None:
    """LLaVA defaults to flash_attention_2; without flash-attn (or CUDA) that would raise ImportError
    in transformers, so fall back to sdpa with one warning instead of crashing."""
    if attn_implementation is None:
        return None
    if attn_implementation not in ATTENTION:
        raise LoadingError(f"attn_implementation: {attn_implementation!r} is not one of {', '.join(ATTENTION)}")
    check = FLASH_ATTENTION.get(attn_implementation)
    if check is not None:
        import transformers.utils as tf_utils

        if not getattr(tf_utils, check)():
            warnings.warn(
                f"attn_implementation={attn_implementation!r} needs the flash-attn package and a CUDA GPU, "
                "which this machine lacks; using 'sdpa' instead",
                UserWarning,
                stacklevel=3,
            )
            return "sdpa"
    return attn_implementation


def context_length(config: Any) -> int:
    """LLaVA's rule: max_sequence_length, else max_position_embeddings, else 2048.

    Composite configs (LLaVA in transformers) keep these on the text config, so look there too.
    """
    configs = [config]
    get_text = getattr(config, "get_text_config", None)
    if get_text is not None and get_text() is not config:
        configs.append(get_text())
    for attr in ("max_sequence_length", "max_position_embeddings"):
        for cfg in configs:
            value = getattr(cfg, attr, None)
            if isinstance(value, int) and value > 0:
                return value
    return 2048


ROPE_KEYS = ("rope_scaling", "rope_parameters", "rope_theta")


def apply_overrides(config: Any, overrides: dict[str, Any] | None, origin: str = "overwrite_config") -> Any:
    """LLaVA's `overwrite_config`: setattr each key on the config before the model is built.

    Keys in LLaVA's vocabulary (`mm_vision_select_layer`, ...) also set transformers' name for
    them. A key the top-level config lacks but its text config has (norm eps of a LLaVA model) is
    set there, since transformers' LLaVA reads it from the text config; RoPE keys likewise (see
    set_rope).
    """
    if not overrides:
        return config
    if not isinstance(overrides, dict):
        raise LoadingError(f"{origin}: expected a mapping of config keys to values, got {type(overrides).__name__}")
    from loadgraph.errors import InputError
    from loadgraph.formats.llava_original import ARCHITECTURE_KEYS, translated_overrides

    for key in ARCHITECTURE_KEYS:
        if key in overrides and getattr(config, key, overrides[key]) != overrides[key]:
            raise InputError(f"{origin}: {key} changes the model's modules, not a setting; these weights were saved for {getattr(config, key)!r}")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key, value in translated_overrides(overrides, origin).items():
        if key in ROPE_KEYS:
            set_rope(text, key, value, origin)
            continue
        target = text if text is not config and not hasattr(config, key) and hasattr(text, key) else config
        setattr(target, key, value)
    return config


def set_rope(config: Any, key: str, value: Any, origin: str) -> None:
    """transformers 4's `rope_scaling` ({"type": "linear", "factor": 2.0}, LLaVA's vocabulary) or
    `rope_theta`, onto transformers 5's `rope_parameters` (which holds rope_type and rope_theta).

    Setting `rope_scaling` on a transformers 5 config replaces rope_parameters whole and loses
    rope_theta (a TypeError at the first forward); here the theta is kept, "type" becomes
    "rope_type" the way transformers standardises a config.json, and the result is validated.
    """
    current = dict(getattr(config, "rope_parameters", None) or {})
    theta = current.get("rope_theta", getattr(config, "default_theta", 10000.0))
    if key == "rope_theta":
        new = {**current, "rope_theta": value}
    elif value is None:  # LLaVA's "no scaling"
        new = {"rope_type": "default", "rope_theta": theta}
    elif isinstance(value, dict):
        new = {k: v for k, v in value.items() if k != "type"}
        new.setdefault("rope_type", value.get("type", "default"))
        new.setdefault("rope_theta", theta)
    else:
        raise LoadingError(f"{origin}: {key} must be a mapping like {{'type': 'linear', 'factor': 2.0}} or None, got {value!r}")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if new.get("rope_type") not in ("default", *ROPE_INIT_FUNCTIONS):
        raise LoadingError(f"{origin}: {key} type {new.get('rope_type')!r} is not one of default, {', '.join(sorted(ROPE_INIT_FUNCTIONS))}")
    config.rope_parameters = new
    config.standardize_rope_params()
    try:
        config.validate_rope()
    except (KeyError, ValueError, TypeError) as exc:
        raise LoadingError(f"{origin}: {key}={value!r} is not a valid RoPE setting: {exc}") from None
