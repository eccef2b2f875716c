"""Tiny random checkpoints made offline, for tests, the demo and benchmarks.

Everything here is built locally (no hub access) and deterministically: the same arguments give
byte-identical files, so tests can compare content-addressed cache keys across builds. The files
are produced by the real libraries (transformers' ``save_pretrained``, ``tokenizers``' BPE trainer,
PEFT's ``get_peft_model``) so that loadgraph is exercised on the layouts it meets in the wild,
not on hand-made imitations; the exceptions are documented where they occur.

The factories live in submodules by what they make (tiny_models, tokenizer, llama_checkpoint,
lora_adapter; determinism holds the seeding they share); import them from here.
"""

from __future__ import annotations

from loadgraph.testing.llama_checkpoint import make_llama_checkpoint
from loadgraph.testing.lora_adapter import make_lora_adapter
from loadgraph.testing.tiny_models import KINDS, build_tiny_model, make_tiny_model, tiny_config
from loadgraph.testing.tokenizer import (
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    IMAGE_TOKEN,
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    SPECIAL_TOKENS,
    UNK_TOKEN_ID,
    make_tokenizer,
)

__all__ = [
    "KINDS",
    "SPECIAL_TOKENS",
    "UNK_TOKEN_ID",
    "BOS_TOKEN_ID",
    "EOS_TOKEN_ID",
    "PAD_TOKEN_ID",
    "IMAGE_TOKEN",
    "IMAGE_TOKEN_ID",
    "tiny_config",
    "make_tokenizer",
    "build_tiny_model",
    "make_tiny_model",
    "make_llama_checkpoint",
    "make_lora_adapter",
]
