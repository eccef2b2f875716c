"""Issue 18, the cache under real conditions: gc beside running builds, leaks it must collect,
two specs racing for one export path, a read-only cache, and a cache shared by a group of users
(real users: created with useradd and run through setpriv; skipped where that is impossible)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from chaoslib import TALLY, cli, corrupt_entries, finish, same_files, start, workload  # noqa: F401
from loadgraph.pipeline.cache import Cache
from loadgraph.pipeline.leases import BuildLease

ROW_GC = "gc beside running builds"
ROW_RACE = "two specs, one export path"
ROW_SHARED = "read-only and group-shared cache"
ROOT = Path(__file__).resolve().parents[2]


def test_gc_never_breaks_running_builds(workload, tmp_path):
    cache, logs = tmp_path / "cache", tmp_path / "logs"
    specs = [workload.spec(tmp_path / f"b{i}") for i in range(3)]
    handles = [start(["build", s, "--executor", "local", "--cache", cache], logs) for s in specs]
    gcs = 0
    while any(h[0].is_alive() for h in handles):
        run = cli("cache", "gc", "--cache", cache, "--max-size", "0", logdir=logs)  # evict everything it may
        assert run.rc in (0, 2) and "Traceback" not in run.output, run.output
        gcs += 1
    runs = [finish(h, row=ROW_GC) for h in handles]
    TALLY.add(ROW_GC, faults=gcs)
    assert gcs >= 2
    for run in runs:
        assert run.rc == 0, run.output
    lost = [n for i in range(3) for n in same_files(tmp_path / f"b{i}" / "out", workload.ref_out)] + corrupt_entries(cache)
    TALLY.add(ROW_GC, lost=len(lost))
    assert not lost


def test_gc_collects_orphaned_units_and_dead_staging_but_not_what_a_build_holds(workload, tmp_path):
    spec = workload.spec(tmp_path)
    cache_root = tmp_path / "cache"
    assert cli("build", spec, "--executor", "local", "--cache", cache_root, logdir=tmp_path / "logs").rc == 0
    cache = Cache(cache_root)
    published = [e["key"] for e in cache.entries()]
    # A kill during clean-up: units left under a published key; a dead process's staging dir.
    orphan = cache.unit_dir(published[-1], "shard-00001")  # a key no build holds
    orphan.mkdir(parents=True)
    (orphan / "x.safetensors").write_bytes(b"\0" * 4096)
    resume = cache.unit_dir("f" * 64, "shard-00001")  # an unpublished key: a resume point, kept
    resume.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    staging = cache_root / "tmp" / f"unit-abc-{os.uname().nodename.replace('.', '_')}.{dead.pid}.deadbeef"
    staging.mkdir()
    with BuildLease(cache_root, published[:2]):  # a running build using two entries
        result = cache.gc(0)
        TALLY.add(ROW_GC, faults=3, runs=1)
        assert not orphan.parent.exists() and resume.exists() and not staging.exists()
        kept = {e["key"] for e in cache.entries()}
        assert kept == set(published[:2]) | {k for k in published if k in cache.pinned_keys()}
        assert result["removed_tmp"] >= 2
    assert not corrupt_entries(cache_root)


def test_two_specs_exporting_to_one_path_at_once_one_is_told(workload, tmp_path):
    base = yaml.safe_load(workload.spec(tmp_path / "a").read_text())
    out = tmp_path / "out"
    a = tmp_path / "a.yaml"
    a.write_text(yaml.safe_dump({**base, "export": {**base["export"], "path": str(out)}}))
    b = tmp_path / "b.yaml"
    b.write_text(yaml.safe_dump({**base, "quantize": None, "export": {**base["export"], "path": str(out)}}))
    cache, logs = tmp_path / "cache", tmp_path / "logs"
    handles = [start(["build", s, "--executor", "local", "--cache", cache, "--json", tmp_path / f"{s.stem}.json"], logs) for s in (a, b)]
    runs = [finish(h, row=ROW_RACE) for h in handles]
    TALLY.add(ROW_RACE, faults=1)
    codes = sorted(r.rc for r in runs)
    # The export claim is taken right after compiling, and a cold build lasts seconds: they overlap.
    assert codes == [0, 1], [r.output for r in runs]
    (loser,) = [r for r in runs if r.rc == 1]
    (winner,) = [s for s, r in zip((a, b), runs) if r.rc == 0]
    assert len(loser.error_lines) == 1 and "another running build" in loser.error_lines[0], loser.output
    held = json.loads((out / "manifest.json").read_text())["key"]
    assert json.loads((tmp_path / f"{winner.stem}.json").read_text())["targets"][0]["key"] == held
    assert not corrupt_entries(cache)


# -- real users ---------------------------------------------------------------------------------

USERS = ("lgtest-alice", "lgtest-bob")
GROUP = "lgtest-share"


def _can_switch_users() -> bool:
    return os.geteuid() == 0 and shutil.which("setpriv") and shutil.which("useradd") and shutil.which("groupadd")


@pytest.fixture(scope="module")
def users():
    if not _can_switch_users():
        pytest.skip("needs root with setpriv/useradd to run builds as two users")
    if subprocess.run(["getent", "group", GROUP], capture_output=True).returncode != 0:
        subprocess.run(["groupadd", GROUP], check=True)
    for user in USERS:
        if subprocess.run(["id", user], capture_output=True).returncode != 0:
            subprocess.run(["useradd", "-M", "-N", "-g", GROUP, "-s", "/bin/sh", user], check=True)
    return USERS


def as_user(user: str, umask: str, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    """`loadgraph ARGS` as another user. The interpreter may live under a private home (root's):
    CAP_DAC_READ_SEARCH lets it be read, while writes, links and ownership stay that user's."""
    inner = f"umask {umask}; exec \"$@\""
    cmd = ["setpriv", f"--reuid={user}", f"--regid={GROUP}", "--init-groups", "--inh-caps=+dac_read_search",
           "--ambient-caps=+dac_read_search", "sh", "-c", inner, "sh", sys.executable, "-m", "loadgraph.cli", *map(str, args)]
    full = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": "/tmp", "COLUMNS": "200", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full, timeout=300)
    TALLY.add(ROW_SHARED, runs=1, failed_runs=int(proc.returncode != 0),
              crashes=int(proc.returncode not in (0, 1, 2, -9, 137) or "Traceback" in proc.stderr))
    return proc


@pytest.fixture
def world(workload):
    """A directory every test user can reach (pytest's tmp_path is root's, mode 0700)."""
    root = Path(tempfile.mkdtemp(prefix="lg-shared-", dir="/tmp"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _spec(world: Path, workload, name: str) -> Path:
    doc = yaml.safe_load(workload.spec(world / "specs" / name).read_text())
    outs = world / "outs"
    outs.mkdir(exist_ok=True)
    outs.chmod(0o1777)
    doc["export"]["path"] = str(outs / name)
    path = world / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    path.chmod(0o644)
    return path


def test_group_shared_cache_members_resume_and_reuse_each_others_builds(users, workload, world):
    alice, bob = users
    cache = world / "cache"
    cache.mkdir()
    shutil.chown(cache, group=GROUP)
    cache.chmod(0o2775)  # the documented set-up: the group, setgid, members on umask 002
    killed = as_user(alice, "002", "build", _spec(world, workload, "a"), "--executor", "local", "--cache", cache,
                     env={"LOADGRAPH_FAULT": "kill-after-units:12"})
    TALLY.add(ROW_SHARED, faults=1)
    assert killed.returncode in (-9, 137), killed.stderr
    resumed = as_user(bob, "002", "build", _spec(world, workload, "b"), "--executor", "local", "--cache", cache, "--json", world / "outs" / "b.json")
    assert resumed.returncode == 0, resumed.stderr
    assert sum(n["units_reused"] for n in json.loads((world / "outs" / "b.json").read_text())["nodes"]) >= 11
    cached = as_user(bob, "022", "build", _spec(world, workload, "c"), "--executor", "local", "--cache", cache)
    assert cached.returncode == 0, cached.stderr
    lost = [n for name in "bc" for n in same_files(world / "outs" / name, workload.ref_out)] + corrupt_entries(cache)
    TALLY.add(ROW_SHARED, lost=len(lost))
    assert not lost


def test_read_only_cache_serves_cached_builds_and_lists_without_tracebacks(users, workload, world):
    _, bob = users
    cache = world / "cache"
    spec = _spec(world, workload, "a")
    assert cli("build", spec, "--executor", "local", "--cache", cache, logdir=world / "logs").rc == 0
    subprocess.run(["chmod", "-R", "a-w", str(cache)], check=True)
    try:
        built = as_user(bob, "022", "build", _spec(world, workload, "b"), "--executor", "local", "--cache", cache)
        TALLY.add(ROW_SHARED, faults=1)
        assert built.returncode == 0, built.stderr
        for sub in ("ls", "verify"):
            run = as_user(bob, "022", "cache", sub, "--cache", cache)
            assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
        gc = as_user(bob, "022", "cache", "gc", "--cache", cache)
        errors = [line for line in gc.stderr.splitlines() if line.startswith("error:")]
        assert gc.returncode == 2 and len(errors) == 1 and str(cache) in errors[0], gc.stderr
        assert not same_files(world / "outs" / "b", workload.ref_out)
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(cache)], check=True)
