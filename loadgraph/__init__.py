"""loadgraph: LLM checkpoints prepared as a cached, declarative build graph on Ray."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy: `import loadgraph` (the CLI's first line) must not import torch or transformers.
    if name in ("load_pretrained_model", "load"):
        from loadgraph import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'loadgraph' has no attribute {name!r}")
