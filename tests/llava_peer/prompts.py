"""Texts both sides tokenize in `make llava-check` (imported by run_llava.py in LLaVA's venv too).

LLaVA's own conversation templates are rendered by run_llava.py from llava.conversation; these
are the edge cases where tokenizers are known to part: leading/trailing/double spaces, newlines,
special tokens inside text, bytes beyond the vocabulary, an added token.
"""

TEMPLATES = ("llava_v1", "vicuna_v1", "llava_llama_2", "mistral_instruct", "chatml_direct", "plain", "v0")
QUESTION = "<image>\nWhat is unusual about this image?"
EDGE_TEXTS = ("hello world", "hello  world", " leading space", "trailing space ", "\n\nnewlines\n", "the </s> eos inside", "<s>bos inside",
              "tabs\tand ünïcødé 猫 12345", "USER: a cat ASSISTANT: the dog</s>", "", "<im_patch> x", "<image> starts with an image",
              "ends with an image <image>")


def image_token_ids(tokenizer, prompt: str, image_token_index: int = -200) -> list[int]:
    """LLaVA's tokenizer_image_token (llava/mm_utils.py), restated: each piece around "<image>" is
    tokenized alone, IMAGE_TOKEN_INDEX goes between, and only the first piece keeps its BOS."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(image_token_index)  # LLaVA's separator [index] * (offset + 1), less its first `offset`
        ids.extend(chunk[offset:])  # LLaVA drops the first `offset` ids of every piece, BOS or not
    return ids


def token_report(tokenizer, texts, ids_of) -> dict:
    """text -> [ids, decode(skip_special_tokens=True), decode()] (without IMAGE_TOKEN_INDEX for decoding)."""
    out = {}
    for text in texts:
        ids = ids_of(text)
        plain = [i for i in ids if i >= 0]
        out[text] = [ids, tokenizer.decode(plain, skip_special_tokens=True), tokenizer.decode(plain)]
    return out
