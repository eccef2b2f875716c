"""Merge planning: check one PEFT LoRA adapter against the base checkpoint's headers and decide,
per on-disk tensor, what the adapter does to it (replace, then merge in PEFT's order).

Planning reads names, shapes and dtypes only (formats/names.py, the adapter's headers), so a bad
adapter is refused with a message naming its file and tensor before any shard is read; the
plan is then applied shard by shard by formats/lora_merge.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from loadgraph.formats.lora import PEFT_PREFIX, AdapterError, LoraAdapter, LoraTarget, check_peft_accepts
from loadgraph.formats.names import KIND_CONV1D, KIND_EMBEDDING, KIND_LINEAR, CheckpointNames


@dataclass(frozen=True)
class TensorOp:
    """What happens to one on-disk tensor: optional replacement, then merges in PEFT's order."""

    replace_from: str | None = None
    merges: tuple[tuple[str, LoraTarget], ...] = ()  # ("weight" | "bias", target)


@dataclass(frozen=True, eq=False)
class MergePlan:
    """Per on-disk tensor name, what one adapter does to it; tensors not listed pass through."""

    adapter_file: Path
    ops: dict[str, TensorOp]
    scale_multiplier: float = 1.0

    def touched(self) -> set[str]:
        return set(self.ops)


def plan_merge(
    adapter: LoraAdapter,
    name_map: CheckpointNames | Mapping[str, str],
    base_tensors: Mapping[str, tuple[str, tuple[int, ...]]],
    *,
    scale_multiplier: float = 1.0,
) -> MergePlan:
    """Validate `adapter` against the base checkpoint's headers and decide what each tensor gets.

    `name_map` is `names.inspect_checkpoint_names(base_dir)` (preferred: it knows layer types,
    tied and fused weights) or a plain on-disk -> in-memory dict. `base_tensors` maps on-disk
    name -> (dtype string, shape). Raises AdapterError naming the adapter file and tensor.
    """
    names = name_map if isinstance(name_map, CheckpointNames) else CheckpointNames(to_model=dict(name_map))
    resolver = _NameResolver(names, base_tensors, adapter.weights_file)
    ops: dict[str, dict[str, Any]] = {}

    wrapped = adapter.modules_to_save()
    for param, key in adapter.replacements().items():
        disk = resolver.disk_name(param, key)
        if param in wrapped and resolver.is_tied(param) and not adapter.config.get("ensure_weight_tying"):
            # PEFT swaps in a *copy* of a modules_to_save layer, which unties it (unless the config
            # asks PEFT to keep ties): the merged model would need a tensor the base does not store.
            raise AdapterError(
                f"{adapter.weights_file}: tensor {key}: modules_to_save replaces {param}, which the base model "
                "ties to another weight (tie_word_embeddings); untie the base first (save it with "
                "tie_word_embeddings=false and both tensors) or train with ensure_weight_tying=true"
            )
        _check_same_shape(adapter, key, disk, base_tensors[disk][1])
        ops.setdefault(disk, {"replace_from": None, "merges": []})["replace_from"] = key

    targets = adapter.targets()
    ordered = sorted(targets.values(), key=lambda t: resolver.order(t.module))
    for target in ordered:
        target = _resolve_kind(adapter, target, resolver)
        weight_disk = resolver.disk_name(target.module + ".weight", target.lora_A)
        _check_target_shapes(adapter, target, weight_disk, base_tensors[weight_disk])
        ops.setdefault(weight_disk, {"replace_from": None, "merges": []})["merges"].append(("weight", target))
        if target.lora_bias is not None:
            bias_disk = resolver.disk_name(target.module + ".bias", target.lora_bias, missing="no_bias")
            _check_bias_shape(adapter, target, bias_disk, base_tensors[bias_disk][1])
            ops.setdefault(bias_disk, {"replace_from": None, "merges": []})["merges"].append(("bias", target))

    _check_config_targets_have_weights(adapter, names, resolver, targets)
    return MergePlan(
        adapter_file=adapter.weights_file,
        ops={disk: TensorOp(op["replace_from"], tuple(op["merges"])) for disk, op in ops.items()},
        scale_multiplier=scale_multiplier,
    )


class _NameResolver:
    """Adapter-side names (in-memory, or legacy on-disk) -> on-disk tensor names of the base."""

    def __init__(self, names: CheckpointNames, base_tensors: Mapping[str, Any], adapter_file: Path) -> None:
        self.names = names
        self.base_tensors = base_tensors
        self.adapter_file = adapter_file
        self.model_to_disk = names.to_checkpoint()
        for alias, canonical in names.tied.items():
            if canonical in self.model_to_disk and alias not in self.model_to_disk:
                self.model_to_disk[alias] = self.model_to_disk[canonical]
        self.fused = {names.to_model[d] for d in names.converted}
        self.position = {name: i for i, name in enumerate(names.param_order)}

    def in_memory(self, param: str) -> str | None:
        """The in-memory name of an adapter-side parameter name, or None."""
        if param in self.model_to_disk:
            return param
        if param in self.names.to_model and param not in self.names.converted:
            return self.names.to_model[param]  # an adapter saved with the checkpoint's legacy names
        return None

    def disk_name(self, param: str, adapter_key: str, missing: str = "no_module") -> str:
        model_name = self.in_memory(param)
        if model_name is not None:
            disk = self.model_to_disk[model_name]
            if disk in self.base_tensors:
                return disk
        module = param.rpartition(".")[0]
        if param in self.fused or param in self.names.converted or any(
            f.startswith(module + ".") for f in self.fused
        ):
            raise AdapterError(
                f"{self.adapter_file}: tensor {adapter_key}: {module} is stored fused by transformers 5 "
                "(e.g. MoE experts) and cannot be merged per tensor; target attention/dense layers instead"
            )
        if missing == "no_bias" and self.in_memory(module + ".weight") is not None:
            raise AdapterError(
                f"{self.adapter_file}: tensor {adapter_key}: lora_bias needs a bias in the base layer {module}, "
                "which has none; PEFT cannot merge this adapter either"
            )
        raise AdapterError(
            f"{self.adapter_file}: tensor {adapter_key}: the base checkpoint has no tensor {param}; "
            "the adapter was trained on a different model (check the base model and its revision)"
        )

    def is_tied(self, param: str) -> bool:
        model_name = self.in_memory(param)
        return model_name in self.names.tied or model_name in self.names.tied.values()

    def order(self, module: str) -> int:
        """Position of the module in named_modules order (PEFT merges layers in that order)."""
        model_name = self.in_memory(module + ".weight")
        return self.position.get(model_name or "", len(self.position))

    def kind(self, module: str) -> str | None:
        model_name = self.in_memory(module + ".weight")
        if model_name is None:
            return None
        return self.names.module_kinds.get(model_name.rpartition(".")[0])


def _resolve_kind(adapter: LoraAdapter, target: LoraTarget, resolver: _NameResolver) -> LoraTarget:
    """PEFT picks layer class and fan_in_fan_out from the module type, not from the config.

    `dispatch_default` forces fan_in_fan_out=False on nn.Linear and True on GPT-2's Conv1D.
    """
    kind = resolver.kind(target.module)
    if kind is None:
        return target  # no layer types known (plain dict name map): trust the adapter
    if target.kind == KIND_EMBEDDING and kind != KIND_EMBEDDING:
        raise AdapterError(
            f"{adapter.weights_file}: tensor {target.lora_A}: embedding LoRA on {target.module}, "
            f"which is a {kind} layer in the base model"
        )
    if target.kind == KIND_LINEAR and kind not in (KIND_LINEAR, KIND_CONV1D):
        raise AdapterError(
            f"{adapter.weights_file}: tensor {target.lora_A}: LoRA on {target.module}, a {kind} layer; "
            "only Linear, Conv1D and Embedding layers can be merged here"
        )
    return replace(target, fan_in_fan_out=(kind == KIND_CONV1D))


FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "FLOAT16", "BFLOAT16", "FLOAT32", "FLOAT64", "HALF", "FLOAT"}


def _normalise_dtype(dtype: str) -> str:
    """Accepts safetensors ("BF16"), torch ("torch.bfloat16") or plain ("bfloat16") spellings."""
    return str(dtype).removeprefix("torch.").upper()


def _check_same_shape(adapter: LoraAdapter, key: str, disk: str, base_shape: tuple[int, ...]) -> None:
    shape = adapter.tensor_shapes[key]
    if tuple(shape) != tuple(base_shape):
        hint = " (resized vocabulary? resize the base model first)" if "embed" in key or "lm_head" in key else ""
        raise AdapterError(
            f"{adapter.weights_file}: tensor {key}: shape {list(shape)} does not match base tensor {disk} "
            f"{list(base_shape)}{hint}"
        )


def _check_target_shapes(
    adapter: LoraAdapter, target: LoraTarget, disk: str, base: tuple[str, tuple[int, ...]]
) -> None:
    dtype, base_shape = base
    if len(base_shape) != 2:
        raise AdapterError(
            f"{adapter.weights_file}: tensor {target.lora_A}: base tensor {disk} has shape {list(base_shape)}, "
            "not a 2-D weight"
        )
    if _normalise_dtype(dtype) not in FLOAT_DTYPES:
        raise AdapterError(
            f"{adapter.weights_file}: tensor {target.lora_A}: base tensor {disk} is {dtype}; merge into the "
            "unquantized checkpoint and quantize afterwards"
        )
    shape_a = adapter.tensor_shapes[target.lora_A]
    shape_b = adapter.tensor_shapes[target.lora_B]
    if target.kind == KIND_EMBEDDING:
        rows, cols = base_shape  # (num_embeddings, embedding_dim)
        want_a, want_b = (target.r, rows), (cols, target.r)
    else:
        out_f, in_f = (base_shape[1], base_shape[0]) if target.fan_in_fan_out else base_shape
        want_a, want_b = (target.r, in_f), (out_f, target.r)
    for key, got, want in ((target.lora_A, shape_a, want_a), (target.lora_B, shape_b, want_b)):
        if tuple(got) != want:
            raise AdapterError(
                f"{adapter.weights_file}: tensor {key}: shape {list(got)} but base tensor {disk} {list(base_shape)} "
                f"with r={target.r} needs {list(want)}; the adapter was trained on a different model or "
                "adapter_config.json's r/rank_pattern does not match its weights"
            )
    if target.magnitude is not None:
        out_dim = base_shape[1] if (target.kind == KIND_EMBEDDING or target.fan_in_fan_out) else base_shape[0]
        got = tuple(adapter.tensor_shapes[target.magnitude])
        if got != (out_dim,):
            raise AdapterError(
                f"{adapter.weights_file}: tensor {target.magnitude}: shape {list(got)} but base tensor {disk} "
                f"{list(base_shape)} needs [{out_dim}]"
            )


def _check_bias_shape(adapter: LoraAdapter, target: LoraTarget, disk: str, base_shape: tuple[int, ...]) -> None:
    got = tuple(adapter.tensor_shapes[target.lora_bias])
    if got != tuple(base_shape):
        raise AdapterError(
            f"{adapter.weights_file}: tensor {target.lora_bias}: shape {list(got)} does not match base tensor "
            f"{disk} {list(base_shape)}"
        )


def _check_config_targets_have_weights(
    adapter: LoraAdapter, names: CheckpointNames, resolver: _NameResolver, targets: Mapping[str, LoraTarget]
) -> None:
    """Every layer adapter_config.json targets must have weights in the file.

    PEFT wraps each layer its config matches and then loads whatever the file holds; a layer with
    no weights keeps its fresh initialisation and is merged silently (a no-op with the default
    init, random noise with init_lora_weights=false). A truncated file is an error here.
    """
    if not names.module_kinds or adapter.config.get("target_modules") in (None, "all-linear"):
        return
    from loadgraph.peft_import import import_peft

    import_peft()
    from peft.tuners.tuners_utils import check_target_module_exists

    peft_config = check_peft_accepts(adapter.path)
    covered = {resolver.in_memory(t.module + ".weight") for t in targets.values()}
    for module, kind in names.module_kinds.items():
        if kind not in (KIND_LINEAR, KIND_EMBEDDING, KIND_CONV1D):
            continue
        matched = check_target_module_exists(peft_config, module)
        if matched and not type(matched).__name__ == "_ExcludedModule" and module + ".weight" not in covered:
            raise AdapterError(
                f"{adapter.weights_file}: tensor {PEFT_PREFIX}{module}.lora_A.weight: missing, although adapter_config.json's "
                "target_modules selects that layer; the adapter file is incomplete or for another model"
            )
