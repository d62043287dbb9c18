"""LLaVA checkpoints in Hugging Face format (model_type "llava"), e.g. xtuner/llava-llama-3-8b-v1_1-transformers.

Loading, image preprocessing and the vision half (CLIP tower, feature layer, projector) are
transformers' own `LlavaForConditionalGeneration` and the checkpoint's processor, so they match the
seed card exactly. The prompt is the card's Llama-3 chat format:

    <|start_header_id|>user<|end_header_id|>\\n\\n<image>\\nWhat are these?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n

(the tokenizer adds <|begin_of_text|> in front, as Meta's tokenizer.json does).
"""

from __future__ import annotations

import torch

from vlui.images import LoadedImage
from vlui.models.base import Message, Segment, VisionChatModel
from vlui.models.llama3_chat import llama3_segments

class LlavaHF(VisionChatModel):
    family = "llava-hf"
    quantization_skip_modules = ["vision_tower", "multi_modal_projector", "lm_head"]

    def __init__(self, hf_model, processor, name: str):
        self.hf_model = hf_model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        image_processor = processor.image_processor
        self.image_mean = tuple(image_processor.image_mean)
        self.image_std = tuple(image_processor.image_std)
        self.rescale_factor = image_processor.rescale_factor
        self.name = name
        config = hf_model.config
        self.decoder = hf_model.model.language_model
        self.lm_head = hf_model.lm_head
        if getattr(self.decoder.config, "model_type", None) != "llama":
            raise ValueError(f"{name}: only LLaVA checkpoints with a Llama language model are supported")
        if "<|start_header_id|>" not in self.tokenizer.get_vocab():
            raise ValueError(f"{name}: only Llama-3 based LLaVA checkpoints (Llama-3 chat format) are supported")
        self.image_placeholder = getattr(processor, "image_token", None) or "<image>"
        self.image_token_id = config.image_token_id
        self.vision_feature_layer = config.vision_feature_layer
        self.vision_feature_select_strategy = config.vision_feature_select_strategy
        vision = config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        self.image_token_count = patches + (1 if self.vision_feature_select_strategy == "full" else 0)
        self.context_length = self.decoder.config.max_position_embeddings
        stops = {self.tokenizer.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|end_of_text|>")}
        self.stop_token_ids = sorted(i for i in stops if i is not None and i != self.tokenizer.unk_token_id)

    @classmethod
    def load(cls, path: str, *, dtype: torch.dtype, device_map, quantization_config=None, local_files_only=False):
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        hf_model = LlavaForConditionalGeneration.from_pretrained(
            path, dtype=dtype, device_map=device_map, quantization_config=quantization_config,
            local_files_only=local_files_only,
        ).eval()
        # The PIL image backend, deliberately: the model was trained with transformers 4's PIL-based CLIP
        # processor; transformers 5 otherwise picks the torchvision backend when it is installed, whose
        # antialiased tensor resize differs slightly.
        try:
            processor = AutoProcessor.from_pretrained(path, local_files_only=local_files_only, backend="pil")
        except (TypeError, ValueError):  # a transformers release without backend selection
            processor = AutoProcessor.from_pretrained(path, local_files_only=local_files_only)
        return cls(hf_model, processor, name=path)

    def segments(self, messages: list[Message], system_prompt: str | None = None) -> list[Segment]:
        return llama3_segments(messages, system_prompt)

    def preprocess(self, image: LoadedImage) -> torch.Tensor:
        # The checkpoint's own processor resizes and crops; rescale and normalize run on the GPU.
        resized = self.processor.image_processor(
            images=image.image, return_tensors="pt", do_rescale=False, do_normalize=False
        )["pixel_values"][0]
        return resized.round().to(torch.uint8)

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        tower = self.hf_model.model.vision_tower
        weight = next(tower.parameters())
        pixels = self.normalize(pixels, weight.device, weight.dtype)
        out = self.hf_model.model.get_image_features(
            pixel_values=pixels,
            vision_feature_layer=self.vision_feature_layer,
            vision_feature_select_strategy=self.vision_feature_select_strategy,
        )
        return torch.stack(list(out.pooler_output)).to(self.device)
