"""Issue 14 parts 4-5: the cache's object-store tier and exports to object storage, against a real
S3 API (moto's server on 127.0.0.1, a free port) and real processes: builders with distinct local
caches that share only the bucket, kill -9 in the middle of an upload, two concurrent builders of
one key, a tampered object in the bucket, and a simulated multi-node Ray cluster whose every node
has its own local cache directory."""

from __future__ import annotations

import errno
import json
import logging
import os
import uuid
from pathlib import Path

import pytest

from chaoslib import TALLY, cli, finish, same_files, start, unit_log
from conftest import free_port, write_spec
from loadgraph.pipeline.objstore import file_digest

ROW_TIER = "S3 cache tier"
ROW_EXPORT = "s3:// export"


class S3:
    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                    "AWS_DEFAULT_REGION": "us-east-1"}
        self._saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        import s3fs

        self.fs = s3fs.S3FileSystem(use_listings_cache=False)

    def ray_env(self, nodes_dir: Path) -> dict:
        """One runtime env for every Ray test here, so that the workers it starts are reused:
        the server's address, and a local cache dir per node ({node} = the node's id)."""
        return {"env_vars": {**self.env, "LOADGRAPH_LOCAL_CACHE": str(nodes_dir / "{node}")}}

    def bucket(self) -> str:
        name = f"lg-{uuid.uuid4().hex[:10]}"
        self.fs.mkdir(name)
        return name

    def close(self) -> None:
        for k, v in self._saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        self.server.stop()


@pytest.fixture(scope="module")
def nodes_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ray-nodes")


@pytest.fixture(scope="module")
def s3():
    server = S3()
    yield server
    server.close()


class Plain:
    """A re-export of the tiny Llama in 64 KB shards (fetch, inspect, export: a dozen units) and
    the export of its uninterrupted local build: enough nodes and objects for every fault here,
    in a fraction of the merge-and-quantize plain's time."""

    def __init__(self, base: Path, root: Path):
        self.base, self.root = base, root
        self.ref_cache = root / "ref-cache"
        self.ref_out = root / "ref" / "out"
        run = cli("build", self.spec(root / "ref"), "--executor", "local", "--cache", self.ref_cache, logdir=root / "logs")
        assert run.rc == 0, run.output

    def spec(self, where: Path, out: str | None = None, shard: str = "64KB") -> Path:
        where.mkdir(parents=True, exist_ok=True)
        doc = {"source": {"model": str(self.base)}, "export": {"path": out or str(where / "out"), "max_shard_size": shard}, "verify": False}
        return write_spec(where / f"spec-{uuid.uuid4().hex[:6]}.yaml", doc)


@pytest.fixture(scope="module")
def plain(models, tmp_path_factory) -> Plain:
    return Plain(models("llama"), tmp_path_factory.mktemp("plain"))


def tier_problems(fs, base: str, scratch: Path) -> list[str]:
    """Every manifest and unit record visible in the tier names only objects that exist and hold
    the bytes of their digests (files, and tensors written at offsets): what a reader can see is
    never partial or wrong."""
    from loadgraph.formats.digest import digest_bytes, matches

    problems = []
    for record in [p for p in fs.find(base) if "/objects/" in p or "/units/" in p]:
        doc = json.loads(fs.cat_file(record))
        for rel, meta in doc["files"].items():
            blob = f"{base}/blobs/{'/'.join(file_digest(meta))}"
            if not fs.exists(blob):
                problems.append(f"{record}: {rel} missing")
                continue
            (scratch / "blob").write_bytes(fs.cat_file(blob))
            if not matches(scratch / "blob", meta):
                problems.append(f"{record}: {rel} differs")
        if not doc["files"]:
            for name, t in doc.get("tensors", {}).items():
                blob = f"{base}/blobs/blake3/{t['blake3']}"
                if not fs.exists(blob) or digest_bytes(fs.cat_file(blob)) != t["blake3"]:
                    problems.append(f"{record}: tensor {name}")
    return problems


def stored_bytes(fs, base: str) -> int:
    return sum(info["size"] for info in fs.find(base, detail=True).values())


def test_tier_kill_in_upload_concurrent_builders_and_tampering(s3, plain, tmp_path):
    """Builders on four "nodes" (distinct local caches, the local executor), sharing only s3://."""
    base = f"{s3.bucket()}/cache"
    url = f"s3://{base}"
    logs = tmp_path / "logs"

    def env(node: str, **extra: str) -> dict:
        return {**s3.env, "LOADGRAPH_LOCAL_CACHE": str(tmp_path / node), **extra}

    def args(out: str, report: str | None = None) -> list:
        a = ["build", plain.spec(tmp_path / out), "--executor", "local", "--cache", url]
        return a + (["--json", tmp_path / report] if report else [])

    # 1. kill -9 in the middle of the uploads: whatever is visible in the bucket is complete.
    killed = cli(*args("a"), logdir=logs, env=env("node-a", LOADGRAPH_FAULT="kill-in-upload:8", LOADGRAPH_UNIT_LOG=str(tmp_path / "a.units")),
                 row=ROW_TIER)
    assert killed.rc == -9, killed.output
    assert not tier_problems(s3.fs, base, tmp_path)
    assert not (tmp_path / "a" / "out").exists()

    # 2. Two builders at once on two fresh nodes: each unit is computed once between them, and
    #    both export the bytes of the uninterrupted local build.
    log = tmp_path / "bc.units"
    handles = [start(args(n, f"{n}.json"), logs, env(f"node-{n}", LOADGRAPH_UNIT_LOG=str(log))) for n in ("b", "c")]
    runs = [finish(h, row=ROW_TIER) for h in handles]
    for run in runs:
        assert run.rc == 0, run.output
    computed = unit_log(log)
    assert len(computed) == len(set(computed)), "a unit was computed twice"
    assert computed and unit_log(tmp_path / "a.units")
    lost = [f for n in ("b", "c") for f in same_files(tmp_path / n / "out", plain.ref_out)] + tier_problems(s3.fs, base, tmp_path)

    # 3. A tampered content object in the bucket (same size, one byte flipped) is detected by a
    #    node that downloads it, dropped, rebuilt and uploaded again; the export is unchanged.
    final = json.loads((tmp_path / "b.json").read_text())["targets"][0]["key"]
    manifest = json.loads(s3.fs.cat_file(f"{base}/objects/{final}.json"))
    shard = next(m for rel, m in sorted(manifest["files"].items()) if rel.endswith(".safetensors"))
    blob = f"{base}/blobs/{'/'.join(file_digest(shard))}"
    raw = bytearray(s3.fs.cat_file(blob))
    raw[-1] ^= 0xFF
    s3.fs.pipe_file(blob, bytes(raw))
    fixed = cli(*args("d", "d.json"), logdir=logs, env=env("node-d"), row=ROW_TIER)
    assert fixed.rc == 0, fixed.output
    assert "does not match its digest" in fixed.output
    assert {n["key"]: n["status"] for n in json.loads((tmp_path / "d.json").read_text())["nodes"]}[final] == "built"
    lost += same_files(tmp_path / "d" / "out", plain.ref_out) + tier_problems(s3.fs, base, tmp_path)
    TALLY.add(ROW_TIER, faults=2, lost=len(lost))
    print(f"\n[s3 tier] 4 local caches, {stored_bytes(s3.fs, base)} bytes in the tier, faults: kill -9 after 8 uploads, "
          f"1 tampered blob; units computed by 2 concurrent builders: {len(computed)} (no duplicates); lost: {len(lost)}")
    assert not lost


def test_multinode_ray_with_distinct_local_caches(s3, ray_cluster, plain, tmp_path, nodes_dir, monkeypatch):
    """Every Ray node gets its own local cache dir ({node} = its node id), the driver another;
    only the S3 tier is shared. The export is byte-identical to the local build's."""
    # Units of 16 KB: a tiny model's tensors spread over every node, each writing its share of
    # the shards into its own staging files, which reach the node that assembles them as objects
    # of their tensors.
    monkeypatch.setattr("loadgraph.stages.placed.UNIT_BYTES", 16 * 1024)
    from loadgraph.pipeline.cache import Cache
    from loadgraph.pipeline.executors.ray import RayExecutor
    from loadgraph.pipeline.graph import compile_specs
    from loadgraph.pipeline.runner import build
    from loadgraph.spec import load_spec_files

    bucket = s3.bucket()
    url = f"s3://{bucket}/cache"
    runtime_env = s3.ray_env(nodes_dir)
    spec = plain.spec(tmp_path / "b", f"s3://{bucket}/out")  # copied within the store from the tier's objects

    def build_from(driver_dir: Path):
        os.environ["LOADGRAPH_LOCAL_CACHE"] = str(driver_dir)
        try:
            cache = Cache(url)
            assert cache.root == driver_dir
            return build(compile_specs(load_spec_files([spec]), cache), cache, lambda: RayExecutor(runtime_env=runtime_env))
        finally:
            del os.environ["LOADGRAPH_LOCAL_CACHE"]

    report = build_from(tmp_path / "driver")
    assert report.ok
    # Nothing heavy on the driver: the workers planned, localized, assembled and uploaded every
    # node and published the export; the driver read manifests only (issue 14 part 3).
    model_bytes = sum(p.stat().st_size for p in plain.ref_out.glob("*.safetensors"))
    on_driver = [p for p in (tmp_path / "driver").rglob("*.safetensors") if p.is_file()]
    assert sum(p.stat().st_size for p in on_driver) <= model_bytes // 100, [str(p) for p in on_driver]
    assert report.driver_bytes_hashed <= model_bytes // 100, (report.driver_bytes_hashed, model_bytes)
    assert {n.status for n in report.nodes} == {"built"}
    # Again from a driver with an empty local cache: every node cached in the tier, the target
    # checked and its export found up to date by jobs; the driver still fetches nothing.
    again = build_from(tmp_path / "driver2")
    assert again.ok and {n.status for n in again.nodes} == {"cached"}, [(n.stage, n.status) for n in again.nodes]
    assert again.targets[0]["export_status"] == "up-to-date"
    assert not list((tmp_path / "driver2").rglob("*.safetensors")) and again.driver_bytes_hashed <= model_bytes // 100
    # Units ran on several nodes, each filling its own directory (inputs fetched, units published).
    used = [d for d in nodes_dir.iterdir() if any((d / "units").rglob("*.safetensors")) or any((d / "objects").iterdir())]
    assert len(used) >= 2, [d.name for d in nodes_dir.iterdir()]
    s3.fs.get(f"{bucket}/out/", str(tmp_path / "out"), recursive=True)
    (tmp_path / "out" / ".loadgraph-export.json").unlink()  # loadgraph's record of the objects, beside the checkpoint
    lost = same_files(tmp_path / "out", plain.ref_out) + tier_problems(s3.fs, url[5:], tmp_path)
    TALLY.add(ROW_TIER, runs=1, lost=len(lost))
    print(f"\n[s3 tier, Ray] {len(ray_cluster.cluster.list_all_nodes())} Ray nodes, {len(used)} local caches used + the driver's, "
          f"{stored_bytes(s3.fs, url[5:])} bytes in the tier; driver: {report.driver_bytes_hashed} bytes hashed, "
          f"{sum(p.stat().st_size for p in on_driver)} bytes of safetensors (model {model_bytes}); lost: {len(lost)}")
    assert not lost


def test_s3_export_verified_owned_stale_free_and_uploaded_from_workers(s3, ray_cluster, plain, tmp_path, nodes_dir):
    """Export to s3:// is checked object by object, publishes only into a prefix it owns, drops
    shards of an older shard count and uploads from the workers."""
    from loadgraph.pipeline.cache import Cache
    from loadgraph.pipeline.executors.ray import RayExecutor
    from loadgraph.errors import InputError
    from loadgraph.pipeline.remote_export import MARKER, check_remote_destination, publish_remote

    bucket = s3.bucket()
    dest = f"s3://{bucket}/export"
    logs = tmp_path / "logs"

    def spec(path: str, shard: str = "64KB") -> Path:
        return plain.spec(tmp_path / "specs", path, shard)

    def build(*extra, spec_path) -> tuple:
        report = tmp_path / f"r-{uuid.uuid4().hex[:6]}.json"
        run = cli("build", spec_path, "--executor", "local", "--cache", plain.ref_cache, "--json", report, *extra, logdir=logs, env=s3.env, row=ROW_EXPORT)
        target = json.loads(report.read_text())["targets"][0] if run.rc == 0 else {}
        return run, target.get("export_status"), target.get("key")

    first, status, key = build(spec_path=spec(dest))
    assert first.rc == 0 and status == "published", first.output
    names = set(s3.fs.ls(f"{bucket}/export"))
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    assert len(shards) > 2 and f"{bucket}/export/manifest.json" in names and f"{bucket}/export/{MARKER}" in names
    assert build(spec_path=spec(dest))[1] == "up-to-date"
    # A shard deleted, another replaced in the bucket: not up-to-date any more, both put back.
    s3.fs.rm_file(shards[0])
    s3.fs.pipe_file(shards[1], b"not a shard")
    again, status, _ = build(spec_path=spec(dest))
    assert status == "published", again.output
    for shard in shards[:2]:
        assert s3.fs.cat_file(shard) == (plain.ref_out / shard.rsplit("/", 1)[1]).read_bytes()
    # Fewer, bigger shards: the old ones are gone.
    bigger, status, _ = build(spec_path=spec(dest, "200KB"))
    assert status == "published", bigger.output
    left = {n.rsplit("/", 1)[1] for n in s3.fs.ls(f"{bucket}/export") if n.endswith(".safetensors")}
    assert left and all(n.endswith(f"-of-{len(left):05d}.safetensors") for n in left), left
    # A prefix holding someone else's objects: refused before any work, unless --overwrite.
    s3.fs.pipe_file(f"{bucket}/theirs/notes.txt", b"keep me")
    refused, _, _ = build(spec_path=spec(f"s3://{bucket}/theirs"))
    assert refused.rc == 2 and refused.error_lines[-1].startswith("error: export.path: s3://") and "--overwrite" in refused.output
    assert "Traceback" not in refused.output and s3.fs.ls(f"{bucket}/theirs") == [f"{bucket}/theirs/notes.txt"]
    # A backend that is not installed (gcsfs is not a dependency) is refused at plan time.
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(InputError, match="needs the gcsfs package"):
            check_remote_destination("gs://somewhere/model", Cache(plain.ref_cache), overwrite=False)
    # With --overwrite, from the Ray workers (the cache is one path on every node): every file's
    # object uploaded, the foreign object gone.
    cache = Cache(plain.ref_cache)
    art = cache.get(key)
    check_remote_destination(f"s3://{bucket}/theirs", cache, overwrite=True)
    executor = RayExecutor(runtime_env=s3.ray_env(nodes_dir))  # the session's nodes started before this server
    try:
        assert publish_remote(art, f"s3://{bucket}/theirs", cache, executor) == "published"
    finally:
        executor.close()
    got = {n.rsplit("/", 1)[1] for n in s3.fs.ls(f"{bucket}/theirs")}
    assert got == set(art.files) | {"manifest.json", MARKER}
    TALLY.add(ROW_EXPORT, faults=3, lost=0)


def test_cache_urls_from_the_command_line(s3, plain, tmp_path):
    """LOADGRAPH_CACHE=s3://… is the tier too (never a local folder named `s3:`); a scheme or a
    bucket that cannot work is one line and exit 2 at plan time."""
    bucket = s3.bucket()
    spec = plain.spec(tmp_path / "p")
    env = {**s3.env, "LOADGRAPH_CACHE": f"s3://{bucket}/c", "LOADGRAPH_LOCAL_CACHE": str(tmp_path / "local")}
    built = cli("build", spec, "--executor", "local", logdir=tmp_path / "logs", env=env)
    assert built.rc == 0, built.output
    # Entries in the bucket and in the node's local cache, nowhere else.
    assert len(s3.fs.find(f"{bucket}/c/objects")) == len(list((tmp_path / "local" / "objects").iterdir())) > 0
    for url, says in (("ftp://host/cache", "unsupported URL scheme ftp://"), (f"s3://no-such-{bucket}/c", "does not exist")):
        refused = cli("plan", spec, "--cache", url, logdir=tmp_path / "logs", env=env)
        assert refused.rc == 2 and refused.error_lines == [refused.error_lines[-1]] and says in refused.error_lines[-1], refused.output
        assert "Traceback" not in refused.output


def test_cache_without_hard_links_copies(plain, tmp_path, monkeypatch):
    """A filesystem without hard links (an S3 FUSE mount answers EOPNOTSUPP): copies instead."""
    from loadgraph.loading.builder import build_artifact
    from loadgraph.spec import BuildSpec

    real_link = os.link

    def no_links(src, dst, *a, **kw):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP), str(src))

    monkeypatch.setattr(os, "link", no_links)
    spec = BuildSpec(source={"model": str(plain.base)}, export={"path": str(tmp_path / "out"), "max_shard_size": "64KB"}, verify=None)
    built = build_artifact(spec, tmp_path / "cache")
    monkeypatch.setattr(os, "link", real_link)
    assert built.report.ok
    assert (tmp_path / "out" / "manifest.json").exists()
    assert all((tmp_path / "out" / rel).stat().st_nlink == 1 for rel in built.manifest["files"])


def test_without_hard_links_under_ray_the_driver_copies_nothing(s3, ray_cluster, plain, tmp_path, nodes_dir, monkeypatch):
    """Where the driver cannot hard-link (an S3 FUSE mount), assembling a node or placing its
    export copies and hashes every byte: that runs in a job on a worker, never in the driver."""
    import loadgraph.formats.safetensors as st
    import loadgraph.pipeline.publish as publish
    from loadgraph.pipeline.cache import Cache
    from loadgraph.pipeline.executors.ray import RayExecutor
    from loadgraph.pipeline.graph import compile_specs
    from loadgraph.pipeline.runner import build
    from loadgraph.spec import load_spec_files

    def no_links(src, dst, *a, **kw):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP), str(src))

    copied: list[str] = []

    def recording(copy):
        return lambda src, dst, *a, **kw: (copied.append(str(src)), copy(src, dst, *a, **kw))[1]

    monkeypatch.setattr(os, "link", no_links)  # in this process only: the workers' jobs link
    monkeypatch.setattr(st, "copy_and_hash", recording(st.copy_and_hash))
    monkeypatch.setattr(publish, "copy_and_hash", recording(publish.copy_and_hash))
    cache = Cache(tmp_path / "cache")
    graph = compile_specs(load_spec_files([plain.spec(tmp_path / "p")]), cache)
    report = build(graph, cache, lambda: RayExecutor(runtime_env=s3.ray_env(nodes_dir)))
    assert report.ok and {n.status for n in report.nodes} == {"built"}
    model_bytes = sum(p.stat().st_size for p in plain.ref_out.glob("*.safetensors"))
    assert not [p for p in copied if p.endswith(".safetensors")], copied  # neither to assemble nor to export
    # What the driver still hashes are the small files get() re-checks (configs, tokenizer), no weights.
    assert report.driver_bytes_hashed < model_bytes // 2, (report.driver_bytes_hashed, model_bytes)
    assert not same_files(tmp_path / "p" / "out", plain.ref_out)
