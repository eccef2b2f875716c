"""Batch builds: `targets:`, `matrix:` and several spec files compile into one DAG in which
shared nodes build once; a rerun of a finished batch is a no-op; bad input fails the batch."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from conftest import run_cli, write_spec
from loadgraph.pipeline.cache import Cache
from loadgraph.pipeline.graph import compile_specs
from loadgraph.spec import load_spec_file, load_spec_files


@pytest.fixture(scope="module")
def adapters(models, tmp_path_factory) -> list[Path]:
    from loadgraph.testing import make_lora_adapter

    root = tmp_path_factory.mktemp("adapters")
    return [make_lora_adapter(models("llama"), root / f"lora-{i}", r=4, seed=i) for i in range(3)]


def _build(*args, expect: int = 0):
    proc = run_cli("build", *args, "--executor", "local")
    assert proc.returncode == expect, proc.stderr
    return proc


def test_three_adapters_build_the_base_once_and_rerun_is_a_no_op(models, adapters, tmp_path, cache_dir):
    base = str(models("llama"))
    targets = [{"name": f"chat-{i}", "source": {"model": base}, "adapters": [{"path": str(a)}], "verify": False,
                "export": {"path": f"out/{i}", "max_shard_size": "64KB"}} for i, a in enumerate(adapters)]
    spec = write_spec(tmp_path / "batch.yaml", {"targets": targets})
    _build(spec, "--cache", cache_dir, "--json", tmp_path / "r1.json")
    report = json.loads((tmp_path / "r1.json").read_text())
    assert report["ok"] and [t["name"] for t in report["targets"]] == ["chat-0", "chat-1", "chat-2"]
    assert len({t["key"] for t in report["targets"]}) == 3
    nodes = report["nodes"]
    assert len({n["key"] for n in nodes}) == len(nodes)  # one DAG: no node twice
    assert Counter(n["stage"] for n in nodes) == {"fetch": 4, "inspect": 1, "merge": 3, "export": 3}
    (base_fetch,) = [n for n in nodes if n["stage"] == "fetch" and len(n["labels"]) == 3]
    (inspect,) = [n for n in nodes if n["stage"] == "inspect"]
    assert base_fetch["status"] == inspect["status"] == "built" and len(inspect["labels"]) == 3
    assert all((tmp_path / "out" / str(i) / "model.safetensors.index.json").exists() for i in range(3))

    _build(spec, "--cache", cache_dir, "--json", tmp_path / "r2.json")
    again = json.loads((tmp_path / "r2.json").read_text())
    assert again["ok"] and again["executor"] == ""  # no executor started: nothing to build
    assert {n["status"] for n in again["nodes"]} == {"cached"}
    assert {t["export_status"] for t in again["targets"]} == {"up-to-date"}


def test_matrix_expands_to_the_same_dag_as_written_targets(models, adapters, tmp_path, cache_dir):
    base = str(models("llama"))
    quantize = [None, {"method": "bnb-nf4", "backend": "cpu"}]
    matrix = write_spec(tmp_path / "m.yaml", {"matrix": {
        "source": {"model": base}, "adapters": [{"path": str(a)} for a in adapters] + [None],
        "quantize": quantize, "verify": False, "export": {"path": "out/{name}"}}})
    expanded = load_spec_file(matrix)
    assert [t.name for t in expanded] == [f"{a}-{q}" for a in ("lora-0", "lora-1", "lora-2", "base") for q in ("none", "bnb-nf4")]
    assert len({t.export.path for t in expanded}) == 8
    written = write_spec(tmp_path / "t.yaml", {"targets": [
        {"name": t.name, "source": {"model": base}, "adapters": [{"path": a.path} for a in t.adapters], "quantize": q,
         "verify": False, "export": {"path": f"out/{t.name}"}}
        for t, q in zip(expanded, quantize * 4)]})
    cache = Cache(cache_dir)
    a, b = compile_specs(expanded, cache), compile_specs(load_spec_file(written), cache)
    assert list(a.nodes) == list(b.nodes) and [t.final for t in a.targets] == [t.final for t in b.targets]
    # 1 base + 3 adapters fetched, 1 inspect, 3 merges, 4 quantizes (3 merged + the base), 8 exports.
    assert Counter(n.stage for n in a.nodes.values()) == {"fetch": 4, "inspect": 1, "merge": 3, "quantize": 4, "export": 8}
    plan = run_cli("plan", matrix, "--cache", cache_dir, "--json")
    assert plan.returncode == 0 and [r["status"] for r in json.loads(plan.stdout)["nodes"]] == ["to build"] * 20


def test_several_spec_files_are_one_dag(models, adapters, tmp_path, cache_dir):
    base = str(models("llama"))
    specs = [write_spec(tmp_path / f"{name}.yaml", {"source": {"model": base}, "adapters": [{"path": str(a)}], "verify": False,
                                                    "export": {"path": f"out-{name}"}}) for name, a in zip(("alpha", "beta"), adapters)]
    _build(*specs, "--cache", cache_dir, "--json", tmp_path / "r.json")
    report = json.loads((tmp_path / "r.json").read_text())
    assert [t["name"] for t in report["targets"]] == ["alpha", "beta"]  # unnamed targets take their file's stem
    assert Counter(n["stage"] for n in report["nodes"])["inspect"] == 1
    # Two files defining one name: refused before any work, naming both files.
    clash = write_spec(tmp_path / "clash.yaml", {"name": "alpha", "source": {"model": base}})
    proc = _build(specs[0], clash, "--cache", tmp_path / "other-cache", expect=2)
    assert "alpha" in proc.stderr and "clash.yaml" in proc.stderr
    with pytest.raises(Exception, match="also defined"):
        load_spec_files([specs[0], clash])


def test_one_bad_target_fails_the_batch_before_any_work(models, tmp_path, cache_dir):
    good = {"name": "good", "source": {"model": str(models("llama"))}, "export": {"path": "out-good"}}
    bad = {"name": "bad", "source": {"model": str(models("llama"))}, "adapters": [{"path": str(tmp_path / "missing-lora")}], "export": {"path": "out-bad"}}
    spec = write_spec(tmp_path / "b.yaml", {"targets": [good, bad]})
    proc = _build(spec, "--cache", cache_dir, "--json", tmp_path / "r.json", expect=2)
    assert "missing-lora" in proc.stderr and json.loads((tmp_path / "r.json").read_text())["ok"] is False
    assert not any((cache_dir / "objects").iterdir()) and not (tmp_path / "out-good").exists()
    matrix = write_spec(tmp_path / "m.yaml", {"matrix": {"source": {"model": "org/x"}, "adapters": [None, None], "export": {"path": "o"}}})
    assert "{name}" in _build(matrix, "--cache", cache_dir, expect=2).stderr
