"""`load_pretrained_model`: LLaVA's loader signature and behaviour, with the build cache underneath.

LLaVA merges LoRA adapters and quantizes in memory on every call. Here the same arguments
become a BuildSpec (base, adapters to merge, quantization), built through the content-addressed
cache; the model is then loaded from the artifact with transformers. A second call with the
same arguments finds every node cached and costs one `from_pretrained`.
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadgraph.errors import InputError
from loadgraph.loading.builder import BuiltArtifact, build_artifact
from loadgraph.loading.dispatch import Architecture, LoadingError, model_name_from_path, read_config, resolve_architecture
from loadgraph.loading.modeling import attach_adapters, llava_class, load_exact, resize_for_tokenizer
from loadgraph.loading.multimodal import add_image_tokens, load_image_processor, overlay_projector, projector_file
from loadgraph.loading.slow_tokenizer import slow_tokenizer
from loadgraph.loading.options import ROPE_KEYS, apply_overrides, attention_arg, context_length, device_map_arg, spec_dtype, torch_dtype_of
from loadgraph.spec import AdapterSpec, BuildSpec, MergeOptions, QuantizeSpec, Source, VerifySpec

# from_pretrained kwargs that describe the *source*: they shape the build, not the final load.
_SOURCE_KWARGS = ("revision", "trust_remote_code", "allow_pickle")


@dataclass(frozen=True)
class LoadPlan:
    """What the loader arguments mean, decided before any work."""

    spec: BuildSpec
    arch: Architecture
    projector: Path | None  # LLaVA projector weights to place on the built model
    llava: bool = False  # an original LLaVA checkpoint: the model is one of LLaVA's classes (llava_api)
    llava_config: dict | None = None  # its config.json as LLaVA wrote it (what customized_config is compared to)


def _is_adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def _local_dir(path: str, what: str, revision: str | None = None) -> Path:
    """A local directory, or a hub id found in the local hub cache (offline), as LLaVA accepts both."""
    from loadgraph.stages.fetch import REPO_ID, locate

    p = Path(path).expanduser()
    if p.is_dir():
        return p.absolute()
    if REPO_ID.match(path) and not p.exists():
        try:
            return locate(path, revision, what)[0]
        except LoadingError:
            raise
        except InputError as exc:
            raise LoadingError(str(exc)) from None
    raise LoadingError(f"{what}: {path} is not a directory (nor a hub repo id like org/name)")


def _source_name(path: str, local: Path) -> str:
    """What a spec names: the hub id itself (its commit enters the key), else the local directory."""
    return path if not Path(path).expanduser().exists() else str(local)


def plan_load(
    model_path: str,
    model_base: str | None,
    model_name: str,
    *,
    load_8bit: bool,
    load_4bit: bool,
    dtype: str,
    multimodal: bool,
    source_kwargs: dict[str, Any],
    verify: bool,
) -> LoadPlan:
    """LLaVA's branches (LoRA + base, projector + base, plain) as a BuildSpec."""
    if load_8bit and load_4bit:
        raise LoadingError("load_8bit and load_4bit are exclusive; pass at most one")
    path = _local_dir(model_path, "model_path", source_kwargs.get("revision"))
    if _original_llava_config(path) is not None:
        return _plan_original_llava(model_path, path, model_base, model_name, load_8bit=load_8bit, load_4bit=load_4bit, dtype=dtype,
                                    source_kwargs=source_kwargs, verify=verify)
    adapters: list[AdapterSpec] = []
    projector = None
    if model_base is None:
        if "lora" in model_name.lower():
            warnings.warn(
                "There is `lora` in model name but no `model_base` is provided. If you are loading a LoRA model, "
                "please provide the `model_base` argument.",
                UserWarning,
                stacklevel=3,
            )
        if _is_adapter_dir(path) and not (path / "config.json").is_file():
            raise LoadingError(f"model_path: {path} is a LoRA adapter without a model; pass its base as model_base")
        source = path
    else:
        source = _local_dir(model_base, "model_base")
        if _is_adapter_dir(path):
            adapters.append(AdapterSpec(path=str(path), mode="merge"))
        projector = projector_file(path)
        if not adapters and projector is None:
            raise LoadingError(
                f"model_path: {path} has neither adapter_config.json (a LoRA over model_base) nor projector weights "
                "(mm_projector.*); drop model_base to load model_path on its own"
            )
    arch = resolve_architecture(model_name, read_config(source, "model_base" if model_base else "model_path"), f"{source}/config.json", multimodal)
    quantize = _quantize_spec(load_4bit, load_8bit, dtype)
    spec = BuildSpec(
        name=model_name,
        source=Source(model=str(source), **{k: v for k, v in source_kwargs.items() if v is not None}),
        dtype=dtype,
        adapters=adapters,
        merge=llava_merge(dtype),
        quantize=quantize,
        # A plain load's artifact holds the source's own bytes: the strict load below is the check.
        # Verify where the build computed new weights (a merge, a quantization).
        verify=VerifySpec() if verify and (adapters or quantize) else None,
    )
    return LoadPlan(spec, arch, projector)


def llava_merge(dtype: str) -> MergeOptions:
    """LLaVA's builder merges with PEFT 0.10, which rounds an fp16 delta before adding it: the same
    bytes need the same rounding (bf16 and fp32 merges are PEFT's current ones)."""
    return MergeOptions(delta_rounding="twice" if dtype == "float16" else "once")


# LLaVA quantizes its language model only: its tower is loaded apart (unquantized) and kept so here,
# with the projector; lm_head is transformers' default skip.
MULTIMODAL_SKIPS = ["lm_head", "vision_tower", "multi_modal_projector"]


def _quantize_spec(load_4bit: bool, load_8bit: bool, dtype: str, multimodal: bool = False) -> QuantizeSpec | None:
    """LLaVA's BitsAndBytesConfig: NF4, double quantization, float16 compute (LLaVA fixes it); or int8."""
    skips = MULTIMODAL_SKIPS if multimodal else []
    if load_4bit:
        return QuantizeSpec(method="bnb-nf4", double_quant=True, compute_dtype="float16", skip_modules=skips)
    return QuantizeSpec(method="bnb-int8", skip_modules=skips) if load_8bit else None


# --- original-format LLaVA checkpoints (issue 9): the build's convert stage makes them transformers Llava ---
def _original_llava_config(path: Path) -> dict | None:
    from loadgraph.formats.llava_original import is_original_llava

    config = path / "config.json"
    if not config.is_file():
        return None
    doc = read_config(path, "model_path")
    return doc if is_original_llava(doc) else None


def _plan_original_llava(model_path: str, path: Path, model_base: str | None, model_name: str, *, load_8bit: bool, load_4bit: bool, dtype: str,
                         source_kwargs: dict[str, Any], verify: bool) -> LoadPlan:
    """A LLaVA-format model_path -> a spec whose graph converts it, keeping LLaVA's own layout.

    Full checkpoints convert alone; a projector-only one takes model_base as its language model;
    a LoRA output (adapter + non_lora_trainables) merges the adapter onto model_base first, as
    LLaVA's builder does (`PeftModel.from_pretrained(model, model_path).merge_and_unload()`).
    """
    from loadgraph.formats.llava_original import parse_original
    from loadgraph.spec import ConvertSpec

    original = _original_llava_config(path) or {}
    info = parse_original(original, f"{path}/config.json", "llava")
    lora = _is_adapter_dir(path)
    if lora and model_base is None:
        raise LoadingError(f"model_path: {path} is a LLaVA LoRA output (adapter_config.json); pass the language model it was trained on as model_base")
    base = None if model_base is None else _source_name(model_base, _local_dir(model_base, "model_base"))
    adapters = [AdapterSpec(path=_source_name(model_path, path), mode="merge", allow_other_base=True)] if lora else []
    convert = ConvertSpec(model_base=base, base_adapters=adapters, layout="llava")
    arch = resolve_architecture(model_name, {"model_type": "llava", "text_config": {"model_type": info.text_type}}, f"{path}/config.json", True)
    quantize = _quantize_spec(load_4bit, load_8bit, dtype, multimodal=True)
    spec = BuildSpec(
        name=model_name,
        source=Source(model=_source_name(model_path, path), **{k: v for k, v in source_kwargs.items() if v is not None}),
        dtype=dtype,
        merge=llava_merge(dtype),
        quantize=quantize,
        convert=convert,
        # The llava layout copies bytes (the strict load below checks every name); its classes
        # are not the ones the verify stage loads.
        verify=None,
    )
    return LoadPlan(spec, arch, None, llava=True, llava_config=original)


def load_pretrained_model(
    model_path: str | os.PathLike,
    model_base: str | os.PathLike | None = None,
    model_name: str | None = None,
    load_8bit: bool = False,
    load_4bit: bool = False,
    device_map: Any = "auto",
    torch_dtype: Any = "float16",
    attn_implementation: str | None = "flash_attention_2",
    customized_config: Any = None,
    overwrite_config: dict[str, Any] | None = None,
    *,
    device: str = "cuda",
    use_flash_attn: bool = False,
    cache: Any = None,
    executor: str = "local",
    verify: bool = True,
    **kwargs: Any,
):
    """Drop-in for LLaVA's `load_pretrained_model`; returns (tokenizer, model, image_processor, context_len).

    Beyond LLaVA: `cache` (a Cache or directory; default $LOADGRAPH_CACHE), `executor`
    ("local" or "ray") and `verify` (run the build's verify stage) choose how the artifact is
    built. `revision`, `trust_remote_code` and `allow_pickle` describe the source and enter the
    build; every other keyword goes to `from_pretrained`. The model's `loadgraph_artifact`
    attribute holds the artifact key, path and build report. `device` and `use_flash_attn` are
    LLaVA's: a device other than "cuda" places the whole model there (`device_map={"": device}`),
    use_flash_attn asks for flash_attention_2.
    """
    if device != "cuda":
        device_map = {"": device}
    if use_flash_attn:
        attn_implementation = "flash_attention_2"
    model_path = str(model_path)
    model_name = model_name or model_name_from_path(model_path)
    multimodal = bool(kwargs.pop("multimodal", False))  # LLaVA-NeXT's flag for non-"llava" names
    source_kwargs = {k: kwargs.pop(k) for k in _SOURCE_KWARGS if k in kwargs}
    allow_pickle = bool(source_kwargs.get("allow_pickle", False))
    dtype = spec_dtype(torch_dtype)
    device_map = device_map_arg(device_map)
    attn = attention_arg(attn_implementation)

    plan = plan_load(
        model_path, None if model_base is None else str(model_base), model_name,
        load_8bit=load_8bit, load_4bit=load_4bit, dtype=dtype, multimodal=multimodal,
        source_kwargs=source_kwargs, verify=verify,
    )
    built = build_artifact(plan.spec, cache, executor)
    slow = wants_slow_tokenizer(model_name, model_base is not None, plan.arch.multimodal)
    tokenizer, model = _load_built(built, plan, dtype, device_map, attn, customized_config, overwrite_config, kwargs, source_kwargs, slow)
    if plan.projector is not None:
        overlay_projector(model, plan.projector, allow_pickle)

    image_processor = None
    if plan.arch.multimodal:
        add_image_tokens(tokenizer, model.config)
        resize_for_tokenizer(model, tokenizer)
        image_processor = load_image_processor(built.path)
        if plan.llava:
            model.image_processor = image_processor  # what get_vision_tower().image_processor returns
    model.eval()
    return tokenizer, model, image_processor, context_length(model.config)


# Bookkeeping keys of a config, not settings: never taken from a customized_config.
_CONFIG_META = ("architectures", "model_type", "transformers_version", "_name_or_path", "torch_dtype", "dtype", "auto_map")


def _llava_vocabulary(config: Any) -> bool:
    """A config in LLaVA's own shape (a language-model config with mm_* keys, or its dict), not transformers' Llava."""
    doc = config if isinstance(config, dict) else getattr(config, "__dict__", {})
    return "text_config" not in doc


def _changed_keys(customized: Any, original: dict) -> dict:
    """LLaVA builds its model from customized_config; its settings that differ from the checkpoint's
    own config.json are what it changes, applied here as overrides in LLaVA's vocabulary."""
    doc = dict(customized) if isinstance(customized, dict) else customized.to_dict()
    return {k: v for k, v in doc.items() if k not in _CONFIG_META and not k.startswith("_") and original.get(k, object()) != v
            and (k in original or k.startswith("mm_") or k in ROPE_KEYS)}


def wants_slow_tokenizer(model_name: str, has_base: bool, multimodal: bool) -> bool:
    """LLaVA's builder asks `use_fast=False` everywhere but MPT and a full LLaVA-Mistral (by name)."""
    name = model_name.lower()
    return "mpt" not in name and not (multimodal and not has_base and "mistral" in name)


def _load_built(built: BuiltArtifact, plan: LoadPlan, dtype: str, device_map, attn, customized_config, overwrite_config, kwargs, source_kwargs,
                slow: bool = False):
    from transformers import AutoConfig, AutoTokenizer

    trust = bool(source_kwargs.get("trust_remote_code", False))
    load_kwargs: dict[str, Any] = {"dtype": torch_dtype_of(dtype), "trust_remote_code": trust, **kwargs}
    if customized_config is not None or overwrite_config:
        # Only then is a config object passed: with one, from_pretrained hands the remaining
        # kwargs to the model's __init__ instead of the config (output_hidden_states=... and
        # friends would fail), so plain calls keep transformers' usual kwargs semantics.
        if customized_config is not None and not (plan.llava and _llava_vocabulary(customized_config)):
            config = copy.deepcopy(customized_config)  # LLaVA mutates the caller's object; do not
        else:
            config = AutoConfig.from_pretrained(str(built.path), trust_remote_code=trust)
            if customized_config is not None:
                config = apply_overrides(config, _changed_keys(customized_config, plan.llava_config or {}), "customized_config")
        load_kwargs["config"] = apply_overrides(config, overwrite_config)
    if device_map is not None:
        load_kwargs["device_map"] = device_map
    if attn is not None:
        load_kwargs["attn_implementation"] = attn
    model = load_exact(built.path, plan.arch, cls=llava_class(plan.arch.family, built.path) if plan.llava else None, **load_kwargs)
    model = attach_adapters(model, built.attached_adapters, trainable=False)
    tokenizer = (slow and slow_tokenizer(built.path)) or AutoTokenizer.from_pretrained(str(built.path), trust_remote_code=trust)
    model.loadgraph_artifact = built  # key, path and build report, for callers and tests
    return tokenizer, model
