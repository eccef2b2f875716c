"""A local cold build's start: sources hashed by a child process while the checks' imports run
(pipeline/hash_process.py, import_warmup.py), and units in whole waves of the workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import run_cli, write_spec
from loadgraph.formats.layout import balanced_groups
from loadgraph.pipeline import hash_process
from loadgraph.pipeline.hashing import hash_path
from loadgraph.testing import make_lora_adapter
from test_quantize import tensors_of


def test_the_child_process_hashes_as_this_one_does_and_starts_the_imports_only_for_big_sources(models, tmp_path, monkeypatch):
    base = models.copy(tmp_path / "base")
    paths = sorted(str(p) for p in base.iterdir() if p.is_file())
    started = []
    hasher = hash_process.process_hasher(lambda: started.append(1))
    monkeypatch.setenv(hash_process.PROCESS_MIN_ENV, "0")
    assert hasher(paths) == [hash_path(p) for p in paths] and started == [1]
    # An unreadable file fails with this process's own error, not the child's exit status.
    with pytest.raises(IsADirectoryError):
        hasher([str(tmp_path)])
    monkeypatch.setenv(hash_process.PROCESS_MIN_ENV, str(1 << 40))
    started.clear()
    assert hasher(paths) == [hash_path(p) for p in paths] and started == []


# The CLI's build in this process; writes to $AT_PLAN whether torch was imported when the plan
# was compiled (compile itself imports no torch: only the warm-up thread can have). Not printed:
# the build sends third-party output, the process's own included, to its log.
BUILD_THEN_TORCH_AT_PLAN = """
import os, sys
import loadgraph.pipeline.graph as graph
import loadgraph.pipeline.offload as offload
offload.REMOTE_MIN = 0  # the tiny model's files count as big
compile_specs = graph.compile_specs
def compile_then_report(*args, **kwargs):
    out = compile_specs(*args, **kwargs)
    open(os.environ["AT_PLAN"], "w").write(f"torch at plan: {'torch' in sys.modules}")
    return out
graph.compile_specs = compile_then_report
from loadgraph.cli import main
sys.argv = ["loadgraph", "build", *sys.argv[1:]]
main()
"""


def _build(spec, cache, env: dict) -> str:
    at_plan = cache.parent / f"{cache.name}-at-plan"
    proc = subprocess.run([sys.executable, "-c", BUILD_THEN_TORCH_AT_PLAN, str(spec), "--executor", "local", "--cache", str(cache)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, **env, "AT_PLAN": str(at_plan)})
    assert proc.returncode == 0, proc.stderr
    return at_plan.read_text()


def test_a_cold_merge_imports_torch_while_its_sources_hash_and_a_rerun_or_a_reshard_does_not(models, tmp_path):
    base = models("llama", dtype="bfloat16")
    adapter = make_lora_adapter(base, tmp_path / "a", r=4, seed=5)
    merge = write_spec(tmp_path / "m.yaml", {"source": {"model": str(base)}, "adapters": [{"path": str(adapter)}], "verify": False,
                                             "export": {"path": str(tmp_path / "out")}})
    reshard = write_spec(tmp_path / "r.yaml", {"source": {"model": str(base)}, "verify": False,
                                               "export": {"path": str(tmp_path / "out-r"), "max_shard_size": "40KB"}})
    child = {hash_process.PROCESS_MIN_ENV: "0"}
    assert _build(merge, tmp_path / "c1", child) == "torch at plan: True"
    assert _build(merge, tmp_path / "c1", child) == "torch at plan: False"  # stat memo: nothing hashed
    assert _build(reshard, tmp_path / "c2", child) == "torch at plan: False"  # no check needs torch
    # The same bytes as a build that hashes here.
    assert _build(merge, tmp_path / "c3", {hash_process.PROCESS_MIN_ENV: str(1 << 40)}).endswith("False")
    theirs = json.loads((tmp_path / "c3").joinpath("statcache.json").read_text())
    ours = json.loads((tmp_path / "c1").joinpath("statcache.json").read_text())
    assert {k: v["meta"] for k, v in theirs.items()} == {k: v["meta"] for k, v in ours.items()}


def test_balanced_groups_are_consecutive_a_multiple_of_the_workers_and_within_a_tensor_of_equal():
    sizes = [86, 86, 86, 32, 32, 32, 32] * 32 + [260]  # a 7B's layers in MB, then its head
    for workers in (1, 2, 3, 16):
        groups = balanced_groups(list(range(len(sizes))), lambda i: sizes[i], 512, workers)
        assert [i for g in groups for i in g] == list(range(len(sizes)))
        assert len(groups) % workers == 0 and len(groups) >= -(-sum(sizes) // 512)
        share = sum(sizes) / len(groups)
        assert all(abs(sum(sizes[i] for i in g) - share) <= max(sizes[i] for i in g) for g in groups)
    # A tensor larger than its share is a group alone; nothing is empty.
    assert balanced_groups([0, 1, 2], lambda i: [1000, 10, 10][i], 512, 2) == [[0], [1, 2]]


def test_a_merge_on_three_workers_has_units_in_threes_and_the_bytes_of_one_worker(models, tmp_path):
    base = models("llama", dtype="bfloat16")
    adapter = make_lora_adapter(base, tmp_path / "a", r=4, seed=9)
    outs = {}
    for workers in ("1", "3"):
        spec = write_spec(tmp_path / f"s{workers}.yaml", {"source": {"model": str(base)}, "adapters": [{"path": str(adapter)}], "verify": False,
                                                          "export": {"path": str(tmp_path / f"out{workers}")}})
        report = tmp_path / f"r{workers}.json"
        proc = run_cli("build", spec, "--executor", "local", "--cache", tmp_path / f"c{workers}", "--json", report,
                       env={"LOADGRAPH_LOCAL_WORKERS": workers, "LOADGRAPH_UNIT_BYTES": "40000"})
        assert proc.returncode == 0, proc.stderr
        merge = next(n for n in json.loads(report.read_text())["nodes"] if n["stage"] == "merge")
        outs[workers] = (merge["units_total"], tensors_of(tmp_path / f"out{workers}"))
    (one_units, one), (three_units, three) = outs["1"], outs["3"]
    assert three_units % 3 == 0 and three_units >= 3 and one_units >= 3
    assert one.keys() == three.keys() and all(torch.equal(one[k].view(-1).view(torch.uint8), three[k].view(-1).view(torch.uint8)) for k in one)


def test_the_local_executor_runs_at_most_eight_gpu_units_at_once_and_every_cpu_unit_thread(monkeypatch):
    """GPU units each hold a pinned buffer of their largest tensor: a few keep the GPU fed."""
    import threading
    import time

    from loadgraph.pipeline.executors import local
    from loadgraph.pipeline.stage import Unit

    running, most = [0], [0]
    lock = threading.Lock()

    def fake_unit(cache_root, desc, unit, progress):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return {"unit": unit["id"]}

    monkeypatch.setattr(local, "execute_unit", fake_unit)
    monkeypatch.setattr(local, "prepare_units", lambda cache_root, desc: True)

    def peak(gpu: bool) -> int:
        most[0] = 0
        done = []
        local.LocalExecutor(workers=16).run_units("/nonexistent", {}, [Unit(id=f"u{i}", gpu=gpu) for i in range(32)],
                                                 lambda unit, result: done.append(result["unit"]))
        assert sorted(done) == sorted(f"u{i}" for i in range(32))
        return most[0]

    assert peak(gpu=True) == 8 and peak(gpu=False) == 16
    monkeypatch.setenv("LOADGRAPH_GPU_UNIT_THREADS", "3")
    assert peak(gpu=True) == 3


# A 64 MB tensor allocated and freed, then a 48 MB one (a smaller block fits in the freed one; an
# equal one may not, after alignment): the page faults of the second allocation.
REALLOCATION_FAULTS = """
import resource, torch
from loadgraph.heap import reuse_large_blocks
tuned = reuse_large_blocks()
x = torch.ones(64 << 20, dtype=torch.uint8)
del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
y = torch.ones(48 << 20, dtype=torch.uint8)
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.parametrize("setting", ["1", "0"])
def test_a_freed_large_tensor_is_reused_without_new_page_faults_unless_opted_out(setting):
    proc = subprocess.run([sys.executable, "-c", REALLOCATION_FAULTS], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "LOADGRAPH_MALLOC_TUNING": setting})
    tuned, faults = proc.stdout.split()
    if setting == "1":
        assert tuned == "True" and int(faults) < 1000  # the freed block, its pages already mapped
    else:
        assert tuned == "False" and int(faults) >= (48 << 20) // 4096 // 2  # a fresh mapping, faulted page by page
