"""What a build reports: per node (status, units, bytes, timings, where units ran, when it ran)
and for the whole build; and the Reporter protocol the CLI's live display implements."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol

from loadgraph.pipeline.graph import Node
from loadgraph.pipeline.plan import PlanRow
from loadgraph.pipeline.stage import Unit


@dataclass
class NodeReport:
    key: str
    stage: str
    labels: list[str]
    status: str  # cached | built | not needed (evicted, but everything downstream is cached)
    units_total: int = 0
    units_reused: int = 0
    seconds: float = 0.0
    bytes: int = 0  # read by the units
    bytes_written: int = 0  # bytes the units wrote (links of unchanged files count as written)
    bytes_hashed: int = 0  # bytes the units hashed to check their inputs (not counting outputs)
    timings: dict = field(default_factory=dict)  # seconds summed over its units: wall, read, hash, hash_out, write
    details: dict = field(default_factory=dict)  # e.g. verify's figures, from the manifest
    units: list[dict] = field(default_factory=list)  # per unit: id, reused, and where it ran (node id, ip, host)
    started: float = 0.0  # wall clock (epoch s) when the node began building: nodes may overlap
    ended: float = 0.0
    inputs: list[str] = field(default_factory=list)  # keys of the nodes it reads: the DAG's edges


@dataclass
class BuildReport:
    ok: bool = True
    executor: str = ""
    seconds: float = 0.0  # from the start of build(): checks, executor start-up and publishing included
    nodes: list[NodeReport] = field(default_factory=list)
    targets: list[dict] = field(default_factory=list)
    error: str | None = None
    corrupt_rebuilt: int = 0  # inputs found damaged (digest mismatch), evicted and rebuilt
    # What the driver process itself hashed (the CLI adds its plan's hashing) and its peak RSS:
    # with Ray, units and the driver's heavy chores run on the workers (pipeline/offload.py).
    driver_bytes_hashed: int = 0
    driver_peak_rss: int = 0
    # {"beside": True, "overruled": [keys]} when the checks ran in a child beside nodes built on
    # guessed plans, the overruled ones built again (pipeline/check_process.py)
    checks: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


class Reporter(Protocol):
    def planned(self, rows: list[PlanRow]) -> None: ...
    def phase(self, text: str) -> None: ...
    def node_started(self, node: Node, units: list[Unit], done: int) -> None: ...
    def unit_progress(self, node: Node, unit: Unit, fraction: float) -> None: ...
    def unit_finished(self, node: Node, unit: Unit, result: dict) -> None: ...
    def node_finished(self, node: Node, report: NodeReport) -> None: ...


class NullReporter:
    def planned(self, rows: list[PlanRow]) -> None: ...
    def phase(self, text: str) -> None: ...
    def node_started(self, node: Node, units: list[Unit], done: int) -> None: ...
    def unit_progress(self, node: Node, unit: Unit, fraction: float) -> None: ...
    def unit_finished(self, node: Node, unit: Unit, result: dict) -> None: ...
    def node_finished(self, node: Node, report: NodeReport) -> None: ...
