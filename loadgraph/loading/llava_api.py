"""LLaVA's model API on transformers' Llava classes, so LLaVA's own scripts run unchanged.

LLaVA's scripts call `model.get_vision_tower()`, `model.get_model()` and
`model.generate(input_ids, images=..., image_sizes=...)` where `input_ids` holds
IMAGE_TOKEN_INDEX (-200) wherever an image goes. transformers' Llava instead wants one image
token id per patch in `input_ids` and `pixel_values`. The mixin below keeps transformers' modules
(vision tower, projector, language model, lm_head) and its forward/generate, and only turns
LLaVA's inputs into `inputs_embeds`: each -200 is replaced by that image's projected patch
features, text pieces by their embeddings, then the batch is padded as LLaVA pads it. The
vocabulary stays as trained (no image token is added), so logits have LLaVA's width.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

IMAGE_TOKEN_INDEX = -200  # LLaVA's placeholder id in input_ids (llava/constants.py)
IGNORE_INDEX = -100
_MLP_GELU = re.compile(r"^mlp(\d+)x_gelu$")


def projector_depth(projector_type: str | None) -> int:
    """Linear layers of LLaVA's projector: `linear` is one, `mlpNx_gelu` is N."""
    match = _MLP_GELU.match(projector_type or "")
    return int(match.group(1)) if match else 1


class LlavaProjector(nn.Module):
    """LLaVA's projector at any depth under transformers' names (`linear_1`, `linear_2`, ...).

    At depth 2 it has the very names and maths of transformers' LlavaMultiModalProjector;
    `linear` (depth 1) and `mlp3x_gelu` (depth 3) are LLaVA projectors transformers lacks.
    """

    def __init__(self, config: Any, depth: int):
        super().__init__()
        vision, text = config.vision_config.hidden_size, config.text_config.hidden_size
        bias = getattr(config, "multimodal_projector_bias", True)
        for i in range(depth):
            setattr(self, f"linear_{i + 1}", nn.Linear(vision if i == 0 else text, text, bias=bias))
        self.depth = depth
        self.act = nn.GELU()  # LLaVA's nn.GELU(): the exact (erf) form, as transformers' "gelu"

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        for i in range(self.depth):
            if i:
                features = self.act(features)
            features = getattr(self, f"linear_{i + 1}")(features)
        return features


def unpad_features(features: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Crop a (C, H, W) feature grid to the picture's aspect ratio, with LLaVA's arithmetic.

    transformers' LlavaNext `unpad_image` rounds the scaled side to 7 digits before `int()`;
    LLaVA truncates, so a side like 11.999999999999998 is 11 there: for 19 of ~1.1M picture sizes
    on LLaVA-1.6's grids (e.g. 328x205) the padding, hence the image's token count, differs.
    """
    rows, cols = features.shape[1:]
    if width / height > cols / rows:
        pad = (rows - int(height * (cols / width))) // 2
        return features[:, pad:rows - pad, :]
    pad = (cols - int(width * (rows / height))) // 2
    return features[:, :, pad:cols - pad]


class VisionTower:
    """What LLaVA's CLIPVisionTower offers its callers, over transformers' loaded tower."""

    def __init__(self, owner: "LlavaApiMixin"):
        self._owner = owner

    @property
    def vision_tower(self) -> nn.Module:
        return self._owner.model.vision_tower

    is_loaded = True  # transformers built and loaded the tower with the model

    def load_model(self, device_map: Any = None) -> None:
        """LLaVA loads its tower lazily; here it is loaded already (LLaVA's own no-op when loaded)."""

    @property
    def image_processor(self):
        return getattr(self._owner, "image_processor", None)

    @property
    def config(self):
        return self.vision_tower.config

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_patches_per_side(self) -> int:
        return self.config.image_size // self.config.patch_size

    @property
    def num_patches(self) -> int:
        return self.num_patches_per_side ** 2

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vision_tower.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.vision_tower.parameters()).device

    def to(self, *args: Any, **kwargs: Any) -> "VisionTower":
        self.vision_tower.to(*args, **kwargs)
        return self

    def __call__(self, images: torch.Tensor | list[torch.Tensor]):
        """Selected patch features (before the projector), LLaVA's `feature_select`."""
        if isinstance(images, list):
            return [self(image.unsqueeze(0)) for image in images]
        cfg = self._owner.config
        out = self.vision_tower(images.to(device=self.device, dtype=self.dtype), output_hidden_states=True)
        features = out.hidden_states[cfg.vision_feature_layer]
        if cfg.vision_feature_select_strategy == "default":  # LLaVA's "patch": drop CLS
            features = features[:, 1:]
        return features.to(images.dtype)


class LanguageModelView:
    """LLaVA's `get_model()`: the language model's modules plus `mm_projector` and the tower."""

    def __init__(self, owner: "LlavaApiMixin"):
        self._owner = owner

    @property
    def mm_projector(self) -> nn.Module:
        return self._owner.model.multi_modal_projector

    def get_vision_tower(self) -> VisionTower:
        return self._owner.get_vision_tower()

    @property
    def vision_tower(self) -> VisionTower:
        return self._owner.get_vision_tower()

    @property
    def embed_tokens(self) -> nn.Module:
        return self._owner.get_input_embeddings()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._owner.model.language_model, name)


class LlavaApiMixin:
    """LLaVA's LlavaMetaForCausalLM surface; must precede a transformers Llava class in the bases."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any):
        super().__init__(config, *args, **kwargs)
        depth = projector_depth(getattr(config, "mm_projector_type", "mlp2x_gelu"))
        if depth != 2:  # transformers' projector is Linear-act-Linear; build LLaVA's depth
            self.model.multi_modal_projector = LlavaProjector(config, depth)
            self.post_init()

    def get_model(self) -> LanguageModelView:
        return LanguageModelView(self)

    def get_vision_tower(self) -> VisionTower:
        return VisionTower(self)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.multi_modal_projector(self.get_vision_tower()(images))

    def _image_features(self, images: Any, image_sizes: Any) -> list[torch.Tensor]:
        """One (patches, hidden) tensor per image, in order."""
        if isinstance(images, list) or images.ndim == 5:
            # Several crops per image (a list, or batch x crops: anyres's base image + its grid)
            stacks = [s if s.ndim == 4 else s.unsqueeze(0) for s in images]
            encoded = torch.split(self.encode_images(torch.cat(stacks)), [s.shape[0] for s in stacks])
            merge = getattr(self.config, "mm_patch_merge_type", "flat")
            if merge == "flat":  # concatenated as they come
                return [f.flatten(0, 1) for f in encoded]
            if not merge.startswith("spatial"):
                raise ValueError(f"Unexpected mm_patch_merge_type: {merge}")
            return [self._spatial_merge(f, None if image_sizes is None else image_sizes[i], "unpad" in merge) for i, f in enumerate(encoded)]
        return list(self.encode_images(images))

    def _spatial_merge(self, feature: torch.Tensor, size: Any, unpad: bool) -> torch.Tensor:
        """LLaVA-1.6's merge of one image: the base image's patches, then the crops laid out as the
        grid they were cut from (unpadded, an image_newline closing every row when `unpad`).

        transformers' LlavaNext helper picks the grid in (height, width); LLaVA's image sizes
        (PIL's `image.size`) and image_grid_pinpoints are (width, height), so both are turned here.
        """
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        from loadgraph.formats.llava_original import grid_pinpoints

        if feature.shape[0] == 1:
            feature = feature[0]
            return torch.cat((feature, self.model.image_newline[None].to(feature))) if unpad else feature
        if getattr(self.config, "image_aspect_ratio", None) != "anyres":
            raise NotImplementedError  # LLaVA's own answer for crops without anyres
        base, crops = feature[0], feature[1:]
        side = self.get_vision_tower().num_patches_per_side
        width, height = (int(v) for v in size)
        pinpoints = [[h, w] for w, h in grid_pinpoints(self.config.image_grid_pinpoints, "image_grid_pinpoints")]
        rows, cols = get_anyres_image_grid_shape((height, width), pinpoints, self.config.vision_config.image_size)
        crops = crops.view(rows, cols, side, side, -1)
        if unpad:
            crops = crops.permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)
            crops = unpad_features(crops, width, height)
            newline = self.model.image_newline[:, None, None].expand(*crops.shape[:-1], 1).to(crops)
            crops = torch.cat((crops, newline), dim=-1).flatten(1, 2).transpose(0, 1)
        else:
            crops = crops.permute(0, 2, 1, 3, 4).contiguous().flatten(0, 3)
        return torch.cat((base, crops))

    def prepare_inputs_labels_for_multimodal(self, input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes=None):
        """LLaVA's contract: (input_ids=None, position_ids, attention_mask, past_key_values, inputs_embeds, labels)."""
        if images is None or input_ids.shape[1] == 1:
            return input_ids, position_ids, attention_mask, past_key_values, None, labels
        features = self._image_features(images, image_sizes)
        given_labels, given_positions, given_mask = labels, position_ids, attention_mask
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if labels is None:
            labels = torch.full_like(input_ids, IGNORE_INDEX)
        embed = self.get_input_embeddings()
        rows, row_labels, image = [], [], 0
        for ids, lab in zip((i[m] for i, m in zip(input_ids, mask)), (l[m] for l, m in zip(labels, mask))):
            spots = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
            bounds = [-1, *spots, ids.shape[0]]
            text = [ids[a + 1:b] for a, b in zip(bounds, bounds[1:])]
            text_labels = [lab[a + 1:b] for a, b in zip(bounds, bounds[1:])]
            text_embeds = embed(torch.cat(text)).split([t.shape[0] for t in text])
            pieces, piece_labels = [], []
            for j, (e, t) in enumerate(zip(text_embeds, text_labels)):
                pieces.append(e)
                piece_labels.append(t)
                if j < len(spots):
                    feat = features[image].to(e.device, e.dtype)
                    pieces.append(feat)
                    piece_labels.append(torch.full((feat.shape[0],), IGNORE_INDEX, device=t.device, dtype=t.dtype))
                    image += 1
            if not spots:
                image += 1  # LLaVA consumes one image for a row without a placeholder
            rows.append(torch.cat(pieces))
            row_labels.append(torch.cat(piece_labels))
        limit = getattr(self.config, "tokenizer_model_max_length", None)
        if limit is not None:
            rows, row_labels = [r[:limit] for r in rows], [r[:limit] for r in row_labels]
        return self._padded(rows, row_labels, given_positions, given_mask, given_labels, past_key_values)

    def _padded(self, rows, row_labels, given_positions, given_mask, given_labels, past_key_values):
        """Pad to the longest row, on the side config.tokenizer_padding_side names (right by default)."""
        width, batch = max(r.shape[0] for r in rows), len(rows)
        ref = rows[0]
        embeds = torch.zeros((batch, width, ref.shape[1]), dtype=ref.dtype, device=ref.device)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=row_labels[0].dtype, device=ref.device)
        mask = torch.zeros((batch, width), dtype=torch.bool, device=ref.device)
        positions = torch.zeros((batch, width), dtype=torch.long, device=ref.device)
        left = getattr(self.config, "tokenizer_padding_side", "right") == "left"
        for i, (r, lab) in enumerate(zip(rows, row_labels)):
            n = r.shape[0]
            span = slice(width - n, width) if left else slice(0, n)
            embeds[i, span], labels[i, span], mask[i, span] = r, lab, True
            positions[i, span] = torch.arange(n, dtype=torch.long, device=ref.device)
        return (
            None,
            None if given_positions is None else positions,
            None if given_mask is None else mask.to(given_mask.dtype),
            past_key_values,
            embeds,
            None if given_labels is None else labels,
        )

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None, labels=None,
                images=None, image_sizes=None, **kwargs: Any):
        if inputs_embeds is None and images is not None:
            input_ids, position_ids, attention_mask, past_key_values, inputs_embeds, labels = self.prepare_inputs_labels_for_multimodal(
                input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes)
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, past_key_values=past_key_values,
                               inputs_embeds=inputs_embeds, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, images=None, image_sizes=None, **kwargs: Any):
        """LLaVA's generate: the prompt goes in as embeddings, so only new tokens come back, after
        the BOS column that LLaVA's transformers (4.37) starts an embeddings-only generation with."""
        if "inputs_embeds" in kwargs:
            raise NotImplementedError("`inputs_embeds` is not supported")  # LLaVA's own refusal
        position_ids, attention_mask = kwargs.pop("position_ids", None), kwargs.pop("attention_mask", None)
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        if images is not None:
            inputs, position_ids, attention_mask, _, embeds, _ = self.prepare_inputs_labels_for_multimodal(
                inputs, position_ids, attention_mask, None, None, images, image_sizes)
        else:
            embeds = self.get_input_embeddings()(inputs)
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        out = super().generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
        bos = self.generation_config.bos_token_id
        if isinstance(out, torch.Tensor) and isinstance(bos, int):
            out = torch.cat([torch.full((out.shape[0], 1), bos, dtype=out.dtype, device=out.device), out], dim=1)
        return out


# The names LLaVA (and LLaVA-NeXT) give its classes, one per language family.
class LlavaLlamaForCausalLM(LlavaApiMixin, LlavaForConditionalGeneration):
    pass


class LlavaMistralForCausalLM(LlavaApiMixin, LlavaForConditionalGeneration):
    pass


class LlavaMixtralForCausalLM(LlavaApiMixin, LlavaForConditionalGeneration):
    pass


class LlavaQwenForCausalLM(LlavaApiMixin, LlavaForConditionalGeneration):
    pass


class LlavaGemmaForCausalLM(LlavaApiMixin, LlavaForConditionalGeneration):
    pass


CLASSES: dict[str, type] = {
    "llama": LlavaLlamaForCausalLM,
    "mistral": LlavaMistralForCausalLM,
    "mixtral": LlavaMixtralForCausalLM,
    "qwen": LlavaQwenForCausalLM,
    "gemma": LlavaGemmaForCausalLM,
}
# LLaVA-1.6 (anyres, spatial_unpad) checkpoints: the same names (LLaVA has one class per family for
# both) on transformers' LlavaNext, which holds the image_newline embedding.
NEXT_CLASSES: dict[str, type] = {
    family: type(cls.__name__, (LlavaApiMixin, LlavaNextForConditionalGeneration), {"__module__": __name__, "__qualname__": cls.__name__})
    for family, cls in CLASSES.items()
}


def llava_class(family: str, next: bool = False) -> type:
    """LLaVA's class for a language family (LlavaLlamaForCausalLM, ...), on transformers' Llava or LlavaNext."""
    return (NEXT_CLASSES if next else CLASSES)[family]
