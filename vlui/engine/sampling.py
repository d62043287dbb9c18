"""Per-request sampling settings and a batched sampler.

Every row of a decoding batch can belong to a different user with different settings, so
temperature, top-p and repetition penalty are tensors with one value per row. Sampling uses the
exponential-race trick (argmax of p / Exp(1) noise equals a draw from p) so it needs no host sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 means greedy decoding
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)

    def validate(self) -> "SamplingParams":
        """Raise ValueError with a sentence naming the bad setting."""
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            raise ValueError(f"max new tokens must be a whole number of at least 1 (got {self.max_new_tokens!r}).")
        if not 0.0 <= float(self.temperature) <= 5.0:
            raise ValueError(f"temperature must be between 0 and 5 (got {self.temperature!r}); 0 means greedy.")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise ValueError(f"top-p must be greater than 0 and at most 1 (got {self.top_p!r}).")
        if not 1.0 <= float(self.repetition_penalty) <= 3.0:
            raise ValueError(f"repetition penalty must be between 1 and 3 (got {self.repetition_penalty!r}).")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Hugging Face semantics: divide positive logits of seen tokens by the penalty, multiply negative ones.

    logits [B, V] float; seen [B, V] bool (tokens of the prompt and the answer so far); penalty [B].
    """
    p = penalty[:, None]
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalised, logits)


def top_p_filter(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero out the tail of each row beyond cumulative probability top_p (always keeps the top token)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before > top_p[:, None], 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    repetition_penalty: torch.Tensor | None = None,
    seen: torch.Tensor | None = None,
    use_top_p: bool = True,
) -> torch.Tensor:
    """Pick one token per row. Rows with temperature 0 take the argmax (greedy)."""
    logits = logits.float()
    if repetition_penalty is not None and seen is not None:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    greedy_ids = logits.argmax(dim=-1)
    temp = temperature.clamp_min(1e-5)[:, None]
    probs = torch.softmax(logits / temp, dim=-1)
    if use_top_p:
        probs = top_p_filter(probs, top_p)
    noise = torch.empty_like(probs).exponential_(1.0)
    sampled_ids = (probs / noise).argmax(dim=-1)
    return torch.where(temperature == 0, greedy_ids, sampled_ids)
