"""pipeline/offload.py without Ray: which of the driver's chores go to the executor's jobs, and
that the executor is not started for an export that is already in place (the Ray side:
test_ray_cluster.py::test_the_driver_hashes_no_weights_and_stays_small)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from loadgraph.pipeline import offload
from loadgraph.pipeline.cache import Cache
from loadgraph.pipeline.executors.local import LocalExecutor
from loadgraph.pipeline.graph import compile_specs
from loadgraph.pipeline.hashing import STORE, hashed_by
from loadgraph.pipeline.runner import build
from loadgraph.spec import parse_spec


class JobsExecutor(LocalExecutor):
    """The local executor with Ray's run_jobs interface, recording what it was handed."""

    started = 0
    jobs: list[str] = []

    def __init__(self) -> None:
        super().__init__()
        JobsExecutor.started += 1

    def run_jobs(self, fn, items: list, near_driver: bool = True) -> list:
        JobsExecutor.jobs += [fn.__name__] * len(items)
        return [fn(item) for item in items]


def test_plan_hashing_and_a_copying_export_are_jobs_and_an_intact_export_starts_nothing(models, tmp_path, monkeypatch):
    monkeypatch.setattr(offload, "REMOTE_MIN", 0)  # the tiny model's files count as big
    base = models.copy(tmp_path / "base")
    shm = Path("/dev/shm")
    out = Path(tempfile.mkdtemp(prefix="lg-offload-", dir=shm if shm.is_dir() else None)) / "out"
    cache = Cache(tmp_path / "cache")
    spec = parse_spec({"source": {"model": str(base)}, "verify": False, "export": {"path": str(out), "max_shard_size": "40KB"}}, "t")
    factory = offload.SharedExecutor(JobsExecutor)
    JobsExecutor.started, JobsExecutor.jobs = 0, []
    try:
        with hashed_by(offload.remote_hasher(factory)):
            graph = compile_specs(spec, cache)
        # Every source file was hashed by a job (the jobs run here, so the byte counter proves nothing).
        assert JobsExecutor.jobs.count("hash_path") == sum(p.is_file() for p in base.iterdir()) and (cache.root / STORE).exists()
        report = build(graph, cache, factory)
        assert report.targets[0]["export_status"] == "published" and "publish_local_job" in JobsExecutor.jobs
        art = cache.get(graph.targets[0].final)
        assert all((out / rel).read_bytes() == (art.path / rel).read_bytes() for rel in art.files)
        # Cached and in place on the other filesystem: answered from memoised digests, no executor.
        JobsExecutor.started, JobsExecutor.jobs = 0, []
        again = build(compile_specs(spec, cache), cache, JobsExecutor)
        assert again.targets[0]["export_status"] == "up-to-date" and JobsExecutor.started == 0
        # A damaged copy there is not trusted: the job checks and replaces it.
        shard = next(out.glob("*.safetensors"))
        good = shard.read_bytes()
        shard.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
        fixed = build(compile_specs(spec, cache), cache, JobsExecutor)
        assert fixed.targets[0]["export_status"] == "published" and JobsExecutor.jobs == ["publish_local_job"]
        assert shard.read_bytes() == good
    finally:
        factory.close()
        shutil.rmtree(out.parent, ignore_errors=True)
