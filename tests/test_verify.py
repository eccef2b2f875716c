"""verify never fails a correct build and always catches a wrong one.

Correct builds: a matrix over dtype (auto/bf16/fp16/fp32) x adapter kind (LoRA, rsLoRA, DoRA,
stacked) x quantization (none, nf4, fp4, int8, fp8) on four architectures, every pair of levels
covered, each built with the default spec (verify on, no `dtype` where the matrix says auto),
plus the 165M generator model with nf4. Wrong builds: published artifacts altered the way a
buggy stage would (a perturbed or swapped weight, the wrong alpha, flipped quantized bytes, a
changed absmax or scale, a NaN), each of which verify must reject naming the check and tensor.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_cli, write_spec
from loadgraph.errors import BuildError
from loadgraph.pipeline.cache import Artifact, Cache
from loadgraph.testing import make_llama_checkpoint, make_lora_adapter

ARCHS = ["llama", "qwen2", "mistral", "gemma"]
DTYPES = ["auto", "bfloat16", "float16", "float32"]
ADAPTERS = ["lora", "rslora", "dora", "stacked"]
QUANTS = [None, {"method": "bnb-nf4", "double_quant": True}, {"method": "bnb-fp4"}, {"method": "bnb-int8"},
          {"method": "fp8", "fp8_block_size": [32, 32]}]
# 20 cases: every (arch, quantization) and every (dtype, quantization) pair once; adapters rotate.
CASES = [(ARCHS[i % 4], DTYPES[(i // 5) % 4], ADAPTERS[(i + i // 4) % 4], QUANTS[i % 5]) for i in range(20)]


def build_in_process(doc: dict, cache_dir: Path):
    """The CLI's build path without a subprocess (the matrix is long): spec -> graph -> local executor."""
    from loadgraph.pipeline.executors.local import LocalExecutor
    from loadgraph.pipeline.graph import compile_specs
    from loadgraph.pipeline.runner import build
    from loadgraph.spec import parse_spec

    cache = Cache(cache_dir)
    graph = compile_specs(parse_spec(doc, "test"), cache)
    return graph, cache, build(graph, cache, LocalExecutor)


def adapters_for(kind: str, base: Path, root: Path) -> list[dict]:
    def make(name: str, **kw) -> dict:
        out = root / f"{base.name}-{name}"
        if not out.exists():
            make_lora_adapter(base, out, **kw)
        return {"path": str(out)}

    if kind == "stacked":
        return [make("lora-s1", r=4, seed=1), make("dora-s2", r=8, seed=2, use_dora=True, use_rslora=True)]
    return [make(kind, r=8, use_rslora=kind == "rslora", use_dora=kind == "dora")]


def verify_report(report) -> dict:
    return next(n for n in report.nodes if n.stage == "verify").details["verify"]


@pytest.mark.parametrize("arch,dtype,adapter,quant", CASES, ids=[f"{a}-{d}-{k}-{(q or {}).get('method', 'none')}" for a, d, k, q in CASES])
def test_correct_builds_pass_verify(arch, dtype, adapter, quant, models, tmp_path_factory, tmp_path):
    base = models(arch, "bfloat16" if dtype == "auto" else "float32")
    doc = {"source": {"model": str(base)}, "adapters": adapters_for(adapter, base, tmp_path_factory.getbasetemp()),
           "export": {"path": str(tmp_path / "out")}}
    if dtype != "auto":
        doc["dtype"] = dtype
    if quant:
        doc["quantize"] = quant
    _, _, report = build_in_process(doc, tmp_path / "cache")
    assert report.ok and (tmp_path / "out" / "config.json").exists()
    checks = verify_report(report)["checks"]
    label = {"bnb-nf4": "nf4", "bnb-fp4": "fp4", "bnb-int8": "int8", "fp8": "fp8"}.get((quant or {}).get("method"))
    assert {"merge", "export", "finite", "smoke"} <= set(checks) and (label is None or label in checks)
    assert checks["merge"]["adapted"] > 0 and checks["merge"]["max_ulp"] <= checks["merge"]["bound_ulp"]
    if label:
        assert checks[label]["quantized"] > 0 and checks[label]["worst"] <= 1.0
    if label == "fp8" and torch.cuda.is_available() and "skipped" in checks["smoke"]:
        assert "kernel" in checks["smoke"]["skipped"]  # transformers' FP8 path on a CUDA host needs the hub `kernels`
    else:
        assert checks["smoke"]["loaded"] and "relative_error" in checks["smoke"]
    assert len(verify_report(report)["summary"]) == len(checks)


@pytest.fixture(scope="module")
def generator_165m(tmp_path_factory) -> Path:
    """The mid-size model whose correct NF4 builds the old logits tolerance (0.35) rejected."""
    out = tmp_path_factory.mktemp("gen165m") / "model"
    return make_llama_checkpoint(out, hidden_size=1024, num_layers=8, intermediate_size=2816, vocab_size=32000,
                                 num_heads=16, num_kv_heads=16, dtype="bfloat16", max_shard_size="200MB")


def test_165m_generator_nf4_quantize_and_merge_pass(generator_165m, tmp_path):
    adapter = make_lora_adapter(generator_165m, tmp_path / "lora", r=16, dtype="bfloat16",
                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    quantize = {"method": "bnb-nf4", "double_quant": True}
    _, _, alone = build_in_process({"source": {"model": str(generator_165m)}, "quantize": quantize}, tmp_path / "cache")
    _, _, merged = build_in_process({"source": {"model": str(generator_165m)}, "adapters": [{"path": str(adapter)}], "quantize": quantize},
                                    tmp_path / "cache")
    for report in (alone, merged):
        checks = verify_report(report)["checks"]
        assert report.ok and checks["nf4"]["quantized"] == 8 * 7 and checks["nf4"]["worst"] <= 1.0
    assert verify_report(merged)["checks"]["merge"]["adapted"] == 8 * 7


# -- wrong builds ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(models, tmp_path_factory):
    """Correct builds (merge + quantize + export, verify on) whose artifacts the tests then alter."""
    root = tmp_path_factory.mktemp("wrong")
    base = models("llama", "bfloat16")
    adapter = make_lora_adapter(base, root / "lora", r=8, lora_alpha=16, seed=3)
    out = {}
    for label, quant in (("nf4", {"method": "bnb-nf4"}), ("nf4dq", {"method": "bnb-nf4", "double_quant": True}),
                         ("int8", {"method": "bnb-int8"}), ("fp8", {"method": "fp8", "fp8_block_size": [32, 32]})):
        doc = {"source": {"model": str(base)}, "adapters": [{"path": str(adapter)}], "quantize": quant, "export": {"path": str(root / label)}}
        graph, cache, report = build_in_process(doc, root / "cache")
        assert report.ok
        node = next(n for n in graph.nodes.values() if n.stage == "verify")
        out[label] = (cache, node)
    return out


def tampered(art: Artifact, name: str, change, dest: Path) -> Artifact:
    """A copy of `art` whose tensor `name` holds change(tensor): what a buggy stage would publish."""
    from loadgraph.stages.verify_tensors import read

    if not dest.exists():
        shutil.copytree(art.path, dest, copy_function=shutil.copyfile)
    art = Artifact(art.key, dest, art.manifest)
    new = change(read(art, name).clone())
    t = art.tensors[name]
    raw = new.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    assert len(raw) == t["end"] - t["begin"]
    with open(dest / t["file"], "r+b") as f:
        f.seek(t["begin"])
        f.write(raw)
    # A buggy stage records the digests of the bytes it wrote: the manifest matches the file.
    from loadgraph.formats.digest import digest_bytes, file_record

    record, _ = file_record(dest / t["file"])
    manifest = {**art.manifest, "tensors": {**art.tensors, name: {**t, "blake3": digest_bytes(raw)}},
                "files": {**art.files, t["file"]: {**art.files[t["file"]], **record}}}
    return Artifact(art.key, dest, manifest)


def run_tensor_checks(cache: Cache, node, **replace: Artifact) -> None:
    from loadgraph.pipeline.units import node_context
    from loadgraph.stages.verify import VerifyStage

    ctx = node_context(cache, node.describe())
    ctx.inputs.update(replace)
    stage = VerifyStage()
    for unit in stage.units(ctx):
        if unit.id != "smoke":
            stage.run_unit(ctx, unit, Path("/nonexistent"))


def bump_ulps(n: int):
    def change(t: torch.Tensor) -> torch.Tensor:
        flat = t.view(-1)
        i = int(flat.float().abs().argmax())
        bits = flat[i:i + 1].view(torch.int16)
        bits += n if flat[i] > 0 else -n
        return t
    return change


def swap_with(other: torch.Tensor):
    return lambda t: other.clone()


def wrong_alpha(cache: Cache, node, name: str):
    from loadgraph.formats.lora import LoraAdapter
    from loadgraph.formats.lora_plan import plan_merge
    from loadgraph.formats.lora_merge import merge_shard
    from loadgraph.formats.names import inspect_checkpoint_names
    from loadgraph.stages.adapter import base_headers
    from loadgraph.stages.verify_tensors import read

    base = cache.get(node.inputs["merge_base"])
    adapter = LoraAdapter.load(cache.get(node.inputs["adapter0"]).path)
    plan = plan_merge(adapter, inspect_checkpoint_names(base.path, keys=list(base.tensors)), base_headers(base.tensors), scale_multiplier=2.0)
    return lambda t: merge_shard(plan, {name: read(base, name)}, adapter.load_tensors())[name]


def nan_at_zero(t: torch.Tensor) -> torch.Tensor:
    t.view(-1)[0] = float("nan")
    return t


def flip_byte(t: torch.Tensor) -> torch.Tensor:
    t.view(torch.uint8).view(-1)[7] ^= 0xFF
    return t


def scale_by(factor: float):
    def change(t: torch.Tensor) -> torch.Tensor:
        t.view(-1)[min(3, t.numel() - 1)] *= factor
        return t
    return change


def add_to_int(delta: int):
    def change(t: torch.Tensor) -> torch.Tensor:
        t.view(-1)[5] = int(t.view(-1)[5]) + (delta if int(t.view(-1)[5]) < 100 else -delta)
        return t
    return change


Q = "model.layers.0.self_attn.q_proj.weight"
WRONG = [
    # (build, input altered, tensor, change, words the error must contain)
    ("nf4", "merged", Q, bump_ulps(2), "merge"),
    ("nf4", "merged", Q, "swap", "merge"),
    ("nf4", "merged", "model.layers.1.mlp.up_proj.weight", "alpha", "merge"),
    ("nf4", "merged", "model.layers.0.input_layernorm.weight", nan_at_zero, "NaN"),
    ("nf4", "merged", "model.embed_tokens.weight", bump_ulps(1), "merge"),
    ("nf4", "quantized", Q, flip_byte, "quantize"),
    ("nf4", "quantized", Q + ".absmax", scale_by(1.5), "absmax"),
    ("nf4", "quantized", "lm_head.weight", bump_ulps(1), "not quantized"),
    ("nf4dq", "quantized", Q + ".nested_absmax", scale_by(1.2), "quantize"),
    ("nf4dq", "quantized", Q, flip_byte, "quantize"),
    ("int8", "quantized", Q, add_to_int(3), "quantize"),
    ("int8", "quantized", "model.layers.0.self_attn.q_proj.SCB", scale_by(1.01), "SCB"),
    ("fp8", "quantized", Q, flip_byte, "quantize"),
    ("fp8", "quantized", "model.layers.0.self_attn.q_proj.weight_scale_inv", scale_by(2.0), "scale_inv"),
    ("nf4", "exported", "model.layers.1.mlp.down_proj.weight", flip_byte, "export"),
]


@pytest.mark.parametrize("case", range(len(WRONG)), ids=[f"{w[0]}-{w[1]}-{w[2].rsplit('.', 2)[-2]}-{i}" for i, w in enumerate(WRONG)])
def test_wrong_builds_are_caught_naming_check_and_tensor(case, built, tmp_path):
    label, which, name, change, words = WRONG[case]
    cache, node = built[label]
    art = cache.get(node.inputs[which])
    if change == "swap":
        from loadgraph.stages.verify_tensors import read

        change = swap_with(read(art, name.replace("layers.0", "layers.1")))
    elif change == "alpha":
        change = wrong_alpha(cache, node, name)
    bad = tampered(art, name, change, tmp_path / "bad")
    with pytest.raises(BuildError) as err:
        run_tensor_checks(cache, node, **{which: bad})
    message = str(err.value)
    assert words in message and (name in message or name.rsplit(".", 1)[0] in message), message


def republish(cache: Cache, key: str, name: str, change) -> None:
    """Rewrite a published entry in place with a changed tensor and a manifest that matches it:
    a wrong artifact the cache cannot tell from a right one (what a buggy stage version would leave)."""
    from loadgraph.formats.digest import file_record
    from loadgraph.pipeline.cache import MANIFEST, write_json_atomic

    art = cache.get(key)
    t = art.tensors[name]
    path = art.path / t["file"]
    path.chmod(0o644)
    tampered(art, name, change, art.path)
    manifest = dict(art.manifest)
    record, digests = file_record(path)
    manifest["files"] = {**manifest["files"], t["file"]: {**manifest["files"][t["file"]], **record, "mtime_ns": path.stat().st_mtime_ns}}
    manifest["tensors"] = {n: {**e, "blake3": digests[n]} if e["file"] == t["file"] else e for n, e in manifest["tensors"].items()}
    path.chmod(0o444)
    write_json_atomic(art.path / MANIFEST, manifest)
    assert cache.get(key) is not None


def test_wrong_merge_fails_the_build_and_exports_nothing(models, tmp_path):
    base = models("llama", "bfloat16")
    adapter = make_lora_adapter(base, tmp_path / "lora", r=8, seed=4)
    spec = {"source": {"model": str(base)}, "adapters": [{"path": str(adapter)}], "verify": False}
    graph, cache, report = build_in_process(spec, tmp_path / "cache")
    merge_key = next(n.key for n in graph.nodes.values() if n.stage == "merge")
    republish(cache, merge_key, Q, bump_ulps(3))
    out = tmp_path / "out"
    spec_file = write_spec(tmp_path / "s.yaml", {**spec, "verify": True, "export": {"path": str(out)}})
    proc = run_cli("build", spec_file, "--executor", "local", "--cache", cache.root)
    assert proc.returncode == 1, proc.stderr
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert "verify: merge" in last and Q in last and not out.exists()


# -- coverage and plan-time refusals -----------------------------------------------------------


def test_attach_is_verified(models, tmp_path):
    base = models("llama", "float32")
    adapter = make_lora_adapter(base, tmp_path / "lora", r=4, seed=5)
    _, _, report = build_in_process({"source": {"model": str(base)}, "adapters": [{"path": str(adapter), "mode": "attach", "scale": 0.5}]},
                                    tmp_path / "cache")
    smoke = verify_report(report)["checks"]["smoke"]
    assert report.ok and smoke["attach"]["modules"] == 2 * 7 and smoke["attach"]["worst"] <= 1.0


def test_adapter_for_another_architecture_is_refused_at_plan_time(models, tmp_path):
    base = models("llama", "float32")
    adapter = make_lora_adapter(base, tmp_path / "lora", r=4, seed=6)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["auto_mapping"]["base_model_class"] == "LlamaForCausalLM"
    config["auto_mapping"]["base_model_class"] = "Qwen2ForCausalLM"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    doc = {"source": {"model": str(base)}, "adapters": [{"path": str(adapter)}]}
    proc = run_cli("plan", write_spec(tmp_path / "s.yaml", doc), "--cache", tmp_path / "cache")
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert "Qwen2ForCausalLM" in line and "LlamaForCausalLM" in line and "allow_other_base" in line
    doc["adapters"][0]["allow_other_base"] = True
    assert run_cli("plan", write_spec(tmp_path / "s.yaml", doc), "--cache", tmp_path / "cache").returncode == 0


def test_70b_plan_units_ask_for_at_most_3x_their_bytes(tmp_path):
    """A 70B-shaped merge + nf4 + export plan (header-only sparse shards): verify's units stay
    byte-sized and no unit asks the Ray executor for more than 3x the bytes it reads."""
    from loadgraph.pipeline.executors.ray import MEMORY_PER_INPUT_BYTE, MIN_MEMORY
    from loadgraph.pipeline.stage import NodeContext
    from loadgraph.stages.verify import UNIT_BYTES, VerifyStage
    from loadgraph.stages.verify_tensors import quant_plan
    from loadgraph.stages.export import shard_table

    src = make_llama_checkpoint(tmp_path / "70b", hidden_size=8192, num_layers=80, intermediate_size=28672, vocab_size=128256,
                                num_heads=64, num_kv_heads=8, sparse=True, tokenizer=False)
    tensors = {n: t for shard in sorted(src.glob("*.safetensors")) for n, t in shard_table(shard, shard.name).items()}
    model = Artifact("base", src, {"tensors": tensors})
    settings = {"method": "bnb-nf4", "double_quant": True, "blocksize": 64, "compute_dtype": "float32", "quant_storage": "uint8",
                "skip_modules": [], "fp8_block_size": [128, 128], "llm_int8_threshold": 6.0, "dtype": "auto"}
    plan = quant_plan(str(src), json.dumps(settings, sort_keys=True))
    quantized = Artifact("q", src, {"tensors": {d: {"file": "x", "begin": 0, "end": 1} for tp in plan.tensors.values() for d in tp.rename.values()}})
    params = {"tensors": True, "finite": True, "load": True, "logits": True, "rtol": None, "method": "bnb-nf4", "scales": [1.0],
              "quant_settings": settings, "allow_pickle": False, "base_roundtrip": "none", "export_dtype": "auto"}
    inputs = {"model": quantized, "merge_base": model, "merged": model, "quant_input": model, "quantized": quantized,
              "export_input": quantized, "exported": quantized}
    units = VerifyStage().units(NodeContext("k", params, {}, inputs, None))
    total = sum(t["end"] - t["begin"] for t in tensors.values())
    assert total > 130e9 and len(units) > 200
    largest_pair = 2 * max(t["end"] - t["begin"] for t in tensors.values())
    for unit in units:
        request = max(MIN_MEMORY, unit.nbytes * MEMORY_PER_INPUT_BYTE)
        assert request <= 3 * unit.nbytes, unit.id
        if unit.id != "smoke":
            assert unit.nbytes <= UNIT_BYTES // 2 + max(UNIT_BYTES, largest_pair)
