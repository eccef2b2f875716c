"""merge and attach: LoRA adapters applied to a base artifact, shard by shard.

merge: units are tensor groups of about 512 MB (stages/placed.py) writing into the output's final
shard files. Tensors no adapter touches are copied byte for byte (or cast); touched ones are read,
merged in fp32 with PEFT's exact arithmetic (formats/lora_merge.py) for each adapter in order
(on the GPU with merge.backend: cuda), cast once, and written. Peak memory is a few tensors plus
the adapters.
attach: no merge; the base's files plus the validated adapter directories under adapters/N/,
recorded in the manifest so the loader returns a PeftModel.
"""

from __future__ import annotations

import functools
import json
import shutil
import threading
from pathlib import Path

from loadgraph.errors import InputError
from loadgraph.formats.checkpoint import INDEX_NAME
from loadgraph.formats.layout import PlacedWriter
from loadgraph.formats.safetensors import DTYPES, FLOAT_DTYPES, TORCH_TO_ST, PlannedTensor
from loadgraph.pipeline.cache import Cache
from loadgraph.pipeline.hashing import hash_files
from loadgraph.pipeline.stage import NodeContext, Stage, Unit
from loadgraph.spec import AdapterSpec
from loadgraph.stages.derived_plans import base_headers, guess_epoch, plan_adapters, plans_fingerprint  # noqa: F401  (base_headers: for the tests)
from loadgraph.stages.export import set_config_dtype
from loadgraph.stages.fetch import open_source, runtime_for
from loadgraph.stages.inspect import link_or_copy
from loadgraph.stages.placed import output_layout, placed_result, placed_units, shard_bytes, unit_workers, write_index
from loadgraph.stages.tensor_io import PINNED, ArtifactReader, ScratchRing, grow_pinned

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def resolve_adapter(adapter: AdapterSpec, index: int, cache: Cache, allow_pickle: bool) -> tuple[dict, dict]:
    """An adapter directory or hub repo -> (fetch params keyed by content, runtime locator)."""
    what = f"adapters[{index}].path"
    # eager: an adapter is MBs and the plan's checks (patterns, shapes vs the base) read its tensors;
    # its units still download it on nodes whose hub cache lacks it.
    root, commit, repo = open_source(adapter.path, adapter.revision, what, cache.root, allow_patterns=list(ADAPTER_FILES), eager=True)
    if not (root / "adapter_config.json").is_file():
        raise InputError(f"{what}: {root} has no adapter_config.json; point at a PEFT adapter directory")
    from loadgraph.formats.checkpoint import confined

    # Like a checkpoint's files, an adapter's must not be links out of its directory.
    files = [n for n in ADAPTER_FILES if confined(root, n, what).is_file()]
    if "adapter_model.safetensors" not in files and not allow_pickle:
        raise InputError(f"{what}: {root} holds only a pickled adapter_model.bin; set source.allow_pickle: true or save it as safetensors")
    _check_config_patterns(root, files)
    digests = hash_files({n: root / n for n in files}, cache.root)
    return {"files": digests, "commit": commit, "convert_pickle": False}, runtime_for(root, repo)


def check_adapter_base(adapter_dir: Path, base_dir: Path, index: int) -> None:
    """Refuse an adapter whose config names another architecture than the base's (same shapes merge
    silently into the wrong model otherwise). PEFT records the class in `auto_mapping`."""
    from loadgraph.formats.checkpoint import load_json

    config = load_json(adapter_dir / "adapter_config.json")
    base_path = base_dir / "config.json"
    base = load_json(base_path) if base_path.is_file() else {}
    trained_class = (config.get("auto_mapping") or {}).get("base_model_class") or config.get("base_model_class")
    architectures = base.get("architectures") or []
    trained_type, base_type = config.get("model_type"), base.get("model_type")
    if (trained_class and architectures and trained_class not in architectures) or (trained_type and base_type and trained_type != base_type):
        trained = trained_class or trained_type
        raise InputError(
            f"adapters[{index}].path: {adapter_dir / 'adapter_config.json'} was trained on {trained} but the base "
            f"{base_path} is {architectures[0] if architectures else base_type} ({base_type}); use the adapter's own base model, "
            f"or set adapters[{index}].allow_other_base: true"
        )


def _check_config_patterns(root: Path, files: list[str]) -> None:
    """PEFT matches the config's regexes with `re` (no timeout): refuse one that would hang it."""
    from loadgraph.formats.checkpoint import load_json
    from loadgraph.formats.patterns import check_patterns
    from loadgraph.formats.safetensors import read_header

    config_path = root / "adapter_config.json"
    names = list(read_header(root / "adapter_model.safetensors").tensors) if "adapter_model.safetensors" in files else []
    check_patterns(config_path, load_json(config_path), names)


_ARTIFACT_PLANS: dict[tuple, list] = {}


def artifact_plans(base, adapter_dirs: list[Path], scales: list[float], allow_pickle: bool, memo_root: Path | None = None) -> list:
    """plan_adapters for a cache artifact, once per process (artifacts are immutable, so their
    paths name their content) and once per cache (stages/derived_plans.py): the plan (a
    meta-device model, PEFT's config checks) costs seconds at 7B; every merge unit, every Ray
    worker and verify's merge check reuse it."""
    key = (str(base.path), tuple(map(str, adapter_dirs)), tuple(scales), allow_pickle, guess_epoch())  # a withdrawn guess is not served
    if key not in _ARTIFACT_PLANS:
        if len(_ARTIFACT_PLANS) >= 4:
            _ARTIFACT_PLANS.pop(next(iter(_ARTIFACT_PLANS)))
        _ARTIFACT_PLANS[key] = plan_adapters(base.path, base.tensors, adapter_dirs, scales, allow_pickle, memo_root)
    return _ARTIFACT_PLANS[key]


def _lora_target(plan, name: str) -> bool:
    op = plan.ops.get(name)
    return bool(op and any(what == "weight" for what, _ in op.merges))


def nf4_roundtrip(weight):
    """The weight a QLoRA adapter was trained against: NF4-quantized then dequantized (bnb defaults;
    bitsandbytes' bytes, on the CPU in groups of blocks)."""
    import bitsandbytes.functional as bnbf
    import torch

    from loadgraph.formats import bnb_blocks

    packed, state = bnb_blocks.quantize_4bit(weight, 64, False, "nf4", torch.uint8)
    return bnbf.dequantize_4bit(packed, state).to(weight.dtype)


def cast_target(src_dtype: str, dtype: str) -> str:
    return src_dtype if dtype == "auto" or src_dtype not in FLOAT_DTYPES else TORCH_TO_ST[dtype]


def merge_device(ctx: NodeContext) -> str:
    """`merge.backend` (in the key: the GPU's products round differently from PEFT's CPU ones)."""
    return ctx.params.get("backend", "cpu")


_ADAPTER_TENSORS: dict[tuple[str, str], dict] = {}
# Units on threads of one process start together: one loads an adapter, the others wait for it
# (measured on a 7B with py-spy: 16 threads each loading the same r=16 adapter cost 17 s of thread time).
_ADAPTER_LOCK = threading.Lock()


def adapter_tensors(adapter, device: str) -> dict:
    """An adapter's tensors once per process and device (a unit reuses them for its whole group)."""
    key = (str(adapter.weights_file), device)
    with _ADAPTER_LOCK:
        return _ADAPTER_TENSORS[key] if key in _ADAPTER_TENSORS else _load_adapter(adapter, device, key)


def _load_adapter(adapter, device: str, key: tuple[str, str]) -> dict:
    if len(_ADAPTER_TENSORS) >= 8:
        _ADAPTER_TENSORS.pop(next(iter(_ADAPTER_TENSORS)))
    tensors = adapter.load_tensors()
    _ADAPTER_TENSORS[key] = {k: v.to(device) for k, v in tensors.items()} if device != "cpu" else tensors
    return _ADAPTER_TENSORS[key]


class MergeStage(Stage):
    name = "merge"
    version = 2

    def _adapter_dirs(self, ctx: NodeContext) -> list[Path]:
        return [ctx.inputs[f"adapter{i}"].path for i in range(len(ctx.params["scales"]))]

    def layout(self, ctx: NodeContext):
        tensors, dtype = ctx.input().tensors, ctx.params["dtype"]
        planned = [PlannedTensor(n, cast_target(t["dtype"], dtype), tuple(t["shape"])) for n, t in tensors.items()]
        return _layout(shard_bytes(ctx), tuple(planned))

    def units(self, ctx: NodeContext) -> list[Unit]:
        return placed_units(self.layout(ctx), gpu=merge_device(ctx) == "cuda", workers=unit_workers(ctx), tag=plans_fingerprint(self._plans(ctx))[:8])

    def _plans(self, ctx: NodeContext) -> list:
        return artifact_plans(ctx.input(), self._adapter_dirs(ctx), ctx.params["scales"], ctx.params["allow_pickle"], ctx.cache.root)

    def prepare(self, ctx: NodeContext) -> bool:
        import loadgraph.formats.lora_merge  # noqa: F401  (torch and the merge arithmetic, before the threads)

        for adapter, _ in self._plans(ctx):
            adapter_tensors(adapter, "cpu")
            if merge_device(ctx) == "cuda":
                adapter_tensors(adapter, "cuda")
        if ctx.params.get("base_roundtrip") == "nf4":
            import bitsandbytes.functional  # noqa: F401
        return True

    def run_unit(self, ctx: NodeContext, unit: Unit, out: Path) -> dict:
        import torch

        from loadgraph.formats.lora_merge import merge_shard, row_mergers

        base = ctx.input()
        layout = self.layout(ctx)
        plans = self._plans(ctx)
        names = unit.payload["tensors"]
        touched = set().union(*(plan.touched() for _, plan in plans))
        device = merge_device(ctx)
        round_delta = ctx.params.get("delta_rounding") == "twice"
        reader = ArtifactReader(base, trusted="model" in ctx.trusted)
        writer = PlacedWriter(ctx.staging, layout, ctx.progress, unit.nbytes, max_pending=ScratchRing.WRITES_PENDING)
        # Fused with quantize (pipeline/fusion.py), each output tensor is also handed to its unit.
        sink = ctx.downstream
        scratch = ScratchRing()
        rows_buf, delta_buf = ScratchRing(slots=1), ScratchRing(slots=1)  # a streamed weight's block and its float32 delta
        try:
            for name in names:
                t, p = base.tensors[name], layout.tensors[name]
                if name not in touched and p.dtype == t["dtype"]:
                    chunks = reader.chunks(name, writer.buffer())
                    if sink is None or sink.verbatim(name):
                        writer.copy(name, chunks if sink is None else sink.copy(name, chunks))
                    else:
                        tensor = reader.read(name, into=scratch.take(t["end"] - t["begin"]))
                        writer.write_tensor(name, tensor)
                        sink.take(name, tensor)
                    continue
                out_dtype = getattr(torch, DTYPES[p.dtype][1])
                merged = any(name in plan.ops for _, plan in plans)
                # The QLoRA round trip stays on the CPU (bitsandbytes' CUDA bytes differ from its CPU
                # ones), and so does DoRA (its norm reduces in another order on the GPU).
                roundtrip = ctx.params.get("base_roundtrip") == "nf4" and any(_lora_target(plan, name) for _, plan in plans)
                if merged and device == "cuda" and not roundtrip and not any(_uses_dora(plan, name) for _, plan in plans):
                    _merge_on_gpu(name, t, p.nbytes, out_dtype, plans, reader, writer, round_delta, sink)
                    continue
                mergers = None if roundtrip else row_mergers([(plan, adapter_tensors(adapter, "cpu")) for adapter, plan in plans if name in plan.ops],
                                                             name, tuple(t["shape"]), round_delta)
                if mergers:
                    # Fused, the blocks are gathered whole for the consumer, in its buffer (written synchronously).
                    dest = None if sink is None else sink.buffer(p.nbytes)[: p.nbytes].view(out_dtype).view(tuple(t["shape"]))
                    writer.copy(name, _merged_rows(reader, name, t, out_dtype, mergers, rows_buf, delta_buf, dest))
                    if sink is not None:
                        sink.take(name, dest)
                    continue
                # PEFT merges into a base already loaded in the spec's dtype: cast first. The tensor
                # is read into a reused buffer and merged there (it is the unit's own).
                tensor = reader.read(name, into=scratch.take(t["end"] - t["begin"])).to(out_dtype)
                if merged:
                    if roundtrip:
                        tensor = nf4_roundtrip(tensor)
                    for adapter, plan in plans:
                        if name in plan.ops:
                            tensor = merge_shard(plan, {name: tensor}, adapter_tensors(adapter, "cpu"), round_delta, in_place=True)[name]
                writer.write_tensor(name, tensor)
                if sink is not None:
                    sink.take(name, tensor)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        return placed_result(layout, writer, reader)

    def prospect(self, ctx: NodeContext, out: Path) -> dict:
        """The configs this node will carry, its shard files (prepared with their final headers:
        links to the staging copies) and its tensor table: the layout is planned up front."""
        copy_aux(ctx.input(), out, ctx.params["dtype"])
        layout = self.layout(ctx)
        tensors = {n: layout.tensors[n].table() for n in layout.order}
        for rel in layout.headers:
            (out / rel).symlink_to(ctx.staging / rel)
        write_index(out, {"all": {"tensors": tensors}})
        return {"tensors": tensors, "files": {rel: {"size": (out / rel).stat().st_size} for rel in ctx.input().files if (out / rel).is_file()},
                "merge_plans": plans_fingerprint(self._plans(ctx))}

    def finalize(self, ctx: NodeContext, results: dict[str, dict], out: Path) -> dict:
        copy_aux(ctx.input(), out, ctx.params["dtype"])
        write_index(out, results)
        # What the tensors were merged on, as the prospect said: a fused consumer's unit ids carry it.
        return {"merged_adapters": [str(p) for p in self._adapter_dirs(ctx)], "merge_plans": plans_fingerprint(self._plans(ctx))}


def _merge_on_gpu(name: str, t: dict, out_bytes: int, out_dtype, plans, reader: ArtifactReader, writer: PlacedWriter,
                  round_delta: bool = False, sink=None) -> None:
    """Read into pinned memory, merge on the GPU (PEFT's float32 arithmetic; cuBLAS rounds its
    products differently, hence the backend in the key), copy back into pinned memory and write
    it before the pair is handed to the next tensor."""
    from loadgraph.formats.lora_merge import merge_shard

    with PINNED.pair() as bufs:
        bufs[0] = grow_pinned(bufs[0], t["end"] - t["begin"])
        bufs[1] = grow_pinned(bufs[1], out_bytes)
        tensor = reader.read(name, into=bufs[0]).to("cuda").to(out_dtype)
        for adapter, plan in plans:
            if name in plan.ops:
                tensor = merge_shard(plan, {name: tensor}, adapter_tensors(adapter, "cuda"), round_delta)[name]
        host = bufs[1][:out_bytes].view(out_dtype).view(tensor.shape)
        host.copy_(tensor)  # synchronous: the pinned pair is reused as soon as the write is done
        writer.write_tensor(name, host)
        writer.drain()
        if sink is not None:
            sink.take(name, host)


def _merged_rows(reader: ArtifactReader, name: str, t: dict, out_dtype, mergers: list, rows_buf: ScratchRing, delta_buf: ScratchRing,
                 dest=None):
    """The merged weight's bytes, a few MB of rows at a time: read, cast to the spec's dtype (as
    PEFT loads the base), merged by each adapter in turn (each rounds to the dtype, as PEFT's
    successive merges do) and handed on, so a unit holds no tensor of model size. With `dest`
    (the whole weight's buffer, for a fused consumer) each block is merged in its rows there."""
    import torch

    from loadgraph.formats.lora_merge import row_blocks
    from loadgraph.formats.safetensors import tensor_bytes

    rows, cols = t["shape"]
    in_dtype = getattr(torch, DTYPES[t["dtype"]][1])
    row_bytes = (t["end"] - t["begin"]) // rows
    bounds = row_blocks(rows)
    sizes = [(hi - lo) * row_bytes for lo, hi in bounds]
    most = max(hi - lo for lo, hi in bounds) * cols
    buf = memoryview(rows_buf.take(max(sizes)).numpy())
    scratch = delta_buf.take(most * 4).view(torch.float32)
    for i, raw in enumerate(reader.chunks(name, buf, sizes)):  # to its end: the input's digest is checked there
        lo, hi = bounds[i]
        block = torch.frombuffer(raw, dtype=in_dtype).view(hi - lo, cols)
        block = block.to(out_dtype) if dest is None else dest[lo:hi].copy_(block)
        for merger in mergers:
            merger.merge(block, lo, hi, block, scratch)
        yield tensor_bytes(block)


def _uses_dora(plan, name: str) -> bool:
    op = plan.ops.get(name)
    return bool(op and any(target.use_dora for _, target in op.merges))


@functools.lru_cache(maxsize=8)
def _layout(shard: int, planned: tuple[PlannedTensor, ...]):
    """Once per process and output plan, so a unit does not re-plan a 70B's headers."""
    return output_layout(list(planned), shard)


def copy_aux(src, out: Path, dtype: str) -> None:
    """Everything but the weights, with config.json's dtype updated when tensors were cast."""
    for rel in src.files:
        if rel.endswith(".safetensors"):
            continue
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel == "config.json" and dtype != "auto":
            config = json.loads((src.path / rel).read_text())
            set_config_dtype(config, dtype)
            (out / rel).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        elif rel != INDEX_NAME:  # the stage writes its own index for its own files
            shutil.copyfile(src.path / rel, out / rel)


class AttachStage(Stage):
    """The base unchanged plus validated adapters under adapters/N/ (for a PeftModel at load time)."""

    name = "attach"
    version = 1

    def units(self, ctx: NodeContext) -> list[Unit]:
        return [Unit(id="validate")]

    def run_unit(self, ctx: NodeContext, unit: Unit, out: Path) -> dict:
        base = ctx.input()
        if "quantization" in base.manifest:
            # QLoRA: the adapter fits the weights before quantization (same names and config).
            base = ctx.cache.get(base.manifest["inputs"]["model"]) or base
        dirs = [ctx.inputs[f"adapter{i}"].path for i in range(len(ctx.params["scales"]))]
        # Validation only: an attached adapter must fit the base exactly as a merged one would.
        plan_adapters(base.path, base.tensors, dirs, ctx.params["scales"], ctx.params["allow_pickle"], ctx.cache.root)
        return {"validated": len(dirs)}

    def finalize(self, ctx: NodeContext, results: dict[str, dict], out: Path) -> dict:
        base = ctx.input()
        for rel in base.files:
            link_or_copy(base.path / rel, out / rel)
        files = dict(base.files)
        attached = list(base.manifest.get("adapters", []))
        for i, scale in enumerate(ctx.params["scales"]):
            art = ctx.inputs[f"adapter{i}"]
            sub = f"adapters/{len(attached)}"
            for rel, meta in art.files.items():
                link_or_copy(art.path / rel, out / sub / rel)
                files[f"{sub}/{rel}"] = meta
            attached.append({"path": sub, "scale": scale, "key": art.key})
        return {"files": files, "tensors": base.tensors, "adapters": attached}


STAGES = {"merge": MergeStage, "attach": AttachStage}
