"""A cold local merge runs its checks in a child process while its units merge on guessed plans
(pipeline/check_process.py, stages/derived_plans.guess_plans): the same bytes as checking first,
no transformers or PEFT in the build's own process, a guess the checks overrule built again on
theirs, a check that fails fails the build with nothing published."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

from conftest import BUILD_THEN_MODULES, write_spec
from loadgraph.testing import make_lora_adapter
from test_derived_memo import _same

# The CLI's build in this process with the sources hashed by a child however small they are (so
# the warm-up, and with it the checks' child, starts as on a real checkpoint). FAULT=overrule
# halves every guessed plan's scale: a guess the checks must overrule. Prints which of $WATCHED
# the build's own process imported.
BUILD = """
import os
import loadgraph.pipeline.offload as offload
offload.REMOTE_MIN = 0
if os.environ.get("FAULT") == "overrule":
    from dataclasses import replace
    from loadgraph.stages import derived_plans
    guess = derived_plans.guess_plans
    def wrong(*args, **kwargs):
        found = guess(*args, **kwargs)
        for key, (adapter, plan) in derived_plans._GUESSED.items():
            derived_plans._GUESSED[key] = (adapter, replace(plan, scale_multiplier=plan.scale_multiplier / 2))
        return found
    derived_plans.guess_plans = wrong
""" + BUILD_THEN_MODULES


def _run(tmp_path: Path, doc: dict, name: str, watched: str, env: dict | None = None, script: str = BUILD) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """A cold local build of `doc` by `script` exporting to out-NAME, its report in NAME.json;
    (the process, its export, its cache)."""
    export, cache = tmp_path / f"out-{name}", tmp_path / f"cache-{name}"
    spec = write_spec(tmp_path / f"{name}.yaml", {**doc, "verify": False, "export": {"path": str(export)}})
    proc = subprocess.run([sys.executable, "-c", script, str(spec), "--executor", "local", "--cache", str(cache), "--json", str(tmp_path / f"{name}.json")],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "LOADGRAPH_HASH_PROCESS_MIN": "0", "WATCHED": watched, **(env or {})})
    return proc, export, cache


def _build(tmp_path: Path, base: Path, adapter: Path, name: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """A cold local merge build."""
    return _run(tmp_path, {"source": {"model": str(base)}, "adapters": [{"path": str(adapter)}]}, name, "peft,transformers", env)


def _report(tmp_path: Path, name: str) -> dict:
    return json.loads((tmp_path / f"{name}.json").read_text())


def test_the_checks_run_beside_the_merge_which_imports_neither_peft_nor_transformers_and_writes_the_same_bytes(models, tmp_path):
    base = models("llama", dtype="bfloat16")
    adapter = make_lora_adapter(base, tmp_path / "a", r=4, seed=5)
    proc, ours, cache = _build(tmp_path, base, adapter, "beside")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"  # the child imported them, not the build
    assert _report(tmp_path, "beside")["checks"] == {"beside": True, "overruled": []}
    # The child stored the plans it derived: a retrained adapter's build finds them.
    assert {p.parent.name for p in (cache / "derived").rglob("*.pickle")} == {"names", "merge-plan"}
    proc, theirs, _ = _build(tmp_path, base, adapter, "here", {"LOADGRAPH_CHECKS_BESIDE": "0"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "['peft', 'transformers']" and _report(tmp_path, "here")["checks"] == {}
    assert _same(ours, theirs)


def test_a_guess_the_checks_overrule_is_merged_again_on_their_plan(models, tmp_path):
    base = models("llama", dtype="bfloat16")
    adapter = make_lora_adapter(base, tmp_path / "a", r=4, seed=5)
    proc, ours, _ = _build(tmp_path, base, adapter, "overruled", {"FAULT": "overrule"})
    assert proc.returncode == 0, proc.stderr
    report = _report(tmp_path, "overruled")
    merge = next(n for n in report["nodes"] if n["stage"] == "merge")
    assert report["checks"] == {"beside": True, "overruled": [merge["key"]]}
    assert merge["units_reused"] == 0  # none of the units merged on the guess (their ids carry its plan)
    _, theirs, _ = _build(tmp_path, base, adapter, "here", {"LOADGRAPH_CHECKS_BESIDE": "0"})
    assert _same(ours, theirs)


def test_an_adapter_the_checks_refuse_fails_the_build_with_their_error_and_publishes_nothing(models, tmp_path):
    base = models("llama", dtype="bfloat16")
    adapter = make_lora_adapter(base, tmp_path / "a", r=4, seed=5, target_modules=["q_proj", "v_proj"])
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    dropped = sorted(n for n in tensors if ".layers.1.self_attn.v_proj." in n)
    save_file({n: t for n, t in tensors.items() if n not in dropped}, str(weights))  # a truncated file: PEFT's targets check refuses it
    proc, export, cache = _build(tmp_path, base, adapter, "refused")
    assert proc.returncode == 2, proc.stderr
    assert "layers.1.self_attn.v_proj.lora_A.weight: missing, although adapter_config.json's target_modules selects that layer" in proc.stderr
    assert re.search(r"merge\s+\w+\s+building", proc.stderr)  # refused by the child while the merge ran on its guess
    assert _report(tmp_path, "refused")["ok"] is False
    assert not export.exists()
    stages = {json.loads(m.read_text()).get("stage") for m in (cache / "objects").glob("*/manifest.json")}
    assert "merge" not in stages and "export" not in stages


def test_a_quantization_runs_on_its_guessed_plan_beside_its_checks_and_writes_the_same_files(models, tmp_path):
    base = models("llama", dtype="bfloat16")
    outs = {}
    doc = {"source": {"model": str(base)}, "dtype": "bfloat16", "quantize": {"method": "bnb-nf4", "double_quant": True, "backend": "cpu"}}
    for name, env in (("beside", {}), ("here", {"LOADGRAPH_CHECKS_BESIDE": "0"})):
        proc, export, _ = _run(tmp_path, doc, name, "transformers", env)
        assert proc.returncode == 0, proc.stderr
        outs[name] = (proc.stdout.strip().splitlines()[-1], _report(tmp_path, name)["checks"], export)
    assert outs["beside"][:2] == ("[]", {"beside": True, "overruled": []})  # no meta model in the build's own process
    assert outs["here"][:2] == ("['transformers']", {})
    ours, theirs = outs["beside"][2], outs["here"][2]
    assert _same(ours, theirs)
    # The configs come from transformers' plan, derived beside: the same files, byte for byte.
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())
    assert all((ours / p.name).read_bytes() == p.read_bytes() for p in theirs.iterdir() if p.suffix == ".json" and p.name != "manifest.json")


def test_a_guessed_quantization_plan_is_confirmed_only_where_it_writes_what_transformers_plans(models, tmp_path):
    from dataclasses import replace

    from loadgraph.pipeline.graph import _local_tensors
    from loadgraph.spec import QuantizeSpec
    from loadgraph.stages import derived_plans
    from loadgraph.stages.quantize import make_settings, settings_params

    base = models("llama", dtype="bfloat16")
    settings = make_settings(settings_params(QuantizeSpec(method="bnb-nf4", double_quant=True), "bfloat16"))
    tensors = _local_tensors(str(base), False)
    assert derived_plans.guess_quant(base, tensors, settings)
    assert derived_plans.confirm_quant(base, settings, tmp_path / "memo")  # transformers plans the same fates
    assert derived_plans.guess_quant(base, tensors, settings)
    (key, plan), = derived_plans._GUESSED.items()
    weight = next(n for n, t in plan.tensors.items() if t.kind == "quantize")
    derived_plans._GUESSED[key] = replace(plan, tensors={**plan.tensors, weight: replace(plan.tensors[weight], kind="keep")})
    assert not derived_plans.confirm_quant(base, settings, tmp_path / "memo")  # one weight kept that transformers quantizes
    assert not derived_plans._GUESSED  # withdrawn either way: the plan is transformers' from then on
    assert derived_plans.quant_plan(str(base), settings, tmp_path / "memo").tensors[weight].kind == "quantize"
    # Outside the guessed case (a skip list replaces transformers' default skips) nothing is guessed.
    assert not derived_plans.guess_quant(base, tensors, replace(settings, skip_modules=("q_proj",)))


def test_a_killed_checks_process_leaves_the_checks_to_the_build_which_merges_the_same_bytes(models, tmp_path):
    base = models("llama", dtype="bfloat16")
    adapter = make_lora_adapter(base, tmp_path / "a", r=4, seed=5)
    proc, ours, _ = _build(tmp_path, base, adapter, "killed", {"LOADGRAPH_FAULT": "kill-checks:1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "['peft', 'transformers']"  # checked here, once the child was gone
    _, theirs, _ = _build(tmp_path, base, adapter, "here", {"LOADGRAPH_CHECKS_BESIDE": "0"})
    assert _same(ours, theirs)


def test_a_build_killed_while_merging_on_a_guess_resumes_its_units_to_the_same_bytes(models, tmp_path):
    base = models("llama", dtype="bfloat16")
    adapter = make_lora_adapter(base, tmp_path / "a", r=4, seed=5)
    _, theirs, _ = _build(tmp_path, base, adapter, "here", {"LOADGRAPH_CHECKS_BESIDE": "0"})
    nodes = _report(tmp_path, "here")["nodes"]
    ahead = sum(len(n["units"]) for n in nodes[: next(i for i, n in enumerate(nodes) if n["stage"] == "merge")])
    # Killed once the merge's first unit, merged on the guess, is done.
    proc, ours, cache = _build(tmp_path, base, adapter, "resumed", {"LOADGRAPH_FAULT": f"kill-after-units:{ahead + 1}"})
    assert proc.returncode == -9 and not ours.exists()
    proc, _, _ = _build(tmp_path, base, adapter, "resumed")
    assert proc.returncode == 0, proc.stderr
    merge = next(n for n in _report(tmp_path, "resumed")["nodes"] if n["stage"] == "merge")
    assert len(merge["units"]) == 2 and merge["units_reused"] == 1  # the guess the checks' plan confirms: the same unit
    assert _same(ours, theirs)


def test_a_new_adapter_on_a_built_base_gets_the_checks_beside_though_nothing_big_is_hashed(models, tmp_path):
    from conftest import build_imports
    from loadgraph.pipeline.hash_process import PROCESS_MIN_ENV

    base = models("llama", dtype="bfloat16")
    cache = tmp_path / "cache"

    def build(adapter: Path, out: str, env: dict) -> str:  # small files: hashed in this process, never by a child
        spec = write_spec(tmp_path / f"{out}.yaml", {"source": {"model": str(base)}, "adapters": [{"path": str(adapter)}], "verify": False,
                                                     "export": {"path": str(tmp_path / out)}})
        return build_imports(spec, cache, ("peft", "transformers"), env)

    assert build(make_lora_adapter(base, tmp_path / "a1", r=4, seed=5), "out1", {PROCESS_MIN_ENV: "0"}) == "[]"
    # Another config on the built base: its plans are not memoised, nothing big is hashed; the base's size starts the child.
    assert build(make_lora_adapter(base, tmp_path / "a2", r=8, seed=6), "out2", {PROCESS_MIN_ENV: "0"}) == "[]"
    # Below the size that pays a child, the checks run here, first.
    assert build(make_lora_adapter(base, tmp_path / "a3", r=2, seed=7), "out3", {PROCESS_MIN_ENV: str(1 << 40)}) == "['peft', 'transformers']"
    proc, theirs, _ = _build(tmp_path, base, tmp_path / "a2", "here", {"LOADGRAPH_CHECKS_BESIDE": "0"})
    assert proc.returncode == 0, proc.stderr
    assert _same(tmp_path / "out2", theirs)
