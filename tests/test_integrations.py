"""Fine-tuning hand-offs on CPU: Ray Train (2 gloo workers) and DeepSpeed ZeRO-3 (2 ranks)."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

TESTS_DIR = Path(__file__).parent


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A private one-node Ray head with every port given explicitly, stopped by its own PID.

    `ray start --block` owns the daemons it starts and stops them on SIGTERM, so ending that one
    process leaves any other Ray cluster on this machine alone (never `ray stop`).
    """
    ray = pytest.importorskip("ray")
    gcs, node_mgr, obj_mgr, client, agent_listen, agent_grpc, metrics, runtime_env, dash = _free_ports(9)
    # Below the ephemeral range the ports above come from (so no overlap), above Ray's default
    # worker ports (10002-19999) other clusters here use: as clusters/local/cluster.py does.
    worker_lo = 20000 + 250 * random.randrange(48)
    temp = Path("/tmp") / f"lg-ray-{os.getpid()}"  # short: Ray's unix socket paths have a length limit
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        # Workers import the train loop from this test module by reference.
        "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), str(TESTS_DIR.parent), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--num-cpus=2", "--num-gpus=0",
        f"--port={gcs}", f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_listen}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={runtime_env}", f"--dashboard-port={dash}", "--include-dashboard=false",
        f"--min-worker-port={worker_lo}", f"--max-worker-port={worker_lo + 200}", f"--temp-dir={temp}",
        "--disable-usage-stats",
    ]
    log = open(tmp_path_factory.mktemp("ray") / "head.log", "w")
    # A session of its own: every daemon and worker of this cluster shares the head's process
    # group, so teardown can signal exactly this cluster's processes.
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{gcs}"
    try:
        _wait_for_port(gcs, head, log.name, timeout=120)
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        _stop_group(head)
        log.close()


def _wait_for_port(port: int, head: subprocess.Popen, log_path: str, timeout: float) -> None:
    """Wait until the head's GCS accepts connections (a cheap TCP probe, not a 60 s ray.init timeout)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray head exited with {head.returncode}:\n{Path(log_path).read_text()[-3000:]}")
        with socket.socket() as probe:
            probe.settimeout(1.0)
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise RuntimeError(f"ray head did not open port {port} within {timeout}s:\n{Path(log_path).read_text()[-3000:]}")


def _stop_group(head: subprocess.Popen) -> None:
    """SIGTERM the cluster's process group (all at once, not daemon by daemon), SIGKILL stragglers."""
    try:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    deadline = time.time() + 3  # Ray's idle workers can outlive SIGTERM for long: do not wait on them
    while time.time() < deadline:
        try:
            os.killpg(head.pid, 0)  # anyone left in the group?
        except ProcessLookupError:
            return
        time.sleep(0.5)
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def lora_steps(loaded, model, config: dict) -> None:
    """A few LoRA steps on a fixed batch; rank 0 reports every rank's losses and artifact key."""
    import ray.train
    import torch.distributed as dist

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config["lr"])
    ids = torch.tensor([[1, 17, 42, 99, 7, 3, 250, 31, 8, 64]])
    losses = []
    for _ in range(config["steps"]):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    report = {"key": loaded.key, "losses": losses, "trainable_dtypes": sorted({str(p.dtype) for p in params}),
              "checkpointing": bool(loaded.model.is_gradient_checkpointing)}
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, report)
    # Ray Train 2.60 (Train V2) keeps the metrics that come with a checkpoint: rank 0 sends one.
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            Path(tmp, "workers.json").write_text(json.dumps(gathered))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"workers": json.dumps(gathered)}, checkpoint=checkpoint)


def test_ray_train_two_workers_share_one_build(ray_cluster, models, tmp_path):
    from ray.train import RunConfig, ScalingConfig

    from loadgraph.integrations import ray_train

    base = models("llama")
    lf_yaml = {"model_name_or_path": str(base), "finetuning_type": "lora", "lora_target": "all", "lora_rank": 4,
               "dataset": "alpaca_en_demo", "learning_rate": 1e-3}
    prepared = ray_train.prepare(lf_yaml, cache=tmp_path / "cache")
    assert "fetch" in prepared.built_stages  # the driver built it...
    again = ray_train.prepare(lf_yaml, cache=tmp_path / "cache", prefetch=False)
    assert again.key == prepared.key and again.built_stages == []  # ...once: a second prepare is all cache
    assert [p["key"] for p in prepared.prefetched] == [prepared.key] and prepared.prefetched[0]["bytes"] > 0

    trainer = ray_train.torch_trainer(
        prepared, lora_steps,
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=str(tmp_path / "ray-results"), name="lora"),
        train_loop_config={"lr": 1e-2, "steps": 5},
    )
    result = trainer.fit()
    workers = json.loads(result.metrics["workers"])
    assert len(workers) == 2
    assert {w["key"] for w in workers} == {prepared.key}  # both workers loaded the driver's artifact
    for w in workers:
        assert w["losses"][-1] < w["losses"][0], w["losses"]
        assert w["trainable_dtypes"] == ["torch.float32"] and w["checkpointing"]
    # Workers loaded by key: nothing new was published to the cache while training.
    objects = sorted(p.name for p in (tmp_path / "cache" / "objects").iterdir())
    assert prepared.key in objects and len(objects) == len(set(objects))


def test_worker_refuses_to_build(tmp_path, models):
    from loadgraph.errors import BuildError
    from loadgraph.integrations.ray_train import PreparedArtifact, load_in_worker

    missing = PreparedArtifact(key="0" * 64, cache_root=str(tmp_path / "cache"),
                               spec={"source": {"model": str(models("llama"))}}, training={})
    with pytest.raises(BuildError, match="not in the cache"):
        load_in_worker(missing)


# --------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-3 on the CPU accelerator, 2 ranks over gloo


def _zero3_rank(rank: int, world: int, port: int, model_dir: str, cache: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import deepspeed

    from loadgraph.integrations.deepspeed import prepare_zero3

    deepspeed.init_distributed(dist_backend="gloo")
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
    z = prepare_zero3({"source": {"model": model_dir}, "verify": False}, ds_config, training={"finetuning_type": "full"},
                      optimizer_factory=lambda params: torch.optim.AdamW(params, lr=1e-2), cache=cache)
    params = list(z.loaded.model.parameters())
    record = {
        "key": z.loaded.key,
        "placeholder_numel": sum(p.numel() for p in params),  # ZeRO-3 leaves empty tensors behind
        "local_numel": sum(p.ds_tensor.numel() for p in params),
        "total_numel": sum(p.ds_numel for p in params),
        "checkpointing": bool(z.loaded.model.is_gradient_checkpointing),
    }
    ids = torch.tensor([[1, 17, 42, 99, 7, 3, 250, 31]])
    losses = []
    for _ in range(4):
        loss = z.engine(input_ids=ids, labels=ids).loss
        z.engine.backward(loss)
        z.engine.step()
        losses.append(loss.item())
    Path(out, f"rank{rank}.json").write_text(json.dumps({**record, "losses": losses}))
    # Tear the process group down before exit: gloo/shm threads left running at interpreter
    # exit abort the process ("terminate called without an active exception").
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    os._exit(0)


def test_deepspeed_zero3_two_ranks_on_cpu(models, tmp_path):
    pytest.importorskip("deepspeed")
    import multiprocessing

    base = models("llama")
    ctx = multiprocessing.get_context("spawn")
    port = _free_ports(1)[0]
    procs = [ctx.Process(target=_zero3_rank, args=(r, 2, port, str(base), str(tmp_path / "cache"), str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=400)
    assert [p.exitcode for p in procs] == [0, 0]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["key"] == ranks[1]["key"]
    for r in ranks:
        assert r["placeholder_numel"] == 0  # no rank holds the full weights
        assert r["local_numel"] * 2 == pytest.approx(r["total_numel"], rel=0.01)
        assert r["losses"][-1] < r["losses"][0], r["losses"]
        assert r["checkpointing"]
    # Both ranks asked for the same build; the cache's per-key lock made it one artifact.
    assert (tmp_path / "cache" / "objects" / ranks[0]["key"]).is_dir()


def test_zero3_refuses_quantized_base(models):
    pytest.importorskip("deepspeed")
    from loadgraph.integrations.deepspeed import prepare_zero3
    from loadgraph.loading.dispatch import LoadingError

    spec = {"source": {"model": str(models("llama"))}, "quantize": {"method": "bnb-nf4"}}
    with pytest.raises(LoadingError, match="quantized base"):
        prepare_zero3(spec, {"zero_optimization": {"stage": 3}})


def test_register_zero3_needs_stage_3():
    pytest.importorskip("deepspeed")
    from loadgraph.integrations.deepspeed import register_zero3
    from loadgraph.loading.dispatch import LoadingError

    with pytest.raises(LoadingError, match="stage must be 3"):
        register_zero3({"zero_optimization": {"stage": 2}})
