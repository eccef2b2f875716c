"""convert: an original-format LLaVA checkpoint -> transformers' LlavaForConditionalGeneration artifact.

Inputs: `model` (the inspected LLaVA checkpoint: language model + projector, or a projector-only
pretraining output), `vision` (the inspected vision tower named by `mm_vision_tower`, fetched as
its own source) and, for projector-only checkpoints, `base` (the inspected language model).
One unit per source shard: every tensor is copied byte for byte under its new name, except the
input embeddings and lm_head, which gain the rows of the added `<image>`/`<pad>` tokens drawn
as transformers' conversion script draws them (N(mean, 1e-5 * covariance) of the existing
embedding rows) from a generator seeded by the `seed` param, so the stage stays a pure function.
A `linear` projector becomes transformers' Linear-act-Linear projector exactly: act "linear"
and an identity second layer with zero bias.

`layout: llava` (what `load_pretrained_model` asks for) keeps LLaVA's own model instead: the
vocabulary as trained (no `<image>`/`<pad>` rows: LLaVA marks images with -200 in input_ids),
the projector at its own depth (linear, mlpNx_gelu), LLaVA's config keys, and the tower's
image processor as LLaVA's `process_images` expects it. Every tensor is then a byte copy.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from loadgraph.errors import InputError
from loadgraph.formats.checkpoint import TOKENIZER_FILES
from loadgraph.formats.llava_original import (
    COVARIANCE_SCALE,
    original_name,
    IMAGE_TOKEN,
    PAD_TOKEN,
    PROJECTOR_PREFIX,
    TOWER_PREFIX,
    legacy_name,
    parse_original,
    resized_vocab,
    text_config_dict,
    tower_keeps,
    tower_name,
    vision_config_dict,
)
from loadgraph.formats.safetensors import DTYPES, PlannedTensor, ShardWriter
from loadgraph.pipeline.cache import Artifact
from loadgraph.pipeline.stage import NodeContext, Stage, Unit
from loadgraph.formats.digest import tree_record
from loadgraph.formats.layout import SHARD_NAME
from loadgraph.stages.export import ST_METADATA, shard_table
from loadgraph.stages.placed import write_index
from loadgraph.stages.tensor_io import ArtifactReader

# config.json keys of LLaVA's that its scripts read from model.config (process_images, padding side, ...)
LLAVA_KEY_PREFIXES = ("mm_", "image_", "tokenizer_", "tune_mm", "freeze_mm", "unfreeze_mm")
IMAGE_TOKEN_INDEX = -200
_SET_KEYS = ("mm_use_im_start_end", "mm_use_im_patch_token", "image_aspect_ratio", "image_token_index", "image_seq_length")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "image_processor_config.json", "video_preprocessor_config.json")
EMBED = "model.embed_tokens.weight"  # original (and plain Llama/Mistral) names
NEWLINE = "model.image_newline"
LM_HEAD = "lm_head.weight"


def _config(art: Artifact) -> dict:
    return json.loads((art.path / "config.json").read_text())


def _tokenizer_source(ctx: NodeContext) -> Artifact:
    # LLaVA's builder reads the tokenizer of model_base when there is one; the hf layout kept the checkpoint's first.
    for name in ("base", "model") if ctx.params.get("layout") == "llava" else ("model", "base"):
        art = ctx.inputs.get(name)
        if art is not None and any(rel in TOKENIZER_FILES for rel in art.files):
            return art
    raise InputError(f"{ctx.input().manifest.get('source', {}).get('origin_path', 'source.model')}: no tokenizer files in the LLaVA checkpoint or its model_base")


def _layout(ctx: NodeContext) -> str:
    return ctx.params.get("layout", "hf")


def load_tokenizer(ctx: NodeContext):
    """The language model's tokenizer with the conversion script's tokens added (`<image>`, `<pad>` if none)."""
    from transformers import AddedToken, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(_tokenizer_source(ctx).path))
    if _layout(ctx) == "llava":
        return tok  # LLaVA's vocabulary as trained: its loader adds only the mm_use_* tokens
    tok.add_tokens(AddedToken(IMAGE_TOKEN, special=True, normalized=False), special_tokens=True)
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
    return tok


def converted_config(ctx: NodeContext, tokenizer):
    """The LlavaConfig: text config from LLaVA's config.json, vision config from the tower's."""
    from transformers import LlavaConfig

    original = _config(ctx.input())
    layout = _layout(ctx)
    info = parse_original(original, "config.json", layout)
    text = text_config_dict(original, info.text_type)
    vocab = int(text.get("vocab_size", 0))
    if layout == "hf":
        text["vocab_size"] = resized_vocab(vocab, len(tokenizer))
        text["pad_token_id"] = tokenizer.pad_token_id
    vision = vision_config_dict(_config(ctx.input("vision")), "mm_vision_tower")
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    dtype = original.get("dtype") or original.get("torch_dtype")
    extra = {k: v for k, v in original.items() if k.startswith(LLAVA_KEY_PREFIXES) and k not in _SET_KEYS} if layout == "llava" else {}
    cls, more = LlavaConfig, {}
    if layout == "llava" and info.next:
        # LLaVA-1.6 (spatial_unpad): LlavaNext holds its image_newline. The pinpoints stay LLaVA's
        # [width, height] list, which LLaVA's process_images reads from model.config.
        from transformers import LlavaNextConfig as cls

        more = {"image_grid_pinpoints": [list(p) for p in info.grid_pinpoints]}
        extra.pop("image_grid_pinpoints", None)
    config = cls(
        text_config=text,
        vision_config=vision,
        # LLaVA's IMAGE_TOKEN_INDEX: never embedded, the model splices image features there
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) if layout == "hf" else IMAGE_TOKEN_INDEX,
        image_seq_length=patches + (1 if info.select_strategy == "full" else 0),
        projector_hidden_act=info.projector_act,
        vision_feature_select_strategy=info.select_strategy,
        vision_feature_layer=info.select_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
        pad_token_id=tokenizer.pad_token_id,
        # LLaVA's loader adds its image tokens from these (load_pretrained_model keeps doing so).
        mm_use_im_start_end=info.use_im_start_end,
        mm_use_im_patch_token=info.use_im_patch_token,
        image_aspect_ratio=info.aspect_ratio,
        **more,
        **extra,
    )
    config.architectures = ["LlavaNextForConditionalGeneration" if cls is not LlavaConfig else "LlavaForConditionalGeneration"]
    if layout == "llava":
        config.mm_projector_type = original.get("mm_projector_type", "linear")
    if dtype:
        config.dtype = dtype
    return config, info, vocab


def _sources(ctx: NodeContext, projector_type: str) -> list[tuple[str, str, str]]:
    """(input name, source tensor, llava-hf name) for every tensor the converted model takes."""
    layout = _layout(ctx)
    model = ctx.input()
    named = {original_name(n): n for n in model.tensors}  # non_lora_trainables spell them base_model.model.model.*
    lm = ctx.inputs.get("base", model)
    out: list[tuple[str, str, str]] = []
    lm_input = "base" if "base" in ctx.inputs else "model"
    stored_tower = [n for n in named if n.startswith(TOWER_PREFIX)]
    for name in lm.tensors:
        if original_name(name).startswith((PROJECTOR_PREFIX, TOWER_PREFIX)):
            continue
        new = legacy_name(original_name(name), projector_type, layout)
        if new is not None:
            out.append((lm_input, name, new))
    # LLaVA-1.6 trains its image_newline with the projector (non_lora_trainables / mm_projector files)
    projector = [n for n in named if n.startswith(PROJECTOR_PREFIX) or (n == NEWLINE and layout == "llava" and "base" in ctx.inputs)]
    if not any(n.startswith(PROJECTOR_PREFIX) for n in projector):
        raise InputError(f"{model.manifest.get('source', {}).get('origin_path', 'source.model')}: no model.mm_projector.* tensors; not a LLaVA checkpoint")
    out += [("model", named[n], legacy_name(n, projector_type, layout)) for n in projector]
    if "base" in ctx.inputs and len(projector) + len(stored_tower) != len(model.tensors):
        extra = sorted(set(named) - set(projector) - set(stored_tower))[:3]
        raise InputError(f"convert.model_base: the LLaVA checkpoint holds language-model tensors too ({', '.join(extra)}...); drop model_base")
    out += [("model", named[n], legacy_name(n, projector_type, layout)) for n in stored_tower]
    if not stored_tower:  # a tower saved inside the checkpoint (unfrozen in training) wins over the named one
        out += [("vision", n, "vision_tower." + tower_name(n)) for n in ctx.input("vision").tensors if tower_keeps(n)]
    if layout == "llava":
        # transformers' legacy llava-hf renames are registered for LlavaForConditionalGeneration by
        # class name only: LLaVA's classes get the in-memory names directly.
        out = [(inp, src, _memory_name(new)) for inp, src, new in out]
    return out


_MEMORY_PREFIXES = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                    ("multi_modal_projector.", "model.multi_modal_projector."), ("vision_tower.", "model.vision_tower."))


def _memory_name(legacy: str) -> str:
    return next((new + legacy[len(old):] for old, new in _MEMORY_PREFIXES if legacy.startswith(old)), legacy)


def _disk_names(config, legacy: list[str], layout: str) -> tuple[dict[str, str], list[str]]:
    """llava-hf name -> the name transformers' save_pretrained writes, and in-memory params left uncovered.

    Both directions use transformers' own renames on the model built on the meta device (for the
    llava layout, the class load_pretrained_model loads it with: its projector has LLaVA's depth).
    """
    import torch
    from transformers import LlavaForConditionalGeneration
    from transformers.core_model_loading import revert_weight_conversion

    from loadgraph.formats.names import _rename_like_from_pretrained

    cls = LlavaForConditionalGeneration
    if layout == "llava":
        from loadgraph.loading.llava_api import llava_class  # the family does not change names

        cls = llava_class("llama", next=config.model_type == "llava_next")
    with torch.device("meta"):
        model = cls(config)
    to_model, converted, unexpected = _rename_like_from_pretrained(model, legacy)
    if unexpected:
        raise InputError(f"LLaVA checkpoint tensors with no place in LlavaForConditionalGeneration: {', '.join(sorted(unexpected)[:5])}")
    # Parameters transformers builds from several checkpoint tensors as it loads (Mixtral's fused
    # experts from per-expert w1/w2/w3): their tensors keep the checkpoint's names and are fused by
    # from_pretrained, so the stage stays a byte copy. Only the others are reverted to disk names.
    fused = {to_model[k] for k in converted}
    placeholders = {mem: torch.empty(0, device="meta") for mem in model.state_dict() if mem not in fused}
    owner = {id(t): mem for mem, t in placeholders.items()}
    reverted = revert_weight_conversion(model, placeholders)
    mem_to_disk = {owner[id(t)]: disk for disk, t in reverted.items()}
    covered = set(to_model.values())
    missing = [mem for mem in model.state_dict() if mem not in covered]
    return {old: old if mem in fused else mem_to_disk[mem] for old, mem in to_model.items()}, [mem_to_disk[m] for m in missing]


def _seed(seed: int, what: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{what}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


class ConvertStage(Stage):
    name = "convert"
    version = 1

    def units(self, ctx: NodeContext) -> list[Unit]:
        tokenizer = load_tokenizer(ctx)
        config, info, vocab = converted_config(ctx, tokenizer)
        rows = config.text_config.vocab_size
        sources = _sources(ctx, info.projector_type)
        to_disk, missing = _disk_names(config, [new for _, _, new in sources], _layout(ctx))
        embed_input = "base" if "base" in ctx.inputs else "model"
        embed = ctx.inputs[embed_input].tensors.get(EMBED)
        if embed is None or embed["shape"][0] != vocab:
            raise InputError(f"{EMBED}: expected {vocab} rows (config vocab_size) in the language model, found {embed and embed['shape']}")
        stats = {"input": embed_input, "name": EMBED}
        groups: dict[tuple[str, str], list[dict]] = {}
        projector_group = None
        for inp, name, new in sources:
            t = ctx.inputs[inp].tensors[name]
            entry = {"dst": to_disk[new], "input": inp, "src": name, "dtype": t["dtype"], "shape": list(t["shape"]), "op": "copy"}
            if name in (EMBED, LM_HEAD) and rows != vocab:
                entry.update(op="resize", shape=[rows, *t["shape"][1:]], stats=stats, seed=_seed(ctx.params["seed"], name))
            group = groups.setdefault((inp, t["file"]), [])
            group.append(entry)
            if new.endswith("multi_modal_projector.linear_1.weight"):
                projector_group, linear_1 = group, entry
        identity = info.projector_type == "linear" and _layout(ctx) == "hf"
        tied = bool(getattr(config, "tie_word_embeddings", False) or config.text_config.tie_word_embeddings)
        unplaced = [m for m in missing if not (identity and ".linear_2." in m) and not (tied and m.endswith("lm_head.weight"))]
        if unplaced:
            raise InputError(f"LLaVA conversion leaves LlavaForConditionalGeneration tensors without weights: {', '.join(unplaced[:5])}; is mm_vision_tower the right tower?")
        if identity:
            hidden = linear_1["shape"][0]
            for m in missing:
                shape = [hidden, hidden] if m.endswith("weight") else [hidden]
                projector_group.append({"dst": m, "op": "identity" if m.endswith("weight") else "zeros", "dtype": linear_1["dtype"], "shape": shape})
        n = len(groups)
        return [
            Unit(id=f"shard-{i:05d}", payload={"file": SHARD_NAME.format(i=i, n=n), "tensors": entries},
                 nbytes=sum(ctx.inputs[e["input"]].tensors[e["src"]]["end"] - ctx.inputs[e["input"]].tensors[e["src"]]["begin"] for e in entries if "src" in e))
            for i, entries in enumerate(groups.values(), start=1)
        ]

    def run_unit(self, ctx: NodeContext, unit: Unit, out: Path) -> dict:
        rel = unit.payload["file"]
        entries = {e["dst"]: e for e in unit.payload["tensors"]}
        writer = ShardWriter(out / rel, [PlannedTensor(e["dst"], e["dtype"], tuple(e["shape"])) for e in entries.values()], ST_METADATA, on_progress=ctx.progress)
        try:
            for planned in writer.order:
                e = entries[planned.name]
                if e["op"] == "copy":
                    art = ctx.inputs[e["input"]]
                    t = art.tensors[e["src"]]
                    got = writer.copy_from(planned.name, art.path / t["file"], t["begin"], t["end"] - t["begin"])
                    ArtifactReader(art, trusted=e["input"] in ctx.trusted).check_copied(e["src"], got)
                else:
                    writer.write_tensor(planned.name, self._compute(ctx, e))
            digest = writer.close()
        except BaseException:
            writer.abort()
            raise
        size = (out / rel).stat().st_size
        return {"files": {rel: tree_record(size, digest)}, "tensors": shard_table(out / rel, rel, writer.tensor_digests), "bytes": unit.nbytes}

    @staticmethod
    def _compute(ctx: NodeContext, e: dict):
        import torch

        dtype = getattr(torch, DTYPES[e["dtype"]][1])
        if e["op"] == "identity":
            return torch.eye(e["shape"][0], dtype=dtype)
        if e["op"] == "zeros":
            return torch.zeros(e["shape"], dtype=dtype)
        art = ctx.inputs[e["input"]]
        tensor = _read(art, e["src"])
        stats_art = ctx.inputs[e["stats"]["input"]]
        embed = tensor if (e["stats"]["input"], e["stats"]["name"]) == (e["input"], e["src"]) else _read(stats_art, e["stats"]["name"])
        new_rows = e["shape"][0] - tensor.shape[0]
        return torch.cat([tensor, sample_rows(embed, new_rows, e["seed"]).to(tensor.dtype)])

    def finalize(self, ctx: NodeContext, results: dict[str, dict], out: Path) -> dict:
        import shutil

        tokenizer = load_tokenizer(ctx)
        config, info, _ = converted_config(ctx, tokenizer)
        config.save_pretrained(out)
        lm = ctx.inputs.get("base", ctx.input())
        if "generation_config.json" in lm.files:
            shutil.copyfile(lm.path / "generation_config.json", out / "generation_config.json")
        if _layout(ctx) == "llava":
            # LLaVA's image processor is the tower's own (process_images pads/crops itself) and
            # its tokenizer is the language model's, unchanged.
            source = _tokenizer_source(ctx)
            for rel in sorted(source.files):
                if rel in TOKENIZER_FILES and rel not in PROCESSOR_FILES:
                    shutil.copyfile(source.path / rel, out / rel)
            tower_processor(ctx, config).save_pretrained(out)
        else:
            processor(ctx, tokenizer, config, info).save_pretrained(out)
        write_index(out, results)
        return {"converted_from": {"format": "llava-original", "projector": info.projector_type, "vision_tower": ctx.input("vision").key}}


def _read(art: Artifact, name: str):
    return ArtifactReader(art).read(name)  # checked against the manifest's digest as it is read


def sample_rows(embed, rows: int, seed: int):
    """`rows` draws from N(mean, 1e-5 * covariance) of the embedding rows, as the conversion script does.

    The script's MultivariateNormal draws mu + L @ eps with L = cholesky(covariance); here eps
    comes from a seeded generator (reproducible) and a semi-definite covariance falls back to an
    eigen square root instead of failing.
    """
    import torch

    if rows <= 0:
        return embed[:0]
    emb = embed.to(torch.float64)
    mu = emb.mean(dim=0)
    centered = emb - mu
    cov = COVARIANCE_SCALE * (centered.T @ centered) / emb.shape[0]
    factor, info = torch.linalg.cholesky_ex(cov)
    if int(info) != 0:
        vals, vecs = torch.linalg.eigh(cov)
        factor = vecs * vals.clamp(min=0).sqrt()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    eps = torch.randn((rows, emb.shape[1]), generator=generator, dtype=torch.float64)
    return (mu + eps @ factor.T).to(torch.float32)


def tower_processor(ctx: NodeContext, config):
    """The vision tower's image processor, as LLaVA's CLIPVisionTower reads it."""
    from transformers import AutoImageProcessor, CLIPImageProcessor

    vision = ctx.input("vision")
    if any(rel in ("preprocessor_config.json", "processor_config.json") for rel in vision.files):
        return AutoImageProcessor.from_pretrained(str(vision.path))
    side = config.vision_config.image_size  # LLaVA's CLIPVisionTower would use CLIP's defaults at the tower's resolution
    return CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


def processor(ctx: NodeContext, tokenizer, config, info):
    """LlavaProcessor: the tower's image processor (LlavaImageProcessor with padding for `pad`), the tokenizer."""
    from transformers import LlavaImageProcessor, LlavaProcessor

    image_processor = tower_processor(ctx, config)
    if info.aspect_ratio == "pad":
        # LLaVA pads to a square of the mean colour before the CLIP transform: LlavaImageProcessor's do_pad.
        settings = {k: v for k, v in image_processor.to_dict().items() if k not in ("image_processor_type", "processor_class")}
        image_processor = LlavaImageProcessor(**settings, do_pad=True)
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's CLS token
        chat_template=getattr(tokenizer, "chat_template", None),
    )


STAGES = {"convert": ConvertStage}
