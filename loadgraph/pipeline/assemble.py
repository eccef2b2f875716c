"""A node's heavy driver-side chores as jobs (pipeline/offload.py run_jobs): planning its units
where its inputs are, assembling it (units' files linked, or copied, into one staged artifact,
finished by its stage, its manifest written), publishing it, checking a target before it leaves
the cache.

Under the Ray executor each runs as a task on a worker, so the driver process downloads, copies,
hashes and uploads no model bytes: with the object-store tier the worker localizes the units that
ran on other nodes into its own local cache and uploads the entry from there. Under the local
executor they run in the driver's process, as its units do. Each takes and returns small JSON:
the node's description, its units' results, digests; never tensors.
"""

from __future__ import annotations

import errno
import os
import platform
import shutil
import time
from pathlib import Path

from loadgraph.errors import BuildError, CorruptInput, disk_full_message
from loadgraph.formats import digest
from loadgraph.pipeline.cache import Artifact, Cache
from loadgraph.pipeline.integrity import Verifier, damaged_files, record_files
from loadgraph.pipeline.stage import Unit, get_stage, stage_version
from loadgraph.pipeline.units import check_driver, node_context, unit_dict


def near_driver(desc: dict, cache: Cache) -> bool:
    """Where a node's jobs run: on the driver's machine (in a worker process there) for a shared
    cache, which that machine is known to see at its path (a node that does not is left out of
    units only), and for a node that reads paths outside the cache (a source checkpoint); on any
    node for the tier, which every node reaches by its URL."""
    from loadgraph.pipeline.executors.ray import reads_driver_paths

    return not cache.node_local or reads_driver_paths(desc, cache.location)


def plan_job(item: tuple[str, dict]) -> dict:
    """(cache location, node description) -> what the driver needs to run the node's units:
    computed where its inputs are (a tier's driver holds none of them)."""
    location, desc = item
    cache = Cache(location)
    stage = get_stage(desc["stage"])
    ctx = node_context(cache, desc)
    return {"threads_ok": stage.thread_safe(ctx), "staged": stage.layout(ctx) is not None,
            "units": [unit_dict(u) for u in stage.units(ctx)]}


def assemble_job(item: dict) -> dict:
    """Assemble and publish one node from its finished units; returns {key, verified: the digest
    memo entries made (for the driver's memo), etags: tier objects this job verified}.

    `item`: location, desc (node description), labels, units, results (unit id -> result), origin.
    Called with the node's lock held by the driver (and its lease renewed there)."""
    cache = Cache(item["location"])
    desc = item["desc"]
    key = desc["key"]
    try:
        stage = get_stage(desc["stage"])
        ctx = node_context(cache, desc)
        layout = stage.layout(ctx)
        headers: dict[str, str] = {}
        if layout is not None:
            cache.prepare_staging(ctx, stage)  # a tier: this node's own copy of the prepared files
            headers = {rel: digest.digest_bytes(header) for rel, header in layout.headers.items()}
        units = [Unit(**u) for u in item["units"]]
        cache.localize_units(key, [u.id for u in units])  # units that ran on other nodes, verified
        check_driver(desc)  # the driver holds the key's lock: without it, another builder may be at work
        art = assemble(desc, item["labels"], stage, ctx, units, item["results"], cache, item["origin"], layout, headers)
    except CorruptInput as exc:
        try:
            cache.evict(exc.key)  # this node's copy is the damaged one; the driver evicts its own
        except OSError:
            pass
        raise
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # retrying cannot free space: one line
            raise BuildError(disk_full_message(cache.root, f"{desc['stage']} {key[:12]}")) from None
        raise
    cache.drop_units(key)
    # Digests were computed from the bytes as they were written: trust them until the inode changes.
    verifier = Verifier(cache.root)
    record_files(verifier, art.path, art.files)
    verifier.save()
    return {"key": key, "verified": verifier.made(),
            "etags": dict(getattr(cache, "verified_etags", {}))}


def check_job(item: tuple[str, str]) -> dict:
    """(cache location, key) -> {damaged: files whose bytes differ from the manifest, verified}:
    a target checked whole where its files are (a tier's node downloads it, verified, if absent).
    A damaged local copy is evicted here; the driver walks the graph again."""
    location, key = item
    cache = Cache(location)
    art = cache.get(key)
    if art is None:  # gone, or failed verification on download (then dropped from the tier)
        return {"damaged": ["manifest.json"], "verified": {}}
    verifier = Verifier(cache.root)
    damaged = damaged_files(verifier, art.path, art.files)
    verifier.save()
    if damaged:
        try:
            cache.evict(key)
        except OSError:
            pass
    return {"damaged": damaged, "verified": verifier.made()}


def _placed_files(layout, header_digests: dict[str, str], tensors: dict[str, dict]) -> dict[str, dict]:
    """Each prepared file's record, from its header's and its tensors' digests (never re-read)."""
    by_file: dict[str, list[tuple[int, str]]] = {rel: [] for rel in layout.headers}
    for name, t in tensors.items():
        by_file[t["file"]].append((t["begin"], t["blake3"]))
    return {rel: digest.tree_record(layout.sizes[rel], digest.tree_digest(header_digests[rel], [d for _, d in sorted(by_file[rel])]))
            for rel in layout.headers}


def _require_written(what: str, planned: set[str], written) -> None:
    missing = planned - set(written)
    if missing:
        raise BuildError(f"{what}: {len(missing)} planned tensors were never written (e.g. {sorted(missing)[0]}); rerun the build")


def _finish_tails(what: str, staging: Path, units: list[Unit], results: dict[str, dict], layout, tensors: dict[str, dict]):
    """The layout's tails written from the units' results into the prepared files, and their final
    headers; `tensors` gains the tails' rows. Returns the final layout and its headers' digests."""
    from loadgraph.formats.layout import finish_files

    tails = {n: bytes.fromhex(h) for u in units for n, h in results[u.id].get("tails", {}).items()}
    _require_written(what, {n for names in layout.tails.values() for n in names}, tails)
    layout, rows = finish_files(staging, layout, tails)
    tensors.update(rows)
    return layout, {rel: digest.digest_bytes(h) for rel, h in layout.headers.items()}


def assemble(desc: dict, labels: list[str], stage, ctx, units: list[Unit], results: dict[str, dict], cache: Cache, origin: dict,
             layout=None, header_digests: dict[str, str] | None = None) -> Artifact:
    """Link unit files into a staged artifact, let the stage finish it, write the manifest, publish."""
    key = desc["key"]
    staged = cache.new_tmp_dir(f"node-{key[:12]}")
    try:
        known: dict[str, tuple[int, dict]] = {}  # relpath -> (inode of the unit's file, its record)
        tensors = {n: t for u in units for n, t in results[u.id].get("tensors", {}).items()}  # unit order, not finishing order
        if layout is not None:
            if layout.tails:  # variable-length tensors, returned by the units as bytes: after the fixed ones, final headers
                layout, header_digests = _finish_tails(f"{desc['stage']} {key[:12]}", ctx.staging, units, results, layout, tensors)
            _require_written(f"{desc['stage']} {key[:12]}", set(layout.tensors), tensors)
            tensors = {n: tensors[n] for n in layout.order}  # the planned order, whatever order the units finished in
            for rel, meta in _placed_files(layout, header_digests or {}, tensors).items():
                (staged / rel).parent.mkdir(parents=True, exist_ok=True)
                _link_unit_file(ctx.staging / rel, staged / rel, meta)  # a copy where links are not supported
                known[rel] = ((staged / rel).stat().st_ino, meta)
        for unit in units:
            unit_dir = cache.unit_dir(key, unit.id)
            for rel, meta in results[unit.id].get("files", {}).items():
                (staged / rel).parent.mkdir(parents=True, exist_ok=True)
                _link_unit_file(unit_dir / rel, staged / rel, meta)
                known[rel] = ((staged / rel).stat().st_ino, meta)
        extras = stage.finalize(ctx, results, staged)
        for rel, meta in extras.pop("files", {}).items():
            known[rel] = ((staged / rel).stat().st_ino, meta)
        files = {}
        for p in sorted(staged.rglob("*")):
            if not p.is_file():
                continue
            rel = str(p.relative_to(staged))
            hit = known.get(rel)
            # A file the stage did not replace keeps the digest computed while it was written.
            files[rel] = hit[1] if hit and hit[0] == p.stat().st_ino else digest.file_record(p)[0]
        tensors = extras.pop("tensors", None) or tensors
        manifest = {
            "stage": desc["stage"],
            "stage_version": stage_version(desc["stage"]),
            "params": desc["params"],
            "inputs": desc["inputs"],
            "files": files,
            "tensors": tensors,
            "tool_versions": tool_versions(),
            "provenance": {"host": platform.node(), "pid": os.getpid(), "created": time.time(), **extras.pop("provenance", {})},
            "labels": labels,  # what it was built for, as the plan says it; `cache ls` shows it
            "built_for": origin,
            **extras,
        }
        return cache.publish(key, staged, manifest)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def _link_unit_file(src: Path, dst: Path, meta: dict) -> None:
    """A unit's file into the staged artifact: a hardlink, or a verified copy where linking is not
    permitted (another member's file in a group-shared cache, under fs.protected_hardlinks)."""
    try:
        os.link(src, dst)
    except OSError:  # EPERM, and EOPNOTSUPP/EXDEV/EMLINK on filesystems without (enough) hard links
        from loadgraph.formats.safetensors import copy_and_hash

        got = copy_and_hash(src, dst)[0]
        if got != (digest.recorded(meta) or got):
            raise BuildError(f"{src}: digest {got[:12]} != recorded {digest.recorded(meta)[:12]}; delete {src.parent} and rerun") from None


def tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("loadgraph", "torch", "transformers", "safetensors", "peft", "bitsandbytes", "ray"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out
