"""`loadgraph cache ls | verify | gc`: what is in the cache, is it intact, make room."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Optional

import typer

from loadgraph.cli_common import CacheOpt, fail, open_cache, out
from loadgraph.pipeline.cache import MANIFEST
from loadgraph.render.text import human_bytes, table

cache_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="List, verify and evict cache entries.")


def entry_labels(root: Path, key: str) -> dict:
    """{model, targets, what} from the manifest; entries built before labels were recorded have none."""
    try:
        manifest = json.loads((root / "objects" / key / MANIFEST).read_text())
    except (OSError, ValueError):
        return {"model": "", "targets": [], "what": ""}
    info = {"manifest_stage": manifest.get("stage")}  # an invalid entry's stage, for gc to name it
    origin = manifest.get("built_for") or {}
    labels = manifest.get("labels") or []
    what = sorted({label.split(": ", 1)[1] for label in labels if ": " in label})
    return {**info, "model": origin.get("model", ""), "targets": origin.get("targets", []), "what": "; ".join(what)}


def _described(root: Path, entries: list[dict]) -> list[dict]:
    out = []
    for e in entries:
        labels = entry_labels(root, e["key"])
        stage = e["stage"] or labels.pop("manifest_stage", None)
        labels.pop("manifest_stage", None)
        out.append({**e, **labels, "stage": stage})
    return out


@cache_app.command("ls")
def cache_ls(cache_dir: Optional[Path] = CacheOpt, as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """List entries: stage, model and targets they were built for, size, last use."""
    try:
        cache = open_cache(cache_dir)
        entries = _described(cache.root, cache.entries())
    except Exception as exc:  # noqa: BLE001 - a read-only or foreign cache: one line
        fail(exc)
    if as_json:
        out.print_json(json.dumps(entries))
        return
    t = table(f"cache: {cache.root}", "key", "stage", "model", "targets", "size", "last used", "flags")
    t.columns[0].no_wrap = t.columns[5].no_wrap = True
    t.columns[4].justify = "right"
    for e in sorted(entries, key=lambda e: e["last_used"]):
        used = datetime.datetime.fromtimestamp(e["last_used"]).strftime("%m-%d %H:%M")
        flags = ", ".join(f for f, on in (("pinned", e["pinned"]), ("INVALID", not e["valid"])) if on)
        t.add_row(e["key"][:12], str(e["stage"] or "?"), e["model"], ", ".join(e["targets"]), human_bytes(e["size"]), used, flags)
    out.print(t)
    out.print(f"{len(entries)} entries, {human_bytes(sum(e['size'] for e in entries))}")
    units, unit_bytes = cache.unit_dirs_size()
    if units:  # resume points of unfinished builds (and orphans, which `cache gc` removes)
        out.print(f"{units} unfinished nodes' work units, {human_bytes(unit_bytes)}")


@cache_app.command("verify")
def cache_verify(cache_dir: Optional[Path] = CacheOpt, evict: bool = typer.Option(False, "--evict", help="remove corrupt entries")) -> None:
    """Re-hash every entry; report (and optionally evict) corrupt ones. Exit 1 if any is corrupt."""
    bad = 0
    try:
        cache = open_cache(cache_dir)
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
        fail(exc)
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
        cache = open_cache(cache_dir)
        # Described before eviction: afterwards their manifests are gone.
        known = {e["key"]: e for e in _described(cache.root, cache.entries())}
        result = cache.gc(budget)
    except Exception as exc:  # noqa: BLE001 - a read-only cache, a bad size: one line
        fail(exc)
    for key in result["evicted"]:
        e = known.get(key, {"stage": "?", "model": "", "targets": [], "what": "", "size": 0, "valid": False})
        why = "" if e["valid"] else " (invalid)"
        built_for = " ".join(x for x in (e["model"], f"for {', '.join(e['targets'])}" if e["targets"] else "") if x)
        out.print(f"evicted {key[:12]} {e['stage'] or '?'}{why} {built_for} ({human_bytes(e['size'])})".replace("  ", " "), highlight=False, soft_wrap=True)
    out.print(f"evicted {len(result['evicted'])} entries, removed {result['removed_tmp']} leftovers; cache now {human_bytes(result['size_after'])}")
