"""The plan as a person reads it (a table) and as Graphviz draws it (DOT)."""

from __future__ import annotations

from rich.table import Table

from loadgraph.pipeline.plan import CACHED, NOT_NEEDED, PARTIAL, PlanRow
from loadgraph.render.text import human_bytes, table


def units_text(row: PlanRow) -> str:
    if row.status in (CACHED, NOT_NEEDED):
        return ""
    total = "?" if row.units_total is None else str(row.units_total)
    return f"{row.units_done}/{total}" if row.status == PARTIAL else total


def headline(rows: list[PlanRow]) -> str:
    todo = [r for r in rows if r.status not in (CACHED, NOT_NEEDED)]
    text = f"{len(rows)} nodes, {len(todo)} to build"
    known = [r.nbytes for r in todo if r.nbytes is not None]
    if known:
        text += f" ({human_bytes(sum(known))} to read{' so far' if len(known) < len(todo) else ''})"
    text += f", {sum(r.status == CACHED for r in rows)} cached"
    if any(r.status == NOT_NEEDED for r in rows):
        text += f", {sum(r.status == NOT_NEEDED for r in rows)} not needed (evicted; what reads them is cached)"
    return text


def plan_table(rows: list[PlanRow], title: str = "plan") -> Table:
    t = table(f"{title}: {headline(rows)}", "stage", "key", "status", "units", "reads", "target: what")
    t.columns[3].justify = t.columns[4].justify = "right"
    for r in rows:
        t.add_row(r.node.stage, r.node.short, r.status, units_text(r), human_bytes(r.nbytes) if r.status not in (CACHED, NOT_NEEDED) else "",
                  "\n".join(r.node.labels))
    return t


def plan_record(row: PlanRow) -> dict:
    n = row.node
    return {"stage": n.stage, "key": n.key, "status": row.status, "units_done": row.units_done, "units_total": row.units_total,
            "bytes": row.nbytes, "labels": n.labels, "inputs": n.inputs}


COLOURS = {CACHED: "palegreen", "to build": "orange", PARTIAL: "gold", NOT_NEEDED: "lightgrey"}


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(rows: list[PlanRow]) -> str:
    """The DAG in Graphviz DOT: one box per node (stage, short key, status, units), colour by status."""
    lines = ["digraph loadgraph {", "  rankdir=LR;", '  node [shape=box, style="rounded,filled", fontname="Helvetica"];']
    for r in rows:
        units = units_text(r)
        parts = (r.node.stage, r.node.short, r.status + (f", {units} units" if units else ""))
        label = "\\n".join(_quote(p)[1:-1] for p in parts)  # \n: DOT's line break inside a label
        fill = COLOURS.get(r.status, "white")
        lines.append(f'  n{r.node.short} [label="{label}", fillcolor={fill}, tooltip={_quote("; ".join(r.node.labels))}];')
    for r in rows:
        for name, key in r.node.inputs.items():
            lines.append(f"  n{key[:12]} -> n{r.node.short} [label={_quote(name)}];")
    legend = " | ".join(f"{s}: {c}" for s, c in COLOURS.items())
    lines += [f"  label={_quote('status colours: ' + legend)};", "  fontsize=10;", "}"]
    return "\n".join(lines) + "\n"
