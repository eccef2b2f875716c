"""quantize writes at the export's final offsets (issue 13): shape rules against bitsandbytes,
variable-length tails against safetensors' loader, and an export that links instead of writing."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

from conftest import run_cli, write_spec
from loadgraph.formats.layout import PlacedWriter, finish_files, plan_layout, prepare_files
from loadgraph.formats.quant_plan import _quantize
from loadgraph.formats.quant_settings import QuantSettings
from loadgraph.formats.quant_shapes import quantized_outputs
from loadgraph.formats.safetensors import PlannedTensor, read_header, st_dtype
from loadgraph.testing import make_lora_adapter


@pytest.mark.parametrize("method,double_quant,storage", [("bnb-nf4", False, "uint8"), ("bnb-nf4", True, "uint8"), ("bnb-fp4", True, "bfloat16"),
                                                         ("bnb-int8", False, "uint8"), ("fp8", False, "uint8")])
def test_output_shapes_are_what_the_kernels_produce(method, double_quant, storage):
    settings = QuantSettings(method, double_quant=double_quant, quant_storage=storage)
    shapes = [(128, 256), (256, 128)] if method == "fp8" else [(33, 71), (300, 1000), (64, 64)]
    for shape in shapes:
        for dtype in (torch.bfloat16, torch.float32):
            got = _quantize("m.weight", torch.randn(shape, dtype=dtype), settings)
            planned = quantized_outputs("m.weight", shape, dtype, settings)
            assert [p.name for p in planned] == list(got)
            for p in planned:
                value = got[p.name]
                assert st_dtype(value) == p.dtype, p
                if p.max_bytes:  # the JSON quant state: within its bound (exact without double quant)
                    assert value.numel() <= p.max_bytes and (double_quant or value.numel() == p.shape[0]), (p, value.numel())
                else:
                    assert tuple(value.shape) == p.shape, p


def test_tails_are_written_after_the_fixed_tensors_and_load(tmp_path):
    fixed = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    planned = [PlannedTensor("a.weight", "F32", (2, 3)), PlannedTensor("a.state", "U8", (5,)), PlannedTensor("b.state", "U8", (5,))]
    layout = plan_layout([planned], ["model.safetensors"], {"format": "pt"}, {"a.state": 64, "b.state": 64})
    assert layout.tails == {"model.safetensors": ("a.state", "b.state")} and set(layout.tensors) == {"a.weight"}
    prepare_files(tmp_path, layout)
    writer = PlacedWriter(tmp_path, layout)
    writer.write_tensor("a.weight", fixed)
    writer.close()
    tails = {"a.state": b'{"x": 1}', "b.state": b'{"offset": 0.12345678}'}
    final, rows = finish_files(tmp_path, layout, tails)
    path = tmp_path / "model.safetensors"
    assert path.stat().st_size == final.sizes["model.safetensors"] and len(final.headers["model.safetensors"]) == len(layout.headers["model.safetensors"])
    with safe_open(str(path), "pt") as f:  # safetensors' own validation: contiguous, no gap, nothing trailing
        assert torch.equal(f.get_tensor("a.weight"), fixed)
        assert {n: bytes(f.get_tensor(n).tolist()) for n in tails} == tails
    assert read_header(path).tensors["b.state"].end == path.stat().st_size and rows["a.state"]["end"] == rows["b.state"]["begin"]
    finished = path.read_bytes()
    # Killed after finishing, before publishing: the resumed build gets the state units wrote into back.
    prepare_files(tmp_path, layout)
    assert path.stat().st_size == layout.sizes["model.safetensors"] and path.read_bytes()[: len(layout.headers["model.safetensors"])] == layout.headers["model.safetensors"]
    finish_files(tmp_path, layout, tails)
    assert path.read_bytes() == finished
    with pytest.raises(ValueError, match="reserved"):
        finish_files(tmp_path, layout, {**tails, "a.state": b"x" * 10**6})


def test_merge_nf4_export_links_the_quantized_files(models, tmp_path, cache_dir):
    from transformers import AutoModelForCausalLM

    base = models("llama")
    adapter = make_lora_adapter(base, tmp_path / "a", r=4, seed=3)
    out = tmp_path / "out"
    spec = write_spec(tmp_path / "s.yaml", {"source": {"model": str(base)}, "dtype": "bfloat16", "adapters": [{"path": str(adapter)}], "verify": False,
                                            "quantize": {"method": "bnb-nf4", "double_quant": True}, "export": {"path": str(out), "max_shard_size": "40KB"}})
    proc = run_cli("build", spec, "--executor", "local", "--cache", cache_dir, "--json", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    nodes = {n["stage"]: n for n in json.loads((tmp_path / "r.json").read_text())["nodes"]}
    assert nodes["export"]["status"] == "built" and nodes["export"]["bytes_written"] == 0
    quantized = cache_dir / "objects" / nodes["quantize"]["key"]
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and shards == sorted(p.name for p in quantized.glob("*.safetensors"))
    assert all(os.path.samefile(out / s, quantized / s) for s in shards)  # linked, not rewritten
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    states = 0
    for s in shards:
        header = read_header(out / s)
        assert all(index[n] == s for n in header.tensors)
        states += sum(n.endswith(".quant_state.bitsandbytes__nf4") for n in header.tensors)
    assert states and set(index) == {n for n in json.loads((quantized / "manifest.json").read_text())["tensors"]}
    model, info = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert torch.isfinite(model(input_ids=torch.arange(8)[None]).logits).all()
