"""360VL (qihoo360/360VL-8B and 360VL-70B), native: no remote code, current transformers.

Reimplemented from the official source (github.com/360CVGroup/360VL, package qh360_vl/), which needs
transformers 4.37 and flash-attention 2. What it does, and what this module reproduces:

* Image: padded to a square with the CLIP mean colour (122, 116, 104), resized to 672x672 (PIL
  bicubic), normalized; four 336x336 crops (top-left, top-right, bottom-left, bottom-right) plus a
  global view, which is the 672 image resized again to 336.
* Vision: CLIP ViT-L/14-336, hidden states of the second-to-last layer without CLS: 576 tokens per
  view. The four crops' tokens are stitched into one 48x48 grid for the local projector
  (`mm_projector_ctt`), the global view goes to `mm_projector_ori`; both are Honeybee C-Abstractors
  (honeybee.py). Local tokens first, then global: 2 x num_queries (1152) embeddings per image.
* Prompt: Llama-3 chat template, the official system prompt, `<|reserved_special_token_44|>\\n`
  before the question of the user turn with the image; that token's position receives the image.
* Checkpoint: the official config.json (model_type "QH_360VL", visual_projector_config, ...) and
  safetensors parameter names, loaded as published.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, LlamaModel

from vlui.images import LoadedImage
from vlui.models.base import Message, Segment, VisionChatModel
from vlui.models.honeybee import CAbstractor
from vlui.models.llama3_chat import llama3_segments

log = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You are a multilingual, helpful, respectful and honest assistant who can respond in the same language, "
    "depending on the language of the question. Try to be as helpful as possible while still being safe. "
    "Your answer should not contain anything that is false, unhealthy, harmful, immoral, racist, sexist, toxic, "
    "dangerous, or illegal, and if the question relates to such content, please decline to answer. Make sure your "
    "answer is socially fair and positive. If a question doesn't make any sense, or is inconsistent with the facts, "
    "explain why instead of answering the wrong answer. If you don't know the answer to a question, don't share "
    "false information."
)
IMAGE_PLACEHOLDER = "<|reserved_special_token_44|>"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)

# The tower the released checkpoints name. Its config is written here so no download is needed for it.
KNOWN_TOWERS = {
    "openai/clip-vit-large-patch14-336": dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    ),
}
# Honeybee C-Abstractor settings of the released models, used only for keys a config leaves out.
PROJECTOR_DEFAULTS = dict(encoder_hidden_size=1024, hidden_size=1024, depth=3, mlp_depth=2, num_queries=576,
                          pos_emb=True, num_eos_tokens=0, prenorm=False)


class QH360VLConfig(LlamaConfig):
    model_type = "QH_360VL"

    def __init__(
        self,
        mm_vision_tower: str = "openai/clip-vit-large-patch14-336",
        mm_hidden_size: int = 1024,
        mm_num_tokens: int = 577,
        mm_vision_select_layer: int = -2,
        mm_vision_select_feature: str = "patch",
        mm_projector_type: str = "c-abs",
        image_aspect_ratio: str = "pad",
        proj_2: bool = True,
        visual_projector_config: dict | None = None,
        **kwargs,
    ):
        self.mm_vision_tower = mm_vision_tower
        self.mm_hidden_size = mm_hidden_size
        self.mm_num_tokens = mm_num_tokens
        self.mm_vision_select_layer = mm_vision_select_layer
        self.mm_vision_select_feature = mm_vision_select_feature
        self.mm_projector_type = mm_projector_type
        self.image_aspect_ratio = image_aspect_ratio
        self.proj_2 = proj_2
        self.visual_projector_config = visual_projector_config or {}
        if "rope_scaling" in kwargs and kwargs["rope_scaling"] is None:
            del kwargs["rope_scaling"]  # 4.37-era "null"; transformers 5 reads rope_theta instead
        super().__init__(**kwargs)

    def projector_settings(self) -> dict:
        given = self.visual_projector_config or {}
        missing = [k for k in PROJECTOR_DEFAULTS if k not in given]
        if missing:
            log.warning("360VL config has no visual_projector_config %s; using the released models' values", missing)
        settings = {**PROJECTOR_DEFAULTS, **{k: v for k, v in given.items() if k in PROJECTOR_DEFAULTS}}
        settings["encoder_hidden_size"] = given.get("encoder_hidden_size", self.mm_hidden_size)
        return settings

    def vision_tower_source(self) -> str:
        """mm_vision_tower as a local folder (relative ones live inside the checkpoint) or a Hub id."""
        local = os.path.join(getattr(self, "checkpoint_dir", None) or "", self.mm_vision_tower)
        return local if os.path.isdir(local) else self.mm_vision_tower

    def vision_config(self) -> CLIPVisionConfig:
        if self.mm_vision_tower in KNOWN_TOWERS:
            return CLIPVisionConfig(**KNOWN_TOWERS[self.mm_vision_tower])
        return CLIPVisionConfig.from_pretrained(self.vision_tower_source())


def clip_transformer(model: nn.Module) -> nn.Module:
    """The module holding embeddings/encoder/layernorms: CLIPVisionModel itself in recent transformers,
    its `.vision_model` attribute in older releases."""
    inner = getattr(model, "vision_model", None)
    return inner if isinstance(inner, nn.Module) else model


class CLIPHolder(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        self.vision_model = clip_transformer(CLIPVisionModel(config))


class VisionTower(nn.Module):
    """CLIP under the names the official checkpoint uses, whatever the transformers version:
    model.vision_tower.vision_tower.vision_model.{embeddings,pre_layrnorm,encoder,post_layernorm}."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.vision_tower = CLIPHolder(config)


class QH360VLModel(LlamaModel):
    config_class = QH360VLConfig

    def __init__(self, config: QH360VLConfig):
        super().__init__(config)
        self.vision_tower = VisionTower(config.vision_config())
        settings = config.projector_settings()
        self.mm_projector_ctt = CAbstractor(settings, config.mm_num_tokens, config.hidden_size)
        self.mm_projector_ori = CAbstractor(settings, config.mm_num_tokens, config.hidden_size)


class QH360VLForCausalLM(LlamaForCausalLM):
    """Same parameter names as the official QH360_VL_LlamaForCausalLM: model.*, lm_head."""

    config_class = QH360VLConfig
    _no_split_modules = ["LlamaDecoderLayer", "CLIPEncoderLayer", "CAbstractor"]

    def __init__(self, config: QH360VLConfig):
        super(LlamaForCausalLM, self).__init__(config)  # skip building a plain LlamaModel first
        self.model = QH360VLModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


def expand_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    out = Image.new(img.mode, (side, side), fill)
    out.paste(img, ((side - width) // 2, (side - height) // 2))
    return out


def preprocess_360vl(img: Image.Image, view: int = 336, mean=CLIP_MEAN) -> torch.Tensor:
    """uint8 [5, 3, view, view]: four crops of the 2x view (TL, TR, BL, BR), then the global view.
    (Normalization, which the official code applies before cropping, is per pixel, so it commutes
    with the crops and runs later on the device.)"""
    fill = tuple(int(m * 255) for m in mean)  # truncated, as in the official code: (122, 116, 104)
    big = expand_to_square(img.convert("RGB"), fill).resize((2 * view, 2 * view), Image.Resampling.BICUBIC)
    small = big.resize((view, view), Image.Resampling.BICUBIC)

    def chw(im: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)

    x2 = chw(big)
    crops = [x2[:, r : r + view, c : c + view] for r in (0, view) for c in (0, view)]
    return torch.stack([*crops, chw(small)])


def stitch_crops(features: torch.Tensor) -> torch.Tensor:
    """[N, 4, S*S, C] tokens of the TL, TR, BL, BR crops -> [N, (2S)*(2S), C] tokens of one row-major grid."""
    n, _, length, channels = features.shape
    side = int(length**0.5)
    grid = features.reshape(n, 2, 2, side, side, channels)  # crop row, crop col, row, col
    return grid.permute(0, 1, 3, 2, 4, 5).reshape(n, 4 * length, channels)


class QH360VL(VisionChatModel):
    family = "360vl"
    image_placeholder = IMAGE_PLACEHOLDER
    default_system_prompt = SYSTEM_PROMPT
    quantization_skip_modules = ["vision_tower", "mm_projector_ctt", "mm_projector_ori", "lm_head"]

    def __init__(self, hf_model: QH360VLForCausalLM, tokenizer, name: str):
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        self.name = name
        config = hf_model.config
        self.decoder = hf_model.model
        self.lm_head = hf_model.lm_head
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"{name}: the tokenizer has no {IMAGE_PLACEHOLDER} token (is it a Llama-3 tokenizer?)")
        self.select_layer = config.mm_vision_select_layer
        self.image_token_count = (
            hf_model.model.mm_projector_ctt.num_output_tokens + hf_model.model.mm_projector_ori.num_output_tokens
        )
        vision = hf_model.model.vision_tower.vision_tower.config
        self.view_size = vision.image_size
        self.context_length = config.max_position_embeddings
        stops = {tokenizer.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|end_of_text|>")}
        self.stop_token_ids = sorted(i for i in stops if i is not None and i != tokenizer.unk_token_id)

    @classmethod
    def load(cls, path: str, *, dtype: torch.dtype, device_map, quantization_config=None, local_files_only=False):
        from transformers import PreTrainedTokenizerFast

        config = QH360VLConfig.from_pretrained(path, local_files_only=local_files_only)
        if os.path.isdir(path):
            config.checkpoint_dir = path
        hf_model, info = QH360VLForCausalLM.from_pretrained(
            path, config=config, dtype=dtype, device_map=device_map, quantization_config=quantization_config,
            local_files_only=local_files_only, output_loading_info=True,
        )
        tower_missing = [k for k in info.get("missing_keys", []) if ".vision_tower." in k]
        others = [k for k in info.get("missing_keys", []) if ".vision_tower." not in k]
        if others:
            raise OSError(f"the checkpoint lacks {len(others)} weights, e.g. {others[:3]}")
        if tower_missing:
            # The official loader always takes CLIP from mm_vision_tower; do the same when the checkpoint lacks it.
            log.info("loading the vision tower from %s", config.mm_vision_tower)
            source = CLIPVisionModel.from_pretrained(config.vision_tower_source(), dtype=dtype,
                                                     local_files_only=local_files_only)
            hf_model.model.vision_tower.vision_tower.vision_model.load_state_dict(clip_transformer(source).state_dict())
        # The released repos ship Meta's tokenizer.json. Loading it directly (not via AutoTokenizer) keeps
        # transformers from reading config.json's auto_map and offering to run remote code.
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=local_files_only)
        return cls(hf_model.eval(), tokenizer, name=path)

    def segments(self, messages: list[Message], system_prompt: str | None = None) -> list[Segment]:
        # The official code renders with Meta's chat template, which trims every message.
        return llama3_segments(messages, system_prompt, trim=True)

    def preprocess(self, image: LoadedImage) -> torch.Tensor:
        return preprocess_360vl(image.image, self.view_size)

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [N, 5, 3, 336, 336] -> [N, 1152, hidden]."""
        model = self.hf_model.model
        tower = model.vision_tower.vision_tower.vision_model
        weight = tower.embeddings.patch_embedding.weight
        n = pixels.shape[0]
        views = self.normalize(pixels.flatten(0, 1), weight.device, weight.dtype)
        hidden = tower(pixel_values=views, output_hidden_states=True).hidden_states[self.select_layer][:, 1:]
        hidden = hidden.reshape(n, 5, *hidden.shape[1:])
        ctt, ori = model.mm_projector_ctt, model.mm_projector_ori
        local = ctt(stitch_crops(hidden[:, :4]).to(next(ctt.parameters()).device))
        global_view = ori(hidden[:, 4].to(next(ori.parameters()).device))
        return torch.cat([local.to(self.device), global_view.to(self.device)], dim=1)
