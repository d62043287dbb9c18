"""The small interface every model family implements, and what the engine needs from it.

A family module (LLaVA-HF, 360VL) owns three things: how the prompt is written, how an image becomes
pixels and then embeddings, and how its checkpoint is loaded. The language model inside is a Llama
decoder in every family we serve, exposed as `decoder` (a transformers `LlamaModel`) plus `lm_head`,
so that the engine can run its own fast decoding loop over those very weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlui.images import LoadedImage


@dataclass
class Message:
    role: str  # "user" or "assistant"
    text: str
    image: LoadedImage | None = None


@dataclass(frozen=True)
class Segment:
    """A piece of prompt text. Trusted text is template markup whose special tokens are parsed; the
    rest (what users and the model wrote) is tokenized with special tokens read as plain text."""

    text: str
    trusted: bool = False


IMAGE = Segment("", trusted=True)  # marks where an image's embeddings go


@dataclass
class PreparedPrompt:
    """A tokenized prompt. Each image occupies `length` consecutive positions starting at `start`;
    the ids there are placeholders that the image's embeddings replace."""

    token_ids: list[int]
    image_spans: list[tuple[int, int]] = field(default_factory=list)
    images: list[LoadedImage] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.token_ids)

    def cache_keys(self) -> list:
        """What identifies each position for KV-cache reuse: the token id, or (image digest, index)."""
        keys: list = list(self.token_ids)
        for (start, length), image in zip(self.image_spans, self.images):
            for i in range(length):
                keys[start + i] = (image.digest, i)
        return keys


class VisionChatModel:
    """Base class; see vlui/models/llava_hf.py and vlui/models/qh360vl.py."""

    family: str = ""
    name: str = ""
    image_placeholder: str = "<image>"  # where the image goes in the rendered prompt text
    default_system_prompt: str | None = None
    supports_system_prompt: bool = True

    tokenizer = None
    decoder = None  # transformers LlamaModel: embed_tokens, layers, norm, rotary_emb
    lm_head = None
    context_length: int = 8192
    stop_token_ids: list[int] = []
    image_token_count: int = 0  # embeddings per image
    image_token_id: int = 0  # placeholder id written at image positions

    # -- prompt -------------------------------------------------------------------------------
    def segments(self, messages: list[Message], system_prompt: str | None = None) -> list[Segment]:
        """The prompt, ending with the assistant header, as segments; IMAGE where the image goes."""
        raise NotImplementedError

    def render(self, messages: list[Message], system_prompt: str | None = None) -> str:
        """The prompt as text, with `image_placeholder` where the image goes (for display and tests)."""
        return "".join(self.image_placeholder if s is IMAGE else s.text for s in self.segments(messages, system_prompt))

    def tokenize(self, messages: list[Message], system_prompt: str | None = None) -> PreparedPrompt:
        """Token ids of the prompt, each image expanded to `image_token_count` placeholder positions."""
        images = [m.image for m in messages if m.image is not None]
        ids = list(self._bos_ids())
        spans = []
        for segment in self.segments(messages, system_prompt):
            if segment is IMAGE:
                spans.append((len(ids), self.image_token_count))
                ids.extend([self.image_token_id] * self.image_token_count)
            elif segment.text:
                ids.extend(self.tokenizer.encode(segment.text, add_special_tokens=False,
                                                 split_special_tokens=not segment.trusted))
        if len(spans) != len(images):
            raise AssertionError("the prompt template placed a different number of images than were given")
        return PreparedPrompt(token_ids=ids, image_spans=spans, images=images)

    def _bos_ids(self) -> list[int]:
        bos = self.tokenizer.bos_token_id
        return [bos] if bos is not None else []

    # -- vision -------------------------------------------------------------------------------
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    rescale_factor: float = 1 / 255

    def preprocess(self, image: LoadedImage) -> torch.Tensor:
        """uint8 pixels for one image, on the CPU, in the layout `encode_images` takes. Resizing is CPU
        work (PIL, as the reference processors do); rescaling and normalizing happen on the device."""
        raise NotImplementedError

    def normalize(self, pixels: torch.Tensor, device, dtype) -> torch.Tensor:
        """uint8 pixels [..., 3, H, W] -> (x * rescale - mean) / std in float32 on `device`, then `dtype`:
        the same arithmetic as the Hugging Face image processors."""
        x = pixels.to(device, non_blocking=True).float() * self.rescale_factor
        # Constants made once per device: creating them inside a CUDA-graph capture would be a host copy.
        constants = self.__dict__.setdefault("_normalize_constants", {})
        if str(device) not in constants:
            constants[str(device)] = (torch.tensor(self.image_mean, device=device)[:, None, None],
                                      torch.tensor(self.image_std, device=device)[:, None, None])
        mean, std = constants[str(device)]
        return ((x - mean) / std).to(dtype)

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Embeddings [num_images, image_token_count, hidden] for a batch of preprocessed images."""
        raise NotImplementedError

    # -- language model -----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.embed_tokens.weight.dtype

    def describe(self) -> str:
        return f"{self.name} ({self.family}, {self.image_token_count} image tokens, context {self.context_length})"
