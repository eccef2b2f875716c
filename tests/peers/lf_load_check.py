"""`make peer-check`: LLaMA-Factory's own loader against `loadgraph.load(..., trainable=True)`.

For every training example YAML (model paths on tiny fixtures, nothing else changed) both sides
load the model for training: LLaMA-Factory through `get_train_args` + `load_tokenizer` +
`load_model(is_trainable=True)`, loadgraph through `loadgraph.load(doc, trainable=True)`. Each side
writes, per parameter, its dtype, shape and requires_grad, the PEFT config, `use_cache`, each
bitsandbytes layer's compute and storage dtypes and each PEFT tuner layer's tuner and base layer class; the two are compared entry for entry. Variants
add a quantized load on a Qwen-VL fixture and the host-dependent dtype rule on a simulated
bf16-capable GPU host (both sides patched the same way: LLaMA-Factory's
`extras.misc._is_bf16_available/_is_fp16_available`, loadgraph's `llamafactory_dtype.host_precision`).

  python tests/peers/lf_load_check.py LF_PYTHON WORKDIR        (in loadgraph's venv)
  LF_PYTHON tests/peers/lf_load_check.py --lf CASES.json OUT.json  (the peer's side, run by the above)

Keys that need a launcher are removed on both sides (`deepspeed`: a DeepSpeed config initialises
distributed training inside TrainingArguments), and `use_cpu: true` is added on both sides where
bf16/fp16/pure_bf16 is on (TrainingArguments refuses mixed precision on a host without a GPU
otherwise); LLaMA-Factory's pure_bf16 device check is answered yes (it refuses on this host and
checks nothing of the load). Every case prints what was changed. Each side records its own
`peft_version`: that field is not compared.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

# Removed from both sides, with why (printed per case).
LAUNCHER_KEYS = {"deepspeed": "a DeepSpeed config starts distributed training in TrainingArguments"}
SIMULATED_HOST = "simulated bf16-capable GPU host"


def describe(model) -> dict:
    """What both sides are compared on."""
    params = {n: [str(p.dtype).removeprefix("torch."), list(p.shape), bool(p.requires_grad)] for n, p in model.named_parameters()}
    peft = {}
    # A PeftModel's config (after merge_and_unload the base keeps a stale `peft_config`: not the model's).
    for name, cfg in ((model.peft_config if type(model).__module__.startswith("peft") else None) or {}).items():
        d = cfg.to_dict()
        peft[name] = {k: sorted(v) if isinstance(v, (set, list)) and all(isinstance(x, str) for x in v) else v
                      for k, v in sorted(d.items()) if k not in ("base_model_name_or_path", "revision", "runtime_config", "peft_version")}
    quant, wrappers = {}, {}
    for n, m in model.named_modules():
        if type(m).__module__.startswith("bitsandbytes"):  # bitsandbytes layers (under PEFT: its base_layer)
            quant[n] = [str(getattr(m, "compute_dtype", None)).removeprefix("torch."), str(m.weight.dtype).removeprefix("torch."), type(m).__name__]
        if hasattr(m, "base_layer"):  # a PEFT tuner layer: which tuner over which base layer class
            # (not the wrapper's class: PEFT 0.21 folds oft.bnb.Linear4bit etc. into one Linear)
            wrappers[n] = [type(m).__module__.split(".")[2], type(m.base_layer).__name__]
    return {"params": params, "peft": json.loads(json.dumps(peft, default=str)), "quant": quant, "wrappers": wrappers,
            "use_cache": getattr(model.config, "use_cache", None)}


# --------------------------------------------------------------------------------------------
# LLaMA-Factory's side (its own venv)


def lf_main(cases_file: str, out_file: str) -> int:
    import llamafactory.extras.misc as misc
    import llamafactory.hparams.parser as parser
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_model, load_tokenizer

    real = (misc._is_bf16_available, misc._is_fp16_available)
    parser.is_torch_bf16_gpu_available = lambda: True  # only the pure_bf16 refusal asks it
    results = {}
    for case, spec in json.loads(Path(cases_file).read_text()).items():
        misc._is_bf16_available, misc._is_fp16_available = (True, True) if spec["host"] == "bf16" else real
        try:
            model_args, data_args, training_args, finetuning_args, _ = get_train_args(dict(spec["doc"]))
            tokenizer = load_tokenizer(model_args)["tokenizer"]
            model = load_model(tokenizer, model_args, finetuning_args, is_trainable=training_args.do_train,
                               add_valuehead=finetuning_args.stage in ("rm", "ppo"))
            results[case] = describe(model)
        except Exception as exc:  # noqa: BLE001 - reported per case
            results[case] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    Path(out_file).write_text(json.dumps(results))
    return 0


# --------------------------------------------------------------------------------------------
# loadgraph's side and the comparison


def _cases(fixtures, work: Path) -> dict[str, dict]:
    import yaml
    from lf_examples import EXAMPLES, NO_FIXTURE, example_files, rewrite, role

    cases = {}
    for path in example_files():
        doc = yaml.safe_load(path.read_text())
        if doc["model_name_or_path"] in NO_FIXTURE or role(doc) != "train":
            continue
        rel = str(path.relative_to(EXAMPLES))
        cases[rel] = {"doc": rewrite(path, fixtures, work / rel.replace("/", "_")), "host": "here"}
    # The host-dependent rule: an fp32 checkpoint's QLoRA compute dtype (infer_optim_dtype) with bf16 off.
    base = dict(cases["train_lora/qwen3_lora_sft.yaml"]["doc"])
    no_mixed = {k: v for k, v in base.items() if k not in ("bf16", "fp16", "pure_bf16")}
    cases["host: fp32 checkpoint, QLoRA, no bf16/fp16 (here)"] = {"doc": {**no_mixed, "quantization_bit": 4}, "host": "here"}
    cases[f"host: fp32 checkpoint, QLoRA, no bf16/fp16 ({SIMULATED_HOST})"] = {"doc": {**no_mixed, "quantization_bit": 4}, "host": "bf16"}
    # A quantized load of a vision-language model (which modules transformers quantizes, LoRA on top).
    vl = dict(cases["train_lora/qwen3vl_lora_sft.yaml"]["doc"])
    cases["quantized: Qwen3-VL QLoRA 4-bit"] = {"doc": {**vl, "quantization_bit": 4}, "host": "here"}
    cases["quantized: Qwen3 QLoRA 8-bit"] = {"doc": {**base, "quantization_bit": 8}, "host": "here"}
    return cases


def _strip(doc: dict) -> tuple[dict, list[str]]:
    changed = [f"-{k}" for k in sorted(doc) if k in LAUNCHER_KEYS]
    doc = {k: v for k, v in doc.items() if k not in LAUNCHER_KEYS}
    if any(doc.get(k) for k in ("bf16", "fp16", "pure_bf16")) and not doc.get("use_cpu"):
        doc["use_cpu"] = True
        changed.append("+use_cpu")
    return doc, changed


def lg_describe(doc: dict, host: str, cache: Path) -> dict:
    from loadgraph import llamafactory_dtype, load

    real = llamafactory_dtype.host_precision
    if host == "bf16":
        llamafactory_dtype.host_precision = lambda: (True, True, SIMULATED_HOST)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # As LLaMA-Factory: trainable when the file trains (a do_predict run loads for inference).
            return describe(load(doc, trainable=bool(doc.get("do_train")), cache=cache).model)
    except Exception as exc:  # noqa: BLE001 - reported per case
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    finally:
        llamafactory_dtype.host_precision = real


def diff(lf: dict, lg: dict) -> list[str]:
    out = []
    if set(lf["params"]) != set(lg["params"]):
        only_lf, only_lg = sorted(set(lf["params"]) - set(lg["params"])), sorted(set(lg["params"]) - set(lf["params"]))
        out.append(f"parameter names: only LLaMA-Factory {only_lf[:3]} ({len(only_lf)}), only loadgraph {only_lg[:3]} ({len(only_lg)})")
    for name in sorted(set(lf["params"]) & set(lg["params"])):
        if lf["params"][name] != lg["params"][name]:
            out.append(f"{name}: LLaMA-Factory {lf['params'][name]} vs loadgraph {lg['params'][name]} (dtype, shape, requires_grad)")
    for key in ("peft", "quant", "wrappers", "use_cache"):
        if lf[key] != lg[key]:
            if isinstance(lf[key], dict) and isinstance(lg[key], dict):
                for k in sorted(set(lf[key]) | set(lg[key])):
                    a, b = lf[key].get(k), lg[key].get(k)
                    if isinstance(a, dict) and isinstance(b, dict):
                        out += [f"{key}[{k}].{f}: LLaMA-Factory {a.get(f)!r} vs loadgraph {b.get(f)!r}" for f in sorted(set(a) | set(b)) if a.get(f) != b.get(f)]
                    elif a != b:
                        out.append(f"{key}[{k}]: LLaMA-Factory {a!r} vs loadgraph {b!r}")
            else:
                out.append(f"{key}: LLaMA-Factory {lf[key]!r} vs loadgraph {lg[key]!r}")
    return out


def main(lf_python: str, work: Path) -> int:
    work = work.absolute()  # fixture paths go into YAMLs under other directories
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lf_examples import Fixtures

    work.mkdir(parents=True, exist_ok=True)
    fixtures = Fixtures(work / "fixtures")
    cases = _cases(fixtures, work)
    removed = {}
    for case, spec in cases.items():
        spec["doc"], removed[case] = _strip(spec["doc"])
    (work / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([lf_python, __file__, "--lf", str(work / "cases.json"), str(work / "lf.json")], env=env, capture_output=True, text=True)
    if proc.returncode:
        print(proc.stderr[-3000:])
        return 1
    lf_all = json.loads((work / "lf.json").read_text())
    counts = {"equal": 0, "differ": 0, "lf_error": 0, "lg_refused": 0, "both_refuse": 0, "params": 0}
    for case, spec in cases.items():
        lf, lg = lf_all[case], lg_describe(spec["doc"], spec["host"], work / "cache")
        note = f" (on both sides: {' '.join(removed[case])})" if removed[case] else ""
        if "error" in lf and "error" in lg:
            counts["both_refuse"] += 1
            print(f"{case}: both refuse{note}: LLaMA-Factory {lf['error'][:120]} | loadgraph {lg['error'][:160]}")
            continue
        if "error" in lf:
            counts["lf_error"] += 1
            print(f"{case}: LLaMA-Factory cannot load it here{note}: {lf['error'][:200]}")
            continue
        if "error" in lg:
            counts["lg_refused"] += 1
            print(f"{case}: loadgraph refuses{note} (LLaMA-Factory loads it): {lg['error'][:200]}")
            continue
        d = diff(lf, lg)
        counts["params"] += len(lf["params"])
        counts["equal" if not d else "differ"] += 1
        trainable = sum(v[2] for v in lf["params"].values())
        qdtypes = sorted({f"{c}/{w}" for c, w, _ in lf["quant"].values()})
        print(f"{case}: {len(lf['params'])} parameters ({trainable} trainable), {len(lf['quant'])} quantized layers"
              f"{' (compute/storage ' + ', '.join(qdtypes) + ')' if qdtypes else ''}{note}; "
              + ("EQUAL" if not d else f"{len(d)} difference(s)"))
        for line in d[:12]:
            print(f"  - {line}")
    print(f"peer-check (load): {counts['equal']}/{len(cases)} loads equal, {counts['differ']} differ, "
          f"{counts['lg_refused']} refused by loadgraph only, {counts['both_refuse']} refused by both, {counts['lf_error']} not loadable by LLaMA-Factory here; "
          f"{counts['params']} parameters compared")
    return 1 if counts["differ"] else 0


if __name__ == "__main__":
    if sys.argv[1] == "--lf":
        sys.exit(lf_main(sys.argv[2], sys.argv[3]))
    sys.exit(main(sys.argv[1], Path(sys.argv[2])))
