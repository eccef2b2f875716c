"""Importing PEFT without bitsandbytes in a process that never needs PEFT's bitsandbytes layers.

PEFT imports bitsandbytes unconditionally, and bitsandbytes' import wraps its kernels in
torch.compile, which loads torch's inductor: `import peft` took 2.8 s with it and 0.4 s without on
2 cores, in a 1.2B merge build of 18 s that uses PEFT only for its config checks and its module and
pattern matching. The CLI's build of a graph that quantizes nothing and attaches nothing (so loads
no bitsandbytes model through PEFT) imports PEFT with bitsandbytes hidden; bitsandbytes itself stays
importable for whoever imports it directly (the QLoRA round trip of a merge).
"""

from __future__ import annotations

import sys

_WITHOUT_BITSANDBYTES = False


def without_bitsandbytes() -> None:
    """This process will never load a bitsandbytes model through PEFT (a process-wide promise)."""
    global _WITHOUT_BITSANDBYTES
    _WITHOUT_BITSANDBYTES = True


def import_peft() -> None:
    """Import PEFT (before any `from peft import ...`), without bitsandbytes when promised."""
    if "peft" in sys.modules or not _WITHOUT_BITSANDBYTES or "bitsandbytes" in sys.modules:
        return
    sys.modules["bitsandbytes"] = None  # type: ignore[assignment]  # import fails, find_spec says absent
    try:
        import peft  # noqa: F401
    finally:
        del sys.modules["bitsandbytes"]
