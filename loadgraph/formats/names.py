"""On-disk tensor names versus the names a transformers 5 model uses in memory.

A checkpoint on disk keeps its original names (`language_model.model.layers.0...` for LLaVA,
per-expert `block_sparse_moe.experts.3.w1.weight` for Mixtral), while the model that
transformers 5 builds, and therefore every PEFT adapter trained on it, uses the in-memory names
(`model.language_model.layers.0...`, one fused `mlp.experts.gate_up_proj`). We never keep a table
of our own: the mapping is computed with transformers' own loading code
(`get_model_conversion_mapping` + `core_model_loading.rename_source_key`, exactly the calls
`from_pretrained` makes) against the model built on the meta device, which costs no memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

# Transformers 5's GPT-2 style Conv1D stores its weight as (in, out); PEFT merges into it with
# fan_in_fan_out=True whatever the adapter config says.
KIND_LINEAR = "linear"
KIND_EMBEDDING = "embedding"
KIND_CONV1D = "conv1d"

SAFETENSORS_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class CheckpointNames:
    """Everything the merge planner needs to know about a checkpoint's names, from headers only.

    `to_model` is the plain on-disk -> in-memory map. A name in `converted` reaches memory
    through a transformers `WeightConverter` (e.g. Mixtral experts stacked into one fused
    parameter), so its value changes on load and several on-disk tensors may share one in-memory
    name: it cannot be merged by name as one tensor. `tied` maps an in-memory alias to the
    in-memory parameter it shares storage with (Gemma's `lm_head.weight` -> embed_tokens);
    the alias is not on disk. `module_kinds` says which layer type each weight-owning module is,
    because PEFT picks the merge formula (and fan_in_fan_out) from the module type.
    `param_order` lists in-memory parameter names in `named_modules` order, which is the order
    PEFT's `merge_and_unload` visits layers in.
    """

    to_model: dict[str, str]
    converted: frozenset[str] = frozenset()
    tied: dict[str, str] = field(default_factory=dict)
    module_kinds: dict[str, str] = field(default_factory=dict)
    param_order: tuple[str, ...] = ()
    unexpected: frozenset[str] = frozenset()
    architecture: str = ""

    def to_checkpoint(self) -> dict[str, str]:
        """In-memory -> on-disk for tensors that map one to one (converted ones left out)."""
        return {model: disk for disk, model in self.to_model.items() if disk not in self.converted}


def checkpoint_to_model_names(base_dir: str | Path, keys: Iterable[str] | None = None) -> dict[str, str]:
    """On-disk tensor name -> in-memory (transformers 5) parameter name for `base_dir`.

    Several on-disk names map to the same in-memory name where transformers fuses them
    (Mixtral experts); `inspect_checkpoint_names` says which ones and more.
    """
    return inspect_checkpoint_names(base_dir, keys).to_model


def inspect_checkpoint_names(base_dir: str | Path, keys: Iterable[str] | None = None) -> CheckpointNames:
    """Build the model on the meta device and map `keys` (default: the checkpoint's) as loading would."""
    base_dir = Path(base_dir)
    model = build_meta_model(base_dir)
    disk_keys = list(keys) if keys is not None else list_checkpoint_keys(base_dir)
    to_model, converted, unexpected = _rename_like_from_pretrained(model, disk_keys)
    return CheckpointNames(
        to_model=to_model,
        converted=frozenset(converted),
        tied=_tied_aliases(model, set(to_model.values())),
        module_kinds=_module_kinds(model),
        param_order=tuple(name for name, _ in model.named_parameters(remove_duplicate=False)),
        unexpected=frozenset(unexpected),
        architecture=type(model).__name__,
    )


def build_meta_model(base_dir: Path):  # -> transformers.PreTrainedModel
    """The checkpoint's model class, instantiated on the meta device (no memory, no weights read).

    Custom code is refused: its names are not covered by transformers' conversion mappings, and
    importing it would execute the checkpoint's code.
    """
    import torch
    import transformers

    config_path = base_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{config_path}: missing; a Hugging Face checkpoint directory needs its config.json")
    config = transformers.AutoConfig.from_pretrained(str(base_dir), trust_remote_code=False)
    architectures = getattr(config, "architectures", None) or []
    model_cls = next((getattr(transformers, a) for a in architectures if hasattr(transformers, a)), None)
    if model_cls is None:
        # No (known) architecture recorded: fall back to what AutoModelForCausalLM would build.
        model_cls = transformers.AutoModelForCausalLM._model_mapping[type(config)]
    with torch.device("meta"):
        return model_cls(config)


def list_checkpoint_keys(base_dir: Path) -> list[str]:
    """Tensor names of a safetensors checkpoint, from the index or the file headers only."""
    index = base_dir / SAFETENSORS_INDEX
    if index.is_file():
        return list(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    files = sorted(base_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{base_dir}: no *.safetensors weights; convert pickled weights to safetensors first")
    names: list[str] = []
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            names.extend(handle.keys())
    return names


def _rename_like_from_pretrained(model, disk_keys: list[str]) -> tuple[dict[str, str], set[str], set[str]]:
    """Replays the renaming loop of `core_model_loading.convert_and_load_state_dict_in_model`.

    Fresh transforms are taken for every call because some of them are stateful (a
    `GroupWeightRename` activates on the first key it sees, which is why keys go in
    `dot_natural_key` order, as transformers sorts them).
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        dot_natural_key,
        rename_source_key,
    )

    weight_mapping = get_model_conversion_mapping(model)
    renamings = [t for t in weight_mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in weight_mapping if isinstance(t, WeightConverter)]
    meta_state = model.state_dict()
    prefix = model.base_model_prefix

    to_model: dict[str, str] = {}
    converted: set[str] = set()
    unexpected: set[str] = set()
    for disk_key in sorted(disk_keys, key=dot_natural_key):
        model_key, source_pattern = rename_source_key(disk_key, renamings, converters, prefix, meta_state)
        if model_key not in meta_state and disk_key in meta_state:
            # Same fallback as transformers: the key was already in memory form, only a prefix may differ.
            model_key, source_pattern = rename_source_key(disk_key, [], [], prefix, meta_state)
        if model_key not in meta_state:
            unexpected.add(disk_key)  # transformers would drop it on load (e.g. old rotary buffers)
            continue
        to_model[disk_key] = model_key
        if source_pattern is not None:
            converted.add(disk_key)
    return to_model, converted, unexpected


def _tied_aliases(model, on_disk_model_names: set[str]) -> dict[str, str]:
    """Alias -> canonical for parameters that are one Parameter object (weight tying).

    The canonical name is the one actually stored on disk, because that is the tensor a merge
    into either alias has to change.
    """
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    aliases: dict[str, str] = {}
    for names in groups.values():
        if len(names) < 2:
            continue
        stored = [n for n in names if n in on_disk_model_names]
        canonical = stored[0] if stored else names[0]
        aliases.update({n: canonical for n in names if n != canonical})
    return aliases


def _module_kinds(model) -> dict[str, str]:
    """Layer type of each module that owns a weight, in the vocabulary PEFT dispatches on."""
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D

    kinds: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            kinds[name] = KIND_EMBEDDING
        elif isinstance(module, nn.Linear):
            kinds[name] = KIND_LINEAR
        elif isinstance(module, Conv1D):
            kinds[name] = KIND_CONV1D
        elif "weight" in getattr(module, "_parameters", {}):
            kinds[name] = type(module).__name__
    return kinds
