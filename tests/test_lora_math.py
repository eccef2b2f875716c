"""The streaming LoRA merge is bit-identical to PEFT's merge_and_unload + save_pretrained.

Every case builds a tiny sharded base model and real PEFT adapters in tmp_path (adapter weights
randomised with a seeded generator, since PEFT initialises lora_B to zero), computes the reference
with PEFT itself, streams the base shards through plan_merge/merge_shard, and compares every tensor
with torch.equal.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from loadgraph.formats.lora import AdapterError, LoraAdapter  # noqa: E402
from loadgraph.formats.lora_plan import plan_merge  # noqa: E402
from loadgraph.formats.lora_merge import merge_shard  # noqa: E402
from loadgraph.formats.names import inspect_checkpoint_names  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(autouse=True)
def small_row_blocks(monkeypatch):
    """Linear merges of these tiny models (32-128 rows) go through the blocked arithmetic in blocks of
    16 rows, so every case below compares that path with PEFT; the rest of the suite, at the default
    block size, compares the whole-matrix path."""
    monkeypatch.setattr("loadgraph.formats.lora_merge.ROW_BLOCK", 16)


def test_blocked_merge_equals_whole_matrix_merge():
    """At the default block size, on a weight whose row count is no multiple of it (blocks of 275-276
    rows), in each float dtype: bit for bit the whole-matrix arithmetic."""
    from loadgraph.formats import lora_merge
    from loadgraph.formats.lora import LoraTarget
    from loadgraph.formats.names import KIND_LINEAR

    gen = torch.Generator().manual_seed(3)
    target = LoraTarget(module="m", lora_A="a", lora_B="b", kind=KIND_LINEAR, r=16, alpha=32, use_rslora=False, use_dora=False,
                        fan_in_fan_out=False)
    for dtype in DTYPES.values():
        weight = (torch.randn(1103, 320, generator=gen) * 0.02).to(dtype)
        tensors = {"a": torch.randn(16, 320, generator=gen).to(dtype), "b": torch.randn(1103, 16, generator=gen).to(dtype)}
        lora_merge.ROW_BLOCK = 256
        blocked = lora_merge.merge_weight(weight, target, tensors)
        lora_merge.ROW_BLOCK = 10**9  # every row in one product: the whole-matrix path
        whole = lora_merge.merge_weight(weight, target, tensors)
        assert blocked.dtype == dtype and torch.equal(blocked.view(-1).view(torch.uint8), whole.view(-1).view(torch.uint8)), dtype
        # In place (the merge stage's reused read buffers): the weight's own storage holds the result.
        lora_merge.ROW_BLOCK = 256
        owned = weight.clone()
        in_place = lora_merge.merge_weight(owned, target, tensors, in_place=True)
        assert in_place.data_ptr() == owned.data_ptr() and torch.equal(in_place.view(-1).view(torch.uint8), whole.view(-1).view(torch.uint8)), dtype


# -- tiny models ----------------------------------------------------------------------------------


def _text_kwargs(**extra) -> dict:
    return dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        **extra,
    )


def _config(arch: str):
    t = transformers
    if arch == "llama":
        return t.LlamaForCausalLM, t.LlamaConfig(**_text_kwargs(attention_bias=True))
    if arch == "mistral":
        return t.MistralForCausalLM, t.MistralConfig(**_text_kwargs())
    if arch == "qwen2":
        return t.Qwen2ForCausalLM, t.Qwen2Config(**_text_kwargs())
    if arch == "gemma":  # ties lm_head to embed_tokens; lm_head is not saved
        return t.GemmaForCausalLM, t.GemmaConfig(**_text_kwargs(head_dim=16))
    if arch == "mixtral":  # experts fused in memory, per-expert w1/w2/w3 on disk
        return t.MixtralForCausalLM, t.MixtralConfig(**_text_kwargs(num_local_experts=4, num_experts_per_tok=2))
    if arch == "llava":
        vision = t.CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
        )
        return t.LlavaForConditionalGeneration, t.LlavaConfig(
            vision_config=vision, text_config=t.LlamaConfig(**_text_kwargs()), image_token_index=255
        )
    if arch == "gpt2":  # Conv1D layers: PEFT merges them with fan_in_fan_out
        return t.GPT2LMHeadModel, t.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64)
    raise ValueError(arch)


def make_base(root: Path, arch: str, dtype: torch.dtype, name: str = "base") -> tuple[Path, type]:
    """A sharded checkpoint whose tensors are stored in `dtype`."""
    cls, config = _config(arch)
    torch.manual_seed(0)
    model = cls(config).to(dtype)
    path = root / f"{name}-{arch}"
    model.save_pretrained(path, max_shard_size="40KB")
    return path, cls


def load_base(cls: type, path: Path, dtype: torch.dtype):
    return cls.from_pretrained(path, dtype=dtype)


def randomise_adapter(model, seed: int) -> None:
    """Make every trainable tensor non-trivial, so a merge that skips or mis-scales it shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if "lora_magnitude_vector" in name:
                value = param.float() * (1.0 + 0.1 * noise)  # a magnitude stays positive
            elif "lora_" in name:
                value = 0.2 * noise
            else:  # modules_to_save copies, trainable biases
                value = param.float() + 0.05 * noise
            param.copy_(value.to(param.dtype))


def make_adapter(
    root: Path, cls: type, base: Path, dtype: torch.dtype, config: LoraConfig, seed: int, name: str = "adapter"
) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(load_base(cls, base, dtype), config)
        randomise_adapter(model, seed)
        path = root / name
        model.save_pretrained(path)
    return path


def peft_reference(root: Path, cls: type, base: Path, dtype: torch.dtype, adapters: list[Path]) -> dict:
    """Sequential PEFT merge: load adapter, merge_and_unload, next adapter on the result, save."""
    model = load_base(cls, base, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for adapter in adapters:
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    ref_dir = root / "reference"
    model.save_pretrained(ref_dir, max_shard_size="40KB")
    return _read_checkpoint(ref_dir)


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _base_headers(base: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    from safetensors import safe_open

    headers = {}
    for file in sorted(base.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                sl = handle.get_slice(key)
                headers[key] = (sl.get_dtype(), tuple(sl.get_shape()))
    return headers


def stream_merge(base: Path, adapters: list[Path]) -> tuple[dict[str, torch.Tensor], set[str]]:
    """What the engine does: plan once per adapter, then shard by shard, adapter after adapter.

    Also returns the on-disk names the plans touch, so the test can check each really changed.
    """
    names = inspect_checkpoint_names(base)
    headers = _base_headers(base)
    loaded = [LoraAdapter.load(a) for a in adapters]
    plans = [(plan_merge(a, names, headers), a.load_tensors()) for a in loaded]
    out: dict[str, torch.Tensor] = {}
    shards = sorted(base.glob("*.safetensors"))
    assert len(shards) > 1 or len(headers) < 4, "the base should be sharded"
    for shard in shards:
        tensors = load_file(shard)
        for plan, adapter_tensors in plans:
            tensors = merge_shard(plan, tensors, adapter_tensors)
        out.update(tensors)
    return out, set().union(*(plan.touched() for plan, _ in plans))


def assert_bit_identical(
    ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], base: Path, touched: set[str]
) -> None:
    assert set(ours) == set(ref)
    base_tensors = _read_checkpoint(base)
    for name, tensor in ref.items():
        assert ours[name].dtype == tensor.dtype, name
        assert ours[name].shape == tensor.shape, name
        assert torch.equal(ours[name], tensor), f"{name}: max abs diff {(ours[name].float() - tensor.float()).abs().max()}"
    # Every tensor the plans touch must really change, or the comparison proves nothing for it.
    changed = {name for name, tensor in ref.items() if not torch.equal(base_tensors[name], tensor)}
    assert touched and changed == touched


def check_against_peft(
    tmp_path: Path, arch: str, dtype_name: str, configs: list[LoraConfig], post: Callable[[Path], None] | None = None
) -> None:
    dtype = DTYPES[dtype_name]
    base, cls = make_base(tmp_path, arch, dtype)
    adapters = [
        make_adapter(tmp_path, cls, base, dtype, cfg, seed=100 + i, name=f"adapter{i}") for i, cfg in enumerate(configs)
    ]
    if post is not None:
        for adapter in adapters:
            post(adapter)
    ref = peft_reference(tmp_path, cls, base, dtype, adapters)
    ours, touched = stream_merge(base, adapters)
    assert_bit_identical(ours, ref, base, touched)


# -- bit-identity --------------------------------------------------------------------------------

ARCH_TARGETS = {
    "llama": ATTN + ["gate_proj", "up_proj", "down_proj"],
    "mistral": ATTN,
    "qwen2": ATTN,  # qwen2 has q/k/v biases
    "gemma": ATTN + ["down_proj"],
    "mixtral": ATTN,
    # language model attention (model.language_model.*) and the projector; the CLIP tower's
    # q/k/v_proj would match "q_proj" too, so the regex keeps to the language model
    "llava": r".*(language_model.*\.(q_proj|v_proj)|multi_modal_projector\.linear_[12])",
}


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("arch", list(ARCH_TARGETS))
def test_plain_lora_per_architecture(tmp_path: Path, arch: str, dtype_name: str) -> None:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=ARCH_TARGETS[arch])
    check_against_peft(tmp_path, arch, dtype_name, [config])


def test_llava_vision_tower_and_projector(tmp_path: Path) -> None:
    config = LoraConfig(
        r=4, lora_alpha=16, target_modules=r".*(vision_tower.*\.(q_proj|out_proj|fc1)|multi_modal_projector\.linear_1)"
    )
    check_against_peft(tmp_path, "llava", "bfloat16", [config])


VARIANTS: dict[str, list[LoraConfig]] = {
    "rslora": [LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=ATTN)],
    "dora": [LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=ATTN + ["down_proj"])],
    "rank_alpha_pattern": [
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=ATTN + ["up_proj"],
            rank_pattern={"q_proj": 2, r"layers\.1\.self_attn\.v_proj": 6},
            alpha_pattern={"o_proj": 3, "model.layers.0.mlp.up_proj": 32},
        )
    ],
    "embedding": [LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])],
    "embedding_dora": [LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["embed_tokens", "v_proj"])],
    "modules_to_save": [LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])],
    "lora_bias": [LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True)],
    "bias_lora_only": [LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias="lora_only")],
    "bias_all": [LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], bias="all")],
    "stacked": [
        LoraConfig(r=4, lora_alpha=8, target_modules=ATTN),
        LoraConfig(r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "down_proj"]),
    ],
    "stacked_dora": [
        LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"]),
        LoraConfig(r=2, lora_alpha=2, use_dora=True, target_modules=["q_proj", "o_proj"]),
    ],
    "all_linear": [LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")],
    "layers_to_transform": [LoraConfig(r=4, lora_alpha=8, target_modules=ATTN, layers_to_transform=[1])],
}


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_on_llama(tmp_path: Path, variant: str, dtype_name: str) -> None:
    check_against_peft(tmp_path, "llama", dtype_name, VARIANTS[variant])


def _adapter_file_to(dtype: torch.dtype) -> Callable[[Path], None]:
    def convert(adapter: Path) -> None:
        file = adapter / "adapter_model.safetensors"
        save_file({k: v.to(dtype) for k, v in load_file(file).items()}, file)

    return convert


@pytest.mark.parametrize("file_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_low_precision_adapter_file(tmp_path: Path, dtype_name: str, file_dtype: torch.dtype) -> None:
    config = LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=ATTN + ["embed_tokens"])
    check_against_peft(tmp_path, "llama", dtype_name, [config], post=_adapter_file_to(file_dtype))


def _set_config(**fields) -> Callable[[Path], None]:
    def edit(adapter: Path) -> None:
        file = adapter / "adapter_config.json"
        file.write_text(json.dumps({**json.loads(file.read_text()), **fields}))

    return edit


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("dora", [False, True])
def test_fan_in_fan_out_gpt2_conv1d(tmp_path: Path, dora: bool, dtype_name: str) -> None:
    config = LoraConfig(
        r=4, lora_alpha=8, use_dora=dora, fan_in_fan_out=True, target_modules=["c_attn", "c_proj", "c_fc"]
    )
    check_against_peft(tmp_path, "gpt2", dtype_name, [config])


@pytest.mark.parametrize(("arch", "fan_in_fan_out"), [("gpt2", False), ("llama", True)])
def test_fan_in_fan_out_follows_layer_type_not_config(tmp_path: Path, arch: str, fan_in_fan_out: bool) -> None:
    # PEFT's dispatch forces fan_in_fan_out=True on Conv1D and False on nn.Linear, whatever
    # adapter_config.json says (it only warns).
    targets = ["c_attn", "c_proj"] if arch == "gpt2" else ATTN
    config = LoraConfig(r=4, lora_alpha=8, fan_in_fan_out=not fan_in_fan_out, target_modules=targets)
    check_against_peft(tmp_path, arch, "bfloat16", [config], post=_set_config(fan_in_fan_out=fan_in_fan_out))


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
        LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"]),
        LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head"]),
        LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], ensure_weight_tying=True),
        LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"], ensure_weight_tying=True),
    ],
    ids=["embed", "lm_head", "embed+lm_head", "embed-ensure_tying", "modules_to_save-ensure_tying"],
)
def test_gemma_tied_embedding_lora(tmp_path: Path, dtype_name: str, config: LoraConfig) -> None:
    # Gemma ties lm_head to embed_tokens and saves only embed_tokens: a LoRA on either (or both,
    # applied in module order) changes the one stored tensor, as PEFT's in-place merge does.
    check_against_peft(tmp_path, "gemma", dtype_name, [config])


def _to_legacy_llava_names(adapter: Path) -> None:
    """Rename adapter keys the way a transformers 4 LLaVA adapter names them."""
    file = adapter / "adapter_model.safetensors"
    legacy = {
        k.replace("base_model.model.model.language_model.", "base_model.model.language_model.model.").replace(
            "base_model.model.model.multi_modal_projector.", "base_model.model.multi_modal_projector."
        ): v
        for k, v in load_file(file).items()
    }
    save_file(legacy, file)


def test_llava_adapter_with_legacy_names(tmp_path: Path) -> None:
    """A transformers 4 LLaVA adapter (on-disk names) merges exactly like the transformers 5 one.

    PEFT 0.21 renames the legacy language-model keys on load but silently drops legacy projector
    keys (their lora_B stays zero); we resolve both through the checkpoint's own name map, so the
    language model is bit-identical to PEFT and the projector gets the merge the adapter asks for.
    """
    dtype = torch.bfloat16
    base, cls = make_base(tmp_path, "llava", dtype)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=ARCH_TARGETS["llava"])
    modern = make_adapter(tmp_path, cls, base, dtype, config, seed=5, name="modern")
    legacy = tmp_path / "legacy"
    shutil.copytree(modern, legacy)
    _to_legacy_llava_names(legacy)
    assert LoraAdapter.load(legacy).targets().keys() != LoraAdapter.load(modern).targets().keys()
    ours_legacy, touched = stream_merge(base, [legacy])
    ours_modern, _ = stream_merge(base, [modern])
    assert touched and all(torch.equal(ours_legacy[k], ours_modern[k]) for k in ours_modern)
    ref = peft_reference(tmp_path, cls, base, dtype, [legacy])
    for name in ref:
        if not name.startswith("multi_modal_projector."):
            assert torch.equal(ours_legacy[name], ref[name]), name


# -- names ---------------------------------------------------------------------------------------


def test_names_use_transformers_conversion(tmp_path: Path) -> None:
    llava, _ = make_base(tmp_path, "llava", torch.float32)
    names = inspect_checkpoint_names(llava)
    assert names.to_model["language_model.model.layers.0.self_attn.q_proj.weight"] == (
        "model.language_model.layers.0.self_attn.q_proj.weight"
    )
    assert names.to_model["multi_modal_projector.linear_1.weight"] == "model.multi_modal_projector.linear_1.weight"
    assert names.to_model["vision_tower.encoder.layers.0.mlp.fc1.weight"] == (
        "model.vision_tower.encoder.layers.0.mlp.fc1.weight"
    )
    mixtral, _ = make_base(tmp_path, "mixtral", torch.float32)
    names = inspect_checkpoint_names(mixtral)
    w1 = "model.layers.0.block_sparse_moe.experts.1.w1.weight"
    assert names.to_model[w1] == "model.layers.0.mlp.experts.gate_up_proj" and w1 in names.converted
    assert names.to_model["model.layers.0.self_attn.q_proj.weight"] == "model.layers.0.self_attn.q_proj.weight"
    gemma, _ = make_base(tmp_path, "gemma", torch.float32)
    assert inspect_checkpoint_names(gemma).tied == {"lm_head.weight": "model.embed_tokens.weight"}


# -- preflight errors ----------------------------------------------------------------------------


def _plan(adapter: Path, base: Path):
    return plan_merge(LoraAdapter.load(adapter), inspect_checkpoint_names(base), _base_headers(base))


def test_error_adapter_for_another_hidden_size(tmp_path: Path) -> None:
    base, _ = make_base(tmp_path, "llama", torch.float32)
    other_cls, other_cfg = _config("llama")
    other_cfg.hidden_size, other_cfg.intermediate_size = 32, 64
    torch.manual_seed(0)
    other = other_cls(other_cfg)
    other.save_pretrained(tmp_path / "other")
    adapter = make_adapter(tmp_path, other_cls, tmp_path / "other", torch.float32, LoraConfig(target_modules=ATTN), 1)
    with pytest.raises(AdapterError) as err:
        _plan(adapter, base)
    message = str(err.value)
    assert "adapter_model.safetensors" in message and "lora_A.weight" in message and "\n" not in message
    assert "[8, 32]" in message and "[64, 64]" in message


def test_error_wrong_rank_in_config(tmp_path: Path) -> None:
    base, cls = make_base(tmp_path, "llama", torch.float32)
    adapter = make_adapter(tmp_path, cls, base, torch.float32, LoraConfig(r=4, target_modules=["q_proj"]), 1)
    config_file = adapter / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["r"] = 8
    config_file.write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors: tensor .*q_proj\.lora_A\.weight: shape \[4, 64\]"):
        _plan(adapter, base)


def test_error_missing_target_module(tmp_path: Path) -> None:
    base, cls = make_base(tmp_path, "llama", torch.float32)
    adapter = make_adapter(tmp_path, cls, base, torch.float32, LoraConfig(target_modules=["q_proj"]), 1)
    file = adapter / "adapter_model.safetensors"
    tensors = {k.replace("self_attn.q_proj", "self_attn.qkv_proj"): v for k, v in load_file(file).items()}
    save_file(tensors, file)
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors: tensor .*qkv_proj\.lora_A\.weight: .*no tensor"):
        _plan(adapter, base)


def test_error_config_target_without_weights(tmp_path: Path) -> None:
    base, cls = make_base(tmp_path, "llama", torch.float32)
    adapter = make_adapter(tmp_path, cls, base, torch.float32, LoraConfig(target_modules=["q_proj", "v_proj"]), 1)
    file = adapter / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(file).items() if "layers.1.self_attn.v_proj" not in k}, file)
    with pytest.raises(AdapterError, match=r"layers\.1\.self_attn\.v_proj\.lora_A\.weight: missing"):
        _plan(adapter, base)


@pytest.mark.parametrize(
    ("module", "out_features"),
    [("model.layers.0.mlp.experts", 256), ("model.layers.0.block_sparse_moe.experts.1.w1", 128)],
    ids=["in-memory-name", "transformers4-name"],
)
def test_error_mixtral_fused_experts(tmp_path: Path, module: str, out_features: int) -> None:
    base, cls = make_base(tmp_path, "mixtral", torch.float32)
    adapter = make_adapter(tmp_path, cls, base, torch.float32, LoraConfig(target_modules=["q_proj"]), 1)
    file = adapter / "adapter_model.safetensors"
    tensors = load_file(file)
    tensors[f"base_model.model.{module}.lora_A.weight"] = torch.zeros(8, 64)
    tensors[f"base_model.model.{module}.lora_B.weight"] = torch.zeros(out_features, 8)
    save_file(tensors, file)
    with pytest.raises(AdapterError, match=rf"{re.escape(module)}\.lora_A\.weight: .*fused"):
        _plan(adapter, base)


def test_error_modules_to_save_on_tied_weight(tmp_path: Path) -> None:
    # PEFT replaces a tied lm_head by an untied copy: the result needs a tensor Gemma's
    # checkpoint does not store, so the streaming merge refuses instead of guessing.
    base, cls = make_base(tmp_path, "gemma", torch.float32)
    config = LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"])
    adapter = make_adapter(tmp_path, cls, base, torch.float32, config, 1)
    with pytest.raises(AdapterError, match=r"tensor base_model\.model\.lm_head\.weight: modules_to_save .* ties"):
        _plan(adapter, base)


def test_error_resized_vocab_modules_to_save(tmp_path: Path) -> None:
    base, cls = make_base(tmp_path, "llama", torch.float32)
    config = LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"])
    adapter = make_adapter(tmp_path, cls, base, torch.float32, config, 1)
    file = adapter / "adapter_model.safetensors"
    tensors = load_file(file)
    tensors["base_model.model.lm_head.weight"] = torch.zeros(260, 64)
    save_file(tensors, file)
    with pytest.raises(AdapterError, match=r"tensor base_model\.model\.lm_head\.weight: shape \[260, 64\].*\[256, 64\]"):
        _plan(adapter, base)


@pytest.mark.parametrize(
    "config",
    [
        peft.AdaLoraConfig(target_modules=["q_proj"], total_step=10, init_r=4, target_r=2),
        peft.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
        peft.VeraConfig(target_modules=["q_proj", "v_proj"], r=4),
        peft.LoHaConfig(target_modules=["q_proj"], r=4),
    ],
    ids=["adalora", "ia3", "vera", "loha"],
)
def test_error_unsupported_peft_type(tmp_path: Path, config) -> None:
    base, cls = make_base(tmp_path, "llama", torch.float32)
    adapter = make_adapter(tmp_path, cls, base, torch.float32, config, 1)
    with pytest.raises(AdapterError, match=r"adapter_config\.json: field peft_type: .* is not supported"):
        LoraAdapter.load(adapter)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"init_lora_weights": "pissa"}, r"field init_lora_weights='pissa' is not supported: PiSSA"),
        ({"layer_replication": [[0, 2], [1, 2]]}, r"field layer_replication=.* is not supported"),
        ({"target_parameters": ["mlp.experts.gate_up_proj"]}, r"field target_parameters=.* is not supported"),
        ({"layers_pattern": "layers"}, r"PEFT refuses this config: .*layers_to_transform"),
    ],
    ids=["pissa", "layer_replication", "target_parameters", "peft_validation"],
)
def test_error_unsupported_lora_options(tmp_path: Path, fields: dict, message: str) -> None:
    base, cls = make_base(tmp_path, "llama", torch.float32)
    adapter = make_adapter(tmp_path, cls, base, torch.float32, LoraConfig(target_modules=["q_proj"]), 1)
    _set_config(**fields)(adapter)
    with pytest.raises(AdapterError, match=r"adapter_config\.json: " + message):
        LoraAdapter.load(adapter)


def test_error_pickle_refused_unless_allowed(tmp_path: Path) -> None:
    base, cls = make_base(tmp_path, "llama", torch.float32)
    adapter = make_adapter(tmp_path, cls, base, torch.float32, LoraConfig(target_modules=["q_proj"]), 1)
    tensors = load_file(adapter / "adapter_model.safetensors")
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(tensors, adapter / "adapter_model.bin")
    with pytest.raises(AdapterError, match=r"adapter_model\.bin: pickled adapter weights are refused"):
        LoraAdapter.load(adapter)
    loaded = LoraAdapter.load(adapter, allow_pickle=True)
    assert set(loaded.targets()) == {f"model.layers.{i}.self_attn.q_proj" for i in range(2)}


def test_targets_scale_and_patterns(tmp_path: Path) -> None:
    base, cls = make_base(tmp_path, "llama", torch.float32)
    config = VARIANTS["rank_alpha_pattern"][0]
    adapter = LoraAdapter.load(make_adapter(tmp_path, cls, base, torch.float32, config, 1))
    targets = adapter.targets()
    assert targets["model.layers.0.self_attn.q_proj"].r == 2
    assert targets["model.layers.1.self_attn.v_proj"].r == 6
    assert targets["model.layers.0.self_attn.v_proj"].r == 4
    assert targets["model.layers.0.self_attn.o_proj"].scale == 3 / 4
    assert targets["model.layers.0.mlp.up_proj"].scale == 32 / 4
    assert targets["model.layers.1.mlp.up_proj"].scale == 8 / 4
