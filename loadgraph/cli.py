"""`loadgraph build | plan | inspect | cache | submit | prefetch`.

Exit codes: 0 success, 2 bad input (spec, files, arguments), 1 a build that failed.
Heavy imports (torch, ray) happen only inside commands that need them, so a fully cached
`build` answers in well under a second of Python start-up.
"""

from __future__ import annotations

import errno
import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from loadgraph.errors import InputError, LoadgraphError

# bitsandbytes warns on import about an optional CPU kernel download (which we never want):
# errors must stay one line.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="LLM checkpoints as a cached build graph on Ray.")
cache_app = typer.Typer(no_args_is_help=True, help="List, verify and evict cache entries.")
app.add_typer(cache_app, name="cache")
console = Console(stderr=True)
out = Console()

CacheOpt = typer.Option(None, "--cache", help="cache root (default $LOADGRAPH_CACHE or ~/.cache/loadgraph)")


def _fail(exc: BaseException) -> None:
    code = exc.exit_code if isinstance(exc, LoadgraphError) else 1
    if isinstance(exc, OSError) and not isinstance(exc, LoadgraphError):
        # One line, naming the file: never a bare "[Errno 13]" without the path.
        where = f"{exc.filename}: " if exc.filename else ""
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            code = 2  # a path the user gave (cache, spec, destination) that we may not write
        exc = f"{where}{exc.strerror or exc}; check the path and its permissions"
    console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _check_report_path(json_out: Optional[Path]) -> None:
    """--json must be writable before the build starts, not discovered after it."""
    if json_out is None:
        return
    parent = json_out.expanduser().absolute().parent
    if not parent.is_dir():
        _fail(InputError(f"--json: directory {parent} does not exist; create it or give another report path"))
    if json_out.is_dir():
        _fail(InputError(f"--json: {json_out} is a directory; give a file path for the report"))


def _write_report(json_out: Path, doc: dict) -> None:
    try:
        json_out.write_text(json.dumps(doc, indent=2))
    except OSError as exc:
        _fail(InputError(f"--json: cannot write {json_out} ({exc.strerror}); give a writable report path"))


def _open_cache(cache_dir: Optional[Path]):
    from loadgraph.pipeline.cache import Cache

    return Cache(cache_dir)


def _compile(specs: list[Path], cache_dir: Optional[Path]):
    from loadgraph.pipeline.graph import compile_specs
    from loadgraph.spec import load_spec_files

    cache = _open_cache(cache_dir)
    return cache, compile_specs(load_spec_files(specs), cache)


def make_executor_factory(kind: str):
    def factory():
        if kind == "local":
            from loadgraph.pipeline.executors.local import LocalExecutor

            return LocalExecutor()
        if kind == "ray":
            from loadgraph.pipeline.executors.ray import RayExecutor

            return RayExecutor()
        raise InputError(f"--executor: unknown executor {kind!r}; use ray or local")

    return factory


@app.command()
def build(
    specs: list[Path] = typer.Argument(..., help="spec files (a batch spec may hold several targets)"),
    executor: str = typer.Option("ray", "--executor", help="ray | local"),
    cache_dir: Optional[Path] = CacheOpt,
    json_out: Optional[Path] = typer.Option(None, "--json", help="write a machine-readable report here"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an export destination that is not a loadgraph export"),
) -> None:
    """Build every target of the spec(s); only nodes whose inputs changed do work."""
    from loadgraph.progress import RichReporter, summary_table

    if executor not in ("ray", "local"):
        _fail(InputError(f"--executor: unknown executor {executor!r}; use ray or local"))
    _check_report_path(json_out)
    report = None
    try:
        cache, graph = _compile(specs, cache_dir)
        from loadgraph.pipeline.runner import build as run_build

        with RichReporter(console) as reporter:
            report = run_build(graph, cache, make_executor_factory(executor), reporter, overwrite=overwrite)
    except Exception as exc:  # noqa: BLE001 - every failure must become an exit code
        if json_out:
            doc = report.to_json() if report else {"ok": False, "nodes": [], "targets": []}
            doc.update(ok=False, error=str(exc))
            _write_report(json_out, doc)
        if not isinstance(exc, LoadgraphError) and "--debug" in sys.argv:
            raise
        _fail(exc)
    console.print(summary_table(report))
    if json_out:
        _write_report(json_out, report.to_json())


@app.command()
def plan(
    spec: Path,
    cache_dir: Optional[Path] = CacheOpt,
    explain: bool = typer.Option(False, "--explain", help="also show the normalized spec each target compiles from"),
) -> None:
    """Show the DAG: each node's stage, short key and status, without building or starting Ray."""
    from loadgraph.pipeline.runner import node_status

    try:
        cache, graph = _compile([spec], cache_dir)
        table = Table(title=f"plan: {spec}")
        for col in ("stage", "key", "status", "inputs", "targets"):
            table.add_column(col)
        for node in graph.nodes.values():
            status, done, total = node_status(graph, node, cache)
            if status == "partial":
                status = f"partial: {done}/{total if total is not None else '?'} units done"
            elif status == "to build" and total:
                status = f"to build ({total} units)"
            table.add_row(node.stage, node.short, status, ", ".join(k[:12] for k in node.inputs.values()), "; ".join(node.labels))
        out.print(table)
        if explain:
            from loadgraph.llamafactory import explain_file

            translation = explain_file(spec)
            if translation is not None:
                out.print("LLaMA-Factory translation (build: native spec; training: applied by load(trainable=True); "
                          "trainer: left to the training loop; unused: no effect, with the reason):")
                out.print_json(json.dumps(translation.explain()))
            for target in graph.targets:
                out.print_json(json.dumps(target.spec.model_dump(mode="json")))
    except Exception as exc:  # noqa: BLE001
        _fail(exc)


@app.command()
def inspect(path: Path, as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Header-only summary of a checkpoint directory or artifact (instant on any size)."""
    from loadgraph.inspection import inspect_checkpoint, render

    try:
        info = inspect_checkpoint(path)
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
    if as_json:
        out.print_json(json.dumps(info))
    else:
        render(info, out)


@cache_app.command("ls")
def cache_ls(cache_dir: Optional[Path] = CacheOpt, as_json: bool = typer.Option(False, "--json")) -> None:
    """List entries with sizes and last use."""
    import datetime

    try:
        cache = _open_cache(cache_dir)
        entries = cache.entries()
    except Exception as exc:  # noqa: BLE001 - a read-only or foreign cache: one line
        _fail(exc)
    if as_json:
        out.print_json(json.dumps(entries))
        return
    table = Table(title=f"cache: {cache.root}")
    for col in ("key", "stage", "size", "last used", "pinned", "valid"):
        table.add_column(col)
    for e in entries:
        used = datetime.datetime.fromtimestamp(e["last_used"]).strftime("%Y-%m-%d %H:%M")
        table.add_row(e["key"][:12], str(e["stage"]), _human(e["size"]), used, "yes" if e["pinned"] else "", "yes" if e["valid"] else "NO")
    out.print(table)
    out.print(f"{len(entries)} entries, {_human(sum(e['size'] for e in entries))}")
    units, unit_bytes = cache.unit_dirs_size()
    if units:  # resume points of unfinished builds (and orphans, which `cache gc` removes)
        out.print(f"{units} unfinished nodes' work units, {_human(unit_bytes)}")


@cache_app.command("verify")
def cache_verify(cache_dir: Optional[Path] = CacheOpt, evict: bool = typer.Option(False, "--evict", help="remove corrupt entries")) -> None:
    """Re-hash every entry; report (and optionally evict) corrupt ones. Exit 1 if any is corrupt."""
    bad = 0
    try:
        cache = _open_cache(cache_dir)
        for e in cache.entries():
            problems = cache.verify(e["key"])
            if problems:
                bad += 1
                for p in problems:
                    out.print(f"[red]corrupt[/] {p}")
                if evict:
                    cache.evict(e["key"])
            else:
                out.print(f"ok {e['key'][:12]} {e['stage']}")
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
    if bad:
        raise typer.Exit(1)


@cache_app.command("gc")
def cache_gc(
    cache_dir: Optional[Path] = CacheOpt,
    max_size: str = typer.Option("100GB", "--max-size", help="size budget to evict down to"),
) -> None:
    """Evict unpinned entries least-recently-used first down to --max-size; drop crash leftovers."""
    from loadgraph.formats.checkpoint import parse_size

    try:
        budget = parse_size(max_size, "--max-size")
        result = _open_cache(cache_dir).gc(budget)
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
    out.print(f"evicted {len(result['evicted'])} entries, removed {result['removed_tmp']} leftovers; cache now {_human(result['size_after'])}")


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


@app.command()
def submit(
    specs: list[Path] = typer.Argument(..., help="spec files, inside the working directory that is uploaded"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray job API, e.g. http://HEAD:8265 (default $RAY_API_SERVER_ADDRESS)"),
    wait: bool = typer.Option(False, "--wait", help="stream the job's logs and exit with its result (0 succeeded, 1 failed)"),
    working_dir: Path = typer.Option(Path("."), "--working-dir", help="directory uploaded as the job's working_dir"),
    cache: Optional[str] = typer.Option(None, "--cache", help="cache root as the cluster sees it (default: the cluster's $LOADGRAPH_CACHE)"),
    env: list[str] = typer.Option([], "--env", help="KEY=VALUE for the job's environment (repeatable)"),
    submission_id: Optional[str] = typer.Option(None, "--submission-id", help="override the derived id (loadgraph-DATE-SPECDIGEST)"),
) -> None:
    """Run `loadgraph build` on a Ray cluster as a job; once per spec content per day."""
    from loadgraph import submit as sub

    try:
        address = address or sub.default_address()
        if not address:
            raise InputError("--address: give the Ray job API address (http://HEAD:8265) or set RAY_API_SERVER_ADDRESS")
        job = sub.submit(specs, address, working_dir=working_dir, cache=cache, env=sub.parse_env(env), submission_id=submission_id)
        verb = f"attached to {job.status.lower()} job" if job.attached else "submitted"
        console.print(f"{verb} {job.submission_id}: {job.entrypoint}", highlight=False, soft_wrap=True)
        out.print(job.submission_id, highlight=False)
        if not wait:
            return
        status = sub.follow(address, job.submission_id, lambda chunk: console.out(chunk, end="", highlight=False))
    except KeyboardInterrupt:
        console.print("stopped following; the job keeps running (run the same command to reattach)")
        raise typer.Exit(130)
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
    console.print(f"job {job.submission_id}: {status}", highlight=False)
    if status != "SUCCEEDED":
        raise typer.Exit(1)


@app.command()
def prefetch(
    specs: list[Path] = typer.Argument(..., help="spec files whose targets to place on the nodes"),
    cache_dir: Optional[Path] = CacheOpt,
    local_dir: Optional[str] = typer.Option(None, "--local-dir", help="node-local directory; {node} expands to the node id (default $LOADGRAPH_LOCAL_DIR or /tmp/loadgraph-local)"),
    gpu_nodes: bool = typer.Option(False, "--gpu-nodes", help="only nodes that have GPUs"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to join (default $RAY_ADDRESS, else an embedded local Ray)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the build report and one record per node and artifact here"),
) -> None:
    """Build if needed, then copy each target's artifact to every node's local disk (once per node)."""
    from loadgraph.prefetch import prefetch as run_prefetch
    from loadgraph.progress import RichReporter

    try:
        with RichReporter(console) as reporter:
            report, placed = run_prefetch(specs, cache_dir, local_dir, gpu_nodes, address, reporter)
    except Exception as exc:  # noqa: BLE001
        if json_out:
            json_out.write_text(json.dumps({"ok": False, "error": str(exc)}, indent=2))
        _fail(exc)
    table = Table(title="prefetch")
    for col in ("node", "host", "artifact", "status", "size", "seconds", "path"):
        table.add_column(col)
    for r in placed:
        table.add_row(r["node_id"][:12], r["host"], r["key"][:12], r["status"], _human(r["bytes"]), f"{r['seconds']:.1f}", r["path"])
    console.print(table)
    if json_out:
        json_out.write_text(json.dumps({**report.to_json(), "placed": placed}, indent=2))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
