"""A cold local merge + bnb 4-bit quantization (the default spec's shape) runs on guesses while
its checks run in a child: the merge on the identity name map, the quantization on a plan guessed
from the merge's prospect (or its output) when first asked for, whose derivation the child is then
sent (stages/derived_plans.guess_quant_later). The same files as checking first; either guess
overruled is built again on the checks' plan, and a quantize unit fed by an overruled merge is
never taken for the rebuild's."""

from __future__ import annotations

import pytest

from loadgraph.testing import make_lora_adapter
from test_checks_beside import _report, _run
from test_derived_memo import _same

# FAULT=keep-one: the quantization guessed on demand keeps one weight transformers quantizes.
KEEP_ONE = """
import os
if os.environ.get("FAULT") == "keep-one":
    from dataclasses import replace
    from loadgraph.stages import derived_plans
    guess = derived_plans.guess_quant
    def wrong(*args, **kwargs):
        found = guess(*args, **kwargs)
        for key, plan in list(derived_plans._GUESSED.items()):
            if key[0] != "quant-plan":
                continue
            weight = sorted(n for n, t in plan.tensors.items() if t.kind == "quantize")[0]
            derived_plans._GUESSED[key] = replace(plan, tensors={**plan.tensors, weight: replace(plan.tensors[weight], kind="keep")})
        return found
    derived_plans.guess_quant = wrong
"""


def _doc(base, adapter) -> dict:
    return {"source": {"model": str(base)}, "dtype": "bfloat16", "adapters": [{"path": str(adapter)}],
            "quantize": {"method": "bnb-nf4", "double_quant": True, "backend": "cpu"}}


def _nodes(tmp_path, name: str) -> dict:
    return {n["stage"]: n for n in _report(tmp_path, name)["nodes"] if n["stage"] in ("merge", "quantize")}


@pytest.fixture
def merged_nf4(models, tmp_path):
    """(the spec's doc, the checks-first build's export)."""
    base = models("llama", dtype="bfloat16")
    doc = _doc(base, make_lora_adapter(base, tmp_path / "a", r=4, seed=5))
    proc, theirs, _ = _run(tmp_path, doc, "here", "peft,transformers", {"LOADGRAPH_CHECKS_BESIDE": "0"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "['peft', 'transformers']" and _report(tmp_path, "here")["checks"] == {}
    return doc, theirs


@pytest.mark.parametrize("fuse", ["always", "never"])
def test_a_merge_then_nf4_runs_on_guesses_beside_its_checks_and_writes_the_same_files(merged_nf4, tmp_path, fuse):
    doc, theirs = merged_nf4
    proc, ours, cache = _run(tmp_path, doc, "beside", "peft,transformers", {"LOADGRAPH_FUSE": fuse})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"  # no PEFT, no meta model in the build's own process
    assert _report(tmp_path, "beside")["checks"] == {"beside": True, "overruled": []}
    nodes = _nodes(tmp_path, "beside")
    assert (nodes["quantize"]["bytes"] == 0) == (fuse == "always")  # fused: fed by the merge's units, it reads nothing
    # The child derived the merged output's quantization plan (sent once its files existed).
    assert {p.parent.name for p in (cache / "derived").rglob("*.pickle")} >= {"merge-plan", "quant-plan"}
    assert _same(ours, theirs)
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())
    assert all((ours / p.name).read_bytes() == p.read_bytes() for p in theirs.iterdir() if p.suffix == ".json" and p.name != "manifest.json")


def test_an_overruled_merge_guess_feeds_its_quantization_again(merged_nf4, tmp_path):
    doc, theirs = merged_nf4
    proc, ours, _ = _run(tmp_path, doc, "overruled", "peft,transformers", {"FAULT": "overrule", "LOADGRAPH_FUSE": "always"})
    assert proc.returncode == 0, proc.stderr
    nodes = _nodes(tmp_path, "overruled")
    assert _report(tmp_path, "overruled")["checks"]["overruled"] == [nodes["merge"]["key"]]
    # The quantize units fed by the guessed merge carry its plan: none is taken for the rebuild's.
    assert nodes["merge"]["units_reused"] == 0
    assert _same(ours, theirs)


def test_an_overruled_quantization_guess_is_quantized_again_from_the_merge(merged_nf4, tmp_path):
    doc, theirs = merged_nf4
    from test_checks_beside import BUILD

    proc, ours, _ = _run(tmp_path, doc, "kept", "peft,transformers", {"FAULT": "keep-one", "LOADGRAPH_FUSE": "always"}, script=KEEP_ONE + BUILD)
    assert proc.returncode == 0, proc.stderr
    nodes = _nodes(tmp_path, "kept")
    assert _report(tmp_path, "kept")["checks"]["overruled"] == [nodes["quantize"]["key"]]
    assert nodes["quantize"]["units_reused"] == 0  # quantized again, on the checks' plan
    assert _same(ours, theirs)
