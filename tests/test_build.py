"""End to end through the real CLI: build, plan, re-shard, cache reuse, resume, bad input."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_cli, write_spec
from loadgraph.testing import KINDS


def auto_class(kind: str):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if kind == "llava" else AutoModelForCausalLM


def logits(model_dir: Path, kind: str, dtype=None):
    model, info = auto_class(kind).from_pretrained(model_dir, dtype=dtype, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    ids = torch.arange(3, 19)[None]
    with torch.no_grad():
        return model(input_ids=ids).logits


def build(spec: Path, cache: Path, *extra: str, expect: int = 0):
    proc = run_cli("build", spec, "--executor", "local", "--cache", cache, *extra)
    assert proc.returncode == expect, proc.stderr + proc.stdout
    return proc


@pytest.mark.parametrize("kind", KINDS)
def test_reexport_loads_with_identical_logits(kind, models, tmp_path, cache_dir):
    base = models(kind)
    spec = write_spec(tmp_path / "s.yaml", {"source": {"model": str(base)}, "export": {"path": "out", "max_shard_size": "64KB"}})
    report = tmp_path / "r.json"
    build(spec, cache_dir, "--json", report)
    out = tmp_path / "out"
    assert torch.equal(logits(out, kind), logits(base, kind))
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1
    for shard in shards:  # a shard stays under the limit unless it holds one oversized tensor
        tensors = load_file(shard)
        assert sum(t.nbytes for t in tensors.values()) <= 64_000 or len(tensors) == 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] > 0
    doc = json.loads(report.read_text())
    assert doc["ok"] and [n["stage"] for n in doc["nodes"]] == ["fetch", "inspect", "export", "verify"]
    assert (out / "tokenizer.json").exists() and (out / "manifest.json").exists()


def test_dtype_cast_matches_transformers(models, tmp_path, cache_dir):
    base = models("qwen2")
    spec = write_spec(tmp_path / "s.yaml", {"source": {"model": str(base)}, "dtype": "bfloat16", "export": {"path": "out"}})
    build(spec, cache_dir)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    assert torch.equal(logits(tmp_path / "out", "qwen2"), logits(base, "qwen2", dtype=torch.bfloat16))


def test_cached_rebuild_and_partial_reuse(models, tmp_path, cache_dir):
    base = models("llama")
    doc = {"source": {"model": str(base)}, "export": {"path": "out", "max_shard_size": "100KB"}}
    spec = write_spec(tmp_path / "s.yaml", doc)
    build(spec, cache_dir)
    again = build(spec, cache_dir, "--json", tmp_path / "r.json")
    rep = json.loads((tmp_path / "r.json").read_text())
    assert {n["status"] for n in rep["nodes"]} == {"cached"} and rep["executor"] == ""
    assert "up-to-date" in again.stderr
    # Changing only the shard size rebuilds export and reuses fetch + inspect.
    doc["export"]["max_shard_size"] = "50KB"
    write_spec(spec, doc)
    plan = run_cli("plan", spec, "--cache", cache_dir, "--json")
    assert plan.returncode == 0
    rows = {r["stage"]: r["status"] for r in json.loads(plan.stdout)["nodes"]}
    assert rows["fetch"] == "cached" and rows["inspect"] == "cached" and rows["export"] == "to build"
    build(spec, cache_dir, "--json", tmp_path / "r2.json")
    statuses = {n["stage"]: n["status"] for n in json.loads((tmp_path / "r2.json").read_text())["nodes"]}
    assert statuses == {"fetch": "cached", "inspect": "cached", "export": "built", "verify": "built"}


def test_source_key_is_content_not_path(models, tmp_path, cache_dir):
    moved = shutil.copytree(models("llama"), tmp_path / "elsewhere")
    keys = []
    for i, src in enumerate([models("llama"), moved]):
        spec = write_spec(tmp_path / f"s{i}.yaml", {"source": {"model": str(src)}})
        build(spec, cache_dir, "--json", tmp_path / f"r{i}.json")
        keys.append([n["key"] for n in json.loads((tmp_path / f"r{i}.json").read_text())["nodes"]])
    assert keys[0] == keys[1]


def test_killed_build_resumes_from_finished_units(models, tmp_path, cache_dir, monkeypatch):
    base = models("llama")
    spec = write_spec(tmp_path / "s.yaml", {"source": {"model": str(base)}, "export": {"path": "out", "max_shard_size": "20KB"}})
    # Units of ~20 KB of tensors, one at a time so that the kill lands at a known unit.
    monkeypatch.setenv("LOADGRAPH_UNIT_BYTES", "20000")
    monkeypatch.setenv("LOADGRAPH_LOCAL_WORKERS", "1")
    # fetch has one unit per file; kill after all of them plus 3 export units.
    n_fetch = len(list(base.iterdir()))
    killed = run_cli("build", spec, "--executor", "local", "--cache", cache_dir, env={"LOADGRAPH_FAULT": f"kill-after-units:{n_fetch + 4}"})
    assert killed.returncode == -9
    assert not (tmp_path / "out").exists()
    plan = run_cli("plan", spec, "--cache", cache_dir)
    assert re.search(r"export\s+\w+\s+partial\s+3/\d+", plan.stdout), plan.stdout  # the table a person reads
    export_row = [r for r in json.loads(run_cli("plan", spec, "--cache", cache_dir, "--json").stdout)["nodes"] if r["stage"] == "export"][0]
    assert export_row["status"] == "partial" and export_row["units_done"] == 3
    build(spec, cache_dir, "--json", tmp_path / "r.json")
    export = [n for n in json.loads((tmp_path / "r.json").read_text())["nodes"] if n["stage"] == "export"][0]
    assert export["units_reused"] == 3 and export["units_total"] > 3
    clean = tmp_path / "clean"
    spec2 = write_spec(tmp_path / "s2.yaml", {"source": {"model": str(base)}, "export": {"path": str(clean), "max_shard_size": "20KB"}})
    build(spec2, tmp_path / "cache2")
    for f in clean.glob("*.safetensors"):
        assert f.read_bytes() == (tmp_path / "out" / f.name).read_bytes()
    assert run_cli("cache", "verify", "--cache", cache_dir).returncode == 0


def test_pickle_weights_refused_then_converted(models, tmp_path, cache_dir):
    src = tmp_path / "pickled"
    shutil.copytree(models("llama"), src)
    state = {}
    for f in src.glob("*.safetensors"):
        state.update(load_file(f))
        f.unlink()
    (src / "model.safetensors.index.json").unlink()
    torch.save(state, src / "pytorch_model.bin")
    spec = write_spec(tmp_path / "s.yaml", {"source": {"model": str(src)}, "export": {"path": "out"}})
    refused = build(spec, cache_dir, expect=2)
    assert "allow_pickle" in refused.stderr and not (tmp_path / "out").exists()
    assert not any((cache_dir / "objects").iterdir())
    write_spec(spec, {"source": {"model": str(src), "allow_pickle": True}, "export": {"path": "out"}})
    build(spec, cache_dir)
    assert torch.equal(logits(tmp_path / "out", "llama"), logits(models("llama"), "llama"))


def _damage(src: Path, how: str) -> None:
    index = src / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    shard = sorted(src.glob("*.safetensors"))[0]
    if how == "truncated":
        shard.write_bytes(shard.read_bytes()[:-10])
    elif how == "header-too-long":
        data = shard.read_bytes()
        shard.write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])
    elif how == "overlap":
        for shard in sorted(src.glob("*.safetensors")):
            raw = shard.read_bytes()
            n = struct.unpack("<Q", raw[:8])[0]
            header = json.loads(raw[8 : 8 + n])
            spans: dict[int, str] = {}
            pair = None
            for k, v in header.items():
                if k != "__metadata__":
                    span = v["data_offsets"][1] - v["data_offsets"][0]
                    pair = pair or ((spans[span], k) if span in spans else None)
                    spans.setdefault(span, k)
            if pair:
                break
        a, b = pair
        header[b]["data_offsets"] = header[a]["data_offsets"]  # b now aliases a's bytes
        blob = json.dumps(header).encode()
        shard.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])
    elif how == "unknown-dtype":
        raw = shard.read_bytes()
        shard.write_bytes(raw.replace(b'"F32"', b'"Q9X"', 1))
    elif how == "missing-shard":
        shard.unlink()
    elif how in ("dotdot", "absolute"):
        name = next(iter(doc["weight_map"]))
        doc["weight_map"][name] = "../../etc/passwd" if how == "dotdot" else "/etc/passwd"
        index.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    "how,match",
    [
        ("truncated", "truncated|outside"),
        ("header-too-long", "larger than the file"),
        ("overlap", "overlaps|trailing|unreferenced"),
        ("unknown-dtype", "unknown dtype"),
        ("missing-shard", "missing"),
        ("dotdot", "leaves the checkpoint"),
        ("absolute", "absolute"),
    ],
)
def test_bad_checkpoint_is_exit_2_and_publishes_nothing(how, match, models, tmp_path, cache_dir):
    src = models.copy(tmp_path / "src")
    _damage(src, how)
    spec = write_spec(tmp_path / "s.yaml", {"source": {"model": str(src)}, "export": {"path": "out"}})
    proc = build(spec, cache_dir, expect=2)
    import re

    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and re.search(match, lines[0]), proc.stderr
    assert not (tmp_path / "out").exists()
    assert not (cache_dir / "objects").exists() or not any((cache_dir / "objects").iterdir())


def test_bad_spec_and_missing_path(tmp_path, cache_dir):
    spec = tmp_path / "s.yaml"
    spec.write_text("source:\n  model: ./nowhere\n")
    proc = build(spec, cache_dir, expect=2)
    assert "nowhere" in proc.stderr and "no such directory" in proc.stderr
    spec.write_text("source: {model: x}\nexpot: {path: o}\n")
    assert "did you mean 'export'" in build(spec, cache_dir, expect=2).stderr
    spec.write_text("source: [\n")
    assert "YAML syntax error" in build(spec, cache_dir, expect=2).stderr
    assert run_cli("build", tmp_path / "absent.yaml", "--executor", "local").returncode == 2


def test_export_destination_guard(models, tmp_path, cache_dir):
    foreign = tmp_path / "out"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("do not delete")
    spec = write_spec(tmp_path / "s.yaml", {"source": {"model": str(models("llama"))}, "export": {"path": "out"}})
    proc = build(spec, cache_dir, expect=2)
    assert "not a loadgraph export" in proc.stderr and "--overwrite" in proc.stderr
    assert (foreign / "precious.txt").exists() and not (cache_dir / "objects").exists() or not any((cache_dir / "objects").iterdir())
    build(spec, cache_dir, "--overwrite")
    assert not (foreign / "precious.txt").exists() and (foreign / "manifest.json").exists()
    # An earlier loadgraph export is replaced without --overwrite.
    write_spec(spec, {"source": {"model": str(models("llama"))}, "dtype": "bfloat16", "export": {"path": "out"}})
    build(spec, cache_dir)
    # The cache inside the destination is refused.
    proc = build(spec, tmp_path / "out" / "cache", expect=2)
    assert "overlaps the cache" in proc.stderr


def test_inspect_is_header_only_and_counts_parameters(models, tmp_path):
    from transformers import AutoModelForCausalLM

    base = models("mixtral")
    proc = run_cli("inspect", base, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    model = AutoModelForCausalLM.from_pretrained(base)
    assert info["parameters"] == sum(p.numel() for p in model.state_dict().values())
    assert info["architectures"] == ["MixtralForCausalLM"] and len(info["shards"]) > 1
    assert run_cli("inspect", tmp_path / "none").returncode == 2
    assert run_cli("inspect", base).returncode == 0


def test_cache_ls_verify_gc(models, tmp_path, cache_dir):
    spec = write_spec(tmp_path / "s.yaml", {"source": {"model": str(models("llama"))}, "export": {"path": "out"}})
    build(spec, cache_dir)
    ls = run_cli("cache", "ls", "--cache", cache_dir, "--json")
    entries = json.loads(ls.stdout)
    assert len(entries) == 4 and all(e["valid"] for e in entries)
    assert [e["pinned"] for e in entries].count(True) == 1
    model = models("llama").name
    assert {(e["stage"], e["model"], tuple(e["targets"])) for e in entries} == {(st, model, ("default",)) for st in ("fetch", "inspect", "export", "verify")}
    table = run_cli("cache", "ls", "--cache", cache_dir, env={"COLUMNS": "80"}).stdout
    assert all(len(line) <= 80 for line in table.splitlines()[1:]) and table.count(model) == 4 and "pinned" in table
    assert run_cli("cache", "verify", "--cache", cache_dir).returncode == 0
    # Flip one byte of a cached shard: verify reports it, and a build never uses it.
    fetch = next(e for e in entries if e["stage"] == "fetch")
    shard = sorted((cache_dir / "objects" / fetch["key"]).glob("*.safetensors"))[0]
    shard.chmod(0o644)
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    bad = run_cli("cache", "verify", "--cache", cache_dir)
    assert bad.returncode == 1 and "digest mismatch" in bad.stdout
    # gc to a tiny budget evicts everything except the pinned export root; leftovers go too.
    damaged = {e["key"] for e in json.loads(run_cli("cache", "ls", "--cache", cache_dir, "--json").stdout) if not e["valid"]}
    assert len(damaged) == 2  # fetch and inspect share the shard (a hardlink)
    (cache_dir / "tmp" / "node-crashed").mkdir()
    gc = run_cli("cache", "gc", "--cache", cache_dir, "--max-size", "1B")
    assert gc.returncode == 0, gc.stderr
    for e in entries:  # gc names what it evicted
        named = f"evicted {e['key'][:12]} {e['stage']}{' (invalid)' if e['key'] in damaged else ''} {model} for default"
        assert (named in gc.stdout) == (not e["pinned"]), gc.stdout
    left = json.loads(run_cli("cache", "ls", "--cache", cache_dir, "--json").stdout)
    assert [e["stage"] for e in left] == ["export"]


def test_ray_executor_builds_the_same_bytes(models, tmp_path, cache_dir):
    base = models("llama")
    spec = write_spec(tmp_path / "s.yaml", {"source": {"model": str(base)}, "export": {"path": "out", "max_shard_size": "64KB"}})
    proc = run_cli("build", spec, "--cache", cache_dir, "--executor", "ray", "--json", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "r.json").read_text())["executor"] == "ray"
    spec2 = write_spec(tmp_path / "s2.yaml", {"source": {"model": str(base)}, "export": {"path": "out2", "max_shard_size": "64KB"}})
    build(spec2, tmp_path / "cache2")
    for f in (tmp_path / "out").glob("*.safetensors"):
        assert f.read_bytes() == (tmp_path / "out2" / f.name).read_bytes()
