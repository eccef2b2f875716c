"""Every spec in examples/ builds as written: hub ids are swapped for tiny local stand-ins of
the same kind and local paths are made where the example expects them; nothing else changes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import run_cli
from loadgraph.testing import make_lora_adapter

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _batch_matrix(root: Path, models) -> dict[str, str]:
    shutil.copytree(models("llama"), root / "base")
    for i, name in enumerate(("chat", "code")):
        make_lora_adapter(root / "base", root / "adapters" / name, r=4, seed=i)
    return {}


def _merge_quantize_export(root: Path, models) -> dict[str, str]:
    shutil.copytree(models("llama"), root / "llama-2-7b")
    make_lora_adapter(root / "llama-2-7b", root / "checkpoints" / "llava-lora", r=4, seed=3)
    return {"meta-llama/Llama-2-7b-hf": "./llama-2-7b"}


def _llava_original(root: Path, models) -> dict[str, str]:
    from test_convert import make_original_llava, make_tower

    tower = make_tower(root / "clip")
    make_original_llava(root / "llava-v1.5-7b", "llama", "mlp2x_gelu", tower, pickle=True)
    return {"liuhaotian/llava-v1.5-7b": "./llava-v1.5-7b"}


# example file -> (make its inputs under the build dir, return {hub id: local stand-in}), exports
STAND_INS = {
    "batch-matrix.yaml": (_batch_matrix, ["out/chat-none", "out/chat-bnb-nf4", "out/code-none", "out/code-bnb-nf4"]),
    "merge-quantize-export.yaml": (_merge_quantize_export, ["out/llama2-7b-merged-nf4"]),
    "llava-original-convert.yaml": (_llava_original, ["out/llava-v1.5-7b-hf"]),
}


def test_every_example_is_built_here():
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == sorted(STAND_INS)


@pytest.mark.parametrize("name", sorted(STAND_INS))
def test_example_builds_as_written(name, models, tmp_path):
    make_inputs, exports = STAND_INS[name]
    text = (EXAMPLES / name).read_text()
    for hub_id, local in make_inputs(tmp_path, models).items():
        assert hub_id in text
        text = text.replace(hub_id, local)
    # A revision selects a hub commit; on the local stand-in it would pin nothing (and is refused).
    text = "\n".join(line for line in text.splitlines() if not line.strip().startswith("revision:")) + "\n"
    spec = tmp_path / name
    spec.write_text(text)
    proc = run_cli("build", spec, "--executor", "local", "--cache", tmp_path / "cache", "--json", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"] and sorted(t["export"] for t in report["targets"]) == sorted(str(tmp_path / e) for e in exports)
    for export in exports:
        # Sharded exports carry an index; a single shard is model.safetensors alone, as save_pretrained writes it.
        weights = (tmp_path / export / "model.safetensors.index.json").is_file() or (tmp_path / export / "model.safetensors").is_file()
        assert weights and (tmp_path / export / "manifest.json").is_file()
    if name == "merge-quantize-export.yaml":  # inspect counts an NF4 export's packed weights as the parameters they hold
        counted = [json.loads(run_cli("inspect", p, "--json").stdout)["parameters"] for p in (tmp_path / exports[0], tmp_path / "llama-2-7b")]
        assert counted[0] == counted[1]
    if name == "batch-matrix.yaml":  # shared nodes built once: one base fetch, one merge per adapter
        stages = [n["stage"] for n in report["nodes"]]
        assert stages.count("inspect") == 1 and stages.count("merge") == 2 and stages.count("quantize") == 2 and stages.count("export") == 4
