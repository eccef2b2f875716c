"""LLaMA-Factory's own examples folder, run as written (only model paths on tiny fixtures).

Every run file is planned (accepted, or refused at plan time with the reason by design); a
representative few are built (merge/export) and loaded for training.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import yaml

from conftest import run_cli
from lf_examples import EXAMPLES, NO_FIXTURE, Fixtures, example_files, rewrite, role

pytestmark = pytest.mark.skipif(not EXAMPLES.exists(), reason=f"{EXAMPLES} not present")

# Refused by design, with the reason the plan must give.
REFUSED = {
    "extras/mod/llama3_full_sft.yaml": "mixture_of_depths",
    "extras/qoft/llama3_oft_sft_awq.yaml": "pre-quantized 'awq'",
    "extras/qoft/llama3_oft_sft_gptq.yaml": "pre-quantized 'gptq'",
    "train_qlora/llama3_lora_sft_aqlm.yaml": "pre-quantized 'aqlm'",
    "train_qlora/llama3_lora_sft_awq.yaml": "pre-quantized 'awq'",
    "train_qlora/llama3_lora_sft_gptq.yaml": "pre-quantized 'gptq'",
    "merge_lora/qwen3_gptq.yaml": "GPTQ export needs calibration",
    "train_lora/qwen3_lora_reward.yaml": "value head",
    "megatron/qwen2_vl_full.yaml": "Megatron",
    "megatron/qwen3_moe_full.yaml": "Megatron",
    "megatron_bridge/llama3_sft.yaml": "Megatron",
    **{f"ktransformers/train_lora/{n}.yaml": "use_kt: KTransformers" for n in (
        "deepseek_v2_lora_sft_kt", "deepseek_v3_int8_lora_sft_kt", "deepseek_v3_lora_sft_kt", "qwen3_5moe_lora_sft_kt",
        "qwen3moe_lora_sft_kt", "qwen3vlmoe_lora_sft_kt")},
}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return Fixtures(tmp_path_factory.mktemp("lf-fixtures"))


def _plan(path, fixtures, work, cache):
    from loadgraph.llamafactory import translate_doc
    from loadgraph.pipeline.graph import compile_specs
    from loadgraph.spec import parse_spec

    doc = rewrite(path, fixtures, work)
    t = translate_doc(doc, str(path), trainable=role(doc) == "train", base_dir=path.parent)
    (spec,) = parse_spec(t.build, str(path), path.parent)
    compile_specs([spec], cache)
    return doc, t


def test_every_example_planned_as_written(fixtures, tmp_path):
    from loadgraph.pipeline.cache import Cache

    cache = Cache(tmp_path / "cache")
    outcome: dict[str, str] = {}
    for path in example_files():
        rel = str(path.relative_to(EXAMPLES))
        if yaml.safe_load(path.read_text())["model_name_or_path"] in NO_FIXTURE:
            outcome[rel] = "no fixture"
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _plan(path, fixtures, tmp_path / rel.replace("/", "_"), cache)
            outcome[rel] = "accepted"
        except Exception as exc:  # noqa: BLE001 - each refusal is checked against its reason below
            outcome[rel] = f"refused: {exc}"
    for rel, reason in REFUSED.items():
        assert outcome[rel].startswith("refused") and reason in outcome[rel], (rel, outcome[rel])
    accepted = {rel for rel, o in outcome.items() if o == "accepted"}
    assert accepted == set(outcome) - set(REFUSED) - {r for r, o in outcome.items() if o == "no fixture"}
    assert len(accepted) >= 44 and len(outcome) == 66, outcome


def _build(path, fixtures, tmp_path):
    doc = rewrite(path, fixtures, tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    spec = tmp_path / path.name
    spec.write_text(yaml.safe_dump(doc))
    proc = run_cli("build", spec, "--executor", "local", "--cache", tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    return doc


def test_merge_export_examples_build(fixtures, tmp_path):
    from safetensors.torch import load_file

    doc = _build(EXAMPLES / "merge_lora/qwen3_lora_sft.yaml", fixtures, tmp_path / "lora")
    out = tmp_path / "lora" / "export"
    # LLaMA-Factory's rule: infer_dtype auto on an fp32 checkpoint gives bf16 on a bf16 GPU host, fp32 here (no CUDA).
    want = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16 if torch.cuda.is_available() else torch.float32
    tensors = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    assert tensors and {t.dtype for t in tensors.values()} == {want}
    assert not any("lora_" in k for k in tensors) and doc["template"] == "qwen3_nothink"
    # The template, as llamafactory-cli export applies it (make peer-check compares the bytes with it).
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.eos_token == "<|im_end|>" and tok.padding_side == "left"
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    assert 'PARAMETER stop "<|im_end|>"' in (out / "Modelfile").read_text()


def test_vl_merge_example_builds(fixtures, tmp_path):
    """Qwen3-VL through transformers' own class: make peer-check compares it with llamafactory-cli export."""
    import json

    from safetensors import safe_open

    _build(EXAMPLES / "merge_lora/qwen3vl_lora_sft.yaml", fixtures, tmp_path)
    out = tmp_path / "export"
    config = json.loads((out / "config.json").read_text())
    # LLaMA-Factory's inference load: use_cache from use_kv_cache, the text hidden_size at the top level.
    assert config["use_cache"] is True and config["text_config"]["use_cache"] is True and config["hidden_size"] == config["text_config"]["hidden_size"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert any(n.startswith("model.visual.") for n in names) and not any("lora_" in n for n in names)
    assert (out / "preprocessor_config.json").is_file()


@pytest.mark.parametrize("rel, ftype", [
    ("train_lora/qwen3_lora_sft.yaml", "lora"), ("train_full/qwen3_full_sft.yaml", "full"),
    ("extras/badam/llama3_full_sft.yaml", "badam"), ("extras/fsdp_qlora/llama3_lora_sft.yaml", "qlora"),
    ("train_lora/qwen3vl_lora_sft.yaml", "vl-lora"),
])
def test_training_examples_load_trainable(rel, ftype, fixtures, tmp_path):
    from loadgraph import load

    path = EXAMPLES / rel
    doc = rewrite(path, fixtures, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load(doc, trainable=True, cache=tmp_path / "cache").model
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and model.config.use_cache is False
    if ftype == "lora":
        assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        assert set(trainable.values()) == {torch.float32} and model.peft_config["default"].r == doc["lora_rank"]
    elif ftype == "full":
        assert len(trainable) == len(list(model.parameters()))
    elif ftype == "vl-lora":  # LoRA on the language model; vision tower and merger frozen (LLaMA-Factory's defaults)
        assert all(".lora_" in n and "language_model" in n for n in trainable)
        assert not any(p.requires_grad for n, p in model.named_parameters() if "visual." in n)
    elif ftype == "badam":
        assert set(trainable.values()) == {torch.float32}  # fp32 fixture kept as loaded: BAdam does not upcast, nor cast down
    else:
        q = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
        assert q.weight.dtype == torch.bfloat16 and q.compute_dtype == torch.bfloat16  # bf16 storage and compute (fsdp_qlora)
