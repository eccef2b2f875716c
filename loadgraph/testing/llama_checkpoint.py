"""Large Llama-shaped random checkpoints (1B-70B, for benchmarks) written shard by shard, without
materialising the model."""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from loadgraph.testing.determinism import _generator, _torch_dtype
from loadgraph.testing.tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID, make_tokenizer

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
