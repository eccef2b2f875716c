"""A quantization plan guessed from the checkpoint's headers and config, without transformers.

formats/quant_plan.py derives the plan from transformers' quantizer on a meta-device model (the
imports and the model cost seconds). For the common case, a bitsandbytes 4-bit quantization with
transformers' default skips of a decoder LM stored under its in-memory names (Llama, Qwen,
Mistral), that plan is: every 2-D weight of the decoder layers quantized under its own name and
companions, every other tensor kept, all cast to the load dtype. A local build quantizes on this
guess while the real plan is derived beside it (pipeline/check_process.py) and publishes only if
the two agree on everything a unit writes (`unit_fingerprint`); the guess is never the authority.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .quant_plan import _BNB_4BIT_SUFFIXES, QuantPlan, TensorPlan
from .quant_settings import QuantSettings

LAYERS = "model.layers."


def guess_quant_plan(base_dir: Path, tensors: dict[str, dict], settings: QuantSettings) -> QuantPlan | None:
    """The guess, or None outside the case above (other methods, skip lists, tied or prequantized
    checkpoints, no dtype to load in). Its configs and parameter count are left to the real plan: the
    units do not use them, the node's finalize (after the confirmation) does."""
    if not settings.is_4bit or settings.skip_modules:
        return None
    try:
        config = json.loads((Path(base_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("quantization_config") or config.get("tie_word_embeddings"):
        return None
    # "auto" loads in the dtype config.json records (transformers 5's `dtype`, earlier `torch_dtype`).
    named = settings.dtype if settings.dtype != "auto" else config.get("dtype") or config.get("torch_dtype")
    if named not in ("float16", "bfloat16", "float32"):
        return None
    dtype = getattr(torch, named)
    plans: dict[str, TensorPlan] = {}
    for name, t in tensors.items():
        if name.startswith(LAYERS) and name.endswith(".weight") and len(t["shape"]) == 2:
            plans[name] = TensorPlan(name, "quantize", dtype, name, {name + s: name + s for s in _BNB_4BIT_SUFFIXES})
        else:
            plans[name] = TensorPlan(name, "keep", dtype, name, {name: name})
    return QuantPlan(str(base_dir), settings, dtype, (config.get("architectures") or [""])[0], plans, quant_config={})


def unit_fingerprint(plan: QuantPlan) -> str:
    """What a quantize unit's bytes and the layout follow from: the settings, the load dtype and
    each tensor's fate, dtype, names and orientation (not the reasons, configs or counts)."""
    from .digest import digest_bytes

    fates = sorted((n, t.kind, str(t.dtype), t.memory_name, sorted(t.rename.items()), t.transpose) for n, t in plan.tensors.items())
    return digest_bytes(repr((plan.settings, str(plan.dtype), fates)).encode())
