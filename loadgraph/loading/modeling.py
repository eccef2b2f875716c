"""From a built artifact to a live transformers model, refusing any load that is not exact.

`from_pretrained` happily returns a model with randomly initialised tensors when names do not
match (DESIGN: loading proves nothing by not raising), so every load here asks for the loading
info and fails on a missing, unexpected or mismatched key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loadgraph.errors import BuildError
from loadgraph.loading.dispatch import Architecture, LoadingError


def auto_class(arch: Architecture):
    import transformers

    return getattr(transformers, arch.auto_class_name)


def llava_class(family: str, path: Path):
    """LLaVA's class for a language family (LlavaLlamaForCausalLM, ...), on the transformers class
    the artifact at `path` was converted for (Llava, or LlavaNext for LLaVA-1.6)."""
    import json

    from loadgraph.loading.llava_api import llava_class as pick

    return pick(family, next=json.loads((path / "config.json").read_text()).get("model_type") == "llava_next")


def load_exact(path: Path, arch: Architecture, cls=None, **kwargs: Any):
    """`Auto*.from_pretrained(path, **kwargs)` (or `cls`'s) that fails on any key it could not place."""
    kwargs = {**kwargs, "output_loading_info": True}
    model, info = (cls or auto_class(arch)).from_pretrained(str(path), **kwargs)
    bad = {k: sorted(info[k])[:5] for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)}
    if bad:
        raise BuildError(
            f"{path}: transformers could not place every tensor {bad}; a config override that changes the "
            "architecture (layers, sizes) does not fit these weights"
        )
    return model


def attach_adapters(model, adapters: list[dict], trainable: bool):
    """Wrap the model in a PeftModel holding the artifact's attached adapters (first one active).

    A spec `scale` other than 1 multiplies the LoRA scaling, as merging with that scale would.
    """
    if not adapters:
        return model
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    names = []
    for i, adapter in enumerate(adapters):
        name = "default" if i == 0 else f"adapter{i}"
        if i == 0:
            model = PeftModel.from_pretrained(model, str(adapter["path"]), adapter_name=name, is_trainable=trainable)
        else:
            model.load_adapter(str(adapter["path"]), adapter_name=name, is_trainable=trainable)
        names.append(name)
        if float(adapter.get("scale", 1.0)) != 1.0:
            for module in model.modules():
                if isinstance(module, LoraLayer) and name in module.scaling:
                    module.scaling[name] *= float(adapter["scale"])
    if len(names) > 1:
        # PEFT activates one adapter at a time; several attached adapters are applied together.
        model.base_model.set_adapter(names)
    return model


def resize_for_tokenizer(model, tokenizer) -> bool:
    """Grow the embeddings to the tokenizer when tokens were added; never shrink.

    LLaVA calls `resize_token_embeddings(len(tokenizer))` unconditionally, which *shrinks* a
    vocabulary padded beyond the tokenizer (dropping trained rows): only grow here.
    """
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= rows:
        return False
    if getattr(model, "is_quantized", False) or getattr(model, "quantization_method", None):
        raise LoadingError("cannot resize the embeddings of a quantized model for added tokens; add them before quantizing")
    model.resize_token_embeddings(len(tokenizer))
    return True
