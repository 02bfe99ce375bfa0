"""Speculative decoding inside the serving engine: n-gram prompt lookup proposes, one batched forward verifies.

Offline speculative decoding (llmkit.generate.speculative, Leviathan et al. 2023; Chen et al. 2023) decodes a fixed
batch; here the rows are the engine's running requests, each with its own sampling settings and generator. In a
decode step, each request that can speculate proposes up to k tokens by prompt lookup over its own tokens (prompt +
output so far; llmkit.generate.proposers.NgramProposer, Saxena 2023), and the engine runs ONE forward of
[pending token, x_1..x_c] per row (rows padded to the step's widest proposal), so it gets p_0..p_c per row. Then,
per row, with the offline code's rule (`accept_greedy` / `accept_sampled`):

    greedy:    accept x_j while x_j = argmax p_{j-1}; emit the argmax after them (output identical to plain decoding)
    sampling:  accept x_j with probability p_{j-1}(x_j) (q is one-hot: the proposer is deterministic); at the first
               rejection draw from p_{j-1} without x_j, after a full accept draw a bonus from p_c

where p is the request's own temperature / top-k / top-p applied to the raw logits. A request whose next token
depends on more than those (a JSON / grammar constraint, log-probs, repetition or presence/frequency penalties:
state `ActiveRequest.choose` updates token by token) proposes nothing and decodes one token as without speculation.

KV: the slots of rejected proposals hold keys/values no token list refers to; the next forward writes over them
(slot = position), so `Slot.tokens` stays exactly what the row's cache holds.
"""

from __future__ import annotations

import torch

from llmkit.errors import LlmkitError
from llmkit.generate.proposers import NgramProposer
from llmkit.generate.sampling import process_logits
from llmkit.generate.speculative import accept_greedy, accept_sampled, check_speculative_tokens
from llmkit.serve.active import ActiveRequest

SPECULATION_METHODS = ("ngram",)


def check_speculation(speculate: str | None, num_speculative_tokens: int) -> None:
    """Raise `LlmkitError` for an unknown method or a k (tokens proposed per step) that is not an integer >= 1."""
    if speculate is not None and speculate not in SPECULATION_METHODS:
        raise LlmkitError(f"--speculate {speculate!r} is unknown; use 'ngram' (prompt lookup) or leave it out")
    check_speculative_tokens(num_speculative_tokens, "--num_speculative_tokens")


class Speculator:
    """Proposes for the engine's decoding rows and verifies one row's logits; counts what it proposed and accepted."""

    def __init__(self, method: str = "ngram", num_speculative_tokens: int = 5) -> None:
        check_speculation(method, num_speculative_tokens)
        self.k = num_speculative_tokens
        self.proposer = NgramProposer()
        self.proposed = 0  # tokens sent to the target for checking
        self.accepted = 0  # of those, the ones it accepted
        self.drafts = 0  # rows that proposed at least one token in a step

    def propose(self, seqs: list[ActiveRequest], capacity: int) -> list[list[int]]:
        """Each decoding request's proposal: at most k tokens, one fewer than it may still generate (the step
        always adds a token after them), and no further than every row's cache row holds once the step's rows are
        padded to the widest proposal ([] for a request that cannot speculate)."""
        room = capacity - 1 - max(len(seq.slot.tokens) for seq in seqs)  # widest proposal all rows can take
        proposals = []
        for seq in seqs:
            count = min(self.k, seq.request.max_new_tokens - seq.generated - 1, room)
            exact = seq.can_speculate and count > 0
            proposals.append(self.proposer.lookup(seq.slot.tokens + [seq.pending], count) if exact else [])
        return proposals

    def verify(self, seq: ActiveRequest, logits: torch.Tensor, proposal: list[int]) -> list[int]:
        """The tokens one row emits this step: its accepted proposal prefix and the token after it. `logits`
        (c + 1, V) are the raw logits after the pending token and after each proposed token."""
        ids = torch.tensor([proposal], device=logits.device)  # (1, c)
        lengths = torch.tensor([len(proposal)], device=logits.device)  # (1,)
        settings = seq.request.sampling
        rows = logits[: len(proposal) + 1].float()[None]  # (1, c + 1, V)
        if settings.greedy:
            n_accepted, token = accept_greedy(rows, ids, lengths)
        else:
            p = process_logits(rows[0], settings).softmax(dim=-1)[None]  # (1, c + 1, V)
            n_accepted, token = accept_sampled(p, ids, lengths, None, seq.generator)
        accepted = int(n_accepted[0])
        self.proposed += len(proposal)
        self.accepted += accepted
        self.drafts += 1
        return proposal[:accepted] + [int(token[0])]
