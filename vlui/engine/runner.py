"""The language-model half of the engine: a Llama decoder run over a slot-based static KV cache.

`LlamaRunner` borrows the weights of an already loaded transformers `LlamaModel` (so checkpoints load
through the normal, faithful code path) and runs its own forward pass, the way gpt-fast does:

* a KV cache preallocated once: per layer [slots + 1, kv_heads, max_seq, head_dim]. Every request
  owns one slot; the extra slot is scratch for the padding rows of a CUDA-graph batch.
* `prefill(slot, embeds, start)`: writes a chunk of prompt embeddings (text and image alike) into a
  slot, starting at `start` so earlier turns' cache can be reused and long prompts chunked.
* `decode(slots, tokens, positions)`: one token for each of several slots at once (continuous
  batching: each row has its own slot and position).

On a GPU the per-layer pieces are compiled with torch.compile (norm, projections and rotary
embedding fuse), attention is the Triton kernel of `attention.py`, and every decode batch size is
captured once as a CUDA graph, so a decoding step costs one graph launch instead of hundreds of
kernel launches from Python. On the CPU the same functions run eagerly with SDPA attention.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from vlui.engine.attention import decode_attention, decode_attention_reference, triton_available


@dataclass
class FusedWeights:
    """q/k/v and gate/up weights concatenated, so one matmul reads each group (fewer, larger GEMVs).
    The original modules keep working: their weights become views into these tensors."""

    qkv: torch.Tensor
    gate_up: torch.Tensor
    split: tuple[int, int, int]


def fuse_layer(layer: nn.Module) -> FusedWeights | None:
    attn, mlp = layer.self_attn, layer.mlp
    linears = [attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj]
    # Quantized layers (bitsandbytes), biases or offloaded (meta) weights: keep the modules as they are.
    if any(type(m) is not nn.Linear or m.bias is not None or m.weight.device.type == "meta" for m in linears):
        return None
    with torch.no_grad():
        qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        split = (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features)
        offsets = [0, split[0], split[0] + split[1], sum(split)]
        for m, a, b in zip((attn.q_proj, attn.k_proj, attn.v_proj), offsets, offsets[1:]):
            m.weight = nn.Parameter(qkv[a:b], requires_grad=False)
        inter = mlp.gate_proj.out_features
        mlp.gate_proj.weight = nn.Parameter(gate_up[:inter], requires_grad=False)
        mlp.up_proj.weight = nn.Parameter(gate_up[inter:], requires_grad=False)
    return FusedWeights(qkv, gate_up, split)


def layer_head(layer, fused: FusedWeights | None, hidden, delta, cos, sin, k_cache, v_cache, slots, positions,
               head_dim: int, write_kv: bool = True):
    """Start of a decoder layer: add the previous layer's MLP output (deferred to here so the add fuses
    with this norm), norm, q/k/v projections, rotary embedding, and write k and v into the cache at
    ([B, T] index tensors) `slots`, `positions`. Returns hidden and q, k, v as [B, heads, T, D]."""
    if delta is not None:
        hidden = hidden + delta
    x = layer.input_layernorm(hidden)
    batch, length, _ = x.shape
    attn = layer.self_attn
    if fused is not None:
        q, k, v = F.linear(x, fused.qkv).split(fused.split, dim=-1)
    else:
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    q = q.view(batch, length, -1, head_dim).transpose(1, 2)
    k = k.view(batch, length, -1, head_dim).transpose(1, 2)
    v = v.view(batch, length, -1, head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    if write_kv:
        k_cache[slots, :, positions] = k.transpose(1, 2)
        v_cache[slots, :, positions] = v.transpose(1, 2)
    return hidden, q, k, v


def layer_tail(layer, fused: FusedWeights | None, hidden, attn_out):
    """Rest of the layer: output projection and residual, norm, MLP. attn_out [B, H, T, D].
    Returns (hidden, mlp_out); the next layer_head (or the final norm) adds mlp_out."""
    batch, heads, length, head_dim = attn_out.shape
    hidden = hidden + layer.self_attn.o_proj(attn_out.transpose(1, 2).reshape(batch, length, heads * head_dim))
    x = layer.post_attention_layernorm(hidden)
    mlp = layer.mlp
    if fused is not None:
        gate, up = F.linear(x, fused.gate_up).chunk(2, dim=-1)
        return hidden, mlp.down_proj(mlp.act_fn(gate) * up)
    return hidden, mlp(x)


def final_norm(norm, hidden, delta):
    return norm(hidden + delta)


def kv_bytes_per_token(config, element_size: int) -> int:
    """Bytes of KV cache one token takes: keys and values of every layer."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * element_size


class LlamaRunner:
    def __init__(self, decoder: nn.Module, lm_head: nn.Module, num_slots: int, max_seq_len: int, fuse: bool = True):
        config = decoder.config
        self.decoder = decoder
        self.lm_head = lm_head
        self.layers = list(decoder.layers)
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_slots = num_slots
        self.max_seq_len = max_seq_len
        self.scratch_slot = num_slots
        self.dtype = decoder.embed_tokens.weight.dtype
        self.device = decoder.embed_tokens.weight.device
        self.layer_devices = [next(layer.parameters()).device for layer in self.layers]
        self.multi_device = len({self.device, *self.layer_devices, lm_head.weight.device}) > 1
        shape = (num_slots + 1, self.num_kv_heads, max_seq_len, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=d) for d in self.layer_devices]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=d) for d in self.layer_devices]
        self.fused = [fuse_layer(layer) if fuse else None for layer in self.layers]
        self.use_triton = not self.multi_device and triton_available(self.device) and self.head_dim >= 16
        self._head = layer_head
        self._tail = layer_tail
        self._final = final_norm
        # Writing k/v inside the compiled head lets the write fuse with the rotary embedding; it can
        # be moved out (VLUI_KV_WRITE=eager) to compare.
        self._write_in_head = os.environ.get("VLUI_KV_WRITE", "compiled") != "eager"
        self._graphs: dict[int, tuple] = {}
        self._graph_sizes: list[int] = []

    @property
    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.decoder.config, self.k_cache[0].element_size())

    # -- prefill ------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, slot: int, embeds: torch.Tensor, start: int) -> torch.Tensor:
        """Run `embeds` [T, hidden] at positions start..start+T-1 of `slot`; return last logits [V]."""
        length = embeds.shape[0]
        if start + length > self.max_seq_len:
            raise ValueError(f"prefill past the cache: {start}+{length} > {self.max_seq_len}")
        hidden = embeds[None].to(self.device, self.dtype)
        positions = torch.arange(start, start + length, device=self.device)[None]
        slots = torch.full_like(positions, slot)
        causal = None
        if start > 0:  # attend to the reused prefix too: query i sees keys 0..start+i
            causal = torch.ones(length, start + length, dtype=torch.bool, device=self.device).tril(start)

        def attend(i, q, k, v):
            if start == 0:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            keys = self.k_cache[i][slot : slot + 1, :, : start + length]
            values = self.v_cache[i][slot : slot + 1, :, : start + length]
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=causal.to(q.device), enable_gqa=True)

        hidden = self._layers(hidden, positions, slots, attend, last_only=True)
        return self.lm_head(hidden)[0, -1]

    def _layers(self, hidden, positions, slots, attend, last_only: bool = False):
        """All decoder layers and the final norm. positions/slots [B, T]; attend(i, q, k, v) -> [B, H, T, D]."""
        cos, sin = self.decoder.rotary_emb(hidden, positions)
        index = {self.device: (slots, positions)}
        delta = None
        for i, layer in enumerate(self.layers):
            device = self.layer_devices[i]
            if device not in index:
                index[device] = (slots.to(device), positions.to(device))
            if self.multi_device:
                hidden, cos, sin = (t.to(device) for t in (hidden, cos, sin))
                delta = delta.to(device) if delta is not None else None
            k_cache, v_cache = self.k_cache[i], self.v_cache[i]
            hidden, q, k, v = self._head(layer, self.fused[i], hidden, delta, cos, sin, k_cache, v_cache,
                                         *index[device], self.head_dim, self._write_in_head)
            if not self._write_in_head:
                k_cache[index[device][0], :, index[device][1]] = k.transpose(1, 2)
                v_cache[index[device][0], :, index[device][1]] = v.transpose(1, 2)
            hidden, delta = self._tail(layer, self.fused[i], hidden, attend(i, q, k, v))
        if last_only:
            hidden, delta = hidden[:, -1:], delta[:, -1:]
        head_device = self.lm_head.weight.device
        return self._final(self.decoder.norm, hidden.to(head_device), delta.to(head_device))

    # -- decode -------------------------------------------------------------------------------
    def _decode_step(self, tokens, positions, slots, max_len: int | None = None):
        """One token for each row. tokens/positions/slots are [B] int64 tensors on the device."""
        hidden = self.decoder.embed_tokens(tokens)[:, None, :]
        rows = {self.device: (slots, positions + 1)}  # slot and length of each row, per device

        def attend(i, q, k, v):
            if q.device not in rows:
                rows[q.device] = tuple(t.to(q.device) for t in rows[self.device])
            row_slots, lengths = rows[q.device]
            if self.use_triton:
                out = decode_attention(q[:, :, 0], self.k_cache[i], self.v_cache[i], row_slots, lengths)
            else:
                out = decode_attention_reference(q[:, :, 0], self.k_cache[i], self.v_cache[i], row_slots,
                                                 lengths, max_len)
            return out[:, :, None]

        hidden = self._layers(hidden, positions[:, None], slots[:, None], attend)
        return self.lm_head(hidden[:, 0])

    @torch.inference_mode()
    def decode(self, slots: list[int], tokens: list[int] | torch.Tensor, positions: list[int]) -> torch.Tensor:
        """Logits [B, V] for the next token of each row. `tokens` may be a device tensor (the ids just
        sampled), so consecutive steps need no round trip through the host."""
        batch = len(slots)
        on_device = isinstance(tokens, torch.Tensor)
        at = bisect.bisect_left(self._graph_sizes, batch)
        if at < len(self._graph_sizes):
            size = self._graph_sizes[at]
            graph, inputs, logits = self._graphs[size]
            pad = size - batch
            rows = [positions + [0] * pad, slots + [self.scratch_slot] * pad]
            if on_device:
                inputs[0, :batch].copy_(tokens)
                inputs[1:].copy_(torch.tensor(rows, dtype=torch.long), non_blocking=True)
            else:
                inputs.copy_(torch.tensor([tokens + [0] * pad, *rows], dtype=torch.long), non_blocking=True)
            graph.replay()
            return logits[:batch]
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)  # noqa: E731
        tokens = tokens.to(self.device) if on_device else as_tensor(tokens)
        return self._decode_step(tokens, as_tensor(positions), as_tensor(slots), max(positions) + 1)

    # -- GPU warm-up --------------------------------------------------------------------------
    def compile(self) -> None:
        """Compile the per-layer pieces (once for all layers: they share code and shapes)."""
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self._head = torch.compile(layer_head, dynamic=True)
        self._tail = torch.compile(layer_tail, dynamic=True)
        self._final = torch.compile(final_norm, dynamic=True)

    @torch.inference_mode()
    def capture_cuda_graphs(self, batch_sizes: list[int], progress=None) -> None:
        """Record one CUDA graph per decode batch size (largest first, sharing one memory pool)."""
        if self.device.type != "cuda" or self.multi_device or not self.use_triton:
            return
        pool = torch.cuda.graph_pool_handle()
        sizes = sorted(set(batch_sizes), reverse=True)
        for n, size in enumerate(sizes):
            if progress:
                progress(n, len(sizes), f"capturing decode graph for batch {size}")
            inputs = torch.zeros(3, size, dtype=torch.long, device=self.device)
            inputs[2].fill_(self.scratch_slot)
            tokens, positions, slots = inputs[0], inputs[1], inputs[2]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up runs compile and autotune outside the capture
                for _ in range(3):
                    self._decode_step(tokens, positions, slots)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._decode_step(tokens, positions, slots)
            self._graphs[size] = (graph, inputs, logits)
        self._graph_sizes = sorted(self._graphs)
        torch.cuda.synchronize()


class GraphedFunction:
    """`fn(x)` recorded once as a CUDA graph for one input shape (an image's pixels): replaying it
    costs one launch instead of one per kernel. Other shapes run `fn` eagerly."""

    def __init__(self, fn, example: torch.Tensor):
        self.fn = fn
        self.static_in = example.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):
                fn(self.static_in)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.static_out = fn(self.static_in)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape != self.static_in.shape:
            return self.fn(x)
        self.static_in.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.static_out.clone()
