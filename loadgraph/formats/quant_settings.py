"""The spec's `quantize:` block as validated settings, and the methods refused with a reason.

Kept apart from planning so that the kernels' wrappers (bnb.py, fp8.py, quant_shapes.py) can
import the settings without the meta-model machinery, and every check here runs before any
model is built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError

SUPPORTED_METHODS = ("bnb-nf4", "bnb-fp4", "bnb-int8", "fp8")
_BNB_4BIT_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_FLOAT_DTYPES = ("float16", "bfloat16", "float32")
_QUANT_STORAGES = ("uint8", "int8", "float16", "bfloat16", "float32", "float64")


class QuantizeError(InputError, ValueError):
    """A quantization that cannot be done; the message says what, why, and what to do.

    An InputError (CLI exit 2): it is raised while planning, before any artifact is written.
    """


@dataclass(frozen=True)
class QuantSettings:
    """What the spec's `quantize:` block asks for, in the terms transformers' configs use.

    `dtype` is the dtype the model would be loaded in (`from_pretrained(dtype=...)`, "auto" reads
    config.json): transformers casts every weight to it *before* quantizing, so it changes bytes.
    `skip_modules` follows transformers exactly: left empty, transformers' default skips apply
    (lm_head / output embeddings, tied weights, the last parameter, `_keep_in_fp32_modules`);
    given, it *replaces* the default skips (only `_keep_in_fp32_modules` are still added), as
    `llm_int8_skip_modules` / `modules_to_not_convert` do in transformers.
    """

    method: str
    double_quant: bool = False
    blocksize: int = 64
    compute_dtype: str = "float32"
    quant_storage: str = "uint8"
    skip_modules: tuple[str, ...] = ()
    fp8_block_size: tuple[int, int] = (128, 128)
    llm_int8_threshold: float = 6.0
    dtype: str = "auto"

    def __post_init__(self) -> None:
        refuse_unsupported(self.method, cuda_available=torch.cuda.is_available())
        if self.blocksize not in _BNB_4BIT_BLOCKSIZES:
            raise QuantizeError(
                f"quantize.blocksize={self.blocksize} is not a bitsandbytes 4-bit block size; "
                f"use one of {_BNB_4BIT_BLOCKSIZES} (transformers always writes 64)"
            )
        if self.compute_dtype not in _FLOAT_DTYPES:
            raise QuantizeError(f"quantize.compute_dtype={self.compute_dtype!r} is not one of {_FLOAT_DTYPES}")
        if self.quant_storage not in _QUANT_STORAGES:
            raise QuantizeError(f"quantize.quant_storage={self.quant_storage!r} is not one of {_QUANT_STORAGES}")
        if self.dtype != "auto" and self.dtype not in _FLOAT_DTYPES:
            raise QuantizeError(f"dtype={self.dtype!r} is not 'auto' or one of {_FLOAT_DTYPES}")
        if len(self.fp8_block_size) != 2 or min(self.fp8_block_size) <= 0:
            raise QuantizeError(f"quantize.fp8_block_size={self.fp8_block_size} must be two positive integers")
        # Frozen dataclass: normalise list inputs (YAML) to tuples so settings stay hashable.
        object.__setattr__(self, "skip_modules", tuple(self.skip_modules))
        object.__setattr__(self, "fp8_block_size", tuple(int(x) for x in self.fp8_block_size))
        object.__setattr__(self, "llm_int8_threshold", float(self.llm_int8_threshold))

    @property
    def is_bnb(self) -> bool:
        return self.method.startswith("bnb-")

    @property
    def is_4bit(self) -> bool:
        return self.method in ("bnb-nf4", "bnb-fp4")


_REFUSALS: dict[str, str] = {
    "hqq": (
        "HQQ through transformers 5 is broken: quantizing on load raises NotImplementedError and a "
        "pre-quantized HQQ checkpoint loads without error but with random weights; use bnb-nf4 or fp8"
    ),
    "gptq": (
        "GPTQ needs calibration over the whole model (gptqmodel plus a calibration data set), "
        "which per-shard quantization cannot do; quantize with gptqmodel outside loadgraph, or use bnb-nf4/fp8"
    ),
    "awq": (
        "AWQ needs calibration over the whole model (autoawq plus a calibration data set), "
        "which per-shard quantization cannot do; quantize with autoawq outside loadgraph, or use bnb-nf4/fp8"
    ),
}


def refuse_unsupported(method: str, *, cuda_available: bool) -> None:
    """Raise QuantizeError, before any heavy work, for a method that cannot give a loadable result."""
    key = method.lower()
    if key in SUPPORTED_METHODS:
        return
    for prefix, reason in _REFUSALS.items():
        if key == prefix or key.startswith(prefix + "-") or key.startswith(prefix + "_"):
            raise QuantizeError(f"quantize.method={method!r} refused: {reason}")
    if key.startswith("eetq"):
        if not cuda_available:
            raise QuantizeError(
                f"quantize.method={method!r} refused: EETQ needs a CUDA GPU and the eetq hub kernel, and this "
                "host has no CUDA; run on a GPU host with transformers' EetqConfig, or use bnb-int8"
            )
        raise QuantizeError(
            f"quantize.method={method!r} refused: loadgraph writes no EETQ checkpoints (EETQ packs weights "
            "with its CUDA kernel at load time); load with transformers' EetqConfig instead, or use bnb-int8"
        )
    raise QuantizeError(f"quantize.method={method!r} is unknown; use one of {', '.join(SUPPORTED_METHODS)}")
