"""The end-of-build summary: one row per node, the verify figures, what each export holds."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.text import Text

from loadgraph.pipeline.runner import BuildReport, NodeReport
from loadgraph.render.text import human_bytes, human_rate, table


def _units(n: NodeReport) -> tuple[str, str]:
    if n.status != "built":
        return "", ""
    return str(n.units_total), str(n.units_reused)  # 0 reused is an answer, not a blank


def node_row(n: NodeReport) -> list[str]:
    built = n.status == "built"
    units, reused = _units(n)
    return [
        f"{n.stage} {n.key[:8]}",
        n.status,
        units,
        reused,
        f"{n.seconds:.1f}" if built else "",
        human_bytes(n.bytes) if built else "",
        human_bytes(n.bytes_written) if built else "",
        human_rate(n.bytes, n.seconds) if built else "",
    ]


def verify_lines(report: BuildReport) -> list[str]:
    """The verify checks' one-line figures against their bounds (details["verify"]["summary"]).
    Reports from a verify that writes no summary show nothing here (its figures stay in --json)."""
    lines = []
    for n in report.nodes:
        figures = n.details.get("verify") if isinstance(n.details, dict) else None
        summary = figures.get("summary") if isinstance(figures, dict) else None
        if not summary:
            continue
        targets = ", ".join(sorted({label.split(":", 1)[0] for label in n.labels})) or n.key[:8]
        lines.append(f"verify {n.key[:8]} ({targets}):")
        lines += [f"  {line}" for line in summary if isinstance(line, str)]
    return lines


def export_lines(report: BuildReport) -> list[str]:
    lines = []
    for t in report.targets:
        if not t.get("export"):
            continue
        holds = t.get("holds") or {}
        parts = []
        if holds:
            parts.append(f"{holds['shards']} shard{'s' if holds['shards'] != 1 else ''}, {human_bytes(holds['bytes'])}")
            total = sum(holds["dtypes"].values()) or 1
            parts.append(" ".join(f"{d} {100 * b / total:.0f}%" for d, b in holds["dtypes"].items()))
            if holds.get("quantization"):
                parts.append(holds["quantization"])
            if holds.get("adapters"):
                parts.append(f"{holds['adapters']} attached adapter(s)")
        lines.append(f"{t['name']} -> {t['export']} ({t.get('export_status', '?')})")
        if parts:
            lines.append("  " + "; ".join(parts))
    return lines


def summary(report: BuildReport, wall_s: float | None = None) -> RenderableType:
    """`wall_s`: seconds since the command started (planning included); else the report's own."""
    seconds = wall_s if wall_s is not None else report.seconds
    how = f"{report.executor} executor" if report.executor else "all cached, no executor started"
    t = table(f"build {'ok' if report.ok else 'FAILED'} in {seconds:.1f} s ({how})", "node", "status", "units", "reused", "s", "read", "written", "rate")
    t.columns[0].no_wrap = True
    for col in t.columns[2:]:
        col.justify = "right"
    for n in report.nodes:
        t.add_row(*node_row(n))
    extra = verify_lines(report) + export_lines(report)
    if report.corrupt_rebuilt:
        extra.append(f"{report.corrupt_rebuilt} damaged cache input(s) found, evicted and rebuilt")
    return Group(t, *(Text(line, overflow="fold") for line in extra))
