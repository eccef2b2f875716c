"""Original-format LLaVA checkpoints -> transformers' Llava artifact (the convert stage).

The tests write tiny checkpoints in LLaVA's own layout (language model under `model.*`, the
projector under `model.mm_projector.*`, the vision tower named by `mm_vision_tower` and saved as
its own CLIP checkpoint), build them through the real CLI, and check the artifact against the
source tensors and against LLaVA's forward pass assembled by hand from the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loadgraph.testing import build_tiny_model, make_tokenizer, tiny_config
from conftest import run_cli, write_spec

VOCAB = 512  # = len(tokenizer): adding <image> makes the conversion resize to 576 rows
VISION_HIDDEN = 32


def make_tower(out: Path) -> Path:
    from transformers import CLIPImageProcessor, CLIPVisionModel

    torch.manual_seed(7)
    tower = CLIPVisionModel(tiny_config("llava").vision_config).eval()
    tower.save_pretrained(out)
    side = tower.config.image_size
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(out)
    return out


def projector_state(kind: str, hidden: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if kind == "linear":
        return {"model.mm_projector.weight": torch.randn(hidden, VISION_HIDDEN, generator=g) * 0.1, "model.mm_projector.bias": torch.randn(hidden, generator=g) * 0.1}
    return {
        "model.mm_projector.0.weight": torch.randn(hidden, VISION_HIDDEN, generator=g) * 0.1,
        "model.mm_projector.0.bias": torch.randn(hidden, generator=g) * 0.1,
        "model.mm_projector.2.weight": torch.randn(hidden, hidden, generator=g) * 0.1,
        "model.mm_projector.2.bias": torch.randn(hidden, generator=g) * 0.1,
    }


def llava_config(lm_kind: str, projector: str, tower: Path | None) -> dict:
    config = json.loads(tiny_config(lm_kind, vocab_size=VOCAB).to_json_string())
    config.update(
        architectures=["LlavaMistralForCausalLM" if lm_kind == "mistral" else "LlavaLlamaForCausalLM"],
        model_type="llava_mistral" if lm_kind == "mistral" else "llava",  # v1.5 checkpoints say plain "llava"
        mm_hidden_size=VISION_HIDDEN,
        mm_projector_type=projector,
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        image_aspect_ratio="pad",
        tune_mm_mlp_adapter=False,
        tokenizer_model_max_length=2048,
    )
    if tower is not None:
        config["mm_vision_tower"] = str(tower)
    return config


def make_original_llava(out: Path, lm_kind: str, projector: str, tower: Path | None, *, projector_only: bool = False, pickle: bool = False) -> dict:
    """A LLaVA-format checkpoint; returns its source tensors ({name: tensor}) for the checks."""
    out.mkdir(parents=True)
    lm = build_tiny_model(lm_kind, seed=3)
    assert lm.config.vocab_size == VOCAB
    hidden = lm.config.hidden_size
    lm_state = {k: v.contiguous() for k, v in lm.state_dict().items()}
    proj = projector_state(projector, hidden, seed=11)
    (out / "config.json").write_text(json.dumps(llava_config(lm_kind, projector, tower), indent=2))
    if projector_only:  # LLaVA's pretraining stage: the projector alone, beside config.json
        if pickle:
            torch.save(proj, out / "mm_projector.bin")
        else:
            save_file(proj, str(out / "mm_projector.safetensors"))
        base = out.parent / f"{out.name}-base"
        lm.save_pretrained(base)
        make_tokenizer(base, VOCAB)
        return {"lm": lm_state, "projector": proj, "base": base}
    make_tokenizer(out, VOCAB)
    state = {**lm_state, **proj}
    if pickle:
        torch.save(state, out / "pytorch_model.bin")
    else:  # two shards with an index, as LLaVA's checkpoints are sharded
        names = sorted(state)
        halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2], "model-00002-of-00002.safetensors": names[len(names) // 2:]}
        for fname, keys in halves.items():
            save_file({k: state[k] for k in keys}, str(out / fname), metadata={"format": "pt"})
        index = {"metadata": {}, "weight_map": {k: f for f, keys in halves.items() for k in keys}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return {"lm": lm_state, "projector": proj}


@pytest.fixture(scope="module")
def tower(tmp_path_factory) -> Path:
    return make_tower(tmp_path_factory.mktemp("tower") / "clip-tiny")


CASES = {
    # name: (language model, projector, projector_only, pickled)
    "llama-linear": ("llama", "linear", False, False),
    "mistral-mlp": ("mistral", "mlp2x_gelu", False, True),
    "projonly-mlp": ("llama", "mlp2x_gelu", True, False),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tower):
    """All cases built by one `loadgraph build` of a batch spec (one process: fast)."""
    root = tmp_path_factory.mktemp("llava")
    sources, targets = {}, []
    for name, (lm_kind, projector, projector_only, pickle) in CASES.items():
        sources[name] = make_original_llava(root / name, lm_kind, projector, tower, projector_only=projector_only, pickle=pickle)
        target = {"name": name, "source": {"model": str(root / name), "allow_pickle": pickle}, "verify": True}
        if projector_only:
            target["convert"] = {"model_base": str(sources[name]["base"])}
        targets.append(target)
    spec = write_spec(root / "spec.yaml", {"targets": targets})
    cache = root / "cache"
    report = root / "report.json"
    proc = run_cli("build", spec, "--executor", "local", "--cache", cache, "--json", report)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    doc = json.loads(report.read_text())
    paths = {t["name"]: Path(t["path"]) for t in doc["targets"]}
    return {"paths": paths, "sources": sources, "report": doc, "cache": cache, "root": root}


def expected_name(name: str) -> str:
    if name.startswith("model.mm_projector."):
        rest = name[len("model.mm_projector."):]
        if rest.count(".") == 0:
            return f"multi_modal_projector.linear_1.{rest}"
        idx, leaf = rest.split(".")
        return f"multi_modal_projector.{ {'0': 'linear_1', '2': 'linear_2'}[idx] }.{leaf}"
    return "language_model." + name


def artifact_state(path: Path) -> dict[str, torch.Tensor]:
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


@pytest.mark.parametrize("case", list(CASES))
def test_every_source_tensor_lands_bit_identical(case, converted, tower):
    path, src = converted["paths"][case], converted["sources"][case]
    out = artifact_state(path)
    tower_state = load_file(str(tower / "model.safetensors"))
    placed = set()
    for name, tensor in {**src["lm"], **src["projector"]}.items():
        new = expected_name(name)
        got = out[new]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert got.shape[0] == 576 and torch.equal(got[:VOCAB], tensor), name  # rows added for <image>, padded to 64
            assert torch.isfinite(got[VOCAB:]).all()
        else:
            assert torch.equal(got, tensor), name
        placed.add(new)
    for name, tensor in tower_state.items():
        assert torch.equal(out["vision_tower." + name], tensor), name
        placed.add("vision_tower." + name)
    extra = set(out) - placed
    if CASES[case][1] == "linear":  # Linear-act-Linear in transformers: identity second layer, act "linear"
        assert extra == {"multi_modal_projector.linear_2.weight", "multi_modal_projector.linear_2.bias"}
        assert torch.equal(out["multi_modal_projector.linear_2.weight"], torch.eye(64))
        assert not out["multi_modal_projector.linear_2.bias"].any()
    else:
        assert not extra


def test_config_tokenizer_and_processor(converted):
    from transformers import AutoProcessor

    path = converted["paths"]["mistral-mlp"]
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["text_config"]["model_type"] == "mistral" and config["text_config"]["vocab_size"] == 576
    assert config["vision_feature_layer"] == -2 and config["vision_feature_select_strategy"] == "default"
    assert config["image_seq_length"] == 16 and config["image_token_index"] == VOCAB
    assert config["projector_hidden_act"] == "gelu"
    assert json.loads((converted["paths"]["llama-linear"] / "config.json").read_text())["projector_hidden_act"] == "linear"
    processor = AutoProcessor.from_pretrained(str(path))
    assert type(processor).__name__ == "LlavaProcessor" and processor.image_processor.do_pad  # image_aspect_ratio: pad
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == VOCAB
    # The convert node is keyed, and a rebuild of the same spec does no work.
    stages = {n["stage"] for n in converted["report"]["nodes"]}
    assert "convert" in stages and "verify" in stages


def _image():
    from PIL import Image

    g = torch.Generator().manual_seed(5)
    pixels = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def reference_logits(src: dict, case: str, tower_dir: Path, input_ids, pixel_values, image_token: int):
    """LLaVA's forward, assembled by hand: CLIP hidden_states[-2] minus CLS -> mm_projector -> spliced into the LM's embeddings."""
    import transformers as tf

    lm_kind, projector, _, _ = CASES[case]
    lm = tf.AutoModelForCausalLM.from_config(tiny_config(lm_kind, vocab_size=VOCAB))
    lm.load_state_dict(src["lm"])
    tower = tf.CLIPVisionModel.from_pretrained(str(tower_dir)).eval()
    p = src["projector"]
    if projector == "linear":
        mm = torch.nn.Linear(VISION_HIDDEN, 64)
        mm.load_state_dict({"weight": p["model.mm_projector.weight"], "bias": p["model.mm_projector.bias"]})
    else:
        mm = torch.nn.Sequential(torch.nn.Linear(VISION_HIDDEN, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
        mm.load_state_dict({k[len("model.mm_projector."):]: v for k, v in p.items()})
    with torch.no_grad():
        feats = tower(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        feats = mm(feats)
        embeds = lm.get_input_embeddings()(input_ids.clamp(max=VOCAB - 1))
        mask = input_ids[0] == image_token
        embeds[0, mask] = feats[0]
        return lm.eval()(inputs_embeds=embeds).logits


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_llava_by_hand(case, converted, tower):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = converted["paths"][case]
    model, info = AutoModelForImageTextToText.from_pretrained(str(path), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    processor = AutoProcessor.from_pretrained(str(path))
    inputs = processor(images=_image(), text="The model <image> reads the shards today.", return_tensors="pt")
    image_token = model.config.image_token_id
    assert (inputs["input_ids"] == image_token).sum() == 16
    with torch.no_grad():
        got = model.eval()(**inputs).logits
    want = reference_logits(converted["sources"][case], case, tower, inputs["input_ids"], inputs["pixel_values"], image_token)
    torch.testing.assert_close(got[..., :VOCAB], want, rtol=1e-5, atol=1e-5)


def test_missing_vision_tower_is_an_error_naming_mm_vision_tower(tmp_path, cache_dir):
    src = tmp_path / "llava-no-tower"
    make_original_llava(src, "llama", "linear", tower=None)
    spec = write_spec(tmp_path / "spec.yaml", {"source": {"model": str(src)}})
    proc = run_cli("build", spec, "--executor", "local", "--cache", cache_dir)
    assert proc.returncode == 2 and "mm_vision_tower" in proc.stderr, proc.stderr
    # Named but absent: still exit 2, naming the field and the path.
    config = json.loads((src / "config.json").read_text())
    config["mm_vision_tower"] = str(tmp_path / "nowhere" / "clip")
    (src / "config.json").write_text(json.dumps(config))
    proc = run_cli("plan", spec, "--cache", cache_dir)
    assert proc.returncode == 2 and "mm_vision_tower" in proc.stderr and "nowhere" in proc.stderr, proc.stderr


def test_projector_only_without_base_and_pickle_rules(tmp_path, tower, cache_dir):
    from loadgraph.errors import InputError
    from loadgraph.pipeline.cache import Cache
    from loadgraph.pipeline.graph import compile_specs
    from loadgraph.spec import parse_spec

    src = tmp_path / "pretrain"
    make_original_llava(src, "llama", "mlp2x_gelu", tower, projector_only=True, pickle=True)
    cache = Cache(cache_dir)
    # LLaVA's own mm_projector.bin needs no allow_pickle (torch.load(weights_only=True), one notice)
    with pytest.warns(UserWarning, match="mm_projector.bin"):
        compile_specs(parse_spec({"source": {"model": str(src)}, "convert": {"model_base": str(src.parent / "pretrain-base")}}, "t"), cache)
    with pytest.raises(InputError, match="convert.model_base"):
        compile_specs(parse_spec({"source": {"model": str(src), "allow_pickle": True}}, "t"), cache)
    graph = compile_specs(parse_spec({"source": {"model": str(src), "allow_pickle": True}, "convert": {"model_base": str(src.parent / "pretrain-base")}}, "t"), cache)
    assert [n.stage for n in graph.nodes.values()].count("convert") == 1


def test_load_pretrained_model_accepts_original_llava(converted, tmp_path):
    """LLaVA's loader arguments: a full original checkpoint, and projector-only + model_base."""
    from loadgraph.loading import load_pretrained_model

    root, cache = converted["root"], tmp_path / "cache"  # a fresh cache: the same bytes must come out
    tokenizer, model, image_processor, context_len = load_pretrained_model(
        str(root / "llama-linear"), None, "llava-v1.5-tiny", device_map="cpu", torch_dtype="float32", cache=cache
    )
    # LLaVA's own layout (issue 16): LLaVA's class, vocabulary as trained, -200 as the image index
    assert type(model).__name__ == "LlavaLlamaForCausalLM" and image_processor is not None
    assert "<image>" not in tokenizer.get_vocab() and model.config.image_token_id == -200
    assert model.get_input_embeddings().weight.shape[0] == VOCAB
    assert "<im_patch>" not in tokenizer.get_vocab()  # mm_use_im_patch_token: false in the LLaVA config
    assert context_len == 256
    built = model.loadgraph_artifact
    assert built.key != converted["report"]["targets"][0]["key"]  # the hf layout is another artifact
    state = converted["sources"]["llama-linear"]
    assert torch.equal(model.model.multi_modal_projector.linear_1.weight, state["projector"]["model.mm_projector.weight"])

    _, model2, _, _ = load_pretrained_model(
        str(root / "projonly-mlp"), str(root / "projonly-mlp-base"), "llava-tiny-pretrain", device_map="cpu", torch_dtype="float32", cache=cache
    )
    proj = converted["sources"]["projonly-mlp"]["projector"]
    assert torch.equal(model2.model.multi_modal_projector.linear_2.weight, proj["model.mm_projector.2.weight"])
