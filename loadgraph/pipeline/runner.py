"""Runs a compiled graph: cached nodes are skipped, the rest run unit by unit through an executor.

A node is built under its key's lock (two builders compute it once), from its finished
units (a killed build resumes), and published atomically with its manifest last. Assembling and
publishing it is a job (pipeline/assemble.py): on a worker under Ray, so this process handles
manifests and unit records only; with the object-store tier it plans the node there too, and
checks and exports targets through jobs, holding no entry's files itself.
"""

from __future__ import annotations

import errno
import os
import resource
import time
from contextlib import ExitStack
from pathlib import Path

from loadgraph import faults
from loadgraph.errors import BuildError, CorruptInput, InputError, disk_full_message
from loadgraph.formats import digest
from loadgraph.pipeline.cache import Artifact, Cache
from loadgraph.pipeline.check_process import ChecksBeside
from loadgraph.pipeline.executors.base import Executor
from loadgraph.pipeline.fusion import consumers_to_fuse, plan_fused
from loadgraph.pipeline.graph import Graph, Node
from loadgraph.pipeline.assemble import assemble_job, check_job, near_driver, plan_job
from loadgraph.pipeline.integrity import Verifier, damaged_files, file_matches
from loadgraph.pipeline.leases import BuildLease, claim_exports
from loadgraph.pipeline.offload import run_jobs
from loadgraph.pipeline.plan import NOT_NEEDED, PlanRow, cached_keys, keys_to_build, needed_keys, node_status, plan_rows  # noqa: F401 - node_status, PlanRow: public here too
from loadgraph.pipeline.publish import check_destination, is_remote, publish_export
from loadgraph.pipeline.report import BuildReport, NodeReport, NullReporter, Reporter  # noqa: F401 - public here too
from loadgraph.pipeline.schedule import SerialReporter, run_when_ready
from loadgraph.pipeline.stage import Unit, get_stage
from loadgraph.pipeline.units import node_context, unit_dict


def input_dirs(graph: Graph) -> list[str]:
    """Every directory the build reads from outside the cache (sources, adapters, towers)."""
    return sorted({n.runtime["path"] for n in graph.nodes.values() if n.stage == "fetch" and n.runtime.get("path")})


def local_exports(graph: Graph) -> dict[str, str]:
    """Local export path -> final key; one path named for two different artifacts is refused."""
    exports: dict[str, str] = {}
    for target in graph.targets:
        if target.export_path and not is_remote(target.export_path):
            dest = str(Path(target.export_path).expanduser().absolute())
            if exports.setdefault(dest, target.final) != target.final:
                raise InputError(f"export.path: {dest} is the destination of two targets with different products; give each its own path")
    return exports


def preflight(graph: Graph, cache: Cache, overwrite: bool) -> None:
    inputs = input_dirs(graph)
    local_exports(graph)
    for target in graph.targets:
        if target.export_path:
            check_destination(target.export_path, cache, overwrite, inputs)


MAX_CORRUPT_RESTARTS = 3


def _evict(cache: Cache, key: str) -> None:
    try:
        cache.evict(key)
    except FileNotFoundError:
        pass  # a concurrent builder evicted it first
    except OSError as exc:  # a read-only cache: report, never use
        raise BuildError(f"{cache.object_dir(key)}: damaged, and the cache cannot be repaired here ({os.strerror(exc.errno or 0)}); "
                         "run `loadgraph cache verify --evict` where the cache is writable") from None


def build(graph: Graph, cache: Cache, executor_factory, reporter: Reporter | None = None, overwrite: bool = False,
          beside: ChecksBeside | None = None) -> BuildReport:
    """Build every target. `executor_factory` is called only if some node needs building,
    so a fully cached build never starts Ray. An input found corrupt is evicted and the
    graph walked again, so the entry is rebuilt from its own (verified) inputs. `beside`: the
    checks run in that child while guessed nodes build (pipeline/check_process.py)."""
    reporter = reporter or NullReporter()
    start = time.perf_counter()
    hashed_before = digest.bytes_hashed()
    rows = plan_rows(graph, cache)
    reporter.planned(rows)
    preflight(graph, cache, overwrite)
    if graph.checks:  # deferred by compile_specs(defer_checks=True) so the plan shows first
        reporter.phase("checking adapters and quantization against the checkpoint headers")
        if beside is None:
            graph.run_checks(keys_to_build(rows))
        else:
            beside.begin(graph, keys_to_build(rows))
    holder: list[Executor] = []
    corrupt = 0
    verifier = Verifier(cache.root)
    # The lease keeps gc off this build's entries and tells Ray workers the driver lives; the
    # export claims keep a rival build of another artifact from replacing our exports meanwhile.
    with BuildLease(cache.root, list(graph.nodes)) as lease, claim_exports(cache.root, local_exports(graph)):
        try:
            for attempt in range(MAX_CORRUPT_RESTARTS + 1):
                report = BuildReport()
                try:
                    _build_graph(graph, cache, executor_factory, reporter, report, holder, verifier, lease, beside)
                    break
                except CorruptInput as exc:
                    if attempt == MAX_CORRUPT_RESTARTS:
                        raise BuildError(f"{exc}; still corrupt after {attempt} rebuilds: check the disk and the source files") from None
                    corrupt += 1
        finally:
            verifier.save()
            if holder:
                holder[0].close()
    if beside is not None and beside.started:
        report.checks = {"beside": True, "overruled": beside.overruled}
    report.seconds = time.perf_counter() - start
    report.corrupt_rebuilt = corrupt
    report.driver_bytes_hashed = digest.bytes_hashed() - hashed_before
    report.driver_peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return report


def _build_graph(graph: Graph, cache: Cache, executor_factory, reporter: Reporter, report: BuildReport, holder: list,
                 verifier: Verifier, lease: BuildLease, beside: ChecksBeside | None = None) -> None:
    def executor() -> Executor:
        if not holder:
            reporter.phase(f"starting {getattr(executor_factory, 'label', 'the executor')}")
            holder.append(executor_factory())
        report.executor = holder[0].name
        return holder[0]

    def jobs(fn, items: list, near_driver: bool = True) -> list:  # the driver's heavy chores, on the executor
        return run_jobs(executor(), fn, items, near_driver)

    if holder:
        report.executor = holder[0].name
    cached = cached_keys(graph, cache)
    needed = needed_keys(graph, cached)
    reports: dict[str, NodeReport] = {}
    todo: list[Node] = []
    for node in graph.nodes.values():
        art = cache.lookup(node.key) if node.key in cached else None
        if art is None and node.key in needed:
            todo.append(node)
            continue
        if art is not None:
            try:
                cache.touch(node.key)
            except OSError:
                pass  # a read-only cache serves its entries without recording their use
        reports[node.key] = NodeReport(node.key, node.stage, node.labels, "cached" if art is not None else NOT_NEEDED)
        reporter.node_finished(node, reports[node.key])
    if todo:
        runner = executor()
        concurrency = getattr(runner, "node_concurrency", 1)
        shown = SerialReporter(reporter) if concurrency > 1 else reporter
        built: set[str] = set()  # nodes this build produced: their digests were computed as they were written
        # A node on a guessed plan feeds its consumer too: the consumer's unit ids carry the
        # producer's plan, so those fed by an overruled guess are never taken for the rebuild's.
        fuse = consumers_to_fuse(graph, todo, cache)
        fed: dict[str, list[str]] = {}  # consumer key -> its units the producer's units ran (fusion)

        def build_one(node: Node) -> NodeReport:
            nr = _build_node(node, cache, runner, shown, verifier, lease, built_for(graph, node), frozenset(built),
                             consumer=fuse.get(node.key), fed=fed, beside=beside)
            built.add(node.key)
            return nr

        try:
            reports.update(run_when_ready(todo, build_one, concurrency, getattr(runner, "abort", lambda: None)))
        finally:
            getattr(runner, "resume", lambda: None)()  # a restart after a corrupt input runs again
    for node in graph.nodes.values():
        nr = reports[node.key]
        nr.inputs = list(node.inputs.values())
        final = cache.lookup(node.key)  # its manifest: a tier's driver downloads no entry
        if final is not None:
            nr.details = {k: v for k, v in final.manifest.items() if k in ("verify", "quantization")}
        report.nodes.append(nr)
    for target in graph.targets:
        entry: dict = {"name": target.name, "key": target.final, "path": str(cache.object_dir(target.final))}
        final = cache.lookup(target.final)
        if final is None:  # damaged since it was built or found: walk the graph again
            raise CorruptInput(f"{cache.object_dir(target.final)}: damaged after it was built", target.final)
        # What is exported or loaded is checked whole (digest, memoised by ctime): a flip that
        # keeps size and mtime passes get()'s stat but must never leave the cache.
        damaged = _damaged(cache, verifier, final, jobs)
        if damaged:
            for key in [final.key, *_sharing_inputs(cache, final, damaged)]:
                _evict(cache, key)
            raise CorruptInput(f"{final.path / damaged[0]}: digest differs from the manifest; cache entry {final.key[:12]} evicted", final.key)
        if target.export_path:
            entry["export"] = target.export_path
            entry["export_status"] = publish_export(final, target.export_path, cache, verifier, holder[0] if holder else None, jobs)
            entry["holds"] = artifact_contents(final)
        report.targets.append(entry)


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _sharing_inputs(cache: Cache, art: Artifact, damaged: list[str]) -> list[str]:
    """The input entries, up the graph, whose files are the damaged files' own inodes (a stage that
    links its input's files, as the export does): they hold the same flipped bytes and are rebuilt too."""
    inodes = {ino for rel in damaged if (ino := _inode(art.path / rel))}
    found, todo, seen = [], list(art.manifest.get("inputs", {}).values()), set()
    while todo:
        key = todo.pop()
        entry = None if key in seen else cache.lookup(key)
        seen.add(key)
        if entry is None or not any(_inode(entry.path / rel) in inodes for rel in entry.files if rel.endswith(".safetensors")):
            continue
        found.append(key)
        todo += list(entry.manifest.get("inputs", {}).values())
    return found


def _damaged(cache: Cache, verifier: Verifier, art: Artifact, jobs) -> list[str]:
    """A target's files whose bytes differ from its manifest. A tier's entry this process has no
    copy of is checked by a job, on a node that has (or downloads, verified) its files."""
    if not cache.node_local or cache.is_here(art.key):
        return damaged_files(verifier, art.path, art.files, lambda items: jobs(file_matches, items))
    done = jobs(check_job, [(cache.location, art.key)], False)[0]
    verifier.adopt(done["verified"])
    return done["damaged"]


def artifact_contents(art: Artifact) -> dict:
    """What an export holds, from its manifest: shards, bytes, dtypes by bytes, quantization."""
    shards = [m for rel, m in art.files.items() if rel.endswith(".safetensors") and "/" not in rel]
    dtypes: dict[str, int] = {}
    for t in art.tensors.values():
        dtypes[t["dtype"]] = dtypes.get(t["dtype"], 0) + t.get("end", 0) - t.get("begin", 0)
    quant = art.manifest.get("quantization") or {}
    method = quant.get("quant_method")
    if method == "bitsandbytes":
        method = "bnb-" + (quant.get("bnb_4bit_quant_type", "nf4") if quant.get("load_in_4bit") else "int8")
    return {"shards": len(shards), "bytes": sum(m["size"] for m in shards), "dtypes": dict(sorted(dtypes.items(), key=lambda kv: -kv[1])),
            "quantization": method, "adapters": len(art.manifest.get("adapters", []))}


def built_for(graph: Graph, node: Node) -> dict:
    """The model and targets a node was built for, recorded in its manifest for `cache ls`:
    the source model is the one its chain of "model" inputs starts from (the fetch label names it)."""
    current = node
    while current.stage != "fetch" and "model" in current.inputs and current.inputs["model"] in graph.nodes:
        current = graph.nodes[current.inputs["model"]]
    model = next((label.split(": fetch ", 1)[1] for label in current.labels if ": fetch " in label), "")
    return {"model": model, "targets": sorted({label.split(":", 1)[0] for label in node.labels})}


def _build_node(node: Node, cache: Cache, executor: Executor, reporter: Reporter, verifier: Verifier, lease: BuildLease,
                origin: dict | None = None, built: set[str] | frozenset = frozenset(), consumer: Node | None = None,
                fed: dict[str, list[str]] | None = None, beside: ChecksBeside | None = None) -> NodeReport:
    """Build one node; with a `consumer`, its units also run that node's units (pipeline/fusion.py),
    whose ids are recorded in `fed` under the consumer's key for its own build to count as fresh.
    A node on a guessed plan is published once `beside` confirms it, else built again on the checks'."""
    t0, began = time.perf_counter(), time.time()
    fed = {} if fed is None else fed
    with cache.lock(node.key), ExitStack() as consumer_lock:
        if cache.lookup(node.key) is not None:  # another builder finished it while we waited for the lock
            return NodeReport(node.key, node.stage, node.labels, "cached")
        desc = {**node.describe(), "lease": str(lease.path) if lease.path else None,
                "trusted": sorted(name for name, key in node.inputs.items() if key in built)}

        def on_result(unit: Unit, result: dict) -> None:
            results[unit.id] = result
            reporter.unit_finished(node, unit, result)
            faults.unit_finished()
            if beside is not None:
                beside.raise_if_refused()

        def on_progress(unit: Unit, fraction: float) -> None:
            reporter.unit_progress(node, unit, fraction)

        try:
            while True:
                units = _plan_node(cache, executor, desc)
                results: dict[str, dict] = {}
                for unit in units:
                    done = cache.unit_record(node.key, unit.id)
                    if done is not None:
                        results[unit.id] = {**done, "reused": unit.id not in fed.get(node.key, ())}
                if consumer is not None:
                    units, fed[consumer.key] = plan_fused(cache, desc, units, set(results), consumer,
                                                          lambda theirs: _plan_node(cache, executor, theirs), consumer_lock, executor.name == "local")
                reporter.node_started(node, units, len(results))
                todo = [u for u in units if u.id not in results]
                if todo:
                    executor.run_units(cache.location, desc, todo, on_result, on_progress)
                if beside is None or beside.confirm(node.key):
                    break  # else built on a guess the checks overruled: planned again, on theirs
            # Localizing, linking (or copying), finishing and publishing read and write every byte
            # of the node: a job on a worker under Ray, while this process keeps the lock.
            job = {"location": cache.location, "desc": desc, "labels": node.labels, "units": [unit_dict(u) for u in units],
                   "results": results, "origin": origin or {}}
            done = run_jobs(executor, assemble_job, [job], near_driver(desc, cache))[0]
        except CorruptInput as exc:
            _evict(cache, exc.key)
            raise
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise BuildError(disk_full_message(cache.root, f"{node.stage} {node.short}")) from None
            raise
        verifier.adopt(done["verified"])  # hashed as written there: not hashed again here
        getattr(cache, "verified_etags", {}).update(done["etags"])  # what an s3:// export may copy server-side
    fresh = [r for r in results.values() if not r.get("reused")]
    nr = NodeReport(
        node.key,
        node.stage,
        node.labels,
        "built",
        units_total=len(units),
        units_reused=len(results) - len(fresh),
        seconds=time.perf_counter() - t0,
        bytes=sum(r.get("bytes", 0) for r in results.values()),
        bytes_written=sum(r.get("written", sum(m.get("size", 0) for m in r.get("files", {}).values())) for r in fresh),
        bytes_hashed=sum(r.get("hashed", 0) for r in fresh),
        timings=_sum_timings(fresh),
        units=[{"id": u.id, "reused": bool(results[u.id].get("reused")), "ran_on": results[u.id].get("ran_on")} for u in units],
        started=began,
        ended=time.time(),
    )
    reporter.node_finished(node, nr)
    return nr


def _plan_node(cache: Cache, executor: Executor, desc: dict) -> list[Unit]:
    """The node's units; sets desc's threads_ok and, for a stage with a layout, its staging files.
    A cache whose every node has its own copy (the tier) plans in a job, where the inputs are: the
    driver downloads none of them, and each node prepares its own staging files."""
    workers = getattr(executor, "unit_workers", None)
    if workers:  # the units are sized by it (stages/placed.py): not in the key, which names content
        desc["runtime"] = {**desc["runtime"], "unit_workers": workers}
    if cache.node_local:
        plan = run_jobs(executor, plan_job, [(cache.location, desc)], near_driver(desc, cache))[0]
        desc["threads_ok"] = plan["threads_ok"]
        if plan["staged"]:
            desc["staging"] = str(cache.unit_dir(desc["key"], "files"))  # not created here: each node's own
        return [Unit(**u) for u in plan["units"]]
    stage = get_stage(desc["stage"])
    ctx = node_context(cache, desc)
    desc["threads_ok"] = stage.thread_safe(ctx)
    layout = stage.layout(ctx)
    if layout is not None:
        from loadgraph.formats.layout import prepare_files

        ctx.staging = cache.unit_dir(desc["key"], "files")  # one shared copy the units write into
        prepare_files(ctx.staging, layout)
        desc["staging"] = str(ctx.staging)
    return stage.units(ctx)


def _sum_timings(results: list[dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in results:
        for what, seconds in {"wall": r.get("wall", 0.0), **r.get("timings", {})}.items():
            out[what] = round(out.get(what, 0.0) + seconds, 3)
    return out
