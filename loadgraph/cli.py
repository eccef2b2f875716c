"""`loadgraph build | plan | inspect | cache | submit | prefetch`.

Exit codes: 0 success, 2 bad input (spec, files, arguments), 1 a build that failed.
Heavy imports (torch, ray) happen only inside commands that need them, so `build` shows its
plan within a second and a fully cached build answers in well under one.
The cache commands live in cli_cache.py, the cluster ones (submit, prefetch) in cli_cluster.py.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
from pathlib import Path
from typing import Optional

import typer

from loadgraph.cli_common import (STARTED, CacheOpt, VerboseOpt, cache_root, check_report_path, check_spec_args, console, debug_requested,
                                 exit_without_teardown, fail, open_cache, out, write_report)
from loadgraph.errors import InputError, LoadgraphError

# bitsandbytes warns on import about an optional CPU kernel download (which we never want):
# errors must stay one line.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

# rich_markup_mode=None: plain click help, where a boolean flag reads `--overwrite`, not `--overwrite <bool>`.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="LLM checkpoints as a cached build graph on Ray.")


def _local_warmup(targets: list, memo_root: Path, beside) -> list[str]:
    """When the sources start hashing: the child for the checks, if worth it, and what this process imports."""
    from functools import partial

    from loadgraph.import_warmup import import_for_checks, warmup_plan

    wanted, modules = warmup_plan(targets, memo_root)
    if wanted:
        beside.start(partial(import_for_checks, any(t.quantize for t in targets), any(t.adapters for t in targets)))
    return modules


def _compile(targets: list, cache_dir: Optional[Path], defer_checks: bool = False):
    """`targets`: the spec files' targets (spec.load_spec_files)."""
    from loadgraph.pipeline.graph import compile_specs

    cache = open_cache(cache_dir)
    return cache, compile_specs(targets, cache, defer_checks=defer_checks)


def make_executor_factory(kind: str):
    def factory():
        if kind == "local":
            from loadgraph.pipeline.executors.local import LocalExecutor

            return LocalExecutor()
        if kind == "ray":
            from loadgraph.pipeline.executors.ray import RayExecutor

            return RayExecutor()
        raise InputError(f"--executor: unknown executor {kind!r}; use ray or local")

    import os

    # What the build is waiting for while the executor starts (Ray takes 6-20 s on 2 cores).
    factory.label = "the local executor" if kind == "local" else (
        f"Ray (joining {os.environ['RAY_ADDRESS']})" if os.environ.get("RAY_ADDRESS") else "Ray (embedded local instance)")
    return factory


@app.command()
def build(
    specs: list[Path] = typer.Argument(..., help="spec files (a batch spec may hold several targets)"),
    executor: str = typer.Option("ray", "--executor", help="ray | local"),
    cache_dir: Optional[Path] = CacheOpt,
    json_out: Optional[Path] = typer.Option(None, "--json", help="write a machine-readable report here"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an export destination that is not a loadgraph export"),
    verbose: bool = VerboseOpt,
) -> None:
    """Build every target of the spec(s); only nodes whose inputs changed do work."""
    from loadgraph.progress import RichReporter
    from loadgraph.quiet import NoiseFilter, new_log_path
    from loadgraph.render.summary import summary

    check_spec_args(specs)
    if executor not in ("ray", "local"):
        fail(InputError(f"--executor: unknown executor {executor!r}; use ray or local"))
    check_report_path(json_out)
    from loadgraph.formats.digest import bytes_hashed
    from loadgraph.heap import reuse_large_blocks
    from loadgraph.import_warmup import ImportWarmup, local_weight_bytes
    from loadgraph.pipeline.check_process import ChecksBeside
    from loadgraph.pipeline.hash_process import process_hasher, worth_a_child
    from loadgraph.pipeline.hashing import hashed_by
    from loadgraph.pipeline.offload import SharedExecutor, remote_hasher
    from loadgraph.spec import load_spec_files

    log = new_log_path(cache_root(cache_dir))
    report = None
    reuse_large_blocks()  # the units' tensors reuse freed blocks (heap.py)
    noise = NoiseFilter(log, console, verbose)
    # One executor for the plan's hashing and the build; on Ray the plan hashes sources there.
    factory = SharedExecutor(make_executor_factory(executor))
    hashed = bytes_hashed()
    beside = ChecksBeside()
    try:
        with noise, RichReporter(console) as reporter:
            reporter.phase(f"planning {', '.join(map(str, specs))}")
            targets = load_spec_files(specs)
            # Locally, the checks' imports run while a child process hashes the sources (import_warmup.py);
            # a merge's or a quantization's run in another child, beside units on guessed plans (check_process.py).
            warmup = ImportWarmup(lambda: _local_warmup(targets, cache_root(cache_dir), beside) if executor == "local" else [])
            with hashed_by(remote_hasher(factory) if executor == "ray" else process_hasher(warmup.start)):
                cache, graph = _compile(targets, cache_dir, defer_checks=True)
            if graph.checks:
                if executor == "local" and worth_a_child(local_weight_bytes(targets)):
                    warmup.start()  # a built base hashed nothing big (a new adapter on it): the checks' child starts now
                if not beside.started:
                    warmup.wait()  # the checks import on this thread next: not beside a half-done import
                # Else the units start while the warm-up still imports (bitsandbytes: seconds on a GPU
                # host): a unit that needs a module mid-import waits on its import lock.
            if not graph.loads_bitsandbytes():
                from loadgraph.peft_import import without_bitsandbytes

                without_bitsandbytes()  # PEFT imported without it: seconds off a merge (peft_import.py)
            from loadgraph.pipeline.runner import build as run_build

            report = run_build(graph, cache, factory, reporter, overwrite=overwrite, beside=beside if beside.started else None)
            report.driver_bytes_hashed = bytes_hashed() - hashed  # the plan's hashing included
    except Exception as exc:  # noqa: BLE001 - every failure must become an exit code
        if json_out:
            doc = report.to_json() if report else {"ok": False, "nodes": [], "targets": []}
            doc.update(ok=False, error=str(exc))
            write_report(json_out, doc)
        if not isinstance(exc, LoadgraphError) and debug_requested():
            raise
        fail(exc, noise.log_path)
    finally:
        beside.close()
        factory.close()
    console.print(summary(report, wall_s=time.perf_counter() - STARTED))
    log = noise.log_path
    if log.exists() and log.stat().st_size:
        console.print(f"third-party output: {log}", highlight=False, soft_wrap=True)
    if json_out:
        write_report(json_out, report.to_json())
    exit_without_teardown()


@app.command()
def plan(
    specs: list[Path] = typer.Argument(..., help="spec files, as for build"),
    cache_dir: Optional[Path] = CacheOpt,
    explain: bool = typer.Option(False, "--explain", help="also show the normalized spec each target compiles from"),
    dot: bool = typer.Option(False, "--dot", help="print the DAG as Graphviz DOT instead of the table"),
    as_json: bool = typer.Option(False, "--json", help="print the plan as JSON (one record per node) instead of the table"),
    svg: Optional[Path] = typer.Option(None, "--svg", help="render the DAG to this SVG file (needs Graphviz's dot)"),
    check: bool = typer.Option(False, "--check", help="also run the checks against transformers' model (adapter targets and shapes, the quantization plan) that build runs before any work"),
    verbose: bool = VerboseOpt,
) -> None:
    """Show the DAG: each node's stage, short key, status and work, without building or starting Ray.

    The spec, the files and the adapters' configs are checked here. The checks that need
    transformers' meta-device model (seconds of imports) run with --check, and always at build,
    before any work."""
    from loadgraph.pipeline.plan import keys_to_build, plan_rows
    from loadgraph.quiet import NoiseFilter, new_log_path
    from loadgraph.render.plan import plan_record, plan_table, to_dot
    from loadgraph.spec import load_spec_files

    check_spec_args(specs)
    dot_exe = shutil.which("dot")
    if svg is not None and dot_exe is None:
        fail(InputError(f"--svg {svg}: Graphviz is not installed (no `dot` on PATH); install it (apt-get install graphviz) or use --dot > plan.dot"))
    log = new_log_path(cache_root(cache_dir), "plan")
    try:
        # The checks import transformers and bitsandbytes, which print: that goes to the log.
        with NoiseFilter(log, console, verbose):
            cache, graph = _compile(load_spec_files(specs), cache_dir, defer_checks=True)
            rows = plan_rows(graph, cache)
            to_build = keys_to_build(rows)
            if check:
                graph.run_checks(to_build)
            pending = graph.pending_checks(to_build)
    except Exception as exc:  # noqa: BLE001
        fail(exc, log)
    if pending and not (dot or as_json):
        console.print(f"not yet checked (build checks them before any work; plan --check now): {', '.join(sorted(set(pending)))}",
                      highlight=False, soft_wrap=True)
    text = to_dot(rows)
    if svg is not None:
        proc = subprocess.run([dot_exe, "-Tsvg", "-o", str(svg)], input=text, text=True, capture_output=True)
        if proc.returncode:
            fail(LoadgraphError(f"--svg {svg}: dot failed: {(proc.stderr.strip().splitlines() or ['?'])[0]}"))
        console.print(f"DAG picture: {svg}", highlight=False, soft_wrap=True)
    if dot:
        out.out(text, end="", highlight=False)
        return
    if as_json:
        out.out(json.dumps({"nodes": [plan_record(r) for r in rows], "checks_pending": sorted(set(pending)), "targets": [{"name": t.name, "key": t.final, "export": t.export_path} for t in graph.targets]}, indent=1), highlight=False)
        return
    out.print(plan_table(rows, f"plan: {', '.join(map(str, specs))}"))
    if explain:
        from loadgraph.llamafactory import explain_file

        for spec in specs:
            translation = explain_file(spec)
            if translation is not None:
                out.print(f"{spec}: LLaMA-Factory translation (build: native spec; training: applied by load(trainable=True); "
                          "trainer: left to the training loop; unused: no effect, with the reason):")
                out.print_json(json.dumps(translation.explain()))
        for target in graph.targets:
            out.print_json(json.dumps(target.spec.model_dump(mode="json")))


@app.command()
def inspect(path: Path, as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Header-only summary of a checkpoint directory or artifact (instant on any size)."""
    from loadgraph.inspection import inspect_checkpoint, render

    try:
        info = inspect_checkpoint(path)
    except Exception as exc:  # noqa: BLE001
        fail(exc)
    if as_json:
        out.print_json(json.dumps(info))
    else:
        render(info, out)


def _register_subcommands() -> None:
    from loadgraph import cli_cache, cli_cluster

    app.add_typer(cli_cache.cache_app, name="cache")
    cli_cluster.register(app)


_register_subcommands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
