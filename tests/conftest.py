"""Shared fixtures: tiny checkpoints made offline once per session, a fresh cache per test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> "ModelFactory":
    return ModelFactory(tmp_path_factory.mktemp("models"))


class ModelFactory:
    """Makes each (kind, dtype) tiny checkpoint once per session, on first use."""

    def __init__(self, root: Path):
        self.root = root

    def __call__(self, kind: str = "llama", dtype: str = "float32", **kw) -> Path:
        from loadgraph.testing import make_tiny_model

        out = self.root / f"{kind}-{dtype}-{'-'.join(f'{k}{v}' for k, v in sorted(kw.items()))}"
        if not out.exists():
            make_tiny_model(kind, out, dtype=dtype, **kw)
        return out

    def copy(self, dest: Path, kind: str = "llama", dtype: str = "float32") -> Path:
        """A private, mutable copy (for tests that damage their input)."""
        shutil.copytree(self(kind, dtype), dest)
        return dest


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


def write_spec(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real command line in a subprocess: real exit codes, real stderr."""
    return subprocess.run(
        [sys.executable, "-m", "loadgraph.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


# The CLI's build in this process, then which of the modules named in $WATCHED it imported
# (printed as it exits: a finished build ends with os._exit, cli_common.exit_without_teardown).
BUILD_THEN_MODULES = """
import os, sys
from loadgraph.cli import main
real_exit = os._exit
def report_then_exit(code):
    print(sorted(m for m in os.environ["WATCHED"].split(",") if m in sys.modules), flush=True)
    real_exit(code)
os._exit = report_then_exit
sys.argv = ["loadgraph", "build", *sys.argv[1:]]
main()
"""


def build_imports(spec: Path, cache: Path, watched: tuple[str, ...], env: dict | None = None) -> str:
    """A local build of `spec` into `cache`; which of `watched` it imported, as "['a', 'b']"."""
    proc = subprocess.run([sys.executable, "-c", BUILD_THEN_MODULES, str(spec), "--executor", "local", "--cache", str(cache)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {}), "WATCHED": ",".join(watched)})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


# -- Ray ---------------------------------------------------------------------------------------
# Several Ray clusters may run on this machine: every port is explicit, never a default.


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free port never handed out before in this process: the OS may give the same free port
    to two consecutive binds, and Ray refuses a node whose components share one."""
    import socket

    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def ray_node_ports() -> dict:
    return {
        "node_manager_port": free_port(),
        "object_manager_port": free_port(),
        "dashboard_agent_listen_port": free_port(),
        "metrics_agent_port": free_port(),
        "metrics_export_port": free_port(),
        "runtime_env_agent_port": free_port(),
    }


class SimulatedCluster:
    """A `ray.cluster_utils.Cluster` of three nodes on this machine; the test process is its driver."""

    NODE = {"num_cpus": 1, "object_store_memory": 80 * 2**20}

    def __init__(self) -> None:
        import ray
        from ray.cluster_utils import Cluster

        # Cluster records its address for `ray.init()` in /tmp/ray: put back what was there, so
        # that another cluster's `ray.init()` on this machine keeps finding its own.
        address_file = Path("/tmp/ray/ray_current_cluster")
        previous = address_file.read_text() if address_file.exists() else None
        head_args = {**self.NODE, **ray_node_ports(), "gcs_server_port": free_port(), "dashboard_port": free_port(),
                     "ray_client_server_port": free_port(), "include_dashboard": False}
        self.cluster = Cluster(initialize_head=True, head_node_args=head_args)
        if previous is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_text(previous)
        self.head = self.cluster.head_node
        self.gpu = self.add_node(num_gpus=1)
        self.cpu = self.add_node()
        ray.init(address=self.cluster.address, log_to_driver=False)

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_node(self, **kw):
        return self.cluster.add_node(**{**self.NODE, **ray_node_ports(), **kw})

    def shutdown(self) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()


@pytest.fixture(scope="session")
def ray_cluster():
    """One simulated cluster per session (start-up costs 6-20 s here): head, a node with a fake
    GPU, a CPU node, one CPU each. Tests that kill nodes add their own and leave these three."""
    cluster = SimulatedCluster()
    yield cluster
    cluster.shutdown()


def peft010_fp16_merged(base, adapter):
    """What LLaVA's builder (PEFT 0.10) merges in fp16 on the CPU: PEFT's own float32 delta, rounded
    to fp16, then added (`weight += delta.to(fp16)`); returns {state-dict name: tensor} of the base
    model in fp16, LoRA layers merged that way."""
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), str(adapter))
    merged = {}
    for module_name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            weight = module.base_layer.weight.detach().to(torch.float16).clone()
            weight += module.get_delta_weight("default").to(torch.float16)
            merged[module_name.removeprefix("base_model.model.") + ".weight"] = weight
    assert merged, "the adapter wraps no layer"
    out = {}
    for name, tensor in peft_model.get_base_model().state_dict().items():
        name = name.replace(".base_layer.", ".")
        if "lora_" not in name:
            out[name] = merged.get(name, tensor.detach().to(torch.float16))
    return out
