"""Which tensors of a checkpoint get quantized, under which names, and with which config.

The engine streams a checkpoint shard by shard; this module decides, once per build and without
loading a single weight, what transformers would do to every on-disk tensor if the model were
loaded with `from_pretrained(base, quantization_config=...)` and written back with
`save_pretrained`: quantize it, cast it, rename it or drop it. The decision is taken by
transformers' own code run on a model built on the meta device (its quantizer's
`preprocess_model`, `param_needs_quantization`, its dtype plan, its checkpoint conversion
mapping and `revert_weight_conversion`), never by a hand-written table, so that it follows the
installed transformers (written against 5.23).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError

SUPPORTED_METHODS = ("bnb-nf4", "bnb-fp4", "bnb-int8", "fp8")
_BNB_4BIT_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_FLOAT_DTYPES = ("float16", "bfloat16", "float32")
_QUANT_STORAGES = ("uint8", "int8", "float16", "bfloat16", "float32", "float64")

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


class QuantizeError(InputError, ValueError):
    """A quantization that cannot be done; the message says what, why, and what to do.

    An InputError (CLI exit 2): it is raised while planning, before any artifact is written.
    """


# --------------------------------------------------------------------------------------------
# Settings and refusals
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantSettings:
    """What the spec's `quantize:` block asks for, in the terms transformers' configs use.

    `dtype` is the dtype the model would be loaded in (`from_pretrained(dtype=...)`, "auto" reads
    config.json): transformers casts every weight to it *before* quantizing, so it changes bytes.
    `skip_modules` follows transformers exactly: left empty, transformers' default skips apply
    (lm_head / output embeddings, tied weights, the last parameter, `_keep_in_fp32_modules`);
    given, it *replaces* the default skips (only `_keep_in_fp32_modules` are still added), as
    `llm_int8_skip_modules` / `modules_to_not_convert` do in transformers.
    """

    method: str
    double_quant: bool = False
    blocksize: int = 64
    compute_dtype: str = "float32"
    quant_storage: str = "uint8"
    skip_modules: tuple[str, ...] = ()
    fp8_block_size: tuple[int, int] = (128, 128)
    llm_int8_threshold: float = 6.0
    dtype: str = "auto"

    def __post_init__(self) -> None:
        refuse_unsupported(self.method, cuda_available=torch.cuda.is_available())
        if self.blocksize not in _BNB_4BIT_BLOCKSIZES:
            raise QuantizeError(
                f"quantize.blocksize={self.blocksize} is not a bitsandbytes 4-bit block size; "
                f"use one of {_BNB_4BIT_BLOCKSIZES} (transformers always writes 64)"
            )
        if self.compute_dtype not in _FLOAT_DTYPES:
            raise QuantizeError(f"quantize.compute_dtype={self.compute_dtype!r} is not one of {_FLOAT_DTYPES}")
        if self.quant_storage not in _QUANT_STORAGES:
            raise QuantizeError(f"quantize.quant_storage={self.quant_storage!r} is not one of {_QUANT_STORAGES}")
        if self.dtype != "auto" and self.dtype not in _FLOAT_DTYPES:
            raise QuantizeError(f"dtype={self.dtype!r} is not 'auto' or one of {_FLOAT_DTYPES}")
        if len(self.fp8_block_size) != 2 or min(self.fp8_block_size) <= 0:
            raise QuantizeError(f"quantize.fp8_block_size={self.fp8_block_size} must be two positive integers")
        # Frozen dataclass: normalise list inputs (YAML) to tuples so settings stay hashable.
        object.__setattr__(self, "skip_modules", tuple(self.skip_modules))
        object.__setattr__(self, "fp8_block_size", tuple(int(x) for x in self.fp8_block_size))
        object.__setattr__(self, "llm_int8_threshold", float(self.llm_int8_threshold))

    @property
    def is_bnb(self) -> bool:
        return self.method.startswith("bnb-")

    @property
    def is_4bit(self) -> bool:
        return self.method in ("bnb-nf4", "bnb-fp4")


_REFUSALS: dict[str, str] = {
    "hqq": (
        "HQQ through transformers 5 is broken: quantizing on load raises NotImplementedError and a "
        "pre-quantized HQQ checkpoint loads without error but with random weights; use bnb-nf4 or fp8"
    ),
    "gptq": (
        "GPTQ needs calibration over the whole model (gptqmodel plus a calibration data set), "
        "which per-shard quantization cannot do; quantize with gptqmodel outside loadgraph, or use bnb-nf4/fp8"
    ),
    "awq": (
        "AWQ needs calibration over the whole model (autoawq plus a calibration data set), "
        "which per-shard quantization cannot do; quantize with autoawq outside loadgraph, or use bnb-nf4/fp8"
    ),
}


def refuse_unsupported(method: str, *, cuda_available: bool) -> None:
    """Raise QuantizeError, before any heavy work, for a method that cannot give a loadable result."""
    key = method.lower()
    if key in SUPPORTED_METHODS:
        return
    for prefix, reason in _REFUSALS.items():
        if key == prefix or key.startswith(prefix + "-") or key.startswith(prefix + "_"):
            raise QuantizeError(f"quantize.method={method!r} refused: {reason}")
    if key.startswith("eetq"):
        if not cuda_available:
            raise QuantizeError(
                f"quantize.method={method!r} refused: EETQ needs a CUDA GPU and the eetq hub kernel, and this "
                "host has no CUDA; run on a GPU host with transformers' EetqConfig, or use bnb-int8"
            )
        raise QuantizeError(
            f"quantize.method={method!r} refused: loadgraph writes no EETQ checkpoints (EETQ packs weights "
            "with its CUDA kernel at load time); load with transformers' EetqConfig instead, or use bnb-int8"
        )
    raise QuantizeError(f"quantize.method={method!r} is unknown; use one of {', '.join(SUPPORTED_METHODS)}")


# --------------------------------------------------------------------------------------------
# transformers quantization configs
# --------------------------------------------------------------------------------------------


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


def _json_dict(config_obj) -> dict[str, Any]:
    # Round-trip through JSON so enums (quant_method) and tuples read exactly as config.json holds them.
    return json.loads(json.dumps(config_obj.to_dict()))


def quantization_config(settings: QuantSettings) -> dict[str, Any]:
    """Exactly what transformers writes into config.json["quantization_config"] for these settings.

    (`QuantPlan.quant_config` is the same dict taken after transformers' quantizer has seen the
    model; they only differ where FP8 renames a legacy skip-module name.)
    """
    return _json_dict(transformers_quant_config(settings))


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


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

    def convert(self, name: str, tensor: torch.Tensor, *, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Output tensors (final on-disk names -> CPU tensors) for one base tensor.

        `device` is where the quantization kernel runs ("cpu" or "cuda"): bitsandbytes gives
        different bytes on CPU and CUDA, so it belongs in the unit's cache key.
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
        produced = _quantize(plan.memory_name, value, self.settings)
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


def _quantize(name: str, value: torch.Tensor, settings: QuantSettings) -> dict[str, torch.Tensor]:
    # Imported here: bnb.py and fp8.py import this module for QuantSettings/QuantizeError.
    if settings.method == "fp8":
        from .fp8 import quantize_tensor_fp8

        return quantize_tensor_fp8(name, value, settings.fp8_block_size)
    from .bnb import quantize_tensor_4bit, quantize_tensor_int8

    if settings.method == "bnb-int8":
        return quantize_tensor_int8(name, value, settings)
    return quantize_tensor_4bit(name, value, settings)


def _render_config_files(base_dir: str, dtype: torch.dtype, model_class: type, quant_config: dict) -> dict[str, str]:
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
    model, quantizer, dtype = _meta_model(base_dir, settings, model_class, on_disk)
    meta_sd = model.state_dict()
    forward = _forward_names(model, quantizer, list(on_disk), meta_sd)
    kept_in_memory = _saved_memory_names(model)
    dtype_of = _load_dtype_fn(model, dtype)

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
        rename = _revert_names(model, _output_names(memory_name, settings if needs_quant else None))
        if not needs_quant:
            plans[disk_name] = TensorPlan(disk_name, "keep", load_dtype, memory_name, rename)
            continue
        transpose = _is_conv1d(model, memory_name)
        if settings.method == "fp8":
            _refuse_untileable(disk_name, on_disk[disk_name][1], settings.fp8_block_size)
        plans[disk_name] = TensorPlan(disk_name, "quantize", load_dtype, memory_name, rename, transpose)

    quant_config = _json_dict(quantizer.quantization_config)
    return QuantPlan(
        base_dir=base_dir,
        settings=settings,
        dtype=dtype,
        model_class=type(model).__name__,
        tensors=plans,
        quant_config=quant_config,
        total_parameters=model.num_parameters(),
        config_files=_render_config_files(base_dir, dtype, type(model), quant_config),
    )


def _meta_model(base_dir: str, settings: QuantSettings, model_class: type | None, on_disk: Mapping):
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


def _forward_names(model, quantizer, disk_names: list[str], meta_sd: Mapping) -> dict[str, tuple[str | None, bool]]:
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


def _saved_memory_names(model) -> set[str]:
    """In-memory names `save_pretrained` writes: the state dict minus the tied duplicates."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    model.tie_weights()
    names = set(remove_tied_weights_from_state_dict(model.state_dict(), model))
    return names - set(model._keys_to_ignore_on_save or ())


def _load_dtype_fn(model, dtype: torch.dtype):
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


def _revert_names(model, memory_names: list[str]) -> dict[str, str]:
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


def _converter_plan(
    model, settings, disk_name, memory_name, sources, needs_quant, load_dtype, on_disk
) -> TensorPlan:
    """A tensor that transformers merges with others on load (MoE experts) and splits again on save.

    Merge-then-split leaves each tensor's bytes as they were (after the dtype cast) as long as
    the split gives back the on-disk names; that is checked, not assumed.
    """
    meta = model.state_dict()[memory_name]
    reverted = set(_revert_whole(model, memory_name, meta))
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


def _revert_whole(model, memory_name: str, meta: torch.Tensor) -> dict[str, torch.Tensor]:
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, {memory_name: torch.empty(meta.shape, dtype=meta.dtype, device="meta")})


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


def _is_conv1d(model, memory_name: str) -> bool:
    """GPT-2 style Conv1D stores (in, out); transformers transposes before quantizing."""
    from transformers.pytorch_utils import Conv1D

    module = model.get_submodule(memory_name.rsplit(".", 1)[0])
    return isinstance(getattr(module, "source_cls", None), type) and issubclass(module.source_cls, Conv1D)


def _refuse_untileable(disk_name: str, shape: tuple[int, ...], block: tuple[int, int]) -> None:
    # transformers' Fp8Quantize silently leaves such a weight unquantized, which an FP8 model then
    # cannot load on GPU (no weight_scale_inv): refuse instead, naming the way out.
    if len(shape) < 2 or shape[-2] % block[0] or shape[-1] % block[1]:
        raise QuantizeError(
            f"{disk_name}: shape {list(shape)} is not a multiple of the FP8 block {list(block)}; "
            "add its module to quantize.skip_modules or choose a block size that divides it"
        )
