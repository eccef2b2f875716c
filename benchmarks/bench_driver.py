"""What the driver itself does in a Ray build: bytes it hashes and read, and its peak RSS, on a
3-node local cluster (clusters/local/cluster.py: a head and two workers, 1 CPU each).

    python -m benchmarks.bench_driver [--code DIR]   # --code: another checkout, e.g. the code before

A Llama-shaped bf16 checkpoint of a few hundred MB with a LoRA adapter, merged and exported by
`loadgraph build --executor ray` joining the cluster (RAY_ADDRESS), in four runs:
  cold        fresh cache: the plan hashes the source and adapter, every node is built;
  touched     the source files' mtimes changed (same bytes): the plan must hash them again, every node is cached;
  other-fs    cached, exported to a directory on another filesystem (/dev/shm): the export copies;
  cached      everything cached and exported: the steady state.
The driver is the `loadgraph` process (it joins the cluster and starts no Ray processes itself).
Its RSS and read bytes (/proc/PID/io rchar) are sampled with psutil every 20 ms; bytes hashed
are the JSON report's `driver_bytes_hashed` (absent before that field existed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.bench_merge import MAKE_ADAPTER, PROJECTIONS
from benchmarks.measure import make_checkpoint, write_results

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=1024, num_layers=8, intermediate_size=4096, vocab_size=32000, num_heads=16, num_kv_heads=4, dtype="bfloat16")


def driver_run(cmd: list[str], env: dict, period: float = 0.02) -> dict:
    """Run the driver; sample its own RSS and rchar until it exits."""
    import psutil

    t0 = time.perf_counter()
    # cwd: `python -m` puts the working directory first on sys.path, before PYTHONPATH.
    proc = subprocess.Popen(cmd, env=env, cwd=env["PYTHONPATH"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak, rchar = [0], [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                peak[0] = max(peak[0], ps.memory_info().rss)
                rchar[0] = ps.io_counters().read_chars
            except psutil.Error:
                pass
            done.wait(period)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{err[-3000:]}")
    return {"wall_s": round(time.perf_counter() - t0, 2), "driver_peak_rss": peak[0], "driver_read_bytes": rchar[0]}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/lg-bench-driver")
    ap.add_argument("--code", default=str(ROOT), help="the loadgraph checkout to measure (PYTHONPATH)")
    ap.add_argument("--label", default="this branch")
    ap.add_argument("--results", default="benchmarks/results/driver.md")
    args = ap.parse_args(argv)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    make_checkpoint(work / "base", **SHAPE, max_shard_size="100MB")
    subprocess.run([sys.executable, "-c", MAKE_ADAPTER, str(work / "base"), str(work / "adapter"), "16", ",".join(PROJECTIONS)], check=True)
    model_bytes = sum(p.stat().st_size for p in (work / "base").iterdir())
    shm = Path(f"/dev/shm/lg-bench-driver-{os.getpid()}")
    env = {**os.environ, "PYTHONPATH": args.code, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "LOADGRAPH_UNIT_BYTES": str(64 * 2**20)}
    cluster = [sys.executable, str(ROOT / "clusters" / "local" / "cluster.py")]
    state_dir = Path(f"/tmp/lgbd-{os.getpid()}")
    up = subprocess.run([*cluster, "up", "--dir", str(state_dir), "--workers", "2", "--cpus-per-node", "1", "--object-store-mb", "100"],
                        capture_output=True, text=True, env=env, timeout=300)
    rows: list[dict] = []
    try:
        if up.returncode:
            raise SystemExit(f"cluster up failed:\n{up.stderr[-3000:]}")
        env["RAY_ADDRESS"] = json.loads((state_dir / "cluster.json").read_text())["address"]

        def build(name: str, out: Path) -> None:
            spec = work / f"{name}.yaml"
            spec.write_text(f"source: {{model: {work / 'base'}}}\ndtype: bfloat16\nadapters: [{{path: {work / 'adapter'}}}]\n"
                            f"verify: false\nexport: {{path: {out}, max_shard_size: 100MB}}\n")
            report = work / f"{name}.json"
            cmd = [sys.executable, "-m", "loadgraph.cli", "build", str(spec), "--executor", "ray", "--cache", str(work / "cache"), "--json", str(report)]
            m = driver_run(cmd, env)
            doc = json.loads(report.read_text())
            units_hashed = sum(n.get("bytes_hashed", 0) for n in doc["nodes"])
            rows.append({"run": name, "model_bytes": model_bytes, "driver_bytes_hashed": doc.get("driver_bytes_hashed"), "units_bytes_hashed": units_hashed,
                         **m, "built": sum(n["status"] == "built" for n in doc["nodes"]), "nodes": len(doc["nodes"]),
                         "export": [t.get("export_status") for t in doc["targets"]]})
            print(json.dumps(rows[-1]), flush=True)

        build("cold", work / "out")
        for p in (work / "base").iterdir():
            os.utime(p)  # same bytes, new mtime: the plan's stat memo misses
        build("touched", work / "out")
        build("other-fs", shm / "out")
        build("cached", work / "out")
    finally:
        subprocess.run([*cluster, "down", "--dir", str(state_dir)], capture_output=True, timeout=120)
        shutil.rmtree(state_dir, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    _write_table(Path(args.results), rows, args.label)
    shutil.rmtree(work, ignore_errors=True)
    return rows


def _write_table(path: Path, rows: list[dict], label: str) -> None:
    mib = 2**20
    lines = [f"Driver of `loadgraph build --executor ray` on a 3-node local cluster (head + 2 workers, 1 CPU each), "
             f"Llama-shaped bf16 model {rows[0]['model_bytes'] / mib:.0f} MiB + LoRA r=16 merge + export; code: {label}.", "",
             "| run | built/nodes | driver hashed MiB | % of model | driver read MiB | driver peak RSS MiB | units hashed MiB | wall s | export |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        hashed = r["driver_bytes_hashed"]
        share = "-" if hashed is None else f"{100 * hashed / r['model_bytes']:.2f}"
        lines.append(f"| {r['run']} | {r['built']}/{r['nodes']} | {'-' if hashed is None else f'{hashed / mib:.1f}'} | {share} | "
                     f"{r['driver_read_bytes'] / mib:.1f} | "
                     f"{r['driver_peak_rss'] / mib:.0f} | {r['units_bytes_hashed'] / mib:.1f} | {r['wall_s']:.1f} | {', '.join(map(str, r['export']))} |")
    lines += ["", "driver read = the driver process's rchar (every byte its read/pread calls returned: sources, manifests, memo files, Python modules).", ""]
    write_results(path, "\n".join(lines), rows)


if __name__ == "__main__":
    main(sys.argv[1:])
