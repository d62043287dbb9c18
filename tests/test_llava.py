"""LLaVA-Llama-3 (Hugging Face format): prompt, preprocessing and outputs against transformers' own
LlavaProcessor and LlavaForConditionalGeneration, on a tiny checkpoint in the published layout."""

from __future__ import annotations

import torch
from safetensors import safe_open

from vlui.engine.engine import Engine, EngineConfig
from vlui.engine.sampling import SamplingParams
from vlui.models.base import Message

# The seed card's prompt, verbatim.
CARD_PROMPT = ("<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat are these?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_prompt_is_the_model_cards_format(llava_model, red_image):
    assert llava_model.render([Message("user", "What are these?", red_image)]) == CARD_PROMPT
    two_turns = llava_model.render([Message("user", "What are these?", red_image), Message("assistant", "Cats."),
                                    Message("user", "什么颜色？")], system_prompt="Be brief.")
    assert two_turns == (
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat are these?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nCats.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n什么颜色？<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_token_ids_match_the_processor(llava_model, red_image):
    ours = llava_model.tokenize([Message("user", "What are these?", red_image)])
    theirs = llava_model.processor(text=CARD_PROMPT, images=red_image.image, return_tensors="pt")
    assert ours.token_ids == theirs["input_ids"][0].tolist()
    assert ours.token_ids[0] == 128000 and ours.token_ids.count(llava_model.image_token_id) == 576
    assert ours.image_spans == [(5, 576)]


def test_pixels_match_the_processor(llava_model, red_image):
    ours = llava_model.normalize(llava_model.preprocess(red_image)[None], "cpu", torch.float32)
    theirs = llava_model.processor(text=CARD_PROMPT, images=red_image.image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_checkpoint_uses_the_published_key_layout(tiny_llava_dir):
    with safe_open(f"{tiny_llava_dir}/model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "vision_tower.vision_model.embeddings.patch_embedding.weight" in keys
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in keys
    assert "multi_modal_projector.linear_1.weight" in keys


@torch.inference_mode()
def test_engine_prefill_logits_equal_transformers_forward(llava_model, red_image):
    prompt = llava_model.tokenize([Message("user", "What are these?", red_image)])
    pixels = llava_model.normalize(llava_model.preprocess(red_image)[None], "cpu", torch.float32)
    reference = llava_model.hf_model(input_ids=torch.tensor([prompt.token_ids]), pixel_values=pixels).logits[0, -1]
    engine = Engine(llava_model, EngineConfig(max_batch=1))
    engine.start()
    try:
        features = engine._encode(llava_model.preprocess(red_image)[None])
        embeds = llava_model.decoder.embed_tokens(torch.tensor(prompt.token_ids))
        start, length = prompt.image_spans[0]
        embeds[start : start + length] = features[0]
        ours = engine.runner.prefill(0, embeds, 0)
    finally:
        engine.shutdown()
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)


def test_engine_greedy_answer_equals_transformers_generate(llava_model, red_image):
    prompt = llava_model.tokenize([Message("user", "What are these? 这是什么？", red_image)])
    pixels = llava_model.normalize(llava_model.preprocess(red_image)[None], "cpu", torch.float32)
    ids = torch.tensor([prompt.token_ids])
    with torch.inference_mode():
        out = llava_model.hf_model.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                                            max_new_tokens=24, do_sample=False, eos_token_id=llava_model.stop_token_ids,
                                            pad_token_id=llava_model.stop_token_ids[0])
    expected = llava_model.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    engine = Engine(llava_model, EngineConfig(max_batch=2)).start()
    try:
        got = engine.submit(prompt, SamplingParams(max_new_tokens=24)).result()
    finally:
        engine.shutdown()
    assert got == expected and len(got) > 0
