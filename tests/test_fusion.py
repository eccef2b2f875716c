"""merge -> quantize fused (pipeline/fusion.py): each merge unit hands its tensors to the quantize
units that read them, so the merged model is never read back; both artifacts are still cached,
the bytes equal PEFT's merge quantized by transformers, and a killed fused build resumes."""

from __future__ import annotations

import json

import torch

from conftest import run_cli, write_spec
from loadgraph.testing import make_lora_adapter
from test_quantize import tensors_of, transformers_quantized

# Several units a node (40 kB groups of the tiny model's tensors), every Linear merge streamed by
# blocks of rows, and fusion even though bitsandbytes' CPU units run one at a time.
FUSED = {"LOADGRAPH_FUSE": "always", "LOADGRAPH_UNIT_BYTES": "40000", "LOADGRAPH_MERGE_ROW_BLOCK": "16"}


def _spec(tmp_path, base, adapter, out):
    return write_spec(tmp_path / "s.yaml", {"source": {"model": str(base)}, "dtype": "bfloat16", "adapters": [{"path": str(adapter)}], "verify": False,
                                            "quantize": {"method": "bnb-nf4", "double_quant": True, "backend": "cpu"},
                                            "export": {"path": str(out), "max_shard_size": "60KB"}})


def _build(spec, cache, report, env, expect=0):
    proc = run_cli("build", spec, "--executor", "local", "--cache", cache, "--json", report, env=env)
    assert proc.returncode == expect, proc.stderr
    return {n["stage"]: n for n in json.loads(report.read_text())["nodes"]} if expect == 0 else None


def _files(root) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file() and p.name != "manifest.json"}


def test_fused_build_reads_the_merged_model_never_and_equals_peft_then_transformers(models, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = models("llama")
    adapter = make_lora_adapter(base, tmp_path / "a", r=4, seed=11, use_rslora=True)
    spec = _spec(tmp_path, base, adapter, tmp_path / "out")
    nodes = _build(spec, tmp_path / "cache", tmp_path / "r.json", FUSED)
    merge, quant = nodes["merge"], nodes["quantize"]
    assert merge["units_total"] > 2 and quant["units_total"] > 2
    # Fused: the quantize units ran inside the merge units (fresh, not resumed) and read nothing.
    assert quant["status"] == "built" and quant["units_reused"] == 0 and quant["bytes"] == 0 and quant["bytes_written"] > 0
    merged_size = sum(p.stat().st_size for p in (tmp_path / "cache" / "objects" / merge["key"]).glob("*.safetensors"))
    assert merge["bytes"] + quant["bytes"] <= 1.2 * merge["bytes"] and merge["bytes_written"] >= merged_size * 0.99

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16), adapter).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    transformers_quantized(tmp_path / "merged", "llama", tmp_path / "ref", "bnb-nf4", True, "bfloat16")
    ours, ref = tensors_of(tmp_path / "out"), tensors_of(tmp_path / "ref")
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k].view(torch.uint8), ref[k].view(torch.uint8)) for k in ref)
    # The intermediate is cached whole: PEFT's merged tensors, bit for bit.
    cached_merge = tensors_of(tmp_path / "cache" / "objects" / merge["key"])
    peft_merged = tensors_of(tmp_path / "merged")
    assert cached_merge.keys() == peft_merged.keys() and all(torch.equal(cached_merge[k], peft_merged[k]) for k in peft_merged)

    # Unfused, the same keys and the same files, and the quantize node reads the merged model back.
    unfused = _build(spec, tmp_path / "cache2", tmp_path / "r2.json", {**FUSED, "LOADGRAPH_FUSE": "never"})
    assert [unfused[s]["key"] for s in ("merge", "quantize")] == [merge["key"], quant["key"]]
    assert unfused["quantize"]["bytes"] >= merged_size * 0.99
    for stage in ("merge", "quantize"):
        assert _files(tmp_path / "cache" / "objects" / nodes[stage]["key"]) == _files(tmp_path / "cache2" / "objects" / nodes[stage]["key"])
    check = run_cli("cache", "verify", "--cache", tmp_path / "cache")
    assert check.returncode == 0, check.stderr


def test_killed_fused_build_resumes_to_the_same_files(models, tmp_path):
    base = models("llama")
    adapter = make_lora_adapter(base, tmp_path / "a", r=4, seed=12)
    ref = _build(_spec(tmp_path, base, adapter, tmp_path / "ref-out"), tmp_path / "ref-cache", tmp_path / "ref.json", FUSED)
    before = sum(n["units_total"] for n in json.loads((tmp_path / "ref.json").read_text())["nodes"] if n["stage"] in ("fetch", "inspect"))
    spec, cache = _spec(tmp_path, base, adapter, tmp_path / "out"), tmp_path / "cache"
    # Killed inside a fused merge unit, once some merge units (and the quantize units they fed) were published.
    _build(spec, cache, tmp_path / "k.json", {**FUSED, "LOADGRAPH_FAULT": f"kill-in-unit:{before + ref['merge']['units_total']}"}, expect=-9)
    assert not (tmp_path / "out").exists()
    log = tmp_path / "units.log"
    nodes = _build(spec, cache, tmp_path / "r.json", {**FUSED, "LOADGRAPH_UNIT_LOG": str(log)})
    assert [nodes[s]["key"] for s in ("merge", "quantize", "export")] == [ref[s]["key"] for s in ("merge", "quantize", "export")]
    assert 0 < nodes["merge"]["units_reused"] < nodes["merge"]["units_total"] and 0 < nodes["quantize"]["units_reused"]
    computed = log.read_text().split("\n")[:-1]
    assert len(computed) == len({line.rsplit(" ", 1)[0] for line in computed})  # no unit computed twice by the resumed build
    for stage in ("merge", "quantize"):
        assert _files(cache / "objects" / nodes[stage]["key"]) == _files(tmp_path / "ref-cache" / "objects" / nodes[stage]["key"])
    assert _files(tmp_path / "out") == _files(tmp_path / "ref-out")
    assert not any((cache / "units").iterdir())
