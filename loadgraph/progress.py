"""What a build shows while it runs: the plan at once, then one live line per running node.

A node's line shows units done/total, bytes in human units, throughput and time left; it
moves while a unit runs (units report the fraction they have written, also from Ray
workers). A finished node's line collapses into one plain line, and the summary table
follows at the end. Without a terminal (CI logs, pipes) the same events print as plain lines.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, Task, TextColumn
from rich.text import Text

from loadgraph.pipeline.graph import Node
from loadgraph.pipeline.plan import PlanRow
from loadgraph.pipeline.runner import NodeReport
from loadgraph.pipeline.stage import Unit
from loadgraph.render.plan import plan_table
from loadgraph.render.text import human_bytes, human_rate


class _NodeState:
    """A running node's units: finished ones count whole, running ones by their reported fraction."""

    def __init__(self, units: list[Unit], done: int):
        self.units = {u.id: u for u in units}
        self.finished: set[str] = {u.id for u in units[:done]}
        self.running: dict[str, float] = {}
        self.nbytes = sum(u.nbytes for u in units)
        self.started = time.monotonic()
        self.resumed_bytes = sum(u.nbytes for u in units[:done])

    def completed(self) -> float:
        """Progress in bytes, or in units when the node's units read no bytes (inspect, checks)."""
        if self.nbytes:
            done = sum(self.units[u].nbytes for u in self.finished)
            return done + sum(self.units[u].nbytes * f for u, f in self.running.items())
        return len(self.finished) + sum(self.running.values())

    def total(self) -> float:
        return float(self.nbytes or len(self.units) or 1)


class _Figures(ProgressColumn):
    """units 3/12 · 1.2/4.5 MB · 31 kB/s · ETA 0:12, from the node state (rich's own speed and
    download columns show raw byte counts beside the human ones, and no unit count)."""

    def __init__(self, states: dict[int, _NodeState]):
        super().__init__()
        self.states = states

    def render(self, task: Task) -> Text:
        state = self.states.get(task.id)
        if state is None:  # a phase line ("starting the ray executor")
            return Text("")
        parts = [f"{len(state.finished)}/{len(state.units)} unit{'s' if len(state.units) != 1 else ''}"]
        if state.nbytes:
            done = state.completed()
            parts.append(f"{human_bytes(done)} of {human_bytes(state.nbytes)}")
            elapsed = time.monotonic() - state.started
            fresh = done - state.resumed_bytes
            rate = human_rate(fresh, elapsed)
            if rate:
                parts.append(rate)
                left = (state.nbytes - done) / (fresh / elapsed) if fresh > 0 else None
                if left is not None:
                    parts.append(f"ETA {int(left) // 60}:{int(left) % 60:02d}")
        else:
            parts.append(f"{time.monotonic() - state.started:.0f} s")
        return Text("  ".join(parts), no_wrap=True, overflow="ellipsis")


class RichReporter:
    """Reporter for `loadgraph build` / `prefetch`; `console` is the screen (stderr)."""

    def __init__(self, console: Console):
        self.console = console
        self.live = console.is_terminal
        self.states: dict[int, _NodeState] = {}
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(bar_width=10),
            _Figures(self.states),
            console=console,
            transient=True,
            # Third-party output is the noise filter's business (quiet.py): never route it here.
            redirect_stdout=False,
            redirect_stderr=False,
            disable=not self.live,
            refresh_per_second=4,
        )
        self.tasks: dict[str, int] = {}
        self.phase_task: int | None = None
        self._plan: list[PlanRow] | None = None

    def __enter__(self) -> "RichReporter":
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._end_phase()
        self.progress.stop()

    # -- what the runner reports --------------------------------------------------------
    def planned(self, rows: list[PlanRow]) -> None:
        if self.live:
            self.console.print(plan_table(rows))
        else:
            # In a log, bad input found by the checks after planning must stay one line: the
            # plan is printed once the first node is under way.
            self._plan = rows

    def _flush_plan(self) -> None:
        if self._plan is not None:
            self.console.print(plan_table(self._plan))
            self._plan = None

    def phase(self, text: str) -> None:
        """A transient status line (planning, checks, starting Ray); live terminals only."""
        self._end_phase()
        if self.live:
            self.phase_task = self.progress.add_task(text + " …", total=None)

    def _end_phase(self) -> None:
        if self.phase_task is not None:
            self.progress.remove_task(self.phase_task)
            self.phase_task = None

    def node_started(self, node: Node, units: list[Unit], done: int) -> None:
        self._end_phase()
        self._flush_plan()
        state = _NodeState(units, done)
        label = f"{node.stage:<8} {node.key[:8]}"
        if done:
            label += f" (resuming at {done}/{len(units)})"
        task = self.progress.add_task(label, total=state.total(), completed=state.completed())
        self.states[task] = state
        self.tasks[node.key] = task
        if not self.live:
            what = f", {human_bytes(state.nbytes)} to read" if state.nbytes else ""
            self.console.print(f"  {node.stage:<8} {node.key[:8]}  building {len(units)} unit{'s' if len(units) != 1 else ''}{what}" + (f" ({done} done before)" if done else ""), highlight=False)

    def unit_progress(self, node: Node, unit: Unit, fraction: float) -> None:
        task = self.tasks.get(node.key)
        if task is None:
            return
        state = self.states[task]
        if unit.id not in state.finished:
            state.running[unit.id] = fraction
            self.progress.update(task, completed=state.completed())

    def unit_finished(self, node: Node, unit: Unit, result: dict) -> None:
        task = self.tasks.get(node.key)
        if task is None:
            return
        state = self.states[task]
        state.running.pop(unit.id, None)
        state.finished.add(unit.id)
        self.progress.update(task, completed=state.completed())

    def node_finished(self, node: Node, report: NodeReport) -> None:
        self._flush_plan()
        task = self.tasks.pop(node.key, None)
        if task is not None:
            self.progress.remove_task(task)
            self.states.pop(task, None)
        if report.status != "built":
            return  # cached and not-needed nodes were in the plan; they are in the summary
        rate = human_rate(report.bytes, report.seconds)
        line = f"  done {node.stage:<8} {node.key[:8]}  {report.units_total} unit{'s' if report.units_total != 1 else ''} ({report.units_reused} reused)  {report.seconds:.1f} s"
        if report.bytes:
            line += f"  {human_bytes(report.bytes)}" + (f"  {rate}" if rate else "")
        self.console.print(line, highlight=False)
