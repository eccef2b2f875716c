"""export: re-shard into files of at most `max_shard_size`, cast if asked, write the index.

One unit per output shard. Tensors that keep their dtype are copied byte for byte through
a fixed buffer (no torch, no mmap): peak memory is the buffer, not the model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from loadgraph.formats.checkpoint import INDEX_NAME, TOKENIZER_FILES
from loadgraph.formats.safetensors import DTYPES, FLOAT_DTYPES, TORCH_TO_ST, PlannedTensor, ShardWriter, read_header, read_tensor
from loadgraph.formats.safetensors import TensorEntry
from loadgraph.pipeline.stage import NodeContext, Stage, Unit
from loadgraph.stages.inspect import link_or_copy

SHARD_NAME = "model-{i:05d}-of-{n:05d}.safetensors"
SINGLE_NAME = "model.safetensors"  # save_pretrained's name for one shard, written without an index
ST_METADATA = {"format": "pt"}  # what transformers writes; loaders check it


def out_dtype(src_dtype: str, target: str) -> str:
    """Only floating tensors follow the requested dtype; integer/quantized data never does."""
    if target == "auto" or src_dtype not in FLOAT_DTYPES:
        return src_dtype
    return TORCH_TO_ST[target]


def plan_shards(tensors: dict[str, dict], max_bytes: int, dtype: str) -> list[list[dict]]:
    """Greedy packing in checkpoint order, as huggingface_hub's splitter does."""
    shards: list[list[dict]] = [[]]
    size = 0
    for name, t in tensors.items():
        planned = {"name": name, "dtype": out_dtype(t["dtype"], dtype), **{k: t[k] for k in ("shape", "file", "begin", "end")}, "src_dtype": t["dtype"]}
        nbytes = PlannedTensor(name, planned["dtype"], tuple(t["shape"])).nbytes
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(planned)
        size += nbytes
    return shards


def write_shard(dest: Path, entries: list[dict], source_root: Path, on_progress=None) -> tuple[str, int]:
    """Write one shard from its planned entries; returns (sha256, bytes read)."""
    writer = ShardWriter(dest, [PlannedTensor(e["name"], e["dtype"], tuple(e["shape"])) for e in entries], ST_METADATA, on_progress=on_progress)
    by_name = {e["name"]: e for e in entries}
    read = 0
    try:
        for planned in writer.order:
            e = by_name[planned.name]
            src = source_root / e["file"]
            if e["dtype"] == e["src_dtype"]:
                writer.copy_from(e["name"], src, e["begin"], e["end"] - e["begin"])
            else:
                import torch

                entry = TensorEntry(e["src_dtype"], tuple(e["shape"]), e["begin"], e["end"])
                tensor = read_tensor(src, entry).to(getattr(torch, DTYPES[e["dtype"]][1]))
                writer.write_tensor(e["name"], tensor)
            read += e["end"] - e["begin"]
        return writer.close(), read
    except BaseException:
        writer.abort()
        raise


def _whole_input_file(entries: list[dict], input_tensors: dict[str, dict]) -> str | None:
    files = {e["file"] for e in entries}
    if len(files) != 1 or any(e["dtype"] != e["src_dtype"] for e in entries):
        return None
    (only,) = files
    names = {n for n, t in input_tensors.items() if t["file"] == only}
    return only if names == {e["name"] for e in entries} else None


def shard_table(path: Path, rel: str) -> dict[str, dict]:
    header = read_header(path)
    return {n: {"dtype": e.dtype, "shape": list(e.shape), "file": rel, "begin": e.begin, "end": e.end} for n, e in header.tensors.items()}


class ExportStage(Stage):
    name = "export"
    version = 2  # 2: one shard is model.safetensors without an index, as save_pretrained writes it

    def units(self, ctx: NodeContext) -> list[Unit]:
        shards = plan_shards(ctx.input().tensors, ctx.params["max_shard_size"], ctx.params["dtype"])
        n = len(shards)
        return [
            Unit(id=f"shard-{i:05d}", payload={"file": SINGLE_NAME if n == 1 else SHARD_NAME.format(i=i, n=n), "tensors": entries},
                 nbytes=sum(e["end"] - e["begin"] for e in entries))
            for i, entries in enumerate(shards, start=1)
        ]

    def run_unit(self, ctx: NodeContext, unit: Unit, out: Path) -> dict:
        rel = unit.payload["file"]
        src = ctx.input()
        whole = _whole_input_file(unit.payload["tensors"], src.tensors)
        if whole is not None:
            # The shard is exactly one input file, uncast: link it (cache entries are immutable).
            linked = link_or_copy(src.path / whole, out / rel)
            meta = src.files[whole]
            # A link to a user's source file stays marked so that nobody chmods or exports that inode.
            shared = {"shared": True} if linked and meta.get("shared") else {}
            return {"files": {rel: {"size": meta["size"], "sha256": meta["sha256"], **shared}}, "tensors": shard_table(out / rel, rel), "bytes": 0}
        digest, read = write_shard(out / rel, unit.payload["tensors"], src.path, ctx.progress)
        return {"files": {rel: {"size": (out / rel).stat().st_size, "sha256": digest}}, "tensors": shard_table(out / rel, rel), "bytes": read}

    def finalize(self, ctx: NodeContext, results: dict[str, dict], out: Path) -> dict:
        src = ctx.input()
        tensors = {n: t for r in results.values() for n, t in r["tensors"].items()}
        total = sum(t["end"] - t["begin"] for t in tensors.values())
        if len(results) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": {n: tensors[n]["file"] for n in sorted(tensors)}}
            (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        for rel in src.files:
            if rel.startswith("adapters/"):  # attached adapters travel whole
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src.path / rel, out / rel)
                continue
            if rel.endswith(".safetensors") or rel == INDEX_NAME:
                continue
            if rel in TOKENIZER_FILES and not ctx.params["copy_tokenizer"]:
                continue
            if rel == "config.json" and ctx.params["dtype"] != "auto":
                config = json.loads((src.path / rel).read_text())
                set_config_dtype(config, ctx.params["dtype"])
                (out / rel).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            else:
                shutil.copyfile(src.path / rel, out / rel)
        if ctx.params.get("template"):
            from loadgraph.stages.export_chat import apply_template

            apply_template(out, ctx.params["template"], ctx.params.get("trust_remote_code", False))
        return {key: src.manifest[key] for key in ("adapters", "quantization") if key in src.manifest}


def set_config_dtype(config: dict, dtype: str) -> None:
    """transformers 5 records `dtype` (older files `torch_dtype`), also in nested sub-configs."""
    config.pop("torch_dtype", None)
    config["dtype"] = dtype
    for value in config.values():
        if isinstance(value, dict) and ("model_type" in value or "torch_dtype" in value or "dtype" in value):
            set_config_dtype(value, dtype)


STAGES = {"export": ExportStage}
