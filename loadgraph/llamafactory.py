"""LLaMA-Factory YAML -> the native spec, with every key accounted for.

Each key of a LLaMA-Factory file lands in exactly one place, and `loadgraph plan --explain`
shows where:
  build     translated into the native BuildSpec (model, adapters, quantization, dtype, export);
  training  applied by `loadgraph.load(spec, trainable=True)` when the model is made trainable
            (LoRA/OFT/freeze/full setup, checkpointing, upcasts, added tokens, max length);
  trainer   configures LLaMA-Factory's training loop or data pipeline (dataset, learning_rate,
            ...): named, and left to the trainer that reads the same file;
  unused    accepted settings with no effect on what loadgraph builds, each with the reason.
A key that would change the model in a way loadgraph does not implement is refused with the
reason, and a key LLaMA-Factory does not know is refused with the nearest valid name: neither
is ever silently dropped. Names and defaults follow LLaMA-Factory's hparams/*.py.

Adapters follow LLaMA-Factory's `init_adapter`: for inference and export every adapter is
merged; a quantized base cannot be merged into, so its single adapter is attached; when
training, the last adapter is attached and resumed (unless `create_new_adapter`).
"""

from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass, field
from typing import Any

from loadgraph.errors import InputError

# --------------------------------------------------------------------------------------------
# key tables

BUILD_KEYS = {
    "model_name_or_path": "source.model",
    "model_revision": "source.revision",
    "trust_remote_code": "source.trust_remote_code",
    "adapter_name_or_path": "adapters (comma-separated, in order)",
    "adapter_folder": "a subfolder of each adapter path",
    "quantization_bit": "quantize.method (4: bnb-nf4/fp4, 8: bnb-int8)",
    "quantization_method": "quantize (only bitsandbytes)",
    "quantization_type": "quantize.method (nf4 | fp4)",
    "double_quantization": "quantize.double_quant",
    "infer_dtype": "dtype",
    "bf16": "dtype bfloat16 (LLaMA-Factory's compute dtype; also a trainer key)",
    "fp16": "dtype float16 (LLaMA-Factory's compute dtype; also a trainer key)",
    "export_dir": "export.path",
    "export_size": "export.max_shard_size (GB)",
    "export_legacy_format": "export (safetensors only; true is refused)",
}

TRAINING_KEYS = {
    "finetuning_type", "lora_target", "lora_rank", "lora_alpha", "lora_dropout", "additional_target", "use_rslora",
    "use_dora", "pissa_init", "pissa_iter", "create_new_adapter", "oft_rank", "oft_block_size", "oft_target",
    "module_dropout", "freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules",
    "freeze_vision_tower", "freeze_multi_modal_projector", "freeze_language_model", "upcast_layernorm",
    "upcast_lmhead_output", "disable_gradient_checkpointing", "use_reentrant_gc", "pure_bf16", "moe_aux_loss_coef",
    "flash_attn", "add_tokens", "add_special_tokens", "resize_vocab", "model_max_length",
}

# Keys that change the model in ways loadgraph does not implement: (harmless default, reason).
UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "rope_scaling": (None, "RoPE scaling rewrites the model config; set rope parameters with overwrite_config when loading"),
    "shift_attn": (False, "LongLoRA's shift short attention patches transformers' attention code"),
    "mixture_of_depths": (None, "mixture-of-depths conversion rewrites the model's layers"),
    "use_unsloth": (False, "unsloth replaces the model implementation"),
    "use_unsloth_gc": (False, "unsloth's gradient checkpointing replaces transformers'"),
    "enable_liger_kernel": (False, "liger kernels patch the model's modules"),
    "train_from_scratch": (False, "a randomly initialised model has no checkpoint to build"),
    "use_kt": (False, "KTransformers replaces the model implementation"),
    "split_special_tokens": (False, "needs a slow tokenizer, which transformers 5 no longer has"),
    "new_special_tokens_config": (None, "description-initialised tokens are not implemented; use add_special_tokens"),
    "init_special_tokens": ("noise_init", "only noise_init (mean + noise) initialisation is implemented"),
    "use_llama_pro": (False, "LLaMA Pro block expansion adds layers the checkpoint lacks"),
    "train_mm_proj_only": (False, "superseded in LLaMA-Factory by the freeze_* keys; use those"),
    "export_quantization_bit": (None, "GPTQ export needs calibration data and gptqmodel; use a native spec's quantize (bnb-nf4/int8, fp8)"),
    "export_hub_model_id": (None, "loadgraph does not push to the hub; upload the export directory with `hf upload`"),
    "export_legacy_format": (False, "loadgraph writes safetensors only; .bin exports are not produced"),
    "infer_backend": ("huggingface", "loadgraph loads with transformers (the huggingface backend) only"),
}

UNUSED: dict[str, str] = {
    "cache_dir": "hub downloads use huggingface_hub's cache (HF_HUB_CACHE); artifacts use the loadgraph cache",
    "low_cpu_mem_usage": "loadgraph always streams tensors shard by shard",
    "use_fast_tokenizer": "transformers 5 has a single tokenizer implementation",
    "offload_folder": "loadgraph does not offload weights to disk while building",
    "use_kv_cache": "a generation setting",
    "print_param_status": "a debugging printout",
    "hf_hub_token": "huggingface_hub reads HF_TOKEN from the environment",
    "ms_hub_token": "ModelScope is not a loadgraph source",
    "om_hub_token": "Modelers is not a loadgraph source",
    "quantization_device_map": "device placement is chosen when loading",
    "export_device": "loadgraph's stages choose their device (quantize units ask for a GPU when the cluster has one)",
    "export_quantization_dataset": "only used with export_quantization_bit",
    "export_quantization_nsamples": "only used with export_quantization_bit",
    "export_quantization_maxlen": "only used with export_quantization_bit",
    "use_v1_kernels": "LLaMA-Factory kernel selection",
    **{k: "a setting of LLaMA-Factory's multimodal data plugin" for k in (
        "image_max_pixels", "image_min_pixels", "image_do_pan_and_scan", "crop_to_patches", "video_max_pixels",
        "video_min_pixels", "video_fps", "video_maxlen", "use_audio_in_video", "audio_sampling_rate")},
    **{k: "an inference-engine setting (vLLM / SGLang / KTransformers)" for k in (
        "vllm_maxlen", "vllm_gpu_util", "vllm_enforce_eager", "vllm_max_lora_rank", "vllm_config", "sglang_maxlen",
        "sglang_mem_fraction", "sglang_tp_size", "sglang_config", "sglang_lora_backend", "kt_optimize_rule", "cpu_infer",
        "chunk_size", "mode", "kt_maxlen", "kt_use_cuda_graph", "kt_mode", "kt_force_think")},
}

# LLaMA-Factory's data, generation, evaluation, RLHF/optimizer and Ray arguments: the trainer's.
_TRAINER_KEYS_LF = {
    # DataArguments
    "template", "dataset", "eval_dataset", "dataset_dir", "media_dir", "cutoff_len", "train_on_prompt", "mask_history",
    "streaming", "buffer_size", "mix_strategy", "interleave_probs", "overwrite_cache", "preprocessing_batch_size",
    "preprocessing_num_workers", "max_samples", "eval_num_beams", "ignore_pad_token_for_loss", "val_size",
    "eval_on_each_dataset", "packing", "neat_packing", "tool_format", "tokenized_path", "default_system", "enable_thinking",
    # GeneratingArguments
    "do_sample", "temperature", "top_p", "top_k", "num_beams", "max_length", "max_new_tokens", "repetition_penalty",
    "length_penalty", "skip_special_tokens",
    # EvaluationArguments
    "task", "task_dir", "batch_size", "lang", "n_shot", "save_dir", "download_mode",
    # FinetuningArguments of the training loop
    "stage", "loraplus_lr_ratio", "loraplus_lr_embedding", "pissa_convert", "pref_beta", "pref_ftx", "pref_bco_weight",
    "pref_loss", "dpo_label_smoothing", "kto_chosen_weight", "kto_rejected_weight", "simpo_gamma", "ppo_buffer_size",
    "ppo_epochs", "ppo_score_norm", "ppo_target", "ppo_whiten_rewards", "ref_model", "ref_model_adapters",
    "ref_model_quantization_bit", "reward_model", "reward_model_adapters", "reward_model_quantization_bit",
    "reward_model_type", "ld_alpha", "use_galore", "galore_target", "galore_rank", "galore_update_interval", "galore_scale",
    "galore_proj_type", "galore_layerwise", "use_apollo", "apollo_target", "apollo_rank", "apollo_update_interval",
    "apollo_scale", "apollo_proj", "apollo_proj_type", "apollo_scale_type", "apollo_layerwise", "apollo_scale_front",
    "use_badam", "badam_mode", "badam_start_block", "badam_switch_mode", "badam_switch_interval", "badam_update_ratio",
    "badam_mask_mode", "badam_verbose", "use_adam_mini", "use_mca", "use_muon", "use_dft_loss", "compute_accuracy",
    "disable_shuffling", "early_stopping_steps", "plot_loss", "include_effective_tokens_per_second", "use_swanlab",
    "swanlab_project", "swanlab_workspace", "swanlab_run_name", "swanlab_mode", "swanlab_api_key", "swanlab_logdir",
    "swanlab_lark_webhook_url", "swanlab_lark_secret", "fp8", "fp8_backend", "fp8_enable_fsdp_float8_all_gather",
    # RayArguments
    "ray_run_name", "ray_storage_path", "ray_storage_filesystem", "ray_num_workers", "resources_per_worker",
    "placement_strategy", "ray_init_kwargs", "master_addr", "master_port",
}
# Stages whose model is not a plain causal LM (a value head): refused rather than built wrongly.
UNSUPPORTED_STAGES = {"rm": "reward models add a value head", "ppo": "PPO trains a model with a value head"}


# transformers' (Seq2Seq)TrainingArguments fields, those of 4.x that LLaMA-Factory YAMLs still carry
# included; kept static because importing transformers would cost `plan` seconds (a test checks it).
HF_TRAINING_KEYS = frozenset({
    "accelerator_config", "activation_checkpointing", "activation_checkpointing_kwargs", "adafactor", "adam_beta1",
    "adam_beta2", "adam_epsilon", "auto_find_batch_size", "average_tokens_across_devices", "batch_eval_metrics",
    "bf16", "bf16_full_eval", "data_seed", "dataloader_drop_last", "dataloader_in_order",
    "dataloader_multiprocessing_context", "dataloader_num_workers", "dataloader_persistent_workers",
    "dataloader_pin_memory", "dataloader_prefetch_factor", "ddp_backend", "ddp_broadcast_buffers",
    "ddp_bucket_cap_mb", "ddp_find_unused_parameters", "ddp_static_graph", "ddp_timeout", "debug", "deepspeed",
    "disable_tqdm", "dispatch_batches", "do_eval", "do_predict", "do_train", "enable_jit_checkpoint",
    "eval_accumulation_steps", "eval_delay", "eval_do_concat_batches", "eval_on_start", "eval_steps", "eval_strategy",
    "eval_use_gather_object", "evaluation_strategy", "fp16", "fp16_backend", "fp16_full_eval", "fp16_opt_level",
    "fsdp", "fsdp_config", "fsdp_min_num_params", "fsdp_transformer_layer_cls_to_wrap", "full_determinism",
    "generation_config", "generation_max_length", "generation_num_beams", "gradient_accumulation_steps",
    "gradient_checkpointing", "gradient_checkpointing_kwargs", "greater_is_better", "group_by_length",
    "half_precision_backend", "hub_always_push", "hub_model_id", "hub_private_repo", "hub_revision", "hub_strategy",
    "hub_token", "ignore_data_skip", "include_for_metrics", "include_inputs_for_metrics",
    "include_num_input_tokens_seen", "include_tokens_per_second", "jit_mode_eval", "label_names",
    "label_smoothing_factor", "learning_rate", "length_column_name", "liger_kernel_config", "load_best_model_at_end",
    "local_rank", "log_level", "log_level_replica", "log_on_each_node", "logging_dir", "logging_first_step",
    "logging_nan_inf_filter", "logging_steps", "logging_strategy", "lr_scheduler_kwargs", "lr_scheduler_type",
    "max_grad_norm", "max_steps", "metric_for_best_model", "mp_parameters", "neftune_noise_alpha", "no_cuda",
    "num_train_epochs", "optim", "optim_args", "optim_target_modules", "output_dir", "overwrite_output_dir",
    "parallelism_config", "past_index", "per_device_eval_batch_size", "per_device_train_batch_size",
    "per_gpu_eval_batch_size", "per_gpu_train_batch_size", "predict_with_generate", "prediction_loss_only", "project",
    "push_to_hub", "push_to_hub_model_id", "push_to_hub_organization", "push_to_hub_token", "ray_scope",
    "remove_unused_columns", "report_to", "restore_callback_states_from_checkpoint", "resume_from_checkpoint",
    "run_name", "save_on_each_node", "save_only_model", "save_safetensors", "save_steps", "save_strategy",
    "save_total_limit", "seed", "sharded_ddp", "skip_memory_metrics", "sortish_sampler", "split_batches", "tf32",
    "torch_compile", "torch_compile_backend", "torch_compile_mode", "torch_empty_cache_steps", "torchdynamo",
    "tp_size", "tpu_metrics_debug", "tpu_num_cores", "trackio_bucket_id", "trackio_space_id",
    "trackio_static_space_id", "train_sampling_strategy", "use_cache", "use_cpu", "use_ipex",
    "use_legacy_prediction_loop", "use_liger_kernel", "use_mps_device", "warmup_ratio", "warmup_steps",
    "weight_decay", "xpu_backend",
})


def trainer_keys() -> set[str]:
    """LLaMA-Factory's trainer keys plus transformers' training arguments."""
    return _TRAINER_KEYS_LF | HF_TRAINING_KEYS


# --------------------------------------------------------------------------------------------
# translation


@dataclass
class Translation:
    """A LLaMA-Factory document split by destination (see the module docstring)."""

    origin: str
    build: dict[str, Any]
    training: dict[str, Any] = field(default_factory=dict)
    trainer: list[str] = field(default_factory=list)
    unused: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def explain(self) -> dict[str, Any]:
        return {"origin": self.origin, "build": self.build, "training": self.training, "trainer": self.trainer, "unused": self.unused, "notes": self.notes}


def is_llamafactory(doc: Any) -> bool:
    return isinstance(doc, dict) and "model_name_or_path" in doc


def _refuse_unknown(doc: dict, origin: str, known: set[str]) -> None:
    unknown = sorted(k for k in doc if k not in known)
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.75)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise InputError(f"{origin}: unknown LLaMA-Factory key(s) {', '.join(hints)}")


def _refuse_unsupported(doc: dict, origin: str) -> None:
    bad = [f"{k}: {reason}" for k, (default, reason) in UNSUPPORTED.items() if k in doc and doc[k] != default and not (k == "infer_backend" and doc[k] in ("hf", "huggingface"))]
    stage = doc.get("stage")
    if stage in UNSUPPORTED_STAGES:
        bad.append(f"stage: {stage!r} is not supported ({UNSUPPORTED_STAGES[stage]})")
    if bad:
        raise InputError(f"{origin}: unsupported LLaMA-Factory setting(s): " + "; ".join(bad))


def _dtype(doc: dict) -> str:
    """LLaMA-Factory loads in its compute dtype: infer_dtype, else bf16/fp16 training flags."""
    if doc.get("infer_dtype", "auto") != "auto":
        return doc["infer_dtype"]
    if doc.get("bf16") or doc.get("pure_bf16"):
        return "bfloat16"
    if doc.get("fp16"):
        return "float16"
    return "auto"


def _quantize(doc: dict, origin: str) -> dict | None:
    bits = doc.get("quantization_bit")
    if bits is None:
        return None
    method = str(doc.get("quantization_method", "bnb")).lower()
    if method not in ("bnb", "bitsandbytes"):
        reasons = {
            "hqq": "HQQ through transformers 5 is broken (quantize-on-load raises, pre-quantized loads random weights)",
            "eetq": "EETQ needs CUDA and a hub kernel",
        }
        raise InputError(f"{origin}: quantization_method: {method!r} is not supported ({reasons.get(method, 'only bitsandbytes (bnb) quantizes on load')})")
    if bits == 4:
        qtype = doc.get("quantization_type", "nf4")
        if qtype not in ("nf4", "fp4"):
            raise InputError(f"{origin}: quantization_type: {qtype!r} is not nf4 or fp4")
        return {"method": f"bnb-{qtype}", "double_quant": bool(doc.get("double_quantization", True))}
    if bits == 8:
        return {"method": "bnb-int8"}
    raise InputError(f"{origin}: quantization_bit: {bits!r} is not supported with bitsandbytes; use 4 or 8")


def _adapters(doc: dict, origin: str, quantized: bool, exporting: bool, trainable: bool, training: dict) -> tuple[list[dict], list[str]]:
    raw = doc.get("adapter_name_or_path")
    if not raw:
        return [], []
    paths = [p.strip() for p in (raw.split(",") if isinstance(raw, str) else raw) if str(p).strip()]
    folder = doc.get("adapter_folder")
    if folder:
        paths = [f"{p.rstrip('/')}/{folder}" for p in paths]
    notes = []
    ftype = training.get("finetuning_type", "lora")
    if trainable and ftype not in ("lora", "oft"):
        raise InputError(f"{origin}: adapter_name_or_path is only valid with finetuning_type lora (LLaMA-Factory's rule), not {ftype!r}")
    if quantized and exporting and not trainable:
        # LLaMA-Factory refuses ("Cannot merge adapters to a quantized model") and asks for a
        # merge first: the build graph does exactly that, merging before it quantizes.
        notes.append("adapters are merged into the full-precision base, then the merged model is quantized")
        return [{"path": p, "mode": "merge"} for p in paths], notes
    resume_last = (trainable and not training.get("create_new_adapter", False)) or quantized
    if quantized and len(paths) > 1:
        raise InputError(f"{origin}: adapter_name_or_path: a quantized model accepts a single adapter (LLaMA-Factory's rule); got {len(paths)}")
    modes = ["merge"] * len(paths)
    if resume_last:
        modes[-1] = "attach"
        notes.append(f"adapter {paths[-1]!r} is attached unmerged" + (" and resumed for training" if trainable else " (a quantized model cannot be merged into)"))
    return [{"path": p, "mode": m} for p, m in zip(paths, modes)], notes


def translate_doc(doc: dict, origin: str, *, trainable: bool = False) -> Translation:
    """Split a LLaMA-Factory document into build spec, training setup, trainer keys and unused keys."""
    if not isinstance(doc.get("model_name_or_path"), str) or not doc["model_name_or_path"]:
        raise InputError(f"{origin}: model_name_or_path must name a model directory or hub repo id")
    trainer = trainer_keys()
    known = set(BUILD_KEYS) | TRAINING_KEYS | set(UNSUPPORTED) | set(UNUSED) | trainer
    _refuse_unknown(doc, origin, known)
    _refuse_unsupported(doc, origin)

    training = {k: doc[k] for k in TRAINING_KEYS if k in doc}
    if "model_max_length" not in training and "cutoff_len" in doc:
        # LLaMA-Factory derives model_max_length from cutoff_len (hparams/parser.py).
        training["model_max_length"] = doc["cutoff_len"]
    if doc.get("bf16") or doc.get("fp16"):
        training.setdefault("pure_bf16", bool(doc.get("pure_bf16", False)))
    quantize = _quantize(doc, origin)
    ftype = training.get("finetuning_type", "lora")
    if trainable and quantize and ftype not in ("lora", "oft"):
        raise InputError(f"{origin}: quantization_bit: a quantized model can only be trained with LoRA or OFT, not {ftype!r}")
    exporting = bool(doc.get("export_dir"))
    if exporting and (doc.get("add_tokens") or doc.get("add_special_tokens")):
        raise InputError(f"{origin}: add_tokens with export_dir: loadgraph exports do not resize the vocabulary; add tokens when loading for training")
    adapters, notes = _adapters(doc, origin, quantize is not None, exporting, trainable, training)

    source: dict[str, Any] = {"model": doc["model_name_or_path"]}
    if doc.get("model_revision") not in (None, "main"):
        source["revision"] = doc["model_revision"]
    if doc.get("trust_remote_code"):
        source["trust_remote_code"] = True
    build: dict[str, Any] = {"name": "llamafactory", "source": source, "dtype": _dtype(doc)}
    if adapters:
        build["adapters"] = adapters
    if quantize:
        build["quantize"] = quantize
    if exporting:
        build["export"] = {"path": doc["export_dir"], "max_shard_size": f"{int(doc.get('export_size', 5))}GB"}
    if not (adapters or quantize or exporting):
        # The artifact is the source's own bytes: nothing computed, nothing to verify (the loader
        # still refuses any tensor it cannot place).
        build["verify"] = False
        notes.append("verify is off: the build only fetches the source")
    return Translation(
        origin=origin,
        build=build,
        training=training,
        trainer=sorted(k for k in doc if k in trainer and k not in BUILD_KEYS and k not in TRAINING_KEYS),
        unused={k: UNUSED[k] for k in doc if k in UNUSED},
        notes=notes,
    )


def translate(doc: dict, origin: str) -> dict:
    """The native spec dict for `loadgraph build` (LLaMA-Factory's inference/export semantics)."""
    t = translate_doc(doc, origin)
    if t.trainer:
        warnings.warn(f"{origin}: keys for LLaMA-Factory's training loop are not used by the build: {', '.join(t.trainer)}", UserWarning, stacklevel=2)
    return t.build


def explain_file(path) -> Translation | None:
    """The translation of a spec file if it is a LLaMA-Factory YAML (for `plan --explain`)."""
    from pathlib import Path

    import yaml

    doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    return translate_doc(doc, str(path)) if is_llamafactory(doc) else None
