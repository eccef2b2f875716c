"""Every key of LLaMA-Factory's argument classes is classified; its plan-time rules; the training keys it applies."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loadgraph.errors import InputError

KEYS_TSV = Path(__file__).parent / "peers" / "llamafactory-keys.tsv"
KT_TSV = Path(__file__).parent / "peers" / "llamafactory-kt-keys.tsv"


def _rows() -> list[list[str]]:
    return [line.split("\t") for line in KEYS_TSV.read_text().splitlines() if line and not line.startswith("#")]


def _translate(doc: dict, trainable: bool = False):
    from loadgraph.llamafactory import translate_doc

    return translate_doc(doc, "lf.yaml", trainable=trainable)


def test_every_llamafactory_key_is_classified():
    from loadgraph.llamafactory_keys import classify

    rows = _rows()
    assert len(rows) > 200 and {r[0] for r in rows} == {"ModelArguments", "FinetuningArguments", "DataArguments", "TrainingArguments", "GeneratingArguments"}
    unclassified = [r[2] for r in rows if classify(r[2]) is None]
    assert not unclassified, f"classify these in llamafactory_keys.py: {unclassified}"
    # The fields LLaMA-Factory derives itself (init=False) are refused in a YAML, as it refuses them.
    derived = {r[2] for r in rows if r[3] == "derived"}
    assert derived and all(classify(k)[0] == "refused" for k in derived)
    assert all(classify(r[2])[1] for r in rows)  # each with its note or reason
    kt = [r[2] for r in (line.split("\t") for line in KT_TSV.read_text().splitlines() if line and not line.startswith("#"))]
    assert len(kt) > len(rows) and not [k for k in kt if classify(k) is None]


def test_unknown_keys_all_reported_in_one_run():
    with pytest.raises(InputError) as err:
        _translate({"model_name_or_path": "b", "lora_rnak": 8, "datset": "x", "zzz": 1, "preserve_thinking": True})
    msg = str(err.value)
    assert "3 unknown" in msg and "'lora_rnak' (did you mean 'lora_rank'?)" in msg and "'datset'" in msg and "'zzz'" in msg
    assert "preserve_thinking" not in msg  # valid at the examples' commit


def test_explain_names_every_key_class_and_the_dtype_rule():
    t = _translate({"model_name_or_path": "b", "use_asft_loss": True, "profiler_wait_steps": 2, "kt_weight_path": "/x",
                    "lora_rank": 4, "template": "qwen3", "export_dir": "out", "infer_dtype": "bfloat16"})
    assert t.keys["use_asft_loss"][0] == "trainer" and t.keys["kt_weight_path"][0] == "unused" and t.keys["lora_rank"][0] == "training"
    assert t.keys["template"][0] == "build" and t.keys["model_name_or_path"][0] == "build"
    assert t.dtype_rule == "export: infer_dtype bfloat16" and t.build["export"]["dtype"] == "bfloat16"


@pytest.mark.parametrize("extra, message", [
    ({"finetuning_type": "oft", "adapter_name_or_path": "a"}, "only valid with finetuning_type lora"),
    ({"quantization_bit": 4, "pissa_init": True}, "pissa_init with quantization_bit"),
    ({"quantization_bit": 4, "resize_vocab": True}, "resize_vocab with quantization_bit"),
    ({"quantization_bit": 4, "adapter_name_or_path": "a", "create_new_adapter": True}, "create_new_adapter"),
    ({"model_max_length": 4096}, "derives it from cutoff_len"),
    ({"use_mca": True}, "Megatron-Core"),
])
def test_llamafactory_rules_refused_at_plan_time(extra, message):
    with pytest.raises(InputError, match=message):
        _translate({"model_name_or_path": "b", **extra})


def _trainable(model) -> dict[str, torch.dtype]:
    return {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}


def test_training_keys_as_llamafactory_applies_them(models, cache_dir):
    from loadgraph import load

    base = str(models("llama", "bfloat16"))
    # use_llama_pro selects the expanded blocks (every num_layers/n-th layer): 2 layers, n=1 -> layer 1.
    pro = load({"model_name_or_path": base, "finetuning_type": "freeze", "use_llama_pro": True, "freeze_trainable_layers": 1}, trainable=True, cache=cache_dir)
    assert _trainable(pro.model) and all(n.startswith("model.layers.1.") for n in _trainable(pro.model))
    # BAdam keeps trainable parameters in the load dtype.
    badam = load({"model_name_or_path": base, "finetuning_type": "full", "use_badam": True, "bf16": True}, trainable=True, cache=cache_dir)
    assert set(_trainable(badam.model).values()) == {torch.bfloat16}
    # resize_vocab alone makes the embeddings and head trainable (modules_to_save), as LLaMA-Factory does.
    resized = load({"model_name_or_path": base, "finetuning_type": "lora", "resize_vocab": True, "lora_target": "q_proj"}, trainable=True, cache=cache_dir)
    names = _trainable(resized.model)
    assert any("embed_tokens.modules_to_save" in n for n in names) and any("lm_head.modules_to_save" in n for n in names)
    assert resized.model.config.use_cache is False


def test_freeze_multi_modal_projector_in_freeze_tuning(models, cache_dir):
    from loadgraph import load

    doc = {"model_name_or_path": str(models("llava")), "finetuning_type": "freeze", "freeze_trainable_layers": 1}
    frozen = _trainable(load(doc, trainable=True, cache=cache_dir).model)
    assert frozen and not any("multi_modal_projector" in n for n in frozen)
    opened = _trainable(load({**doc, "freeze_multi_modal_projector": False}, trainable=True, cache=cache_dir).model)
    assert any("multi_modal_projector" in n for n in opened) and not any("vision_tower" in n for n in opened)
