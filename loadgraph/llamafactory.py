"""LLaMA-Factory YAML -> the native spec, with every key accounted for.

Each key of a LLaMA-Factory file lands in exactly one place (llamafactory_keys.py lists them
all), and `loadgraph plan --explain` shows where, with the dtype rule that applied
(llamafactory_dtype.py). A key that would change the model in a way loadgraph does not
implement is refused with the reason, and a key LLaMA-Factory does not know is refused with the
nearest valid name, all of them in one run: neither is ever silently dropped.

Adapters follow LLaMA-Factory's `init_adapter`: for inference and export every adapter is
merged; a quantized base cannot be merged into, so its single adapter is attached; when
training, the last adapter is attached and resumed (unless `create_new_adapter`).
"""

from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadgraph.errors import InputError
from loadgraph.llamafactory_keys import MEGATRON_KEYS, MEGATRON_REASON, UNSUPPORTED, UNUSED, classify, known_keys, trainer_note

# --------------------------------------------------------------------------------------------
# translation


UNSUPPORTED_STAGES = {"rm": "reward models add a value head", "ppo": "PPO trains a model with a value head"}


@dataclass
class Translation:
    """A LLaMA-Factory document split by destination (see llamafactory_keys.py)."""

    origin: str
    build: dict[str, Any]
    training: dict[str, Any] = field(default_factory=dict)
    trainer: list[str] = field(default_factory=list)
    unused: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    dtype_rule: str = ""
    keys: dict[str, list[str]] = field(default_factory=dict)  # every key of the file: [class, note]

    def explain(self) -> dict[str, Any]:
        return {"origin": self.origin, "build": self.build, "training": self.training, "trainer": self.trainer, "unused": self.unused,
                "notes": self.notes, "dtype_rule": self.dtype_rule, "keys": self.keys}


def is_llamafactory(doc: Any) -> bool:
    return isinstance(doc, dict) and "model_name_or_path" in doc


def _refuse(doc: dict, origin: str) -> None:
    """Every unknown key, then every unsupported setting, each in one line: all of them in one run."""
    known = known_keys()
    unknown = sorted(str(k) for k in doc if k not in known)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise InputError(f"{origin}: {len(unknown)} unknown LLaMA-Factory key(s) (LLaMA-Factory refuses them too): {', '.join(hints)}")
    bad = [f"{k}: {reason}" for k, (default, reason) in UNSUPPORTED.items()
           if k in doc and doc[k] != default and not (k == "infer_backend" and doc[k] in ("hf", "huggingface"))]
    megatron = sorted(k for k in doc if k in MEGATRON_KEYS)
    if megatron:
        bad.append(f"{', '.join(megatron)}: {MEGATRON_REASON}")
    stage = doc.get("stage")
    if stage in UNSUPPORTED_STAGES:
        bad.append(f"stage: {stage!r} is not supported ({UNSUPPORTED_STAGES[stage]})")
    if bad:
        raise InputError(f"{origin}: unsupported LLaMA-Factory setting(s): " + "; ".join(bad))


def _check_rules(doc: dict, origin: str, quantized: bool) -> None:
    """LLaMA-Factory's _verify_model_args, refused at plan time (before any work)."""
    adapters = doc.get("adapter_name_or_path")
    ftype = doc.get("finetuning_type", "lora")
    if adapters and ftype != "lora":
        raise InputError(f"{origin}: adapter_name_or_path is only valid with finetuning_type lora (LLaMA-Factory's rule), not {ftype!r}")
    if not quantized:
        return
    if ftype not in ("lora", "oft"):
        raise InputError(f"{origin}: quantization_bit: a quantized model can only be trained with LoRA or OFT, not {ftype!r}")
    for key, reason in (("pissa_init", "PiSSA cannot initialise on a quantized model (LLaMA-Factory: use scripts/pissa_init.py first)"),
                        ("resize_vocab", "cannot resize the embedding layers of a quantized model"),
                        ("add_tokens", "adding tokens resizes the embedding layers, which a quantized model cannot do"),
                        ("add_special_tokens", "adding tokens resizes the embedding layers, which a quantized model cannot do")):
        if doc.get(key):
            raise InputError(f"{origin}: {key} with quantization_bit: {reason}")
    if adapters and doc.get("create_new_adapter"):
        raise InputError(f"{origin}: create_new_adapter with quantization_bit: cannot create a new adapter upon a quantized model (LLaMA-Factory's rule)")


def _quantize(doc: dict, origin: str, compute: str | None) -> dict | None:
    bits = doc.get("quantization_bit")
    if bits is None:
        return None
    method = str(doc.get("quantization_method", "bnb")).lower()
    if method not in ("bnb", "bitsandbytes"):
        reasons = {
            "hqq": "HQQ through transformers 5 is broken (quantize-on-load raises, pre-quantized loads random weights)",
            "eetq": "EETQ needs CUDA and a hub kernel",
        }
        raise InputError(f"{origin}: quantization_method: {method!r} is not supported ({reasons.get(method, 'only bitsandbytes (bnb) quantizes on load')})")
    if bits == 4:
        qtype = doc.get("quantization_type", "nf4")
        if qtype not in ("nf4", "fp4"):
            raise InputError(f"{origin}: quantization_type: {qtype!r} is not nf4 or fp4")
        # LLaMA-Factory's BitsAndBytesConfig: compute dtype and quant storage both the compute dtype.
        return {"method": f"bnb-{qtype}", "double_quant": bool(doc.get("double_quantization", True)), "compute_dtype": compute, "quant_storage": compute}
    if bits == 8:
        return {"method": "bnb-int8"}
    raise InputError(f"{origin}: quantization_bit: {bits!r} is not supported with bitsandbytes; use 4 or 8")


def _adapters(doc: dict, origin: str, quantized: bool, exporting: bool, trainable: bool) -> tuple[list[dict], list[str]]:
    raw = doc.get("adapter_name_or_path")
    if not raw:
        return [], []
    paths = [p.strip() for p in (raw.split(",") if isinstance(raw, str) else raw) if str(p).strip()]
    folder = doc.get("adapter_folder")
    if folder:
        paths = [f"{p.rstrip('/')}/{folder}" for p in paths]
    notes = []
    if quantized and exporting and not trainable:
        # LLaMA-Factory refuses ("Cannot merge adapters to a quantized model") and asks for a
        # merge first: the build graph does exactly that, merging before it quantizes.
        notes.append("adapters are merged into the full-precision base, then the merged model is quantized")
        return [{"path": p, "mode": "merge"} for p in paths], notes
    resume_last = (trainable and not doc.get("create_new_adapter", False)) or quantized
    if quantized and len(paths) > 1:
        raise InputError(f"{origin}: adapter_name_or_path: a quantized model accepts a single adapter (LLaMA-Factory's rule); got {len(paths)}")
    modes = ["merge"] * len(paths)
    if resume_last:
        modes[-1] = "attach"
        notes.append(f"adapter {paths[-1]!r} is attached unmerged" + (" and resumed for training" if trainable else " (a quantized model cannot be merged into)"))
    return [{"path": p, "mode": m} for p, m in zip(paths, modes)], notes


def translate_doc(doc: dict, origin: str, *, trainable: bool = False, base_dir: Path | None = None) -> Translation:
    """Split a LLaMA-Factory document into build spec, training setup, trainer keys and unused keys."""
    from loadgraph import llamafactory_dtype

    if not isinstance(doc.get("model_name_or_path"), str) or not doc["model_name_or_path"]:
        raise InputError(f"{origin}: model_name_or_path must name a model directory or hub repo id")
    _refuse(doc, origin)
    quantized = doc.get("quantization_bit") is not None
    _check_rules(doc, origin, quantized)
    exporting = bool(doc.get("export_dir"))
    if exporting and (doc.get("add_tokens") or doc.get("add_special_tokens")):
        raise InputError(f"{origin}: add_tokens with export_dir: loadgraph exports do not resize the vocabulary; add tokens when loading for training")

    training = {k: doc[k] for k in doc if classify(k) and classify(k)[0] == "training"}
    if "cutoff_len" in doc:
        training["model_max_length"] = doc["cutoff_len"]  # LLaMA-Factory derives model_max_length from cutoff_len
    if doc.get("bf16") or doc.get("fp16"):
        training.setdefault("pure_bf16", bool(doc.get("pure_bf16", False)))
    rule = llamafactory_dtype.resolve(doc, trainable=trainable, exporting=exporting, quantized=quantized, base_dir=base_dir)
    quantize = _quantize(doc, origin, rule.compute)
    adapters, notes = _adapters(doc, origin, quantized, exporting, trainable)

    source: dict[str, Any] = {"model": doc["model_name_or_path"]}
    if doc.get("model_revision") not in (None, "main"):
        source["revision"] = doc["model_revision"]
    if doc.get("trust_remote_code"):
        source["trust_remote_code"] = True
    # LLaMA-Factory merges at the checkpoint's dtype and casts the merged model: the cast is the export's.
    build: dict[str, Any] = {"name": "llamafactory", "source": source, "dtype": "auto" if exporting else rule.build}
    if adapters:
        build["adapters"] = adapters
    if quantize:
        build["quantize"] = {k: v for k, v in quantize.items() if v is not None}
    if exporting:
        # An inference load sets use_cache from use_kv_cache and gives a composite config its text
        # hidden_size (patcher.py): save_pretrained writes both into config.json.
        build["export"] = {"path": doc["export_dir"], "max_shard_size": f"{int(doc.get('export_size', 5))}GB",
                           "use_cache": bool(doc.get("use_kv_cache", True)), "top_level_hidden_size": True}
        if rule.build != "auto":
            build["export"]["dtype"] = rule.build
        if doc.get("template"):
            build["export"]["template"] = doc["template"]
            if doc.get("default_system") is not None:
                build["export"]["default_system"] = doc["default_system"]
    if not (adapters or quantize or exporting):
        # The artifact is the source's own bytes: nothing computed, nothing to verify (the loader
        # still refuses any tensor it cannot place).
        build["verify"] = False
        notes.append("verify is off: the build only fetches the source")
    keys = {str(k): list(classify(k) or ("unknown", "")) for k in doc}
    return Translation(
        origin=origin,
        build=build,
        training=training,
        trainer=sorted(k for k in doc if trainer_note(k) and classify(k)[0] == "trainer"),
        unused={k: UNUSED[k] for k in doc if k in UNUSED},
        notes=notes,
        dtype_rule=rule.rule,
        keys=keys,
    )


def translate(doc: dict, origin: str, base_dir: Path | None = None) -> dict:
    """The native spec dict for `loadgraph build` (LLaMA-Factory's inference/export semantics)."""
    t = translate_doc(doc, origin, base_dir=base_dir)
    if t.trainer:
        warnings.warn(f"{origin}: keys for LLaMA-Factory's training loop are not used by the build: {', '.join(t.trainer)}", UserWarning, stacklevel=2)
    return t.build


def explain_file(path) -> Translation | None:
    """The translation of a spec file if it is a LLaMA-Factory YAML (for `plan --explain`)."""
    import yaml

    path = Path(path)
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    return translate_doc(doc, str(path), base_dir=path.parent.absolute()) if is_llamafactory(doc) else None
