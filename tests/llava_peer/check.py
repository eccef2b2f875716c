"""`make llava-check`: loadgraph's load_pretrained_model against LLaVA's real builder.

Writes fixtures in LLaVA's on-disk format, runs LLaVA's builder (llava-torch, transformers
4.37.2, peft 0.10.0) in its own venv on each, and compares every language-model and projector
tensor (bit-identical, else the largest difference in ulps of float16) and the greedy output for
the same input_ids (LLaVA's tokenizer_image_token ids, IMAGE_TOKEN_INDEX included) and image.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from loadgraph import load_pretrained_model
from loadgraph.testing_llava import make_fixture

LLAVA_PY = os.environ.get("LLAVA_PY", "/work/venvs/llava/bin/python")
# llava-torch (LLaVA 1.2.2) holds Llama, Mistral and MPT; its LoRA branch builds LlavaLlamaForCausalLM only.
CASES = [("llama", False, "mlp2x_gelu"), ("llama", True, "mlp2x_gelu"), ("llama", False, "linear"), ("llama", False, "mlp3x_gelu"),
         ("mistral", False, "mlp2x_gelu"), ("llama", True, "linear")]


def ours_name(name: str) -> str:
    m = re.match(r"model\.mm_projector\.(?:(\d+)\.)?(weight|bias)$", name)
    if m:
        return f"model.multi_modal_projector.linear_{int(m.group(1) or 0) // 2 + 1}.{m.group(2)}"
    return "model.language_model." + name[len("model."):] if name.startswith("model.") else name


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in representable float16 steps (same-sign ordering of the bit patterns)."""
    ia, ib = (x.to(torch.float16).view(torch.int16).to(torch.int32) for x in (a, b))
    ia, ib = (torch.where(x < 0, -32768 - x, x) for x in (ia, ib))
    return int((ia - ib).abs().max()) if ia.numel() else 0


def run_case(root: Path, family: str, lora: bool, projector: str) -> dict:
    fx = make_fixture(root, family, lora=lora, projector=projector)
    out = root / f"out-{Path(fx['model_path']).name}"
    out.mkdir()
    side = json.loads((root / "clip-tiny" / "config.json").read_text())["image_size"]
    image = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(1)).half()
    save_file({"image": image}, str(out / "image.safetensors"))
    proc = subprocess.run([LLAVA_PY, str(Path(__file__).with_name("run_llava.py")), fx["model_path"], fx["model_base"] or "-",
                           fx["model_name"], str(out), str(out / "image.safetensors")], capture_output=True, text=True, cwd=root)
    if proc.returncode:
        return {"case": fx["model_name"], "error": proc.stderr.strip().splitlines()[-1]}
    theirs_doc = json.loads((out / "llava.json").read_text())
    theirs = load_file(str(out / "llava_state.safetensors"))
    tokenizer, model, image_processor, context_len = load_pretrained_model(
        fx["model_path"], fx["model_base"], fx["model_name"], device_map="cpu", device="cpu", cache=root / "cache")
    mine = model.state_dict()
    identical, worst, missing = 0, (0, None), []
    for name, t in theirs.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        m = mine.get(ours_name(name))
        if m is None:
            missing.append(name)
            continue
        if m.dtype == t.dtype and m.shape == t.shape and torch.equal(m, t):
            identical += 1
        else:
            d = ulps(m, t) if m.shape == t.shape else 1 << 30
            worst = max(worst, (d, name), key=lambda x: x[0])
    ids = torch.tensor(theirs_doc["ids"])
    with torch.inference_mode():
        generated = model.generate(ids, images=image, image_sizes=[tuple(image.shape[-2:])], do_sample=False, max_new_tokens=8, use_cache=True)
        logits = model(ids, images=image).logits.float()
    their_logits = load_file(str(out / "llava_logits.safetensors"))["logits"]
    our_ids = tokenizer("hello world").input_ids
    return {
        "case": fx["model_name"], "classes": [theirs_doc["class"], type(model).__name__],
        "tensors": len(theirs), "bit_identical": identical, "max_ulps": worst[0], "worst_tensor": worst[1], "missing": missing[:3],
        "greedy_equal": generated.tolist() == theirs_doc["generated"], "generated": [theirs_doc["generated"], generated.tolist()],
        "logits_shape": [list(their_logits.shape), list(logits.shape)],
        "logits_max_abs_diff": float((logits - their_logits).abs().max()) if logits.shape == their_logits.shape else None,
        "context_len": [theirs_doc["context_len"], context_len], "tokenizer_len": [theirs_doc["vocab"], len(tokenizer)],
        "text_ids_equal": theirs_doc["ids"][0][-len(our_ids) + 1:] == our_ids[1:],
    }


def main() -> int:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for family, lora, projector in CASES:
            r = run_case(Path(tmp), family, lora, projector)
            results.append(r)
            print(json.dumps(r), flush=True)
    bad = [r for r in results if "error" in r or not r["greedy_equal"] or r["missing"] or r["max_ulps"] > 1]
    print(f"llava-check: {len(results) - len(bad)} passed, {len(bad)} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
