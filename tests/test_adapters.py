"""Adapters end to end through the CLI, against the real PEFT: merge is bit-identical to
`merge_and_unload`, attach gives PEFT's unmerged model, bad adapters fail fast in preflight."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_imports, run_cli, write_spec
from loadgraph.testing import make_lora_adapter

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def auto_class(kind: str):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if kind == "llava" else AutoModelForCausalLM


def tensors_of(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def peft_merged(base: Path, adapters: list[Path], kind: str, dtype: str, out: Path):
    """The reference: PEFT's sequential merge_and_unload, saved with save_pretrained."""
    from peft import PeftModel

    model = auto_class(kind).from_pretrained(base, dtype=getattr(torch, dtype))
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.save_pretrained(out)
    return model


def build(spec: Path, cache: Path, *extra, expect: int = 0):
    proc = run_cli("build", spec, "--executor", "local", "--cache", cache, *extra)
    assert proc.returncode == expect, proc.stderr
    return proc


def spec_for(tmp_path: Path, base: Path, adapters: list[dict], dtype: str, name: str = "s.yaml", **extra) -> Path:
    doc = {"source": {"model": str(base)}, "dtype": dtype, "adapters": adapters, "export": {"path": str(tmp_path / "out")}, **extra}
    return write_spec(tmp_path / name, doc)


CASES = [
    ("llama", "float32", {}),
    ("llama", "bfloat16", {"use_rslora": True, "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"v_proj": 32}}),
    ("llama", "float16", {"use_dora": True}),
    ("llama", "bfloat16", {"target_modules": ATTENTION + ["embed_tokens"], "modules_to_save": ["lm_head"]}),
    ("qwen2", "bfloat16", {"bias": "all"}),
    ("mistral", "float16", {}),
    ("gemma", "float32", {"target_modules": ATTENTION + ["embed_tokens"]}),
    ("mixtral", "bfloat16", {"target_modules": ATTENTION}),
    ("llava", "float32", {"target_modules": ["q_proj", "v_proj", "linear_1", "linear_2"]}),
]


@pytest.mark.parametrize("kind,dtype,options", CASES, ids=[f"{k}-{d}-{'-'.join(o) or 'lora'}" for k, d, o in CASES])
def test_merge_is_bit_identical_to_peft(kind, dtype, options, models, tmp_path, cache_dir):
    base = models(kind)
    adapter = make_lora_adapter(base, tmp_path / "adapter", r=8, seed=3, kind=kind, **options)
    spec = spec_for(tmp_path, base, [{"path": str(adapter)}], dtype)
    build(spec, cache_dir)
    reference = peft_merged(base, [adapter], kind, dtype, tmp_path / "ref")
    ours, ref = tensors_of(tmp_path / "out"), tensors_of(tmp_path / "ref")
    assert ours.keys() == ref.keys()
    different = [k for k in ref if not torch.equal(ours[k], ref[k])]
    assert not different, different[:5]
    # The export loads with transformers and computes exactly what PEFT's merged model computes.
    model = auto_class(kind).from_pretrained(tmp_path / "out")
    ids = torch.arange(4, 20)[None]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_stacked_adapters_equal_peft_sequential_merge(models, tmp_path, cache_dir):
    base = models("llama")
    first = make_lora_adapter(base, tmp_path / "a1", r=4, seed=1)
    second = make_lora_adapter(base, tmp_path / "a2", r=8, seed=2, use_dora=True)
    spec = spec_for(tmp_path, base, [{"path": str(first)}, {"path": str(second)}], "bfloat16")
    build(spec, cache_dir)
    peft_merged(base, [first, second], "llama", "bfloat16", tmp_path / "ref")
    ours, ref = tensors_of(tmp_path / "out"), tensors_of(tmp_path / "ref")
    assert all(torch.equal(ours[k], ref[k]) for k in ref) and ours.keys() == ref.keys()


def test_streamed_merge_is_bit_identical_to_peft(models, tmp_path, cache_dir):
    """A Linear weight of two row blocks or more is merged as it streams: read, cast, merged by each
    adapter in turn and written a block of rows at a time. Blocks of 16 rows make every Linear merge
    of these tiny models take that path: an rsLoRA with rank and alpha patterns cast to bf16, then a
    plain LoRA stacked on it."""
    base = models("llama")
    first = make_lora_adapter(base, tmp_path / "a1", r=8, seed=3, use_rslora=True, rank_pattern={"q_proj": 4}, alpha_pattern={"v_proj": 32})
    second = make_lora_adapter(base, tmp_path / "a2", r=4, seed=4)
    spec = spec_for(tmp_path, base, [{"path": str(first)}, {"path": str(second)}], "bfloat16")
    proc = run_cli("build", spec, "--executor", "local", "--cache", cache_dir, env={"LOADGRAPH_MERGE_ROW_BLOCK": "16"})
    assert proc.returncode == 0, proc.stderr
    peft_merged(base, [first, second], "llama", "bfloat16", tmp_path / "ref")
    ours, ref = tensors_of(tmp_path / "out"), tensors_of(tmp_path / "ref")
    assert ours.keys() == ref.keys()
    different = [k for k in ref if not torch.equal(ours[k], ref[k])]
    assert not different, different[:5]


def test_scale_multiplies_the_delta(models, tmp_path, cache_dir):
    base = models("llama")
    adapter = make_lora_adapter(base, tmp_path / "a", r=4, seed=5)
    build(spec_for(tmp_path, base, [{"path": str(adapter), "scale": 0.0}], "float32"), cache_dir)
    assert all(torch.equal(t, tensors_of(base)[k]) for k, t in tensors_of(tmp_path / "out").items())


def test_delta_rounding_twice_rounds_the_delta_first_and_verifies(models, tmp_path, cache_dir):
    """PEFT 0.10's fp16 merge (LLaVA's builder): `W += delta.to(fp16)`; its own key; verify's bound holds."""
    from loadgraph.formats.lora import LoraAdapter
    from loadgraph.formats.lora_plan import plan_merge
    from loadgraph.formats.lora_merge import lora_delta
    from loadgraph.formats.names import inspect_checkpoint_names

    base = models("llama")
    adapter = make_lora_adapter(base, tmp_path / "a", r=8, seed=4, lora_alpha=64)
    once = spec_for(tmp_path, base, [{"path": str(adapter)}], "float16", "once.yaml", export={"path": str(tmp_path / "once")})
    twice = spec_for(tmp_path, base, [{"path": str(adapter)}], "float16", "twice.yaml", merge={"delta_rounding": "twice"},
                     export={"path": str(tmp_path / "twice")})
    build(once, cache_dir)
    build(twice, cache_dir)  # verify on (the default): the per-tensor bound includes the delta's rounding
    a, b, w = tensors_of(tmp_path / "once"), tensors_of(tmp_path / "twice"), tensors_of(base)
    names = inspect_checkpoint_names(base, keys=list(w))
    lora = LoraAdapter.load(adapter)
    plan = plan_merge(lora, names, {k: ("F32", tuple(v.shape)) for k, v in w.items()})
    tensors = lora.load_tensors()
    differ = 0
    for name, op in plan.ops.items():
        (_, target), = op.merges
        delta = lora_delta(target, tensors)
        expected = w[name].to(torch.float16).clone()
        expected += delta.to(torch.float16)
        assert torch.equal(b[name], expected), name
        differ += int((a[name] != b[name]).sum())
    assert differ > 0  # the two roundings are different products, so they are different artifacts
    keys = [json.loads(run_cli("plan", s, "--cache", cache_dir, "--json").stdout)["nodes"] for s in (once, twice)]
    assert {n["key"] for n in keys[0] if n["stage"] == "merge"} != {n["key"] for n in keys[1] if n["stage"] == "merge"}


def test_plan_reuses_base_when_adapter_changes_and_merge_when_shards_change(models, tmp_path, cache_dir):
    base = models("llama")
    a1 = make_lora_adapter(base, tmp_path / "a1", r=4, seed=1)
    a2 = make_lora_adapter(base, tmp_path / "a2", r=4, seed=2)
    build(spec_for(tmp_path, base, [{"path": str(a1)}], "float32"), cache_dir)

    def statuses(spec: Path) -> dict[str, str]:
        plan = run_cli("plan", spec, "--cache", cache_dir, "--json")
        assert plan.returncode == 0, plan.stderr
        return {f"{r['stage']}:{r['labels'][0]}": r["status"] for r in json.loads(plan.stdout)["nodes"]}

    changed_adapter = statuses(spec_for(tmp_path, base, [{"path": str(a2)}], "float32", "s2.yaml"))
    assert changed_adapter["fetch:default: fetch " + base.name].startswith("cached")
    assert changed_adapter["inspect:default: inspect"] == "cached"
    assert changed_adapter["merge:default: merge 1 adapter(s)"].startswith("to build")
    doc = json.loads(json.dumps({"source": {"model": str(base)}, "dtype": "float32", "adapters": [{"path": str(a1)}],
                                 "export": {"path": str(tmp_path / "out"), "max_shard_size": "30KB"}}))
    changed_shards = statuses(write_spec(tmp_path / "s3.yaml", doc))
    assert changed_shards["merge:default: merge 1 adapter(s)"] == "cached"
    assert changed_shards["export:default: export"].startswith("to build")


def one_line_error(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_adapter_for_another_model_fails_fast_naming_file_tensor_shapes(models, tmp_path, cache_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other-base"
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=512)).save_pretrained(other)
    wrong = make_lora_adapter(other, tmp_path / "wrong", r=4, seed=1, kind="llama")
    spec = spec_for(tmp_path, models("llama"), [{"path": str(wrong)}], "float32")
    t0 = time.perf_counter()
    line = one_line_error(build(spec, cache_dir, expect=2))
    assert time.perf_counter() - t0 < 60
    assert "adapter_model.safetensors" in line and "lora_" in line and "shape" in line
    assert not (cache_dir / "objects").exists() or not any((cache_dir / "objects").iterdir())


def test_missing_target_module_and_unsupported_type(models, tmp_path, cache_dir):
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    base = models("llama")
    adapter = make_lora_adapter(base, tmp_path / "a", r=4, seed=1)
    from safetensors.torch import save_file

    weights = load_file(adapter / "adapter_model.safetensors")  # an adapter naming a layer the base lacks
    weights = {k.replace("layers.1.self_attn.q_proj", "layers.1.self_attn.qq_proj"): v for k, v in weights.items()}
    save_file(weights, adapter / "adapter_model.safetensors")
    line = one_line_error(build(spec_for(tmp_path, base, [{"path": str(adapter)}], "float32"), cache_dir, expect=2))
    assert "qq_proj" in line and "adapter_model.safetensors" in line

    ia3 = get_peft_model(AutoModelForCausalLM.from_pretrained(base), IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]))
    ia3.save_pretrained(tmp_path / "ia3")
    line = one_line_error(build(spec_for(tmp_path, base, [{"path": str(tmp_path / 'ia3')}], "float32", "s2.yaml"), cache_dir, expect=2))
    assert "IA3" in line
    not_adapter = tmp_path / "empty"
    not_adapter.mkdir()
    assert "adapter_config.json" in one_line_error(build(spec_for(tmp_path, base, [{"path": str(not_adapter)}], "float32", "s3.yaml"), cache_dir, expect=2))


def test_killed_merge_resumes(models, tmp_path, cache_dir, monkeypatch):
    base = models("llama")
    adapter = make_lora_adapter(base, tmp_path / "a", r=4, seed=1)
    spec = spec_for(tmp_path, base, [{"path": str(adapter)}], "float32")
    # Merge units of ~40 KB of tensors (not one per shard), one at a time so that the kill lands at a known unit.
    monkeypatch.setenv("LOADGRAPH_UNIT_BYTES", "40000")
    monkeypatch.setenv("LOADGRAPH_LOCAL_WORKERS", "1")
    n_fetch = len([p for p in base.iterdir() if p.is_file()]) + 2  # base files + adapter files
    killed = run_cli("build", spec, "--executor", "local", "--cache", cache_dir, env={"LOADGRAPH_FAULT": f"kill-after-units:{n_fetch + 1 + 4}"})
    assert killed.returncode == -9 and not (tmp_path / "out").exists()
    build(spec, cache_dir, "--json", tmp_path / "r.json")
    merge = next(n for n in json.loads((tmp_path / "r.json").read_text())["nodes"] if n["stage"] == "merge")
    assert merge["units_reused"] == 4 and merge["units_total"] > 4
    peft_merged(base, [adapter], "llama", "float32", tmp_path / "ref")
    ours, ref = tensors_of(tmp_path / "out"), tensors_of(tmp_path / "ref")
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


def test_attach_exports_base_plus_adapter_for_peft(models, tmp_path, cache_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = models("qwen2")
    adapter = make_lora_adapter(base, tmp_path / "a", r=4, seed=7)
    build(spec_for(tmp_path, base, [{"path": str(adapter), "mode": "attach"}], "auto"), cache_dir)
    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["adapters"][0]["path"] == "adapters/0"
    assert (out / "adapters/0/adapter_config.json").exists()
    assert tensors_of(out).keys() == tensors_of(base).keys()
    ours = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), out / "adapters/0")
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    ids = torch.arange(4, 20)[None]
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_a_merge_build_imports_peft_without_bitsandbytes_and_a_quantize_build_with_it(models, tmp_path):
    base = models("llama")
    adapter = make_lora_adapter(base, tmp_path / "a", r=4, seed=3)
    merge = {"source": {"model": str(base)}, "adapters": [{"path": str(adapter)}], "verify": False, "export": {"path": str(tmp_path / "out")}}
    quantize = {**merge, "quantize": {"method": "bnb-nf4", "backend": "cpu"}, "export": {"path": str(tmp_path / "out4")}}
    imported = []
    for name, doc in (("merge", merge), ("quantize", quantize)):
        imported.append(build_imports(write_spec(tmp_path / f"{name}.yaml", doc), tmp_path / f"cache-{name}", ("peft", "bitsandbytes")))
    # bitsandbytes' import loads torch's inductor (seconds): a merge has no use for it.
    assert imported == ["['peft']", "['bitsandbytes', 'peft']"]
