"""LLaMA-Factory's dtype rules, as it resolves them (llamafactory 0.9.5).

- Every load (training, chat, export) passes `torch_dtype="auto"`: weights keep the
  checkpoint's dtype; `bf16`/`fp16` only choose the trainer's mixed precision (model/loader.py).
- The compute dtype (bitsandbytes compute and 4-bit storage dtype) is bf16 with `bf16` or
  `pure_bf16`, fp16 with `fp16` (hparams/parser.py, training only); else `infer_dtype` when not
  auto and not training; else `infer_optim_dtype(config dtype)` (model/patcher.py).
- An export casts to `infer_dtype`, or under `auto` keeps the checkpoint's dtype, except fp32,
  which becomes `infer_optim_dtype(bf16)`; a quantized export is labelled float16 (train/tuner.py).
- `infer_optim_dtype(d)` depends on the host: bf16 if the GPU supports it and d is bf16 or
  unknown, else fp16 on any CUDA/NPU host, else fp32 (extras/misc.py). The host here is the one
  that translates the YAML, as with `llamafactory-cli`, which builds where it runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

_NAMES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass(frozen=True)
class DtypeRule:
    build: str  # the BuildSpec dtype
    compute: str | None  # bitsandbytes compute (and 4-bit storage) dtype, when quantizing
    rule: str  # which rule applied, for `plan --explain`


@lru_cache(maxsize=1)
def host_precision() -> tuple[bool, bool, str]:
    """(bf16 available, fp16 available, description) of this host, as LLaMA-Factory tests them."""
    import torch

    if torch.cuda.is_available():
        bf16 = bool(torch.cuda.is_bf16_supported())
        return bf16, True, f"CUDA host ({torch.cuda.get_device_name(0)}, bf16 {'supported' if bf16 else 'unsupported'})"
    return False, False, "host without CUDA/NPU"


def infer_optim_dtype(model_dtype: str | None) -> tuple[str, str]:
    bf16, fp16, host = host_precision()
    if bf16 and model_dtype in ("bfloat16", None):
        return "bfloat16", host
    if fp16:
        return "float16", host
    return "float32", host


def checkpoint_dtype(model: str, base_dir: Path | None, revision: str | None = None) -> str | None:
    """config.json's dtype (`dtype`, or transformers 4's `torch_dtype`) of a local or cached hub model."""
    path = Path(model).expanduser()
    if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
        path = base_dir / path
    config = path / "config.json"
    if not config.exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "config.json", revision=revision)
        except Exception:  # noqa: BLE001 - not a repo id: no config to read
            cached = None
        if not isinstance(cached, str):
            return None
        config = Path(cached)
    try:
        doc: Any = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    text = doc.get("text_config") if isinstance(doc.get("text_config"), dict) else {}
    value = doc.get("dtype") or doc.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
    return _NAMES.get(str(value).removeprefix("torch.")) if value else None


def resolve(doc: dict, *, trainable: bool, exporting: bool, quantized: bool, base_dir: Path | None) -> DtypeRule:
    infer = doc.get("infer_dtype", "auto")
    ckpt = checkpoint_dtype(doc["model_name_or_path"], base_dir, doc.get("model_revision"))
    compute, compute_rule = None, ""
    if quantized:
        if trainable and (doc.get("bf16") or doc.get("pure_bf16")):
            compute, compute_rule = "bfloat16", "bf16/pure_bf16"
        elif trainable and doc.get("fp16"):
            compute, compute_rule = "float16", "fp16"
        elif infer != "auto" and not trainable:
            compute, compute_rule = infer, "infer_dtype"
        else:
            compute, host = infer_optim_dtype(ckpt)
            compute_rule = f"infer_optim_dtype(checkpoint {ckpt or 'unknown'}) on this {host}"
        compute_rule = f"; quantization compute and storage dtype {compute} ({compute_rule})"
    if exporting and not quantized:
        if infer != "auto":
            return DtypeRule(infer, compute, f"export: infer_dtype {infer}")
        if ckpt == "float32":
            out, host = infer_optim_dtype("bfloat16")
            return DtypeRule(out, compute, f"export: infer_dtype auto, fp32 checkpoint -> infer_optim_dtype(bf16) = {out} on this {host}")
        return DtypeRule("auto", compute, f"export: infer_dtype auto keeps the checkpoint's dtype ({ckpt or 'unknown'})")
    what = "quantized export (config labelled float16 by LLaMA-Factory)" if exporting else "training load" if trainable else "load"
    return DtypeRule("auto", compute, f"{what}: torch_dtype auto keeps the checkpoint's dtype ({ckpt or 'unknown'}){compute_rule}")
