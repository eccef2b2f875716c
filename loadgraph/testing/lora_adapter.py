"""Random LoRA adapters made by the real PEFT (`get_peft_model` + `save_pretrained`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from loadgraph.testing.determinism import _generator, _seeded, _torch_dtype
from loadgraph.testing.tiny_models import _auto_model_class


def _randomise_trainable(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter the adapter will save seeded random values, so that merging matters.

    PEFT initialises ``lora_B`` (and ``lora_embedding_A``) to zeros, which makes a fresh adapter a
    no-op and a merge test vacuous. LoRA factors get N(0, 0.02); parameters that start from base
    values (DoRA magnitudes, trained biases, ``modules_to_save`` copies) are perturbed instead, so
    they stay plausible.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=_generator(seed, name), dtype=torch.float32)
            if "lora_magnitude_vector" in name:
                new = param.float() * (1.0 + 0.1 * noise)
            elif ".lora_" in name:
                new = 0.02 * noise
            else:
                new = param.float() + 0.02 * noise
            param.copy_(new.to(param.dtype))


def make_lora_adapter(
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    r: int = 8,
    lora_alpha: int = 16,
    target_modules: str | list[str] = "all-linear",
    seed: int = 0,
    use_rslora: bool = False,
    use_dora: bool = False,
    fan_in_fan_out: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, int] | None = None,
    modules_to_save: list[str] | None = None,
    bias: str = "none",
    dtype: str = "float32",
    kind: str | None = None,
) -> Path:
    """Make a random LoRA adapter for the checkpoint in ``base_dir`` with PEFT itself.

    Using ``get_peft_model`` + ``save_pretrained`` means key names, ``adapter_config.json`` and
    DoRA/rsLoRA/pattern handling are exactly PEFT's. ``dtype`` is the dtype the base is loaded in
    and the adapter weights are kept and saved in. ``kind`` picks the Auto class; by default the
    base's ``config.json`` decides. ``target_modules`` may name ``embed_tokens`` (embedding LoRA).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig

    base = Path(base_dir)
    out = Path(out_dir)
    model_type = kind if kind is not None else AutoConfig.from_pretrained(base).model_type
    model = _auto_model_class(model_type).from_pretrained(base, dtype=_torch_dtype(dtype))
    lora_config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=target_modules,
        use_rslora=use_rslora,
        use_dora=use_dora,
        fan_in_fan_out=fan_in_fan_out,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        bias=bias,
        lora_dropout=0.0,
    )
    with _seeded(seed):  # PEFT's own init draws from the global RNG
        peft_model = get_peft_model(model, lora_config, autocast_adapter_dtype=False)
    _randomise_trainable(peft_model, seed)
    saved_config = peft_model.peft_config["default"]
    for field in dataclasses.fields(saved_config):
        # "all-linear" expands to sets (target_modules, and target_parameters for fused MoE experts),
        # which PEFT writes in hash order, different in every process: sort them.
        value = getattr(saved_config, field.name)
        if isinstance(value, set):
            setattr(saved_config, field.name, sorted(value))
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out)
    return out
