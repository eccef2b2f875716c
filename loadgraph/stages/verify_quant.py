"""verify's quantize check: every quantized tensor dequantized and held to its format's error bound.

The input is the unquantized tensor the quantize stage read (cast to the load dtype, as
transformers casts before quantizing). Each format's bound follows from how it rounds:
- nf4 / fp4 (blocks of `blocksize` values scaled by their absmax, one of 16 codes): a value is
  quantized to one of the two codes around it (bitsandbytes' kernels pick the nearest up to their
  own float rounding; CPU and CUDA differ exactly there), so its error is at most the width of
  that code interval times the block's true absmax, plus the error in the stored absmax (none
  without double quant: it must equal the true absmax exactly; with double quant it is itself
  8-bit blockwise-quantized, bounded the same way by its nested block's absmax), plus the
  rounding of the dequantized output;
- int8 vector-wise (rows scaled by their absmax, SCB): half a step of the row scale (SCB / 254),
  and SCB must equal the row's absmax exactly (quantization runs with threshold 0: no outliers);
- fp8 (128x128 blocks, float8_e4m3fn): half an e4m3 ulp of the scaled value times the block's
  scale_inv, and scale_inv must be exactly transformers' 1 / (448 / block absmax).
The figure reported is the worst block's error as a fraction of its bound.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from loadgraph.errors import BuildError
from loadgraph.stages.verify_numerics import CHUNK_ELEMENTS, U32, bitwise_equal, chunk_elements, row_chunks, ulp

SLACK = 1 + 1e-5  # float32 rounding inside the kernels (scaling by 1/absmax and the like)
FP8_MAX = 448.0


def _fail(name: str, what: str) -> BuildError:
    return BuildError(f"verify: quantize: tensor {name!r}: {what}; the quantized bytes are wrong")


def check_4bit(name: str, value: torch.Tensor, stored: Mapping[str, torch.Tensor], device) -> dict:
    """`value`: the weight as quantized; `stored`: {suffix ('' for the packed weight, 'absmax', ...): tensor}."""
    from bitsandbytes.functional import QuantState

    stats = {k: v for k, v in stored.items() if k}
    try:
        state = QuantState.from_dict(stats, device=device)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise _fail(name, f"unreadable quant state ({exc})") from None
    if tuple(state.shape) != tuple(value.shape):
        raise _fail(name, f"quant state shape {list(state.shape)} != weight shape {list(value.shape)}")
    x = value.to(device).reshape(-1)
    size = state.blocksize
    true_absmax = _block_absmax(x, size)
    if state.nested:
        # The format, decoded here rather than by bitsandbytes' kernels (whose CPU dequantize_4bit
        # is wrong for weights narrower than a block): code[q] * nested absmax + offset.
        nested = state.state2
        per_nested = nested.absmax.to(device).double().repeat_interleave(nested.blocksize)[: state.absmax.numel()]
        stored_absmax = nested.code.to(device).double()[state.absmax.to(device).long()] * per_nested + float(state.offset)
        absmax_bound = _nested_absmax_bound(name, true_absmax, state)
        absmax_err = (stored_absmax - true_absmax).abs()
        if not bool((absmax_err <= absmax_bound).all()):
            bad = int((absmax_err > absmax_bound).nonzero()[0])
            raise _fail(name, f"block {bad} absmax {float(stored_absmax[bad]):.6g} is {float(absmax_err[bad]):.3g} from the true "
                              f"{float(true_absmax[bad]):.6g}, over the double-quant bound {float(absmax_bound[bad]):.3g}")
    else:
        stored_absmax = state.absmax.to(device).double()
        if not torch.equal(stored_absmax, true_absmax.float().double()):
            bad = int((stored_absmax != true_absmax.float().double()).nonzero()[0])
            raise _fail(name, f"block {bad} absmax {float(stored_absmax[bad]):.6g} != the block's true absmax {float(true_absmax[bad]):.6g}")
        absmax_bound = torch.zeros_like(true_absmax)
    quant_map = state.code.to(device=device, dtype=torch.float64)
    codes = torch.unique(quant_map)
    packed = stored[""].to(device).reshape(-1)
    out_round = 0.5 * ulp(true_absmax + absmax_bound, state.dtype)  # loaders round to the compute dtype
    ratio = torch.empty_like(true_absmax)
    step = max(1, chunk_elements(device) // size) * size  # whole blocks per chunk: float64 temporaries stay small
    for start in range(0, x.numel(), step):
        first = start // size
        chunk_x = _blocks(x[start:start + step].double(), size)
        chunk_d = _blocks(_decode_4bit(packed[start // 2:(start + step) // 2], quant_map)[: min(step, x.numel() - start)], size)
        chunk_d = chunk_d * stored_absmax[first:first + chunk_d.shape[0]].unsqueeze(1)
        rows = slice(first, first + chunk_x.shape[0])
        absmax = true_absmax[rows].unsqueeze(1)
        width = _interval_width(chunk_x / absmax.clamp_min(1e-300), codes)
        bound = absmax * width * SLACK + (absmax_bound[rows] + out_round[rows]).unsqueeze(1)
        err = (chunk_d - chunk_x).abs()
        ratio[rows] = torch.where(bound > 0, err / bound.clamp_min(1e-300), torch.where(err > 0, torch.inf, 0.0)).amax(dim=1)
    return _worst(name, ratio, torch.ones_like(ratio), "block")


def _decode_4bit(packed: torch.Tensor, quant_map: torch.Tensor) -> torch.Tensor:
    """Two codes per byte, the high nibble first: bitsandbytes' packing."""
    pairs = torch.stack([packed.long() >> 4, packed.long() & 15], dim=1).reshape(-1)
    return quant_map[pairs]


def _blocks(flat: torch.Tensor, size: int) -> torch.Tensor:
    pad = -(-flat.numel() // size) * size - flat.numel()
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, size)


def _block_absmax(x: torch.Tensor, size: int) -> torch.Tensor:
    step = max(1, CHUNK_ELEMENTS // size) * size
    return torch.cat([_blocks(x[s:s + step].double(), size).abs().amax(dim=1) for s in range(0, x.numel(), step)])


def _interval_width(normalized: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Width of the code interval around each normalized value (stretched to it beyond the ends)."""
    i = torch.bucketize(normalized, codes).clamp(1, codes.numel() - 1)
    lo, hi = codes[i - 1], codes[i]
    return torch.maximum(hi, normalized) - torch.minimum(lo, normalized)


def _nested_absmax_bound(name: str, true_absmax: torch.Tensor, state) -> torch.Tensor:
    """Double quant: absmax - offset is 8-bit blockwise-quantized; bound each block's absmax error."""
    offset = float(state.offset)
    mean = float(true_absmax.float().mean())
    if abs(offset - mean) > 1e-5 * abs(mean) + 1e-12:
        raise _fail(name, f"double-quant offset {offset:.6g} != mean of the block absmaxes {mean:.6g}")
    nested_block = state.state2.blocksize
    shifted = true_absmax - offset
    nested_absmax = _blocks(shifted.abs(), nested_block).amax(dim=1, keepdim=True)
    codes = torch.unique(state.state2.code.to(device=shifted.device, dtype=torch.float64))
    width = _interval_width(_blocks(shifted, nested_block) / nested_absmax.clamp_min(1e-300), codes)
    # bitsandbytes' blockwise quantizer lands within ~3e-5 (normalized) of the codes it chooses
    # between, not exactly on the nearest (measured on CPU): 2**-12 of room for that.
    per_block = (nested_absmax * (width + 2.0**-12)).reshape(-1)[: shifted.numel()]
    # Plus the fp32 offset arithmetic and the offset's own rounding.
    return per_block * SLACK + 4 * U32 * true_absmax.abs() + 4 * U32 * abs(offset)


def check_int8(name: str, value: torch.Tensor, weight: torch.Tensor, scb: torch.Tensor, device) -> dict:
    x = value.to(device).to(torch.float16)  # Int8Params casts to float16 before quantizing
    true_scb = x.abs().amax(dim=1).float()
    if scb.shape != true_scb.shape or not torch.equal(scb.to(device), true_scb):
        raise _fail(name, "SCB (row scales) differ from the rows' absmax")
    weight, scb = weight.to(device), scb.to(device)
    err = torch.empty(x.shape[0], dtype=torch.float64, device=device)
    for rows in row_chunks(x.shape[0], x.shape[1], chunk_elements(device)):
        dequantized = weight[rows].double() * (scb[rows].double() / 127).unsqueeze(1)  # the format: q * SCB / 127
        err[rows] = (dequantized - x[rows].double()).abs().amax(dim=1)
    bound = true_scb.double() / 254 * SLACK + 4 * U32 * true_scb.double()
    return _worst(name, err, bound, "row")


def check_fp8(name: str, value: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], device) -> dict:
    x = value.to(device).float()
    *lead, rows, cols = x.shape
    bm, bn = block
    tiles = x.reshape(*lead, rows // bm, bm, cols // bn, bn)
    max_abs = tiles.abs().amax(dim=(-3, -1))
    safe = torch.where(max_abs > 0, max_abs, torch.ones_like(max_abs))
    scales = torch.where(max_abs > 0, FP8_MAX / safe, torch.ones_like(safe))
    want_inv = (1.0 / scales).to(torch.float32)
    if scale_inv.shape != want_inv.shape or not torch.equal(scale_inv.to(device), want_inv):
        raise _fail(name, "weight_scale_inv differs from 1 / (448 / block absmax)")
    # One row of tiles at a time: float64 temporaries of bm rows, not of the tensor.
    per_block = torch.empty(max_abs.shape, dtype=torch.float64, device=device)
    q_tiles = weight.to(device).reshape(tiles.shape)
    for r in range(tiles.shape[-4]):
        inv = want_inv[..., r:r + 1, :].double().unsqueeze(-1).unsqueeze(-3)
        x64 = tiles[..., r:r + 1, :, :, :].double()
        scaled = (x64 / inv).abs().clamp_max(FP8_MAX)
        bound = 0.5 * ulp(scaled, torch.float8_e4m3fn) * inv + 4 * U32 * x64.abs()
        err = (q_tiles[..., r:r + 1, :, :, :].double() * inv - x64).abs()
        ratio = torch.where(bound > 0, err / bound.clamp_min(1e-300), torch.where(err > 0, torch.inf, 0.0))
        per_block[..., r:r + 1, :] = ratio.amax(dim=(-3, -1))
    per_block = per_block.reshape(-1)
    return _worst(name, per_block, torch.ones_like(per_block), "block")


def check_kept(name: str, value: torch.Tensor, stored: torch.Tensor) -> None:
    if not bitwise_equal(stored, value):
        raise BuildError(f"verify: quantize: tensor {name!r} is not quantized, so it must equal its input cast to {value.dtype}; it does not")


def _worst(name: str, err: torch.Tensor, bound: torch.Tensor, unit: str) -> dict:
    ratio = torch.where(bound > 0, err / bound.clamp_min(1e-300), torch.where(err > 0, torch.inf, 0.0))
    worst = float(ratio.max()) if ratio.numel() else 0.0
    if not worst <= 1.0:
        bad = int(ratio.argmax())
        raise _fail(name, f"{unit} {bad} error {float(err[bad]):.3g} is {worst:.3g}x its bound {float(bound[bad]):.3g}")
    return {"worst": worst, "blocks": int(ratio.numel())}
