"""The deterministic pieces every test-model factory shares: seeds derived from names, a seeded
global RNG that does not leak, and the dtype names the factories accept."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def _torch_dtype(dtype: str) -> torch.dtype:
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}") from None


def _stable_seed(*parts: object) -> int:
    """A seed derived from names, stable across processes (``hash()`` is salted per process)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _generator(*parts: object) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(_stable_seed(*parts))


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG (what transformers' init uses) without leaking it to the caller."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
