"""quantize: bitsandbytes 4/8-bit or FP8, tensor by tensor, in units of about 512 MB of input.

The output is laid out in the export's shard files before any unit runs (stages/placed.py), so
the export links them: every output tensor's size follows from the plan and the weight's shape
(formats/quant_shapes.py), except bitsandbytes' JSON quant states, which are the layout's tails
(formats/layout.py): returned by the units as bytes and written after the fixed tensors by the
runner, with the header rewritten in its reserved room.

What gets quantized, cast, renamed or dropped is decided once by transformers' own code on a
meta-device model (formats/quant_plan.py), so the output tensors are those transformers writes
after `from_pretrained(..., quantization_config=...)` + `save_pretrained`. bitsandbytes gives
different bytes on CPU and CUDA, so the backend is a param (part of the key).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from loadgraph.formats.checkpoint import INDEX_NAME
from loadgraph.formats.layout import Layout, PlacedWriter, pack, plan_layout, shard_names, tensor_groups
from loadgraph.formats.safetensors import TORCH_TO_ST, PlannedTensor
from loadgraph.pipeline.stage import NodeContext, Stage, Unit
from loadgraph.spec import QuantizeSpec
from loadgraph.stages.placed import ST_METADATA, placed_result, shard_bytes, tensor_units, unit_bytes, unit_workers
from loadgraph.stages.tensor_io import ArtifactReader, ScratchRing, grow_pinned


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
    from loadgraph.formats.quant_settings import QuantSettings

    return QuantSettings(**{**params, "skip_modules": tuple(params["skip_modules"]), "fp8_block_size": tuple(params["fp8_block_size"])})


_QUANT_PLANS: dict[tuple, object] = {}


def artifact_quant_plan(artifact_dir: str, settings, key: str | None = None, memo_root: Path | None = None):
    """plan_quantization of a cache artifact, once per process (immutable: its key, else its path,
    names its content; a fused quantize plans from its input's prospect, then from the published
    input, with one plan) and once per cache (stages/derived_plans.py); every quantize unit and
    verify's quantize check reuse it."""
    from loadgraph.stages.derived_plans import guess_epoch, quant_plan

    memo = (key or artifact_dir, settings, guess_epoch())  # a withdrawn guess is not served
    if memo not in _QUANT_PLANS:
        if len(_QUANT_PLANS) >= 4:
            _QUANT_PLANS.pop(next(iter(_QUANT_PLANS)))
        _QUANT_PLANS[memo] = quant_plan(artifact_dir, settings, memo_root)
    return _QUANT_PLANS[memo]


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


def offset_threads(settings: dict, backend: str) -> dict:
    """{"offset_threads": n} for a CPU double quant (a quantize node's param, so part of its key),
    else {}. bitsandbytes' offset is a float32 mean that torch rounds by its intra-op thread count
    (formats/bnb_blocks.py): n is the count torch defaults to on the machine that plans the build,
    so the units (Ray workers at their task's CPU count included) write the bytes transformers
    writes on that machine, whatever thread count they run. Told without importing torch."""
    if backend != "cpu" or not settings["double_quant"] or settings["method"] not in ("bnb-nf4", "bnb-fp4"):
        return {}
    return {"offset_threads": torch_default_threads()}


def torch_default_threads() -> int:
    """torch's default intra-op thread count in this process, told without importing it (measured
    with torch 2.13 on the 2-core box, tests/test_bnb_blocks.py): OMP_NUM_THREADS, overridden by
    MKL_NUM_THREADS, capped at the machine's cores; else the physical cores this process may run
    on (taskset to one CPU: one thread)."""
    import os

    def physical(cpus) -> int:
        cores = set()
        for cpu in cpus:
            topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
            try:
                cores.add(((topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip()))
            except OSError:
                cores.add(("cpu", str(cpu)))  # no topology: count it as a core
        return len(cores)

    asked = 0
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value.isdigit() and int(value) > 0:
            asked = int(value)
    if asked:
        return min(asked, physical(range(os.cpu_count() or 1)))
    return max(1, physical(os.sched_getaffinity(0)))


def _st(dtype) -> str:
    return TORCH_TO_ST[str(dtype).removeprefix("torch.")]


def planned_outputs(plan, tensors: dict[str, dict]) -> tuple[list[PlannedTensor], dict[str, int]]:
    """Every output tensor in checkpoint order (a weight, then its companions as bitsandbytes
    emits them), and the variable-length ones' maximum bytes; from headers and the plan alone."""
    from loadgraph.formats.quant_shapes import quantized_outputs

    planned: list[PlannedTensor] = []
    variable: dict[str, int] = {}
    for name, t in tensors.items():
        tp = plan.tensors.get(name)
        if tp is None or tp.kind == "drop":
            continue
        shape = tuple(t["shape"])
        if tp.kind == "keep":
            planned.append(PlannedTensor(tp.rename[tp.memory_name], _st(tp.dtype), shape))
            continue
        for out in quantized_outputs(tp.memory_name, shape[::-1] if tp.transpose else shape, tp.dtype, plan.settings):
            planned.append(PlannedTensor(tp.rename[out.name], out.dtype, out.shape))
            if out.max_bytes:  # a JSON quant state: a tail of the layout
                variable[tp.rename[out.name]] = out.max_bytes
    return planned, variable


_LAYOUTS: dict[tuple, Layout] = {}


def artifact_layout(src, settings, shard: int, memo_root: Path | None = None) -> Layout:
    """Once per process and (input artifact, settings, shard size): units do not re-plan a 70B's
    headers (an artifact is immutable: its path names its content)."""
    from loadgraph.stages.derived_plans import guess_epoch

    key = (src.key, settings, shard, guess_epoch())
    if key not in _LAYOUTS:
        if len(_LAYOUTS) >= 8:
            _LAYOUTS.pop(next(iter(_LAYOUTS)))
        planned, variable = planned_outputs(artifact_quant_plan(str(src.path), settings, src.key, memo_root), src.tensors)
        groups = pack(planned, shard)  # as the export packs them: its shards are these files, linked
        _LAYOUTS[key] = plan_layout(groups, shard_names(len(groups)), ST_METADATA, variable)
    return _LAYOUTS[key]


class QuantizeStage(Stage):
    name = "quantize"
    version = 3  # 3: written at the export's final offsets (the export links the files), no part files

    def layout(self, ctx: NodeContext) -> Layout:
        return artifact_layout(ctx.input(), make_settings(ctx.params["settings"]), shard_bytes(ctx), ctx.cache.root)

    def units(self, ctx: NodeContext) -> list[Unit]:
        """Input tensor groups of about UNIT_BYTES (checkpoint order), as placed_units groups them."""
        from loadgraph.formats.quant_guess import unit_fingerprint

        tensors = ctx.input().tensors

        def nbytes(name: str) -> int:
            return tensors[name]["end"] - tensors[name]["begin"]

        groups = tensor_groups(list(tensors), nbytes, unit_bytes(), unit_workers(ctx))
        # The ids carry the plan, and a merged input's (its prospect's while fused): units quantized
        # on a guessed plan, or fed by a merge on one, never pass for another's.
        tag = unit_fingerprint(self._plan(ctx))[:8] + ctx.input().manifest.get("merge_plans", "")[:8]
        return tensor_units(self.layout(ctx), groups, nbytes, ctx.params["backend"] == "cuda", tag)

    def thread_safe(self, ctx: NodeContext) -> bool:
        # bitsandbytes' CPU double quant subtracts the absmax's mean, which torch rounds by its
        # thread count: units on threads (one torch thread each) gave other offsets than
        # transformers. Measured: two at torch's own count give its bytes, but no gain once
        # glibc reuses blocks (heap.py), so they run one at a time. (Ray: processes, torch at the
        # task's CPU count.)
        return ctx.params["backend"] != "cpu"

    def _plan(self, ctx: NodeContext):
        return artifact_quant_plan(str(ctx.input().path), make_settings(ctx.params["settings"]), ctx.input().key, ctx.cache.root)

    def prepare(self, ctx: NodeContext) -> bool:
        self._plan(ctx)  # its meta model imports transformers and bitsandbytes
        self.layout(ctx)
        return True

    def run_unit(self, ctx: NodeContext, unit: Unit, out: Path) -> dict:
        base = ctx.input()
        reader = ArtifactReader(base, trusted="model" in ctx.trusted)
        quantizer = _UnitQuantizer(ctx, unit, self._plan(ctx), self.layout(ctx))
        try:
            for name in unit.payload["tensors"]:
                t = base.tensors[name]
                if quantizer.verbatim(name):
                    # Unquantized tensors (embeddings, lm_head, norms: most of the bytes) are not held
                    # in memory: streamed into the shard.
                    quantizer.writer.copy(quantizer.out_name(name), reader.chunks(name, quantizer.writer.buffer()))
                elif not quantizer.drops(name):
                    quantizer.take(name, reader.read(name, into=quantizer.buffer(t["end"] - t["begin"])))
        except BaseException:
            quantizer.abort()
            raise
        return quantizer.finish(reader)

    def sink(self, ctx: NodeContext, units: list[Unit]) -> "FusedQuantize":
        return FusedQuantize(ctx, units, self._plan(ctx), self.layout(ctx))

    def finalize(self, ctx: NodeContext, results: dict[str, dict], out: Path) -> dict:
        plan, layout = self._plan(ctx), self.layout(ctx)
        src = ctx.input()
        files = {n: p.file for n, p in layout.tensors.items()} | {n: rel for rel, names in layout.tails.items() for n in names}
        sizes = {n: t["end"] - t["begin"] for r in results.values() for n, t in r["tensors"].items()}
        sizes |= {n: len(h) // 2 for r in results.values() for n, h in r.get("tails", {}).items()}
        if len(layout.headers) > 1:  # save_pretrained writes model.safetensors alone, without an index
            index = {"metadata": {"total_parameters": plan.total_parameters, "total_size": sum(sizes.values())},
                     "weight_map": {n: files[n] for n in sorted(files)}}
            (out / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        written = set(plan.write_configs(out))
        for rel in src.files:
            if rel.endswith(".safetensors") or rel == INDEX_NAME or rel in written:
                continue
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src.path / rel, out / rel)
        return {"quantization": plan.quant_config, "adapters": src.manifest.get("adapters", [])}


class _UnitQuantizer:
    """One unit's outputs: each input tensor quantized (or cast, renamed, dropped) as the plan
    says and written at its planned offsets; bitsandbytes' JSON quant states kept as tails."""

    def __init__(self, ctx: NodeContext, unit: Unit, plan, layout: Layout):
        self.unit, self.plan, self.layout, self.backend = unit, plan, layout, ctx.params["backend"]
        self.offset_threads = ctx.params.get("offset_threads")
        self.src = ctx.input().tensors
        # Progress counts bytes written, about half of those read for a 16-bit model quantized to 4 bits
        # (most bytes are kept embeddings); a guess is enough for a progress bar.
        self.writer = PlacedWriter(ctx.staging, layout, ctx.progress, unit.nbytes // 2, max_pending=ScratchRing.WRITES_PENDING)
        self.tails: dict[str, str] = {}  # variable-length outputs (JSON quant states): the runner places them
        self._scratch = ScratchRing()
        self._pinned = None

    def drops(self, name: str) -> bool:
        tp = self.plan.tensors.get(name)
        return tp is None or tp.kind == "drop"

    def out_name(self, name: str) -> str:
        tp = self.plan.tensors[name]
        return tp.rename[tp.memory_name]

    def verbatim(self, name: str) -> bool:
        tp = self.plan.tensors.get(name)
        return tp is not None and tp.kind == "keep" and self.layout.tensors[self.out_name(name)].dtype == self.src[name]["dtype"]

    def buffer(self, nbytes: int):
        """Where to read a tensor to quantize: pinned on CUDA (the host-to-device copy runs at full
        speed), else a reused buffer (no page faults per tensor; kept until written, should an
        output be a view of it)."""
        if self.backend == "cuda":
            self._pinned = grow_pinned(self._pinned, nbytes)
            return self._pinned
        return self._scratch.take(nbytes)

    def take(self, name: str, tensor) -> None:
        if self.drops(name):
            return
        for out_name, value in self.plan.convert(name, tensor, device=self.backend, offset_threads=self.offset_threads).items():
            if out_name in self.layout.tensors:
                self.writer.write_tensor(out_name, value)
            else:
                self.tails[out_name] = value.numpy().tobytes().hex()

    def finish(self, reader=None) -> dict:
        self.writer.close()
        result = placed_result(self.layout, self.writer, reader)
        # The tails' bytes are written by the runner, but they are this unit's output: counted here.
        return {**result, "tails": self.tails, "written": result["written"] + sum(len(h) // 2 for h in self.tails.values())}

    def abort(self) -> None:
        self.writer.abort()


class FusedQuantize:
    """Quantize units fed in memory by the merge unit that produces their tensors (a TensorSink,
    pipeline/fusion.py): nothing of the merged model is read back."""

    def __init__(self, ctx: NodeContext, units: list[Unit], plan, layout: Layout):
        self._units = [_UnitQuantizer(ctx, unit, plan, layout) for unit in units]
        self._of = {name: q for q in self._units for name in q.unit.payload["tensors"]}
        self._handed = ScratchRing(slots=1) if ctx.params["backend"] != "cuda" else None
        self._pinned = None

    def buffer(self, nbytes: int):
        """The producer builds a tensor here, then hands it over: pinned for CUDA, so nothing is copied
        on the host before its host-to-device copy."""
        if self._handed is not None:
            return self._handed.take(nbytes)
        self._pinned = grow_pinned(self._pinned, nbytes)
        return self._pinned

    def verbatim(self, name: str) -> bool:
        return self._of[name].verbatim(name)

    def copy(self, name: str, chunks):
        q = self._of[name]
        return q.writer.tee(q.out_name(name), chunks)

    def take(self, name: str, tensor) -> None:
        q = self._of[name]
        if q.drops(name):
            return
        if q.backend == "cuda" and not tensor.is_pinned():  # pageable (not built in buffer()): through it
            nbytes = tensor.numel() * tensor.element_size()
            tensor = self.buffer(nbytes)[:nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor)
        q.take(name, tensor)
        q.writer.drain()  # a kept tensor may be written from the caller's buffer, which it reuses

    def finish(self) -> dict[str, dict]:
        return {q.unit.id: q.finish() for q in self._units}

    def abort(self) -> None:
        for q in self._units:
            q.abort()


STAGES = {"quantize": QuantizeStage}
