"""The stage contract shared by every stage and every executor.

A stage is a pure function of (input artifacts, params) that writes one output artifact. It
splits its work into units (usually one per output shard); each unit reads only what it
needs and writes its own files, so executors can fan units out and the cache can resume a
killed build at the next unfinished unit. Stages know tensors, never Ray.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Protocol

from loadgraph.pipeline.cache import Artifact, Cache


def canonical_json(doc: Any) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def node_key(stage: str, version: int, params: dict, inputs: dict[str, str]) -> str:
    """sha256 of {stage, version, params, input keys}: the content address of a node's output
    (a few hundred bytes of JSON: the hash's speed is irrelevant, its stability is not)."""
    doc = {"stage": stage, "version": version, "params": params, "inputs": inputs}
    return hashlib.sha256(canonical_json(doc).encode()).hexdigest()


@dataclass(frozen=True)
class Unit:
    """One independently cached piece of a stage's work (payload must be JSON-serialisable)."""

    id: str
    payload: dict = field(default_factory=dict)
    nbytes: int = 0  # bytes the unit reads: drives progress and the executor's memory estimate
    gpu: bool = False


@dataclass
class NodeContext:
    """What a stage sees of its node: params (in the key), runtime (not in the key), inputs."""

    key: str
    params: dict
    runtime: dict
    inputs: dict[str, Artifact]
    cache: Cache
    # Fraction (0..1) of the running unit done; stages pass it to their ShardWriter so that
    # progress moves while a unit runs, not only when it finishes.
    progress: Callable[[float], None] = lambda fraction: None
    # Inputs this build produced itself: their digests were computed as they were written, so
    # units read them without hashing them again. Others are checked tensor by tensor on read.
    trusted: frozenset[str] = frozenset()
    # For a stage with a layout: the directory holding the node's prepared output files, which
    # its units fill at the planned offsets (shared by the units, kept for resume).
    staging: Path | None = None
    # Fused with the next stage (pipeline/fusion.py): where a unit hands each output tensor, in
    # memory, so the consumer's units never read back what this one wrote.
    downstream: "TensorSink | None" = None

    def input(self, name: str = "model") -> Artifact:
        return self.inputs[name]


class TensorSink(Protocol):
    """A consumer stage's fused units, fed by the producer's unit tensor by tensor (in its order)."""

    def verbatim(self, name: str) -> bool:
        """Whether the consumer keeps the tensor's bytes as they are (it then takes them by `copy`)."""

    def buffer(self, nbytes: int) -> Any:
        """Where the producer may build a tensor it then hands over (pinned for a GPU consumer)."""

    def take(self, name: str, tensor: Any) -> None:
        """Consume one finished output tensor of the producer (synchronously: the caller reuses it)."""

    def copy(self, name: str, chunks: Iterable[memoryview]) -> Iterable[memoryview]:
        """Pass a verbatim tensor's byte chunks through, writing them on the way."""

    def finish(self) -> dict[str, dict]:
        """The consumer units' results (unit id -> result), once every tensor was taken."""

    def abort(self) -> None: ...


class Stage:
    """Base class; subclasses set name/version and implement units/run_unit/finalize."""

    name: ClassVar[str]
    version: ClassVar[int] = 1

    def units(self, ctx: NodeContext) -> list[Unit]:
        raise NotImplementedError

    def thread_safe(self, ctx: NodeContext) -> bool:
        """Whether units of this node may run on threads of one process (the local executor)."""
        return True

    def prepare(self, ctx: NodeContext) -> bool:
        """Fill this process's caches the node's units share (imports, plans, adapter tensors)
        before they start together on threads; False where there is nothing to fill, and the
        local executor then runs the first unit alone (imports of transformers' lazy modules
        and PEFT are not thread-safe)."""
        return False

    def layout(self, ctx: NodeContext):
        """The output files planned up front (formats.layout.Layout), when the units write into
        shared files at final offsets rather than each its own files; None otherwise."""
        return None

    def run_unit(self, ctx: NodeContext, unit: Unit, out: Path) -> dict:
        """Write the unit's files into `out`; return a small JSON result.

        The result's "files" ({relpath: {size, blake3}}) are linked into the artifact;
        "tensors" ({name: {dtype, shape, file, begin, end, blake3}}) join the manifest's tensor
        table. A stage with a layout writes into `ctx.staging` and returns no "files".
        """
        raise NotImplementedError

    def finalize(self, ctx: NodeContext, results: dict[str, dict], out: Path) -> dict:
        """Write the artifact's remaining files (index, config...) into `out`; return manifest extras."""
        return {}

    def prospect(self, ctx: NodeContext, out: Path) -> dict | None:
        """Before any unit runs, what a consumer plans from: the small files the artifact will
        carry (written into `out`) and its tensor table without digests ({"tensors": ...});
        None for a stage whose output cannot be known up front (it is then never fused)."""
        return None

    def sink(self, ctx: NodeContext, units: list[Unit]) -> TensorSink | None:
        """These units of this node fed in memory by the producer's unit that makes their input
        tensors (ctx.inputs["model"] is then the producer's prospect); None if the stage cannot."""
        return None


_STAGE_MODULES = {
    "fetch": "loadgraph.stages.fetch",
    "inspect": "loadgraph.stages.inspect",
    "export": "loadgraph.stages.export",
    "merge": "loadgraph.stages.adapter",
    "attach": "loadgraph.stages.adapter",
    "quantize": "loadgraph.stages.quantize",
    "verify": "loadgraph.stages.verify",
    "convert": "loadgraph.stages.convert",
}


def get_stage(name: str) -> Stage:
    """Import lazily: planning a cached build must not import torch."""
    module = importlib.import_module(_STAGE_MODULES[name])
    return module.STAGES[name]()


def stage_version(name: str) -> int:
    module = importlib.import_module(_STAGE_MODULES[name])
    return module.STAGES[name].version
