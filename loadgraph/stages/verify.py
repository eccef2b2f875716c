"""verify: a build is accepted only if its artifact loads cleanly, is finite, and computes what it should.

1. load with transformers (`output_loading_info=True`): any missing, unexpected or mismatched
   key fails (loading proves nothing by not raising);
2. every floating tensor scanned for NaN/Inf, one unit per shard;
3. logits on fixed probe inputs against a reference computed another way: a merged model
   against base + adapters applied by PEFT unmerged, a quantized model against its
   unquantized input, a re-export against its source, with a tolerance from dtype/method.
The output artifact is the report (verify.json); a failed check fails the build, so nothing
downstream (the export publish) happens.
"""

from __future__ import annotations

import json
from pathlib import Path

from loadgraph.errors import BuildError
from loadgraph.formats.safetensors import FLOAT_DTYPES, TensorEntry, read_tensor
from loadgraph.pipeline.stage import NodeContext, Stage, Unit

# Relative L2 error of logits allowed, by what separates the artifact from its reference.
# Quantization of random tiny models is noisier than of trained ones: these bounds are loose
# enough for both and still catch a wrong tensor (which gives errors near 1).
QUANT_TOLERANCE = {"bnb-nf4": 0.35, "bnb-fp4": 0.5, "bnb-int8": 0.1, "fp8": 0.1}
DTYPE_TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 6e-2, "auto": 1e-4}
GENERATE_TOKENS = 8
PROBE_LENGTH = 16


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


def load_checked(path: Path, dtype: str | None = None):
    """from_pretrained that fails on any missing/unexpected/mismatched key (on a GPU if there is one)."""
    import torch

    kwargs = {"output_loading_info": True, "device_map": "cuda" if torch.cuda.is_available() else "cpu"}
    if dtype and dtype != "auto":
        kwargs["dtype"] = getattr(torch, dtype)
    model, info = model_class(path).from_pretrained(str(path), **kwargs)
    bad = {k: sorted(info[k])[:5] for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)}
    if bad:
        raise BuildError(f"verify: {path} does not load cleanly with transformers: {bad}")
    return model.eval()


def logits_of(model, vocab_size: int):
    import torch

    with torch.no_grad():
        return model(input_ids=probe_ids(vocab_size).to(model.device)).logits.float().cpu()


def generate_smoke(model, vocab_size: int) -> list[int]:
    """A short greedy generation: catches generation-config and cache problems logits miss."""
    import torch

    ids = probe_ids(vocab_size)[:, :4].to(model.device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=GENERATE_TOKENS, min_new_tokens=GENERATE_TOKENS, do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    if len(new) != GENERATE_TOKENS:
        raise BuildError(f"verify: greedy generation produced {len(new)} tokens, expected {GENERATE_TOKENS}")
    return new


def vocab_size_of(path: Path) -> int:
    config = json.loads((path / "config.json").read_text())
    return int(config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size") or 32000)


class VerifyStage(Stage):
    name = "verify"
    version = 1

    def units(self, ctx: NodeContext) -> list[Unit]:
        units = []
        if ctx.params["finite"]:
            files = sorted({t["file"] for t in ctx.input().tensors.values()})
            units += [Unit(id=f"finite-{i:05d}", payload={"file": f}) for i, f in enumerate(files)]
        if ctx.params["load"] or ctx.params["logits"]:
            nbytes = sum(t["end"] - t["begin"] for t in ctx.input().tensors.values())
            units.append(Unit(id="load-logits", nbytes=nbytes, gpu=True))
        return units

    def run_unit(self, ctx: NodeContext, unit: Unit, out: Path) -> dict:
        if unit.id.startswith("finite"):
            return {"finite": scan_finite(ctx.input().path, ctx.input().tensors, ctx.input().files, unit.payload["file"])}
        return {"logits": self._load_and_compare(ctx)}

    def _load_and_compare(self, ctx: NodeContext) -> dict:
        art = ctx.input()
        # Both sides in the spec's dtype: an artifact that was not cast (no export) must not be
        # compared in its stored dtype against a cast reference.
        model = load_checked(art.path, ctx.params["dtype"])
        result: dict = {"loaded": True}
        vocab = vocab_size_of(art.path)
        if hasattr(model, "generate") and getattr(model, "can_generate", lambda: False)():
            result["generated"] = generate_smoke(model, vocab)
        if not ctx.params["logits"] or "reference" not in ctx.inputs:
            return result
        got = logits_of(model, vocab)
        del model
        want = logits_of(self._reference_model(ctx), vocab)
        err = float((got - want).norm() / want.norm().clamp_min(1e-12))
        tol = ctx.params["rtol"] if ctx.params["rtol"] is not None else default_tolerance(ctx.params)
        result.update(relative_error=err, tolerance=tol, max_abs_diff=float((got - want).abs().max()))
        if not err <= tol:
            raise BuildError(f"verify: logits parity failed: {art.key[:12]} differs from its reference by {err:.3g} (relative L2) > tolerance {tol:.3g}")
        return result

    def _reference_model(self, ctx: NodeContext):
        """The same computation done another way (see the module docstring)."""
        ref = ctx.inputs["reference"]
        adapters = [ctx.inputs[f"adapter{i}"].path for i in range(len(ctx.params["scales"]))]
        model = load_checked(ref.path, ctx.params["dtype"])
        if not adapters:
            return model
        from peft import PeftModel

        # Earlier adapters merged the way PEFT stacks them; the last one applied unmerged, unless
        # it adapts a tied embedding: PEFT's unmerged forward does not carry that delta to the
        # tied lm_head, so there PEFT's own merged model is the reference.
        tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
        for i, path in enumerate(adapters):
            model = PeftModel.from_pretrained(model, str(path))
            if ctx.params["scales"][i] != 1.0:
                for module in model.modules():
                    if hasattr(module, "scaling") and isinstance(module.scaling, dict):
                        module.scaling = {k: v * ctx.params["scales"][i] for k, v in module.scaling.items()}
            if i < len(adapters) - 1 or (tied and _targets_embeddings(path)):
                model = model.merge_and_unload()
        return model.eval()

    def finalize(self, ctx: NodeContext, results: dict[str, dict], out: Path) -> dict:
        report = {uid: r.get("finite") or r.get("logits") for uid, r in sorted(results.items())}
        (out / "verify.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        return {"verify": report, "verified": ctx.inputs["model"].key}


def _targets_embeddings(adapter_dir: Path) -> bool:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    names = json.dumps([config.get("target_modules"), config.get("modules_to_save")])
    return "embed" in names or "lm_head" in names


def default_tolerance(params: dict) -> float:
    if params.get("method"):
        return QUANT_TOLERANCE[params["method"]]
    if not params.get("scales"):
        return 0.0  # a re-export against its source (cast the same way): exact
    return DTYPE_TOLERANCE.get(params.get("dtype") or "auto", 1e-4)


def scan_finite(root: Path, tensors: dict[str, dict], files: dict[str, dict], rel: str) -> dict:
    """The shard's bytes must be those its manifest recorded, and no floating tensor may hold NaN/Inf."""
    import torch

    from loadgraph.formats.safetensors import sha256_file

    want = files.get(rel, {}).get("sha256")
    if want and sha256_file(root / rel) != want:
        raise BuildError(f"verify: {rel}: sha256 differs from the manifest (bytes changed after it was written); run `loadgraph cache verify --evict` and rebuild")
    checked = 0
    for name, t in tensors.items():
        if t["file"] != rel or t["dtype"] not in FLOAT_DTYPES:
            continue
        tensor = read_tensor(root / rel, TensorEntry(t["dtype"], tuple(t["shape"]), t["begin"], t["end"]))
        if not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise BuildError(f"verify: {rel}: tensor {name!r} has {bad} NaN/Inf values")
        checked += 1
    return {"file": rel, "tensors_checked": checked}


STAGES = {"verify": VerifyStage}
