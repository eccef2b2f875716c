"""Cache tampering and a full disk. A damaged entry is detected, rebuilt and never used:
get() compares every file's size and mtime with the manifest (a stat; small non-shard files are
re-hashed) and a node re-hashes its inputs before it computes from them (runner.verify_inputs),
so even a flip that keeps the mtime is caught as soon as something would read it."""

from __future__ import annotations

import json
import os
import time

import pytest

from chaoslib import TALLY, cli, corrupt_entries, flip_byte, report_nodes, same_files, unit_log, workload  # noqa: F401

ROW = "cache tampering"


def _built(tmp_path, workload):
    spec = workload.spec(tmp_path)
    cache = tmp_path / "cache"
    run = cli("build", spec, "--executor", "local", "--cache", cache, logdir=tmp_path / "logs")
    assert run.rc == 0, run.output
    return spec, cache


def _entry(cache, stage):
    from loadgraph.pipeline.cache import Cache

    (key,) = [e["key"] for e in Cache(cache).entries() if e["stage"] == stage]
    return key, cache / "objects" / key


def _rebuild(spec, cache, tmp_path, name):
    run = cli("build", spec, "--executor", "local", "--cache", cache, "--json", tmp_path / f"{name}.json", logdir=tmp_path / "logs", row=ROW)
    assert run.rc == 0, run.output
    doc = json.loads((tmp_path / f"{name}.json").read_text())
    lost = same_files(tmp_path / "out", workload_ref(tmp_path)) + corrupt_entries(cache)
    TALLY.add(ROW, faults=1, lost=len(lost))
    assert not lost
    return {n["stage"]: n["status"] for n in doc["nodes"] if n["stage"] != "fetch"}, doc


_REF = {}


def workload_ref(tmp_path):
    return _REF["out"]


@pytest.fixture(autouse=True)
def _ref(workload):
    _REF["out"] = workload.ref_out


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["flip", "flip-keeping-mtime"])
def test_flipped_byte_in_an_intermediate_shard_is_rebuilt_not_used(keep_mtime, workload, tmp_path):
    spec, cache = _built(tmp_path, workload)
    merge_key, merge_dir = _entry(cache, "merge")
    flip_byte(sorted(merge_dir.glob("*.safetensors"))[0], offset=-5, keep_mtime=keep_mtime)
    # Make quantize read the damaged merge output again: a build needs only what it reads, so
    # quantize is rebuilt only when what reads it (export) is gone too.
    for stage in ("quantize", "export"):
        (_entry(cache, stage)[1] / "manifest.json").unlink()
    statuses, doc = _rebuild(spec, cache, tmp_path, "r")
    assert statuses["merge"] == "built" and statuses["quantize"] == "built"
    assert doc["corrupt_rebuilt"] == (1 if keep_mtime else 0)  # else get() already refused the entry


def test_flipped_byte_in_an_exported_shard_rebuilds_and_republishes(workload, tmp_path):
    spec, cache = _built(tmp_path, workload)
    _, export_dir = _entry(cache, "export")
    shard = sorted(export_dir.glob("*.safetensors"))[0]
    # The destination hardlinks the cache's shard: both are damaged by one write.
    assert (tmp_path / "out" / shard.name).stat().st_ino == shard.stat().st_ino
    flip_byte(shard, offset=-3)
    assert same_files(tmp_path / "out", workload.ref_out)
    statuses, doc = _rebuild(spec, cache, tmp_path, "r")
    assert statuses["export"] == "built"  # (and quantize too when the shard was its file, linked whole)
    assert doc["targets"][0]["export_status"] == "published"  # not "up-to-date": its files were the damaged ones


def test_deleted_manifest_means_absent_and_rebuilt_identically(workload, tmp_path):
    spec, cache = _built(tmp_path, workload)
    key, merge_dir = _entry(cache, "merge")
    before = json.loads((merge_dir / "manifest.json").read_text())["files"]
    (merge_dir / "manifest.json").unlink()
    ls = cli("cache", "ls", "--cache", cache, "--json", logdir=tmp_path / "logs")
    assert [e["valid"] for e in json.loads(ls.output[ls.output.index("["):]) if e["key"] == key] == [False]
    # Nothing reads it (quantize is cached): absent, and not rebuilt (a build needs only what it reads).
    run = cli("build", spec, "--executor", "local", "--cache", cache, "--json", tmp_path / "r.json", logdir=tmp_path / "logs")
    assert run.rc == 0, run.output
    statuses = {n["stage"]: n["status"] for n in json.loads((tmp_path / "r.json").read_text())["nodes"] if n["stage"] != "fetch"}
    assert statuses == {"inspect": "cached", "merge": "not needed", "quantize": "cached", "export": "cached"}
    for stage in ("quantize", "export"):  # now the export needs quantize, which needs the merge
        (_entry(cache, stage)[1] / "manifest.json").unlink()
    statuses, _ = _rebuild(spec, cache, tmp_path, "r2")
    assert statuses == {"inspect": "cached", "merge": "built", "quantize": "built", "export": "built"}
    after = json.loads((merge_dir / "manifest.json").read_text())["files"]
    assert {k: v["blake3"] for k, v in after.items()} == {k: v["blake3"] for k, v in before.items()}


def test_crash_leftovers_are_ignored_and_gc_removes_them(workload, tmp_path):
    spec = workload.spec(tmp_path)
    cache = tmp_path / "cache"
    # A real crash mid-unit leaves its staging dir in tmp/.
    killed = cli("build", spec, "--executor", "local", "--cache", cache, logdir=tmp_path / "logs", env={"LOADGRAPH_FAULT": "kill-in-unit:25"}, row=ROW)
    assert killed.rc == -9
    leftovers = list((cache / "tmp").iterdir())
    assert leftovers
    (cache / "tmp" / "node-0123456789ab-99-deadbeef").mkdir()  # and a half-assembled node
    (cache / "tmp" / "node-0123456789ab-99-deadbeef" / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 100)
    statuses, _ = _rebuild(spec, cache, tmp_path, "r")
    assert statuses["export"] == "built"  # the rerun finished, ignoring both leftovers
    old = time.time() - 2 * 3600
    for p in (cache / "tmp").iterdir():
        os.utime(p, (old, old))
    gc = cli("cache", "gc", "--cache", cache, logdir=tmp_path / "logs")
    assert gc.rc == 0, gc.output
    assert not any((cache / "tmp").iterdir())
    assert not corrupt_entries(cache) and len(list((cache / "objects").iterdir())) == len(workload.ref_keys)


def test_disk_full_is_one_clear_line_publishes_nothing_and_rerun_succeeds(workload, tmp_path):
    spec = workload.spec(tmp_path)
    cache = tmp_path / "cache"
    full = cli("build", spec, "--executor", "local", "--cache", cache, logdir=tmp_path / "logs", env={"LOADGRAPH_FAULT": "enospc-after-bytes:300000"}, row="disk full (ENOSPC)")
    TALLY.add("disk full (ENOSPC)", faults=1)
    assert full.rc == 1, full.output
    assert len(full.error_lines) == 1 and "no space left" in full.error_lines[0] and "nothing was published" in full.error_lines[0], full.output
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    assert not any((cache / "tmp").iterdir())  # the failed unit cleaned up its staging dir
    from loadgraph.pipeline.cache import Cache

    published = {e["stage"] for e in Cache(cache).entries()}
    assert "export" not in published and not corrupt_entries(cache)
    rerun = cli("build", spec, "--executor", "local", "--cache", cache, "--json", tmp_path / "r.json", logdir=tmp_path / "logs",
                env={"LOADGRAPH_UNIT_LOG": str(tmp_path / "units.log")}, row="disk full (ENOSPC)")
    assert rerun.rc == 0, rerun.output
    lost = same_files(tmp_path / "out", workload.ref_out) + corrupt_entries(cache)
    TALLY.add("disk full (ENOSPC)", lost=len(lost))
    assert not lost
    assert len(unit_log(tmp_path / "units.log")) < workload.total_units  # it resumed
