"""Random-weight checkpoints in the real on-disk formats, for tests, benchmarks and trying the UI.

Model weights cannot be downloaded everywhere (CI, air-gapped GPU boxes), so the test suite and the
benchmark build checkpoints themselves: the same config keys, parameter names, file layout,
processor and tokenizer files as the published models, with random weights. The loading code that
reads them is the one that reads the real models.

The tokenizer is the real Llama-3 one: Meta's tiktoken BPE file, shipped in the `llama-models`
wheel on PyPI (llama_models/llama3/tokenizer.model), converted to a fast tokenizer with Llama-3's
(not 3.1's) special tokens and a post-processor that adds <|begin_of_text|>, as Meta's
tokenizer.json does.

    python -m vlui.synthetic llava /tmp/tiny-llava       # then: python app.py --model /tmp/tiny-llava
    python -m vlui.synthetic 360vl /tmp/tiny-360vl
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Llama-3 special tokens, ids 128000..128255 (Llama 3.1 renumbered the reserved ones).
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>",
    "<|reserved_special_token_0|>", "<|reserved_special_token_1|>", "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|reserved_special_token_4|>", "<|eot_id|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(5, 251)]
# Meta-Llama-3-8B-Instruct's chat template (tokenizer_config.json).
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def llama3_tiktoken_file() -> Path:
    """Meta's Llama-3 BPE file: $VLUI_LLAMA3_TOKENIZER, else the one in the llama-models package."""
    env = os.environ.get("VLUI_LLAMA3_TOKENIZER")
    if env:
        return Path(env)
    try:
        import llama_models
    except ImportError:
        raise RuntimeError(
            "The Llama-3 tokenizer file is needed: `pip install llama-models` (it ships "
            "llama_models/llama3/tokenizer.model) or set VLUI_LLAMA3_TOKENIZER to that file."
        ) from None
    return Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"


def llama3_tokenizer():
    """A transformers fast tokenizer equal to Meta-Llama-3's ("Hello world" -> [128000, 9906, 1917])."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(
        vocab_file=str(llama3_tiktoken_file()), pattern=LLAMA3_PATTERN, extra_special_tokens=LLAMA3_SPECIAL_TOKENS
    ).converted()
    bos = "<|begin_of_text|>"
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, 128000)]),
    ])
    # No add_bos_token=... here: it would make transformers rebuild (and drop) the post-processor.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token="<|end_of_text|>", chat_template=LLAMA3_CHAT_TEMPLATE,
        model_max_length=8192, clean_up_tokenization_spaces=False,
    )


# -- configs -------------------------------------------------------------------------------------
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 image_size=336, patch_size=14, projection_dim=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0)
LLAMA3_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                  num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0)
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0)
SIZES = {"tiny": (TINY_LLAMA, TINY_CLIP), "8b": (LLAMA3_8B, CLIP_L_336), "70b": (LLAMA3_70B, CLIP_L_336)}


def llava_config(size: str = "tiny"):
    """LLaVA-Llama-3 as xtuner/llava-llama-3-8b-v1_1-transformers: CLIP-L/336, MLP projector, Llama-3."""
    from transformers import LlavaConfig

    text, vision = SIZES[size]
    return LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", **vision),
        text_config=dict(model_type="llama", vocab_size=128320, bos_token_id=128000, eos_token_id=128001,
                         pad_token_id=128258, tie_word_embeddings=False, **text),
        image_token_index=128257, projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=576,
    )


def qh360vl_config_dict(size: str = "tiny", vision_tower: str | None = None) -> dict:
    """The official 360VL config.json layout (model_type QH_360VL, visual_projector_config, ...)."""
    text, vision = SIZES[size]
    projector_hidden = 1024 if size != "tiny" else 32
    return {
        "_name_or_path": f"qh360vl-{size}",
        "architectures": ["QH360_VL_LlamaForCausalLM"],
        "auto_map": {"AutoConfig": "modeling_360vl.QH360_VLConfig",
                     "AutoModelForCausalLM": "modeling_360vl.QH360_VL_LlamaForCausalLM"},
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000, "eos_token_id": 128001,
        "freeze_mm_mlp_adapter": False, "hidden_act": "silu", "hidden_size": text["hidden_size"],
        "image_aspect_ratio": "pad", "image_grid_pinpoints": None, "initializer_range": 0.02,
        "intermediate_size": text["intermediate_size"], "max_position_embeddings": text["max_position_embeddings"],
        "mm_hidden_size": vision["hidden_size"], "mm_num_tokens": 577, "mm_projector_config": "qihoo360/360VL-8B",
        "mm_projector_lr": None, "mm_projector_type": "c-abs", "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False, "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
        "mm_vision_tower": vision_tower or "openai/clip-vit-large-patch14-336", "model_type": "QH_360VL",
        "num_attention_heads": text["num_attention_heads"], "num_hidden_layers": text["num_hidden_layers"],
        "num_key_value_heads": text["num_key_value_heads"], "pretraining_tp": 1, "proj_2": True,
        "rms_norm_eps": text["rms_norm_eps"], "rope_scaling": None, "rope_theta": text["rope_theta"],
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.37.2",
        "tune_mm_mlp_adapter": False, "use_cache": True, "use_mm_proj": True, "vocab_size": 128256,
        "visual_projector_config": {
            "_name_or_path": "", "projector_type": "c-abs", "encoder_hidden_size": vision["hidden_size"],
            "hidden_size": projector_hidden, "depth": 3, "mlp_depth": 2, "num_queries": 576, "pos_emb": True,
            "num_eos_tokens": 0, "prenorm": False, "feature_layer_index": -2, "use_cls": True,
            "initializer_range": 0.02, "layer_norm_eps": 1e-6, "model_type": "mllm_visual_projector",
        },
    }


def _randomize_small_params(model: torch.nn.Module, seed: int) -> None:
    """Give norms, biases and position tables random values too, so no part of the model is trivially inert."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 or "pos_emb" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


# -- builders -------------------------------------------------------------------------------------
def llava_tokenizer():
    tokenizer = llama3_tokenizer()
    # As in xtuner's repo: 128256 <unk>, 128257 <image>, 128258 <pad>.
    tokenizer.add_special_tokens({"unk_token": "<unk>"})
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


def llava_processor(tokenizer):
    from transformers import LlavaProcessor

    try:  # transformers >= 5.2x names the PIL backend explicitly
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor as ImageProcessor
    image_processor = ImageProcessor(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, resample=3,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1, image_token="<image>")


def random_model(family: str, size: str, device: str = "cpu", dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """A random-weight model built in memory on `device` (full-size models need no disk), ready to serve."""
    from vlui.models.llava_hf import LlavaHF
    from vlui.models.qh360vl import QH360VL, QH360VLConfig, QH360VLForCausalLM

    torch.manual_seed(seed)
    if family == "llava":
        from transformers import LlavaForConditionalGeneration

        with torch.device(device):
            hf_model = LlavaForConditionalGeneration._from_config(llava_config(size), dtype=dtype).eval()
        return LlavaHF(hf_model, llava_processor(llava_tokenizer()), name=f"random-llava-llama3-{size}")
    if size == "tiny":
        raise ValueError("build tiny 360VL checkpoints with write_tiny_360vl (its vision tower config lives on disk)")
    config = QH360VLConfig(**qh360vl_config_dict(size))
    with torch.device(device):
        hf_model = QH360VLForCausalLM._from_config(config, dtype=dtype).eval()
    return QH360VL(hf_model, llama3_tokenizer(), name=f"random-360vl-{size}")


# -- writers --------------------------------------------------------------------------------------
def write_tiny_llava(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny LLaVA-Llama-3 checkpoint in Hugging Face format, as xtuner's -transformers repo lays it out."""
    from transformers import LlavaForConditionalGeneration

    out = Path(out_dir)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava_config("tiny")).eval()
    _randomize_small_params(model, seed)
    processor = llava_processor(llava_tokenizer())
    model.to(torch.bfloat16).save_pretrained(out)  # published in bf16
    _published_llava_keys(out / "model.safetensors")
    processor.save_pretrained(out)
    # Lay the processor out as the published repo does: the image processor in preprocessor_config.json
    # (class named without a backend, so transformers picks one), the rest in processor_config.json.
    proc = json.loads((out / "processor_config.json").read_text())
    image_cfg = proc.pop("image_processor")
    image_cfg["image_processor_type"] = "CLIPImageProcessor"
    (out / "preprocessor_config.json").write_text(json.dumps(image_cfg, indent=2))
    (out / "processor_config.json").write_text(json.dumps(proc, indent=2))
    _published_tokenizer_class(out)
    return out


def _published_llava_keys(file: Path) -> None:
    """transformers 5 saves CLIP as vision_tower.embeddings...; the published LLaVA checkpoints (saved by
    transformers 4.x) say vision_tower.vision_model.embeddings... Write those, so loading is tested on them."""
    from safetensors.torch import load_file, save_file

    state = load_file(file)
    renamed = {
        (k.replace("vision_tower.", "vision_tower.vision_model.", 1)
         if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.") else k): v
        for k, v in state.items()
    }
    save_file(renamed, file, metadata={"format": "pt"})


def _published_tokenizer_class(out: Path) -> None:
    """Meta's tokenizer_config.json names PreTrainedTokenizerFast; keep older transformers able to read it."""
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.pop("backend", None)
    path.write_text(json.dumps(cfg, indent=2))


def write_tiny_360vl(out_dir: str | os.PathLike, seed: int = 0, shards: int = 2) -> Path:
    """A tiny 360VL checkpoint in the official layout: config.json, sharded safetensors with the
    official parameter names (vision tower included) and an index, Llama-3 tokenizer files.
    The tiny CLIP tower's own config sits in clip-vision/, named by mm_vision_tower."""
    from huggingface_hub import save_torch_state_dict
    from transformers import CLIPVisionConfig

    from vlui.models.qh360vl import QH360VLConfig, QH360VLForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    CLIPVisionConfig(**TINY_CLIP).save_pretrained(out / "clip-vision")
    config_dict = qh360vl_config_dict("tiny", vision_tower="clip-vision")
    (out / "config.json").write_text(json.dumps(config_dict, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"_from_model_config": True, "bos_token_id": 128000, "eos_token_id": 128001, "transformers_version": "4.37.2"}))
    config = QH360VLConfig.from_pretrained(out)
    config.checkpoint_dir = str(out)
    model = QH360VLForCausalLM(config).to(torch.bfloat16).eval()
    _randomize_small_params(model, seed)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    total = sum(v.numel() * v.element_size() for v in state.values())
    save_torch_state_dict(state, out, max_shard_size=max(1, total // shards + 1))
    llama3_tokenizer().save_pretrained(out)
    _published_tokenizer_class(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("family", choices=["llava", "360vl"])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    writer = write_tiny_llava if args.family == "llava" else write_tiny_360vl
    print(writer(args.out_dir, seed=args.seed))


if __name__ == "__main__":
    main()
