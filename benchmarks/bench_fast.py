"""The fast data path's benchmark (issue 13): merge + export, merge + nf4 + export and nf4 alone,
each beside its PEFT / transformers baseline in the same run, with the build's per-stage
breakdown (seconds read / hashed / written, bytes read / hashed / written) from its JSON report,
peak RSS of every process of the build, the fully cached rebuild and `plan` (first and again).

  7B on a GPU host:  python -m benchmarks.bench_fast --shape 7b --backend cuda
  2-core CPU box:    python -m benchmarks.bench_fast            (1.2B shape, bnb on the CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.bench_merge import BASELINE as PEFT_MERGE
from benchmarks.bench_merge import MAKE_ADAPTER, PROJECTIONS
from benchmarks.compare import SHAPE
from benchmarks.measure import Measurement, make_checkpoint, measure, write_results

SHAPES = {"tiny": dict(SHAPE, hidden_size=256, num_layers=2, intermediate_size=512, vocab_size=1024, num_heads=4, num_kv_heads=2), "1b": SHAPE, "7b": dict(hidden_size=4096, num_layers=32, intermediate_size=11008, vocab_size=32000, num_heads=32, num_kv_heads=32, dtype="bfloat16")}
PEFT_MERGE_NF4 = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
base, adapter, tmp, out, device = sys.argv[1:6]
m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
PeftModel.from_pretrained(m, adapter).merge_and_unload().save_pretrained(tmp)
del m
q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
AutoModelForCausalLM.from_pretrained(tmp, quantization_config=q, device_map=device, dtype=torch.bfloat16).save_pretrained(out)
"""
TRANSFORMERS_NF4 = """
import sys, torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
base, out, device = sys.argv[1:4]
q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
AutoModelForCausalLM.from_pretrained(base, quantization_config=q, device_map=device, dtype=torch.bfloat16).save_pretrained(out)
"""
JOBS = ("merge", "merge-nf4", "nf4")


def _spec(work: Path, job: str, backend: str, verify: bool, adapter: str = "adapter") -> Path:
    lines = [f"source: {{model: {work / 'base'}}}", "dtype: bfloat16"]
    if job.startswith("merge"):
        lines.append(f"adapters: [{{path: {work / adapter}}}]")
    if job.endswith("nf4"):
        lines.append(f"quantize: {{method: bnb-nf4, double_quant: true, backend: {backend}}}")
    lines += [f"verify: {str(verify).lower()}", f"export: {{path: {work / 'lg-out'}}}"]
    spec = work / f"spec-{job}-{adapter}.yaml"
    spec.write_text("\n".join(lines) + "\n")
    return spec


def _baseline(work: Path, job: str, device: str) -> list[str]:
    py = sys.executable
    if job == "merge":
        return [py, "-c", PEFT_MERGE, str(work / "base"), str(work / "adapter"), str(work / "ref-out")]
    if job == "merge-nf4":
        return [py, "-c", PEFT_MERGE_NF4, str(work / "base"), str(work / "adapter"), str(work / "ref-tmp"), str(work / "ref-out"), device]
    return [py, "-c", TRANSFORMERS_NF4, str(work / "base"), str(work / "ref-out"), device]


def _imports_heavy(cmd: list[str]) -> list[str]:
    """Which of torch / transformers a command imports (python -X importtime)."""
    proc = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], capture_output=True, text=True)
    names = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    return sorted(n for n in ("torch", "transformers") if n in names)


def _compare(ours: Path, ref: Path) -> dict:
    """Tensor by tensor, byte for byte: loadgraph's export against the baseline's."""
    from safetensors import safe_open

    def tensors(root: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(root.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out.update({k: f for k in h.keys()})
        return out

    a, b = tensors(ours), tensors(ref)
    equal, first = 0, None
    for name in sorted(b):
        if name not in a:
            first = first or f"{name} missing"
            continue
        with safe_open(str(a[name]), "pt") as ha, safe_open(str(b[name]), "pt") as hb:
            x, y = ha.get_tensor(name), hb.get_tensor(name)
        if x.dtype == y.dtype and x.shape == y.shape and x.contiguous().view(-1).view(__import__("torch").uint8).equal(y.contiguous().view(-1).view(__import__("torch").uint8)):
            equal += 1
        else:
            first = first or name
    return {"tensors": len(b), "equal": equal, "extra": sorted(set(a) - set(b))[:5], "first_difference": first}


def _stages(report: dict) -> list[dict]:
    return [{"stage": n["stage"], "status": n["status"], "units": n["units_total"], "seconds": round(n["seconds"], 2), "read": n["bytes"],
             "written": n["bytes_written"], "hashed": n.get("bytes_hashed", 0), "timings": n.get("timings", {})}
            for n in report["nodes"] if n["status"] == "built"]


def run_job(work: Path, job: str, backend: str, verify: bool, baseline: bool) -> dict:
    device = "cuda:0" if backend == "cuda" else "cpu"
    spec = _spec(work, job, backend, verify)
    cache, report = work / f"cache-{job}", work / f"report-{job}.json"
    lg = [sys.executable, "-m", "loadgraph.cli", "build", str(spec), "--executor", "local", "--cache", str(cache), "--json", str(report)]
    for p in (work / "ref-out", work / "ref-tmp", work / "lg-out", cache):
        shutil.rmtree(p, ignore_errors=True)
    base: Measurement | None = measure(_baseline(work, job, device)) if baseline else None
    plan_cmd = [sys.executable, "-m", "loadgraph.cli", "plan", str(spec), "--cache", str(cache)]
    plan_first = measure(plan_cmd)
    plan_again = measure(plan_cmd)
    shutil.rmtree(cache, ignore_errors=True)  # the build itself is cold: it hashes the source again
    cold = measure(lg)
    built = json.loads(report.read_text())
    warm = measure(lg)
    model_bytes = sum(f.stat().st_size for f in (work / "base").glob("*.safetensors"))
    for m in (cold, warm, plan_first, plan_again) + ((base,) if base else ()):
        if m.returncode != 0:
            raise SystemExit(f"{job}: a benchmark command failed: {m}")
    stages = _stages(built)
    compared = _compare(work / "lg-out", work / "ref-out") if base else None
    for p in (work / "ref-out", work / "ref-tmp"):  # the disk holds three 7B merges next
        shutil.rmtree(p, ignore_errors=True)
    variant = unmemoised = None
    if job.startswith("merge"):
        # The adapter retrained (same config, new weights), built into the same cache: a nightly
        # re-merge. The base is cached; the plans are memoised (stages/derived_plans.py) unless the
        # memo is removed first, which is the A/B of the memo in this run.
        def retrained(adapter: str) -> Measurement:
            m = measure(lg[:4] + [str(_spec(work, job, backend, verify, adapter))] + lg[5:])
            if m.returncode != 0:
                raise SystemExit(f"{job}: the retrained-adapter build failed: {m}")
            return m

        shutil.rmtree(cache / "derived", ignore_errors=True)
        unmemoised = retrained("adapter-retrained")
        variant = retrained("adapter-retrained2")
    row = {
        "identical": compared,
        "job": job, "backend": backend, "verify": verify, "model_bytes": model_bytes,
        "baseline": base.__dict__ if base else None, "loadgraph_cold": cold.__dict__, "loadgraph_cached": warm.__dict__,
        "loadgraph_variant": variant.__dict__ if variant else None, "loadgraph_variant_unmemoised": unmemoised.__dict__ if unmemoised else None,
        "plan_first": plan_first.seconds, "plan_again": plan_again.seconds, "cached_imports": _imports_heavy(lg),
        "read_x": sum(s["read"] for s in stages) / model_bytes, "written_x": sum(s["written"] for s in stages) / model_bytes,
        "stages": stages,
    }
    shutil.rmtree(cache, ignore_errors=True)  # the next job's disk
    return row


def _table(rows: list[dict], title: str) -> str:
    lines = [title, "", "| job | baseline s | loadgraph s | ratio | baseline RSS GiB | loadgraph RSS GiB (all processes) | cached s (imports) | retrained adapter s: plans memoised / not (RSS GiB) | plan s first / again | read x | written x | tensors equal to the baseline's |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, c, w, v, u = r["baseline"], r["loadgraph_cold"], r["loadgraph_cached"], r.get("loadgraph_variant"), r.get("loadgraph_variant_unmemoised")
        retrained = f"{v['seconds']:.1f} / {u['seconds']:.1f} ({v['peak_rss_gib']:.2f})" if v and u else "-"
        ratio = f"{c['seconds'] / b['seconds']:.2f}" if b else "-"
        lines.append(f"| {r['job']} ({r['backend']}) | {b['seconds']:.1f} | {c['seconds']:.1f} | {ratio} | {b['peak_rss_gib']:.2f} | {c['peak_rss_gib']:.2f} | "
                     f"{w['seconds']:.2f} ({', '.join(r['cached_imports']) or 'no torch/transformers'}) | {retrained} | {r['plan_first']:.2f} / {r['plan_again']:.2f} | "
                     f"{r['read_x']:.2f} | {r['written_x']:.2f} | {r['identical']['equal']}/{r['identical']['tensors']} |" if b else f"| {r['job']} | - | {c['seconds']:.1f} | - | - | {c['peak_rss_gib']:.2f} | {w['seconds']:.2f} | {retrained} | "
                     f"{r['plan_first']:.2f} / {r['plan_again']:.2f} | {r['read_x']:.2f} | {r['written_x']:.2f} | - |")
    lines += ["", "Per stage (cold build; seconds summed over units: wall / read / hash of inputs / hash of outputs / write; GB read / hashed / written):", ""]
    lines += ["| job | stage | units | node s | unit wall | read s | hash s | hash-out s | write s | GB read | GB hashed | GB written |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for s in r["stages"]:
            t = s["timings"]
            lines.append(f"| {r['job']} | {s['stage']} | {s['units']} | {s['seconds']:.2f} | {t.get('wall', 0):.2f} | {t.get('read', 0):.2f} | {t.get('hash', 0):.2f} | "
                         f"{t.get('hash_out', 0):.2f} | {t.get('write', 0):.2f} | {s['read'] / 1e9:.2f} | {s['hashed'] / 1e9:.2f} | {s['written'] / 1e9:.2f} |")
    return "\n".join(lines) + "\n"


WARM_IMPORTS = "import torch, transformers, peft, safetensors; import loadgraph.cli, loadgraph.stages.adapter, loadgraph.stages.quantize\n" \
    "try:\n    import bitsandbytes\nexcept ImportError:\n    pass\n"


def _cache_bytecode(work: Path) -> str:
    """An image with PYTHONDONTWRITEBYTECODE and no .pyc files (the GPU host's) compiles torch,
    transformers and PEFT from source in every process: ~14 s of each run, baseline and ours alike,
    that no installed machine pays. Give both a bytecode cache, filled by one warm-up import."""
    if not sys.flags.dont_write_bytecode and not os.environ.get("PYTHONPYCACHEPREFIX"):
        return ""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    subprocess.run([sys.executable, "-c", WARM_IMPORTS], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return " (bytecode cached for baseline and loadgraph alike: this image sets PYTHONDONTWRITEBYTECODE)"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--backend", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--jobs", default=",".join(JOBS))
    ap.add_argument("--verify", action="store_true", help="build with verify on (the default spec's setting)")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--work", default="/tmp/loadgraph-bench-fast")
    ap.add_argument("--results", default=None)
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "base" / "config.json").exists():
        t0 = time.perf_counter()
        make_checkpoint(work / "base", **SHAPES[args.shape], max_shard_size="5GB")
        subprocess.run([sys.executable, "-c", MAKE_ADAPTER, str(work / "base"), str(work / "adapter"), "16", ",".join(PROJECTIONS)], check=True)
        print(f"made the {args.shape} fixture in {time.perf_counter() - t0:.0f} s", flush=True)
    for seed, name in ((1, "adapter-retrained"), (2, "adapter-retrained2")):
        if not (work / name / "adapter_config.json").exists():
            subprocess.run([sys.executable, "-c", MAKE_ADAPTER, str(work / "base"), str(work / name), "16", ",".join(PROJECTIONS), str(seed)], check=True)
    bytecode = _cache_bytecode(work)
    rows = []
    results = Path(args.results or f"benchmarks/results/fast-{args.shape}-{args.backend}.md")
    for job in args.jobs.split(","):
        rows.append(run_job(work, job, args.backend, args.verify, not args.no_baseline))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "stages"}), flush=True)
        size = rows[0]["model_bytes"] / 1e9
        title = (f"Fast data path, Llama-shaped bf16 {args.shape} ({size:.2f} GB), r=16 LoRA on 7 projections; {os.cpu_count()} cores, page cache warm, "
                 f"local executor, merge on the CPU (bit-identical to PEFT), bnb on {args.backend}, verify {'on' if args.verify else 'off'}, one run each{bytecode}.")
        write_results(results, _table(rows, title), rows)  # after every job: a run cut short keeps what it measured


if __name__ == "__main__":
    main(sys.argv[1:])
