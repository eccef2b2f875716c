"""`loadgraph inspect`: a header-only summary of any checkpoint directory, artifact or file."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

from loadgraph.errors import InputError
from loadgraph.formats.checkpoint import scan_checkpoint
from loadgraph.formats.safetensors import read_header


def inspect_checkpoint(path: Path) -> dict:
    if path.is_file():
        header = read_header(path)
        files = {path.name: header}
        config: dict = {}
    else:
        ckpt = scan_checkpoint(path)
        files = ckpt.headers
        config = ckpt.config()
    tensors = {}
    dtypes: Counter[str] = Counter()
    shards = []
    params = 0
    for fname, header in files.items():
        shard_params = 0
        for name, e in header.tensors.items():
            tensors[name] = {"dtype": e.dtype, "shape": list(e.shape), "file": fname}
            dtypes[e.dtype] += e.numel
            shard_params += e.numel
        params += shard_params
        shards.append({"file": fname, "bytes": header.file_size, "tensors": len(header.tensors), "parameters": shard_params})
    info = {
        "path": str(path),
        "architectures": config.get("architectures"),
        "model_type": config.get("model_type"),
        "quantization": (config.get("quantization_config") or {}).get("quant_method"),
        "parameters": params,
        "bytes": sum(s["bytes"] for s in shards),
        "dtypes": dict(dtypes),
        "shards": shards,
        "tensors": tensors,
    }
    manifest = path / "manifest.json" if path.is_dir() else None
    if manifest and manifest.exists():
        try:
            doc = json.loads(manifest.read_text())
            info["loadgraph"] = {"key": doc.get("key"), "stage": doc.get("stage"), "inputs": doc.get("inputs")}
        except ValueError:
            raise InputError(f"{manifest}: not valid JSON") from None
    return info


def render(info: dict, console: Console) -> None:
    console.print(f"[bold]{info['path']}[/]  {info['architectures'] or info['model_type'] or 'unknown architecture'}")
    console.print(f"{info['parameters']:,} parameters, {info['bytes'] / 1e9:.3f} GB in {len(info['shards'])} shard(s); dtypes: " + ", ".join(f"{k} ({v:,})" for k, v in info["dtypes"].items()))
    if info.get("quantization"):
        console.print(f"quantization: {info['quantization']}")
    if info.get("loadgraph"):
        console.print(f"loadgraph artifact {info['loadgraph']['key'][:12]} (stage {info['loadgraph']['stage']})")
    shards = Table(title="shards")
    for col in ("file", "bytes", "tensors", "parameters"):
        shards.add_column(col)
    for s in info["shards"]:
        shards.add_row(s["file"], f"{s['bytes']:,}", str(s["tensors"]), f"{s['parameters']:,}")
    console.print(shards)
    table = Table(title="tensors")
    for col in ("name", "dtype", "shape", "file"):
        table.add_column(col)
    for name, t in list(info["tensors"].items())[:200]:
        table.add_row(name, t["dtype"], str(tuple(t["shape"])), t["file"])
    console.print(table)
    if len(info["tensors"]) > 200:
        console.print(f"... {len(info['tensors']) - 200} more tensors (use --json for all)")
