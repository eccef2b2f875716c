"""Quantize and verify end to end through the CLI, against transformers' own quantize-on-load."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_cli, write_spec
from loadgraph.testing import make_lora_adapter


def tensors_of(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def auto_class(kind: str):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if kind == "llava" else AutoModelForCausalLM


def transformers_quantized(base: Path, kind: str, out: Path, method: str, double_quant: bool, dtype: str) -> None:
    from transformers import BitsAndBytesConfig

    if method == "bnb-int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=method[4:], bnb_4bit_use_double_quant=double_quant)
    model = auto_class(kind).from_pretrained(base, quantization_config=config, device_map="cpu", dtype=getattr(torch, dtype))
    model.save_pretrained(out)


def build(spec: Path, cache: Path, *extra, expect: int = 0):
    proc = run_cli("build", spec, "--executor", "local", "--cache", cache, *extra)
    assert proc.returncode == expect, proc.stderr
    return proc


def one_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def error_line(proc) -> str:
    """A failed build prints its progress lines, then one error line."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error:"), proc.stderr
    return lines[-1]


CASES = [
    ("llama", "bnb-nf4", False, "bfloat16"),
    ("llama", "bnb-nf4", True, "bfloat16"),
    ("llama", "bnb-fp4", False, "float16"),
    ("llama", "bnb-int8", False, "bfloat16"),
    ("qwen2", "bnb-nf4", True, "float32"),
    ("llava", "bnb-nf4", False, "bfloat16"),
    ("mixtral", "bnb-nf4", False, "bfloat16"),
]


@pytest.mark.parametrize("kind,method,double_quant,dtype", CASES)
def test_bytes_equal_transformers_quantize_on_load(kind, method, double_quant, dtype, models, tmp_path, cache_dir):
    base = models(kind)
    spec = write_spec(tmp_path / "s.yaml", {"source": {"model": str(base)}, "dtype": dtype,
                                            "quantize": {"method": method, "double_quant": double_quant}, "export": {"path": str(tmp_path / "out")}})
    build(spec, cache_dir, "--json", tmp_path / "r.json")
    transformers_quantized(base, kind, tmp_path / "ref", method, double_quant, dtype)
    ours, ref = tensors_of(tmp_path / "out"), tensors_of(tmp_path / "ref")
    assert ours.keys() == ref.keys()
    differ = [k for k in ref if ours[k].dtype != ref[k].dtype or not torch.equal(ours[k].view(torch.uint8), ref[k].view(torch.uint8))]
    assert not differ, differ[:5]
    assert json.loads((tmp_path / "out/config.json").read_text())["quantization_config"] == json.loads((tmp_path / "ref/config.json").read_text())["quantization_config"]
    if kind == "mixtral":  # fused experts are not nn.Linear in transformers 5: left as they were
        experts = [k for k in ours if ".experts." in k]
        assert experts and all(ours[k].dtype == getattr(torch, dtype) for k in experts)
    report = json.loads((tmp_path / "r.json").read_text())
    verify = next(n for n in report["nodes"] if n["stage"] == "verify")
    checks = verify["details"]["verify"]["checks"]
    assert checks["smoke"]["relative_error"] <= checks["smoke"]["tolerance"] and checks[method.removeprefix("bnb-")]["worst"] <= 1.0


def test_fp8_loads_and_matches_its_dequantization(models, tmp_path, cache_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    base = tmp_path / "base128"  # FP8 blocks are 128x128: a model whose weights tile
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=4, vocab_size=256)).save_pretrained(base)
    spec = write_spec(tmp_path / "s.yaml", {"source": {"model": str(base)}, "dtype": "bfloat16", "quantize": {"method": "fp8"}, "export": {"path": str(tmp_path / "out")}})
    build(spec, cache_dir)
    from loadgraph.formats.fp8 import dequantize_fp8

    ours, orig = tensors_of(tmp_path / "out"), tensors_of(base)
    q = "model.layers.0.mlp.down_proj.weight"
    assert ours[q].dtype == torch.float8_e4m3fn
    deq = dequantize_fp8(ours[q], ours[q + "_scale_inv"], torch.float32)
    assert (deq - orig[q]).norm() / orig[q].norm() < 0.1
    model = LlamaForCausalLM.from_pretrained(tmp_path / "out", device_map="cpu")
    assert torch.isfinite(model(input_ids=torch.arange(8)[None]).logits).all()


def test_merge_then_quantize_equals_peft_then_transformers(models, tmp_path, cache_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = models("llama")
    adapter = make_lora_adapter(base, tmp_path / "a", r=4, seed=9)
    spec = write_spec(tmp_path / "s.yaml", {"source": {"model": str(base)}, "dtype": "bfloat16", "adapters": [{"path": str(adapter)}],
                                            "quantize": {"method": "bnb-nf4", "double_quant": True}, "export": {"path": str(tmp_path / "out")}})
    plan = run_cli("plan", spec, "--cache", cache_dir, "--json")
    stages = [r["stage"] for r in json.loads(plan.stdout)["nodes"]]
    assert stages.index("merge") < stages.index("quantize") < stages.index("export")
    build(spec, cache_dir)
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16), adapter).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    transformers_quantized(tmp_path / "merged", "llama", tmp_path / "ref", "bnb-nf4", True, "bfloat16")
    ours, ref = tensors_of(tmp_path / "out"), tensors_of(tmp_path / "ref")
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k].view(torch.uint8), ref[k].view(torch.uint8)) for k in ref)


@pytest.mark.parametrize("method,reason", [("hqq", "random weights"), ("gptq", "calibration"), ("awq", "calibration"), ("eetq", "CUDA")])
def test_refused_methods_fail_before_any_work(method, reason, models, tmp_path, cache_dir):
    spec = write_spec(tmp_path / "s.yaml", {"source": {"model": str(models("llama"))}, "quantize": {"method": method}, "export": {"path": str(tmp_path / "out")}})
    line = one_line(build(spec, cache_dir, expect=2))
    assert reason in line and method.upper() in line.upper()
    assert not (cache_dir / "objects").exists() or not any((cache_dir / "objects").iterdir())


def _spec(tmp_path: Path, src: Path) -> Path:
    return write_spec(tmp_path / "s.yaml", {"source": {"model": str(src)}, "export": {"path": str(tmp_path / "out")}})


def test_verify_fails_on_nans(models, tmp_path, cache_dir):
    src = shutil.copytree(models("llama"), tmp_path / "src")
    shard = sorted(src.glob("*.safetensors"))[-1]
    tensors = load_file(shard)
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name][0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    line = error_line(build(_spec(tmp_path, src), cache_dir, expect=1))
    assert "NaN" in line and name in line and not (tmp_path / "out").exists()


def test_verify_fails_on_renamed_tensor(models, tmp_path, cache_dir):
    src = shutil.copytree(models("llama"), tmp_path / "src")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    name = "model.layers.0.mlp.up_proj.weight"
    shard = src / index["weight_map"].pop(name)
    tensors = load_file(shard)
    tensors["model.layers.0.mlp.up_projection.weight"] = tensors.pop(name)
    save_file(tensors, shard, metadata={"format": "pt"})
    index["weight_map"]["model.layers.0.mlp.up_projection.weight"] = shard.name
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    line = error_line(build(_spec(tmp_path, src), cache_dir, expect=1))
    assert "does not load cleanly" in line and "up_proj" in line and not (tmp_path / "out").exists()


def test_flipped_bytes_in_the_artifact_are_never_used(models, tmp_path, cache_dir):
    """The runner re-hashes a node's inputs before computing it: the corrupt export artifact is
    evicted and rebuilt instead of verified, and the export gets the original bytes."""
    spec = _spec(tmp_path, models("llama"))
    build(spec, cache_dir, "--json", tmp_path / "r.json")
    nodes = {n["stage"]: n["key"] for n in json.loads((tmp_path / "r.json").read_text())["nodes"]}
    export_dir = cache_dir / "objects" / nodes["export"]
    shard = sorted(export_dir.glob("*.safetensors"))[0]
    original = shard.read_bytes()
    stat = shard.stat()
    shard.chmod(0o644)
    raw = bytearray(original)
    raw[-3] ^= 0x40
    shard.write_bytes(bytes(raw))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # size and mtime kept: only a hash sees it
    shutil.rmtree(cache_dir / "objects" / nodes["verify"])
    build(spec, cache_dir)
    assert (tmp_path / "out" / shard.name).read_bytes() == original


def test_verify_fails_parity_for_a_wrong_adapter(models, tmp_path, cache_dir):
    """The smoke check: the merged artifact of adapter A against PEFT applying adapter B must fail."""
    from loadgraph.errors import BuildError
    from loadgraph.pipeline.cache import Cache
    from loadgraph.pipeline.stage import NodeContext
    from loadgraph.stages.verify_smoke import run_smoke

    base = models("llama")
    a = make_lora_adapter(base, tmp_path / "a", r=4, seed=1)
    b = make_lora_adapter(base, tmp_path / "b", r=4, seed=2)
    spec = write_spec(tmp_path / "s.yaml", {"source": {"model": str(base)}, "adapters": [{"path": str(a)}], "export": {"path": str(tmp_path / "out")}})
    build(spec, cache_dir, "--json", tmp_path / "r.json")
    spec_b = write_spec(tmp_path / "b.yaml", {"source": {"model": str(base)}, "adapters": [{"path": str(b)}], "verify": False})
    build(spec_b, cache_dir, "--json", tmp_path / "rb.json")
    keys = {n["stage"]: n["key"] for n in json.loads((tmp_path / "r.json").read_text())["nodes"]}
    keys_b = [n["key"] for n in json.loads((tmp_path / "rb.json").read_text())["nodes"] if n["stage"] == "fetch"]
    cache = Cache(cache_dir)
    params = {"logits": True, "rtol": None, "scales": [1.0], "base_roundtrip": "none"}
    inputs = {"model": cache.get(keys["export"]), "merged": cache.get(keys["merge"]), "merge_base": cache.get(keys["inspect"]),
              "adapter0": cache.get(keys_b[-1])}
    with pytest.raises(BuildError, match="logits differ from PEFT unmerged"):
        run_smoke(NodeContext("test", params, {}, inputs, cache))


def test_untileable_fp8_shape_is_refused_at_plan_time(models, tmp_path, cache_dir):
    spec = write_spec(tmp_path / "s.yaml", {"source": {"model": str(models("llama"))}, "quantize": {"method": "fp8"}, "export": {"path": str(tmp_path / "out")}})
    assert "FP8 block" in one_line(build(spec, cache_dir, expect=2))
    assert not (cache_dir / "objects").exists() or not any((cache_dir / "objects").iterdir())


def test_double_quant_on_ray_workers_equals_transformers_at_the_planned_threads(tmp_path, cache_dir):
    """A weight of 4 Mi elements has 64 Ki absmax blocks, so the double quant's offset (a float32
    mean) is split across torch's threads: Ray workers at their task's CPU count must still write
    the bytes transformers writes at the count the build was planned with (stages/quantize.py)."""
    import bitsandbytes.functional as bnbf
    from transformers import LlamaConfig, LlamaForCausalLM

    from loadgraph.stages.quantize import torch_default_threads

    threads = torch_default_threads()
    if threads < 2:
        pytest.skip("one torch thread here: the offset is the same at every count")
    base = tmp_path / "base"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=2, num_attention_heads=8,
                                 num_key_value_heads=8, vocab_size=256)).save_pretrained(base)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        transformers_quantized(base, "llama", tmp_path / "ref", "bnb-nf4", True, "bfloat16")
        mlp = [w.to(torch.bfloat16) for n, w in tensors_of(base).items() if ".mlp." in n]
        offsets = {}
        for count in (1, threads):  # the test can tell: some offsets differ between the counts
            torch.set_num_threads(count)
            offsets[count] = [bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")[1].offset.item() for w in mlp]
        assert offsets[1] != offsets[threads]
    finally:
        torch.set_num_threads(before)
    spec = write_spec(tmp_path / "s.yaml", {"source": {"model": str(base)}, "dtype": "bfloat16", "verify": False,
                                            "quantize": {"method": "bnb-nf4", "double_quant": True, "backend": "cpu"},
                                            "export": {"path": str(tmp_path / "out")}})
    proc = run_cli("build", spec, "--cache", cache_dir, "--executor", "ray", "--json", tmp_path / "r.json",
                   env={"LOADGRAPH_UNIT_BYTES": str(4 << 20)})  # several units: tasks of one CPU each
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    quantize = next(n for n in report["nodes"] if n["stage"] == "quantize")
    assert quantize["units_total"] >= 2
    ours, ref = tensors_of(tmp_path / "out"), tensors_of(tmp_path / "ref")
    assert ours.keys() == ref.keys()
    differ = [k for k in ref if ours[k].dtype != ref[k].dtype or not torch.equal(ours[k].view(torch.uint8), ref[k].view(torch.uint8))]
    assert not differ, differ[:5]
