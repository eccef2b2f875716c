"""Hostile input: fuzzed headers and index files, paths and symlinks that leave the checkpoint,
the adapter directory or the export destination, pickles that run code, remote code without a
pinned commit, and a cache placed inside the export. Each is refused with loadgraph's own
one-line error (exit 2), before anything is published, and never crashes."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chaoslib import TALLY, cli, workload  # noqa: F401
from loadgraph.errors import InputError
from loadgraph.formats.checkpoint import INDEX_NAME, scan_checkpoint

ROW = "hostile input"


def _refused(tmp_path, doc: dict, match: str, *extra, cache=None, out_expected_absent=True):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(doc))
    cache = cache or tmp_path / "cache"
    run = cli("build", spec, "--executor", "local", "--cache", cache, *extra, logdir=tmp_path / "logs", row=ROW)
    TALLY.add(ROW, bad_inputs=1)
    assert run.rc == 2, run.output
    assert len(run.error_lines) == 1 and match in run.error_lines[0], run.output
    objects = Path(cache) / "objects"
    assert not objects.exists() or not any(objects.iterdir())
    return run


# -- fuzzing (bounded: a few hundred examples, a few seconds) ---------------------------------

NAMES = st.one_of(
    st.sampled_from(["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "../outside.safetensors", "/etc/passwd",
                     "link.safetensors", ".", "", "sub/../model-00001-of-00002.safetensors", "x\x00y", "~/x", "a\\b", "config.json", "A" * 300]),
    st.text(max_size=12),
)
INDEX = st.one_of(
    st.fixed_dictionaries({"weight_map": st.dictionaries(st.text(max_size=8), st.one_of(NAMES, st.integers(), st.none()), max_size=5)},
                          optional={"metadata": st.one_of(st.none(), st.dictionaries(st.text(max_size=4), st.integers()))}),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=2),
    st.lists(st.integers(), max_size=2),
)


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory, models):
    root = tmp_path_factory.mktemp("fuzz")
    ckpt = root / "ckpt"
    shutil.copytree(models("llama"), ckpt)
    (root / "outside.safetensors").write_bytes((ckpt / "model-00001-of-00012.safetensors").read_bytes())
    os.symlink(root / "outside.safetensors", ckpt / "link.safetensors")
    for i, f in enumerate(sorted(ckpt.glob("model-000*-of-00012.safetensors"))):
        f.rename(ckpt / f"model-0000{min(i, 1) + 1}-of-00002.safetensors") if i < 2 else f.unlink()
    return ckpt


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=INDEX, raw=st.one_of(st.none(), st.binary(max_size=64)))
def test_fuzz_index_never_crashes_and_never_leaves_the_directory(fuzz_root, index, raw):
    (fuzz_root / INDEX_NAME).write_bytes(raw if raw is not None else json.dumps(index).encode())
    (fuzz_root / "link.safetensors").unlink()  # the symlink out: refused whether or not the index names it
    try:
        ckpt = scan_checkpoint(fuzz_root)
    except InputError:
        return
    finally:
        os.symlink(fuzz_root.parent / "outside.safetensors", fuzz_root / "link.safetensors")
    real = fuzz_root.resolve()
    for name in ckpt.weight_files:
        assert real in (fuzz_root / name).resolve().parents


def test_fuzz_targets_are_counted():
    TALLY.add("fuzz: header + index parser", bad_inputs=250 + 300 + 200)  # here + tests/test_safetensors.py's two


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header_len=st.integers(0, 2**64 - 1), body=st.binary(max_size=128), cut=st.integers(0, 64))
def test_fuzz_header_reads_nothing_outside_the_file(tmp_path, header_len, body, cut):
    """Reads stay inside the file and allocation stays under its size (read() of the claimed
    header length would allocate it: it is checked against the file size first)."""
    from loadgraph.formats.safetensors import read_header

    p = tmp_path / "f.safetensors"
    p.write_bytes((struct.pack("<Q", header_len) + body)[: max(0, 8 + len(body) - cut)])
    import builtins

    size = p.stat().st_size
    real_open = builtins.open
    reads: list[int] = []

    class Guard:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            assert n is None or n < 0 or n <= max(size, 8), f"read({n}) on a {size}-byte file"
            reads.append(n)
            return self.f.read(n)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    builtins.open = lambda *a, **k: Guard(real_open(*a, **k))
    try:
        read_header(p)
    except InputError:
        pass
    finally:
        builtins.open = real_open


# -- paths and symlinks -------------------------------------------------------------------------


def test_index_naming_a_symlink_out_of_the_checkpoint_is_refused(models, tmp_path):
    src = models.copy(tmp_path / "src")
    secret = tmp_path / "secret.safetensors"
    shard = sorted(src.glob("*.safetensors"))[0]
    shutil.move(shard, secret)
    os.symlink(secret, shard)  # same name, same bytes: only the link gives it away
    _refused(tmp_path, {"source": {"model": str(src)}, "export": {"path": str(tmp_path / "out")}}, "outside the checkpoint")


def test_symlinked_config_out_of_the_checkpoint_is_refused(models, tmp_path):
    src = models.copy(tmp_path / "src")
    (src / "config.json").unlink()
    os.symlink("/etc/hostname", src / "config.json")
    _refused(tmp_path, {"source": {"model": str(src)}, "export": {"path": str(tmp_path / "out")}}, "outside the checkpoint")


def test_hub_snapshot_symlinks_into_its_own_blobs_are_allowed(models, tmp_path):
    """The hub cache layout: snapshots/<commit>/<file> -> ../../blobs/<sha>. Not an escape."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, f in enumerate(sorted(models("llama").iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        shutil.copyfile(f, blob)
        os.symlink(f"../../blobs/blob{i}", snap / f.name)
    assert scan_checkpoint(snap).weight_files


def test_adapter_file_symlinked_out_of_the_adapter_dir_is_refused(workload, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(workload.adapter, adapter)
    (adapter / "adapter_model.safetensors").unlink()
    os.symlink(workload.adapter / "adapter_model.safetensors", adapter / "adapter_model.safetensors")
    doc = {"source": {"model": str(workload.base)}, "adapters": [{"path": str(adapter)}], "export": {"path": str(tmp_path / "out")}}
    _refused(tmp_path, doc, "outside")


def test_export_path_that_is_a_symlink_is_refused_and_its_target_untouched(models, tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "precious.txt").write_text("keep")
    os.symlink(target, tmp_path / "out")
    for extra in ((), ("--overwrite",)):
        _refused(tmp_path, {"source": {"model": str(models("llama"))}, "export": {"path": str(tmp_path / "out")}}, "symbolic link", *extra)
    assert (tmp_path / "out").is_symlink() and [p.name for p in target.iterdir()] == ["precious.txt"]
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    _refused(tmp_path, {"source": {"model": str(models("llama"))}, "export": {"path": str(tmp_path / "dangling")}}, "symbolic link")


@pytest.mark.parametrize("where", ["cache-in-export", "export-in-cache", "same", "export-via-link-into-cache"])
def test_cache_and_export_overlapping_is_refused(where, models, tmp_path):
    out = tmp_path / "out"
    cache = {"cache-in-export": out / "cache", "export-in-cache": tmp_path / "cache", "same": out,
             "export-via-link-into-cache": tmp_path / "cache"}[where]
    dest = {"export-in-cache": cache / "objects" / "x", "export-via-link-into-cache": tmp_path / "link" / "out"}.get(where, out)
    if where == "export-via-link-into-cache":
        cache.mkdir()
        os.symlink(cache, tmp_path / "link")
    _refused(tmp_path, {"source": {"model": str(models("llama"))}, "export": {"path": str(dest)}}, "overlaps the cache", cache=cache)


# -- code execution ------------------------------------------------------------------------------


class Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("allow", [False, True])
def test_pickle_that_runs_code_never_runs(allow, models, tmp_path):
    src = models.copy(tmp_path / "src")
    for f in list(src.glob("*.safetensors")) + [src / INDEX_NAME]:
        f.unlink()
    marker = tmp_path / "pwned"
    (src / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": Evil(str(marker))}))
    _refused(tmp_path, {"source": {"model": str(src), "allow_pickle": allow}, "export": {"path": str(tmp_path / "out")}},
             "weights_only" if allow else "allow_pickle")
    assert not marker.exists()


def test_pickled_adapter_that_runs_code_never_runs(workload, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    shutil.copyfile(workload.adapter / "adapter_config.json", adapter / "adapter_config.json")
    marker = tmp_path / "pwned"
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps({"x": Evil(str(marker))}))
    doc = {"source": {"model": str(workload.base), "allow_pickle": True}, "adapters": [{"path": str(adapter)}], "export": {"path": str(tmp_path / "out")}}
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(doc))
    run = cli("build", spec, "--executor", "local", "--cache", tmp_path / "cache", logdir=tmp_path / "logs", row=ROW)
    TALLY.add(ROW, bad_inputs=1)
    assert run.rc == 2 and len(run.error_lines) == 1, run.output
    assert not marker.exists()


@pytest.mark.parametrize("revision", ["main", "v1.0", "abc123", "0" * 40])
def test_a_revision_on_a_local_directory_is_refused(revision, models, tmp_path):
    # A made-up commit on a local path would pin nothing: refused, naming the field.
    source = {"model": str(models("llama")), "trust_remote_code": True, "revision": revision}
    _refused(tmp_path, {"source": source, "export": {"path": str(tmp_path / "out")}}, "source.revision")
