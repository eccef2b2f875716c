"""Spec -> DAG of nodes. A node's key hashes its stage, stage version, params and input keys.

Compiling resolves sources and checks every input a stage will need (headers, adapter
shapes, export destination) so bad input fails here, in seconds, before any work.
Nodes with equal keys are one node: batch targets that share a base build it once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from loadgraph.formats.checkpoint import parse_size
from loadgraph.pipeline.cache import Cache
from loadgraph.pipeline.stage import node_key, stage_version
from loadgraph.spec import BuildSpec


@dataclass
class Node:
    key: str
    stage: str
    params: dict
    inputs: dict[str, str]  # input name -> key of the producing node
    runtime: dict = field(default_factory=dict)  # locators that must not enter the key (paths)
    labels: list[str] = field(default_factory=list)

    @property
    def short(self) -> str:
        return self.key[:12]

    def describe(self) -> dict:
        """What an executor needs to run this node's units anywhere (small, JSON-safe)."""
        return {"key": self.key, "stage": self.stage, "params": self.params, "runtime": self.runtime, "inputs": self.inputs}


@dataclass
class Target:
    name: str
    spec: BuildSpec
    final: str  # key of the node whose artifact is the target's product
    export_path: str | None


@dataclass
class Graph:
    nodes: dict[str, Node] = field(default_factory=dict)  # insertion order is a topological order
    targets: list[Target] = field(default_factory=list)

    def add(self, stage: str, params: dict, inputs: dict[str, str], label: str, runtime: dict | None = None) -> Node:
        key = node_key(stage, stage_version(stage), params, inputs)
        node = self.nodes.get(key)
        if node is None:
            node = self.nodes[key] = Node(key, stage, params, inputs, runtime or {})
        if label not in node.labels:
            node.labels.append(label)
        return node


def compile_specs(specs: list[BuildSpec], cache: Cache) -> Graph:
    graph = Graph()
    for spec in specs:
        graph.targets.append(_compile_target(graph, spec, cache))
    return graph


def _compile_target(graph: Graph, spec: BuildSpec, cache: Cache) -> Target:
    from loadgraph.stages.fetch import resolve_source

    params, runtime = resolve_source(spec.source, cache)
    fetched = graph.add("fetch", params, {}, f"{spec.name}: fetch {Path(spec.source.model).name}", runtime)
    current = graph.add("inspect", {}, {"model": fetched.key}, f"{spec.name}: inspect")
    # Later stages (adapters, quantize, verify) slot in here, each consuming `current`.
    export_path = None
    if spec.export is not None:
        export_params = {
            "max_shard_size": parse_size(spec.export.max_shard_size, "export.max_shard_size"),
            "dtype": spec.dtype,
            "copy_tokenizer": spec.export.copy_tokenizer,
        }
        current = graph.add("export", export_params, {"model": current.key}, f"{spec.name}: export")
        export_path = spec.export.path
    return Target(spec.name, spec, current.key, export_path)
