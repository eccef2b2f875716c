"""What a person sees, on captured output of a fixed-width (80 column) console: the plan, the live
per-node line, the summary with verify figures and the export, the noise filter, the DAG."""

from __future__ import annotations

import io
import json
import shutil
import sys
import warnings
from pathlib import Path

import pytest
from rich.console import Console

from conftest import run_cli, write_spec
from loadgraph.pipeline.graph import Node
from loadgraph.pipeline.plan import PlanRow
from loadgraph.pipeline.runner import BuildReport, NodeReport
from loadgraph.pipeline.stage import Unit
from loadgraph.progress import RichReporter
from loadgraph.quiet import NoiseFilter
from loadgraph.render.plan import plan_table, to_dot
from loadgraph.render.summary import summary
from loadgraph.render.text import abbreviate_middle, human_bytes, human_rate

WIDTH = 80


def screen(terminal: bool = False) -> Console:
    return Console(file=io.StringIO(), width=WIDTH, force_terminal=terminal, color_system=None, legacy_windows=False)


def text_of(renderable) -> str:
    c = screen()
    c.print(renderable)
    return c.file.getvalue()


def node(stage: str, key: str, labels: list[str], inputs: dict | None = None) -> Node:
    return Node(key=key * (64 // len(key)), stage=stage, params={}, inputs=inputs or {}, labels=labels)


def report() -> BuildReport:
    verify = {"summary": ["merge: max 0 ulp (bound 1)", "nf4: worst block 0.41 of bound", "smoke: skipped (model 140 GB > 24 GB RAM)"]}
    return BuildReport(
        ok=True,
        executor="ray",
        seconds=41.0,
        nodes=[
            NodeReport("a1" * 32, "fetch", ["chat-bnb-nf4: fetch base"], "cached"),
            NodeReport("b2" * 32, "merge", ["chat-bnb-nf4: merge 1 adapter(s)"], "built", units_total=4, units_reused=0, seconds=12.5, bytes=3_000_000_000, bytes_written=3_000_000_000),
            NodeReport("c3" * 32, "inspect", ["chat-bnb-nf4: inspect"], "not needed"),
            NodeReport("d4" * 32, "quantize", ["chat-bnb-nf4: quantize"], "built", units_total=4, units_reused=1, seconds=3.0, bytes=307_350, bytes_written=90_000),
            NodeReport("e5" * 32, "verify", ["chat-bnb-nf4: verify"], "built", units_total=3, seconds=2.0, details={"verify": verify}),
        ],
        targets=[{"name": "chat-bnb-nf4", "key": "e5" * 32, "export": "/data/exports/llama-2-7b-chat-merged-bnb-nf4", "export_status": "published",
                  "holds": {"shards": 2, "bytes": 3_900_000_000, "dtypes": {"U8": 3_000_000_000, "BF16": 900_000_000}, "quantization": "bnb-nf4", "adapters": 0}}],
    )


def test_summary_at_80_columns_has_units_rates_verify_figures_and_export():
    out = text_of(summary(report(), wall_s=49.3))
    lines = out.splitlines()
    assert all(len(line) <= WIDTH for line in lines), out
    assert "build ok in 49.3 s (ray executor)" in out  # the command's wall time, planning included
    merge = next(line for line in lines if line.lstrip().startswith("merge"))
    assert merge.split()[2:7] == ["built", "4", "0", "12.5", "3.00"]  # reused 0 shown, not blank
    assert merge.rstrip().endswith("240 MB/s")  # two significant digits, human units
    quantize = next(line for line in lines if line.lstrip().startswith("quantize"))
    assert "1" in quantize.split() and quantize.rstrip().endswith("100 kB/s")  # 307 kB in 3 s, not "0"
    assert "not needed" in out
    for figure in report().nodes[-1].details["verify"]["summary"]:
        assert figure in out
    assert "chat-bnb-nf4 -> /data/exports/llama-2-7b-chat-merged-bnb-nf4 (published)" in out
    assert "2 shards, 3.90 GB; U8 77% BF16 23%; bnb-nf4" in out


def test_summary_without_verify_figures_shows_none():
    rep = report()
    rep.nodes[-1].details = {"verify": {"load-logits": {"relative_error": 0.1}}}  # today's verify: no "summary"
    out = text_of(summary(rep))
    assert "verify e5e5e5e5 (" not in out and "ulp" not in out
    assert "build ok in 41.0 s" in out


def test_plan_table_wraps_long_names_and_keeps_their_end():
    labels = [f"{a}-bnb-{q}: quantize bnb-{q}" for a in ("assistant-chat-v2+math-reasoning-r64", "assistant-chat-v2+code-r64") for q in ("nf4", "int8")]
    rows = [PlanRow(node("quantize", f"{i}f", [label]), "to build", 0, 4, 1_200_000_000) for i, label in enumerate(labels)]
    rows.append(PlanRow(node("fetch", "9a", ["x: fetch base"]), "not needed"))
    out = text_of(plan_table(rows))
    assert all(len(line) <= WIDTH for line in out.splitlines()), out
    assert "…" not in out  # nothing cut
    flat = "".join(out.split())
    for label in labels:
        assert "".join(label.split()) in flat
    assert "1.20 GB" in out and "not needed" in out


def test_live_line_shows_units_bytes_rate_and_eta_while_a_unit_runs():
    console = screen(terminal=True)
    with RichReporter(console) as reporter:
        n = node("merge", "ab", ["t: merge"])
        units = [Unit(id=f"shard-{i}", nbytes=100_000_000) for i in range(12)]
        reporter.node_started(n, units, 0)
        for u in units[:3]:
            reporter.unit_finished(n, u, {})
        reporter.unit_progress(n, units[3], 0.5)  # a unit half written: the line moves before it ends
        state = next(iter(reporter.states.values()))
        state.started -= 10  # as if 10 s had passed
        line = text_of(reporter.progress.make_tasks_table(reporter.progress.tasks)).rstrip("\n")
        inspect = node("inspect", "cd", ["t: inspect"])
        reporter.node_started(inspect, [Unit(id="headers")], 0)  # a unit that reads no bytes
        reporter.unit_finished(inspect, Unit(id="headers"), {})
        reporter.node_finished(inspect, NodeReport(inspect.key, "inspect", [], "built", units_total=1, seconds=0.1))
        assert [t.description for t in reporter.progress.tasks] == ["merge    abababab"]  # the finished node collapsed
    assert len(line) <= WIDTH, line
    assert "merge    abababab" in line and "3/12 units" in line and "350 MB of 1.20 GB" in line
    assert "35 MB/s" in line and "ETA 0:24" in line
    assert "done inspect  cdcdcdcd  1 unit (0 reused)" in console.file.getvalue()


def test_plain_output_without_a_terminal():
    console = screen(terminal=False)
    with RichReporter(console) as reporter:
        n = node("export", "ef", ["t: export"])
        reporter.planned([PlanRow(n, "to build", 0, 2, 2000)])
        reporter.phase("starting Ray")
        assert console.file.getvalue() == ""  # the plan waits until work starts: a bad-input error stays one line
        units = [Unit(id="a", nbytes=1000), Unit(id="b", nbytes=1000)]
        reporter.node_started(n, units, 1)
        reporter.unit_finished(n, units[1], {})
        reporter.node_finished(n, NodeReport(n.key, "export", [], "built", units_total=2, units_reused=1, seconds=0.5, bytes=1000))
    out = console.file.getvalue()
    assert "plan: 1 nodes, 1 to build (2.00 kB to read), 0 cached" in out
    assert "export   efefefef  building 2 units, 2.00 kB to read (1 done before)" in out
    assert "done export   efefefef  2 units (1 reused)  0.5 s  1.00 kB  2.0 kB/s" in out
    assert "\x1b[" not in out  # no cursor movement in a log


def test_text_helpers():
    assert human_bytes(307_350) == "307 kB" and human_bytes(13_480_000_000) == "13.5 GB" and human_bytes(0) == "0 B"
    assert human_rate(31_700, 1.0) == "32 kB/s" and human_rate(1e9, 1.0) == "1.0 GB/s" and human_rate(0, 1.0) == ""
    name = "model.language_model.layers.31.self_attn.q_proj.weight"
    short = abbreviate_middle(name, 30)
    assert len(short) == 30 and short.endswith("q_proj.weight") and "…" in short


NOISY = """
import logging, os, sys, warnings
from rich.console import Console
from loadgraph.quiet import NoiseFilter
import loadgraph.spec as own

with open(sys.argv[1], "w") as f:
    with NoiseFilter(__import__("pathlib").Path(sys.argv[2]), Console(file=f, width=80, color_system=None)):
        warnings.warn_explicit("`torch_dtype` is deprecated", FutureWarning, "/venv/site-packages/transformers/modeling_utils.py", 3312)
        logging.getLogger("kernels_hub").warning("Failed to load CPU gemm_4bit_forward from kernels-community")
        print("Loading weights: 100%|##########| 21/21", file=sys.stderr, flush=True)
        os.write(1, b"[WARNING] Setting accelerator to CPU.\\n")  # C-level writes too
        warnings.warn_explicit("keys for LLaMA-Factory's training loop are not used", UserWarning, own.__file__, 1)
    print("after the filter", file=sys.stderr)
"""


def test_noise_filter_sends_third_party_output_to_the_log_and_own_warnings_to_one_line(tmp_path):
    import subprocess

    shown, log = tmp_path / "screen.txt", tmp_path / "logs" / "build.log"
    proc = subprocess.run([sys.executable, "-c", NOISY, str(shown), str(log)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert shown.read_text().splitlines() == ["warning: keys for LLaMA-Factory's training loop are not used"]
    assert proc.stdout == "" and proc.stderr == "after the filter\n"  # nothing reached the real stdout/stderr; restored after
    logged = log.read_text()
    for noise in ("torch_dtype` is deprecated", "gemm_4bit_forward", "Loading weights", "Setting accelerator to CPU", "training loop are not used"):
        assert noise in logged, logged


def test_verbose_shows_third_party_warnings_live(tmp_path, capsys):
    with open(tmp_path / "screen.txt", "w") as f:
        with NoiseFilter(tmp_path / "build.log", Console(file=f, width=WIDTH), verbose=True):
            warnings.warn_explicit("live FutureWarning", FutureWarning, "/venv/site-packages/transformers/x.py", 1)
    assert "live FutureWarning" in capsys.readouterr().err and not (tmp_path / "build.log").exists()


def test_build_cli_is_quiet_and_logs_the_noise(models, tmp_path):
    spec = write_spec(tmp_path / "s.yaml", {"source": {"model": str(models("llama"))}, "export": {"path": "out"}})
    proc = run_cli("build", spec, "--executor", "local", "--cache", tmp_path / "cache", env={"COLUMNS": str(WIDTH)})
    assert proc.returncode == 0, proc.stderr
    assert "Loading weights" not in proc.stderr and "Warning" not in proc.stderr  # verify loads the model with transformers
    # Paths are printed whole (to be copied); everything else fits the width.
    assert all(len(line) <= WIDTH for line in proc.stderr.splitlines() if "/" not in line), proc.stderr
    log = Path(proc.stderr.split("third-party output: ", 1)[1].split()[0])
    assert "Loading weights" in log.read_text()
    plan_pos, summary_pos = proc.stderr.index("plan: 4 nodes, 4 to build"), proc.stderr.index("build ok in")
    assert plan_pos < proc.stderr.index("done fetch") < summary_pos
    assert proc.stdout == ""


def test_plan_dot_and_svg(models, tmp_path):
    spec = write_spec(tmp_path / "s.yaml", {"source": {"model": str(models("llama"))}, "verify": False, "export": {"path": "out"}})
    dot = run_cli("plan", spec, "--cache", tmp_path / "cache", "--dot")
    assert dot.returncode == 0, dot.stderr
    assert dot.stdout.startswith("digraph loadgraph {") and dot.stdout.count("->") == 2
    assert dot.stdout.count("fillcolor=orange") == 3 and '\\nto build, ' in dot.stdout  # status by colour, units per node
    svg = run_cli("plan", spec, "--cache", tmp_path / "cache", "--svg", tmp_path / "dag.svg")
    if shutil.which("dot") is None:
        assert svg.returncode == 2 and len(svg.stderr.strip().splitlines()) == 1 and "Graphviz is not installed" in svg.stderr
    else:
        assert svg.returncode == 0 and (tmp_path / "dag.svg").read_text().lstrip().startswith("<?xml")


def test_to_dot_colours_by_status():
    fetch = node("fetch", "aa", ["t: fetch m"])
    merge = node("merge", "bb", ["t: merge"], {"model": fetch.key})
    dot = to_dot([PlanRow(fetch, "cached"), PlanRow(merge, "partial", 2, 5)])
    assert "fillcolor=palegreen" in dot and "fillcolor=gold" in dot and "partial, 2/5 units" in dot
    assert f'n{fetch.short} -> n{merge.short} [label="model"];' in dot


def test_bad_flag_value_and_many_specs_for_plan(models, tmp_path):
    a = write_spec(tmp_path / "a.yaml", {"source": {"model": str(models("llama"))}, "verify": False})
    b = write_spec(tmp_path / "b.yaml", {"source": {"model": str(models("llama"))}, "dtype": "bfloat16", "verify": False})
    plan = run_cli("plan", a, b, "--cache", tmp_path / "cache", "--json")
    assert plan.returncode == 0, plan.stderr
    assert {label.split(":")[0] for r in json.loads(plan.stdout)["nodes"] for label in r["labels"]} == {"a", "b"}
    bad = run_cli("build", a, "--overwrite", "true", "--cache", tmp_path / "cache")
    assert bad.returncode == 2 and "take no value" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert "<bool>" not in run_cli("build", "--help").stdout


@pytest.mark.parametrize("typos", [{"sourc": 1, "expot": 1, "dtyp": 1}])
def test_all_unknown_keys_reported_at_once(typos, tmp_path):
    spec = write_spec(tmp_path / "s.yaml", {"source": {"model": "x", "revison": "main"}, **typos})
    proc = run_cli("build", spec, "--cache", tmp_path / "cache")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    for key, hint in (("sourc", "source"), ("expot", "export"), ("dtyp", "dtype"), ("source.revison", "revision")):
        assert f"'{key}' (did you mean '{hint}'?)" in proc.stderr, proc.stderr
