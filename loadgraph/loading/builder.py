"""Build one BuildSpec through the cache and hand back its product artifact.

The loader never loads a checkpoint the pipeline has not produced: a merge, a quantization or
a plain load all go through compile -> build -> cache, so a second identical call finds every
node cached (the build does no work and starts no executor) and only `from_pretrained` runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from loadgraph.errors import BuildError
from loadgraph.pipeline.cache import Artifact, Cache
from loadgraph.pipeline.runner import BuildReport
from loadgraph.spec import BuildSpec


@dataclass(frozen=True)
class BuiltArtifact:
    """The artifact a loader reads, with the build report that produced (or found) it."""

    key: str
    path: Path
    manifest: dict
    report: BuildReport

    @property
    def built_stages(self) -> list[str]:
        """Stages that did work in this call (empty when everything came from the cache)."""
        return [n.stage for n in self.report.nodes if n.status == "built"]

    @property
    def attached_adapters(self) -> list[dict]:
        """Adapters the artifact carries unmerged, each {"path": absolute dir, "scale", "key"}."""
        return [{**a, "path": self.path / a["path"]} for a in self.manifest.get("adapters", [])]


def open_cache(cache: Cache | str | os.PathLike | None) -> Cache:
    return cache if isinstance(cache, Cache) else Cache(cache)


def executor_factory(kind: str) -> Callable:
    """Local by default: a researcher's `load_pretrained_model` must not start a Ray cluster."""

    def make():
        if kind == "local":
            from loadgraph.pipeline.executors.local import LocalExecutor

            return LocalExecutor()
        if kind == "ray":
            from loadgraph.pipeline.executors.ray import RayExecutor

            return RayExecutor()
        from loadgraph.loading.dispatch import LoadingError

        raise LoadingError(f"executor: unknown executor {kind!r}; use 'local' or 'ray'")

    if kind not in ("local", "ray"):
        make()  # raise now, before compiling anything
    return make


def build_artifact(spec: BuildSpec, cache: Cache | str | os.PathLike | None = None, executor: str = "local") -> BuiltArtifact:
    from loadgraph.pipeline.graph import compile_specs
    from loadgraph.pipeline.runner import build

    store = open_cache(cache)
    factory = executor_factory(executor)
    graph = compile_specs([spec], store)
    report = build(graph, store, factory)
    target = graph.targets[0]
    art: Artifact | None = store.get(target.final)
    if art is None:  # published a moment ago: only a concurrent eviction can get here
        raise BuildError(f"{spec.name}: artifact {target.final[:12]} vanished from the cache at {store.root}; rerun")
    return BuiltArtifact(art.key, art.path, art.manifest, report)


def cached_artifact(key: str, cache: Cache | str | os.PathLike | None = None) -> BuiltArtifact:
    """An artifact someone else built (a Ray Train driver, rank 0): never builds, fails if absent."""
    store = open_cache(cache)
    art = store.get(key)
    if art is None:
        raise BuildError(f"artifact {key[:12]} is not in the cache at {store.root}; build it first (or check the cache is shared)")
    try:
        store.touch(key)
    except OSError:
        pass  # a read-only cache serves its entries without recording their use
    return BuiltArtifact(art.key, art.path, art.manifest, BuildReport(ok=True, executor="none"))
