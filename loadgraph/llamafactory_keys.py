"""Where each LLaMA-Factory key goes: the classification `loadgraph plan --explain` reports.

Every key of LLaMA-Factory's ModelArguments, FinetuningArguments, DataArguments,
TrainingArguments and GeneratingArguments (llamafactory 0.9.5, the registry's last release, listed from the installed package in
tests/peers/llamafactory-keys.tsv; plus the keys of llamafactory-kt 0.9.6.dev0, the registry's
closest match to the examples' commit, in tests/peers/llamafactory-kt-keys.tsv) lands
in exactly one class:
  build     translated into the native BuildSpec (model, adapters, quantization, dtype, export);
  training  applied by `loadgraph.load(spec, trainable=True)` when the model is made trainable;
  trainer   configures LLaMA-Factory's training loop or data pipeline: named, with a note, and
            left to the trainer that reads the same file;
  unused    accepted, no effect on what loadgraph builds, with the reason;
  refused   changes the model in a way loadgraph does not implement (or is not a YAML key at
            all): refused with the reason when set to anything but its harmless default.
transformers' Seq2SeqTrainingArguments keys are the trainer's (HF_TRAINING_KEYS). A key in none
of these is unknown to LLaMA-Factory too, which refuses it; so does loadgraph, all at once.
"""

from __future__ import annotations

from typing import Any

BUILD_KEYS = {
    "model_name_or_path": "source.model",
    "model_revision": "source.revision (hub repos only)",
    "trust_remote_code": "source.trust_remote_code (custom code pinned by digest or commit)",
    "adapter_name_or_path": "adapters (comma-separated, in order)",
    "adapter_folder": "a subfolder of each adapter path",
    "quantization_bit": "quantize.method (4: bnb-nf4/fp4, 8: bnb-int8)",
    "quantization_method": "quantize (only bitsandbytes)",
    "quantization_type": "quantize.method (nf4 | fp4)",
    "double_quantization": "quantize.double_quant",
    "infer_dtype": "dtype of an export (LLaMA-Factory's export rule; loads keep the checkpoint's dtype)",
    "export_dir": "export.path",
    "export_size": "export.max_shard_size (GB)",
    "template": "the exported tokenizer's eos, padding side and jinja chat template, and the Ollama Modelfile (also a trainer key)",
    "default_system": "the Modelfile's SYSTEM and the jinja chat template's default system (also a trainer key)",
    "use_kv_cache": "config.use_cache of an inference load or export (training always disables it)",
}

TRAINING_KEYS = {
    "finetuning_type", "lora_target", "lora_rank", "lora_alpha", "lora_dropout", "additional_target", "use_rslora",
    "use_dora", "pissa_init", "pissa_iter", "create_new_adapter", "oft_rank", "oft_block_size", "oft_target",
    "module_dropout", "freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules",
    "freeze_vision_tower", "freeze_multi_modal_projector", "freeze_language_model", "upcast_layernorm",
    "upcast_lmhead_output", "disable_gradient_checkpointing", "use_reentrant_gc", "pure_bf16", "moe_aux_loss_coef",
    "flash_attn", "add_tokens", "add_special_tokens", "resize_vocab", "use_llama_pro", "use_badam",
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
    "export_quantization_bit": (None, "GPTQ export needs calibration data and gptqmodel; use a native spec's quantize (bnb-nf4/int8, fp8)"),
    "export_hub_model_id": (None, "loadgraph does not push to the hub; upload the export directory with `hf upload`"),
    "export_legacy_format": (False, "loadgraph writes safetensors only; .bin exports are not produced"),
    "infer_backend": ("huggingface", "loadgraph loads with transformers (the huggingface backend) only"),
    "use_mca": (False, "Megatron-Core (mcore_adapter) builds its own model"),
    "use_hyper_parallel": (False, "HyperParallel builds its own sharded model"),
    # ModelArguments fields with init=False: LLaMA-Factory derives them and refuses them in a YAML.
    "compute_dtype": (None, "not a YAML key: LLaMA-Factory derives it from bf16/fp16/pure_bf16/infer_dtype"),
    "device_map": (None, "not a YAML key: LLaMA-Factory derives it (quantization_device_map / export_device)"),
    "model_max_length": (None, "not a YAML key: LLaMA-Factory derives it from cutoff_len"),
    "block_diag_attn": (False, "not a YAML key: LLaMA-Factory derives it from neat_packing"),
}

# Megatron training (mcore_adapter's TrainingArguments under USE_MCA, Megatron-Bridge in the
# examples' commit): present at all, the file asks for a model loadgraph does not build.
MEGATRON_REASON = "Megatron-Core / Megatron-Bridge training builds and shards its own model; loadgraph builds Hugging Face checkpoints"
MEGATRON_KEYS = frozenset("""
    account_for_embedding_in_pipeline_split account_for_loss_in_pipeline_split apply_rope_fusion bias_activation_fusion
    calculate_per_token_loss context_parallel_size cross_entropy_loss_fusion expert_model_parallel_size export_hf_on_finish
    extra_config masked_softmax_fusion megatron_bridge_args megatron_pretrained_checkpoint mixed_precision moe_grouped_gemm
    moe_token_dispatcher_type overlap_grad_reduce overlap_param_gather pipeline_model_parallel_size recompute_granularity
    recompute_method recompute_num_layers sequence_parallel tensor_model_parallel_size use_distributed_optimizer
    use_megatron_bridge use_packed_sequences virtual_pipeline_model_parallel_size""".split())

_MM_DATA = "a setting of LLaMA-Factory's multimodal data plugin (processor)"
_ENGINE = "an inference-engine setting (vLLM / SGLang)"
_KT = "only read with use_kt (KTransformers), which is refused"
UNUSED: dict[str, str] = {
    "cache_dir": "hub downloads use huggingface_hub's cache (HF_HUB_CACHE); artifacts use the loadgraph cache",
    "low_cpu_mem_usage": "loadgraph always streams tensors shard by shard",
    "use_fast_tokenizer": "transformers 5 has a single tokenizer implementation",
    "offload_folder": "loadgraph does not offload weights to disk while building",
    "print_param_status": "a debugging printout",
    "hf_hub_token": "huggingface_hub reads HF_TOKEN from the environment",
    "ms_hub_token": "ModelScope is not a loadgraph source",
    "om_hub_token": "Modelers is not a loadgraph source",
    "quantization_device_map": "device placement is chosen when loading",
    "export_device": "loadgraph's stages choose their device (quantize units ask for a GPU when the cluster has one)",
    "export_quantization_dataset": "only used with export_quantization_bit",
    "export_quantization_nsamples": "only used with export_quantization_bit",
    "export_quantization_maxlen": "only used with export_quantization_bit",
    "use_v1_kernels": "LLaMA-Factory v1 kernel plugins (NPU fusion operators)",
    **{k: _MM_DATA for k in ("image_max_pixels", "image_min_pixels", "image_do_pan_and_scan", "crop_to_patches", "video_max_pixels",
                             "video_min_pixels", "video_fps", "video_maxlen", "use_audio_in_video", "audio_sampling_rate")},
    **{k: _ENGINE for k in ("vllm_maxlen", "vllm_gpu_util", "vllm_enforce_eager", "vllm_max_lora_rank", "vllm_config",
                            "sglang_maxlen", "sglang_mem_fraction", "sglang_tp_size", "sglang_config", "sglang_lora_backend")},
    **{k: _KT for k in ("kt_weight_path", "kt_expert_checkpoint_path", "kt_use_lora_experts", "kt_lora_expert_num",
                        "kt_lora_expert_intermediate_size", "kt_config", "kt_cpu_activation", "kt_non_expert_weight_path")},
    **{k: "only read with use_hyper_parallel, which is refused" for k in (
        "hyper_parallel_args", "hyper_parallel_cp_size", "hyper_parallel_efsdp_size", "hyper_parallel_ep_size", "hyper_parallel_token_dispatcher")},
}


def _group(note: str, keys: str) -> dict[str, str]:
    return {k: note for k in keys.split()}


# LLaMA-Factory's own keys of the training loop and data pipeline, with what they configure.
TRAINER_NOTES: dict[str, str] = {
    **_group("data pipeline (DataArguments): datasets, formatting, packing", """
        dataset eval_dataset dataset_dir media_dir cutoff_len train_on_prompt mask_history streaming buffer_size mix_strategy
        interleave_probs overwrite_cache preprocessing_batch_size preprocessing_num_workers max_samples eval_num_beams
        ignore_pad_token_for_loss val_size eval_on_each_dataset packing neat_packing tool_format enable_thinking
        preserve_thinking reasoning_effort tokenized_path data_shared_file_system"""),
    **_group("generation for predict / chat (GeneratingArguments)",
             "do_sample temperature top_p top_k num_beams max_length max_new_tokens repetition_penalty length_penalty skip_special_tokens"),
    **_group("evaluation (llamafactory-cli eval)", "task task_dir batch_size lang n_shot save_dir download_mode"),
    **_group("training objective and loop (FinetuningArguments)", """
        stage loraplus_lr_ratio loraplus_lr_embedding pissa_convert use_adam_mini use_muon use_dft_loss use_asft_loss asft_alpha
        use_eaft_loss eaft_alpha compute_accuracy disable_shuffling early_stopping_steps plot_loss
        include_effective_tokens_per_second"""),
    **_group("preference / RL training (RLHFArguments); the reference and reward models are loaded by the trainer", """
        pref_beta pref_ftx pref_bco_weight pref_loss dpo_label_smoothing kto_chosen_weight kto_rejected_weight simpo_gamma
        ppo_buffer_size ppo_epochs ppo_score_norm ppo_target ppo_whiten_rewards ref_model ref_model_adapters
        ref_model_quantization_bit reward_model reward_model_adapters reward_model_quantization_bit reward_model_type ld_alpha"""),
    **_group("GaLore optimizer", "use_galore galore_target galore_rank galore_update_interval galore_scale galore_proj_type galore_layerwise"),
    **_group("APOLLO optimizer", """use_apollo apollo_target apollo_rank apollo_update_interval apollo_scale apollo_proj
        apollo_proj_type apollo_scale_type apollo_layerwise apollo_scale_front"""),
    **_group("BAdam optimizer schedule (use_badam itself keeps trainable parameters in half precision at load)",
             "badam_mode badam_start_block badam_switch_mode badam_switch_interval badam_update_ratio badam_mask_mode badam_verbose"),
    **_group("SwanLab experiment logging", """use_swanlab swanlab_project swanlab_workspace swanlab_run_name swanlab_mode
        swanlab_api_key swanlab_logdir swanlab_lark_webhook_url swanlab_lark_secret"""),
    **_group("FP8 mixed-precision training (accelerate); the weights load as built", "fp8 fp8_backend fp8_enable_fsdp_float8_all_gather"),
    **_group("torch profiler of the training loop", """enable_torch_profiler profiler_output_dir profiler_wait_steps
        profiler_warmup_steps profiler_active_steps profiler_repeat profiler_record_shapes profiler_profile_memory
        profiler_with_stack profile_modules"""),
    **_group("LLaMA-Factory's Ray launcher", "ray_num_workers ray_init_kwargs master_addr master_port"),
}
# Keys that also shape what loadgraph builds, beside the trainer's use of them.
SHARED_WITH_BUILD = {"template", "default_system", "bf16", "fp16", "cutoff_len"}
HF_NOTE = "transformers' training argument: the trainer's"

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


def trainer_note(key: str) -> str | None:
    """The note of a key left to the trainer, or None if it is not one."""
    if key in TRAINER_NOTES:
        return TRAINER_NOTES[key]
    if key in HF_TRAINING_KEYS:
        return HF_NOTE
    if key == "template":
        return "chat template of the data pipeline"
    return None


def classify(key: str) -> tuple[str, str] | None:
    """(class, note) of a LLaMA-Factory key (see the module docstring); None for an unknown key."""
    if key in UNSUPPORTED:
        return "refused", UNSUPPORTED[key][1]
    if key in MEGATRON_KEYS:
        return "refused", MEGATRON_REASON
    if key in BUILD_KEYS:
        return "build", BUILD_KEYS[key]
    if key in TRAINING_KEYS:
        return "training", "applied by loadgraph.load(..., trainable=True)"
    if key in UNUSED:
        return "unused", UNUSED[key]
    note = trainer_note(key)
    return ("trainer", note) if note else None


def known_keys() -> set[str]:
    return set(BUILD_KEYS) | TRAINING_KEYS | set(UNSUPPORTED) | set(UNUSED) | set(TRAINER_NOTES) | HF_TRAINING_KEYS | MEGATRON_KEYS
