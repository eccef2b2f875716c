"""Running one work unit: the same function in-process and inside a Ray task.

It takes only small JSON (the node's description and the unit) and returns only a small
result; tensor bytes go from the cache to the cache, never through the caller.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from loadgraph import faults
from loadgraph.errors import BuildError, CorruptInput
from loadgraph.pipeline.cache import MANIFEST, Artifact, Cache
from loadgraph.pipeline.stage import NodeContext, Unit, get_stage
from loadgraph.pipeline.unit_progress import ProgressFn, Throttled


def node_context(cache: Cache, desc: dict) -> NodeContext:
    inputs = {}
    prospects = desc.get("prospect", {})  # an input being built by the unit that feeds this one (fusion)
    for name, key in desc["inputs"].items():
        if name in prospects:
            inputs[name] = Artifact(key, Path(prospects[name]), json.loads((Path(prospects[name]) / MANIFEST).read_text()))
            continue
        art = cache.get(key)
        if art is None:
            # Gone, or it failed verification on its way here (a tier's node): the runner evicts
            # it and walks the graph again, so it is rebuilt from its own inputs.
            raise CorruptInput(f"input {name} ({key[:12]}) of {desc['stage']} is missing from the cache at {cache.root}", key)
        inputs[name] = art
    staging = desc.get("staging")
    return NodeContext(desc["key"], desc["params"], desc["runtime"], inputs, cache, trusted=frozenset(desc.get("trusted", ())),
                       staging=Path(staging) if staging else None)


def execute_unit(cache_root: str, desc: dict, unit: dict, progress: ProgressFn | None = None) -> dict:
    """Run a unit unless a finished copy exists; publish its files atomically. Idempotent.

    `progress` receives the fraction of the unit done while it runs."""
    cache = Cache(cache_root)
    done = cache.unit_result(desc["key"], unit["id"])
    if done is not None:
        return {**done, "reused": True}
    check_driver(desc)
    stage = get_stage(desc["stage"])
    ctx = node_context(cache, desc)
    cache.prepare_staging(ctx, stage)
    if progress is not None:
        ctx.progress = progress if isinstance(progress, Throttled) else Throttled(progress, period=0.0)
    # The consumer first: its planning is the slow part of a fused unit's start, and a cancel
    # (Ray's KeyboardInterrupt) landing there must find no staging dir of this unit to leave behind.
    consumer = _fused_consumer(cache, desc, unit, ctx)
    started = time.perf_counter()
    staged: Path | None = None
    try:
        staged = cache.new_tmp_dir(f"unit-{desc['key'][:12]}-{unit['id']}")
        result = stage.run_unit(ctx, Unit(**unit), staged)
        result.setdefault("wall", time.perf_counter() - started)
        if consumer is not None:
            _publish_fused(cache, desc["fused"], consumer.finish(), time.perf_counter() - started)
        faults.unit_staged(desc["key"], unit["id"])
        check_driver(desc)  # a unit of a dead build is not published: nobody would use it
        cache.publish_unit(desc["key"], unit["id"], staged, result)
    except BaseException:
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
        if consumer is not None:
            consumer.abort()
        raise
    return {**result, "reused": False}


def prepare_units(cache_root: str, desc: dict) -> bool:
    """The node's shared per-process state filled once before its units run on threads (and that
    of the node its units feed, when fused); False when a stage has nothing to prepare."""
    cache = Cache(cache_root)
    prepared = get_stage(desc["stage"]).prepare(node_context(cache, desc))
    if desc.get("fused"):
        consumer = desc["fused"]
        prepared = get_stage(consumer["stage"]).prepare(node_context(cache, consumer)) and prepared
    return prepared


def _fused_consumer(cache: Cache, desc: dict, unit: dict, ctx: NodeContext):
    """The next node's units this unit feeds in memory (pipeline/fusion.py), as a TensorSink."""
    fed = unit.get("payload", {}).get("fused")
    if not fed:
        return None
    consumer = desc["fused"]
    ctx.downstream = get_stage(consumer["stage"]).sink(node_context(cache, consumer), [Unit(**u) for u in fed])
    return ctx.downstream


def _publish_fused(cache: Cache, consumer: dict, results: dict[str, dict], wall: float) -> None:
    """The consumer's unit records, before the producer's own: a unit found done is done whole."""
    for unit_id, result in results.items():
        staged = cache.new_tmp_dir(f"unit-{consumer['key'][:12]}-{unit_id}")
        try:
            faults.unit_staged(consumer["key"], unit_id)
            cache.publish_unit(consumer["key"], unit_id, staged, {**result, "fused": True, "wall": result.get("wall", wall / len(results))})
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise


def check_driver(desc: dict) -> None:
    """Refuse to go on for a build whose driver has ended (its lease is gone or stale)."""
    from loadgraph.pipeline.leases import lease_alive

    lease = desc.get("lease")
    # A node that cannot see the driver's cache at all (a remote tier's other nodes) cannot judge.
    if lease and os.path.isdir(os.path.dirname(lease)) and not lease_alive(lease):
        raise BuildError(f"{desc['stage']} {desc['key'][:12]}: the build that asked for this unit has ended (lease {lease} is gone); not publishing")


def unit_dict(unit: Unit) -> dict:
    return asdict(unit)
