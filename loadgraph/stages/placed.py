"""Stages whose units write into shared output files at final offsets (formats/layout.py).

Units are groups of tensors of about `unit_bytes`, independent of the input's and the output's
shard files, so a model in three 5 GB shards still keeps every core (and the GPU) busy, and a
killed build resumes at the next unfinished group.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from loadgraph.formats.checkpoint import INDEX_NAME
from loadgraph.formats.digest import digest_bytes
from loadgraph.formats.layout import Layout, pack, plan_layout, shard_names, unit_groups
from loadgraph.formats.safetensors import PlannedTensor
from loadgraph.pipeline.stage import NodeContext, Unit

UNIT_BYTES = 512 * 1024 * 1024


def unit_bytes() -> int:
    """The size of a unit's tensor group: LOADGRAPH_UNIT_BYTES, else 512 MiB (read when units are planned)."""
    return int(os.environ.get("LOADGRAPH_UNIT_BYTES") or UNIT_BYTES)
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


def unit_workers(ctx: NodeContext) -> int | None:
    """How many units the executor runs at once on one machine (the runner's runtime entry): the
    units are then a multiple of that many, of equal bytes. None (Ray) keeps groups of unit_bytes."""
    return ctx.runtime.get("unit_workers")


def placed_units(layout: Layout, gpu: bool = False, size: int | None = None, workers: int | None = None, tag: str = "") -> list[Unit]:
    """One unit per tensor group (a multiple of `workers` of them, when given)."""
    groups = unit_groups(layout, size or unit_bytes(), workers)
    return tensor_units(layout, groups, lambda n: layout.tensors[n].nbytes, gpu, tag)


def tensor_units(layout: Layout, groups: list[list[str]], nbytes, gpu: bool, tag: str = "") -> list[Unit]:
    """Units of the tensor groups. An id names the layout (its headers' fingerprint), what the
    units compute beyond their params (`tag`: a merge's or a quantization's plan) and its group's tensors, so a build
    resumed with another layout, plan or grouping (other workers, another LOADGRAPH_UNIT_BYTES)
    never takes a finished unit for one it is not."""
    fingerprint = digest_bytes(b"".join(layout.headers.values()) + tag.encode())[:8]
    return [Unit(id=f"part-{fingerprint}-{i:05d}-{digest_bytes(chr(0).join(names).encode())[:6]}", payload={"tensors": names},
                 nbytes=sum(nbytes(n) for n in names), gpu=gpu)
            for i, names in enumerate(groups)]


def placed_result(layout: Layout, writer, reader=None) -> dict:
    """A unit's result: its tensors' table rows with digests, and what it read (nothing without a
    reader: a fused unit is handed its tensors), hashed and wrote."""
    return {"tensors": {n: {**layout.tensors[n].table(), "blake3": d} for n, d in writer.digests.items()},
            "bytes": reader.bytes_read if reader else 0, "written": writer.written, "hashed": reader.bytes_hashed if reader else 0,
            "timings": {**(reader.seconds if reader else {}), **writer.seconds}}


def write_index(out: Path, results: dict[str, dict]) -> None:
    """model.safetensors.index.json for the tensors the units wrote, as save_pretrained writes it
    (not for a single file: save_pretrained writes model.safetensors alone)."""
    tensors = {n: t for r in results.values() for n, t in r["tensors"].items()}
    if len({t["file"] for t in tensors.values()}) <= 1:
        return
    index = {"metadata": {"total_size": sum(t["end"] - t["begin"] for t in tensors.values())}, "weight_map": {n: tensors[n]["file"] for n in sorted(tensors)}}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
