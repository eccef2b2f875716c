"""From artifact to live model: LLaVA's `load_pretrained_model` and fine-tuning preparation.

Imports are lazy so that `import loadgraph.loading` costs nothing until a loader is called.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_pretrained_model", "load"]


def __getattr__(name: str) -> Any:
    if name == "load_pretrained_model":
        from loadgraph.loading.loader import load_pretrained_model

        return load_pretrained_model
    if name == "load":
        from loadgraph.loading.training import load

        return load
    raise AttributeError(f"module 'loadgraph.loading' has no attribute {name!r}")
