"""A real byte-level BPE tokenizer trained offline on a fixed English-like corpus, and the special
tokens (ids) every tiny config points at."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

# Llama's convention (<unk>=0, <s>=1, </s>=2); every tiny config points at these ids.
SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>")
UNK_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID = range(4)
IMAGE_TOKEN = "<image>"
# The BPE trainer assigns special tokens the first ids in order, so "<image>" right after the
# four above is id 4 whatever the vocabulary size: the LLaVA config can name it without the tokenizer.
IMAGE_TOKEN_ID = len(SPECIAL_TOKENS)

# Plain-text and multimodal (list of {"type": "image"|"text"}) message contents both render.
_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)

_SUBJECTS = (
    "the model", "a small cat", "my friend", "the engineer", "this checkpoint", "the cluster",
    "an adapter", "the old dog", "every student", "our team", "the quick fox", "a researcher",
    "the scheduler", "her brother", "the tokenizer", "a tired worker", "the red robot", "some people",
)
_VERBS = (
    "loads", "merges", "quantizes", "reads", "writes", "builds", "exports", "caches", "likes",
    "sees", "finds", "checks", "watches", "remembers", "explains", "carries", "counts", "paints",
)
_OBJECTS = (
    "the weights", "a small file", "the shards", "every tensor", "some data", "the manifest",
    "a new picture", "the lazy dog", "many tokens", "its config", "the blue house", "a long letter",
    "the green garden", "two apples", "the morning news", "a bright window", "the whole library",
)
_TAILS = (
    "today", "quickly", "on the cluster", "without errors", "again and again", "in the morning",
    "before lunch", "with care", "for the demo", "at night", "near the river", "after the meeting",
    "during the summer", "in the kitchen", "while it rains", "every single day", "as usual",
)


def _corpus(n: int = 600) -> list[str]:
    """English-like sentences from a fixed RNG: enough text for a few hundred BPE merges."""
    rng = random.Random(1234)
    sentences = []
    for _ in range(n):
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"
        s = s[0].upper() + s[1:] + rng.choice((".", ".", ".", "!", "?"))
        if rng.random() < 0.2:
            s += f" It was {rng.randint(0, 999)} times, said {rng.choice(_SUBJECTS)}."
        sentences.append(s)
    return sentences


def make_tokenizer(out_dir: str | Path, vocab_size: int = 512, *, image_token: bool = False) -> Path:
    """Train a byte-level BPE on an in-memory corpus and save it as a transformers fast tokenizer.

    A real trained tokenizer (not a hand-written vocab) so that encode/decode, chat templates and
    ``AutoTokenizer`` behave as with hub checkpoints. Byte-level means any text round-trips; when
    ``vocab_size`` is too small for the 256-byte alphabet, only the corpus' characters are kept and
    other characters map to ``<unk>``. Training is deterministic (checked across processes).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    specials = list(SPECIAL_TOKENS) + ([IMAGE_TOKEN] if image_token else [])
    if vocab_size < len(specials) + 64:
        raise ValueError(f"vocab_size {vocab_size} is too small for a BPE tokenizer: use at least {len(specials) + 64}")

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    if vocab_size >= len(specials) + 256 + 32:
        alphabet: dict[str, Any] = {"initial_alphabet": pre_tokenizers.ByteLevel.alphabet()}
    else:
        alphabet = {"limit_alphabet": vocab_size - len(specials) - 16}
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, min_frequency=2, show_progress=False, **alphabet
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_TOKEN_ID)]
    )
    assert tok.token_to_id("<s>") == BOS_TOKEN_ID and tok.token_to_id("<pad>") == PAD_TOKEN_ID

    extra: dict[str, Any] = {"extra_special_tokens": {"image_token": IMAGE_TOKEN}} if image_token else {}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=2048,
        chat_template=_CHAT_TEMPLATE,
        **extra,
    )
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return out
