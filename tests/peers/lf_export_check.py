"""`make peer-check`: real `llamafactory-cli export` against `loadgraph build`, same YAMLs, same fixtures.

Each case is a LLaMA-Factory export YAML (LLaMA-Factory's merge_lora examples, on tiny fixtures;
plus a variant with infer_dtype bfloat16). Both tools export it; the two directories are
compared byte for byte: file names, every tensor's bytes, config.json's dtype, the tokenizer
files, the Modelfile. `transformers_version` (each tool's own transformers) and loadgraph's
manifest.json are the only differences ignored. Prints one line per difference and the counts;
exits 1 when anything differs.

  python tests/peers/lf_export_check.py LLAMAFACTORY_CLI WORKDIR
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lf_examples import EXAMPLES, Fixtures, rewrite  # noqa: E402

IGNORED_FILES = {"manifest.json"}
# A Qwen-VL processor needs torchvision, which has no CPU build on PyPI for this torch: in the peer's
# venv LLaMA-Factory logs "Failed to load processor" and saves none. Those files are then reported
# as not compared (never counted equal).
PROCESSOR_FILES = {"preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json"}
CASES = {
    "merge_lora/qwen3_lora_sft": ({}, None),
    "merge_lora/qwen3_full_sft": ({}, None),
    "merge_lora/qwen3_lora_sft+bf16": ({"infer_dtype": "bfloat16"}, "merge_lora/qwen3_lora_sft"),
    # A Llama base under the llama3 template (bos in its slots, two stop words) and a system prompt.
    "merge_lora/qwen3_lora_sft+llama3": ({"template": "llama3", "default_system": "You are terse.", "kind": "llama"}, "merge_lora/qwen3_lora_sft"),
    # The host-dependent rule: an fp32 checkpoint under infer_dtype auto exports as
    # infer_optim_dtype(bf16): bf16 on a bf16-capable GPU host (simulated on both sides), fp32 here.
    "merge_lora/qwen3_lora_sft+bf16-host": ({"host": "bf16"}, "merge_lora/qwen3_lora_sft"),
    # Templates whose export replaces the tokenizer's jinja chat template (replace_jinja_template).
    **{f"merge_lora/qwen3_lora_sft+{t}": ({"template": t}, "merge_lora/qwen3_lora_sft")
       for t in ("alpaca", "chatml", "chatml_de", "default", "ernie_vl", "fewshot", "vicuna")},
    # A tokenizer without a chat template gets the template's under any template: Llama2Template's
    # jinja (system prompt fused into the first user turn).
    "merge_lora/qwen3_lora_sft+llama2-no-chat-template": ({"template": "llama2", "kind": "llama", "no_chat_template": True},
                                                          "merge_lora/qwen3_lora_sft"),
    # Vision-language models: transformers' own classes, their processor files saved beside the tokenizer.
    "merge_lora/qwen3vl_lora_sft": ({}, None),
    "merge_lora/qwen3vl_lora_sft+qwen2_vl": ({"template": "qwen2_vl", "kind": "qwen2_vl"}, "merge_lora/qwen3vl_lora_sft"),
    # A quantized export (no adapter: LLaMA-Factory cannot merge into a quantized model); the vision
    # tower is quantized as transformers' bitsandbytes quantizer does (it skips lm_head only).
    "merge_lora/qwen3vl_lora_sft+4bit": ({"quantization_bit": 4, "adapter_name_or_path": None}, "merge_lora/qwen3vl_lora_sft"),
    "merge_lora/qwen3_lora_sft+8bit": ({"quantization_bit": 8, "adapter_name_or_path": None}, "merge_lora/qwen3_lora_sft"),
    "merge_lora/qwen3vl_lora_sft+qwen2_5_vl": ({"template": "qwen2_vl", "kind": "qwen2_5_vl"}, "merge_lora/qwen3vl_lora_sft"),
}


def _without_version(path: Path) -> bytes:
    """The file's bytes less its transformers_version line (each tool records its own transformers)."""
    return b"".join(line for line in path.read_bytes().splitlines(keepends=True) if b'"transformers_version"' not in line)


# A bf16-capable GPU host, simulated the same way on both sides: the capability each one asks.
SIMULATE_LF = "import llamafactory.extras.misc as m; m._is_bf16_available = m._is_fp16_available = True; "
SIMULATE_LG = "import loadgraph.llamafactory_dtype as d; d.host_precision = lambda: (True, True, 'simulated bf16 GPU host'); "


def _without_chat_template(model: Path, out: Path) -> Path:
    """A copy of the fixture whose tokenizer has no chat template."""
    import json
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(model, out)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out


def compare(lf: Path, lg: Path, skip: set[str] = frozenset()) -> tuple[list[str], int, int]:
    from safetensors import safe_open

    diffs: list[str] = []
    lf_files = {p.name for p in lf.iterdir()} - skip
    lg_files = {p.name for p in lg.iterdir()} - IGNORED_FILES - skip
    if lf_files != lg_files:
        diffs.append(f"file names: only LLaMA-Factory {sorted(lf_files - lg_files)}, only loadgraph {sorted(lg_files - lf_files)}")
    tensors = 0
    lf_t = {k: (f, k) for f in sorted(lf.glob("*.safetensors")) for k in safe_open(str(f), "pt").keys()}
    lg_t = {k: (f, k) for f in sorted(lg.glob("*.safetensors")) for k in safe_open(str(f), "pt").keys()}
    if set(lf_t) != set(lg_t):
        diffs.append(f"tensor names differ: {sorted(set(lf_t) ^ set(lg_t))[:5]}")
    for name in sorted(set(lf_t) & set(lg_t)):
        a = safe_open(str(lf_t[name][0]), "pt").get_tensor(name)
        b = safe_open(str(lg_t[name][0]), "pt").get_tensor(name)
        tensors += 1
        if a.dtype != b.dtype or a.shape != b.shape or a.contiguous().view(-1).view(__import__("torch").uint8).tolist() != b.contiguous().view(-1).view(__import__("torch").uint8).tolist():
            diffs.append(f"tensor {name}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}, bytes differ")
    files = 0
    for rel in sorted(lf_files & lg_files):
        if rel.endswith(".safetensors"):
            continue
        files += 1
        if _without_version(lf / rel) != _without_version(lg / rel):
            diffs.append(f"{rel} differs")
    return diffs, tensors, files


def main(cli: str, work: Path) -> int:
    work = work.absolute()  # fixture paths go into YAMLs under other directories
    work.mkdir(parents=True, exist_ok=True)
    fixtures = Fixtures(work / "fixtures")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    total = {"tensors": 0, "files": 0, "equal_cases": 0, "not_compared": 0}
    failed = ran = 0
    only = os.environ.get("PEER_CASES")  # comma-separated case names: run only those
    for case, (extra, base) in CASES.items():
        if only and case not in only.split(","):
            continue
        ran += 1
        path = EXAMPLES / f"{base or case}.yaml"
        case_dir = work / case.replace("/", "_")
        case_dir.mkdir(parents=True, exist_ok=True)
        extra = dict(extra)
        kind = extra.pop("kind", None)
        no_chat_template = extra.pop("no_chat_template", False)
        host = extra.pop("host", None)
        doc = {k: v for k, v in {**rewrite(path, fixtures, case_dir), **extra}.items() if v is not None}  # None: key removed
        if kind:
            doc["model_name_or_path"], doc["adapter_name_or_path"] = str(fixtures.model(kind)), str(fixtures.lora(kind))
        if no_chat_template:
            doc["model_name_or_path"] = str(_without_chat_template(Path(doc["model_name_or_path"]), case_dir / "base"))
        for tool in ("lf", "lg"):
            spec = dict(doc, export_dir=str(case_dir / tool))
            (case_dir / f"{tool}.yaml").write_text(yaml.safe_dump(spec))
        lf_cmd, lg_cmd = [cli, "export", str(case_dir / "lf.yaml")], [sys.executable, "-m", "loadgraph.cli"]
        if host == "bf16":
            lf_python = str(Path(cli).with_name("python"))
            lf_cmd = [lf_python, "-c", SIMULATE_LF + "import sys, yaml; from llamafactory.train.tuner import export_model; "
                      "export_model(yaml.safe_load(open(sys.argv[1])))", str(case_dir / "lf.yaml")]
            lg_cmd = [sys.executable, "-c", SIMULATE_LG + "import sys; from loadgraph.cli import main; sys.argv[0] = 'loadgraph'; main()"]
        lf_run = subprocess.run(lf_cmd, check=True, env=env, capture_output=True, text=True)
        skip = PROCESSOR_FILES if "Failed to load processor" in lf_run.stdout + lf_run.stderr else set()
        proc = subprocess.run([*lg_cmd, "build", str(case_dir / "lg.yaml"), "--executor", "local",
                               "--cache", str(work / "cache")], env=env, capture_output=True, text=True)
        if proc.returncode:
            print(f"{case}: loadgraph build failed: {proc.stderr.strip().splitlines()[-1:]}")
            failed += 1
            continue
        diffs, tensors, files = compare(case_dir / "lf", case_dir / "lg", skip)
        not_compared = sorted(skip & {p.name for p in (case_dir / "lg").iterdir()})
        if not_compared:
            print(f"{case}: not compared (LLaMA-Factory's venv could not load the processor: no torchvision): {', '.join(not_compared)}")
            total["not_compared"] += len(not_compared)
        total["tensors"] += tensors
        total["files"] += files
        total["equal_cases"] += not diffs
        print(f"{case}: {tensors} tensors, {files} other files compared; {'EQUAL' if not diffs else f'{len(diffs)} difference(s)'}")
        for d in diffs:
            print(f"  - {d}")
        failed += bool(diffs)
    print(f"peer-check: {total['equal_cases']}/{ran} exports equal; {total['tensors']} tensors and {total['files']} files compared; {total['not_compared']} processor files not compared")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], Path(sys.argv[2])))
