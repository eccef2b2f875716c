"""Fusing two consecutive per-tensor nodes (merge -> quantize) into one pass over the tensors.

Unfused, the consumer reads back every byte the producer just wrote (a 7B merge + nf4 read the
model twice). Fused, each producer unit hands its output tensors in memory to the consumer's units
that read exactly those tensors; both nodes' files are written once, into their own staging, and
both artifacts are published as before, each under its own key (intermediates stay cached).

The consumer is planned before its input exists, from the producer's prospect: the small files and
the tensor table the producer's artifact will have (its layout is fixed up front). A consumer unit
must read tensors of a single producer unit; a plan where one does not is simply not fused.
`LOADGRAPH_FUSE`: auto (the default) fuses unless the consumer's units must run one at a time
(bitsandbytes on the CPU) while the producer's run on threads of this process: fused, the producer
would run one at a time too. always fuses where it can, never does not (both for tests and
debugging). Resume stays per unit: a consumer unit's record is published before the producer's, so a producer
unit found done never left its consumers undone; those of a producer unit done earlier (a resumed
build) run as usual, reading the published producer.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import ExitStack
from dataclasses import replace
from typing import Callable

from filelock import Timeout

from loadgraph.errors import InputError
from loadgraph.pipeline.cache import MANIFEST, Cache
from loadgraph.pipeline.graph import Graph, Node
from loadgraph.pipeline.stage import Stage, Unit, get_stage
from loadgraph.pipeline.units import unit_dict


def _fusable(producer: str, consumer: str) -> bool:
    return type(get_stage(producer)).prospect is not Stage.prospect and type(get_stage(consumer)).sink is not Stage.sink


def fuse_mode() -> str:
    mode = os.environ.get("LOADGRAPH_FUSE", "auto")
    if mode not in ("auto", "always", "never"):
        raise InputError(f"LOADGRAPH_FUSE={mode}: use auto, always or never")
    return mode


def consumers_to_fuse(graph: Graph, todo: list[Node], cache: Cache) -> dict[str, Node]:
    """Producer key -> the node to fuse with it: a node to build whose only input to build is the
    producer's "model". A cache whose nodes each hold their own copy (the tier) plans on workers
    and is not fused."""
    if cache.node_local or fuse_mode() == "never":
        return {}
    building = {node.key for node in todo}
    fused: dict[str, Node] = {}
    for node in todo:
        src = node.inputs.get("model")
        if src in building and src not in fused and all(k == src or k not in building for k in node.inputs.values()) \
                and _fusable(graph.nodes[src].stage, node.stage):
            fused[src] = node
    return fused


def plan_fused(cache: Cache, desc: dict, units: list[Unit], done: set[str], consumer: Node, plan_node: Callable[[dict], list[Unit]],
               locks: ExitStack, threaded: bool) -> tuple[list[Unit], list[str]]:
    """The producer's units, each of those to run (not in `done`) carrying the consumer units it
    feeds (payload "fused"), and those units' ids; `desc` gains the consumer's description.
    Unchanged (and no ids) where the consumer cannot be fused: its lock is held by another
    builder, its units straddle ours, or (auto, `threaded` executor) they would serialize ours."""
    try:
        locks.enter_context(cache.lock(consumer.key, timeout=0))
    except Timeout:
        return units, []
    prospect = cache.unit_dir(desc["key"], "prospect")
    shutil.rmtree(prospect, ignore_errors=True)
    prospect.mkdir(parents=True)
    stage = get_stage(desc["stage"])
    from loadgraph.pipeline.units import node_context

    doc = stage.prospect(node_context(cache, desc), prospect)
    if doc is None:
        return units, []
    (prospect / MANIFEST).write_text(json.dumps({"key": desc["key"], **doc}))
    theirs = {**consumer.describe(), "lease": desc.get("lease"), "trusted": ["model"], "prospect": {"model": str(prospect)}}
    planned = plan_node(theirs)
    if fuse_mode() == "auto" and threaded and desc.get("threads_ok", True) and not theirs.get("threads_ok", True):
        return units, []
    feeds: dict[str, list[dict]] = {u.id: [] for u in units}
    owner = {name: u.id for u in units for name in u.payload.get("tensors", ())}
    homes_done = {u.id for u in units if u.id in done}  # their consumers read the published producer
    for unit in planned:
        if cache.unit_record(consumer.key, unit.id) is not None:
            continue  # done by an earlier build: not run again
        homes = {owner.get(name) for name in unit.payload.get("tensors", ())}
        if len(homes) != 1 or None in homes:
            return units, []
        feeds[homes.pop()].append(unit_dict(unit))
    desc["fused"] = theirs
    desc["threads_ok"] = desc.get("threads_ok", True) and theirs.get("threads_ok", True)
    fed = [u for u in units if feeds[u.id] and u.id not in homes_done]
    fused_units = [replace(u, payload={**u.payload, "fused": feeds[u.id]}, gpu=u.gpu or any(f["gpu"] for f in feeds[u.id])) if u in fed else u
                   for u in units]
    return fused_units, [f["id"] for u in fed for f in feeds[u.id]]
