"""Tiny random checkpoints made offline, for tests, the demo and benchmarks.

Everything here is built locally (no hub access) and deterministically: the same arguments give
byte-identical files, so tests can compare content-addressed cache keys across builds. The files
are produced by the real libraries (transformers' ``save_pretrained``, ``tokenizers``' BPE trainer,
PEFT's ``get_peft_model``) so that loadgraph is exercised on the layouts it meets in the wild,
not on hand-made imitations; the exceptions are documented where they occur.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedModel

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

KINDS: tuple[str, ...] = ("llama", "mistral", "mixtral", "qwen2", "gemma", "llava")

# Llama's convention (<unk>=0, <s>=1, </s>=2); every tiny config points at these ids.
SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>")
UNK_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID = range(4)
IMAGE_TOKEN = "<image>"
# The BPE trainer assigns special tokens the first ids in order, so "<image>" right after the
# four above is id 4 whatever the vocabulary size: the LLaVA config can name it without the tokenizer.
IMAGE_TOKEN_ID = len(SPECIAL_TOKENS)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# Plain-text and multimodal (list of {"type": "image"|"text"}) message contents both render.
_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)

# Tiny CLIP vision tower of the LLaVA model: 32x32 images in 8x8 patches -> 16 image tokens.
_VISION_IMAGE_SIZE = 32
_VISION_PATCH_SIZE = 8


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


# --------------------------------------------------------------------------------------------
# configs


def _text_kwargs(vocab_size: int) -> dict[str, Any]:
    return dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
    )


def tiny_config(kind: str, vocab_size: int = 512) -> PreTrainedConfig:
    """A config of the given architecture small enough to build, save and run in milliseconds.

    Special-token ids match :func:`make_tokenizer`; LLaVA's ``image_token_id`` is ``IMAGE_TOKEN_ID``.
    """
    import transformers as tf

    text = _text_kwargs(vocab_size)
    if kind == "llama":
        return tf.LlamaConfig(**text, tie_word_embeddings=False)
    if kind == "mistral":
        return tf.MistralConfig(**text, sliding_window=None, tie_word_embeddings=False)
    if kind == "mixtral":
        return tf.MixtralConfig(
            **text, num_local_experts=4, num_experts_per_tok=2, sliding_window=None, tie_word_embeddings=False
        )
    if kind == "qwen2":
        return tf.Qwen2Config(**text, tie_word_embeddings=False)
    if kind == "gemma":
        return tf.GemmaConfig(**text, tie_word_embeddings=True)
    if kind == "llava":
        if IMAGE_TOKEN_ID >= vocab_size:
            raise ValueError(f"vocab_size {vocab_size} leaves no room for the image token id {IMAGE_TOKEN_ID}")
        vision = tf.CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=_VISION_IMAGE_SIZE,
            patch_size=_VISION_PATCH_SIZE,
            projection_dim=32,
        )
        text_config = tf.LlamaConfig(**text, tie_word_embeddings=False)
        num_patches = (_VISION_IMAGE_SIZE // _VISION_PATCH_SIZE) ** 2
        return tf.LlavaConfig(
            vision_config=vision,
            text_config=text_config,
            image_token_id=IMAGE_TOKEN_ID,
            image_seq_length=num_patches,  # "default" strategy drops CLS: one token per patch
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
            projector_hidden_act="gelu",
            tie_word_embeddings=False,
        )
    raise ValueError(f"unknown kind {kind!r}: expected one of {KINDS}")


def _auto_model_class(model_type: str) -> type:
    """The Auto class a user would load this checkpoint with (LLaVA and Qwen-VL are not causal-LM classes)."""
    import transformers as tf

    from loadgraph.loading.dispatch import MULTIMODAL_TYPES

    if model_type in MULTIMODAL_TYPES:
        return tf.AutoModelForImageTextToText
    return tf.AutoModelForCausalLM


# --------------------------------------------------------------------------------------------
# tokenizer

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


# --------------------------------------------------------------------------------------------
# tiny transformers models


def _write_llava_processor_files(out: Path, config: PreTrainedConfig) -> None:
    """Write ``processor_config.json`` exactly as ``LlavaProcessor.save_pretrained`` does in transformers 5.

    Written as JSON rather than through ``CLIPImageProcessor``/``LlavaProcessor``: in transformers 5
    instantiating ``CLIPImageProcessor`` needs PIL (or torchvision), which this environment lacks.
    The bytes equal those transformers writes when PIL is present (the tests check it there), so
    the file does not depend on what is installed; ``AutoProcessor`` loads it wherever PIL is.
    """
    side = config.vision_config.image_size
    processor = {
        "image_processor": {
            "crop_size": {"height": side, "width": side},
            "do_center_crop": True,
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],  # OpenAI CLIP's
            "image_processor_type": "CLIPImageProcessor",
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "resample": 3,  # bicubic
            "rescale_factor": 1 / 255,
            "size": {"shortest_edge": side},
        },
        "image_token": IMAGE_TOKEN,
        "num_additional_image_tokens": 1,  # CLIP's CLS token
        "patch_size": config.vision_config.patch_size,
        "processor_class": "LlavaProcessor",
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
    }
    text = json.dumps(processor, indent=2, sort_keys=True) + "\n"
    (out / "processor_config.json").write_text(text, encoding="utf-8")


def build_tiny_model(kind: str, *, dtype: str = "float32", seed: int = 0) -> PreTrainedModel:
    """The in-memory model that :func:`make_tiny_model` saves, for comparing against what loads back."""
    config = tiny_config(kind)
    with _seeded(seed):
        model = _auto_model_class(config.model_type).from_config(config)
    return model.to(_torch_dtype(dtype)).eval()


def make_tiny_model(
    kind: str,
    out_dir: str | Path,
    *,
    dtype: str = "float32",
    seed: int = 0,
    max_shard_size: str | int | None = "40KB",
    tokenizer: bool = True,
) -> Path:
    """Build a random model of ``kind`` from :func:`tiny_config` and save it like a hub checkpoint.

    The small default ``max_shard_size`` makes even a tiny model sharded, so per-shard code paths
    and the index are exercised. ``save_pretrained`` output is byte-deterministic for a given seed
    (its safetensors metadata is only ``{"format": "pt"}``; JSON files are written with sorted keys).
    """
    model = build_tiny_model(kind, dtype=dtype, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_kwargs: dict[str, Any] = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out, **save_kwargs)
    if tokenizer:
        make_tokenizer(out, model.config.get_text_config().vocab_size, image_token=kind == "llava")
    if kind == "llava":
        _write_llava_processor_files(out, model.config)
    return out


# --------------------------------------------------------------------------------------------
# large llama-shaped checkpoints without materialising the model


_FILL_CHUNK = 1 << 22  # elements per independently seeded chunk: fixed, so values never depend on threads


def _fill(name: str, shape: Sequence[int], dtype: torch.dtype, seed: int, pool: ThreadPoolExecutor) -> torch.Tensor:
    """Cheap deterministic values: ones for norms (as at init), N(0, 0.02) elsewhere.

    Drawn straight in the target dtype (no float32 copy of a multi-GB embedding), in fixed-size
    chunks each with its own generator so that threads share the work (torch's RNG ops are
    single-threaded and release the GIL): at 70B scale the random draw, not the disk, dominates.
    """
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    out = torch.empty(shape, dtype=dtype)
    flat = out.view(-1)

    def draw(start: int) -> None:
        flat[start : start + _FILL_CHUNK].normal_(0.0, 0.02, generator=_generator(seed, name, start))

    list(pool.map(draw, range(0, flat.numel(), _FILL_CHUNK)))
    return out


def make_llama_checkpoint(
    out_dir: str | Path,
    *,
    hidden_size: int,
    num_layers: int,
    intermediate_size: int,
    vocab_size: int,
    num_heads: int,
    num_kv_heads: int,
    dtype: str = "bfloat16",
    max_shard_size: str | int = "5GB",
    seed: int = 0,
    tokenizer: bool = True,
    tie_word_embeddings: bool = False,
    sparse: bool = False,
) -> Path:
    """Write a Llama-shaped random checkpoint of any size with peak memory of about one shard.

    ``sparse=True`` writes real headers over holes instead of values (files of full size that use
    no disk): for planning a 70B build, where only names, shapes and offsets matter.

    For benchmarks at 1B-70B scale, where building the model would need its whole size in RAM.
    Names, shapes, tied-weight removal and the shard plan come from transformers' own code run on
    a meta-device model (``huggingface_hub.split_torch_state_dict_into_shards``, as
    ``save_pretrained`` does), so the layout is what ``save_pretrained`` would write; only the
    values differ, filled shard by shard.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    torch_dtype = _torch_dtype(dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
    )
    config.dtype = torch_dtype
    config.architectures = ["LlamaForCausalLM"]  # as save_pretrained records it
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch_dtype)
    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    state = revert_weight_conversion(model, state)
    split = split_torch_state_dict_into_shards(
        state, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        for filename, names in split.filename_to_tensors.items():
            if sparse:
                _write_sparse_shard(out / filename, {name: state[name] for name in names})
                continue
            shard = {name: _fill(name, state[name].shape, torch_dtype, seed, pool) for name in names}
            save_file(shard, out / filename, metadata={"format": "pt"})
            del shard
    if split.is_sharded:
        index = {
            "metadata": {"total_parameters": model.num_parameters(), **split.metadata},
            "weight_map": split.tensor_to_filename,
        }
        (out / "model.safetensors.index.json").write_text(
            json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    if tokenizer:
        make_tokenizer(out, min(vocab_size, 512))
    return out


def _write_sparse_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file with the header save_file would write and a hole for the data."""
    from loadgraph.formats.safetensors import PlannedTensor, encode_header, safetensors_order, st_dtype

    planned = safetensors_order(PlannedTensor(n, st_dtype(t), tuple(t.shape)) for n, t in tensors.items())
    header = encode_header(planned, {"format": "pt"})
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + sum(p.nbytes for p in planned))


# --------------------------------------------------------------------------------------------
# LoRA adapters through the real PEFT


def _randomise_trainable(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter the adapter will save seeded random values, so that merging matters.

    PEFT initialises ``lora_B`` (and ``lora_embedding_A``) to zeros, which makes a fresh adapter a
    no-op and a merge test vacuous. LoRA factors get N(0, 0.02); parameters that start from base
    values (DoRA magnitudes, trained biases, ``modules_to_save`` copies) are perturbed instead, so
    they stay plausible.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=_generator(seed, name), dtype=torch.float32)
            if "lora_magnitude_vector" in name:
                new = param.float() * (1.0 + 0.1 * noise)
            elif ".lora_" in name:
                new = 0.02 * noise
            else:
                new = param.float() + 0.02 * noise
            param.copy_(new.to(param.dtype))


def make_lora_adapter(
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    r: int = 8,
    lora_alpha: int = 16,
    target_modules: str | list[str] = "all-linear",
    seed: int = 0,
    use_rslora: bool = False,
    use_dora: bool = False,
    fan_in_fan_out: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, int] | None = None,
    modules_to_save: list[str] | None = None,
    bias: str = "none",
    dtype: str = "float32",
    kind: str | None = None,
) -> Path:
    """Make a random LoRA adapter for the checkpoint in ``base_dir`` with PEFT itself.

    Using ``get_peft_model`` + ``save_pretrained`` means key names, ``adapter_config.json`` and
    DoRA/rsLoRA/pattern handling are exactly PEFT's. ``dtype`` is the dtype the base is loaded in
    and the adapter weights are kept and saved in. ``kind`` picks the Auto class; by default the
    base's ``config.json`` decides. ``target_modules`` may name ``embed_tokens`` (embedding LoRA).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig

    base = Path(base_dir)
    out = Path(out_dir)
    model_type = kind if kind is not None else AutoConfig.from_pretrained(base).model_type
    model = _auto_model_class(model_type).from_pretrained(base, dtype=_torch_dtype(dtype))
    lora_config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=target_modules,
        use_rslora=use_rslora,
        use_dora=use_dora,
        fan_in_fan_out=fan_in_fan_out,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        bias=bias,
        lora_dropout=0.0,
    )
    with _seeded(seed):  # PEFT's own init draws from the global RNG
        peft_model = get_peft_model(model, lora_config, autocast_adapter_dtype=False)
    _randomise_trainable(peft_model, seed)
    saved_config = peft_model.peft_config["default"]
    for field in dataclasses.fields(saved_config):
        # "all-linear" expands to sets (target_modules, and target_parameters for fused MoE experts),
        # which PEFT writes in hash order, different in every process: sort them.
        value = getattr(saved_config, field.name)
        if isinstance(value, set):
            setattr(saved_config, field.name, sorted(value))
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out)
    return out
