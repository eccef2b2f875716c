"""verify: a build is accepted only if every tensor is what its transformations must have produced.

1. Per-tensor checks (verify_tensors), fanned out as work units sized by bytes like any stage, so
   verify works at any model size with memory bounded per unit: merge against a float64 LoRA
   reference (bound in ulps of the stored dtype), quantize against the format's error bound,
   export byte-identical to its input, every floating tensor finite.
2. A whole-model smoke check (verify_smoke) where the model fits: strict load, greedy generation,
   logits on fixed probes against a reference computed another way; attached adapters load into
   a PeftModel strictly and each LoRA module is checked. Skipped, with the reason in the report,
   where the model fits neither the node's GPUs nor its RAM.
The output artifact is the report (verify.json, and the manifest's `verify`); a failed check fails
the build, so nothing downstream (the export publish) happens.
"""

from __future__ import annotations

import functools
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loadgraph.errors import BuildError
from loadgraph.pipeline.stage import NodeContext, Stage, Unit

# Bytes one tensor-check unit reads (both sides): units fan out like every stage's, and their
# memory is bounded by one tensor (in float64 chunks), not by the unit or the model.
UNIT_BYTES = 512 * 2**20
GPU_THREADS = 4


class VerifyStage(Stage):
    name = "verify"
    version = 2

    def thread_safe(self, ctx: NodeContext) -> bool:
        # The quantization checks call bitsandbytes' torch.compile'd CPU ops (dynamo is not
        # thread-safe: wrong double-quant offsets seen with two units on threads).
        return not ctx.params.get("method")

    # -- units -------------------------------------------------------------------------------
    def units(self, ctx: NodeContext) -> list[Unit]:
        from loadgraph.stages import verify_tensors as vt

        p = ctx.params
        items: list[tuple[str, str, int]] = []  # (check, tensor, bytes read)
        if p["tensors"]:
            if "merged" in ctx.inputs:
                base, merged = ctx.inputs["merge_base"], ctx.inputs["merged"]
                items += [("merge", n, vt.tensor_bytes(base, n) + vt.tensor_bytes(merged, n)) for n in vt.same_tensors("merge", base, merged)]
            if "quantized" in ctx.inputs:
                source, quantized = ctx.inputs["quant_input"], ctx.inputs["quantized"]
                items += [("quantize", n, 2 * vt.tensor_bytes(source, n)) for n in vt.quantize_items(source, quantized, p["quant_settings"])]
            if "exported" in ctx.inputs:
                source, exported = ctx.inputs["export_input"], ctx.inputs["exported"]
                items += [("export", n, vt.tensor_bytes(source, n) + vt.tensor_bytes(exported, n)) for n in vt.same_tensors("export", source, exported)]
        if p["finite"] and not items:
            model = ctx.input()
            items += [("finite", n, vt.tensor_bytes(model, n)) for n in sorted(model.tensors)]
        units = _pack(items)
        if p["load"]:
            need = max([_bytes(ctx.input())] + [_bytes(ctx.inputs[k]) for k in ("merge_base", "quant_input") if k in ctx.inputs])
            units.append(Unit(id="smoke", nbytes=need, gpu=True))
        return units

    def run_unit(self, ctx: NodeContext, unit: Unit, out: Path) -> dict:
        started = time.perf_counter()
        if unit.id == "smoke":
            from loadgraph.stages.verify_smoke import run_smoke

            return {"smoke": run_smoke(ctx), "wall": time.perf_counter() - started}
        from loadgraph.stages import verify_tensors as vt

        vt.TRUSTED = frozenset(ctx.inputs[n].key for n in ctx.trusted)
        return {"tensors": _run_items(ctx, unit.payload["items"]), "bytes": unit.nbytes, "wall": time.perf_counter() - started}

    def finalize(self, ctx: NodeContext, results: dict[str, dict], out: Path) -> dict:
        report = summarize(ctx.params, results)
        # The file is the artifact (deterministic: no timings); the manifest also gets the seconds.
        (out / "verify.json").write_text(json.dumps(_without_timings(report), indent=2, sort_keys=True) + "\n")
        return {"verify": report, "verified": ctx.inputs["model"].key}


def _without_timings(doc):
    if isinstance(doc, dict):
        return {k: _without_timings(v) for k, v in doc.items() if "seconds" not in k}
    return doc


def _bytes(art) -> int:
    return sum(t["end"] - t["begin"] for t in art.tensors.values())


def _pack(items: list[tuple[str, str, int]]) -> list[Unit]:
    """Consecutive items into units of about UNIT_BYTES each; a unit is never left small (under half
    UNIT_BYTES): the executor's minimum memory request must stay within a few times its bytes."""
    units: list[Unit] = []
    batch: list[list[str]] = []
    size = 0
    for check, name, nbytes in items:
        if batch and size + nbytes > UNIT_BYTES and size >= UNIT_BYTES // 2:
            units.append(Unit(id=f"tensors-{len(units):05d}", payload={"items": batch}, nbytes=size))
            batch, size = [], 0
        batch.append([check, name])
        size += nbytes
    if batch and units and size < UNIT_BYTES // 2:
        # A small remainder joins the last unit: no unit is too small for the executor's minimum request.
        last = units.pop()
        batch, size = last.payload["items"] + batch, last.nbytes + size
    if batch:
        units.append(Unit(id=f"tensors-{len(units):05d}", payload={"items": batch}, nbytes=size))
    return units


def _run_items(ctx: NodeContext, items: list[list[str]]) -> dict:
    """Run a unit's tensor checks; return per-check aggregates (worst figures and where)."""
    from loadgraph.stages import verify_tensors as vt
    from loadgraph.stages.verify_numerics import compute_device

    device = compute_device("auto")
    p, inputs = ctx.params, ctx.inputs
    adapters = [inputs[f"adapter{i}"] for i in range(len(p.get("scales") or []))]
    scanned = "merged" in inputs or "quantized" in inputs
    # Plans first, in this thread: they import transformers, whose lazy imports race between threads.
    checks = {check for check, _ in items}
    if "merge" in checks:
        vt.merge_plans(inputs["merge_base"], adapters, p)
    if "quantize" in checks:
        vt.quant_plan(str(inputs["quant_input"].path), json.dumps(p["quant_settings"], sort_keys=True))

    def one(item: list[str]) -> dict:
        start = time.perf_counter()
        result = dispatch(*item)
        return {**result, "seconds": time.perf_counter() - start}

    def dispatch(check: str, name: str) -> dict:
        if check == "merge":
            return vt.run_merge_item(name, inputs["merge_base"], inputs["merged"], adapters, p, device)
        if check == "quantize":
            return vt.run_quantize_item(name, inputs["quant_input"], inputs["quantized"], p, device)
        if check == "export":
            return vt.run_export_item(name, inputs["export_input"], inputs["exported"], p, device, scanned)
        return vt.run_finite_item(name, ctx.input(), device)

    # On a GPU, a few tensors in flight keep the disk, the copies and the kernels busy together
    # (each thread stages through its own pinned buffer); on CPU torch already uses every core.
    results = _gpu_pool().map(one, items) if device.type == "cuda" else map(one, items)
    figures: dict[str, dict] = {}
    for done, ((check, name), result) in enumerate(zip(items, results), start=1):
        _merge(figures.setdefault(check, {}), _figures(name, result))
        ctx.progress(done / len(items))  # the live line moves while the unit runs
    return figures


@functools.lru_cache(maxsize=1)
def _gpu_pool() -> ThreadPoolExecutor:
    """One pool for the process: its threads keep their pinned staging buffers from unit to unit."""
    return ThreadPoolExecutor(GPU_THREADS, thread_name_prefix="verify-gpu")


SUMMED = ("tensors", "finite", "kept", "quantized", "identical", "blocks", "elements", "ill_conditioned", "adapted", "seconds")
WORST = ("max_ulp", "bound_ulp", "worst")  # kept with the tensor where each was reached


def _figures(name: str, result: dict) -> dict:
    """One tensor's check result as an aggregate of one (so units and the node merge alike)."""
    figures = {"tensors": 1, **{k: result[k] for k in SUMMED if k in result}}
    if result.get("exact") is False:
        figures["adapted"] = 1
    for key in WORST:
        if key in result:
            figures[key], figures[f"{key}_tensor"] = result[key], name
    return figures


def _merge(into: dict, figures: dict) -> None:
    for key in SUMMED:
        if key in figures:
            into[key] = into.get(key, 0) + figures[key]
    for key in WORST:
        if key in figures and figures[key] >= into.get(key, -1):
            into[key], into[f"{key}_tensor"] = figures[key], figures[f"{key}_tensor"]


def summarize(params: dict, results: dict[str, dict]) -> dict:
    """Per check: its aggregate figures and one line a person reads (worst figure against its bound)."""
    from loadgraph.stages.verify_tensors import QUANT_LABEL

    checks: dict[str, dict] = {}
    finite = 0
    for uid in sorted(results):
        for check, agg in results[uid].get("tensors", {}).items():
            finite += agg.get("finite", 0)
            _merge(checks.setdefault(check, {}), {k: v for k, v in agg.items() if k != "finite"})
    if "quantize" in checks:
        checks[QUANT_LABEL.get(params["method"], params["method"])] = checks.pop("quantize")
    checks.pop("finite", None)
    if params["finite"]:
        checks["finite"] = {"tensors": finite}
    if "smoke" in results:
        checks["smoke"] = {**results["smoke"]["smoke"], "seconds": results["smoke"].get("wall", 0.0)}
    seconds = {"tensor_units": sum(r.get("wall", 0.0) for uid, r in results.items() if uid != "smoke"),
               "smoke": results.get("smoke", {}).get("wall", 0.0)}
    return {"checks": checks, "seconds": seconds, "summary": [summary_line(name, fig) for name, fig in checks.items()]}


def summary_line(check: str, fig: dict) -> str:
    if check == "merge":
        ill = fig.get("ill_conditioned", 0) / max(fig.get("elements", 1), 1)
        return (f"merge: max {fig.get('max_ulp', 0)} ulp (bound {fig.get('bound_ulp', 0)}) vs float64 LoRA reference, "
                f"{fig.get('adapted', 0)} adapted tensors; {ill:.2%} of elements (W, delta cancel) within absolute bound; "
                f"{fig['tensors'] - fig.get('adapted', 0)} others bit-equal")
    if check in ("nf4", "fp4", "int8", "fp8"):
        unit = "row" if check == "int8" else "block"
        return (f"{check}: {fig.get('quantized', 0)} tensors, worst {unit} {fig.get('worst', 0.0):.2g} of bound; "
                f"{fig.get('kept', 0)} unquantized bit-equal to input")
    if check == "export":
        return f"export: {fig.get('identical', 0)} tensors byte-identical to input"
    if check == "finite":
        return f"finite: {fig['tensors']} floating tensors, no NaN/Inf"
    if check == "smoke":
        if fig.get("skipped"):
            return f"smoke: skipped ({fig['skipped']})"
        parts = [f"loaded on {fig.get('device', '?')}"]
        if "generated" in fig:
            parts.append(f"generated {len(fig['generated'])} tokens")
        if "relative_error" in fig:
            parts.append(f"logits {fig['relative_error']:.2g} vs {fig['against']} (bound {fig['tolerance']:.2g})")
        if "reference" in fig:
            parts.append(f"logits reference {fig['reference']}")
        if "attach" in fig:
            parts.append(f"{fig['attach']['modules']} LoRA modules, worst {fig['attach']['worst']:.2g} of bound")
        return "smoke: " + ", ".join(parts)
    raise BuildError(f"verify: unknown check {check!r}")


STAGES = {"verify": VerifyStage}
