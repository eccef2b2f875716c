"""`make llava-check`: loadgraph's load_pretrained_model against LLaVA's real builder.

Writes fixtures in LLaVA's on-disk format, runs LLaVA's builder (llava-torch, transformers
4.37.2, peft 0.10.0) in its own venv on each, and compares every language-model and projector
tensor (bit-identical, LoRA-merged ones included: fp16 merges use PEFT 0.10's rounding; where
one differs, the LoRA report says by how many ulps and which rounding each side did), the greedy output for the same input_ids (LLaVA's
tokenizer_image_token ids, IMAGE_TOKEN_INDEX included) and image (for anyres, LLaVA's own
process_images crops), the decoded answer, and the ids/decodes of LLaVA's conversation
templates and edge texts. `check.py [case-substring ...]` runs a subset.
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

sys.path.insert(0, str(Path(__file__).parent))
from prompts import image_token_ids, token_report  # noqa: E402

LLAVA_PY = os.environ.get("LLAVA_PY", "/work/venvs/llava/bin/python")
# llava-torch (LLaVA 1.2.2) holds Llama, Mistral and MPT; its LoRA branch builds LlavaLlamaForCausalLM only.
# LLaVA-vocabulary config overrides: ours through overwrite_config, LLaVA's through its builder's
# **kwargs (llava-torch 1.2.2 has no overwrite_config; from_pretrained sets config keys it is given).
OVERRIDES = {"mm_vision_select_layer": -1, "mm_vision_select_feature": "cls_patch", "rope_scaling": {"type": "linear", "factor": 2.0}}
# (family, lora, projector, overrides, sentencepiece tokenizer.model only, LLaVA-1.6 anyres picture (width, height))
CASES = [("llama", False, "mlp2x_gelu", None, False), ("llama", True, "mlp2x_gelu", None, False), ("llama", False, "linear", None, False),
         ("llama", False, "mlp3x_gelu", None, False), ("mistral", False, "mlp2x_gelu", None, False), ("llama", True, "linear", None, False),
         ("llama", False, "mlp2x_gelu", OVERRIDES, False), ("llama", False, "mlp2x_gelu", None, True), ("llama", True, "mlp2x_gelu", None, True),
         ("llama", False, "mlp2x_gelu", None, False, (50, 22)), ("llama", True, "mlp2x_gelu", None, False, (50, 22)),
         ("mistral", False, "mlp2x_gelu", None, False, (50, 22)),
         # 188x47 on the 96x32 grid: LLaVA's truncating unpad keeps 1 row less each side than transformers' rounding one
         ("llama", False, "mlp2x_gelu", None, False, (188, 47)), ("mixtral", False, "mlp2x_gelu", None, False, False),
         ("mixtral", True, "mlp2x_gelu", None, False, False)]


def case_name(family: str, lora: bool, projector: str, overrides: dict | None = None, spm: bool = False, anyres: tuple | None = None) -> str:
    return (f"llava-{family}-{projector}-{'lora' if lora else 'full'}" + ("-overrides" if overrides else "") + ("-spm" if spm else "")
            + (f"-anyres{anyres[0]}x{anyres[1]}" if anyres else ""))


EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")


def ours_tensor(mine: dict, name: str):
    """Our tensor for one of LLaVA's: by name, or (Mixtral) the slice of transformers 5's fused experts
    that holds expert E's w1 (gate) / w3 (up) in gate_up_proj[E] = [w1; w3], w2 in down_proj[E]."""
    m = EXPERT.match(name)
    if not m:
        return mine.get(ours_name(name.replace(".block_sparse_moe.gate.", ".mlp.gate.")))
    layer, expert, w = int(m.group(1)), int(m.group(2)), m.group(3)
    prefix = f"model.language_model.layers.{layer}.mlp.experts."
    if w == "w2":
        return mine[prefix + "down_proj"][expert]
    fused = mine[prefix + "gate_up_proj"][expert]
    half = fused.shape[0] // 2
    return fused[:half] if w == "w1" else fused[half:]


def ours_name(name: str) -> str:
    if name == "model.image_newline":
        return name
    m = re.match(r"model\.mm_projector\.(?:(\d+)\.)?(weight|bias)$", name)
    if m:
        return f"model.multi_modal_projector.linear_{int(m.group(1) or 0) // 2 + 1}.{m.group(2)}"
    return "model.language_model." + name[len("model."):] if name.startswith("model.") else name


def ulp_steps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in representable steps of a's 16-bit dtype (fp16 or bf16): the number
    of values of that dtype between them, i.e. ulps at the values themselves."""
    ia, ib = (x.to(a.dtype).view(torch.int16).to(torch.int32) for x in (a, b))
    ia, ib = (torch.where(x < 0, -32768 - x, x) for x in (ia, ib))
    return (ia - ib).abs()


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    return int(ulp_steps(a, b).max()) if a.numel() else 0


def spacing(x: torch.Tensor) -> torch.Tensor:
    """ulp of x's 16-bit dtype at |x| (the gap to the next representable value), as float64."""
    a = x.abs()
    up = (a.view(torch.int16) + 1).view(x.dtype)
    return (up.double() - a.double())


def lora_tensor_report(fx: dict, mine: dict, theirs: dict) -> dict:
    """Per LoRA-merged tensor: how far our merge is from LLaVA's, in ulps of the stored dtype, and why.

    PEFT 0.10 (LLaVA's) merges `W + fp16(B @ A * s)`: the delta is rounded to the weight dtype before
    the add, so the sum is rounded twice. loadgraph (and PEFT >= 0.12, whose adapter weights stay
    float32) rounds `W + B @ A * s` once. Both are recomputed here from the fixture's own files to
    show that each side equals its formula bit for bit; the distance to the exact (float64) merge
    then says which is nearer.
    """
    base = load_file(str(Path(fx["model_base"]) / "model.safetensors"))
    adapter = load_file(str(Path(fx["model_path"]) / "adapter_model.safetensors"))
    cfg = json.loads((Path(fx["model_path"]) / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    rows, merged = [], 0
    for name, t in theirs.items():
        a_key = "base_model.model." + name.removesuffix(".weight") + ".lora_A.weight"
        if a_key not in adapter:
            continue
        merged += 1
        w, a, b, m = base[name], adapter[a_key], adapter[a_key.replace("lora_A", "lora_B")], ours_tensor(mine, name)
        d32 = (b.float() @ a.float()) * scale
        once, twice = (w.float() + d32).to(w.dtype), w + d32.to(w.dtype)
        exact = w.double() + (b.double() @ a.double()) * scale
        steps = ulp_steps(m, t)
        # the same difference in ulps at the scale of the sum's terms (max of |W|, |delta|, |result|): where
        # W and delta cancel, the result is small and its own ulps count the delta's rounding many times over
        terms = torch.stack([w.abs(), d32.to(w.dtype).abs(), m.abs(), t.abs()]).amax(0)
        operand = ((m.double() - t.double()).abs() / spacing(terms)).max()
        rows.append({
            "tensor": name, "elements": t.numel(), "differ": int((steps > 0).sum()), "over_1ulp": int((steps > 1).sum()),
            "max_ulps": int(steps.max()), "max_ulps_at_terms_scale": round(float(operand), 3),
            "ours_is_round_once": torch.equal(m, once), "llava_is_round_twice": torch.equal(t, twice),
            "ours_err_vs_exact_ulps": round(float(((m.double() - exact).abs() / spacing(m)).max()), 3),
            "llava_err_vs_exact_ulps": round(float(((t.double() - exact).abs() / spacing(t)).max()), 3),
        })
    return {"merged_tensors": merged, "scale": scale, "dtype": str(next(iter(base.values())).dtype), "per_tensor": rows}


def run_case(root: Path, family: str, lora: bool, projector: str, overrides: dict | None = None, spm: bool = False, anyres: tuple | None = None) -> dict:
    fx = make_fixture(root, family, lora=lora, projector=projector, sentencepiece=spm, anyres=bool(anyres))
    case_id = case_name(family, lora, projector, overrides, spm, anyres)
    out = root / f"out-{case_id}"
    out.mkdir()
    side = json.loads((root / "clip-tiny" / "config.json").read_text())["image_size"]
    image = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(1)).half()
    save_file({"image": image}, str(out / "image.safetensors"))
    proc = subprocess.run([LLAVA_PY, str(Path(__file__).with_name("run_llava.py")), fx["model_path"], fx["model_base"] or "-",
                           fx["model_name"], str(out), str(out / "image.safetensors"), json.dumps(overrides or {}), "x".join(map(str, anyres or (50, 22)))], capture_output=True, text=True, cwd=root)
    if proc.returncode:
        return {"case": case_id, "error": proc.stderr.strip().splitlines()[-1]}
    theirs_doc = json.loads((out / "llava.json").read_text())
    theirs = load_file(str(out / "llava_state.safetensors"))
    sizes = [tuple(image.shape[-2:])]
    if (out / "llava_image.safetensors").is_file():  # anyres: LLaVA's process_images output, fed to both
        image, sizes = load_file(str(out / "llava_image.safetensors"))["image"], [tuple(s) for s in theirs_doc["image_sizes"]]
    tokenizer, model, image_processor, context_len = load_pretrained_model(
        fx["model_path"], fx["model_base"], fx["model_name"], device_map="cpu", device="cpu", cache=root / "cache", overwrite_config=overrides)
    mine = model.state_dict()
    identical, worst, missing, skipped = 0, (0, None), [], 0
    for name, t in theirs.items():
        if name.endswith("rotary_emb.inv_freq"):
            skipped += 1
            continue
        m = ours_tensor(mine, name)
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
        generated = model.generate(ids, images=image, image_sizes=sizes, do_sample=False, max_new_tokens=8, use_cache=True)
        logits = model(ids, images=image, image_sizes=sizes).logits.float()
    their_logits = load_file(str(out / "llava_logits.safetensors"))["logits"]
    texts = list(theirs_doc["tokens"])
    ours_tokens = token_report(tokenizer, texts, lambda t: image_token_ids(tokenizer, t))
    token_diffs = [t for t in texts if ours_tokens[t] != theirs_doc["tokens"][t]]
    answer = tokenizer.batch_decode(generated, skip_special_tokens=True)[0].strip()
    # what transformers 5's own tokenizer (use_fast ignored) would have given, for the record
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(model.loadgraph_artifact.path))
    for token in set(tokenizer.get_vocab()) - set(auto.get_vocab()):
        auto.add_tokens([token], special_tokens=True)
    auto_tokens = token_report(auto, texts, lambda t: image_token_ids(auto, t))
    auto_equal = sum(auto_tokens[t] == theirs_doc["tokens"][t] for t in texts)
    lora_report = lora_tensor_report(fx, mine, theirs) if lora else None
    changed = None
    if overrides:  # the overrides must change the output, or matching LLaVA would prove nothing
        plain = load_pretrained_model(fx["model_path"], fx["model_base"], fx["model_name"], device="cpu", cache=root / "cache")[1]
        with torch.inference_mode():
            changed = float((plain(ids, images=image, image_sizes=sizes).logits[:, -1].float() - logits[:, -1]).abs().max())
    return {
        "case": case_id, "peer_note": theirs_doc.get("peer_note"), "overrides": overrides, "logits_change_from_overrides": changed, "classes": [theirs_doc["class"], type(model).__name__],
        "tensors": len(theirs), "bit_identical": identical, "max_ulps": worst[0], "worst_tensor": worst[1], "missing": missing[:3], "skipped": skipped,
        "greedy_equal": generated.tolist() == theirs_doc["generated"], "generated": [theirs_doc["generated"], generated.tolist()],
        "logits_shape": [list(their_logits.shape), list(logits.shape)],
        "logits_max_abs_diff": float((logits - their_logits).abs().max()) if logits.shape == their_logits.shape else None,
        "context_len": [theirs_doc["context_len"], context_len], "tokenizer_len": [theirs_doc["vocab"], len(tokenizer)], "llava_applied": theirs_doc.get("applied"),
        "tokenizer_class": [theirs_doc["tokenizer_class"], type(tokenizer).__name__], "tokenizer_is_fast": [theirs_doc["tokenizer_is_fast"], tokenizer.is_fast],
        "texts_equal": f"{len(texts) - len(token_diffs)}/{len(texts)}", "texts_differing": {t: [theirs_doc["tokens"][t], ours_tokens[t]] for t in token_diffs[:4]},
        "answer_equal": answer == theirs_doc["answer"], "texts_equal_with_transformers5_tokenizer": f"{auto_equal}/{len(texts)}",
        "lora": lora_report,
    }


def main() -> int:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        only = sys.argv[1:]  # optional substrings of case names ("llama-mlp2x_gelu-lora"), to rerun a few
        for case in CASES:
            if only and not any(o in case_name(*case) for o in only):
                continue
            r = run_case(Path(tmp), *case)
            results.append(r)
            print(json.dumps(r), flush=True)
    bad = [r for r in results if "error" in r or not r["greedy_equal"] or r["missing"] or r["max_ulps"] != 0
           or r["logits_change_from_overrides"] == 0.0 or r["texts_differing"] or not r["answer_equal"]]
    print(f"llava-check: {len(results) - len(bad)} passed, {len(bad)} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
