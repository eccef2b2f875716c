"""What every `loadgraph` command shares: the two consoles, exit codes, the cache option."""

from __future__ import annotations

import errno
import json

import os
import sys
import time
from pathlib import Path
from typing import NoReturn, Optional

import typer
from rich.console import Console

from loadgraph.errors import InputError, LoadgraphError

# The screen (progress, summaries, errors) is stderr; stdout carries results a script may read
# (plan tables, DOT, JSON, submission ids).
console = Console(stderr=True)
out = Console()


def _process_start() -> float:
    """perf_counter() at the moment this process started (Linux), so that the wall time a
    build reports includes Python's start-up and imports; else this module's import."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
        age = uptime - ticks / os.sysconf("SC_CLK_TCK")
        return time.perf_counter() - max(0.0, age)
    except (OSError, ValueError, IndexError):
        return time.perf_counter()


STARTED = _process_start()  # the build's wall time counts from here

CacheOpt = typer.Option(None, "--cache", help="cache root (default $LOADGRAPH_CACHE or ~/.cache/loadgraph)")
VerboseOpt = typer.Option(False, "--verbose", "-v", help="show third-party warnings and progress live instead of in the log file")

# Spec arguments that are really values given to a plain flag (`--overwrite true`).
_FLAG_VALUES = {"true", "false", "yes", "no", "on", "off", "1", "0"}


def fail(exc: BaseException, log: Optional[Path] = None) -> NoReturn:
    code = exc.exit_code if isinstance(exc, LoadgraphError) else 1
    if isinstance(exc, OSError) and not isinstance(exc, LoadgraphError):
        # One line, naming the file: never a bare "[Errno 13]" without the path.
        where = f"{exc.filename}: " if exc.filename else ""
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            code = 2  # a path the user gave (cache, spec, destination) that we may not write
        exc = f"{where}{exc.strerror or exc}; check the path and its permissions"
    if log is not None and log.exists() and log.stat().st_size:
        # Before the error, so that the error stays the last line (scripts read it).
        console.print(f"third-party output: {log}", highlight=False, soft_wrap=True)
    console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def check_report_path(json_out: Optional[Path]) -> None:
    """--json must be writable before the build starts, not discovered after it."""
    if json_out is None:
        return
    parent = json_out.expanduser().absolute().parent
    if not parent.is_dir():
        fail(InputError(f"--json: directory {parent} does not exist; create it or give another report path"))
    if json_out.is_dir():
        fail(InputError(f"--json: {json_out} is a directory; give a file path for the report"))


def write_report(json_out: Path, doc: dict) -> None:
    try:
        json_out.write_text(json.dumps(doc, indent=2))
    except OSError as exc:
        fail(InputError(f"--json: cannot write {json_out} ({exc.strerror}); give a writable report path"))


def check_spec_args(specs: list[Path]) -> None:
    """`--overwrite true` makes `true` a spec path: say what happened instead of 'not found'."""
    for spec in specs:
        if str(spec).lower() in _FLAG_VALUES and not spec.exists():
            fail(InputError(f"{spec}: not a spec file; flags such as --overwrite and --verbose take no value (write --overwrite, not --overwrite {spec})"))


def open_cache(cache_dir: Optional[Path]):
    from loadgraph.pipeline.cache import Cache

    cache = Cache(cache_dir)
    cache.check()  # a remote tier that cannot be reached: one line now, not after the plan
    return cache


def cache_root(cache_dir: Optional[Path]) -> Path:
    """The (local) cache root without creating it (for the log path before anything else happens)."""
    from loadgraph.pipeline.cache import default_cache_root
    from loadgraph.pipeline.objstore import local_root

    return local_root(cache_dir or default_cache_root()).expanduser().absolute()


def debug_requested() -> bool:
    return "--debug" in sys.argv


def exit_without_teardown() -> None:
    """End a finished build now: the interpreter's teardown of torch, transformers and PEFT (their
    module graphs and atexit hooks) takes 1.2-1.8 s on 2 cores, after every byte is published and
    every lock and lease released. Threads left are idle pool workers (every unit's and job's
    result was awaited). Kept while Ray is connected: its shutdown stops the processes it started."""
    import logging

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
