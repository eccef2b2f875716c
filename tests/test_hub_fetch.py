"""Hub sources: `plan` lists the repo and downloads only its small files; the fetch units download
the weights. Against a hub served on 127.0.0.1 the way huggingface_hub talks to it (model-info
API with blobs, HEAD/GET resolve/<rev>/<file> with X-Repo-Commit, X-Linked-Etag, X-Linked-Size)."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from conftest import run_cli, write_spec

COMMIT = "c0ffee" + "0" * 34
CALLER_HEADER = "X-Test-Caller"  # which code made the request (the test's client hook sets it)


class FakeHub:
    """Serves repos (name -> directory) at COMMIT; records (method, path, client thread) of each request."""

    def __init__(self, repos: dict[str, Path]):
        self.repos = repos
        self.requests: list[tuple[str, str, str, str]] = []  # method, path, caller, range
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                hub.serve(self, body=False)

            def do_GET(self) -> None:
                hub.serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def weights_got(self, repo: str = "acme/") -> list[tuple[str, str]]:
        """Whole weight files downloaded (a header read asks for a byte range)."""
        return [(path, who) for method, path, who, ranged in self.requests
                if method == "GET" and not ranged and path.endswith(".safetensors") and path.startswith(f"/{repo}")]

    def serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(h.path).path)
        self.requests.append((h.command, path, h.headers.get(CALLER_HEADER, ""), h.headers.get("Range", "")))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"]:  # /api/models/{org}/{name}/revision/{rev}
            repo, rev = "/".join(parts[2:4]), parts[5] if len(parts) > 5 else "main"
            if repo not in self.repos:
                return self.error(h, 401, "RepoNotFound")
            if rev not in ("main", COMMIT):
                return self.error(h, 404, "RevisionNotFound")
            siblings = [{"rfilename": f.name, "size": f.stat().st_size, "blobId": _git_sha1(f),
                         **({"lfs": {"size": f.stat().st_size, "sha256": _sha256(f), "pointerSize": 134}} if _lfs(f) else {})}
                        for f in sorted(self.repos[repo].iterdir())]
            return self.send(h, json.dumps({"id": repo, "sha": COMMIT, "siblings": siblings}).encode(), {}, body)
        if len(parts) < 5 or parts[2] != "resolve":  # e.g. huggingface_hub's own /api/agent-harnesses
            return self.error(h, 404, "EntryNotFound")
        repo, rev, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])  # /{org}/{name}/resolve/{rev}/{file}
        if repo not in self.repos:
            return self.error(h, 401, "RepoNotFound")
        f = self.repos[repo] / name
        if not f.is_file():
            return self.error(h, 404, "EntryNotFound")
        etag = _sha256(f) if _lfs(f) else _git_sha1(f)
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"', **({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(f.stat().st_size)} if _lfs(f) else {})}
        data, status = f.read_bytes(), 200
        ranged = re.fullmatch(r"bytes=(\d+)-(\d+)", h.headers.get("Range", ""))
        if ranged:  # how huggingface_hub reads a safetensors header: the first 100 kB, then the rest of it
            begin, end = int(ranged[1]), min(int(ranged[2]), len(data) - 1)
            headers["Content-Range"] = f"bytes {begin}-{end}/{len(data)}"
            data, status = data[begin:end + 1], 206
        self.send(h, data, headers, body, status)

    @staticmethod
    def send(h: BaseHTTPRequestHandler, data: bytes, headers: dict, body: bool, status: int = 200) -> None:
        h.send_response(status)
        for k, v in {"Content-Length": str(len(data)), **headers}.items():
            h.send_header(k, v)
        h.end_headers()
        if body:
            h.wfile.write(data)

    @staticmethod
    def error(h: BaseHTTPRequestHandler, status: int, code: str) -> None:
        data = json.dumps({"error": code}).encode()
        h.send_response(status)
        h.send_header("X-Error-Code", code)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data) if h.command != "HEAD" else None


def _lfs(f: Path) -> bool:
    return f.suffix == ".safetensors"


def _sha256(f: Path) -> str:
    return hashlib.sha256(f.read_bytes()).hexdigest()


def _git_sha1(f: Path) -> str:
    data = f.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.fixture
def hub(models, tmp_path):
    src = models("llama")
    broken = tmp_path / "broken"  # its index names a shard the repo lacks
    broken.mkdir()
    for f in src.iterdir():
        if f.name != "model-00003-of-00012.safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    from loadgraph.testing import make_lora_adapter

    lora = models.root / "hub-lora"  # made once per session
    if not lora.exists():
        make_lora_adapter(src, lora, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], seed=5)
    wrong = models.root / "hub-lora-other-shapes"  # trained on a llama of another width
    if not wrong.exists():
        from transformers import LlamaConfig, LlamaForCausalLM

        other = models.root / "hub-other-base"
        LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=512)).save_pretrained(other)
        make_lora_adapter(other, wrong, r=4, seed=1, kind="llama")
    server = FakeHub({"acme/tiny": src, "acme/broken": broken, "acme/lora": lora, "acme/wrong-lora": wrong})
    server.lora = lora
    yield server
    server.server.shutdown()
    server.server.server_close()


def _env(hub: FakeHub, tmp_path: Path) -> dict:
    return {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path / "hf"), "HF_HUB_DISABLE_XET": "1"}


def test_plan_downloads_no_weights_and_the_fetch_units_do(hub, models, tmp_path, monkeypatch):
    # In-process (one import of torch/PEFT for plan, build and the checks; huggingface_hub froze
    # its endpoint and offline flag at import, so they are patched), each request tagged by its
    # caller: a fetch unit (FetchStage.run_unit under the executor's execute_unit) or not, and
    # the thread (the local executor's pool: "unit_N").
    from huggingface_hub.utils import _http
    from typer.testing import CliRunner

    from loadgraph.cli import app

    _online(hub, tmp_path, monkeypatch)
    monkeypatch.setenv("LOADGRAPH_LOCAL_WORKERS", "2")  # tests/chaos sets 1 for its session

    def caller() -> str:
        frames = traceback.extract_stack()
        in_unit = any(f.name == "run_unit" and f.filename.endswith("stages/fetch.py") for f in frames) and any(f.name == "execute_unit" for f in frames)
        return f"{'fetch-unit' if in_unit else 'other'}:{threading.current_thread().name}"

    def tagged():
        client = _http.default_client_factory()
        client.event_hooks["request"].append(lambda request: request.headers.__setitem__(CALLER_HEADER, caller()))
        return client

    _http.set_client_factory(tagged)
    try:
        doc = {"source": {"model": "acme/tiny"}, "adapters": [{"path": "acme/lora"}], "export": {"path": str(tmp_path / "out-hub")}, "verify": False}
        spec = write_spec(tmp_path / "hub.yaml", doc)
        plan = CliRunner().invoke(app, ["plan", str(spec), "--json", "--cache", str(tmp_path / "cache")])
        assert plan.exit_code == 0, plan.output
        got = [p for m, p, _, _ in hub.requests if m == "GET"]
        assert any(p.endswith("/config.json") for p in got) and any(p.endswith("/model.safetensors.index.json") for p in got)
        assert hub.weights_got("acme/tiny/") == []  # listed (sizes, LFS sha256s), not downloaded
        assert [p for p, _ in hub.weights_got("acme/lora/")] == [f"/acme/lora/resolve/{COMMIT}/adapter_model.safetensors"]  # MBs, the plan reads it
        assert [p.name for p in (tmp_path / "hf").rglob("*.safetensors")] == ["adapter_model.safetensors"]
        # Plain plan leaves the adapter-vs-base check to --check and to build, and says so.
        assert [p for m, p, _, r in hub.requests if r and m == "GET"] == []
        assert json.loads(plan.stdout)["checks_pending"] == ["adapters against the base model"]
        checked = CliRunner().invoke(app, ["plan", str(spec), "--json", "--check", "--cache", str(tmp_path / "cache")])
        assert checked.exit_code == 0, checked.output
        # That check read the base's headers on the hub: a byte range of each shard.
        shards = sorted(f.name for f in models("llama").glob("*.safetensors"))
        assert sorted(p.rsplit("/", 1)[1] for m, p, _, r in hub.requests if r and m == "GET") == shards
        assert hub.weights_got("acme/tiny/") == []
        fetch = json.loads(checked.stdout)["nodes"][0]

        # An adapter of other shapes is refused from those headers too, before any weight is downloaded.
        from loadgraph.errors import InputError

        wrong = write_spec(tmp_path / "wrong.yaml", {**doc, "adapters": [{"path": "acme/wrong-lora"}]})
        with pytest.raises(InputError) as refused:
            _build(wrong, tmp_path / "cache")
        assert "adapter_model.safetensors" in str(refused.value) and "shape" in str(refused.value) and "\n" not in str(refused.value)
        assert hub.weights_got("acme/tiny/") == []

        report = _build(spec, tmp_path / "cache")
    finally:
        _http.set_client_factory(_http.default_client_factory)
    assert report.ok
    assert (tmp_path / "cache" / "objects" / fetch["key"] / "manifest.json").is_file()  # the key the plan named, built
    weights = hub.weights_got("acme/tiny/")
    assert sorted(p.rsplit("/", 1)[1] for p, _ in weights) == shards  # each once
    assert all(who.startswith("fetch-unit:") for _, who in weights), weights
    assert any(who.startswith("fetch-unit:unit") for _, who in weights), weights  # on the pool's threads (>1 worker)

    local = write_spec(tmp_path / "local.yaml", {**doc, "source": {"model": str(models("llama"))}, "adapters": [{"path": str(hub.lora)}],
                                                 "export": {"path": str(tmp_path / "out-local")}})
    assert _build(local, tmp_path / "cache-local").ok
    built = sorted(p.name for p in (tmp_path / "out-hub").iterdir())
    assert built == sorted(p.name for p in (tmp_path / "out-local").iterdir()) and "config.json" in built
    for name in built:
        if name != "manifest.json":  # it records where the source came from (the hub commit)
            assert (tmp_path / "out-hub" / name).read_bytes() == (tmp_path / "out-local" / name).read_bytes(), name
    manifests = [json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("out-hub", "out-local")]
    strip = [{rel: {k: v for k, v in meta.items() if k != "mtime_ns"} for rel, meta in m["files"].items()} for m in manifests]
    assert strip[0] == strip[1]


def _online(hub: FakeHub, tmp_path: Path, monkeypatch) -> None:
    """This process talks to the fake hub, with a fresh hub cache (huggingface_hub read its
    endpoint, offline flag and cache dir at import: patched)."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))


def test_under_ray_fetch_units_download_their_file_on_whichever_node_runs_them(ray_cluster, hub, models, tmp_path, monkeypatch):
    """Not pinned to the driver's node (as units reading a local snapshot are): on the simulated
    cluster the weights are downloaded by units on the other nodes too."""
    from loadgraph.pipeline.cache import Cache
    from loadgraph.pipeline.executors.ray import RayExecutor
    from loadgraph.pipeline.graph import compile_specs
    from loadgraph.pipeline.runner import build
    from loadgraph.spec import load_spec_files

    _online(hub, tmp_path, monkeypatch)
    spec = write_spec(tmp_path / "s.yaml", {"source": {"model": "acme/tiny"}, "verify": False, "export": {"path": str(tmp_path / "out")}})
    cache = Cache(tmp_path / "cache")
    graph = compile_specs(load_spec_files([spec]), cache)
    assert hub.weights_got() == []
    online = {"env_vars": {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"}}  # the workers' own hub settings
    report = build(graph, cache, lambda: RayExecutor(runtime_env=online))
    assert report.ok and report.executor == "ray"
    fetch = next(n for n in report.nodes if n.stage == "fetch")
    nodes = {u["ran_on"]["node_id"] for u in fetch.units if u["id"] != "finalize"}
    assert nodes - {ray_cluster.head.node_id}, nodes  # some units ran off the driver's (head) node
    shards = sorted(f.name for f in models("llama").glob("*.safetensors"))
    assert sorted(p.rsplit("/", 1)[1] for p, _ in hub.weights_got()) == shards
    assert (tmp_path / "out" / "manifest.json").is_file()


def _build(spec: Path, cache_dir: Path):
    from loadgraph.pipeline.cache import Cache
    from loadgraph.pipeline.executors.local import LocalExecutor
    from loadgraph.pipeline.graph import compile_specs
    from loadgraph.pipeline.runner import build
    from loadgraph.spec import load_spec_files

    cache = Cache(cache_dir)
    return build(compile_specs(load_spec_files([spec]), cache), cache, LocalExecutor)


@pytest.mark.parametrize(("source", "words"), [
    ({"model": "acme/nope"}, ["source.model", "acme/nope", "no such repo"]),
    ({"model": "acme/tiny", "revision": "v9"}, ["source.model", "acme/tiny@v9", "no such revision"]),
    ({"model": "acme/broken"}, ["model.safetensors.index.json", "model-00003-of-00012.safetensors", "missing"]),
])
def test_a_missing_repo_revision_or_file_is_one_line_before_any_work(hub, tmp_path, source, words):
    spec = write_spec(tmp_path / "s.yaml", {"source": source, "verify": False})
    proc = run_cli("plan", spec, "--cache", tmp_path / "cache", env=_env(hub, tmp_path))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert all(w in proc.stderr for w in words), proc.stderr
    assert hub.weights_got() == []


def test_fetch_units_of_a_hub_repo_are_not_pinned_to_the_drivers_node():
    """A unit that downloads its file runs on any node; one reading a local snapshot stays on the driver's."""
    from loadgraph.pipeline.executors.ray import reads_driver_paths

    snapshot = {"path": f"/home/u/.cache/huggingface/hub/models--acme--tiny/snapshots/{COMMIT}"}
    hub = {"repo": "acme/tiny", "commit": COMMIT, "cache_dir": "/home/u/.cache/huggingface/hub", "sizes": {"model.safetensors": 10}}
    assert reads_driver_paths({"runtime": snapshot}, "/shared/cache")
    assert not reads_driver_paths({"runtime": {**snapshot, "hub": hub}}, "/shared/cache")


def test_an_unreachable_hub_reads_the_local_hub_cache_else_says_so_in_one_line(models, tmp_path):
    """As snapshot_download does: a repo already in the local hub cache plans without the hub."""
    import shutil
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo_dir = tmp_path / "hf" / "models--acme--tiny"
    shutil.copytree(models("llama"), repo_dir / "snapshots" / COMMIT)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path / "hf"), "HF_HUB_ETAG_TIMEOUT": "2"}
    cached = run_cli("plan", write_spec(tmp_path / "a.yaml", {"source": {"model": "acme/tiny"}, "verify": False}), "--cache", tmp_path / "cache", env=env)
    assert cached.returncode == 0, cached.stderr
    missing = run_cli("plan", write_spec(tmp_path / "b.yaml", {"source": {"model": "acme/other"}, "verify": False}), "--cache", tmp_path / "cache", env=env)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    assert "acme/other@main" in missing.stderr and "cannot list the repo on the hub" in missing.stderr


def test_downloads_go_to_the_users_hub_cache_else_the_loadgraph_caches_and_offline_plans_find_them_there(models, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub.constants as constants

    from loadgraph.stages.fetch import open_source
    from loadgraph.stages.hub import download_dir

    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "default-hf"))
    monkeypatch.setattr(constants, "default_cache_path", str(tmp_path / "default-hf"))
    cache_root = tmp_path / "cache"
    assert download_dir(cache_root) == str(cache_root.absolute() / "hub")  # nobody said where: the cache every node reaches
    # What an online build left there, found by an offline plan (read where it is: no download runtime).
    snap = cache_root / "hub" / "models--acme--tiny" / "snapshots" / COMMIT
    shutil.copytree(models("llama"), snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert open_source("acme/tiny", None, "source.model", cache_root) == (snap, COMMIT, None)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "users"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "users"))
    assert download_dir(cache_root) == str(tmp_path / "users")  # the user's choice wins
