"""`loadgraph.load(spec, trainable=True)`: a built artifact made ready to fine-tune.

The preparation repeats LLaMA-Factory's loader, patcher and adapter setup (model/loader.py,
patcher.py, model_utils/checkpointing.py, adapter.py) in the same order: tokenizer patches,
config patches, load, vocabulary resize, layernorm upcast + gradient checkpointing, then the
fine-tuning method (LoRA / OFT / freeze / full) with trainable parameters in fp32. The base it
starts from (adapters merged, QLoRA base quantized) comes from the build cache, so every
worker of a cluster loads the same bytes under the same key.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadgraph.loading.builder import BuiltArtifact, build_artifact, cached_artifact
from loadgraph.loading.dispatch import LoadingError, read_config, resolve_architecture
from loadgraph.loading.trainargs import TrainingArgs
from loadgraph.spec import BuildSpec

LAYERNORM_NAMES = ("norm", "ln")  # LLaMA-Factory's extras/constants.py
# LLaMA-Factory's COMPOSITE_MODELS entries (model_utils/visual.py).
_COMPOSITE = {
    "llava": {"projector": ("multi_modal_projector",), "vision": ("vision_tower",), "language": ("language_model", "lm_head")},
    "llava_next": {"projector": ("multi_modal_projector",), "vision": ("vision_tower",), "language": ("language_model", "lm_head")},
    **{t: {"projector": ("visual.merger",), "vision": ("visual.patch_embed", "visual.blocks"), "language": ("language_model", "lm_head")}
       for t in ("qwen2_vl", "qwen2_5_vl")},
    **{t: {"projector": ("visual.merger",), "vision": ("visual.pos_embed", "visual.patch_embed", "visual.blocks", "visual.deepstack_merger_list"),
           "language": ("language_model", "lm_head")} for t in ("qwen3_vl", "qwen3_vl_moe")},
}


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    processor: Any  # image processor of a multimodal model, else None
    artifact: BuiltArtifact
    training: TrainingArgs | None  # the preparation applied (None when not trainable)

    @property
    def key(self) -> str:
        return self.artifact.key


# --------------------------------------------------------------------------------------------
# spec resolution


def resolve_spec(spec: Any, trainable: bool, training: TrainingArgs | dict | None) -> tuple[BuildSpec, TrainingArgs]:
    """A BuildSpec, a spec file (native or LLaMA-Factory) or a spec mapping -> (build spec, training args)."""
    from loadgraph import llamafactory
    from loadgraph.spec import parse_spec

    base_dir = None
    origin = "spec"
    if isinstance(spec, (str, os.PathLike)):
        import yaml

        path = Path(spec)
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LoadingError(f"{path}: spec file not found") from None
        base_dir, origin = path.parent.absolute(), str(path)
    else:
        doc = spec
    if isinstance(doc, BuildSpec):
        build = doc
        lf_training: dict = {}
    elif llamafactory.is_llamafactory(doc):
        t = llamafactory.translate_doc(doc, origin, trainable=trainable, base_dir=base_dir)
        (build,) = parse_spec(t.build, origin, base_dir)
        lf_training = t.training
    else:
        targets = parse_spec(doc, origin, base_dir)
        if len(targets) != 1:
            raise LoadingError(f"{origin}: load() takes a spec with one target, not {len(targets)}")
        build, lf_training = targets[0], {}
    if isinstance(training, TrainingArgs):
        args = training
    else:
        try:
            args = TrainingArgs(**{**lf_training, **(training or {})})
        except ValueError as exc:
            raise LoadingError(f"{origin}: training arguments: {exc}") from None
    return build, args


# --------------------------------------------------------------------------------------------
# loading


def load(
    spec: Any,
    trainable: bool = False,
    *,
    training: TrainingArgs | dict | None = None,
    cache: Any = None,
    executor: str = "local",
    key: str | None = None,
    device_map: Any = "cpu",
    deepspeed_config: dict | None = None,
) -> LoadedModel:
    """Build `spec` through the cache (or take the cached artifact `key`) and load it.

    `spec` is a BuildSpec, a spec file (native or LLaMA-Factory YAML) or its mapping; the
    LLaMA-Factory keys that configure training (finetuning_type, lora_*, ...) become the
    training arguments, which `training` may override. With `key`, nothing is built: the
    artifact must already be in the cache (a worker loading what its driver built).
    `deepspeed_config` registers ZeRO-3 before the model is created (integrations/deepspeed.py).
    """
    import torch

    build, args = resolve_spec(spec, trainable, training)
    artifact = cached_artifact(key, cache) if key else build_artifact(build, cache, executor)
    arch = resolve_architecture("", read_config(artifact.path, "artifact"), f"{artifact.path}/config.json")
    tokenizer = _load_tokenizer(artifact.path, build.source.trust_remote_code, args if trainable else None)
    config = _patched_config(artifact.path, build, args if trainable else None)

    from loadgraph.loading.modeling import attach_adapters, load_exact
    from loadgraph.loading.options import attention_arg

    kwargs: dict[str, Any] = {"config": config, "trust_remote_code": build.source.trust_remote_code}
    if build.dtype != "auto":
        kwargs["dtype"] = getattr(torch, build.dtype)
    attn = attention_arg(args.attn_implementation) if trainable else None
    if attn:
        kwargs["attn_implementation"] = attn
    if deepspeed_config is None and device_map is not None:
        kwargs["device_map"] = device_map  # ZeRO-3 places parameters itself
    ds_handle = None
    if deepspeed_config is not None:
        from loadgraph.integrations.deepspeed import register_zero3

        ds_handle = register_zero3(deepspeed_config)  # before the model exists: ZeRO-3 partitions it on creation
    model = load_exact(artifact.path, arch, **kwargs)
    if ds_handle is not None:
        model.loadgraph_deepspeed_config = ds_handle  # transformers holds it weakly: keep it alive with the model
    if trainable:
        model = prepare_for_training(model, tokenizer, args, artifact, quantized=build.quantize is not None)
    else:
        # LLaMA-Factory's inference load: frozen, eval mode.
        model = attach_adapters(model, artifact.attached_adapters, trainable=False).requires_grad_(False).eval()
    processor = None
    if arch.multimodal:
        from loadgraph.loading.multimodal import load_image_processor

        processor = load_image_processor(artifact.path)
    model.loadgraph_artifact = artifact
    return LoadedModel(model, tokenizer, processor, artifact, args if trainable else None)


def _load_tokenizer(path: Path, trust: bool, args: TrainingArgs | None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust)
    if args is None:
        return tokenizer
    # LLaMA-Factory's patch_tokenizer: enlarge (never shrink) model_max_length, add tokens.
    if args.model_max_length is not None and (tokenizer.model_max_length or 0) < args.model_max_length:
        tokenizer.model_max_length = args.model_max_length
    if args.add_tokens:
        tokenizer.add_tokens(args.add_tokens, special_tokens=False)
    if args.add_special_tokens:
        tokenizer.add_tokens(args.add_special_tokens, special_tokens=True)
    return tokenizer


def _patched_config(path: Path, build: BuildSpec, args: TrainingArgs | None):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path), trust_remote_code=build.source.trust_remote_code)
    if args is not None:
        if args.moe_aux_loss_coef is not None:  # LLaMA-Factory's configure_moe
            config.router_aux_loss_coef = args.moe_aux_loss_coef
            config.output_router_logits = True
        # LLaMA-Factory's configure_kv_cache: no KV cache while training, checkpointing or not.
        for cfg in (config, getattr(config, "text_config", None)):
            if cfg is not None:
                cfg.use_cache = False
    return config


# --------------------------------------------------------------------------------------------
# training preparation


def prepare_for_training(model, tokenizer, args: TrainingArgs, artifact: BuiltArtifact, quantized: bool):
    """LLaMA-Factory's patch_model + init_adapter, in its order; returns the model to train."""
    import torch
    from transformers.integrations import is_deepspeed_zero3_enabled

    resize = args.resize_vocab or len(tokenizer) > tokenizer_base_size(tokenizer, args)
    if resize:
        _resize_vocab(model, tokenizer, quantized)
    _prepare_model(model, args)
    # LLaMA-Factory: trainable parameters go to fp32 unless pure bf16 or BAdam, or ZeRO-3 already
    # keeps fp32 masters (and the base is not quantized).
    cast_fp32 = not (args.pure_bf16 or args.use_badam) and not (not quantized and is_deepspeed_zero3_enabled())
    if args.finetuning_type == "full":
        _setup_full(model, args)
    elif args.finetuning_type == "freeze":
        _setup_freeze(model, args)
    else:
        model = _setup_peft(model, args, artifact, resize)
    if cast_fp32:
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.to(torch.float32)
    model.train()
    return model


def tokenizer_base_size(tokenizer, args: TrainingArgs) -> int:
    """The tokenizer's size before add_tokens/add_special_tokens (either one sets resize_vocab in LLaMA-Factory)."""
    added = [t for t in (args.add_tokens or []) + (args.add_special_tokens or []) if t in tokenizer.get_added_vocab()]
    return len(tokenizer) - len(added)


def _resize_vocab(model, tokenizer, quantized: bool) -> bool:
    """LLaMA-Factory's resize_embedding_layer: pad to a multiple of 64, noisy-mean new rows."""
    import torch

    weight = model.get_input_embeddings().weight
    current = getattr(weight, "ds_shape", weight.shape)[0]  # ZeRO-3 leaves an empty placeholder
    if len(tokenizer) <= current:
        return False
    if hasattr(weight, "ds_shape"):
        raise LoadingError("add_tokens: resizing embeddings partitioned by ZeRO-3 is not supported; add the tokens in a build first")
    if quantized:
        raise LoadingError("add_tokens: cannot resize the embedding layers of a quantized model (LLaMA-Factory's rule)")
    if not isinstance(model.get_output_embeddings(), torch.nn.Linear):
        raise LoadingError(f"add_tokens: {type(model).__name__} does not support resizing its embedding layers")
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=False)
    new = model.get_input_embeddings().weight.size(0) - current
    with torch.no_grad():
        for weight in {id(w): w for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)}.values():
            _noisy_mean(weight.data, new)
    return True


def _noisy_mean(weight, num_new: int) -> None:
    import torch

    mean = weight[:-num_new].mean(dim=0, keepdim=True)
    noise = torch.empty_like(weight[-num_new:]).normal_(mean=0, std=1.0 / math.sqrt(weight.size(1)))
    weight[-num_new:] = mean + noise


def _prepare_model(model, args: TrainingArgs) -> None:
    """LLaMA-Factory's prepare_model_for_training: layernorm upcast, checkpointing, lm_head upcast."""
    import torch
    from transformers.integrations import is_deepspeed_zero3_enabled

    if args.upcast_layernorm and not is_deepspeed_zero3_enabled():  # ZeRO-3 keeps fp32 masters itself
        for name, param in model.named_parameters():
            if param.ndim == 1 and any(ln in name for ln in LAYERNORM_NAMES):
                param.data = param.data.to(torch.float32)
    if not args.disable_gradient_checkpointing and getattr(model, "supports_gradient_checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": args.use_reentrant_gc})
        # Reentrant checkpointing needs an input that requires grad, which frozen embeddings
        # (LoRA, freeze) do not give; LLaMA-Factory marks inputs the same way.
        model.enable_input_require_grads()
    if args.upcast_lmhead_output:
        head = model.get_output_embeddings()
        if isinstance(head, torch.nn.Linear) and head.weight.dtype != torch.float32:
            head.register_forward_hook(lambda module, inputs, output: output.to(torch.float32))


def _forbidden_modules(model, args: TrainingArgs) -> set[str]:
    """LLaMA-Factory's get_forbidden_modules for composite (vision-language) models."""
    keys = _COMPOSITE.get(getattr(model.config, "model_type", None))
    if keys is None:
        return set()
    out: set[str] = set()
    if args.freeze_vision_tower:
        out.update(keys["vision"])
    if args.freeze_multi_modal_projector:
        out.update(keys["projector"])
    if args.freeze_language_model:
        out.update(keys["language"])
    return out


def _setup_full(model, args: TrainingArgs) -> None:
    forbidden = _forbidden_modules(model, args)
    for name, param in model.named_parameters():
        param.requires_grad_(not any(f in name for f in forbidden))


def _setup_freeze(model, args: TrainingArgs) -> None:
    """LLaMA-Factory's _setup_freeze_tuning: the last (or first) n layers, chosen modules, extras."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    num_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers", None)
    if not num_layers:
        raise LoadingError(f"finetuning_type freeze: {type(model).__name__} has no num_hidden_layers")
    n = args.freeze_trainable_layers
    if args.use_llama_pro:
        layer_ids = expanded_layer_ids(num_layers, n)
    else:
        layer_ids = range(max(0, num_layers - n), num_layers) if n > 0 else range(min(-n, num_layers))
    hidden, non_hidden = set(), set()
    for name, _ in model.named_parameters():
        if ".0." in name:
            hidden.add(name.split(".0.")[-1].split(".")[0])
        elif ".1." in name:
            hidden.add(name.split(".1.")[-1].split(".")[0])
        if re.search(r"\.\d+\.", name) is None:
            non_hidden.add(name.split(".")[-2])
    trainable = []
    for module in args.freeze_trainable_modules:
        if module != "all" and module not in hidden:
            raise LoadingError(f"freeze_trainable_modules: module {module!r} not found; choose from {', '.join(sorted(hidden))}")
        trainable += [f".{i:d}.{module if module != 'all' else ''}" for i in layer_ids]
    for module in args.freeze_extra_modules or []:
        if module not in non_hidden:
            raise LoadingError(f"freeze_extra_modules: module {module!r} not found; choose from {', '.join(sorted(non_hidden))}")
        trainable.append(module)
    keys = _COMPOSITE.get(getattr(model.config, "model_type", None))
    if not args.freeze_multi_modal_projector and keys is not None:
        trainable.extend(keys["projector"])  # LLaMA-Factory trains the projector on request
    forbidden = _forbidden_modules(model, args)
    for name, param in model.named_parameters():
        param.requires_grad_(any(t in name for t in trainable) and not any(f in name for f in forbidden))


def expanded_layer_ids(num_layers: int, n: int) -> range:
    """LLaMA Pro: the checkpoint's every (num_layers/n)-th layer is an added block; those train."""
    if n <= 0 or num_layers % n:
        raise LoadingError(f"use_llama_pro: num_hidden_layers {num_layers} is not divisible by freeze_trainable_layers {n}")
    stride = num_layers // n
    return range(stride - 1, num_layers + stride - 1, stride)


def all_linear_modules(model, freeze_vision_tower: bool) -> list[str]:
    """LLaMA-Factory's find_all_linear_modules: every Linear (bnb's too) but the head and the projector."""
    forbidden = {"lm_head"}
    keys = _COMPOSITE.get(getattr(model.config, "model_type", None))
    if keys is not None:
        forbidden.update(keys["projector"])
        if freeze_vision_tower:
            forbidden.update(keys["vision"])
    names = set()
    for name, module in model.named_modules():
        if any(f in name for f in forbidden):
            continue
        cls = type(module).__name__
        if "Linear" in cls and "Embedding" not in cls:
            names.add(name.split(".")[-1])
    return sorted(names)


def _target_modules(model, args: TrainingArgs, targets: list[str]) -> list[str]:
    if targets == ["all"]:
        targets = all_linear_modules(model, args.freeze_vision_tower)
    if args.use_llama_pro:  # LLaMA-Factory's find_expanded_modules
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        layers = [f".{i:d}." for i in expanded_layer_ids(config.num_hidden_layers, args.freeze_trainable_layers)]
        targets = [n for n, _ in model.named_modules() if any(t in n for t in targets) and any(layer in n for layer in layers)]
    forbidden = _forbidden_modules(model, args)
    if not forbidden:
        return targets
    # LLaMA-Factory's patch_target_modules: full module names, skipping frozen towers.
    return [n for n, _ in model.named_modules() if any(t in n for t in targets) and not any(f in n for f in forbidden)]


def _setup_peft(model, args: TrainingArgs, artifact: BuiltArtifact, resize_vocab: bool):
    from peft import LoraConfig, OFTConfig, TaskType, get_peft_model

    from loadgraph.loading.modeling import attach_adapters

    attached = artifact.attached_adapters
    if attached:
        if len(attached) > 1:
            raise LoadingError("training resumes a single attached adapter; merge the others in the spec")
        return attach_adapters(model, attached, trainable=True)  # LLaMA-Factory's adapter_to_resume
    additional = args.additional_target
    if resize_vocab and additional is None:
        # LLaMA-Factory: a resized vocabulary makes the embeddings and head trainable too.
        embeds = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
        additional = sorted({name.split(".")[-1] for name, module in model.named_modules() if id(module) in embeds})
    if args.finetuning_type == "lora":
        kwargs: dict[str, Any] = {}
        if args.pissa_init:
            kwargs["init_lora_weights"] = "pissa" if args.pissa_iter == -1 else f"pissa_niter_{args.pissa_iter}"
        config = LoraConfig(
            task_type=TaskType.CAUSAL_LM, inference_mode=False, r=args.lora_rank, lora_alpha=args.alpha,
            lora_dropout=args.lora_dropout, target_modules=_target_modules(model, args, args.lora_target),
            use_rslora=args.use_rslora, use_dora=args.use_dora, modules_to_save=additional, **kwargs,
        )
    else:
        config = OFTConfig(
            task_type=TaskType.CAUSAL_LM, inference_mode=False, r=args.oft_rank, oft_block_size=args.oft_block_size,
            target_modules=_target_modules(model, args, args.oft_target), module_dropout=args.module_dropout,
            modules_to_save=additional,
        )
    return get_peft_model(model, config)
