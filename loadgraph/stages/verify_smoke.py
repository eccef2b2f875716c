"""verify's whole-model smoke check: the artifact loads strictly, generates, and computes logits.

It runs where the model fits (the node's GPUs through device_map, else host RAM) and is skipped
otherwise, with the reason recorded: the per-tensor checks are what prove a build at any size.
Logits on fixed probes are compared with a reference computed another way when there is one:
a merged model against base + adapters applied by PEFT unmerged (tolerance from the dtype the
artifact actually stores), a quantized model against its unquantized input (reported; the
quantization itself is proven tensor by tensor). Attached adapters load into a PeftModel
strictly (every adapter tensor in place) and each LoRA module's output is checked against the
adapter's factors in float64.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from loadgraph.errors import BuildError

GENERATE_TOKENS = 8
PROBE_LENGTH = 16
# Relative L2 error of merged-vs-unmerged logits allowed per stored dtype: PEFT's unmerged
# forward rounds differently from the merged weights, about this much through a forward pass.
STORED_DTYPE_TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 6e-2}
# A quantized model whose logits are unrelated to its input's scores about 1 or more.
QUANTIZED_SANITY = 1.0
# A quantized model's logits against its unquantized input tell little the per-tensor bounds have
# not proven, and cost a second full load: done only for references up to this size.
QUANTIZED_REFERENCE_MAX = 4 * 2**30
# Room for activations, the KV cache and the allocator beside the weights.
HEADROOM = 1.25


def probe_ids(vocab_size: int):
    import torch

    return ((torch.arange(PROBE_LENGTH) * 7919 + 11) % max(vocab_size - 1, 2)).unsqueeze(0)


def model_class(path: Path):
    import transformers

    config = json.loads((path / "config.json").read_text())
    for arch in config.get("architectures") or []:
        if hasattr(transformers, arch):
            return getattr(transformers, arch)
    if "vision_config" in config:
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


def vocab_size_of(path: Path) -> int:
    config = json.loads((path / "config.json").read_text())
    return int(config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size") or 32000)


def available_ram() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return int(psutil.virtual_memory().available)


def placement(need_bytes: int, gpu: bool = True) -> tuple[str | None, str]:
    """(device_map, where) for a model of `need_bytes`, or (None, why it fits nowhere)."""
    import torch

    gpu_free = 0
    if gpu and torch.cuda.is_available():
        gpu_free = sum(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
        if need_bytes * HEADROOM <= gpu_free:
            return ("auto" if torch.cuda.device_count() > 1 else "cuda"), "gpu"
    ram = available_ram()
    if need_bytes * HEADROOM <= ram:
        return "cpu", "cpu"
    gib = 2**30
    return None, f"needs {need_bytes / gib:.1f} GiB; {gpu_free / gib:.1f} GiB GPU and {ram / gib:.1f} GiB RAM free"


def load_checked(path: Path, device_map: str, dtype=None):
    """from_pretrained that fails on any missing/unexpected/mismatched key."""
    kwargs = {"output_loading_info": True, "device_map": device_map}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model, info = model_class(path).from_pretrained(str(path), **kwargs)
    bad = {k: sorted(info[k])[:5] for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)}
    if bad:
        raise BuildError(f"verify: smoke: {path} does not load cleanly with transformers: {bad}")
    return model.eval()


def logits_of(model, vocab_size: int):
    import torch

    with torch.no_grad():
        logits = model(input_ids=probe_ids(vocab_size).to(model.device)).logits.float().cpu()
    if not bool(torch.isfinite(logits).all()):
        raise BuildError("verify: smoke: the model's logits on the probe inputs are not finite")
    return logits


def generate_smoke(model, vocab_size: int) -> list[int]:
    """A short greedy generation: catches generation-config and cache problems logits miss."""
    import torch

    ids = probe_ids(vocab_size)[:, :4].to(model.device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=GENERATE_TOKENS,
                             min_new_tokens=GENERATE_TOKENS, do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    if len(new) != GENERATE_TOKENS:
        raise BuildError(f"verify: smoke: greedy generation produced {len(new)} tokens, expected {GENERATE_TOKENS}")
    return new


def stored_dtype_name(model) -> str:
    return str(model.dtype).removeprefix("torch.")


def peft_reference(base_path: Path, adapters: list[Path], scales: list[float], device_map: str, dtype):
    """Base + adapters through PEFT: earlier ones merged (PEFT's stacking), the last one unmerged.

    Unless the last adapts a tied embedding: PEFT's unmerged forward does not carry that delta to
    the tied lm_head, so there PEFT's own merged model is the reference.
    """
    from peft import PeftModel

    model = load_checked(base_path, device_map, dtype)
    tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
    for i, path in enumerate(adapters):
        model = PeftModel.from_pretrained(model, str(path))
        if scales[i] != 1.0:
            for module in model.modules():
                if hasattr(module, "scaling") and isinstance(module.scaling, dict):
                    module.scaling = {k: v * scales[i] for k, v in module.scaling.items()}
        if i < len(adapters) - 1 or (tied and _targets_embeddings(path)):
            model = model.merge_and_unload()
    return model.eval()


def _targets_embeddings(adapter_dir: Path) -> bool:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    names = json.dumps([config.get("target_modules"), config.get("modules_to_save")])
    return "embed" in names or "lm_head" in names


def compare_logits(got, want, tolerance: float, what: str) -> dict:
    err = float((got - want).norm() / want.norm().clamp_min(1e-12))
    result = {"relative_error": err, "tolerance": tolerance, "max_abs_diff": float((got - want).abs().max()), "against": what}
    if not err <= tolerance:
        raise BuildError(f"verify: smoke: logits differ from {what} by {err:.3g} (relative L2) > tolerance {tolerance:.3g}")
    return result


def attached_parity(model, adapters: list[tuple[Path, float]]) -> dict:
    """PeftModel over the artifact's adapters: every adapter tensor in place, every LoRA module's
    contribution equal to scale * B @ A @ x computed in float64 from the adapter file."""
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    from loadgraph.formats.lora import LoraAdapter

    checked = 0
    worst = 0.0
    for i, (path, scale) in enumerate(adapters):
        name = f"a{i}"
        model = PeftModel.from_pretrained(model, str(path), adapter_name=name) if i == 0 else model
        if i:
            model.load_adapter(str(path), adapter_name=name)
        if scale != 1.0:
            for module in model.modules():
                if isinstance(module, LoraLayer) and name in module.scaling:
                    module.scaling[name] *= scale
        weights_file = path / "adapter_model.safetensors"
        file_tensors = load_file(str(weights_file)) if weights_file.is_file() else {}
        # Strict: every LoRA tensor of the file sits in the model with the file's values.
        lora_params = {_lora_key(k, name): v for k, v in model.named_parameters() if ".lora_" in k and f".{name}" in k}
        for key, want in file_tensors.items():
            if ".lora_" not in key:
                continue
            param = lora_params.get(_lora_key(key, None))
            if param is None:
                raise BuildError(f"verify: attach: {weights_file}: tensor {key} did not load into the PeftModel")
            if not torch.equal(param.detach().cpu(), want.to(param.dtype).view(param.shape)):
                raise BuildError(f"verify: attach: {weights_file}: tensor {key} loaded with different values")
        model.set_adapter(name)
        targets = LoraAdapter.load(path).targets()
        for module_name, module in model.named_modules():
            if not isinstance(module, LoraLayer) or name not in module.lora_A:
                continue
            target = targets.get(module_name.removeprefix("base_model.model."))
            if target is None:
                raise BuildError(f"verify: attach: {weights_file}: PEFT attached module {module_name}, which the adapter file does not hold")
            worst = max(worst, _module_parity(module_name, module, name, target.scaling(scale)))
            checked += 1
    if not checked:
        raise BuildError("verify: attach: no LoRA module was attached to the model")
    return {"modules": checked, "worst": worst}


def _module_parity(module_name: str, module, adapter: str, scaling: float) -> float:
    """The module's LoRA output against scale * B @ A @ x in float64, the scale from adapter_config.json."""
    import torch

    a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    dtype = a.dtype
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, a.shape[1], generator=generator).to(device=a.device, dtype=dtype)
    with torch.no_grad():
        got = (module.lora_B[adapter](module.lora_A[adapter](x)) * module.scaling[adapter]).double().cpu()
    want = (x.double().cpu() @ a.double().cpu().T @ b.double().cpu().T) * scaling
    err = float((got - want).norm() / want.norm().clamp_min(1e-300))
    tolerance = max(16 * torch.finfo(dtype).eps / 2, 1e-5)
    if not err <= tolerance:
        raise BuildError(f"verify: attach: module {module_name}: LoRA output differs from scale * B @ A @ x by {err:.3g} > {tolerance:.3g}")
    return err / tolerance


def _lora_key(name: str, adapter: str | None) -> str:
    """A LoRA tensor's name without the adapter level, the PEFT prefix and a trailing .weight."""
    if adapter is not None:
        name = name.replace(f".{adapter}.", ".").removesuffix(f".{adapter}")
    return name.removeprefix("base_model.model.").removesuffix(".weight")


def _load_and_probe(final, device_map: str, where: str):
    """Strict load, then attached-adapter parity, or greedy generation and the probe logits."""
    started = time.perf_counter()
    model = load_checked(final.path, device_map)
    result: dict = {"loaded": True, "device": where, "dtype": stored_dtype_name(model), "load_seconds": time.perf_counter() - started}
    attached = final.manifest.get("adapters") or []
    if attached:
        result["attach"] = attached_parity(model, [(final.path / a["path"], float(a["scale"])) for a in attached])
        return model, result, None
    vocab = vocab_size_of(final.path)
    if getattr(model, "can_generate", lambda: False)():
        result["generated"] = generate_smoke(model, vocab)
    return model, result, logits_of(model, vocab)


def check_loaded_files(ctx, artifacts) -> None:
    """transformers reads whole files: those of inputs this build did not produce are checked
    whole first (memoised by inode change time, so an unchanged file is hashed once)."""
    from loadgraph.errors import CorruptInput
    from loadgraph.pipeline.integrity import Verifier, damaged_files

    trusted = {ctx.inputs[n].key for n in ctx.trusted}
    verifier = Verifier(ctx.cache.root)
    for art in artifacts:
        if art is None or art.key in trusted:
            continue
        damaged = damaged_files(verifier, art.path, {rel: m for rel, m in art.files.items() if rel.endswith(".safetensors")})
        if damaged:
            raise CorruptInput(f"{art.path / damaged[0]}: bytes differ from the digest in the manifest of cache entry {art.key[:12]}; evicting it", art.key)
    verifier.save()


def run_smoke(ctx) -> dict:
    """The smoke unit: place, load strictly, generate, compare logits; or skip with the reason."""
    import gc

    p, inputs = ctx.params, ctx.inputs
    final = ctx.input()
    reference = inputs.get("merge_base") if "merged" in inputs and "quantized" not in inputs else inputs.get("quant_input")
    check_loaded_files(ctx, [final, reference])
    sizes = [sum(t["end"] - t["begin"] for t in art.tensors.values()) for art in (final, reference) if art is not None]
    device_map, where = placement(max(sizes))
    if device_map is None:
        return {"skipped": f"the model fits nowhere on this node: {where}"}
    try:
        model, result, got = _load_and_probe(final, device_map, where)
    except ImportError as exc:
        # A GPU path that needs a package this node lacks (transformers' FP8 matmul needs the hub
        # `kernels`): the CPU path (FP8 dequantized on load) checks the same files.
        if device_map == "cpu" or placement(max(sizes), gpu=False)[0] is None:
            return {"skipped": f"cannot run on this node's GPU ({str(exc).splitlines()[0][:160]}) and it does not fit its RAM"}
        device_map = "cpu"
        try:
            model, result, got = _load_and_probe(final, "cpu", f"cpu (GPU path unavailable: {str(exc).splitlines()[0][:120]})")
        except ImportError as again:
            # transformers picks its FP8 path by whether CUDA exists, not by the device asked for.
            return {"skipped": f"transformers cannot run this checkpoint on this node ({str(again).splitlines()[0][:160]})"}
    if "attach" in result:
        return result
    dtype = model.dtype
    vocab = vocab_size_of(final.path)
    del model
    gc.collect()
    if not p["logits"] or reference is None:
        return result
    if "quantized" in inputs:
        if sizes[-1] > QUANTIZED_REFERENCE_MAX:
            result["reference"] = f"none: the unquantized input is {sizes[-1] / 2**30:.1f} GiB (the per-tensor bounds cover the quantization)"
            return result
        want = logits_of(load_checked(reference.path, device_map, dtype), vocab)
        tolerance = p["rtol"] if p["rtol"] is not None else QUANTIZED_SANITY
        result.update(compare_logits(got, want, tolerance, "the unquantized input"))
        return result
    if p.get("base_roundtrip") == "nf4":
        result["reference"] = "none: merged into the NF4 round trip of the base (the per-tensor merge check covers it)"
        return result
    adapters = [inputs[f"adapter{i}"].path for i in range(len(p["scales"]))]
    want = logits_of(peft_reference(reference.path, adapters, p["scales"], device_map, dtype), vocab)
    tolerance = p["rtol"] if p["rtol"] is not None else STORED_DTYPE_TOLERANCE[result["dtype"]]
    result.update(compare_logits(got, want, tolerance, "PEFT unmerged"))
    return result
