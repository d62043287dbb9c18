"""Decode-step attention over a slot-based KV cache.

The cache of one layer is a tensor [slots, kv_heads, max_seq, head_dim]; row b of a decoding batch
reads slot `slots[b]` up to `lengths[b]`. Two implementations with the same semantics:

* `decode_attention_reference`: PyTorch SDPA over a gathered, masked copy of the cache. Runs
  everywhere (CPU in CI) and is the reference the fast kernel is tested against.
* `decode_attention`: a Triton split-K ("flash-decoding") kernel that reads only each row's own
  valid cache entries. Lengths are read on the device, so one CUDA graph serves every length.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs (CI) run the reference.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def decode_attention_reference(q, k_cache, v_cache, slots, lengths, max_len: int) -> torch.Tensor:
    """q [B, H, D]; returns [B, H, D]. `max_len` >= every length (a host-side int)."""
    keys = k_cache[slots, :, :max_len]  # [B, KVH, L, D] (a gather: copies)
    values = v_cache[slots, :, :max_len]
    visible = torch.arange(max_len, device=q.device)[None, :] < lengths[:, None]
    out = F.scaled_dot_product_attention(
        q[:, :, None], keys, values, attn_mask=visible[:, None, None, :], enable_gqa=True
    )
    return out[:, :, 0]


def triton_available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _split_kernel(
        Q, K, V, Slots, Lengths, Out, Lse,
        stride_qb, stride_qh,
        stride_ks, stride_kh, stride_kt,
        stride_vs, stride_vh, stride_vt,
        stride_ob, stride_oh, stride_os,
        stride_lb, stride_lh,
        scale,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK: tl.constexpr, NUM_SPLITS: tl.constexpr,
    ):
        # One program: one batch row, one KV head (all its query heads at once), one split of the keys.
        b = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        slot = tl.load(Slots + b)
        length = tl.load(Lengths + b)
        per_split = tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK) * BLOCK
        start = split * per_split
        end = tl.minimum(start + per_split, length)

        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM)
        heads = kv_head * GROUP + g
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=(g < GROUP)[:, None], other=0.0)

        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        k_base = K + slot * stride_ks + kv_head * stride_kh
        v_base = V + slot * stride_vs + kv_head * stride_vh
        for t0 in range(start, end, BLOCK):
            t = t0 + tl.arange(0, BLOCK)
            valid = t < end
            k = tl.load(k_base + t[:, None] * stride_kt + d[None, :], mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            v = tl.load(v_base + t[:, None] * stride_vt + d[None, :], mask=valid[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new

        out = acc / tl.maximum(l_i, 1e-30)[:, None]  # an empty split leaves zeros ...
        lse = m_i + tl.log(l_i)  # ... and -inf here, so it weighs nothing when combined
        keep = g < GROUP
        tl.store(Out + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :], out, mask=keep[:, None])
        tl.store(Lse + b * stride_lb + heads * stride_lh + split, lse, mask=keep)

    @triton.jit
    def _combine_kernel(
        Parts, Lse, Out,
        stride_pb, stride_ph, stride_ps,
        stride_lb, stride_lh,
        stride_ob, stride_oh,
        HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.arange(0, SPLITS_PAD)
        d = tl.arange(0, HEAD_DIM)
        lse = tl.load(Lse + b * stride_lb + h * stride_lh + s, mask=s < NUM_SPLITS, other=float("-inf"))
        weights = tl.exp(lse - tl.max(lse, 0))
        parts = tl.load(
            Parts + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + d[None, :],
            mask=(s < NUM_SPLITS)[:, None], other=0.0,
        )
        out = tl.sum(parts * weights[:, None], 0) / tl.sum(weights, 0)
        tl.store(Out + b * stride_ob + h * stride_oh + d, out.to(Out.dtype.element_ty))


def num_splits_for(batch: int, kv_heads: int, device: torch.device) -> int:
    """Enough splits that the batch covers the GPU's multiprocessors about twice."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(32, math.ceil(2 * sms / max(1, batch * kv_heads))))


def decode_attention(q, k_cache, v_cache, slots, lengths, num_splits: int | None = None) -> torch.Tensor:
    """Triton flash-decoding. q [B, H, D] (head_dim a power of two >= 16); returns [B, H, D]."""
    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    splits = num_splits or num_splits_for(batch, kv_heads, q.device)
    q = q.contiguous()
    parts = torch.empty(batch, heads, splits, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
    _split_kernel[(batch, kv_heads, splits)](
        q, k_cache, v_cache, slots, lengths, parts, lse,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        parts.stride(0), parts.stride(1), parts.stride(2),
        lse.stride(0), lse.stride(1),
        1.0 / math.sqrt(head_dim),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK=64, NUM_SPLITS=splits, num_warps=4, num_stages=2,
    )
    out = torch.empty_like(q)
    _combine_kernel[(batch, heads)](
        parts, lse, out,
        parts.stride(0), parts.stride(1), parts.stride(2),
        lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, NUM_SPLITS=splits, SPLITS_PAD=max(2, triton.next_power_of_2(splits)), num_warps=2,
    )
    return out
