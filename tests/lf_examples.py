"""LLaMA-Factory's own example YAMLs, with only their model paths pointed at tiny local fixtures.

The examples come from /work/shared/peers/llamafactory/examples (or $LF_EXAMPLES). Each model
name maps to a fixture of the architecture it names; adapter paths become a LoRA made for that
fixture with PEFT; export_dir goes under the test's directory. Nothing else in a YAML changes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import yaml

EXAMPLES = Path(os.environ.get("LF_EXAMPLES", "/work/shared/peers/llamafactory/examples"))

# Model name (as written) -> fixture kind, most specific first.
_KINDS = [
    (r"Qwen3-VL-.*A\d+B", "qwen3_vl_moe"), (r"Qwen3-VL", "qwen3_vl"), (r"qwen3-vl", "qwen3_vl"), (r"Qwen2\.5-VL", "qwen2_5_vl"),
    (r"Qwen2-VL", "qwen2_vl"), (r"Qwen3\.5", "qwen3_5"), (r"Qwen3-\d+B-A\d+B", "qwen3_moe"), (r"(?i)qwen3", "qwen3"),
    (r"(?i)qwen2", "qwen2"), (r"(?i)llama", "llama"), (r"(?i)deepseek", "llama"),
]
# Pre-quantized checkpoints (GPTQ/AWQ/AQLM): the fixture carries that quantization_config.
_PREQUANT = {"GPTQ": "gptq", "AWQ": "awq", "AQLM": "aqlm"}
# Architectures with no transformers class (custom code only): no fixture can stand for them.
NO_FIXTURE = {"OpenMOSS-Team/MOSS-VL-Instruct-0708": "MOSS-VL exists only as custom code; no transformers class to build a fixture from"}


def example_files() -> list[Path]:
    """Every example YAML that is a LLaMA-Factory run file (names a model_name_or_path)."""
    out = []
    for path in sorted(EXAMPLES.rglob("*.yaml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        if isinstance(doc, dict) and "model_name_or_path" in doc:
            out.append(path)
    return out


def kind_of(model: str) -> str:
    return next(kind for pattern, kind in _KINDS if re.search(pattern, model))


def role(doc: dict) -> str:
    """export | train | infer, as llamafactory-cli would run the file (export / train / chat)."""
    if doc.get("export_dir"):
        return "export"
    if "stage" in doc or doc.get("do_train") or "output_dir" in doc:
        return "train"
    return "infer"


class Fixtures:
    """Makes each fixture (and its LoRA) once under `root`."""

    def __init__(self, root: Path):
        self.root = root

    def model(self, kind: str, quant: str | None = None) -> Path:
        from loadgraph.testing import make_tiny_model
        from loadgraph.testing_families import FAMILIES, make_family_model

        out = self.root / (kind + (f"-{quant}" if quant else ""))
        if out.exists():
            return out
        if quant:
            shutil.copytree(self.model(kind), out)
            config = json.loads((out / "config.json").read_text())
            config["quantization_config"] = {"quant_method": quant, "bits": 4}
            (out / "config.json").write_text(json.dumps(config))
        elif kind in FAMILIES:
            make_family_model(kind, out)
        else:
            make_tiny_model(kind, out)
        return out

    def lora(self, kind: str) -> Path:
        from loadgraph.testing import make_lora_adapter

        out = self.root / f"{kind}-lora"
        if not out.exists():
            make_lora_adapter(self.model(kind), out, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        return out


def rewrite(path: Path, fixtures: Fixtures, work: Path) -> dict:
    """The example's document with model paths on fixtures and export_dir under `work`."""
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    model = str(doc["model_name_or_path"])
    kind = kind_of(model)
    quant = next((q for marker, q in _PREQUANT.items() if marker in model), None)
    doc["model_name_or_path"] = str(fixtures.model(kind, quant))
    if doc.get("adapter_name_or_path"):
        doc["adapter_name_or_path"] = str(fixtures.lora(kind))
    if doc.get("export_dir"):
        doc["export_dir"] = str(work / "export")
    return doc
