"""Issue 18, data loss and damage: the user's files are never touched, an export path never
goes missing, and corruption of a published artifact is never exported or loaded.

Builds run as real `loadgraph` processes (chaoslib's forkserver), as in the rest of tests/chaos."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import yaml

from chaoslib import TALLY, cli, corrupt_entries, flip_byte, same_files, workload  # noqa: F401

ROW_SOURCE = "user's files (mode, links, overlap)"
ROW_SWAP = "kill -9 while replacing an export"
ROW_TAMPER = "final artifact / export tampered (size+mtime kept)"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _snapshot(root: Path) -> dict[str, tuple]:
    """Everything a build must not change about a user's directory: bytes, mode, owner, mtime."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns,
                                         _sha(p) if p.is_file() and not p.is_symlink() else None)
    return out


def _single_file_model(src: Path, dest: Path) -> Path:
    """The tiny model as one model.safetensors (0600): an export with large shards is then that
    very file, which the export stage links instead of rewriting."""
    from safetensors.torch import load_file, save_file

    dest.mkdir(parents=True)
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, dest / name)
    for p in dest.iterdir():
        p.chmod(0o600)
    (dest / "notes.txt").write_text("the user's own notes\n")
    return dest


def _spec(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def _build(spec: Path, cache: Path, logs: Path, *extra, env=None, row=None):
    return cli("build", spec, "--executor", "local", "--cache", cache, *extra, logdir=logs, env=env, row=row)


def test_build_never_changes_the_source_or_shares_its_inode_with_an_export(workload, tmp_path):
    src = _single_file_model(workload.base, tmp_path / "user" / "model")
    before = _snapshot(src)
    spec = _spec(tmp_path / "s.yaml", {"source": {"model": str(src)}, "verify": False, "export": {"path": str(tmp_path / "out"), "max_shard_size": "5GB"}})
    for _ in range(2):  # cold, then fully cached (up-to-date)
        run = _build(spec, tmp_path / "cache", tmp_path / "logs", row=ROW_SOURCE)
        assert run.rc == 0, run.output
    TALLY.add(ROW_SOURCE, faults=1)
    assert _snapshot(src) == before
    source_inode = (src / "model.safetensors").stat().st_ino
    exported = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert exported and all(p.stat().st_ino != source_inode for p in exported)
    # The export is complete and holds the source's tensors, byte for byte.
    (shard,) = [p for p in exported if p.suffix == ".safetensors"]
    assert _sha(shard) == before["model.safetensors"][4]
    assert not corrupt_entries(tmp_path / "cache")


@pytest.mark.parametrize("where", ["source", "source-parent", "adapter", "spec-dir"])
def test_export_over_an_input_is_refused_even_with_overwrite(where, workload, tmp_path):
    user = tmp_path / "user"
    src = _single_file_model(workload.base, user / "model")
    adapter = shutil.copytree(workload.adapter, user / "adapter")
    (adapter / "optimizer.pt").write_bytes(b"optimizer state")
    spec_dir = tmp_path / "specs"
    spec_dir.mkdir()
    dest = {"source": src, "source-parent": user, "adapter": adapter, "spec-dir": spec_dir}[where]
    before = _snapshot(user)
    spec = _spec(spec_dir / "s.yaml", {"source": {"model": str(src)}, "adapters": [{"path": str(adapter)}], "verify": False,
                                       "export": {"path": str(dest)}})
    run = _build(spec, tmp_path / "cache", tmp_path / "logs", "--overwrite", row=ROW_SOURCE)
    TALLY.add(ROW_SOURCE, bad_inputs=1)
    assert run.rc == 2, run.output
    assert len(run.error_lines) == 1 and "export.path" in run.error_lines[0], run.output
    assert _snapshot(user) == before and (spec_dir / "s.yaml").exists()


def _export_complete(out: Path) -> str:
    """The key of the complete export at `out` (every file of its manifest present, right size)."""
    doc = json.loads((out / "manifest.json").read_text())
    for rel, meta in doc["files"].items():
        assert (out / rel).stat().st_size == meta["size"], rel
    return doc["key"]


@pytest.mark.parametrize("step", [1, 2], ids=["before-swap", "after-swap"])
def test_kill_while_replacing_an_export_leaves_old_or_new_and_no_leftovers(step, workload, tmp_path):
    base = {"source": {"model": str(workload.base)}, "verify": False, "export": {"path": str(tmp_path / "out")}}
    old = _spec(tmp_path / "old.yaml", base)
    new = _spec(tmp_path / "new.yaml", {**base, "dtype": "bfloat16"})
    cache, logs = tmp_path / "cache", tmp_path / "logs"
    assert _build(old, cache, logs).rc == 0
    old_key = _export_complete(tmp_path / "out")
    killed = _build(new, cache, logs, env={"LOADGRAPH_FAULT": f"kill-at-export:{step}"}, row=ROW_SWAP)
    TALLY.add(ROW_SWAP, faults=1)
    assert killed.rc == -9, killed.output
    held = _export_complete(tmp_path / "out")
    assert held == old_key if step == 1 else held != old_key
    assert list(tmp_path.glob(".out.loadgraph-*"))  # the kill left its staging (or the old export) beside it
    gc = cli("cache", "gc", "--cache", cache, logdir=logs)
    assert gc.rc == 0, gc.output
    assert not list(tmp_path.glob(".out.loadgraph-*"))
    again = _build(new, cache, logs, row=ROW_SWAP)
    assert again.rc == 0, again.output
    assert _export_complete(tmp_path / "out") != old_key and not list(tmp_path.glob(".out.loadgraph-*"))
    lost = corrupt_entries(cache)
    TALLY.add(ROW_SWAP, lost=len(lost))
    assert not lost


def _final_shards(cache: Path, export_key: str) -> list[Path]:
    return sorted((cache / "objects" / export_key).glob("*.safetensors"))


def test_flip_in_the_published_export_entry_is_rebuilt_not_exported_or_loaded(workload, tmp_path):
    spec = workload.spec(tmp_path)
    cache, logs = tmp_path / "cache", tmp_path / "logs"
    assert _build(spec, cache, logs).rc == 0
    key = _export_complete(tmp_path / "out")
    flip_byte(_final_shards(cache, key)[2], offset=-3, keep_mtime=True)  # also the export's file: a hardlink
    run = _build(spec, cache, logs, "--json", tmp_path / "r.json", row=ROW_TAMPER)
    TALLY.add(ROW_TAMPER, faults=1)
    assert run.rc == 0, run.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["corrupt_rebuilt"] == 1 and report["targets"][0]["export_status"] == "published"
    # A second export path gets the good bytes too, and so does the loader's artifact.
    other = _spec(tmp_path / "other.yaml", {**yaml.safe_load(spec.read_text()), "export": {"path": str(tmp_path / "out2"), "max_shard_size": "20KB"}})
    assert _build(other, cache, logs).rc == 0
    lost = same_files(tmp_path / "out", workload.ref_out) + same_files(tmp_path / "out2", workload.ref_out) + corrupt_entries(cache)
    TALLY.add(ROW_TAMPER, lost=len(lost))
    assert not lost


def test_load_never_returns_a_flipped_final_artifact(workload, tmp_path):
    from loadgraph.loading.builder import build_artifact
    from loadgraph.pipeline.cache import Cache
    from loadgraph.spec import BuildSpec

    # A merge: the final entry owns its files (an unmerged one would be the user's source inodes).
    spec = BuildSpec(source={"model": str(workload.base)}, adapters=[{"path": str(workload.adapter)}], dtype="bfloat16", verify=None)
    cache = Cache(tmp_path / "cache")
    built = build_artifact(spec, cache)
    victim = sorted(built.path.glob("*.safetensors"))[0]
    good = _sha(victim)
    flip_byte(victim, offset=-7, keep_mtime=True)
    again = build_artifact(spec, cache)
    TALLY.add(ROW_TAMPER, faults=1, runs=1)
    assert again.report.corrupt_rebuilt == 1
    assert _sha(again.path / victim.name) == good


def test_copied_export_altered_in_place_is_replaced(workload, tmp_path):
    out = Path("/dev/shm") / f"loadgraph-test-{os.getpid()}-{tmp_path.name}"  # another filesystem: a copy, not links
    try:
        spec = workload.spec(tmp_path, out)
        cache, logs = tmp_path / "cache", tmp_path / "logs"
        assert _build(spec, cache, logs).rc == 0
        shard = sorted(out.glob("*.safetensors"))[1]
        assert shard.stat().st_ino != (cache / "objects").stat().st_ino
        flip_byte(shard, offset=-9, keep_mtime=True)
        run = _build(spec, cache, logs, "--json", tmp_path / "r.json", row=ROW_TAMPER)
        TALLY.add(ROW_TAMPER, faults=1)
        assert run.rc == 0, run.output
        assert json.loads((tmp_path / "r.json").read_text())["targets"][0]["export_status"] == "published"
        lost = same_files(out, workload.ref_out)
        TALLY.add(ROW_TAMPER, lost=len(lost))
        assert not lost
    finally:
        shutil.rmtree(out, ignore_errors=True)
