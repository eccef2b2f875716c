"""`loadgraph submit | prefetch`: the commands that talk to a Ray cluster."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from loadgraph.cli_common import STARTED, CacheOpt, console, fail, out
from loadgraph.errors import InputError
from loadgraph.render.text import human_bytes, table

_commands = []


def command(fn):
    _commands.append(fn)
    return fn


def register(app: typer.Typer) -> None:
    for fn in _commands:
        app.command()(fn)


@command
def submit(
    specs: list[Path] = typer.Argument(..., help="spec files, inside the working directory that is uploaded"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray job API, e.g. http://HEAD:8265 (default $RAY_API_SERVER_ADDRESS)"),
    wait: bool = typer.Option(False, "--wait", help="stream the job's logs and exit with its result (0 succeeded, 1 failed)"),
    working_dir: Path = typer.Option(Path("."), "--working-dir", help="directory uploaded as the job's working_dir"),
    cache: Optional[str] = typer.Option(None, "--cache", help="cache root as the cluster sees it (default: the cluster's $LOADGRAPH_CACHE)"),
    env: list[str] = typer.Option([], "--env", help="KEY=VALUE for the job's environment (repeatable)"),
    submission_id: Optional[str] = typer.Option(None, "--submission-id", help="override the derived id (loadgraph-DATE-PLANDIGEST)"),
) -> None:
    """Run `loadgraph build` on a Ray cluster as a job; once per plan (content keys) per day."""
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
        fail(exc)
    if status == "UNREACHABLE":
        console.print(f"job {job.submission_id}: lost the job API at {address}; the job may still be running (run the same command to reattach)",
                      highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    console.print(f"job {job.submission_id}: {status}", highlight=False)
    if status != "SUCCEEDED":
        raise typer.Exit(1)


@command
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
    from loadgraph.render.summary import summary

    try:
        with RichReporter(console) as reporter:
            report, placed = run_prefetch(specs, cache_dir, local_dir, gpu_nodes, address, reporter)
    except Exception as exc:  # noqa: BLE001
        if json_out:
            json_out.write_text(json.dumps({"ok": False, "error": str(exc)}, indent=2))
        fail(exc)
    console.print(summary(report, wall_s=time.perf_counter() - STARTED))
    t = table("prefetch", "node", "host", "artifact", "status", "size", "s", "path")
    for r in placed:
        t.add_row(r["node_id"][:12], r["host"], r["key"][:12], r["status"], human_bytes(r["bytes"]), f"{r['seconds']:.1f}", r["path"])
    console.print(t)
    if json_out:
        json_out.write_text(json.dumps({**report.to_json(), "placed": placed}, indent=2))
