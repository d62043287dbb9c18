"""Native 360VL against independent references written from the official code (github.com/360CVGroup/360VL,
qh360_vl/): preprocessing and crop geometry, feature stitching, the Honeybee C-Abstractor, the prompt,
and the full forward pass, on a tiny checkpoint in the official on-disk format."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlui.engine.engine import Engine, EngineConfig
from vlui.engine.sampling import SamplingParams
from vlui.images import load_image
from vlui.models.base import Message
from vlui.models.honeybee import CAbstractor
from vlui.models.qh360vl import SYSTEM_PROMPT, stitch_crops
from tests.conftest import png_bytes

OPENAI_CLIP_336 = {"crop_size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                   "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
                   "resample": 3, "size": 336}


@pytest.fixture
def wide_image():
    img = Image.effect_noise((500, 300), 80).convert("RGB")
    img.paste((250, 20, 20), (0, 0, 120, 80))
    import io
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return load_image(buf.getvalue(), name="wide.png")


# -- reference implementations, following the official code step by step -----------------------------
def official_preprocess(img: Image.Image) -> torch.Tensor:
    """mm_utils.process_images_slid_window with image_aspect_ratio 'pad', vit_is 336, num_slid_window 5."""
    from transformers import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                      resample=3, image_mean=OPENAI_CLIP_336["image_mean"],
                                      image_std=OPENAI_CLIP_336["image_std"])
    background = tuple(int(x * 255) for x in processor.image_mean)
    w, h = img.size
    side = max(w, h)
    square = Image.new(img.mode, (side, side), background)
    square.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    square = square.resize((672, 672))  # get_proper_imgsize: PIL's default filter
    x2 = processor(square, return_tensors="pt", do_resize=False, do_center_crop=False)["pixel_values"][0]
    x1 = processor(square, return_tensors="pt")["pixel_values"][0]
    vit, hh, ww = x1.shape[1], x2.shape[1], x2.shape[2]
    crop = lambda t, left, upper, right, lower: t[:, upper:lower, left:right]  # noqa: E731  (tensor_crop)
    return torch.stack([crop(x2, 0, 0, vit, vit), crop(x2, ww - vit, 0, ww, vit), crop(x2, 0, hh - vit, vit, hh),
                        crop(x2, ww - vit, hh - vit, ww, hh), x1])


def official_stitch(temp_feats: torch.Tensor) -> torch.Tensor:
    """QH360_VL_arch_cc.prepare_inputs_labels_for_multimodal, the proj_2 branch, for one image [5, L, D]."""
    src = int(math.sqrt(temp_feats.shape[1]))
    temp_feats = temp_feats.reshape(temp_feats.shape[0] // 5, 5, -1, temp_feats.shape[-1])
    x = temp_feats[:, :4]
    x = x.reshape(x.shape[0], -1, src, src, x.shape[-1])
    x = x.transpose(1, 2).reshape(x.shape[0], src, 2, 2, src, x.shape[-1])
    return x.transpose(1, 2).reshape(x.shape[0], -1, x.shape[-1])


def reference_c_abstractor(sd: dict, x: torch.Tensor, depth: int, queries: int) -> torch.Tensor:
    """Honeybee C-Abstractor from the state dict with plain functional ops (timm 0.6.13 semantics:
    LayerNormAct2d eps 1e-5, depthwise 3x3, SE on the block input width, SiLU after the residual)."""
    def ln(t, prefix, act=True):
        t = F.layer_norm(t.permute(0, 2, 3, 1), (t.shape[1],), sd[prefix + ".weight"], sd[prefix + ".bias"], 1e-5)
        t = t.permute(0, 3, 1, 2)
        return F.silu(t) if act else t

    def block(t, p):
        shortcut = t if p + ".downsample.conv.weight" not in sd else ln(F.conv2d(t, sd[p + ".downsample.conv.weight"]), p + ".downsample.bn", False)
        y = ln(F.conv2d(t, sd[p + ".conv1.conv.weight"]), p + ".conv1.bn")
        y = ln(F.conv2d(y, sd[p + ".conv2.conv.weight"], padding=1, groups=y.shape[1]), p + ".conv2.bn")
        s = F.conv2d(F.silu(F.conv2d(y.mean((2, 3), keepdim=True), sd[p + ".se.fc1.weight"], sd[p + ".se.fc1.bias"])),
                     sd[p + ".se.fc2.weight"], sd[p + ".se.fc2.bias"])
        y = y * torch.sigmoid(s)
        y = ln(F.conv2d(y, sd[p + ".conv3.conv.weight"]), p + ".conv3.bn", False)
        return F.silu(y + shortcut)

    pos = sd["pos_emb"][:, 1:]
    n, length, c = x.shape
    side, src = int(math.sqrt(length)), int(math.sqrt(pos.shape[1]))
    if side != src:
        pos = F.interpolate(pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2), size=(side, side),
                            mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(0, 2).to(pos.dtype)
    x = x + pos
    t = x.reshape(n, side, side, c).permute(0, 3, 1, 2)
    for i in range(1, depth + 1):
        t = block(t, f"net.0.b{i}")
    hw = int(math.sqrt(queries))
    t = F.adaptive_avg_pool2d(t, (hw, hw))
    for i in range(1, depth + 1):
        t = block(t, f"net.2.b{i}")
    t = t.permute(0, 2, 3, 1).reshape(n, hw * hw, -1)
    return F.linear(F.silu(F.linear(t, sd["readout.0.weight"], sd["readout.0.bias"])), sd["readout.2.weight"], sd["readout.2.bias"])


def official_input_ids(tokenizer, turns: list[tuple[str, str]]) -> list[int]:
    """eval/infer.py get_input: the chat template with the system prompt, the image token in the first user turn."""
    msgs = [{"role": "system", "content": SYSTEM_PROMPT}]
    for i, (role, text) in enumerate(turns):
        msgs.append({"role": role, "content": ("<|reserved_special_token_44|>\n" if i == 0 else "") + text})
    ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


# -- tests ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(500, 300), (300, 500), (336, 336), (1000, 1000)])
def test_preprocessing_matches_the_official_pipeline(qh360vl_model, size):
    img = Image.effect_noise(size, 90).convert("RGB")
    loaded = load_image(_png(img))
    ours = qh360vl_model.normalize(qh360vl_model.preprocess(loaded), "cpu", torch.float32)
    torch.testing.assert_close(ours, official_preprocess(img), atol=1e-5, rtol=0)
    assert ours.shape == (5, 3, 336, 336)


def test_padding_uses_the_clip_mean_colour(qh360vl_model):
    tall = load_image(png_bytes((100, 400), color=(0, 0, 0)))
    raw = qh360vl_model.preprocess(tall)
    assert raw[0, :, 10, 10].tolist() == [122, 116, 104]  # top-left crop, left margin: padding


def test_stitching_matches_the_official_reshape_chain():
    feats = torch.randn(5, 24 * 24, 8)
    assert torch.equal(stitch_crops(feats[None, :4]), official_stitch(feats))
    grid = torch.zeros(48, 48, 8)  # and it is one true 48x48 raster of the 672 image
    tiles = feats[:4].reshape(4, 24, 24, 8)
    grid[:24, :24], grid[:24, 24:], grid[24:, :24], grid[24:, 24:] = tiles
    assert torch.equal(stitch_crops(feats[None, :4])[0], grid.reshape(-1, 8))


@pytest.mark.parametrize("tokens", [576, 2304])
def test_c_abstractor_matches_reference(tokens):
    torch.manual_seed(0)
    cfg = dict(encoder_hidden_size=16, hidden_size=24, depth=3, mlp_depth=2, num_queries=576, pos_emb=True)
    module = CAbstractor(cfg, num_input_tokens=577, output_hidden_size=40).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.2)
    sd = module.state_dict()
    assert "net.0.b1.downsample.conv.weight" in sd  # 16 -> 24 channels needs the 1x1 shortcut
    assert sd["net.0.b1.se.fc1.weight"].shape == (4, 24, 1, 1)  # SE width from the block *input*: 16 * 0.25
    x = torch.randn(2, tokens, 16)
    with torch.no_grad():
        torch.testing.assert_close(module(x), reference_c_abstractor(sd, x, 3, 576), atol=1e-5, rtol=1e-4)


def test_checkpoint_has_the_official_parameter_names(tiny_360vl_dir):
    index = json.load(open(f"{tiny_360vl_dir}/model.safetensors.index.json"))["weight_map"]
    assert len(set(index.values())) >= 2  # sharded, like the released model
    for key in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight",
                "lm_head.weight", "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight",
                "model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.k_proj.bias",
                "model.mm_projector_ctt.pos_emb", "model.mm_projector_ctt.net.0.b1.conv1.conv.weight",
                "model.mm_projector_ctt.net.0.b3.conv2.bn.bias", "model.mm_projector_ori.net.2.b1.se.fc2.bias",
                "model.mm_projector_ori.readout.2.weight"):
        assert key in index, key
    assert not any(k.startswith("model.mm_projector.") or "eos_tokens" in k for k in index)
    config = json.load(open(f"{tiny_360vl_dir}/config.json"))
    assert config["model_type"] == "QH_360VL" and config["auto_map"]  # loaded natively, remote code ignored


def test_prompt_matches_the_official_chat_template(qh360vl_model, red_image):
    tok = qh360vl_model.tokenizer
    one = [Message("user", "Who is this cartoon character?", red_image)]
    expected = official_input_ids(tok, [("user", "Who is this cartoon character?")])
    placeholder = tok.convert_tokens_to_ids("<|reserved_special_token_44|>")
    assert placeholder == 128049 and expected.count(128049) == 1
    at = expected.index(128049)
    expanded = expected[:at] + [128049] * 1152 + expected[at + 1:]
    prompt = qh360vl_model.tokenize(one, SYSTEM_PROMPT)
    assert prompt.token_ids == expanded and prompt.image_spans == [(at, 1152)]
    assert "<|begin_of_text|>" + qh360vl_model.render(one, SYSTEM_PROMPT) == tok.apply_chat_template(
        [{"role": "system", "content": SYSTEM_PROMPT},
         {"role": "user", "content": "<|reserved_special_token_44|>\nWho is this cartoon character?"}],
        add_generation_prompt=True, tokenize=False)
    turns = [Message("user", "Q1 ", red_image), Message("assistant", " A1\n"), Message("user", " 第二个问题")]
    expected = official_input_ids(tok, [("user", "Q1 "), ("assistant", " A1\n"), ("user", " 第二个问题")])
    at = expected.index(128049)
    assert qh360vl_model.tokenize(turns, SYSTEM_PROMPT).token_ids == expected[:at] + [128049] * 1152 + expected[at + 1:]


def test_system_prompt_is_the_official_one():
    import hashlib

    assert hashlib.sha256(SYSTEM_PROMPT.encode()).hexdigest() == "8776979bd898d6a60de81b5db92ef913fa9a2d428d97baac78d495aa9bafa34b"


@torch.inference_mode()
def official_embeds(model, image, turns):
    """Splice as prepare_inputs_labels_for_multimodal does: drop the image token, insert the features."""
    ids = official_input_ids(model.tokenizer, turns)
    at = ids.index(128049)
    inner = model.hf_model.model
    tower = inner.vision_tower.vision_tower.vision_model
    pixels = official_preprocess(image.image)
    hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    local = inner.mm_projector_ctt(official_stitch(hidden))
    global_view = inner.mm_projector_ori(hidden[4:5])
    features = torch.cat([local, global_view], dim=1)[0]
    embed = inner.embed_tokens
    return torch.cat([embed(torch.tensor(ids[:at])), features, embed(torch.tensor(ids[at + 1:]))])[None]


def test_engine_matches_the_official_forward_and_generate(qh360vl_model, wide_image):
    turns = [("user", "这张图片里有什么？")]
    embeds = official_embeds(qh360vl_model, wide_image, turns)
    with torch.inference_mode():
        out = qh360vl_model.hf_model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                              max_new_tokens=20, do_sample=False, eos_token_id=[128009],
                                              pad_token_id=128009)
    expected = qh360vl_model.tokenizer.decode(out[0], skip_special_tokens=True)
    prompt = qh360vl_model.tokenize([Message("user", turns[0][1], wide_image)], SYSTEM_PROMPT)
    assert len(prompt) == embeds.shape[1]  # 1152 image positions where the official code splices 1152 features
    engine = Engine(qh360vl_model, EngineConfig(max_batch=2)).start()
    try:
        assert engine.submit(prompt, SamplingParams(max_new_tokens=20)).result() == expected
    finally:
        engine.shutdown()


def test_vision_tower_comes_from_mm_vision_tower_when_the_checkpoint_lacks_it(tiny_360vl_dir, tmp_path):
    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import load_file
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from vlui.models import load_model

    target = tmp_path / "no-tower"
    shutil.copytree(tiny_360vl_dir, target)
    state = {}
    for shard in sorted(target.glob("model-*.safetensors")):
        state.update(load_file(shard))
        shard.unlink()
    (target / "model.safetensors.index.json").unlink()
    save_torch_state_dict({k: v for k, v in state.items() if ".vision_tower." not in k}, target)
    torch.manual_seed(1)
    clip = CLIPVisionModel(CLIPVisionConfig.from_pretrained(target / "clip-vision"))
    clip.save_pretrained(target / "clip-vision")
    model = load_model(str(target), device="cpu")
    tower = model.hf_model.model.vision_tower.vision_tower.vision_model
    source = getattr(clip, "vision_model", clip)
    assert torch.equal(tower.embeddings.patch_embedding.weight, source.embeddings.patch_embedding.weight)


def _png(img: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()
