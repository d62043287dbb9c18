"""GPU-only checks (skipped without CUDA): the Triton decode kernel against the SDPA reference, and the
compiled, CUDA-graph decode path against plain transformers on a small random Llama."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("batch,lengths", [(1, [1]), (1, [4000]), (3, [1, 64, 65]), (32, None)])
def test_triton_decode_attention_matches_reference(batch, lengths):
    from vlui.engine.attention import decode_attention, decode_attention_reference

    torch.manual_seed(0)
    slots, heads, kv_heads, head_dim, max_seq = 40, 32, 8, 128, 4096
    k_cache = torch.randn(slots, kv_heads, max_seq, head_dim, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(batch, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    slot_ids = torch.randperm(slots, device="cuda")[:batch]
    if lengths is None:
        lengths = torch.randint(1, max_seq, (batch,)).tolist()
    lens = torch.tensor(lengths, device="cuda")
    ours = decode_attention(q, k_cache, v_cache, slot_ids, lens)
    ref = decode_attention_reference(q.float(), k_cache.float(), v_cache.float(), slot_ids, lens, max(lengths))
    torch.testing.assert_close(ours.float(), ref, atol=2e-2, rtol=2e-2)


def small_llama(device="cuda", dtype=torch.bfloat16):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048)
    with torch.device(device):
        return LlamaForCausalLM._from_config(config, dtype=dtype).eval()


@torch.inference_mode()
def test_compiled_graph_decode_matches_transformers():
    from vlui.engine.runner import LlamaRunner

    model = small_llama()
    ids = torch.randint(0, 1000, (2, 48), device="cuda")
    reference = model(input_ids=ids).logits.float()  # [2, 48, V]
    runner = LlamaRunner(model.model, model.lm_head, num_slots=4, max_seq_len=256)
    runner.compile()
    runner.capture_cuda_graphs([1, 2, 4])
    embeds = model.model.embed_tokens(ids)
    for row, slot in enumerate((3, 1)):
        runner.prefill(slot, embeds[row, :40], 0)
    for t in range(40, 48):
        logits = runner.decode([3, 1], ids[:, t].tolist(), [t, t]).float()
        torch.testing.assert_close(logits, reference[:, t], atol=5e-2, rtol=5e-2)
    assert runner._graph_sizes == [1, 2, 4]
