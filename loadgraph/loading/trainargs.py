"""How a loaded model is made ready to train: LLaMA-Factory's finetuning arguments, validated.

Kept free of torch so that translating a LLaMA-Factory YAML (`loadgraph plan --explain`) stays
instant. Field names and defaults are LLaMA-Factory's (hparams/finetuning_args.py,
model_args.py), so a YAML written for it means the same here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

FinetuningType = Literal["lora", "oft", "freeze", "full"]


def split_list(value: object) -> object:
    """LLaMA-Factory's comma-separated strings ("q_proj,v_proj") as lists."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(value, (set, tuple)):
        return sorted(value)
    return value


class TrainingArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    finetuning_type: FinetuningType = "lora"
    # LoRA
    lora_target: list[str] = ["all"]
    lora_rank: int = 8
    lora_alpha: int | None = None  # LLaMA-Factory's default: 2 * lora_rank
    lora_dropout: float = 0.0
    additional_target: list[str] | None = None
    use_rslora: bool = False
    use_dora: bool = False
    pissa_init: bool = False
    pissa_iter: int = 16
    create_new_adapter: bool = False
    # OFT
    oft_rank: int = 0
    oft_block_size: int = 32
    oft_target: list[str] = ["all"]
    module_dropout: float = 0.0
    # freeze
    freeze_trainable_layers: int = 2
    freeze_trainable_modules: list[str] = ["all"]
    freeze_extra_modules: list[str] | None = None
    use_llama_pro: bool = False  # train only the layers LLaMA Pro's block expansion added (every n-th)
    use_badam: bool = False  # BAdam: trainable parameters stay in the load dtype (no fp32 upcast)
    # multimodal
    freeze_vision_tower: bool = True
    freeze_multi_modal_projector: bool = True
    freeze_language_model: bool = False
    # model patches
    upcast_layernorm: bool = False
    upcast_lmhead_output: bool = False
    disable_gradient_checkpointing: bool = False
    use_reentrant_gc: bool = True
    pure_bf16: bool = False
    moe_aux_loss_coef: float | None = None
    flash_attn: Literal["auto", "disabled", "sdpa", "fa2", "fa3"] = "auto"
    # tokenizer
    add_tokens: list[str] | None = None
    add_special_tokens: list[str] | None = None
    resize_vocab: bool = False
    model_max_length: int | None = None

    @field_validator(
        "lora_target", "oft_target", "additional_target", "freeze_trainable_modules", "freeze_extra_modules", "add_tokens", "add_special_tokens",
        mode="before",
    )
    @classmethod
    def _split(cls, v: object) -> object:
        return split_list(v)

    @model_validator(mode="after")
    def _lora_only_options(self) -> "TrainingArgs":
        # LLaMA-Factory's FinetuningArguments.__post_init__ refuses these outside LoRA.
        if self.finetuning_type != "lora":
            for name in ("use_rslora", "use_dora", "pissa_init"):
                if getattr(self, name):
                    raise ValueError(f"{name} is only valid with finetuning_type: lora")
        return self

    @property
    def alpha(self) -> int:
        return self.lora_alpha or self.lora_rank * 2

    @property
    def attn_implementation(self) -> str | None:
        return {"auto": None, "disabled": "eager", "sdpa": "sdpa", "fa2": "flash_attention_2", "fa3": "flash_attention_3"}[self.flash_attn]
