"""Build leases, export claims and the atomic exchange (issue 18), without Ray or a model.

A joined Ray cluster already stops a killed driver's workers itself (tests/chaos/test_ray_driver.py);
these check the mechanism that covers the cases where it does not: a unit of a dead driver is
never published, and the worker's watch ends its process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loadgraph.errors import BuildError
from loadgraph.pipeline.cache import Cache
from loadgraph.pipeline.fsops import exchange
from loadgraph.pipeline.leases import STALE_S, BuildLease, claim_exports, lease_alive, leased_keys
from loadgraph.pipeline.units import execute_unit


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _dead_lease(cache: Cache) -> Path:
    with BuildLease(cache.root, ["k" * 64]) as lease:
        path = lease.path
        doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "pid": _dead_pid()}))  # as a SIGKILLed driver leaves it
    return path


def test_lease_is_alive_while_its_build_runs_and_not_after(tmp_path):
    cache = Cache(tmp_path / "cache")
    with BuildLease(cache.root, ["a" * 64, "b" * 64]) as lease:
        assert lease_alive(lease.path) and leased_keys(cache.root) == {"a" * 64, "b" * 64}
    assert not lease.path.exists() and leased_keys(cache.root) == set()
    dead = _dead_lease(cache)
    assert not lease_alive(dead)
    assert leased_keys(cache.root) == set() and not dead.exists()  # a dead build's lease is swept


def test_another_hosts_lease_lives_by_its_heartbeat(tmp_path):
    lease = tmp_path / "lease.json"
    lease.write_text(json.dumps({"pid": 1, "host": "some-other-node", "keys": []}))
    assert lease_alive(lease)
    old = time.time() - STALE_S - 1
    os.utime(lease, (old, old))
    assert not lease_alive(lease)


def test_a_unit_of_a_dead_driver_is_not_published(tmp_path):
    cache = Cache(tmp_path / "cache")
    desc = {"key": "c" * 64, "stage": "inspect", "params": {}, "runtime": {}, "inputs": {}, "lease": str(_dead_lease(cache))}
    with pytest.raises(BuildError, match="has ended"):
        execute_unit(str(cache.root), desc, {"id": "headers", "payload": {}, "nbytes": 0, "gpu": False})
    assert cache.unit_result("c" * 64, "headers") is None and not list((cache.root / "tmp").iterdir())


def test_worker_watch_ends_the_process_once_the_driver_is_gone(tmp_path):
    lease = _dead_lease(Cache(tmp_path / "cache"))
    code = ("import sys, time\nfrom loadgraph.pipeline.executors.ray import _watch_driver\n"
            f"_watch_driver({{'lease': {str(lease)!r}}})\ntime.sleep(60)\n")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], timeout=60, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 1 and time.perf_counter() - t0 < 30


def test_export_claims_wait_for_the_same_artifact_and_refuse_another(tmp_path):
    cache = Cache(tmp_path / "cache")
    dest = str(tmp_path / "out")
    with claim_exports(cache.root, {dest: "a" * 64}):
        with pytest.raises(BuildError, match="another running build"):
            with claim_exports(cache.root, {dest: "b" * 64}):
                pass
    with claim_exports(cache.root, {dest: "b" * 64}):  # released: the next build may claim it
        pass


def test_exchange_swaps_two_directories_atomically(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "f").write_text("new")
    (b / "f").write_text("old")
    if not exchange(a, b):
        pytest.skip("this filesystem cannot exchange (the publisher falls back to two renames)")
    assert (b / "f").read_text() == "new" and (a / "f").read_text() == "old"
