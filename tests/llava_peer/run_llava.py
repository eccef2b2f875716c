"""Runs in LLaVA's own venv (make llava-check): LLaVA's real builder on one fixture.

Writes the language-model and projector tensors it loaded and its greedy output, for check.py.
argv: model_path model_base|- model_name out_dir image.safetensors [config overrides as JSON, passed as **kwargs]
"""

import json
import sys

import torch
from safetensors.torch import load_file, save_file

from llava.constants import IMAGE_TOKEN_INDEX
from llava.conversation import conv_templates
from prompts import EDGE_TEXTS, QUESTION, TEMPLATES, token_report
from llava.mm_utils import tokenizer_image_token
from llava.model.builder import load_pretrained_model


def use_mixtral_class() -> str:
    """llava-torch 1.2.2 has no llava_mixtral (LLaVA-NeXT, not on PyPI, added it as its llava_mistral.py
    with Mixtral's classes). The same here, from LLaVA's own llava_mistral.py source, and LLaVA's
    builder is pointed at it where it builds LlavaLlamaForCausalLM (every non-Mistral, non-MPT branch)."""
    import importlib.util

    import llava.model.builder as builder

    spec = importlib.util.find_spec("llava.model.language_model.llava_mistral")
    source = open(spec.origin).read().replace("Mistral", "Mixtral").replace("mistral", "mixtral")
    module = type(sys)("llava.model.language_model.llava_mixtral")
    module.__package__ = "llava.model.language_model"
    exec(compile(source, "llava_mixtral.py", "exec"), module.__dict__)
    builder.LlavaLlamaForCausalLM = module.LlavaMixtralForCausalLM
    return "llava_mistral.py with Mistral -> Mixtral"


model_path, model_base, model_name, out, image_file = sys.argv[1:6]
peer_note = use_mixtral_class() if "mixtral" in model_name.lower() else None
overrides = json.loads(sys.argv[6]) if len(sys.argv) > 6 else {}
picture_size = tuple(int(v) for v in sys.argv[7].split("x")) if len(sys.argv) > 7 else (50, 22)  # anyres: PIL (width, height)
tokenizer, model, image_processor, context_len = load_pretrained_model(
    model_path, None if model_base == "-" else model_base, model_name, device_map="cpu", device="cpu", **overrides)
# what the overrides made of LLaVA's config (its vision tower reads select_layer / select_feature from it)
tower = model.get_vision_tower()
applied = {k: getattr(model.config, k, None) for k in overrides}
applied["tower"] = [tower.select_layer, tower.select_feature]
state = {k: v.contiguous() for k, v in model.state_dict().items() if "vision_tower" not in k}
save_file(state, f"{out}/llava_state.safetensors")
ids = tokenizer_image_token("<image>\nhello world", tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)
image = load_file(image_file)["image"].to(torch.float16)
sizes = [tuple(image.shape[-2:])]
if getattr(model.config, "image_aspect_ratio", None) == "anyres":
    # LLaVA-1.6's own preprocessing of a wide picture: the base image plus its grid of crops
    import numpy as np
    from PIL import Image

    from llava.mm_utils import process_images

    picture = Image.fromarray(np.random.default_rng(3).integers(0, 256, (picture_size[1], picture_size[0], 3), dtype=np.uint8))
    image = process_images([picture], image_processor, model.config).to(torch.float16)
    sizes = [picture.size]
    save_file({"image": image.contiguous()}, f"{out}/llava_image.safetensors")
with torch.inference_mode():
    generated = model.generate(ids, images=image, image_sizes=sizes, do_sample=False, max_new_tokens=8, use_cache=True)
    logits = model(ids, images=image, image_sizes=sizes).logits
save_file({"logits": logits.float().contiguous()}, f"{out}/llava_logits.safetensors")
prompts = []
for name in TEMPLATES:
    conv = conv_templates[name].copy()
    conv.append_message(conv.roles[0], QUESTION)
    conv.append_message(conv.roles[1], None)
    prompts.append(conv.get_prompt())
tokens = token_report(tokenizer, prompts + list(EDGE_TEXTS), lambda t: tokenizer_image_token(t, tokenizer, IMAGE_TOKEN_INDEX))
answer = tokenizer.batch_decode(generated, skip_special_tokens=True)[0].strip()  # LLaVA's run_llava.py
json.dump({"tokenizer_class": type(tokenizer).__name__, "tokenizer_is_fast": tokenizer.is_fast, "tokens": tokens, "answer": answer,
           "class": type(model).__name__, "ids": ids.tolist(), "generated": generated.tolist(), "context_len": context_len,
           "vocab": len(tokenizer), "image_processor": type(image_processor).__name__, "applied": applied, "image_sizes": sizes, "peer_note": peer_note}, open(f"{out}/llava.json", "w"))
