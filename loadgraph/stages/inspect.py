"""inspect: validate every header of a fetched checkpoint and record its tensor table.

The output links the input's files (no copy: cache entries are immutable) and adds the
tensor table to the manifest, which downstream stages plan their units from.
"""

from __future__ import annotations

import os
from pathlib import Path

from loadgraph.formats.checkpoint import scan_checkpoint
from loadgraph.pipeline.stage import NodeContext, Stage, Unit


def link_or_copy(src: Path, dst: Path) -> bool:
    """Hardlink inside one filesystem (free), copy across filesystems or where a link is not
    permitted (another user's file under fs.protected_hardlinks). True if linked.

    The link target is resolved first: a hub snapshot's files are relative symlinks into
    blobs/, and hardlinking the symlink itself would leave a link that dangles in the cache."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    real = Path(os.path.realpath(src))
    try:
        os.link(real, dst)
        return True
    except OSError:
        import shutil

        shutil.copyfile(real, dst)
        return False


def tensor_table(root: Path, digests: dict[str, dict[str, str]] | None = None) -> dict[str, dict]:
    """name -> {dtype, shape, file, begin, end[, blake3]}; digests per file from the fetch, when known."""
    ckpt = scan_checkpoint(root)
    digests = digests or {}
    table = {}
    for name, (f, e) in ckpt.tensors.items():
        table[name] = {"dtype": e.dtype, "shape": list(e.shape), "file": f, "begin": e.begin, "end": e.end}
        if name in digests.get(f, {}):
            table[name]["blake3"] = digests[f][name]
    return table


class InspectStage(Stage):
    name = "inspect"
    version = 1

    def units(self, ctx: NodeContext) -> list[Unit]:
        # Headers only: one unit is instant even on a 100 GB checkpoint.
        return [Unit(id="headers")]

    def run_unit(self, ctx: NodeContext, unit: Unit, out: Path) -> dict:
        return {"tensors": tensor_table(ctx.input().path, ctx.input().manifest.get("tensor_digests"))}

    def finalize(self, ctx: NodeContext, results: dict[str, dict], out: Path) -> dict:
        src = ctx.input()
        for rel in src.files:
            link_or_copy(src.path / rel, out / rel)
        tensors = results["headers"]["tensors"]
        params = sum(_numel(t["shape"]) for t in tensors.values())
        # Same bytes as the input's files: reuse their digests instead of rehashing.
        return {"files": src.files, "summary": {"tensors": len(tensors), "parameters": params}}


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


STAGES = {"inspect": InspectStage}
