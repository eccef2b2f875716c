"""export: re-shard into files of at most `max_shard_size`, cast if asked, write the index.

When the input already has the export's layout (the stage before it wrote its files for this
export, stages/placed.py), its files are linked. Otherwise units are tensor groups of about
512 MB writing into the final shard files; tensors that keep their dtype are copied byte for
byte through a fixed buffer (no torch, no mmap): peak memory is the buffer, not the model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from loadgraph.formats.checkpoint import INDEX_NAME, TOKENIZER_FILES
from loadgraph.formats.layout import Layout, PlacedWriter
from loadgraph.formats.safetensors import DTYPES, FLOAT_DTYPES, TORCH_TO_ST, PlannedTensor, read_header
from loadgraph.pipeline.stage import NodeContext, Stage, Unit
from loadgraph.stages.inspect import link_or_copy
from loadgraph.stages.placed import ST_METADATA, output_layout, placed_result, placed_units, write_index  # noqa: F401 - ST_METADATA: public here too
from loadgraph.stages.tensor_io import ArtifactReader

def out_dtype(src_dtype: str, target: str) -> str:
    """Only floating tensors follow the requested dtype; integer/quantized data never does."""
    if target == "auto" or src_dtype not in FLOAT_DTYPES:
        return src_dtype
    return TORCH_TO_ST[target]


def shard_table(path: Path, rel: str, digests: dict[str, str] | None = None) -> dict[str, dict]:
    header = read_header(path)
    table = {n: {"dtype": e.dtype, "shape": list(e.shape), "file": rel, "begin": e.begin, "end": e.end} for n, e in header.tensors.items()}
    for name, d in (digests or {}).items():
        table[name]["blake3"] = d
    return table


def _linkable(layout: Layout, tensors: dict[str, dict]) -> dict[str, str] | None:
    """output file -> input file when every output shard is exactly one input file, uncast (then
    the export links them: cache entries are immutable); None when anything must be rewritten."""
    by_file: dict[str, set[str]] = {}
    for name, t in tensors.items():
        by_file.setdefault(t["file"], set()).add(name)
    wanted: dict[str, set[str]] = {}
    for name, p in layout.tensors.items():
        if p.dtype != tensors[name]["dtype"]:
            return None
        wanted.setdefault(p.file, set()).add(name)
    links = {}
    for rel, names in wanted.items():
        src = tensors[next(iter(names))]["file"]
        if by_file[src] != names:
            return None
        links[rel] = src
    return links


class ExportStage(Stage):
    name = "export"
    version = 3  # 3: byte-sized units at final offsets; one shard is model.safetensors without an index

    def _layout(self, ctx: NodeContext) -> Layout:
        tensors, dtype = ctx.input().tensors, ctx.params["dtype"]
        planned = [PlannedTensor(n, out_dtype(t["dtype"], dtype), tuple(t["shape"])) for n, t in tensors.items()]
        return output_layout(planned, ctx.params["max_shard_size"])

    def layout(self, ctx: NodeContext) -> Layout | None:
        layout = self._layout(ctx)
        return None if _linkable(layout, ctx.input().tensors) is not None else layout

    def units(self, ctx: NodeContext) -> list[Unit]:
        layout = self._layout(ctx)
        links = _linkable(layout, ctx.input().tensors)
        if links is None:
            return placed_units(layout)
        return [Unit(id=f"link-{i:05d}", payload={"file": rel, "source": src}) for i, (rel, src) in enumerate(sorted(links.items()), start=1)]

    def run_unit(self, ctx: NodeContext, unit: Unit, out: Path) -> dict:
        src = ctx.input()
        if "source" in unit.payload:
            rel, whole = unit.payload["file"], unit.payload["source"]
            # A link passes the input's bytes on unread, and the runner trusts what it publishes: an
            # input this build did not write is checked first (a flipped byte that kept size and mtime
            # would otherwise be exported under the input's digest).
            checker = ArtifactReader(src, trusted="model" in ctx.trusted)
            checker.check_file(whole)
            linked = link_or_copy(src.path / whole, out / rel)
            meta = src.files[whole]
            # A link to a user's source file stays marked so that nobody chmods or exports that inode.
            shared = {"shared": True} if linked and meta.get("shared") else {}
            record = {k: v for k, v in meta.items() if k not in ("shared", "mtime_ns")}
            digests = {n: t["blake3"] for n, t in src.tensors.items() if t["file"] == whole and "blake3" in t}
            return {"files": {rel: {**record, **shared}}, "tensors": shard_table(out / rel, rel, digests), "bytes": checker.bytes_hashed,
                    "hashed": checker.bytes_hashed, "written": 0 if linked else meta["size"]}
        layout = self._layout(ctx)
        reader = ArtifactReader(src, trusted="model" in ctx.trusted)
        writer = PlacedWriter(ctx.staging, layout, ctx.progress, unit.nbytes)
        try:
            for name in unit.payload["tensors"]:
                p = layout.tensors[name]
                if p.dtype == src.tensors[name]["dtype"]:
                    writer.copy(name, reader.chunks(name, writer.buffer()))
                else:
                    import torch

                    writer.write_tensor(name, reader.read(name).to(getattr(torch, DTYPES[p.dtype][1])))
            writer.close()
        except BaseException:
            writer.abort()
            raise
        return placed_result(layout, writer, reader)

    def finalize(self, ctx: NodeContext, results: dict[str, dict], out: Path) -> dict:
        src = ctx.input()
        write_index(out, results)
        for rel in src.files:
            if rel.startswith("adapters/"):  # attached adapters travel whole
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src.path / rel, out / rel)
                continue
            if rel.endswith(".safetensors") or rel == INDEX_NAME:
                continue
            if rel in TOKENIZER_FILES and not ctx.params["copy_tokenizer"]:
                continue
            if rel == "config.json" and (ctx.params["dtype"] != "auto" or ctx.params.get("config_patch")):
                config = json.loads((src.path / rel).read_text())
                changed = patch_config(config, ctx.params.get("config_patch") or {})
                if ctx.params["dtype"] != "auto":
                    set_config_dtype(config, ctx.params["dtype"])
                if changed or ctx.params["dtype"] != "auto":  # else the input's bytes, as they were
                    (out / rel).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
                else:
                    shutil.copyfile(src.path / rel, out / rel)
            else:
                shutil.copyfile(src.path / rel, out / rel)
        if ctx.params.get("template"):
            from loadgraph.stages.export_chat import apply_template

            apply_template(out, ctx.params["template"], ctx.params.get("trust_remote_code", False))
        return {key: src.manifest[key] for key in ("adapters", "quantization") if key in src.manifest}


def patch_config(config: dict, patch: dict) -> bool:
    """LLaMA-Factory's load-time config patches (see ExportSpec.use_cache); True if anything changed."""
    before = json.dumps(config, sort_keys=True)
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else None
    if patch.get("use_cache") is not None:
        config["use_cache"] = patch["use_cache"]
        if text is not None:
            text["use_cache"] = patch["use_cache"]
    if patch.get("top_level_hidden_size") and text is not None and not config.get("hidden_size") and "hidden_size" in text:
        config["hidden_size"] = text["hidden_size"]
    return json.dumps(config, sort_keys=True) != before


def set_config_dtype(config: dict, dtype: str) -> None:
    """transformers 5 records `dtype` (older files `torch_dtype`), also in nested sub-configs."""
    config.pop("torch_dtype", None)
    config["dtype"] = dtype
    for value in config.values():
        if isinstance(value, dict) and ("model_type" in value or "torch_dtype" in value or "dtype" in value):
            set_config_dtype(value, dtype)


STAGES = {"export": ExportStage}
