"""verify's per-tensor checks, one tensor at a time: what each transformation must have produced.

Each check compares a stored artifact with the artifact it was made from:
- merge: adapted tensors against their float64 LoRA reference (verify_merge), the rest bit-equal
  to the base (cast to the build's dtype);
- quantize: quantized tensors within their format's bound (verify_quant), the rest bit-equal to
  the input cast to the load dtype, nothing produced that transformers would not write;
- export: every tensor bit-identical to its input (or to its input cast, when export casts);
- every floating tensor read on the stored side is scanned for NaN/Inf.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import threading
from pathlib import Path

import torch

from loadgraph.errors import BuildError
from loadgraph.formats.safetensors import DTYPES, FLOAT_DTYPES
from loadgraph.pipeline.cache import Artifact
from loadgraph.stages.tensor_io import ArtifactReader, grow_pinned
from loadgraph.stages.verify_numerics import bitwise_equal

QUANT_LABEL = {"bnb-nf4": "nf4", "bnb-fp4": "fp4", "bnb-int8": "int8", "fp8": "fp8"}


def read(art: Artifact, name: str, device: torch.device | None = None) -> torch.Tensor:
    """One tensor of an artifact, on `device`: to a GPU through a pinned staging buffer (pageable
    host-to-device copies run at ~2 GB/s, pinned ones at ~50)."""
    t = art.tensors[name]
    reader = ArtifactReader(art, trusted=art.key in TRUSTED)  # checked against the manifest as it is read
    nbytes = t["end"] - t["begin"]
    if device is None or device.type != "cuda" or nbytes == 0:
        return reader.read(name)
    staged = reader.read(name, into=_pinned(nbytes))
    return staged.to(device)  # synchronous: the buffer is reused right after


# Keys of the inputs the running verify node's build produced itself (set per unit).
TRUSTED: frozenset[str] = frozenset()


_staging = threading.local()


def _pinned(nbytes: int) -> torch.Tensor:
    """This thread's pinned buffer, grown to the largest tensor read so far."""
    _staging.buf = grow_pinned(getattr(_staging, "buf", None), nbytes, least=64 * 2**20)
    return _staging.buf


def check_finite(name: str, tensor: torch.Tensor) -> int:
    if not tensor.is_floating_point() or tensor.dtype == torch.float8_e4m3fn:
        return 0
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        raise BuildError(f"verify: finite: tensor {name!r} has {int((~finite).sum())} NaN/Inf values")
    return 1


def tensor_bytes(art: Artifact, name: str) -> int:
    t = art.tensors.get(name)
    return t["end"] - t["begin"] if t else 0


# -- structure: which tensors each check covers; mismatches fail before any tensor is read ---------


def same_tensors(check: str, source: Artifact, stored: Artifact) -> list[str]:
    """Merge and export keep every tensor name of their input: the names, or a one-line failure."""
    if set(source.tensors) != set(stored.tensors):
        extra = sorted(set(stored.tensors) - set(source.tensors))
        lost = sorted(set(source.tensors) - set(stored.tensors))
        raise BuildError(f"verify: {check}: the tensors differ from the input's (unexpected {extra[:3]}, missing {lost[:3]})")
    return sorted(stored.tensors)


def quantize_items(source: Artifact, quantized: Artifact, settings: dict) -> list[str]:
    plan = quant_plan(str(source.path), json.dumps(settings, sort_keys=True))
    produced: dict[str, str] = {}
    for name, tp in plan.tensors.items():
        for out in tp.rename.values():
            produced[out] = name
        if tp.kind in ("keep", "quantize") and tp.rename[tp.memory_name] not in quantized.tensors:
            raise BuildError(f"verify: quantize: tensor {tp.rename[tp.memory_name]!r} (from {name!r}) is missing from the quantized artifact")
    unexpected = sorted(n for n in quantized.tensors if n not in produced)
    if unexpected:
        raise BuildError(f"verify: quantize: tensor {unexpected[0]!r} in the quantized artifact is not one transformers would write")
    return sorted(n for n, tp in plan.tensors.items() if tp.kind != "drop")


@functools.lru_cache(maxsize=4)
def quant_plan(base_dir: str, settings_json: str):
    """transformers' decisions for the quantize input (meta-device model): once per process."""
    from loadgraph.stages.quantize import artifact_quant_plan, make_settings

    return artifact_quant_plan(base_dir, make_settings(json.loads(settings_json)))


@functools.lru_cache(maxsize=4)
def _adapter_tensors(weights_files: tuple[str, ...]) -> list:
    from loadgraph.formats.lora import LoraAdapter

    return [LoraAdapter.load(Path(f).parent, allow_pickle=True).load_tensors() for f in weights_files]


# -- the checks ------------------------------------------------------------------------------------


def merge_plans(base: Artifact, adapters: list[Artifact], params: dict):
    """The merge stage's plans (shared, once per process) and the adapters' tensors."""
    from loadgraph.stages.adapter import artifact_plans

    pairs = artifact_plans(base, [a.path for a in adapters], list(params["scales"]), params["allow_pickle"])
    return [plan for _, plan in pairs], _adapter_tensors(tuple(str(adapter.weights_file) for adapter, _ in pairs))


def run_merge_item(name: str, base: Artifact, merged: Artifact, adapters: list[Artifact], params: dict, device) -> dict:
    from loadgraph.stages.adapter import nf4_roundtrip
    from loadgraph.stages.verify_merge import check_merged, merge_steps

    plans, tensors = merge_plans(base, adapters, params)
    stored = read(merged, name, device)
    finite = check_finite(name, stored)
    source = read(base, name, device)
    if source.is_floating_point():
        source = source.to(stored.dtype)
    steps = merge_steps(name, plans, tensors)
    if params.get("delta_rounding") == "twice":
        steps = [dataclasses.replace(s, round_delta=True) for s in steps]
    if params.get("base_roundtrip") == "nf4" and any(s.what == "weight" for s in steps):
        source = nf4_roundtrip(source)
    result = check_merged(name, stored, source, steps, device)
    return {**result, "finite": finite}


def run_quantize_item(name: str, source_art: Artifact, quantized: Artifact, params: dict, device) -> dict:
    from loadgraph.stages.verify_quant import check_4bit, check_fp8, check_int8, check_kept

    settings = params["quant_settings"]
    plan = quant_plan(str(source_art.path), json.dumps(settings, sort_keys=True))
    tp = plan.tensors[name]
    value = read(source_art, name, device).to(tp.dtype)
    out = {mem: read(quantized, disk, device) for mem, disk in tp.rename.items() if disk in quantized.tensors}
    if tp.kind != "keep" and settings["method"] in ("bnb-nf4", "bnb-fp4"):
        # 4-bit codes packed into a float storage dtype (FSDP QLoRA) are bytes, not numbers: no finiteness.
        out[tp.memory_name] = out[tp.memory_name].contiguous().view(torch.uint8)
    finite = sum(check_finite(tp.rename[mem], t) for mem, t in out.items())
    if tp.kind == "keep":
        check_kept(tp.rename[tp.memory_name], value, out[tp.memory_name])
        return {"kept": 1, "finite": finite}
    if tp.transpose:
        value = value.T
    method = settings["method"]
    weight_name = tp.rename[tp.memory_name]
    module = tp.memory_name.rsplit(".", 1)[0]
    try:
        if method in ("bnb-nf4", "bnb-fp4"):
            prefix = tp.memory_name
            stored = {mem[len(prefix) + 1:] if mem != prefix else "": t for mem, t in out.items() if mem == prefix or mem.startswith(prefix + ".")}
            result = check_4bit(weight_name, value, stored, device)
        elif method == "bnb-int8":
            result = check_int8(weight_name, value, out[tp.memory_name], out[module + ".SCB"], device)
        else:
            result = check_fp8(weight_name, value, out[tp.memory_name], out[module + ".weight_scale_inv"], tuple(settings["fp8_block_size"]), device)
    except KeyError as exc:
        raise BuildError(f"verify: quantize: tensor {weight_name!r}: companion tensor {exc} is missing") from None
    return {**result, "finite": finite, "quantized": 1}


def run_export_item(name: str, source: Artifact, exported: Artifact, params: dict, device, scanned: bool) -> dict:
    """`scanned`: another check already scanned the export's input for NaN/Inf."""
    s, e = source.tensors[name], exported.tensors[name]
    same_place = (s["begin"], s["end"]) == (e["begin"], e["end"]) and _same_file(source.path / s["file"], exported.path / e["file"])
    if same_place and scanned:
        return {"identical": 1}  # one file (a hard link): the same bytes by construction, already scanned
    stored = read(exported, name, device)
    finite = check_finite(name, stored)
    if same_place:
        return {"identical": 1, "finite": finite}
    want = read(source, name, device)
    dtype = params.get("export_dtype") or "auto"
    if dtype != "auto" and s["dtype"] in FLOAT_DTYPES:
        want = want.to(getattr(torch, dtype))
    if not bitwise_equal(stored, want):
        raise BuildError(f"verify: export: tensor {name!r} is not byte-identical to its input ({DTYPES[s['dtype']][1]} -> {DTYPES[e['dtype']][1]})")
    return {"identical": 1, "finite": finite}


def run_finite_item(name: str, art: Artifact, device) -> dict:
    return {"finite": check_finite(name, read(art, name, device))}


def _same_file(a: Path, b: Path) -> bool:
    try:
        sa, sb = a.stat(), b.stat()
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)
