"""Plans derived from transformers' meta model and PEFT's checks, memoised in the cache
(pipeline/derived.py, stages/derived_plans.py): a variant build reuses them, nothing stale or
damaged is ever used."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import build_imports, write_spec
from loadgraph.pipeline import derived
from loadgraph.stages.derived_plans import quant_plan
from loadgraph.stages.quantize import make_settings, settings_params
from loadgraph.spec import QuantizeSpec
from loadgraph.testing import make_lora_adapter
from test_quantize import tensors_of


def _build(tmp_path: Path, base: Path, adapter: Path, cache: Path, out: str, env: dict | None = None) -> tuple[str, Path]:
    """A local merge build of `adapter` onto `base`; (the libraries it imported, its export)."""
    export = tmp_path / out
    spec = write_spec(tmp_path / f"{out}.yaml", {"source": {"model": str(base)}, "adapters": [{"path": str(adapter)}], "verify": False,
                                                 "export": {"path": str(export)}})
    return build_imports(spec, cache, ("peft", "transformers"), env), export


def _same(a: Path, b: Path) -> bool:
    ours, theirs = tensors_of(a), tensors_of(b)
    return ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in ours)


def _memo_files(cache: Path) -> list[Path]:
    return sorted((cache / "derived").rglob("*.pickle"))


def test_a_retrained_adapter_reuses_the_plans_without_peft_or_transformers_and_merges_the_same_bytes(models, tmp_path):
    base = models("llama", dtype="bfloat16")
    first = make_lora_adapter(base, tmp_path / "a1", r=4, seed=5)
    retrained = make_lora_adapter(base, tmp_path / "a2", r=4, seed=6)  # same config, other weights
    assert (first / "adapter_config.json").read_bytes() == (retrained / "adapter_config.json").read_bytes()
    cache = tmp_path / "cache"
    imported, _ = _build(tmp_path, base, first, cache, "out1")
    assert imported == "['peft', 'transformers']" and {p.parent.name for p in _memo_files(cache)} == {"names", "merge-plan"}
    imported, ours = _build(tmp_path, base, retrained, cache, "out2")
    assert imported == "[]"  # the plans came from the memo: no meta model, no PEFT config checks
    _, fresh = _build(tmp_path, base, retrained, tmp_path / "fresh-cache", "out3")
    assert _same(ours, fresh)
    # Turned off, the plans are derived again however full the memo is.
    imported, _ = _build(tmp_path, base, make_lora_adapter(base, tmp_path / "a3", r=4, seed=7), cache, "out4", {"LOADGRAPH_DERIVED_MEMO": "0"})
    assert imported == "['peft', 'transformers']"


def test_a_changed_alpha_with_the_same_shapes_or_a_damaged_memo_is_never_used(models, tmp_path):
    base = models("llama", dtype="bfloat16")
    cache = tmp_path / "cache"
    _build(tmp_path, base, make_lora_adapter(base, tmp_path / "a1", r=4, seed=5), cache, "out1")
    # lora_alpha changes the scaling, not one shape or header byte: its own plan, PEFT's arithmetic.
    louder = make_lora_adapter(base, tmp_path / "a2", r=4, lora_alpha=64, seed=5)
    imported, ours = _build(tmp_path, base, louder, cache, "out2")
    assert "peft" in imported
    _, fresh = _build(tmp_path, base, louder, tmp_path / "fresh", "out3")
    assert _same(ours, fresh) and not _same(ours, tmp_path / "out1")
    # A memo file with one byte flipped fails its digest: derived again and replaced (the name map
    # and this config's plan; the first adapter's stays damaged, unread), output unchanged.
    assert len(_memo_files(cache)) == 3
    for path in _memo_files(cache):
        data = bytearray(path.read_bytes())
        data[-1] ^= 1
        path.write_bytes(bytes(data))
    imported, again = _build(tmp_path, base, make_lora_adapter(base, tmp_path / "a3", r=4, lora_alpha=64, seed=9), cache, "out4")
    assert "peft" in imported and [derived.lookup(p)[0] for p in _memo_files(cache)].count(True) == 2
    _, fresh = _build(tmp_path, base, tmp_path / "a3", tmp_path / "fresh2", "out5")
    assert _same(again, fresh)


def test_a_quantization_plan_is_keyed_by_the_settings_and_the_libraries_and_relocated(models, tmp_path, monkeypatch):
    base = models("llama", dtype="bfloat16")
    copy = models.copy(tmp_path / "copy", dtype="bfloat16")  # same bytes elsewhere: same plan, its own base_dir
    settings = make_settings(settings_params(QuantizeSpec(method="bnb-nf4"), "auto"))
    plan = quant_plan(str(base), settings, tmp_path)
    assert len(_memo_files(tmp_path)) == 1
    moved = quant_plan(str(copy), settings, tmp_path)
    assert len(_memo_files(tmp_path)) == 1 and moved.base_dir == str(copy) and moved.tensors == plan.tensors
    other = make_settings(settings_params(QuantizeSpec(method="bnb-nf4", blocksize=128), "auto"))
    quant_plan(str(base), other, tmp_path)
    assert len(_memo_files(tmp_path)) == 2
    # Another transformers (or another loadgraph) judges anew: a third key.
    monkeypatch.setattr(derived, "_code_and_versions", lambda: b"transformers=another")
    quant_plan(str(base), settings, tmp_path)
    assert len(_memo_files(tmp_path)) == 3
