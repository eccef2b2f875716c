"""PEFT LoRA adapters: parse an adapter directory and refuse what cannot be merged.

The goal is bit-identity with `PeftModel.from_pretrained(base, adapter).merge_and_unload()`
followed by `save_pretrained`, while never holding more than one base shard. This module reads
what PEFT reads (adapter_config.json, the weights file's names and shapes) and resolves r/alpha
per module as PEFT does; what each base tensor gets is planned in formats/lora_plan.py and the
arithmetic, which repeats peft 0.21 operation for operation, is in formats/lora_merge.py.

Engine usage, for each adapter in spec order (stacking = feeding one adapter's output to the next):

    names = inspect_checkpoint_names(base_dir)              # formats/names.py, headers only
    adapter = LoraAdapter.load(adapter_dir)                 # this module
    plan = plan_merge(adapter, names, base_tensors)        # formats/lora_plan.py; raises AdapterError
    adapter_tensors = adapter.load_tensors()               # small; once per worker
    for shard in base shards: out = merge_shard(plan, shard_tensors, adapter_tensors)   # formats/lora_merge.py
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loadgraph.errors import InputError
from loadgraph.formats.names import KIND_EMBEDDING, KIND_LINEAR
from loadgraph.peft_import import import_peft

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

# Why each other PEFT method is refused: a user reads this in the error.
UNSUPPORTED_PEFT_TYPES = {
    "ADALORA": "AdaLoRA's SVD-form weights (lora_E) and rank masks are not a plain LoRA; merge it with PEFT",
    "VERA": "VeRA keeps shared random projections outside the adapter file; merge it with PEFT",
    "LOHA": "LoHa is a Hadamard-product adapter, not LoRA; merge it with PEFT",
    "LOKR": "LoKr is a Kronecker-product adapter, not LoRA; merge it with PEFT",
    "IA3": "IA3 rescales activations rather than adding a low-rank delta; merge it with PEFT",
    "PROMPT_TUNING": "prompt tuning adds virtual tokens and changes no weight: there is nothing to merge",
    "P_TUNING": "p-tuning adds a prompt encoder and changes no weight: there is nothing to merge",
    "PREFIX_TUNING": "prefix tuning adds past key/values and changes no weight: there is nothing to merge",
    "MULTITASK_PROMPT_TUNING": "prompt tuning adds virtual tokens and changes no weight: there is nothing to merge",
    "ADAPTION_PROMPT": "adaption prompts add gated attention prompts and cannot be merged",
}

# LoraConfig options that change what a merge means; any truthy value is refused, with the reason.
UNSUPPORTED_OPTIONS = {
    "layer_replication": "it duplicates base layers, so the merged model has layers the base checkpoint lacks",
    "target_parameters": "it adapts raw nn.Parameters (e.g. fused MoE experts) that are not stored per tensor on disk",
    "trainable_token_indices": "trainable-token deltas are not supported by the streaming merge; merge with PEFT",
    "megatron_config": "Megatron parallel LoRA layers are not supported",
    "use_qalora": "QA-LoRA pools inputs group-wise and is not supported",
    "use_bdlora": "block-diagonal LoRA is not supported",
    "arrow_config": "Arrow routes between several LoRA experts at inference and cannot be merged",
    "alora_invocation_tokens": "activated LoRA only applies after invocation tokens and cannot be merged",
    "velora_config": "VeLoRA is not supported",
    "monteclora_config": "MonteCLoRA is not supported",
    "kasa_config": "KaSA is not supported",
}
# init_lora_weights values whose adapters assume a modified base (residual) weight, or a variant.
UNSUPPORTED_INITS = {
    "pissa": "PiSSA adapters hold the principal singular part removed from the base; save it with PEFT's "
    "path_initial_model_for_weight_conversion to get a plain LoRA first",
    "olora": "OLoRA adapters assume a modified base; convert with PEFT's path_initial_model_for_weight_conversion",
    "corda": "CorDA adapters assume a modified base; convert with PEFT's path_initial_model_for_weight_conversion",
    "loftq": "LoftQ adapters pair with a LoftQ-quantized base, not the original weights",
    "lora_ga": "LoRA-GA adapters assume a modified base; convert with PEFT first",
    "mica": "MiCA is a LoRA variant that is not supported by the streaming merge",
}


class AdapterError(InputError, ValueError):
    """An adapter that cannot be merged; the message names the adapter file and tensor (exit code 2)."""


@dataclass(frozen=True)
class LoraTarget:
    """One adapted layer: what to read from the adapter file and how PEFT scales it.

    `module` is the layer's name as the adapter file names it (in-memory transformers 5 names for
    adapters trained with transformers 5; legacy on-disk names are resolved by `lora_plan.plan_merge`).
    """

    module: str
    kind: str  # "linear" | "embedding"
    r: int
    alpha: float
    use_rslora: bool
    use_dora: bool
    fan_in_fan_out: bool
    lora_A: str
    lora_B: str
    magnitude: str | None = None
    lora_bias: str | None = None

    @property
    def scale(self) -> float:
        return self.scaling()

    def scaling(self, multiplier: float = 1.0) -> float:
        """Same float expression as PEFT (`update_layer` / `set_scale`), so the same rounding."""
        if self.use_rslora:
            return multiplier * self.alpha / math.sqrt(self.r)
        return multiplier * self.alpha / self.r


@dataclass(frozen=True, eq=False)
class LoraAdapter:
    """A parsed PEFT LoRA adapter directory. Holds names and shapes only; tensors on request."""

    path: Path
    config: dict[str, Any]
    weights_file: Path
    tensor_shapes: dict[str, tuple[int, ...]] = field(repr=False)
    tensor_dtypes: dict[str, str] = field(repr=False)

    @classmethod
    def load(cls, path: str | Path, *, allow_pickle: bool = False, peft_checks: bool = True) -> LoraAdapter:
        """`peft_checks=False`: without PEFT's config validation (a guessed plan's, which the
        checks confirm: stages/derived_plans.guess_plans)."""
        path = Path(path)
        config = _read_config(path)
        _check_supported(path / ADAPTER_CONFIG, config)
        if peft_checks:
            check_peft_accepts(path)
        weights_file = _weights_file(path, allow_pickle)
        shapes, dtypes = _tensor_headers(weights_file)
        adapter = cls(path, config, weights_file, shapes, dtypes)
        adapter.targets()  # parse every key now, so a malformed file fails at load time
        return adapter

    # -- what the file holds ------------------------------------------------------------------

    def load_tensors(self) -> dict[str, torch.Tensor]:
        """All adapter tensors, keyed by the names `targets()` and `replacements()` use."""
        if self.weights_file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(self.weights_file))
        return _load_pickle(self.weights_file)

    def targets(self) -> dict[str, LoraTarget]:
        """Adapted layers keyed by module name, with r/alpha resolved per module like PEFT does."""
        groups = self._lora_groups()
        return {module: self._target(module, parts) for module, parts in groups.items()}

    def replacements(self) -> dict[str, str]:
        """Parameter name -> adapter tensor name for tensors that replace a base tensor outright.

        PEFT loads every non-LoRA tensor of an adapter file into the model before merging:
        `modules_to_save` copies (`lm_head.weight`), biases trained with `bias="all"/"lora_only"`
        (saved as `q_proj.base_layer.bias`) and the base embedding saved alongside an embedding
        LoRA (`embed_tokens.base_layer.weight`). After `merge_and_unload` the wrapper levels
        (`base_layer`) are gone, so the parameter name drops them.
        """
        out: dict[str, str] = {}
        for key in self.tensor_shapes:
            name = _strip_prefix(key)
            if _lora_part(name) is not None:
                continue
            param = ".".join(part for part in name.split(".") if part != "base_layer")
            out[param] = key
        return out

    def modules_to_save(self) -> dict[str, str]:
        """The subset of `replacements()` that belongs to the config's `modules_to_save`."""
        wanted = self.config.get("modules_to_save") or []
        return {
            param: key
            for param, key in self.replacements().items()
            if any(_matches_module_suffix(param.rpartition(".")[0], m) for m in wanted)
        }

    @property
    def config_file(self) -> Path:
        return self.path / ADAPTER_CONFIG

    # -- parsing helpers -------------------------------------------------------------------

    def _lora_groups(self) -> dict[str, dict[str, str]]:
        """module -> {part ("A", "B", "emb_A", "emb_B", "magnitude", "bias"): tensor name}."""
        groups: dict[str, dict[str, str]] = {}
        for key in self.tensor_shapes:
            name = _strip_prefix(key)
            found = _lora_part(name)
            if found is None:
                continue
            module, part = found
            if part is None:
                raise AdapterError(
                    f"{self.weights_file}: tensor {key}: unrecognised LoRA tensor name "
                    "(expected lora_A.weight, lora_B.weight, lora_B.bias, lora_embedding_A/B or lora_magnitude_vector)"
                )
            groups.setdefault(module, {})[part] = key
        return groups

    def _target(self, module: str, parts: dict[str, str]) -> LoraTarget:
        is_embedding = "emb_A" in parts or "emb_B" in parts
        a_key, b_key = ("emb_A", "emb_B") if is_embedding else ("A", "B")
        for needed in (a_key, b_key):
            if needed not in parts:
                other = parts.get(b_key if needed == a_key else a_key, module)
                raise AdapterError(
                    f"{self.weights_file}: tensor {other}: its pair ({_PART_SUFFIX[needed]}) is missing; "
                    "the adapter file is incomplete"
                )
        if "magnitude" in parts and not self.config.get("use_dora"):
            raise AdapterError(
                f"{self.weights_file}: tensor {parts['magnitude']}: a DoRA magnitude in an adapter whose config "
                "has use_dora=false; fix adapter_config.json"
            )
        if self.config.get("use_dora") and "magnitude" not in parts:
            raise AdapterError(
                f"{self.weights_file}: tensor {parts[a_key]}: use_dora=true but lora_magnitude_vector is missing "
                f"for {module}; the adapter file is incomplete"
            )
        r, alpha = _rank_and_alpha(self.config, module)
        return LoraTarget(
            module=module,
            kind=KIND_EMBEDDING if is_embedding else KIND_LINEAR,
            r=r,
            alpha=alpha,
            use_rslora=bool(self.config.get("use_rslora")),
            use_dora=bool(self.config.get("use_dora")),
            fan_in_fan_out=bool(self.config.get("fan_in_fan_out")),
            lora_A=parts[a_key],
            lora_B=parts[b_key],
            magnitude=parts.get("magnitude"),
            lora_bias=parts.get("bias"),
        )


_PART_SUFFIX = {
    "A": "lora_A.weight",
    "B": "lora_B.weight",
    "bias": "lora_B.bias",
    "emb_A": "lora_embedding_A",
    "emb_B": "lora_embedding_B",
    "magnitude": "lora_magnitude_vector",
}
_SUFFIX_PART = {suffix: part for part, suffix in _PART_SUFFIX.items()}
# Older PEFT releases saved the DoRA magnitude as a module weight.
_SUFFIX_PART["lora_magnitude_vector.weight"] = "magnitude"


def _strip_prefix(key: str) -> str:
    return key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key


def _lora_part(name: str) -> tuple[str, str | None] | None:
    """(module, part) for a LoRA tensor name, (module, None) for an unknown `lora_*` one, else None."""
    for suffix, part in _SUFFIX_PART.items():
        if name.endswith("." + suffix):
            return name[: -len(suffix) - 1], part
    pieces = name.split(".")
    for i, piece in enumerate(pieces):
        if piece.startswith("lora_"):
            return ".".join(pieces[:i]), None
    return None


def _matches_module_suffix(module: str, wanted: str) -> bool:
    return module == wanted or module.endswith("." + wanted)


def _rank_and_alpha(config: Mapping[str, Any], module: str) -> tuple[int, float]:
    """r and alpha for `module`, matching pattern keys exactly as `peft.utils.other.get_pattern_key`."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    if not rank_pattern and not alpha_pattern:  # no key to match: PEFT's answer is the defaults (no import)
        return config.get("r", 8), config.get("lora_alpha", 8)
    import_peft()
    from peft.utils.other import get_pattern_key

    r = rank_pattern.get(get_pattern_key(list(rank_pattern), module), config.get("r", 8))
    alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), module), config.get("lora_alpha", 8))
    return r, alpha


# -- loading the adapter directory --------------------------------------------------------------


def _read_config(path: Path) -> dict[str, Any]:
    config_path = path / ADAPTER_CONFIG
    if not config_path.is_file():
        raise AdapterError(f"{config_path}: missing; a PEFT adapter directory needs adapter_config.json")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{config_path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{config_path}: expected a JSON object")
    return config


def _check_supported(config_path: Path, config: Mapping[str, Any]) -> None:
    """Refuse, before reading any tensor, what this merge (or PEFT itself) cannot merge."""
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        reason = UNSUPPORTED_PEFT_TYPES.get(peft_type, "only LoRA adapters (peft_type LORA) can be merged")
        raise AdapterError(f"{config_path}: field peft_type: {peft_type or 'missing'} is not supported: {reason}")
    for option, reason in UNSUPPORTED_OPTIONS.items():
        if config.get(option):
            raise AdapterError(f"{config_path}: field {option}={config[option]!r} is not supported: {reason}")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str):
        for prefix, reason in UNSUPPORTED_INITS.items():
            if init.lower().startswith(prefix):
                raise AdapterError(f"{config_path}: field init_lora_weights={init!r} is not supported: {reason}")
    if config.get("bias", "none") not in ("none", "all", "lora_only"):
        raise AdapterError(f"{config_path}: field bias={config.get('bias')!r}: expected none, all or lora_only")
    r = config.get("r", 8)
    if not isinstance(r, int) or r <= 0:
        raise AdapterError(f"{config_path}: field r={r!r}: must be a positive integer")
    for pattern_field in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(pattern_field) or {}, dict):
            raise AdapterError(f"{config_path}: field {pattern_field}: must be a mapping of module pattern to value")


def check_peft_accepts(path: Path):  # -> peft.LoraConfig
    """PEFT's own LoraConfig validation: what it refuses to build, it cannot merge either."""
    import warnings

    import_peft()
    from peft import PeftConfig

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return PeftConfig.from_pretrained(str(path))
    except Exception as exc:  # PEFT raises ValueError/TypeError for bad combinations
        reason = " ".join(str(exc).split())
        raise AdapterError(f"{path / ADAPTER_CONFIG}: PEFT refuses this config: {reason}") from None


def _weights_file(path: Path, allow_pickle: bool) -> Path:
    safetensors_file = path / ADAPTER_SAFETENSORS
    if safetensors_file.is_file():
        return safetensors_file
    pickle_file = path / ADAPTER_PICKLE
    if pickle_file.is_file():
        if not allow_pickle:
            raise AdapterError(
                f"{pickle_file}: pickled adapter weights are refused (they can run code on load); "
                "convert to adapter_model.safetensors or set allow_pickle: true"
            )
        return pickle_file
    raise AdapterError(f"{path}: no {ADAPTER_SAFETENSORS} (or {ADAPTER_PICKLE}) in the adapter directory")


def _tensor_headers(weights_file: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    if weights_file.suffix == ".safetensors":
        from safetensors import safe_open

        shapes: dict[str, tuple[int, ...]] = {}
        dtypes: dict[str, str] = {}
        with safe_open(str(weights_file), framework="pt") as handle:
            for key in handle.keys():
                sl = handle.get_slice(key)
                shapes[key] = tuple(sl.get_shape())
                dtypes[key] = str(sl.get_dtype())
        return shapes, dtypes
    tensors = _load_pickle(weights_file)
    return {k: tuple(v.shape) for k, v in tensors.items()}, {k: str(v.dtype) for k, v in tensors.items()}


def _load_pickle(weights_file: Path) -> dict[str, torch.Tensor]:
    # weights_only refuses arbitrary objects; the caller opted in with allow_pickle all the same.
    import pickle

    try:
        state = torch.load(str(weights_file), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise AdapterError(f"{weights_file}: refused by torch.load(weights_only=True): {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterError(f"{weights_file}: not a flat state dict of tensors; save the adapter as adapter_model.safetensors")
    return state
