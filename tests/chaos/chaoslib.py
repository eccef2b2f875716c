"""Helpers shared by the chaos tests and benchmarks/bench_chaos.py.

Builds run as real processes (the `loadgraph` CLI's own entry point, so kill -9 and exit codes
are real) forked from a warm forkserver that has already imported torch, transformers and
bitsandbytes: a fresh interpreter costs ~5 s of imports here, a forked one ~0.5 s, which is what
lets dozens of killed and resumed builds fit in the time `make test` allows.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# Chaos runs on tiny models: units of ~30 KB of tensors give builds of many units, so kill points
# land in every stage; one unit at a time in-process, so a kill point names the same unit every run.
os.environ.setdefault("LOADGRAPH_UNIT_BYTES", "30000")
os.environ.setdefault("LOADGRAPH_LOCAL_WORKERS", "1")

SEED = 20261123
PRELOAD = [
    "torch",
    "transformers",
    "bitsandbytes",
    "transformers.models.llama.modeling_llama",
    "peft",
    "loadgraph.cli",
    "loadgraph.progress",
    "loadgraph.pipeline.runner",
    "loadgraph.pipeline.executors.local",
    "loadgraph.stages.fetch",
    "loadgraph.stages.inspect",
    "loadgraph.stages.adapter",
    "loadgraph.stages.quantize",
    "loadgraph.stages.export",
    "loadgraph.formats.quant_plan",
    "loadgraph.formats.lora",
    "loadgraph.formats.lora_plan",
    "loadgraph.formats.names",
    # The object-store tests' builds: botocore + aiobotocore + s3fs cost ~1 s per fresh import.
    "s3fs",
    "loadgraph.pipeline.remote_tier",
]
_ctx = None


def _context():
    global _ctx
    if _ctx is None:
        _ctx = multiprocessing.get_context("forkserver")
        _ctx.set_forkserver_preload(PRELOAD)
    return _ctx


def _child(args: list[str], env: dict[str, str], log: str) -> None:
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ["COLUMNS"] = "200"
    real_exit = os._exit

    def record_then_exit(status: int) -> None:  # a finished build ends in os._exit (cli_common.exit_without_teardown)
        Path(log + ".rc").write_text(str(status))
        real_exit(status)

    os._exit = record_then_exit
    code = 0
    try:
        from loadgraph.cli import app

        app(args=list(args), prog_name="loadgraph")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - a crash: leave the traceback in the log
        import traceback

        traceback.print_exc()
        code = 3
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # records the code first: see finish(), the forkserver may lose the status


@dataclass
class Run:
    args: list[str]
    rc: int
    output: str
    seconds: float

    @property
    def crashed(self) -> bool:
        """Anything but success, loadgraph's own error (1, 2) or the injected SIGKILL."""
        return self.rc not in (0, 1, 2, -9) or "Traceback" in self.output

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.output.splitlines() if line.startswith("error:") or line.startswith("error: ")]


@dataclass
class Tally:
    """Counts for the report table (benchmarks/bench_chaos.py), one row per fault class."""

    rows: dict[str, dict] = field(default_factory=dict)

    def add(self, row: str, **counts: int) -> None:
        r = self.rows.setdefault(row, {"faults": 0, "runs": 0, "failed_runs": 0, "lost": 0, "bad_inputs": 0, "crashes": 0})
        for k, v in counts.items():
            r[k] += v
        path = os.environ.get("LOADGRAPH_CHAOS_TALLY")
        if path:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"row": row, **counts}) + "\n")


TALLY = Tally()


def start(args: list, logdir: Path, env: dict | None = None):
    """Start one `loadgraph ARGS` process; returns (process, log path, start time)."""
    logdir.mkdir(parents=True, exist_ok=True)
    log = logdir / f"run-{time.monotonic_ns()}.log"
    proc = _context().Process(target=_child, args=([str(a) for a in args], dict(env or {}), str(log)))
    proc.start()
    return proc, log, time.perf_counter(), [str(a) for a in args]


def finish(handle, timeout: float = 240, row: str | None = None) -> Run:
    proc, log, t0, args = handle
    proc.join(timeout)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
    rc = proc.exitcode
    recorded = log.with_name(log.name + ".rc")
    if rc == 255 and recorded.exists():
        # multiprocessing's forkserver answers 255 when it cannot read a child's status back
        # (popen_forkserver: "perhaps the forkserver process itself got killed"; seen about once
        # per chaos suite here): the code the child recorded just before exiting is the answer.
        # A child killed by a signal records nothing and stays a failure.
        rc = int(recorded.read_text())
    run = Run(args, rc, log.read_text(errors="replace"), time.perf_counter() - t0)
    if row:
        TALLY.add(row, runs=1, failed_runs=int(run.rc != 0), crashes=int(run.crashed))
    return run


def cli(*args, logdir: Path, env: dict | None = None, row: str | None = None, timeout: float = 240) -> Run:
    return finish(start(list(args), logdir, env), timeout, row)


# -- the build under test --------------------------------------------------------------------


def write_spec(path: Path, base: Path, adapter: Path, out: Path) -> Path:
    """merge (LoRA) + quantize (bnb-nf4, double quant) + export, small shards: ~50 work units."""
    doc = {
        "source": {"model": str(base)},
        "dtype": "bfloat16",
        "adapters": [{"path": str(adapter)}],
        "quantize": {"method": "bnb-nf4", "double_quant": True},
        "verify": False,
        "export": {"path": str(out), "max_shard_size": "20KB"},
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def build_args(spec: Path, cache: Path, report: Path | None = None) -> list:
    args = ["build", spec, "--executor", "local", "--cache", cache]
    return args + (["--json", report] if report else [])


def same_files(a: Path, b: Path) -> list[str]:
    """Names of files that differ between two export directories (manifest.json aside)."""
    names_a = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file() and p.name != "manifest.json")
    names_b = sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file() and p.name != "manifest.json")
    if names_a != names_b:
        return sorted(set(names_a) ^ set(names_b)) or ["<file lists differ>"]
    return [n for n in names_a if (a / n).read_bytes() != (b / n).read_bytes()]


def corrupt_entries(cache_root: Path) -> list[str]:
    from loadgraph.pipeline.cache import Cache

    cache = Cache(cache_root)
    return [p for e in cache.entries() for p in (cache.verify(e["key"]) or ([] if e["valid"] else [f"{e['key'][:12]}: invalid"]))]


def report_nodes(path: Path) -> list[dict]:
    return json.loads(path.read_text())["nodes"]


def unit_log(path: Path) -> list[tuple[str, str]]:
    if not path.exists():
        return []
    return [tuple(line.split()[:2]) for line in path.read_text().splitlines() if line.strip()]


def flip_byte(path: Path, offset: int = -1, keep_mtime: bool = False) -> None:
    st = path.stat()
    path.chmod(0o644)
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))
    if keep_mtime:  # a careful tamperer (or bit rot) leaves the mtime as it was
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def kill_points(total_units: int, k: int, seed: int = SEED) -> list[tuple[str, int]]:
    """K seeded (mode, N): after the Nth fresh unit is published, or inside the Nth, before publishing."""
    rng = random.Random(seed)
    points = []
    for _ in range(k):
        if rng.random() < 0.5:
            points.append(("kill-after-units", rng.randint(1, total_units - 1)))
        else:
            points.append(("kill-in-unit", rng.randint(1, total_units)))
    return points


# -- fixtures (imported by the test modules: tests/chaos has no conftest of its own) -----------

import pytest  # noqa: E402


@dataclass
class Workload:
    root: Path
    base: Path
    adapter: Path
    ref_out: Path  # the export of an uninterrupted build
    ref_units: dict[str, int]  # node key -> units
    ref_keys: list[str]

    @property
    def total_units(self) -> int:
        return sum(self.ref_units.values())

    def spec(self, where: Path, out: Path | None = None) -> Path:
        where.mkdir(parents=True, exist_ok=True)
        return write_spec(where / "spec.yaml", self.base, self.adapter, out or where / "out")


_WORKLOAD: list[Workload] = []


@pytest.fixture(scope="session")
def workload(models, tmp_path_factory) -> Workload:
    """Made once per session: each test module imports this fixture, which pytest would otherwise
    set up once per module."""
    from loadgraph.testing import make_lora_adapter

    if _WORKLOAD:
        return _WORKLOAD[0]
    root = tmp_path_factory.mktemp("chaos")
    base = models("llama")
    adapter = make_lora_adapter(base, root / "adapter", r=4, seed=9)
    spec = write_spec(root / "ref.yaml", base, adapter, root / "ref-out")
    run = cli(*build_args(spec, root / "ref-cache", root / "ref.json"), logdir=root / "logs")
    assert run.rc == 0, run.output
    nodes = report_nodes(root / "ref.json")
    _WORKLOAD.append(Workload(root, base, adapter, root / "ref-out", {n["key"]: n["units_total"] for n in nodes}, [n["key"] for n in nodes]))
    return _WORKLOAD[0]
