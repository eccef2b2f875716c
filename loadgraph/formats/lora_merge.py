"""PEFT's merge arithmetic, operation for operation (formats/lora.py parses, formats/lora_plan.py plans).

Every formula repeats what peft 0.21 does (`peft/tuners/lora/layer.py` `Linear.merge` /
`Embedding.merge` / `get_delta_weight`, `variants.py` `DoraLinearVariant.merge_unsafe`,
`dora.py` `get_weight_norm`), including its dtype casts, so the merged bytes are PEFT's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from loadgraph.formats.lora import AdapterError, LoraTarget
from loadgraph.formats.lora_plan import MergePlan, TensorOp
from loadgraph.formats.names import KIND_EMBEDDING


def _transpose(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """peft.utils.other.transpose."""
    return weight.T if fan_in_fan_out else weight


def lora_delta(target: LoraTarget, tensors: Mapping[str, torch.Tensor], *, scale_multiplier: float = 1.0) -> torch.Tensor:
    """The float32 delta in the base weight's layout, as PEFT's `get_delta_weight` computes it.

    `.float()` stands for PEFT's autocast of adapter tensors to float32; the product is taken
    before scaling and the transpose before scaling, as in PEFT, so rounding is the same.
    """
    weight_a = tensors[target.lora_A].float()
    weight_b = tensors[target.lora_B].float()
    fan_in_fan_out = True if target.kind == KIND_EMBEDDING else target.fan_in_fan_out
    # In place: the same elementwise product as PEFT's `transpose(B @ A) * scaling`, without a
    # second full-size float32 temporary.
    return _transpose(weight_b @ weight_a, fan_in_fan_out).mul_(target.scaling(scale_multiplier))


def merge_weight(
    weight: torch.Tensor,
    target: LoraTarget,
    tensors: Mapping[str, torch.Tensor],
    *,
    scale_multiplier: float = 1.0,
    round_delta: bool = False,
    in_place: bool = False,
) -> torch.Tensor:
    """The merged weight, same dtype and shape as `weight`; `weight` itself is left untouched
    unless `in_place` (the caller owns it), which the blocked merge then overwrites (the result).
    `round_delta`: PEFT 0.10's Linear.merge of fp16 weights on the CPU, `weight += delta.to(fp16)`."""
    if weight.device.type == "cpu" and blockable(target, tuple(weight.shape), round_delta):
        return _blocked_linear_merge(weight, target, tensors, scale_multiplier, weight if in_place else None)
    delta = lora_delta(target, tensors, scale_multiplier=scale_multiplier)
    if target.use_dora:
        return _merge_dora(weight, target, delta, tensors)
    if target.kind == KIND_EMBEDDING or round_delta:
        # Embedding.merge rounds the delta to the weight dtype *before* adding
        # (`weight.data += delta.to(orig_dtype)`), unlike Linear.merge.
        merged = weight.clone()
        merged += delta.to(weight.dtype)
        return merged
    # Linear.merge: `weight.data += delta` with a float32 delta: added in float32, rounded once.
    # Accumulating into the float32 delta instead (addition commutes exactly) avoids a slow
    # mixed-dtype in-place add and a clone of the weight; the single rounding is the same.
    return delta.add_(weight).to(weight.dtype)


# Rows of the float32 delta computed at a time by the blocked merge: 256 x 4096 x 4 B = 4 MB, so the
# product, its scaling, the add and the rounding run on data still in cache. Measured with 16 units
# at once on the 16-core GPU host (11008x4096 bf16): 6.5 GB/s of weight at 256 rows, 4.4 at 128, 2.9 at
# 64 (each block is four torch calls, and smaller blocks queue on the GIL), 1.9 for the whole matrix.
# LOADGRAPH_MERGE_ROW_BLOCK: smaller blocks let the tests' tiny models (32-128 rows) take the
# blocked and streamed paths; the bytes are the same at any block size, so it is not in any key.
ROW_BLOCK = int(os.environ.get("LOADGRAPH_MERGE_ROW_BLOCK", 256))


def blockable(target: LoraTarget, shape: tuple[int, ...], round_delta: bool = False) -> bool:
    """Whether PEFT's Linear.merge of this (CPU) weight can run a block of rows at a time."""
    return (target.kind != KIND_EMBEDDING and not target.use_dora and not round_delta and not target.fan_in_fan_out
            and len(shape) == 2 and shape[0] >= 2 * ROW_BLOCK)


def row_blocks(rows: int) -> list[tuple[int, int]]:
    """Near-equal row ranges, never fewer than ROW_BLOCK rows (see _blocked_linear_merge)."""
    blocks = rows // ROW_BLOCK
    bounds = [rows * i // blocks for i in range(blocks + 1)]
    return list(zip(bounds, bounds[1:]))


class RowMerger:
    """Linear.merge of one weight by blocks of its rows: per element the float32 operations of the
    whole-matrix merge (each product element is a dot product over the rank, whatever rows are
    computed with it), so a weight streamed through it in row_blocks is merged bit for bit as PEFT."""

    def __init__(self, target: LoraTarget, tensors: Mapping[str, torch.Tensor], scale_multiplier: float = 1.0):
        self.weight_a = tensors[target.lora_A].float()
        self.weight_b = tensors[target.lora_B].float()
        self.scaling = target.scaling(scale_multiplier)

    def merge(self, rows: torch.Tensor, lo: int, hi: int, out: torch.Tensor, scratch: torch.Tensor) -> None:
        """`out` (may be `rows` itself) = merged rows lo:hi; `scratch`: float32, at least rows' numel."""
        delta = scratch[: rows.numel()].view(rows.shape)
        torch.matmul(self.weight_b[lo:hi], self.weight_a, out=delta)
        delta.mul_(self.scaling).add_(rows)
        out.copy_(delta)


def row_mergers(plans: list[tuple[MergePlan, Mapping[str, torch.Tensor]]], name: str, shape: tuple[int, ...],
                round_delta: bool = False) -> list[RowMerger] | None:
    """A RowMerger per LoRA merged into `name`, in the order `_apply` merges them (plans: each
    adapter's plan and tensors, in order), when every merge it gets is a blockable Linear.merge (no
    bias merge or replaced weight); None otherwise."""
    mergers: list[RowMerger] = []
    for plan, adapter_tensors in plans:
        op = plan.ops.get(name)
        if op is None:
            continue
        if op.replace_from is not None or any(what != "weight" or not blockable(target, shape, round_delta) for what, target in op.merges):
            return None
        _require(plan, name, op, adapter_tensors)
        mergers += [RowMerger(target, adapter_tensors, plan.scale_multiplier) for _, target in op.merges]
    return mergers or None


def _blocked_linear_merge(weight: torch.Tensor, target: LoraTarget, tensors: Mapping[str, torch.Tensor], scale_multiplier: float,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """Linear.merge, ROW_BLOCK rows at a time: 3-6x faster per core than the whole-matrix path and
    without full-size float32 temporaries (a unit holds no delta of model size). Blocks are never
    fewer rows than ROW_BLOCK, so the product stays a matrix product (a one-row product takes
    another kernel, a matrix-vector one, whose summation order differs). `out` may be `weight`
    itself: a block's rows are read into the float32 scratch before they are overwritten."""
    merger = RowMerger(target, tensors, scale_multiplier)
    bounds = row_blocks(weight.shape[0])
    merged = torch.empty_like(weight) if out is None else out
    scratch = torch.empty(max(hi - lo for lo, hi in bounds) * weight.shape[1], dtype=torch.float32)
    for lo, hi in bounds:
        merger.merge(weight[lo:hi], lo, hi, merged[lo:hi], scratch)
    return merged


def _merge_dora(
    weight: torch.Tensor, target: LoraTarget, delta: torch.Tensor, tensors: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """DoraLinearVariant / DoraEmbeddingVariant `merge_unsafe`.

    The norm is taken over the base weight as it is before this adapter (PEFT's
    `_unmerged_base_weight`), of `transpose(W) + transpose(delta)` in float32, row-wise in the
    (out, in) orientation; embedding DoRA always uses the transposed orientation and does not
    round its delta first.
    """
    magnitude = tensors[target.magnitude].float()
    fan_in_fan_out = True if target.kind == KIND_EMBEDDING else target.fan_in_fan_out
    # get_weight_norm(weight, transpose(delta), scaling=1): `1 * x` is exact, so it is left out.
    norm_input = _transpose(weight, fan_in_fan_out) + _transpose(delta, fan_in_fan_out)
    weight_norm = torch.linalg.norm(norm_input, dim=1).to(norm_input.dtype)
    del norm_input
    dora_factor = magnitude / weight_norm
    if target.kind == KIND_EMBEDDING:
        dora_factor = dora_factor.view(1, -1)
    else:
        dora_factor = _transpose(dora_factor.view(-1, 1), target.fan_in_fan_out)
    return (dora_factor * (weight + delta)).to(weight.dtype)


def merge_bias(
    bias: torch.Tensor,
    target: LoraTarget,
    tensors: Mapping[str, torch.Tensor],
    *,
    scale_multiplier: float = 1.0,
) -> torch.Tensor:
    """`lora_bias=True`: Linear.merge does `base.bias.data += lora_B.bias * scaling` (float32 product)."""
    if target.lora_bias is None:
        return bias
    merged = bias.clone()
    merged += tensors[target.lora_bias].float() * target.scaling(scale_multiplier)
    return merged


def merge_shard(
    plan: MergePlan,
    shard_tensors: Mapping[str, torch.Tensor],
    adapter_tensors: Mapping[str, torch.Tensor],
    round_delta: bool = False,
    in_place: bool = False,
) -> dict[str, torch.Tensor]:
    """One base shard in, the same names out; untouched tensors are passed through as they are.
    `in_place`: the shard's tensors are the caller's to overwrite (a merged one may be its input)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in shard_tensors.items():
        op = plan.ops.get(name)
        out[name] = tensor if op is None else _apply(plan, name, op, tensor, adapter_tensors, round_delta, in_place)
    return out


def _apply(
    plan: MergePlan, name: str, op: TensorOp, tensor: torch.Tensor, adapter_tensors: Mapping[str, torch.Tensor], round_delta: bool = False,
    in_place: bool = False,
) -> torch.Tensor:
    _require(plan, name, op, adapter_tensors)
    if op.replace_from is not None:
        # PEFT's load_state_dict copies into the existing parameter: a cast to the base dtype.
        tensor = adapter_tensors[op.replace_from].to(dtype=tensor.dtype, copy=True)
        in_place = True  # the copy is ours
    for what, target in op.merges:
        if what == "weight":
            tensor = merge_weight(tensor, target, adapter_tensors, scale_multiplier=plan.scale_multiplier, round_delta=round_delta,
                                  in_place=in_place)
            in_place = True  # a merge's result is a new tensor or the caller's own
        else:
            tensor = merge_bias(tensor, target, adapter_tensors, scale_multiplier=plan.scale_multiplier)
    return tensor


def _require(plan: MergePlan, name: str, op: TensorOp, adapter_tensors: Mapping[str, torch.Tensor]) -> None:
    needed = [op.replace_from] if op.replace_from else []
    for _, target in op.merges:
        needed += [k for k in (target.lora_A, target.lora_B, target.magnitude, target.lora_bias) if k]
    for key in needed:
        if key not in adapter_tensors:
            raise AdapterError(f"{plan.adapter_file}: tensor {key}: not among the adapter tensors given for {name}")
