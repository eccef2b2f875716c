"""transformers' loader run on a meta-device model: the model class, the quantizer's module swaps,
the checkpoint's renames (forward and back), the dtype plan and what `save_pretrained` keeps.

Nothing here holds a weight: every answer comes from transformers' own code on meta tensors,
so formats/quant_plan.py follows the installed transformers instead of a hand-written table.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from .quant_config import transformers_quant_config
from .quant_settings import QuantizeError, QuantSettings


def meta_model(base_dir: str, settings: QuantSettings, model_class: type | None, on_disk: Mapping):
    """The model transformers would quantize into, built on the meta device (no weight memory).

    Mirrors `PreTrainedModel.from_pretrained`: resolve the dtype, instantiate under the class's
    own init context (meta device, default dtype), then let the quantizer swap modules.
    """
    from transformers import AutoConfig
    from transformers.modeling_utils import _get_dtype
    from transformers.quantizers.auto import AutoHfQuantizer
    from transformers.utils.generic import ContextManagers

    try:
        config = AutoConfig.from_pretrained(base_dir)
    except (OSError, ValueError, KeyError) as err:  # no config.json, custom code, unknown model_type
        raise QuantizeError(f"{base_dir}/config.json: transformers cannot build this model ({err})") from err
    if getattr(config, "quantization_config", None) is not None:
        raise QuantizeError(
            f"{base_dir}/config.json already has a quantization_config: the base is quantized; "
            "start from a full-precision checkpoint"
        )
    cls = model_class or _model_class(config, base_dir)
    quantizer = AutoHfQuantizer.from_config(transformers_quant_config(settings), pre_quantized=False)
    files = [str(Path(base_dir) / f) for f in sorted({f for f, _ in on_disk.values()})]
    config, dtype = _get_dtype(settings.dtype, files, config, None, None, True, quantizer)
    with ContextManagers(cls.get_init_context(dtype, True, False, None)):
        model = cls(config)
        quantizer.preprocess_model(model=model, dtype=dtype, device_map={"": "cpu"}, checkpoint_files=files)
    return model, quantizer, dtype


def _model_class(config, base_dir: str) -> type:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise QuantizeError(
            f"{base_dir}/config.json: no transformers class for architectures={config.architectures}; "
            "pass model_class explicitly"
        ) from None


def forward_names(model, quantizer, disk_names: list[str], meta_sd: Mapping) -> dict[str, tuple[str | None, bool]]:
    """on-disk name -> (in-memory name or None if transformers ignores it, whether a converter merged it).

    Same renaming transformers' loader applies (model conversion mapping incl. legacy renames and
    base_model_prefix handling); the transforms that matched are kept on the model as
    `_weight_conversions`, exactly as `from_pretrained` leaves them for `save_pretrained`.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    conversions = get_model_conversion_mapping(model, None, quantizer)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    prefix = model.base_model_prefix
    result: dict[str, tuple[str | None, bool]] = {}
    for key in sorted(disk_names, key=dot_natural_key):
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta_sd)
        if renamed not in meta_sd and key in meta_sd:
            renamed, pattern = rename_source_key(key, [], [], prefix, meta_sd)
        # A source pattern is only returned when a WeightConverter (a merge) matched.
        result[key] = (renamed, pattern is not None) if renamed in meta_sd else (None, False)
    model._weight_conversions = [c for c in conversions if c.was_used()]
    return result


def saved_memory_names(model) -> set[str]:
    """In-memory names `save_pretrained` writes: the state dict minus the tied duplicates."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    model.tie_weights()
    names = set(remove_tied_weights_from_state_dict(model.state_dict(), model))
    return names - set(model._keys_to_ignore_on_save or ())


def load_dtype_fn(model, dtype: torch.dtype):
    """The dtype transformers' loader casts each checkpoint tensor to (core_model_loading, step 3)."""
    from transformers.core_model_loading import build_glob_alternation

    dtype_plan = model._get_dtype_plan(dtype)
    if dtype_plan:
        alternation, group_to_glob, _ = build_glob_alternation(list(dtype_plan))

    def load_dtype(memory_name: str, empty_param: torch.Tensor, needs_quant: bool) -> torch.dtype:
        if dtype_plan and (match := alternation.search(memory_name)) is not None:
            return dtype_plan[group_to_glob[match.lastgroup]]
        if empty_param.dtype != dtype and not needs_quant:
            return empty_param.dtype
        return dtype

    return load_dtype


def revert_names(model, memory_names: list[str]) -> dict[str, str]:
    """in-memory name -> on-disk name that `save_pretrained` writes, through `revert_weight_conversion`.

    Each name goes alone through transformers' reverse mapping (meta tensors, no memory), so the
    correspondence is exact; LLaVA's `model.language_model.*` -> `language_model.model.*` lands here.
    """
    from transformers.core_model_loading import revert_weight_conversion

    mapping = {}
    for name in memory_names:
        reverted = revert_weight_conversion(model, {name: torch.empty(0, device="meta")})
        if len(reverted) != 1:
            raise QuantizeError(f"{name}: transformers saves it as {sorted(reverted)}; a 1:1 rename was expected")
        mapping[name] = next(iter(reverted))
    return mapping


def revert_whole(model, memory_name: str, meta: torch.Tensor) -> dict[str, torch.Tensor]:
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, {memory_name: torch.empty(meta.shape, dtype=meta.dtype, device="meta")})


def is_conv1d(model, memory_name: str) -> bool:
    """GPT-2 style Conv1D stores (in, out); transformers transposes before quantizing."""
    from transformers.pytorch_utils import Conv1D

    module = model.get_submodule(memory_name.rsplit(".", 1)[0])
    return isinstance(getattr(module, "source_cls", None), type) and issubclass(module.source_cls, Conv1D)
