"""One running request inside the engine: where its prompt prefill stands, and how its next token is chosen from
its row of logits with its own sampling settings, generator, penalties, log-probs and constraint.

Order of the logit processors, per request, on the raw logits z (V,):
    logprobs:  log_softmax(z) (what the model says, before anything below)
    OpenAI:    z[t] -= presence * (count[t] > 0) + frequency * count[t]   (counts over the generated tokens)
    CTRL:      repetition penalty over prompt and generated tokens (llmkit.generate.sampling)
    then the constraint's `pick`, or temperature -> top-k -> top-p -> draw (argmax at temperature 0), as
    `llmkit.generate.sample_next` does, so a request alone gives `generate_tokens`' tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmkit.generate.sampling import apply_repetition_penalty, make_generator, sample_next, seen_tokens
from llmkit.serve.kv import Slot
from llmkit.serve.request import Request, RequestHandle, TokenEvent


def apply_openai_penalties(logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's presence/frequency penalties: logits (V,) - presence * (counts > 0) - frequency * counts."""
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts.to(logits.dtype)


@dataclass
class ActiveRequest:
    """A request the engine admitted: its slot, prefill progress, the token waiting to be fed, and its sampling state."""

    request: Request
    handle: RequestHandle
    slot: Slot
    prefilled: int  # prompt tokens whose keys/values are in the slot
    reserved: int  # KV tokens counted against the budget: prompt + max_new_tokens
    device: torch.device
    vocab_size: int
    pending: int | None = None  # the last sampled token, fed at the next decode step
    generated: int = 0

    def __post_init__(self) -> None:
        settings = self.request.sampling
        self.generator = make_generator(settings, self.device)
        self.seen = None  # (1, V) for the repetition penalty: prompt and output tokens
        if settings.repetition_penalty != 1.0:
            self.seen = seen_tokens(torch.tensor([self.request.prompt_ids], device=self.device), self.vocab_size)
        self.counts = None  # (V,) generated-token counts for OpenAI's penalties
        if self.request.presence_penalty or self.request.frequency_penalty:
            self.counts = torch.zeros(self.vocab_size, device=self.device)

    @property
    def prefilling(self) -> bool:
        return self.pending is None

    @property
    def plain_greedy(self) -> bool:
        """argmax of the raw logits picks this request's token: no processor, no log-probs, no constraint."""
        request = self.request
        return (request.sampling.greedy and self.seen is None and self.counts is None and request.logprobs is None
                and request.constraint is None)

    @property
    def can_speculate(self) -> bool:
        """Its tokens depend only on the logits and its temperature / top-k / top-p, so a speculative step can verify
        several at once (llmkit/serve/speculation.py): no constraint, log-probs or penalties, whose state moves with
        each token."""
        request = self.request
        return request.constraint is None and request.logprobs is None and self.seen is None and self.counts is None

    def choose(self, logits: torch.Tensor) -> TokenEvent:
        """The next token from this request's raw logits (V,), as an event without a finish reason; records it."""
        request = self.request
        logits = logits.float()
        event = TokenEvent(None)
        penalized = logits
        if self.counts is not None:
            penalized = apply_openai_penalties(penalized, self.counts, request.presence_penalty,
                                               request.frequency_penalty)
        if self.seen is not None:
            penalized = apply_repetition_penalty(penalized[None], self.seen, request.sampling.repetition_penalty)[0]
        if request.constraint is not None:
            token = int(request.constraint.pick(penalized, request.sampling, self.generator))
        else:
            token = int(sample_next(penalized[None], request.sampling, self.generator)[0])
        event.token_id = token
        if request.logprobs is not None:
            log_probs = logits.log_softmax(-1)
            event.logprob = float(log_probs[token])
            if request.logprobs > 0:
                top = log_probs.topk(request.logprobs)
                event.top_logprobs = list(zip(top.indices.tolist(), top.values.tolist()))
        self.record(token)
        return event

    def record(self, token: int) -> None:
        """Count a generated token for the penalties and the constraint."""
        self.generated += 1
        if self.seen is not None:
            self.seen[0, token] = True
        if self.counts is not None:
            self.counts[token] += 1
        if self.request.constraint is not None and token not in self.request.stop_ids:
            self.request.constraint.advance(token)

    def finish_reason(self, token: int) -> str | None:
        """Why the request ends after `token`, or None to go on."""
        if token in self.request.stop_ids:
            return "stop"
        if self.request.constraint is not None and self.request.constraint.complete:
            return "stop"
        if self.generated >= self.request.max_new_tokens:
            return "length"
        return None
