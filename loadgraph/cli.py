"""`loadgraph build | plan | inspect | cache | submit | prefetch`.

Exit codes: 0 success, 2 bad input (spec, files, arguments), 1 a build that failed.
Heavy imports (torch, ray) happen only inside commands that need them, so a fully cached
`build` answers in well under a second of Python start-up.
"""

from __future__ import annotations

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
    console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _open_cache(cache_dir: Optional[Path]):
    from loadgraph.pipeline.cache import Cache

    return Cache(cache_dir)


def _compile(specs: list[Path], cache_dir: Optional[Path]):
    from loadgraph.pipeline.graph import compile_specs
    from loadgraph.spec import load_spec_file

    cache = _open_cache(cache_dir)
    targets = [t for path in specs for t in load_spec_file(path)]
    return cache, compile_specs(targets, cache)


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
    report = None
    try:
        cache, graph = _compile(specs, cache_dir)
        from loadgraph.pipeline.runner import build as run_build

        with RichReporter(console) as reporter:
            report = run_build(graph, cache, make_executor_factory(executor), reporter, overwrite=overwrite)
    except (LoadgraphError, Exception) as exc:  # noqa: BLE001 - every failure must become an exit code
        if json_out:
            doc = report.to_json() if report else {"ok": False, "nodes": [], "targets": []}
            doc.update(ok=False, error=str(exc))
            json_out.write_text(json.dumps(doc, indent=2))
        if not isinstance(exc, LoadgraphError) and "--debug" in sys.argv:
            raise
        _fail(exc)
    console.print(summary_table(report))
    if json_out:
        json_out.write_text(json.dumps(report.to_json(), indent=2))


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

    cache = _open_cache(cache_dir)
    entries = cache.entries()
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


@cache_app.command("verify")
def cache_verify(cache_dir: Optional[Path] = CacheOpt, evict: bool = typer.Option(False, "--evict", help="remove corrupt entries")) -> None:
    """Re-hash every entry; report (and optionally evict) corrupt ones. Exit 1 if any is corrupt."""
    cache = _open_cache(cache_dir)
    bad = 0
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
    except InputError as exc:
        _fail(exc)
    result = _open_cache(cache_dir).gc(budget)
    out.print(f"evicted {len(result['evicted'])} entries, removed {result['removed_tmp']} leftovers; cache now {_human(result['size_after'])}")


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
