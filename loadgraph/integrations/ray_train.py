"""Ray Train: build the artifact once for the whole cluster, prefetch it to every node, and hand
each TorchTrainer worker the model loaded from that one artifact.

The driver builds (or finds cached) the spec's artifact and passes only its key and the cache
root to the workers: tensor bytes never travel through Ray's object store (DESIGN: the cache is
reachable from every node). A worker loads by key and never builds, so N workers cannot start N
merges, and every worker trains exactly the same base. Prefetching reads the artifact once on
each node, checking sizes against the manifest, so that the workers' first load does not race on
a cold network filesystem, and a node that cannot see the cache fails before training starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

from loadgraph.errors import BuildError
from loadgraph.loading.builder import build_artifact, open_cache
from loadgraph.loading.training import LoadedModel, load, resolve_spec

READ_CHUNK = 8 * 2**20


@dataclass(frozen=True)
class PreparedArtifact:
    """Everything a worker needs to load the driver's artifact (small and picklable)."""

    key: str
    cache_root: str
    spec: dict  # the BuildSpec as JSON: its dtype and source flags shape the load
    training: dict  # TrainingArgs as JSON
    built_stages: list[str] = field(default_factory=list)  # what the driver's build computed
    prefetched: list[dict] = field(default_factory=list)  # one record per node


def prepare(spec: Any, *, training: dict | None = None, cache: Any = None, executor: str = "local", prefetch: bool = True) -> PreparedArtifact:
    """On the driver: build the spec (once, through the cache) and prefetch it to every alive node."""
    build, args = resolve_spec(spec, True, training)
    store = open_cache(cache)
    artifact = build_artifact(build, store, executor)
    prefetched = prefetch_to_nodes(artifact.key, str(store.root)) if prefetch else []
    return PreparedArtifact(
        key=artifact.key,
        cache_root=str(store.root),
        spec=build.model_dump(mode="json"),
        training=args.model_dump(mode="json"),
        built_stages=artifact.built_stages,
        prefetched=prefetched,
    )


def read_artifact(cache_root: str, key: str) -> dict:
    """Read every file of the artifact once (warming this node's page cache), checking sizes."""
    from loadgraph.pipeline.cache import Cache

    art = Cache(cache_root).get(key)
    if art is None:
        raise BuildError(f"artifact {key[:12]} is not visible from this node's cache at {cache_root}; the cache must be shared by every node")
    total = 0
    for rel, meta in art.files.items():
        with open(art.path / rel, "rb", buffering=0) as fh:
            while chunk := fh.read(READ_CHUNK):
                total += len(chunk)
        if (art.path / rel).stat().st_size != meta["size"]:
            raise BuildError(f"{art.path / rel}: size differs from the manifest on this node")
    return {"bytes": total, "files": len(art.files)}


def prefetch_to_nodes(key: str, cache_root: str) -> list[dict]:
    """One task pinned to each alive node reads the artifact there; returns one record per node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"))

    @ray.remote(num_cpus=0, max_retries=2)
    def _read(cache_root: str, key: str) -> dict:
        return {**read_artifact(cache_root, key), "node_id": ray.get_runtime_context().get_node_id(), "key": key}

    refs = [
        _read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(cache_root, key)
        for node in ray.nodes()
        if node.get("Alive")
    ]
    return ray.get(refs)


def load_in_worker(prepared: PreparedArtifact, device_map: Any = None) -> LoadedModel:
    """Inside a Ray Train worker: load the driver's artifact by key (never builds) and prepare it to train."""
    from loadgraph.spec import BuildSpec

    spec = BuildSpec.model_validate(prepared.spec)
    return load(spec, trainable=True, training=prepared.training, cache=prepared.cache_root, key=prepared.key, device_map=device_map)


def torch_trainer(
    prepared: PreparedArtifact,
    train_loop: Callable[[LoadedModel, Any, dict], None],
    *,
    scaling_config: Any,
    run_config: Any = None,
    train_loop_config: dict | None = None,
    wrap_ddp: bool = True,
):
    """A TorchTrainer whose workers each call `train_loop(loaded, model, config)`.

    `loaded` is the LoadedModel (tokenizer, artifact key); `model` is the same model wrapped for
    distributed training by `ray.train.torch.prepare_model` (DDP, on the worker's device) unless
    `wrap_ddp` is False. On CPU-only clusters the process group uses gloo.
    """
    from ray.train.torch import TorchConfig, TorchTrainer

    def per_worker(config: dict) -> None:
        import ray.train.torch

        loaded = load_in_worker(prepared)
        model = ray.train.torch.prepare_model(loaded.model) if wrap_ddp else loaded.model
        train_loop(loaded, model, config)

    backend = "nccl" if getattr(scaling_config, "use_gpu", False) else "gloo"
    return TorchTrainer(
        per_worker,
        train_loop_config=train_loop_config or {},
        scaling_config=scaling_config,
        run_config=run_config,
        torch_config=TorchConfig(backend=backend),
    )

