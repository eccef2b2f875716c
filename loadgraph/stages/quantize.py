"""quantize: bitsandbytes 4/8-bit or FP8, tensor by tensor, in units of about 512 MB of input.

What gets quantized, cast, renamed or dropped is decided once by transformers' own code on a
meta-device model (formats/quant_plan.py), so the output tensors are those transformers writes
after `from_pretrained(..., quantization_config=...)` + `save_pretrained`. bitsandbytes gives
different bytes on CPU and CUDA, so the backend is a param (part of the key).
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

from loadgraph.formats.checkpoint import INDEX_NAME
from loadgraph.formats.digest import tree_record
from loadgraph.formats.layout import group_by_bytes
from loadgraph.formats.safetensors import PlannedTensor, ShardWriter, st_dtype
from loadgraph.pipeline.stage import NodeContext, Stage, Unit
from loadgraph.spec import QuantizeSpec
from loadgraph.stages.export import ST_METADATA, shard_table
from loadgraph.stages.placed import unit_bytes
from loadgraph.stages.tensor_io import ArtifactReader, grow_pinned


def settings_params(q: QuantizeSpec, dtype: str) -> dict:
    return {
        "method": q.method.lower(),
        "double_quant": q.double_quant,
        "blocksize": q.blocksize,
        "compute_dtype": q.compute_dtype or "float32",  # BitsAndBytesConfig's default
        "quant_storage": q.quant_storage,
        "skip_modules": list(q.skip_modules),
        "fp8_block_size": list(q.fp8_block_size),
        "llm_int8_threshold": q.llm_int8_threshold,
        "dtype": dtype,
    }


def make_settings(params: dict):
    from loadgraph.formats.quant_plan import QuantSettings

    return QuantSettings(**{**params, "skip_modules": tuple(params["skip_modules"]), "fp8_block_size": tuple(params["fp8_block_size"])})


@functools.lru_cache(maxsize=4)
def artifact_quant_plan(artifact_dir: str, settings):
    """plan_quantization of a cache artifact, once per process (immutable: its path names its
    content); every quantize unit and verify's quantize check reuse it."""
    from loadgraph.formats.quant_plan import plan_quantization

    return plan_quantization(artifact_dir, settings)


def resolve_backend(requested: str) -> str:
    """auto -> cuda when this process sees a GPU; units then ask the executor for one."""
    if requested != "auto":
        return requested
    import glob

    # No GPU device node (NVIDIA, or ROCm's kfd), no CUDA for torch either: answer without
    # importing torch (seconds), so that the plan shows at once.
    if not glob.glob("/dev/nvidia[0-9]*") and not glob.glob("/dev/kfd"):
        return "cpu"
    # A device node and a torch built with its GPU runtime: answered from torch's files, still
    # without importing it (a cached build must not pay for torch).
    from importlib.util import find_spec

    spec = find_spec("torch")
    if spec is None or not spec.origin:
        return "cpu"
    lib = Path(spec.origin).parent / "lib"
    return "cuda" if any(lib.glob("libtorch_cuda*.so")) or any(lib.glob("libtorch_hip*.so")) else "cpu"


class QuantizeStage(Stage):
    name = "quantize"
    version = 2

    def units(self, ctx: NodeContext) -> list[Unit]:
        """Tensor groups of about UNIT_BYTES (checkpoint order), each written as its own part file:
        bitsandbytes' quant-state tensors hold data-dependent JSON, so the final offsets are not
        known before the weights are quantized."""
        tensors = ctx.input().tensors
        groups = group_by_bytes(tensors, lambda name: tensors[name]["end"] - tensors[name]["begin"], unit_bytes())
        gpu = ctx.params["backend"] == "cuda"
        n = len(groups)
        return [Unit(id=f"part-{i:05d}", payload={"file": f"part-{i:05d}-of-{n:05d}.safetensors", "tensors": names},
                     nbytes=sum(tensors[x]["end"] - tensors[x]["begin"] for x in names), gpu=gpu)
                for i, names in enumerate(groups, start=1)]

    def thread_safe(self, ctx: NodeContext) -> bool:
        # bitsandbytes' CPU kernels are torch.compile'd, and dynamo is not thread-safe: two
        # units on threads produced wrong double-quant offsets. Processes (Ray) are fine.
        return ctx.params["backend"] != "cpu"

    def _plan(self, ctx: NodeContext):
        return artifact_quant_plan(str(ctx.input().path), make_settings(ctx.params["settings"]))

    def run_unit(self, ctx: NodeContext, unit: Unit, out: Path) -> dict:
        import torch

        base = ctx.input()
        rel = unit.payload["file"]
        plan = self._plan(ctx)
        backend = ctx.params["backend"]
        reader = ArtifactReader(base, trusted="model" in ctx.trusted)
        quantized: dict[str, torch.Tensor] = {}
        kept: dict[str, tuple[str, dict, str]] = {}  # output name -> (input name, entry, output dtype)
        staging = None
        for name in unit.payload["tensors"]:
            t = base.tensors[name]
            tp = plan.tensors.get(name)
            if tp is not None and tp.kind == "keep":
                # Unquantized tensors (embeddings, lm_head, norms: most of the bytes) are not held
                # in memory: they are streamed (or cast) into the shard at write time.
                kept[tp.rename[tp.memory_name]] = (name, t, st_dtype(torch.empty(0, dtype=tp.dtype)))
                continue
            if backend == "cuda":  # pinned staging: the host-to-device copy runs at full speed
                staging = grow_pinned(staging, t["end"] - t["begin"])
            tensor = reader.read(name, into=staging)
            quantized.update(plan.convert(name, tensor, device=backend))
        planned = [PlannedTensor(n, st_dtype(v), tuple(v.shape)) for n, v in quantized.items()]
        planned += [PlannedTensor(n, dtype, tuple(t["shape"])) for n, (_, t, dtype) in kept.items()]
        if not planned:  # every tensor of this group was dropped (e.g. a tied lm_head alone)
            return {"files": {}, "tensors": {}, "bytes": unit.nbytes}
        writer = ShardWriter(out / rel, planned, ST_METADATA, on_progress=ctx.progress)
        try:
            for p in writer.pending:
                if p.name in quantized:
                    writer.write_tensor(p.name, quantized.pop(p.name))
                    continue
                name, t, dtype = kept[p.name]
                if dtype == t["dtype"]:
                    reader.check_copied(name, writer.copy_from(p.name, base.path / t["file"], t["begin"], t["end"] - t["begin"]))
                else:
                    writer.write_tensor(p.name, plan.convert(name, reader.read(name))[p.name])
            digest = writer.close()
        except BaseException:
            writer.abort()
            raise
        size = (out / rel).stat().st_size
        return {"files": {rel: tree_record(size, digest)}, "tensors": shard_table(out / rel, rel, writer.tensor_digests), "bytes": reader.bytes_read,
                "hashed": reader.bytes_hashed}

    def finalize(self, ctx: NodeContext, results: dict[str, dict], out: Path) -> dict:
        plan = self._plan(ctx)
        src = ctx.input()
        tensors = {n: t for r in results.values() for n, t in r["tensors"].items()}
        index = {
            "metadata": {"total_parameters": plan.total_parameters, "total_size": sum(t["end"] - t["begin"] for t in tensors.values())},
            "weight_map": {n: tensors[n]["file"] for n in sorted(tensors)},
        }
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        written = set(plan.write_configs(out))
        for rel in src.files:
            if rel.endswith(".safetensors") or rel == INDEX_NAME or rel in written:
                continue
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src.path / rel, out / rel)
        return {"quantization": plan.quant_config, "adapters": src.manifest.get("adapters", [])}


STAGES = {"quantize": QuantizeStage}
