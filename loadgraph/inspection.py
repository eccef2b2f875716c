"""`loadgraph inspect`: a header-only summary of any checkpoint directory, artifact or file."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from rich.console import Console

from loadgraph.errors import InputError
from loadgraph.formats.checkpoint import scan_checkpoint
from loadgraph.formats.safetensors import read_header
from loadgraph.render.text import human_bytes, table

# Tensors that are quantization state, not parameters of the model (bitsandbytes, FP8).
_STATE_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".SCB", ".weight_format", "_scale_inv")
_STATE_MARK = ".quant_state.bitsandbytes__"


def logical_parameters(tensors: dict[str, tuple[str, int]]) -> dict[str, int]:
    """{name: parameters it stands for}. A packed 4-bit weight (U8, two values per byte, with a
    `.quant_state.bitsandbytes__*` sibling) holds 2x its numel; quantization state holds none."""
    packed = {n.split(_STATE_MARK, 1)[0] for n in tensors if _STATE_MARK in n}
    out = {}
    for name, (dtype, numel) in tensors.items():
        if _STATE_MARK in name or name.endswith(_STATE_SUFFIXES):
            out[name] = 0
        elif name in packed and dtype == "U8":
            out[name] = 2 * numel
        else:
            out[name] = numel
    return out


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
    numels: Counter[str] = Counter()
    shards = []
    params = 0
    logical = logical_parameters({n: (e.dtype, e.numel) for h in files.values() for n, e in h.tensors.items()})
    for fname, header in files.items():
        shard_params = 0
        for name, e in header.tensors.items():
            tensors[name] = {"dtype": e.dtype, "shape": list(e.shape), "file": fname, "parameters": logical[name]}
            dtypes[e.dtype] += e.end - e.begin  # by bytes: packed formats' numel says nothing
            numels[e.dtype] += e.numel
            shard_params += logical[name]
        params += shard_params
        shards.append({"file": fname, "bytes": header.file_size, "tensors": len(header.tensors), "parameters": shard_params})
    info = {
        "path": str(path),
        "architectures": config.get("architectures"),
        "model_type": config.get("model_type"),
        "quantization": (config.get("quantization_config") or {}).get("quant_method"),
        "parameters": params,
        "bytes": sum(s["bytes"] for s in shards),
        "dtypes": dict(numels),  # stored elements per dtype
        "dtype_bytes": dict(dtypes),
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
    console.print(f"[bold]{info['path']}[/]  {info['architectures'] or info['model_type'] or 'unknown architecture'}", soft_wrap=True)
    total = sum(info["dtype_bytes"].values()) or 1
    console.print(f"{info['parameters']:,} parameters, {human_bytes(info['bytes'])} in {len(info['shards'])} shard(s); by bytes: "
                  + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in info["dtype_bytes"].items()))
    if info.get("quantization"):
        console.print(f"quantization: {info['quantization']} (parameters counted unpacked, state tensors not)")
    if info.get("loadgraph"):
        console.print(f"loadgraph artifact {info['loadgraph']['key'][:12]} (stage {info['loadgraph']['stage']})")
    shards = table("shards", "#", "file", "bytes", "tensors", "parameters")
    for col in (shards.columns[0], *shards.columns[2:]):
        col.justify = "right"
    number = {s["file"]: i for i, s in enumerate(info["shards"], start=1)}
    for s in info["shards"]:
        shards.add_row(str(number[s["file"]]), s["file"], human_bytes(s["bytes"]), str(s["tensors"]), f"{s['parameters']:,}")
    console.print(shards)
    # Tensor names wrap rather than lose their end (q_proj vs k_proj, weight vs weight.absmax);
    # the shard is its number in the table above, the one part of a shard's name that differs.
    tensors = table("tensors", "name", "dtype", "shape", "shard")
    tensors.columns[3].justify = "right"
    for name, t in list(info["tensors"].items())[:200]:
        tensors.add_row(name, t["dtype"], "x".join(map(str, t["shape"])) or "scalar", str(number.get(t["file"], t["file"])))
    console.print(tensors)
    if len(info["tensors"]) > 200:
        console.print(f"... {len(info['tensors']) - 200} more tensors (use --json for all)")
