"""Issue 18, hostile files and bad arguments: each is one line naming the file, field or path,
exit 2 (1 for a build that failed), nothing published, never a hang; and a real hub-cache layout
on the cache's own filesystem builds."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
from pathlib import Path

import pytest
import yaml

from chaoslib import TALLY, cli, workload  # noqa: F401

ROW = "hostile input"


def _spec(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _one_line(run, rc: int, *needles: str) -> None:
    TALLY.add(ROW, bad_inputs=1)
    assert run.rc == rc, run.output
    assert len(run.error_lines) == 1, run.output
    for needle in needles:
        assert needle in run.error_lines[0], run.output


def _nothing_published(cache: Path) -> None:
    objects = cache / "objects"
    assert not objects.exists() or not any(objects.iterdir())


def _rewrite_header(shard: Path, edit) -> None:
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = edit(json.loads(raw[8:8 + n]))
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    shard.chmod(0o644)
    shard.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


@pytest.mark.parametrize("metadata", [[], 0, False, {"format": 1}], ids=["list", "zero", "false", "non-string"])
def test_header_metadata_that_is_not_a_string_map_is_refused(metadata, models, tmp_path):
    src = shutil.copytree(models("llama"), tmp_path / "m")
    shard = sorted(src.glob("*.safetensors"))[0]
    _rewrite_header(shard, lambda h: {**h, "__metadata__": metadata})
    run = cli("build", _spec(tmp_path, {"source": {"model": str(src)}, "export": {"path": str(tmp_path / "out")}}), "--executor", "local",
              "--cache", tmp_path / "cache", logdir=tmp_path / "logs", row=ROW)
    _one_line(run, 2, shard.name, "__metadata__")
    _nothing_published(tmp_path / "cache")


def test_json_nesting_bomb_in_a_header_is_refused_naming_the_file(models, tmp_path):
    src = shutil.copytree(models("llama"), tmp_path / "m")
    shard = sorted(src.glob("*.safetensors"))[0]
    _rewrite_header(shard, lambda h: b"[" * 200_000 + b"]" * 200_000)
    run = cli("plan", _spec(tmp_path, {"source": {"model": str(src)}}), "--cache", tmp_path / "cache", logdir=tmp_path / "logs", row=ROW)
    _one_line(run, 2, shard.name)


def test_unknown_model_type_with_auto_map_needs_trust_remote_code(models, tmp_path):
    src = shutil.copytree(models("llama"), tmp_path / "m")
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="acme_custom", auto_map={"AutoConfig": "conf.AcmeConfig", "AutoModelForCausalLM": "model.Acme"})
    (src / "config.json").write_text(json.dumps(config))
    run = cli("build", _spec(tmp_path, {"source": {"model": str(src)}, "quantize": {"method": "bnb-nf4"}, "export": {"path": str(tmp_path / "out")}}),
              "--executor", "local", "--cache", tmp_path / "cache", logdir=tmp_path / "logs", row=ROW)
    _one_line(run, 2, "config.json", "trust_remote_code")
    _nothing_published(tmp_path / "cache")


def test_a_folder_merely_named_snapshots_gets_no_symlink_exception(models, tmp_path):
    (tmp_path / "secret.txt").write_text("not for the cache")
    ckpt = shutil.copytree(models("llama"), tmp_path / "snapshots" / "ckpt")
    (ckpt / "chat_template.jinja").unlink(missing_ok=True)
    os.symlink("../../secret.txt", ckpt / "chat_template.jinja")
    run = cli("build", _spec(tmp_path, {"source": {"model": str(ckpt)}, "export": {"path": str(tmp_path / "out")}}), "--executor", "local",
              "--cache", tmp_path / "cache", logdir=tmp_path / "logs", row=ROW)
    _one_line(run, 2, "chat_template.jinja", "outside the checkpoint")
    _nothing_published(tmp_path / "cache")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules", "rank_pattern"])
def test_pathological_adapter_pattern_is_refused_not_hung(field, workload, tmp_path):
    adapter = shutil.copytree(workload.adapter, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config[field] = {"(.*.*)*Z": 4} if field == "rank_pattern" else "(.*.*)*Z"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    doc = {"source": {"model": str(workload.base)}, "adapters": [{"path": str(adapter)}], "export": {"path": str(tmp_path / "out")}}
    t0 = time.perf_counter()
    run = cli("plan", _spec(tmp_path, doc), "--cache", tmp_path / "cache", logdir=tmp_path / "logs", row=ROW, timeout=60)
    assert time.perf_counter() - t0 < 30
    _one_line(run, 2, "adapter_config.json", field)


def test_hub_cache_checkpoint_builds_with_the_cache_on_the_same_filesystem(models, tmp_path, monkeypatch):
    """snapshots/<commit>/f -> ../../blobs/<sha> by repo id, the loadgraph cache beside the HF one."""
    src = models("llama")
    hub = tmp_path / "hf" / "hub"
    repo = hub / "models--acme--tiny"
    commit = "c" * 40
    snap = repo / "snapshots" / commit
    for d in (snap, repo / "blobs", repo / "refs"):
        d.mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for f in sorted(src.iterdir()):
        sha = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, repo / "blobs" / sha)
        os.symlink(f"../../blobs/{sha}", snap / f.name)
    cache = tmp_path / "cache"  # same filesystem as the hub cache: fetch links
    spec = _spec(tmp_path, {"source": {"model": "acme/tiny"}, "export": {"path": str(tmp_path / "out")}, "verify": False})
    # In-process: huggingface_hub reads HF_HUB_CACHE at import, so a forked child would not see a new one.
    import huggingface_hub.constants as hub_constants

    from loadgraph.pipeline.cache import Cache
    from loadgraph.pipeline.executors.local import LocalExecutor
    from loadgraph.pipeline.graph import compile_specs
    from loadgraph.pipeline.runner import build
    from loadgraph.spec import load_spec_files

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    store = Cache(cache)
    report = build(compile_specs(load_spec_files([spec]), store), store, LocalExecutor)
    TALLY.add(ROW, runs=1)
    assert report.ok and report.targets[0]["export_status"] == "published"
    for f in sorted(src.iterdir()):
        if not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            assert (tmp_path / "out" / f.name).read_bytes() == f.read_bytes(), f.name
    assert not [p for p in (cache / "objects").rglob("*") if p.is_symlink()]
    assert all(os.readlink(snap / f.name).startswith("../../blobs/") for f in src.iterdir())  # the user's links, untouched


def test_bad_arguments_are_one_line(models, tmp_path):
    spec = _spec(tmp_path, {"source": {"model": str(models("llama"))}, "export": {"path": str(tmp_path / "out")}})
    run = cli("build", spec, "--executor", "local", "--cache", tmp_path / "cache", "--json", "/nonexistent/dir/r.json", logdir=tmp_path / "logs", row=ROW)
    _one_line(run, 2, "--json", "/nonexistent/dir")
    (tmp_path / "afile").write_text("x")
    run = cli("build", spec, "--executor", "local", "--cache", tmp_path / "afile", logdir=tmp_path / "logs", row=ROW)
    _one_line(run, 2, "--cache", "afile")
    for size in ("infGB", "nanMB"):
        bad = _spec(tmp_path, {"source": {"model": str(models("llama"))}, "export": {"path": str(tmp_path / "out"), "max_shard_size": size}})
        run = cli("build", bad, "--executor", "local", "--cache", tmp_path / "cache", logdir=tmp_path / "logs", row=ROW)
        _one_line(run, 2, "max_shard_size", size)
    assert not (tmp_path / "out").exists()


def test_legacy_format_pickle_with_allow_pickle_is_converted(models, tmp_path):
    import torch
    from safetensors.torch import load_file

    src = tmp_path / "legacy"
    src.mkdir()
    tensors = {}
    for f in sorted(models("llama").glob("*.safetensors")):
        tensors.update(load_file(f))
    torch.save(tensors, src / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    shutil.copy(models("llama") / "config.json", src / "config.json")
    spec = _spec(tmp_path, {"source": {"model": str(src), "allow_pickle": True}, "verify": False, "export": {"path": str(tmp_path / "out")}})
    run = cli("build", spec, "--executor", "local", "--cache", tmp_path / "cache", logdir=tmp_path / "logs", row=ROW)
    assert run.rc == 0, run.output
    out = {}
    for f in sorted((tmp_path / "out").glob("*.safetensors")):
        out.update(load_file(f))
    assert out.keys() == tensors.keys() and all(torch.equal(out[k], tensors[k]) for k in tensors)


def test_disk_full_at_the_export_destination_names_it_and_leaves_nothing(models, tmp_path):
    spec = _spec(tmp_path, {"source": {"model": str(models("llama"))}, "export": {"path": str(tmp_path / "out")}})
    cache, logs = tmp_path / "cache", tmp_path / "logs"
    assert cli("build", spec, "--executor", "local", "--cache", cache, logdir=logs).rc == 0
    other = _spec(tmp_path, {"source": {"model": str(models("llama"))}, "export": {"path": str(tmp_path / "full" / "out")}})
    # Everything is cached: the only bytes written are the export's copies, and they hit ENOSPC.
    run = cli("build", other, "--executor", "local", "--cache", cache, logdir=logs, env={"LOADGRAPH_FAULT": "enospc-after-bytes:1000"}, row="disk full (ENOSPC)")
    TALLY.add("disk full (ENOSPC)", faults=1)
    assert run.rc == 1, run.output
    assert len(run.error_lines) == 1 and "export.path" in run.error_lines[0] and str(tmp_path / "full") in run.error_lines[0], run.output
    assert not (tmp_path / "full" / "out").exists() and not list((tmp_path / "full").glob(".out.loadgraph-*"))
