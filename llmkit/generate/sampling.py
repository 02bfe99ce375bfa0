"""Choosing the next token from logits: greedy, temperature, top-k, top-p and repetition penalty.

Each processor is a small function over float logits (B, V) returning new logits, applied in the
order `transformers` uses: repetition penalty -> temperature -> top-k -> top-p, then
p = softmax(logits) and one draw from p (torch.multinomial), or argmax when temperature is 0.

- temperature T: logits / T; T < 1 sharpens the distribution, T > 1 flattens it.
- top-k (Fan et al. 2018): keep the k largest logits, set the rest to -inf.
- top-p / nucleus (Holtzman et al. 2019): keep the smallest set of tokens whose probabilities
  sum to at least p (always at least one token).
- repetition penalty (CTRL, Keskar et al. 2019): for tokens already seen, logit / r when the
  logit is positive and logit * r when negative, so r > 1 makes repeats less likely.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llmkit.errors import LlmkitError


@dataclass
class SamplingSettings:
    """How the next token is chosen. temperature=0 is greedy (argmax); `seed` makes sampling reproducible."""

    temperature: float = 0.0  # 0 = greedy; > 0 samples from softmax(logits / temperature)
    top_k: int | None = None  # keep only the k most likely tokens (None = off)
    top_p: float | None = None  # keep the smallest set of tokens with probability mass >= top_p (None = off)
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output (1 = off)
    seed: int | None = None  # seeds a torch.Generator for sampling (None = torch's global generator)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `LlmkitError` naming the setting and the fix for an impossible value."""
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)) or self.temperature < 0:
            raise LlmkitError(
                f"sampling setting temperature={self.temperature!r} must be a finite number >= 0; "
                "use 0 for greedy decoding or e.g. 0.7 to sample"
            )
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1):
            raise LlmkitError(
                f"sampling setting top_k={self.top_k!r} must be an integer >= 1; use e.g. 50, or None to turn top-k off"
            )
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise LlmkitError(
                f"sampling setting top_p={self.top_p!r} must be in (0, 1]; use e.g. 0.9, or None to turn top-p off"
            )
        penalty = self.repetition_penalty
        if not (isinstance(penalty, (int, float)) and math.isfinite(penalty)) or penalty <= 0:
            raise LlmkitError(
                f"sampling setting repetition_penalty={penalty!r} must be a finite number > 0; "
                "use 1.0 for no penalty or e.g. 1.2 to discourage repeats"
            )
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise LlmkitError(f"sampling setting seed={self.seed!r} must be an integer or None")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature (temperature > 0)."""
    return logits / temperature


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf (ties with the k-th are kept)."""
    top_k = min(top_k, logits.shape[-1])
    kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: drop the least likely tokens whose total probability is <= 1 - top_p; keep at least one."""
    sorted_logits, sorted_indices = torch.sort(logits, dim=-1, descending=False)  # (B, V) least likely first
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1:] = False  # the most likely token always stays
    remove = remove_sorted.scatter(-1, sorted_indices, remove_sorted)  # back to vocabulary order
    return logits.masked_fill(remove, float("-inf"))


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL penalty on tokens marked in `seen` (bool, B x V): positive logits / penalty, negative * penalty."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def seen_tokens(token_ids: torch.Tensor, vocab_size: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Bool (B, V) marking which ids occur in each row of `token_ids` (B, T); `mask` (B, T) 0 = ignore (padding)."""
    seen = torch.zeros(token_ids.shape[0], vocab_size + 1, dtype=torch.bool, device=token_ids.device)
    if mask is not None:
        # Padding is sent to an extra column that is dropped, so it never counts as seen.
        token_ids = token_ids.masked_fill(~mask.bool(), vocab_size)
    seen.scatter_(1, token_ids, True)
    return seen[:, :vocab_size]


def process_logits(logits: torch.Tensor, settings: SamplingSettings, seen: torch.Tensor | None = None) -> torch.Tensor:
    """All processors `settings` turns on, in transformers' order; float32 logits (B, V) out."""
    logits = logits.float()
    if settings.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, settings.repetition_penalty)
    if settings.greedy:
        return logits
    if settings.temperature != 1.0:
        logits = apply_temperature(logits, settings.temperature)
    if settings.top_k is not None:
        logits = apply_top_k(logits, settings.top_k)
    if settings.top_p is not None and settings.top_p < 1.0:
        logits = apply_top_p(logits, settings.top_p)
    return logits


def make_generator(settings: SamplingSettings, device: torch.device | str) -> torch.Generator | None:
    """A torch.Generator seeded from `settings.seed` on `device`, or None (global RNG) without a seed."""
    if settings.seed is None or settings.greedy:
        return None
    return torch.Generator(device=device).manual_seed(settings.seed)


def sample_next(
    logits: torch.Tensor,
    settings: SamplingSettings,
    generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V): argmax when temperature == 0, else one multinomial draw.

    `seen` (bool, B x V) marks tokens the repetition penalty applies to.
    """
    if settings.greedy and (settings.repetition_penalty == 1.0 or seen is None):
        return logits.argmax(dim=-1)  # fast path: no processor changes the argmax
    logits = process_logits(logits, settings, seen)
    if settings.greedy:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
