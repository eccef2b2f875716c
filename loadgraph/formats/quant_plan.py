"""Which tensors of a checkpoint get quantized, under which names, and with which config.

The engine streams a checkpoint shard by shard; this module decides, once per build and without
loading a single weight, what transformers would do to every on-disk tensor if the model were
loaded with `from_pretrained(base, quantization_config=...)` and written back with
`save_pretrained`: quantize it, cast it, rename it or drop it. The decision is taken by
transformers' own code run on a model built on the meta device (its quantizer's
`preprocess_model`, `param_needs_quantization`, its dtype plan, its checkpoint conversion
mapping and `revert_weight_conversion`), never by a hand-written table, so that it follows the
installed transformers (written against 5.23). That machinery is formats/quant_meta_model.py;
the settings are formats/quant_settings.py, transformers' config objects and files formats/quant_config.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .bnb import quantize_tensor_4bit, quantize_tensor_int8
from .fp8 import quantize_tensor_fp8
from .quant_config import as_json_dict, render_config_files
from .quant_meta_model import (
    forward_names,
    is_conv1d,
    load_dtype_fn,
    meta_model,
    revert_names,
    revert_whole,
    saved_memory_names,
)
from .quant_settings import QuantizeError, QuantSettings

# Companions that bitsandbytes/transformers serialize next to a quantized `weight`, relative to it
# ("" is the weight itself). Every possible one is mapped at plan time, whatever the settings emit.
_BNB_4BIT_SUFFIXES = (
    "",
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
    ".quant_state.bitsandbytes__nf4",
    ".quant_state.bitsandbytes__fp4",
)
# int8 companions hang off the module, not off the weight: `<module>.SCB`, `<module>.weight_format`.
_BNB_INT8_MODULE_SUFFIXES = (".SCB", ".weight_format")
_FP8_MODULE_SUFFIXES = (".weight_scale_inv",)


@dataclass(frozen=True)
class TensorPlan:
    """What becomes of one on-disk tensor of the base checkpoint.

    kind: "quantize" | "keep" | "drop". `dtype`: what transformers casts it to on load (before
    quantizing). `memory_name`: the name the quantize functions are called with (its name in the
    transformers model; the on-disk name for merged MoE tensors). `rename`: names those functions
    produce -> names written to disk, for every possible output tensor. `transpose`:
    Conv1D weights (GPT-2) are quantized transposed, as transformers does.
    """

    name: str
    kind: str
    dtype: torch.dtype | None = None
    memory_name: str | None = None
    rename: Mapping[str, str] = field(default_factory=dict)
    transpose: bool = False
    reason: str = ""


@dataclass
class QuantPlan:
    """Per-tensor decisions for one (base checkpoint, settings) pair; cheap to build and to pickle."""

    base_dir: str
    settings: QuantSettings
    dtype: torch.dtype
    model_class: str
    tensors: dict[str, TensorPlan]
    quant_config: dict[str, Any]
    # What save_pretrained puts in model.safetensors.index.json["metadata"]["total_parameters"]
    # (`num_parameters()` of the quantized model: 4-bit weights count unpacked, FP8 scales count).
    total_parameters: int = 0
    # file name -> exact text save_pretrained writes (config.json, generation_config.json).
    config_files: dict[str, str] = field(default_factory=dict)

    def quantized_names(self) -> set[str]:
        return {n for n, t in self.tensors.items() if t.kind == "quantize"}

    def dropped_names(self) -> set[str]:
        return {n for n, t in self.tensors.items() if t.kind == "drop"}

    def convert(self, name: str, tensor: torch.Tensor, *, device: str | torch.device = "cpu",
                offset_threads: int | None = None) -> dict[str, torch.Tensor]:
        """Output tensors (final on-disk names -> CPU tensors) for one base tensor.

        `device` is where the quantization kernel runs ("cpu" or "cuda"): bitsandbytes gives
        different bytes on CPU and CUDA, so it belongs in the unit's cache key. So does
        `offset_threads`, the torch thread count whose rounding a CPU double quant follows
        (formats/bnb_blocks.py).
        """
        plan = self.tensors.get(name)
        if plan is None:
            raise QuantizeError(f"tensor {name!r} is not in the checkpoint this plan was made for ({self.base_dir})")
        if plan.kind == "drop":
            return {}
        # Same cast as transformers' loader: to the load dtype first, then (maybe) quantize.
        value = tensor.to(device=device, dtype=plan.dtype)
        if plan.kind == "keep":
            return {plan.rename[plan.memory_name]: value.cpu().contiguous()}
        if plan.transpose:
            value = value.T
        produced = _quantize(plan.memory_name, value, self.settings, offset_threads)
        return {plan.rename[k]: v.cpu().contiguous() for k, v in produced.items()}

    def output_config(self) -> dict[str, Any]:
        """config.json of the quantized checkpoint, as `save_pretrained` of the loaded model writes it."""
        return json.loads(self.config_files["config.json"])

    def write_configs(self, out_dir: str | os.PathLike) -> list[str]:
        """Write config.json (and generation_config.json for generative models); returns the file names.

        The texts were rendered at plan time by transformers' own serializers (`to_json_string`,
        what `save_pretrained` writes), so a worker needs neither the base directory nor its config.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for file_name, text in self.config_files.items():
            (out / file_name).write_text(text, encoding="utf-8")
        return sorted(self.config_files)


def _quantize(name: str, value: torch.Tensor, settings: QuantSettings, offset_threads: int | None = None) -> dict[str, torch.Tensor]:
    if settings.method == "fp8":
        return quantize_tensor_fp8(name, value, settings.fp8_block_size)
    if settings.method == "bnb-int8":
        return quantize_tensor_int8(name, value, settings)
    return quantize_tensor_4bit(name, value, settings, offset_threads)


# --------------------------------------------------------------------------------------------
# Building the plan
# --------------------------------------------------------------------------------------------


def quantizable_tensors(base_dir: str | os.PathLike, settings: QuantSettings) -> set[str]:
    """On-disk names of the base tensors that get quantized (see `plan_quantization`)."""
    return plan_quantization(base_dir, settings).quantized_names()


def checkpoint_tensors(base_dir: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors file, shape) for every tensor of a safetensors checkpoint (headers only)."""
    from safetensors import safe_open

    base = Path(base_dir)
    index = base / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (base / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise QuantizeError(
            f"{base}: no model.safetensors or model.safetensors.index.json; quantization reads safetensors "
            "only (convert .bin weights first, with source.allow_pickle)"
        )
    table: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in files:
        with safe_open(str(base / file), "pt") as handle:
            for key in handle.keys():
                table[key] = (file, tuple(handle.get_slice(key).get_shape()))
    return table


def plan_quantization(
    base_dir: str | os.PathLike, settings: QuantSettings, *, model_class: type | None = None
) -> QuantPlan:
    """Decide every base tensor's fate exactly as transformers' quantize-on-load + save would.

    `model_class` defaults to config.architectures[0] (what `save_pretrained` recorded), else the
    AutoModelForCausalLM class; pass the class the checkpoint is meant to load with if it differs.
    """
    base_dir = str(base_dir)
    on_disk = checkpoint_tensors(base_dir)
    model, quantizer, dtype = meta_model(base_dir, settings, model_class, on_disk)
    meta_sd = model.state_dict()
    forward = forward_names(model, quantizer, list(on_disk), meta_sd)
    kept_in_memory = saved_memory_names(model)
    dtype_of = load_dtype_fn(model, dtype)

    groups: dict[str, list[str]] = {}
    for disk_name, (memory_name, _) in forward.items():
        if memory_name is not None:
            groups.setdefault(memory_name, []).append(disk_name)
    _refuse_missing(base_dir, meta_sd, groups, kept_in_memory, model, quantizer)

    plans: dict[str, TensorPlan] = {}
    for disk_name, (memory_name, from_converter) in forward.items():
        if memory_name is None:
            plans[disk_name] = TensorPlan(disk_name, "drop", reason="not a parameter of the model: not loaded")
            continue
        if memory_name not in kept_in_memory:
            plans[disk_name] = TensorPlan(disk_name, "drop", reason="tied weight: save_pretrained keeps the other")
            continue
        needs_quant = quantizer.param_needs_quantization(model, memory_name)
        load_dtype = dtype_of(memory_name, meta_sd[memory_name], needs_quant)
        if from_converter:
            plans[disk_name] = _converter_plan(
                model, settings, disk_name, memory_name, groups[memory_name], needs_quant, load_dtype, on_disk
            )
            continue
        rename = revert_names(model, _output_names(memory_name, settings if needs_quant else None))
        if not needs_quant:
            plans[disk_name] = TensorPlan(disk_name, "keep", load_dtype, memory_name, rename)
            continue
        transpose = is_conv1d(model, memory_name)
        if settings.method == "fp8":
            _refuse_untileable(disk_name, on_disk[disk_name][1], settings.fp8_block_size)
        plans[disk_name] = TensorPlan(disk_name, "quantize", load_dtype, memory_name, rename, transpose)

    quant_config = as_json_dict(quantizer.quantization_config)
    return QuantPlan(
        base_dir=base_dir,
        settings=settings,
        dtype=dtype,
        model_class=type(model).__name__,
        tensors=plans,
        quant_config=quant_config,
        total_parameters=model.num_parameters(),
        config_files=render_config_files(base_dir, dtype, type(model), quant_config),
    )


def _output_names(memory_name: str, settings: QuantSettings | None) -> list[str]:
    """Every in-memory name the quantize functions may emit for this weight (just itself if kept)."""
    if settings is None:
        return [memory_name]
    module = memory_name.rsplit(".", 1)[0]
    if settings.is_4bit:
        return [memory_name + s for s in _BNB_4BIT_SUFFIXES]
    if settings.method == "bnb-int8":
        return [memory_name] + [module + s for s in _BNB_INT8_MODULE_SUFFIXES]
    return [memory_name] + [module + s for s in _FP8_MODULE_SUFFIXES]


def _converter_plan(
    model, settings, disk_name, memory_name, sources, needs_quant, load_dtype, on_disk
) -> TensorPlan:
    """A tensor that transformers merges with others on load (MoE experts) and splits again on save.

    Merge-then-split leaves each tensor's bytes as they were (after the dtype cast) as long as
    the split gives back the on-disk names; that is checked, not assumed.
    """
    meta = model.state_dict()[memory_name]
    reverted = set(revert_whole(model, memory_name, meta))
    if reverted != set(sources):
        raise QuantizeError(
            f"{disk_name}: transformers merges it into {memory_name} and saves that as {sorted(reverted)[:3]}..., "
            "not under the original names; per-tensor quantization cannot follow this architecture"
        )
    if not needs_quant:
        return TensorPlan(disk_name, "keep", load_dtype, disk_name, {disk_name: disk_name}, reason=f"merged into {memory_name}")
    if settings.method != "fp8":  # bnb only quantizes nn.Linear, never merged parameters
        raise QuantizeError(f"{disk_name}: merged parameter {memory_name} unexpectedly marked for bnb quantization")
    # FP8 experts: transformers quantizes the merged (E, rows, cols) tensor in 2-D blocks over the
    # last two dims and splits weight and scales back per expert on save; quantizing each expert
    # alone gives the same bytes when the per-expert rows and cols are multiples of the block.
    _refuse_untileable(disk_name, on_disk[disk_name][1], settings.fp8_block_size)
    names = _output_names(disk_name, settings)
    return TensorPlan(disk_name, "quantize", load_dtype, disk_name, {n: n for n in names}, reason=f"merged into {memory_name}")


def _refuse_missing(base_dir: str, meta_sd: Mapping, groups: Mapping, kept: set[str], model, quantizer) -> None:
    """transformers would fill parameters absent from the checkpoint with random values: refuse.

    FP8 modules hold their scales as parameters (`x.weight_scale_inv`, `experts.gate_up_proj_scale_inv`):
    those come out of quantizing `x.weight` / `experts.gate_up_proj`, not from the checkpoint.
    """
    def produced_by_quantization(name: str) -> bool:
        source = name.removesuffix("_scale_inv")
        return source != name and source in groups and quantizer.param_needs_quantization(model, source)

    missing = sorted(k for k in meta_sd if k not in groups and k in kept and not produced_by_quantization(k))
    if missing:
        raise QuantizeError(
            f"{base_dir}: checkpoint lacks {len(missing)} parameter(s) the model needs (e.g. {missing[0]}); "
            "transformers would initialise them randomly; fix the checkpoint or pass the right model_class"
        )


def _refuse_untileable(disk_name: str, shape: tuple[int, ...], block: tuple[int, int]) -> None:
    # transformers' Fp8Quantize silently leaves such a weight unquantized, which an FP8 model then
    # cannot load on GPU (no weight_scale_inv): refuse instead, naming the way out.
    if len(shape) < 2 or shape[-2] % block[0] or shape[-1] % block[1]:
        raise QuantizeError(
            f"{disk_name}: shape {list(shape)} is not a multiple of the FP8 block {list(block)}; "
            "add its module to quantize.skip_modules or choose a block size that divides it"
        )
