"""Node prefetch: put a built artifact on every node's local disk before a training launch.

N training workers on a node then read one local copy instead of N streams from the shared
cache. One Ray task per node, pinned to it, places the artifacts there; on the node, a file
lock per artifact makes every caller after the first (a retried task, a second prefetch,
training workers calling `ensure_local` themselves) find the finished copy instead of copying
again. A copy is staged beside its destination and renamed into place with its manifest
last, so a reader never sees half an artifact.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

from filelock import FileLock

from loadgraph.errors import BuildError, InputError, LoadgraphError
from loadgraph.pipeline.cache import MANIFEST

LOCAL_DIR_ENV = "LOADGRAPH_LOCAL_DIR"
# /tmp is node-local on nearly every cluster, where a home directory is often a network mount.
DEFAULT_LOCAL_DIR = "/tmp/loadgraph-local"
PLACE_RETRIES = 2


def local_root(template: str | None, node_id: str) -> Path:
    """The node-local directory; `{node}` expands to the node id's first 12 hex digits (for
    clusters simulated on one machine, where every node's /tmp is the same directory)."""
    raw = template or os.environ.get(LOCAL_DIR_ENV) or DEFAULT_LOCAL_DIR
    return Path(raw.replace("{node}", node_id[:12])).expanduser().absolute()


def _manifest(path: Path) -> dict | None:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _complete(dest: Path, key: str) -> bool:
    manifest = _manifest(dest)
    if manifest is None or manifest.get("key") != key:
        return False
    try:
        return all((dest / rel).stat().st_size == meta["size"] for rel, meta in manifest.get("files", {}).items())
    except OSError:
        return False


def _copy(src: Path, dst: Path, same_device: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if same_device:
        try:
            os.link(src, dst)  # the cache is on this node's disk already: a link is a local copy
            return
        except OSError:
            pass
    shutil.copyfile(src, dst)


def ensure_local(cache_root: str, key: str, local_dir: str | None = None, node_id: str = "") -> dict:
    """Make `<local root>/<key>` a complete copy of the cached artifact `key`; safe to call from
    any number of processes on a node. Returns where it is and whether this call copied it."""
    t0 = time.perf_counter()
    src = Path(cache_root) / "objects" / key
    manifest = _manifest(src)
    if manifest is None or manifest.get("key") != key:
        raise BuildError(f"artifact {key[:12]} is not in the cache at {cache_root} as seen from this node; build it first, on a cache every node shares")
    root = local_root(local_dir, node_id)
    dest = root / key
    (root / ".locks").mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / ".locks" / f"{key}.lock")):
        if _complete(dest, key):
            return {"key": key, "path": str(dest), "status": "present", "bytes": 0, "seconds": time.perf_counter() - t0}
        files = manifest.get("files", {})
        need = sum(meta["size"] for meta in files.values())
        same_device = os.stat(src).st_dev == os.stat(root).st_dev
        free = shutil.disk_usage(root).free
        if not same_device and free < need:
            raise BuildError(f"{root}: {free / 1e9:.1f} GB free on this node, the artifact needs {need / 1e9:.1f} GB; pass --local-dir on a bigger disk")
        staged = root / f".tmp-{key[:16]}-{uuid.uuid4().hex[:8]}"
        try:
            for rel, meta in files.items():
                _copy(src / rel, staged / rel, same_device)
                if (staged / rel).stat().st_size != meta["size"]:
                    raise BuildError(f"{src / rel}: copied {(staged / rel).stat().st_size} bytes, the manifest says {meta['size']}")
            _copy(src / MANIFEST, staged / MANIFEST, False)  # last: it marks the copy complete
            if dest.exists():  # an incomplete earlier copy (files deleted under it): replace it
                shutil.rmtree(dest)
            os.rename(staged, dest)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
    return {"key": key, "path": str(dest), "status": "linked" if same_device else "copied", "bytes": need, "seconds": time.perf_counter() - t0}


def _place(cache_root: str, keys: list[str], local_dir: str | None) -> list[dict]:
    """The per-node task: every artifact, in order; errors come back as data (not retried)."""
    from loadgraph.pipeline.executors.ray_nodes import where_am_i

    here = where_am_i()
    out = []
    for key in keys:
        try:
            record = ensure_local(cache_root, key, local_dir, here["node_id"])
        except LoadgraphError as exc:
            record = {"key": key, "status": "error", "error": str(exc)}
        out.append({**record, "node_id": here["node_id"], "host": here["host"]})
    return out


def place_on_nodes(cache_root: str, keys: list[str], local_dir: str | None = None, gpu_nodes_only: bool = False) -> list[dict]:
    """One zero-CPU task pinned to each alive node (zero: a busy or num-cpus=0 node still runs it)."""
    import ray

    from loadgraph.pipeline.executors.ray_nodes import alive_nodes, pinned_to

    nodes = [n for n in alive_nodes() if n.gpus or not gpu_nodes_only]
    if not nodes:
        raise InputError("--gpu-nodes: the Ray cluster has no alive node with a GPU")
    task = ray.remote(num_cpus=0, max_retries=PLACE_RETRIES)(_place)
    refs = {task.options(scheduling_strategy=pinned_to(n.node_id)).remote(cache_root, keys, local_dir): n for n in nodes}
    records: list[dict] = []
    for ref, node in refs.items():
        try:
            records.extend({**r, "ip": node.ip} for r in ray.get(ref))
        except ray.exceptions.RayError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            records.extend({"key": k, "status": "error", "error": first, "node_id": node.node_id, "host": node.hostname, "ip": node.ip} for k in keys)
    failed = [r for r in records if r["status"] == "error"]
    if failed:
        raise BuildError("; ".join(f"node {r['node_id'][:12]} ({r['ip']}): {r['error']}" for r in failed))
    return records


class _Borrowed:
    """Lends the prefetch's executor to the runner, which closes what it is given."""

    def __init__(self, executor) -> None:
        self.executor = executor
        self.name = executor.name

    def run_units(self, *args, **kwargs) -> None:
        self.executor.run_units(*args, **kwargs)

    def run_jobs(self, *args, **kwargs) -> list:
        return self.executor.run_jobs(*args, **kwargs)

    def close(self) -> None:
        pass


def prefetch(specs: list[Path], cache_dir: Path | None = None, local_dir: str | None = None, gpu_nodes_only: bool = False,
             address: str | None = None, reporter=None) -> tuple[object, list[dict]]:
    """Build the specs' targets if needed (on the Ray cluster), then place each on every node."""
    from loadgraph.pipeline.cache import Cache
    from loadgraph.pipeline.executors.ray import RayExecutor
    from loadgraph.pipeline.graph import compile_specs
    from loadgraph.pipeline.runner import build
    from loadgraph.spec import load_spec_files

    from loadgraph.formats.digest import bytes_hashed
    from loadgraph.pipeline.hashing import hashed_by
    from loadgraph.pipeline.offload import SharedExecutor, remote_hasher

    cache = Cache(cache_dir)
    hashed = bytes_hashed()
    shared = SharedExecutor(lambda: RayExecutor(address=address))
    try:
        with hashed_by(remote_hasher(shared)):  # the plan's source hashing on the cluster
            graph = compile_specs(load_spec_files(specs), cache)
        executor = shared()
        report = build(graph, cache, lambda: _Borrowed(executor), reporter)
        report.driver_bytes_hashed = bytes_hashed() - hashed
        keys = list(dict.fromkeys(t.final for t in graph.targets))
        return report, place_on_nodes(str(cache.root), keys, local_dir, gpu_nodes_only)
    finally:
        shared.close()
