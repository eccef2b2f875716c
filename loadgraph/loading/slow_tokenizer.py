"""The slow (sentencepiece) Llama tokenizer LLaVA's builder asks for with `use_fast=False`.

transformers 5 ignores `use_fast` (AutoTokenizer: "V5: Always use fast tokenizers") and its
LlamaTokenizer is tokenizers-backed; a tokenizer.model is converted to a `tokenizers` model.
That one does not tokenize as transformers 4's slow LlamaTokenizer (what LLaVA's builder returns
for Llama/Vicuna checkpoints): text starting with a space, and decoding with special tokens left
in, differ (measured by `make llava-check`). transformers 5 keeps the sentencepiece machinery
(`SentencePieceBackend`: the sentencepiece model loaded the transformers 4 way, with
`add_dummy_prefix` switched off when not `legacy`, and 4's `_tokenize`), but no Llama class on
it; this class adds what transformers 4's slow LlamaTokenizer added on top of that: the prefix
handling of `tokenize`, BOS/EOS, and its decoding (sentencepiece decode between special tokens,
added tokens joined by spaces).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers.tokenization_utils_sentencepiece import SPIECE_UNDERLINE, SentencePieceBackend


class LlamaSlowTokenizer(SentencePieceBackend):
    """transformers 4.x's `LlamaTokenizer` (slow) behaviour on transformers 5's sentencepiece backend."""

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, unk_token: Any = "<unk>", bos_token: Any = "<s>", eos_token: Any = "</s>", pad_token: Any = None,
                 add_bos_token: bool = True, add_eos_token: bool = False, legacy: bool | None = None, clean_up_tokenization_spaces: bool = False,
                 **kwargs: Any):
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        # transformers 4 defaulted an unset `legacy` to True (with a warning); the backend reads any falsy value as False
        kwargs.pop("special_tokens_pattern", None)
        super().__init__(vocab_file=vocab_file, unk_token=unk_token, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token,
                         legacy=True if legacy is None else bool(legacy), clean_up_tokenization_spaces=clean_up_tokenization_spaces,
                         special_tokens_pattern="none", **kwargs)

    def tokenize(self, text: str, **kwargs: Any) -> list[str]:
        """Not legacy: a prefix "▁" is added, and dropped again when the text starts with a special token."""
        if self.legacy or not text:
            return super().tokenize(text, **kwargs)
        tokens = super().tokenize(SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " "), **kwargs)
        if len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self.all_special_tokens:
            tokens = tokens[1:]
        return tokens

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None) -> list[int]:
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        out = bos + token_ids_0 + eos
        return out if token_ids_1 is None else out + bos + token_ids_1 + eos

    def get_special_tokens_mask(self, token_ids_0: list[int], token_ids_1: list[int] | None = None,
                                already_has_special_tokens: bool = False) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        bos, eos = [1] if self.add_bos_token else [], [1] if self.add_eos_token else []
        out = bos + [0] * len(token_ids_0) + eos
        return out if token_ids_1 is None else out + bos + [0] * len(token_ids_1) + eos

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return (int(self.add_bos_token) + int(self.add_eos_token)) * (2 if pair else 1)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """sentencepiece decodes the pieces between special tokens; the prefix "▁" added on encode goes."""
        if not tokens:
            return ""
        if tokens[0].startswith(SPIECE_UNDERLINE):
            tokens = [tokens[0][1:], *tokens[1:]]
        out, pieces, prev_special = "", [], False
        for i, token in enumerate(tokens):
            if token in self.all_special_tokens:
                if not prev_special and i != 0 and self.legacy:
                    out += " "
                out += self.sp_model.decode(pieces) + token
                prev_special, pieces = True, []
            else:
                pieces.append(token)
                prev_special = False
        return out + self.sp_model.decode(pieces)

    def _decode(self, token_ids: int | list[int], skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None,
                spaces_between_special_tokens: bool = True, **kwargs: Any) -> str:
        """Added (non-special) tokens decode on their own, joined to the text around by spaces."""
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        tokens = self.convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens)
        # transformers 4's "legacy added tokens": added beyond the sentencepiece vocabulary, or not special
        special = set(self.all_special_tokens)
        added = {t for t, i in self._added_tokens_encoder.items() if t not in special or i >= self.vocab_size}
        texts, current = [], []
        for token in tokens:
            if token in added:
                if current:
                    text = self.convert_tokens_to_string(current)
                    if text:
                        texts.append(text)
                    current = []
                texts.append(token)
            else:
                current.append(token)
        if current:
            texts.append(self.convert_tokens_to_string(current))
        text = (" " if spaces_between_special_tokens else "").join(texts)
        cleanup = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        return self.clean_up_tokenization(text) if cleanup else text


# tokenizer_class values for which transformers 4's AutoTokenizer(use_fast=False) builds its slow LlamaTokenizer
LLAMA_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")


def slow_tokenizer(path: Path, **kwargs: Any) -> LlamaSlowTokenizer | None:
    """The slow Llama tokenizer of `path` (a tokenizer.model and a Llama tokenizer_class), else None:
    other tokenizers load as transformers 5 has them."""
    import json

    config = path / "tokenizer_config.json"
    if not (path / "tokenizer.model").is_file() or not config.is_file():
        return None
    doc = json.loads(config.read_text())
    if doc.get("tokenizer_class") not in LLAMA_CLASSES:
        return None
    # transformers 5 drops add_bos/eos_token from the saved config when a tokenizer.json is present
    # (its fast tokenizer's post-processor holds them); the slow tokenizer needs them as arguments
    flags = {k: bool(doc[k]) for k in ("add_bos_token", "add_eos_token") if k in doc}
    return LlamaSlowTokenizer.from_pretrained(str(path), **{**flags, **kwargs})
