"""Stages whose units write into shared output files at final offsets (formats/layout.py).

Units are groups of tensors of about `unit_bytes`, independent of the input's and the output's
shard files, so a model in three 5 GB shards still keeps every core (and the GPU) busy, and a
killed build resumes at the next unfinished group.
"""

from __future__ import annotations

import os

from loadgraph.formats.digest import digest_bytes
from loadgraph.formats.layout import Layout, pack, plan_layout, shard_names, unit_groups
from loadgraph.formats.safetensors import PlannedTensor
from loadgraph.pipeline.stage import NodeContext, Unit

UNIT_BYTES = int(os.environ.get("LOADGRAPH_UNIT_BYTES", 512 * 1024 * 1024))
# The output's shard size when no export asks for one (transformers' save_pretrained default).
DEFAULT_SHARD_BYTES = 5 * 1000**3
ST_METADATA = {"format": "pt"}  # what transformers writes; loaders check it


def output_layout(planned: list[PlannedTensor], shard_bytes: int) -> Layout:
    groups = pack(planned, shard_bytes)
    return plan_layout(groups, shard_names(len(groups)), ST_METADATA)


def shard_bytes(ctx: NodeContext) -> int:
    """The export's shard size when the node feeds an export that keeps its files (runtime, not
    key: the tensors are the same whatever the layout), else transformers' default."""
    return int(ctx.runtime.get("shard_bytes") or DEFAULT_SHARD_BYTES)


def placed_units(layout: Layout, gpu: bool = False, unit_bytes: int | None = None) -> list[Unit]:
    """One unit per tensor group; ids carry the layout's fingerprint so that a resumed build with
    another layout never mixes offsets of two layouts."""
    fingerprint = digest_bytes(b"".join(layout.headers.values()))[:8]
    groups = unit_groups(layout, unit_bytes or UNIT_BYTES)
    return [
        Unit(id=f"part-{fingerprint}-{i:05d}", payload={"tensors": names}, nbytes=sum(layout.tensors[n].nbytes for n in names), gpu=gpu)
        for i, names in enumerate(groups)
    ]


def placed_result(layout: Layout, digests: dict[str, str], read: int, written: int, hashed: int = 0) -> dict:
    return {"tensors": {n: {**layout.tensors[n].table(), "blake3": d} for n, d in digests.items()}, "bytes": read, "written": written,
            "hashed": hashed}
