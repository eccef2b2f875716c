"""LLaVA's multimodal extras: the image processor, image special tokens, projector checkpoints.

LLaVA's builder adds "<im_patch>" (when `mm_use_im_patch_token`, default True) and
"<im_start>"/"<im_end>" (when `mm_use_im_start_end`, default False) to the tokenizer and
returns the vision tower's image processor. A projector-only checkpoint (LLaVA's pretraining
stage output: `mm_projector.bin` beside a `model_base`) is loaded onto the base model; its
original names (`model.mm_projector.0.weight`) map to transformers' (`multi_modal_projector.linear_1.weight`)
the way transformers' own LLaVA conversion script maps them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from loadgraph.loading.dispatch import LoadingError

IMAGE_PATCH_TOKEN = "<im_patch>"
IMAGE_START_TOKEN = "<im_start>"
IMAGE_END_TOKEN = "<im_end>"

# Files LLaVA writes for projector weights: the pretraining stage's `mm_projector`, and the
# non-LoRA trainables saved beside a LoRA adapter (projector trained together with the LoRA).
PROJECTOR_FILES = ("mm_projector.safetensors", "mm_projector.bin", "non_lora_trainables.safetensors", "non_lora_trainables.bin")
# LLaVA's nn.Sequential projector indices -> transformers' LlavaMultiModalProjector names
# (transformers/models/llava/convert_llava_weights_to_hf.py KEYS_TO_MODIFY_MAPPING).
_LLAVA_RENAMES = ((re.compile(r"mm_projector\.0\."), "multi_modal_projector.linear_1."), (re.compile(r"mm_projector\.2\."), "multi_modal_projector.linear_2."))


def add_image_tokens(tokenizer, config: Any) -> list[str]:
    """The tokens LLaVA adds, as the config asks; returns those that were new."""
    wanted = []
    if getattr(config, "mm_use_im_patch_token", True):
        wanted.append(IMAGE_PATCH_TOKEN)
    if getattr(config, "mm_use_im_start_end", False):
        wanted += [IMAGE_START_TOKEN, IMAGE_END_TOKEN]
    vocab = tokenizer.get_vocab()
    new = [t for t in wanted if t not in vocab]
    if new:
        tokenizer.add_tokens(new, special_tokens=True)
    return new


def load_image_processor(path: Path):
    """The checkpoint's image processor (needs pillow or torchvision in transformers 5)."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(str(path))
    except ImportError as exc:
        raise LoadingError(f"{path}: the image processor needs pillow (pip install pillow): {exc}") from None
    except (OSError, ValueError) as exc:
        raise LoadingError(f"{path}: no usable image processor config (preprocessor_config.json / processor_config.json): {exc}") from None


def projector_file(model_path: Path) -> Path | None:
    return next((model_path / n for n in PROJECTOR_FILES if (model_path / n).is_file()), None)


def read_projector(path: Path, allow_pickle: bool) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    from loadgraph.formats.checkpoint import LLAVA_SIDE_FILES, side_file_notice

    if path.name in LLAVA_SIDE_FILES:
        side_file_notice(path)
    elif not allow_pickle:
        raise LoadingError(f"{path}: pickled projector weights are refused; pass allow_pickle=True (loaded with torch.load(weights_only=True)) or save them as safetensors")
    import torch

    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LoadingError(f"{path}: not a flat state dict of tensors")
    return state


def _candidate_names(key: str) -> list[str]:
    """`key` and its transformers spelling, with PEFT's and LLaVA's prefixes removed."""
    name = key.removeprefix("base_model.model.")
    for pattern, repl in _LLAVA_RENAMES:
        name = pattern.sub(repl, name)
    out = [name]
    while name.startswith("model."):
        name = name[len("model."):]
        out.append(name)
    return out


def overlay_projector(model, path: Path, allow_pickle: bool) -> list[str]:
    """Copy every tensor of `path` onto the unique model parameter it names; fail on any leftover.

    Suffix matching on dotted boundaries ties LLaVA names (`model.mm_projector.0.weight`) and
    on-disk names (`multi_modal_projector.linear_1.weight`) to transformers 5's in-memory names
    (`model.multi_modal_projector.linear_1.weight`) without a table per model.
    """
    import torch

    state = read_projector(path, allow_pickle)
    params = dict(model.named_parameters())
    placed = []
    for key, value in state.items():
        hits = set()
        for cand in _candidate_names(key):
            hits = {n for n in params if n == cand or n.endswith("." + cand)}
            if hits:
                break
        if len(hits) != 1:
            what = "no parameter" if not hits else f"several parameters ({', '.join(sorted(hits)[:3])})"
            raise LoadingError(f"{path}: tensor {key!r} matches {what} of the {type(model).__name__}; is model_base the right base?")
        target = params[hits.pop()]
        if tuple(target.shape) != tuple(value.shape):
            raise LoadingError(f"{path}: tensor {key!r} has shape {tuple(value.shape)} but the model's is {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(value.to(target.dtype))
        placed.append(key)
    return placed
