"""verify's merge check: every merged tensor recomputed in float64, apart from the merge path.

The reference is the exact result of the LoRA formulas (PEFT's: scale = alpha/r or alpha/sqrt(r),
delta = B @ A * scale, DoRA's m / ||W + delta|| row scaling) evaluated in float64 from the base
tensor and the adapter's factors. The stored tensor may differ from it only by the rounding
PEFT's own arithmetic makes, and that is bounded element by element from first principles:
float32 matmul/add/norm errors (a multiple of the float32 unit roundoff times the magnitudes
involved) plus the final rounding to the stored dtype (half an ulp). A wrong alpha, a swapped
layer or a flipped bit exceeds it; a correct merge cannot. Reported: the largest distance in
ulps between the stored tensor and the reference rounded to the stored dtype (0 or 1 for a
PEFT-exact merge), and the worst element's error as a fraction of its bound.

Work runs in row chunks of the (out, in) orientation, so float64 temporaries stay small.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from loadgraph.errors import BuildError
from loadgraph.formats.lora import LoraTarget
from loadgraph.formats.names import KIND_EMBEDDING
from loadgraph.stages.verify_numerics import U32, bitwise_equal, chunk_elements, rounding_error, row_chunks, ulp


@dataclass(frozen=True)
class MergeStep:
    """One thing an adapter does to a tensor, in PEFT's order."""

    what: str  # "replace" | "weight" | "bias"
    tensors: Mapping[str, torch.Tensor]
    target: LoraTarget | None = None
    replace_from: str | None = None
    multiplier: float = 1.0
    round_delta: bool = False  # merge.delta_rounding: twice (the delta rounded to the weight's dtype first)


def merge_steps(name: str, plans: list, adapter_tensors: list[Mapping[str, torch.Tensor]]) -> list[MergeStep]:
    """The steps every adapter plan (formats/lora_plan.MergePlan) applies to tensor `name`, in order."""
    steps: list[MergeStep] = []
    for plan, tensors in zip(plans, adapter_tensors):
        op = plan.ops.get(name)
        if op is None:
            continue
        if op.replace_from is not None:
            steps.append(MergeStep("replace", tensors, replace_from=op.replace_from))
        steps += [MergeStep(what, tensors, target=target, multiplier=plan.scale_multiplier) for what, target in op.merges]
    return steps


def _transposed(target: LoraTarget) -> bool:
    # PEFT's delta is B @ A in the (out, in) orientation; embeddings and Conv1D store it transposed.
    return target.kind == KIND_EMBEDDING or target.fan_in_fan_out


def check_merged(name: str, stored: torch.Tensor, base: torch.Tensor, steps: list[MergeStep], device: torch.device) -> dict:
    """Compare one stored tensor with its float64 reference; raise BuildError outside the bound."""
    dtype = stored.dtype
    start = base.to(dtype)  # PEFT merges into the base as loaded in the build's dtype
    replaced = [s for s in steps if s.what == "replace"]
    if replaced:
        start = replaced[-1].tensors[replaced[-1].replace_from].to(dtype)
    merges = [s for s in steps if s.what != "replace"]
    if not merges:
        if not bitwise_equal(stored, start):
            raise BuildError(f"verify: merge: tensor {name!r} differs from its expected value (the base, or the adapter's replacement, cast to {dtype})")
        return {"max_ulp": 0, "bound_ulp": 0, "worst": 0.0, "exact": True}
    weight_steps = [s for s in merges if s.what == "weight"]
    transposed = bool(weight_steps) and _transposed(weight_steps[0].target)
    stored_oi = stored.T if transposed else stored
    start_oi = start.T if transposed else start
    if stored_oi.ndim == 1:
        stored_oi, start_oi = stored_oi.view(1, -1), start_oi.view(1, -1)
    max_ulp, bound_ulp, worst, ill = 0, 0, 0.0, 0
    factors = {}  # per step: (A, B) as float64 on the compute device, loaded once
    for rows in row_chunks(stored_oi.shape[0], stored_oi.shape[1], chunk_elements(device)):
        x = start_oi[rows].to(device=device, dtype=torch.float64)
        bound = torch.zeros_like(x)
        for i, step in enumerate(merges):
            x, bound = _apply_step(step, i, x, bound, rows, dtype, factors, device)
        got = stored_oi[rows].to(device=device, dtype=torch.float64)
        diff = (got - x).abs()
        ratio = torch.where(bound > 0, diff / bound.clamp_min(1e-300), torch.where(diff > 0, torch.inf, 0.0))
        chunk_worst = float(ratio.max())
        if not chunk_worst <= 1.0:
            flat = int(ratio.argmax())
            row, col = divmod(flat, ratio.shape[1])
            row += rows.start
            where = (col, row) if transposed else (row, col)
            raise BuildError(
                f"verify: merge: tensor {name!r} element {list(where)[: stored.ndim]} is {float(got.view(-1)[flat]):.6g} where the "
                f"float64 LoRA reference gives {float(x.view(-1)[flat]):.6g} ({chunk_worst:.3g}x the rounding bound): "
                "the merge is wrong (adapter, scale or base tensor)"
            )
        worst = max(worst, chunk_worst)
        # In ulps of the stored dtype, over the well-conditioned elements (bound within one ulp of
        # the larger of the two magnitudes): the stored value's distance from the reference rounded
        # to that dtype, and the most the bound admits there. Elements where W and the delta cancel
        # have bounds of many ulps of their tiny values; they are held to the absolute bound above.
        rounded = x.to(dtype).double()
        spacing = ulp(torch.maximum(got.abs(), rounded.abs()), dtype)
        conditioned = bound <= spacing
        ill += int((~conditioned).sum())
        if bool(conditioned.any()):
            max_ulp = max(max_ulp, int(((got - rounded).abs() / spacing + 0.5).floor()[conditioned].max()))
            bound_ulp = max(bound_ulp, int((bound / spacing + 1).floor()[conditioned].max()))
    return {"max_ulp": max_ulp, "bound_ulp": bound_ulp, "worst": worst, "exact": False, "elements": stored.numel(), "ill_conditioned": ill}


def _apply_step(step: MergeStep, index: int, x, bound, rows: slice, dtype: torch.dtype, factors: dict, device):
    """One adapter's effect on a chunk of rows: the exact value and the error bound PEFT's float32 path can add."""
    target = step.target
    scale = target.scaling(step.multiplier)
    if step.what == "bias":
        lora_bias = step.tensors[target.lora_bias].to(device=device, dtype=torch.float64).view(1, -1)
        delta = lora_bias * scale
        delta_err = 2 * U32 * delta.abs()
        new = x + delta
        return new, bound + delta_err + U32 * new.abs() + rounding_error(new, dtype)
    if index not in factors:
        factors[index] = (step.tensors[target.lora_A].to(device=device, dtype=torch.float64),
                          step.tensors[target.lora_B].to(device=device, dtype=torch.float64))
    a, b = factors[index]
    b_rows = b[rows]
    delta = (b_rows @ a) * scale
    # float32 matmul of r products plus the scaling: at most (r + 2) roundings of |B| @ |A| * |s|
    # (doubled for safety: a real error is orders of magnitude bigger).
    delta_err = 2 * (target.r + 2) * U32 * (b_rows.abs() @ a.abs()) * abs(scale)
    if target.use_dora:
        return _dora_step(step, x, bound, delta, delta_err, rows, dtype, device)
    new = x + delta
    if target.kind == KIND_EMBEDDING or step.round_delta:
        # Embedding.merge (and delta_rounding: twice) rounds the delta to the weight dtype before adding.
        delta_err = delta_err + rounding_error(delta, dtype)
    return new, bound + delta_err + U32 * new.abs() + rounding_error(new, dtype)


def _dora_step(step: MergeStep, x, bound, delta, delta_err, rows: slice, dtype, device):
    """DoRA: W' = (m / ||W + delta||_row) * (W + delta), with the norm's float32 error propagated."""
    magnitude = step.tensors[step.target.magnitude].to(device=device, dtype=torch.float64)[rows].view(-1, 1)
    summed = x + delta
    summed_err = bound + delta_err + U32 * summed.abs()
    norm = torch.linalg.vector_norm(summed, dim=1, keepdim=True)
    n = summed.shape[1]
    # Relative error of the factor m / norm: the float32 norm (n terms), the division and the cast,
    # plus how far the inputs' own errors can move the norm.
    rel_factor_err = (n + 4) * U32 + torch.linalg.vector_norm(summed_err, dim=1, keepdim=True) / norm.clamp_min(1e-300)
    factor = magnitude / norm
    new = factor * summed
    err = factor.abs() * summed_err + new.abs() * rel_factor_err + U32 * new.abs()
    return new, err + rounding_error(new, dtype)
