"""Rich progress bars per stage and per work unit, and the end-of-build summary table."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn
from rich.table import Table

from loadgraph.pipeline.graph import Node
from loadgraph.pipeline.runner import BuildReport, NodeReport
from loadgraph.pipeline.stage import Unit


class RichReporter:
    """One bar per node: units done, bytes processed and bytes/s."""

    def __init__(self, console: Console):
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
            disable=not console.is_terminal,
        )
        self.console = console
        self.tasks: dict[str, tuple[int, int]] = {}

    def __enter__(self) -> "RichReporter":
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def node_started(self, node: Node, units: list[Unit], done: int) -> None:
        total_bytes = sum(u.nbytes for u in units) or 1
        label = f"{node.stage:<8} {node.short}"
        if done:
            label += f" (resuming: {done}/{len(units)} units done)"
        bytes_task = self.progress.add_task(label, total=total_bytes)
        done_bytes = sum(u.nbytes for u in units[:done])
        self.progress.update(bytes_task, completed=done_bytes)
        self.tasks[node.key] = (bytes_task, len(units))

    def unit_finished(self, node: Node, unit: Unit, result: dict) -> None:
        task, _ = self.tasks[node.key]
        self.progress.advance(task, unit.nbytes)

    def node_finished(self, node: Node, report: NodeReport) -> None:
        if not self.progress.disable:
            return
        note = "cached" if report.status == "cached" else f"built {report.units_total} units ({report.units_reused} reused) in {report.seconds:.1f}s"
        self.console.print(f"{node.stage:<8} {node.short}  {note}")


def summary_table(report: BuildReport) -> Table:
    table = Table(title=f"build {'ok' if report.ok else 'FAILED'} in {report.seconds:.2f}s" + (f" ({report.executor} executor)" if report.executor else " (all cached)"))
    for col in ("stage", "key", "status", "units", "reused", "seconds", "MB/s"):
        table.add_column(col)
    for n in report.nodes:
        rate = f"{n.bytes / n.seconds / 1e6:.0f}" if n.seconds > 0 and n.bytes else ""
        table.add_row(n.stage, n.key[:12], n.status, str(n.units_total or ""), str(n.units_reused or ""), f"{n.seconds:.2f}" if n.seconds else "", rate)
    for t in report.targets:
        if t.get("export"):
            table.caption = (table.caption or "") + f"{t['name']} -> {t['export']} ({t['export_status']})\n"
    return table
