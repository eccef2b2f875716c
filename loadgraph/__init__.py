"""loadgraph: LLM checkpoints prepared as a cached, declarative build graph on Ray."""

__version__ = "0.1.0"
