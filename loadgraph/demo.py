"""`make demo`: the product on a tiny model, offline, in under a minute after set-up.

Makes a tiny Llama and a LoRA adapter, prints the spec, plans and builds merge + NF4 + verify +
export on an embedded local Ray (live progress, then the summary), loads the export with
transformers and generates a few tokens, builds again (everything cached, no Ray), and writes
the DAG picture (SVG with Graphviz, else DOT).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.syntax import Syntax

# float32 explicitly: the tiny model is float32, and `dtype: auto` would leave the choice to
# each stage; the verify's logits check compares like with like.
SPEC = """\
# Written by `make demo`: merge a LoRA into a tiny Llama, NF4, verify, export.
source:
  model: ./model
dtype: float32
adapters:
  - path: ./adapter          # a PEFT LoRA (r=8, all linear layers)
quantize:
  method: bnb-nf4
  double_quant: true
verify: true                 # loads, finite, logits vs the unquantized merge
export:
  path: ./out/tiny-llama-merged-nf4
  max_shard_size: 200KB
"""
PROMPT = "The build graph"

console = Console(stderr=True, highlight=False)


def _step(title: str) -> None:
    console.rule(f"[bold]{title}", align="left")


def _run(*args: str) -> None:
    console.print(f"$ loadgraph {' '.join(args)}", style="bold cyan")
    t0 = time.perf_counter()
    code = subprocess.call([sys.executable, "-m", "loadgraph.cli", *args])
    console.print(f"(exit {code}, {time.perf_counter() - t0:.1f} s)", style="dim")
    if code:
        raise SystemExit(code)


def _set_up(root: Path) -> None:
    from loadgraph.quiet import NoiseFilter
    from loadgraph.testing import make_lora_adapter, make_tiny_model

    with NoiseFilter(root / "setup.log", console):  # transformers' progress bars and warnings
        make_tiny_model("llama", root / "model", dtype="float32", max_shard_size="200KB")
        make_lora_adapter(root / "model", root / "adapter", r=8, seed=1)


def _load_and_generate(export: Path, log: Path) -> None:
    """What a user does next: load the export with transformers and generate."""
    from loadgraph.quiet import NoiseFilter

    with NoiseFilter(log, console):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(export)
        model = AutoModelForCausalLM.from_pretrained(export)
        ids = tokenizer(PROMPT, return_tensors="pt").input_ids
        with torch.no_grad():
            generated = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(generated[0, ids.shape[1]:])
        quant = getattr(model.config, "quantization_config", None)
    console.print(f"AutoModelForCausalLM.from_pretrained({export.name!r}): {type(model).__name__}, "
                  f"{'4-bit ' + quant.bnb_4bit_quant_type if quant is not None and quant.load_in_4bit else 'not quantized'}")
    console.print(f"generate({PROMPT!r}, 8 new tokens, greedy) -> ids {generated[0, ids.shape[1]:].tolist()} = {text!r}")
    console.print("(random tiny weights: the words are noise; it loads and generates)", style="dim")


def main() -> None:
    root = Path(".demo").absolute()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["LOADGRAPH_CACHE"] = str(root / "cache")
    _step("set-up: a tiny Llama checkpoint and a LoRA adapter, made offline")
    t_setup = time.perf_counter()
    _set_up(root)
    console.print(f"{root / 'model'}, {root / 'adapter'} ({time.perf_counter() - t_setup:.1f} s)")
    t0 = time.perf_counter()
    (root / "spec.yaml").write_text(SPEC)
    os.chdir(root)
    _step("the spec")
    console.print(Syntax(SPEC, "yaml", theme="ansi_dark", background_color="default"))
    # `build` shows the plan first (what is cached, what it will build), before Ray starts.
    _step("build: plan, then merge, nf4, export, verify as tasks on a local Ray")
    _run("build", "spec.yaml", "--json", "report.json")
    _step("use it: load the export with transformers and generate")
    _load_and_generate(root / "out" / "tiny-llama-merged-nf4", root / "load.log")
    _step("build again: every node cached, Ray not started")
    _run("build", "spec.yaml")
    _step("the DAG")
    if shutil.which("dot"):
        _run("plan", "spec.yaml", "--svg", "dag.svg")
        picture = root / "dag.svg"
    else:
        console.print("$ loadgraph plan spec.yaml --dot > dag.dot   (Graphviz is not installed: `dot -Tsvg dag.dot` renders it)", style="bold cyan")
        with open(root / "dag.dot", "w", encoding="utf-8") as f:
            subprocess.check_call([sys.executable, "-m", "loadgraph.cli", "plan", "spec.yaml", "--dot"], stdout=f)
        picture = root / "dag.dot"
    console.print(f"DAG picture: {picture}")
    console.print(f"\ndemo done in {time.perf_counter() - t0:.1f} s after set-up; report: {root / 'report.json'}", style="bold")


if __name__ == "__main__":
    main()
