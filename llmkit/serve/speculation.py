"""Speculative decoding inside the serving engine: prompt lookup or a draft model proposes, one batched forward
verifies.

Offline speculative decoding (llmkit.generate.speculative, Leviathan et al. 2023; Chen et al. 2023) decodes a fixed
batch; here the rows are the engine's running requests, each with its own sampling settings and generator. In a
decode step, each request that can speculate proposes up to k tokens, and the engine runs ONE forward of
[pending token, x_1..x_c] per row (rows padded to the step's widest proposal), so it gets p_0..p_c per row. The
proposer is one of the offline ones (llmkit.generate.proposers):

- `NgramProposer` (`speculate="ngram"`, Saxena 2023): the tokens that followed the row's last 3 tokens earlier in its
  own prompt + output; deterministic, q one-hot.
- `DraftProposer` (`draft=model`): a smaller model with the target's vocabulary draws x_j ~ q_j with the request's
  own temperature / top-k / top-p and generator. Its KV cache has one row per engine slot that follows the slot
  (`SlotTable.follow`, llmkit/serve/kv.py): it prefills each request's prompt chunk by chunk after the target, is cut
  back to the accepted tokens after each verification, and is cut or copied with the slot when prefix caching hands
  a slot's tokens to another request.

Then, per row, with the offline code's rule (`accept_greedy` / `accept_sampled`):

    greedy:    accept x_j while x_j = argmax p_{j-1}; emit the argmax after them (output identical to plain decoding)
    sampling:  accept x_j with probability min(1, p_{j-1}(x_j) / q_j(x_j)); at the first rejection draw from
               norm(max(0, p_{j-1} - q_j)), after a full accept draw a bonus from p_c

where p is the request's own temperature / top-k / top-p applied to the raw logits. A request whose next token
depends on more than those (a JSON / grammar constraint, log-probs, repetition or presence/frequency penalties:
state `ActiveRequest.choose` updates token by token) proposes nothing and decodes one token as without speculation;
so does, with a draft, a request whose prompt + max_new_tokens + k does not fit the draft's context (the draft never
sees it; it is served, one token per step).

KV: the slots of rejected proposals hold keys/values no token list refers to; the next forward writes over them
(slot = position), so `Slot.tokens` stays exactly what the row's cache holds.
"""

from __future__ import annotations

import torch

from llmkit.errors import LlmkitError
from llmkit.generate.proposers import DraftProposer, NgramProposer, TokenDraw
from llmkit.generate.sampling import process_logits
from llmkit.generate.speculative import accept_greedy, accept_sampled, check_speculative_tokens
from llmkit.serve.active import ActiveRequest

SPECULATION_METHODS = ("ngram",)


def check_speculation(speculate: str | None, num_speculative_tokens: int, draft: object = None) -> None:
    """Raise `LlmkitError` for an unknown method, a draft given with a method, or a k (tokens proposed per step)
    that is not an integer >= 1."""
    if speculate is not None and speculate not in SPECULATION_METHODS:
        raise LlmkitError(f"--speculate {speculate!r} is unknown; use 'ngram' (prompt lookup) or leave it out")
    if speculate is not None and draft is not None:
        raise LlmkitError("--draft and --speculate ngram are two ways to propose tokens; pass one of them")
    check_speculative_tokens(num_speculative_tokens, "--num_speculative_tokens")


def request_draw(seqs: list[ActiveRequest]) -> TokenDraw:
    """Each row's proposed token drawn with its request's own settings and generator: the argmax for a greedy
    request, else a draw from q = softmax(temperature / top-k / top-p of the draft's logits). q's rows of greedy
    requests stay zero (their verification never reads q)."""

    def draw(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens = logits.argmax(dim=-1)  # (A,)
        q = None
        for index, seq in enumerate(seqs):
            settings = seq.request.sampling
            if settings.greedy:
                continue
            if q is None:
                q = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)  # (A, V)
            q[index] = process_logits(logits[index : index + 1], settings).softmax(dim=-1)[0]
            tokens[index] = torch.multinomial(q[index], 1, generator=seq.generator)[0]
        return tokens, q

    return draw


class Speculator:
    """Proposes for the engine's decoding rows and verifies one row's logits; counts what it proposed and accepted.
    With `draft` (a decoder with `target`'s vocabulary, on its device) a draft model proposes, else `method`."""

    def __init__(self, method: str | None = "ngram", num_speculative_tokens: int = 5,
                 draft: torch.nn.Module | None = None, target: torch.nn.Module | None = None) -> None:
        check_speculation(method, num_speculative_tokens, draft)
        self.k = num_speculative_tokens
        self.proposer = NgramProposer() if draft is None else DraftProposer(draft, target)
        self.proposed = 0  # tokens sent to the target for checking
        self.accepted = 0  # of those, the ones it accepted
        self.drafts = 0  # rows that proposed at least one token in a step

    @property
    def draft(self) -> DraftProposer | None:
        """The draft model's proposer (its cache follows the engine's slots), or None for prompt lookup."""
        return self.proposer if isinstance(self.proposer, DraftProposer) else None

    def proposes_for(self, seq: ActiveRequest) -> bool:
        """Whether this request speculates: its tokens depend only on the logits and, with a draft, its prompt +
        max_new_tokens + the k proposed past them fit the draft's context."""
        if not seq.can_speculate:
            return False
        needed = len(seq.request.prompt_ids) + seq.request.max_new_tokens + self.k
        return self.draft is None or needed <= self.draft.context

    def prefilled(self, seq: ActiveRequest) -> None:
        """After a prefill chunk of the target: the draft feeds the same prompt tokens into the request's row."""
        if self.draft is not None and self.proposes_for(seq):
            row = seq.slot.row
            self.draft.catch_up([row], {row: seq.request.prompt_ids[: seq.prefilled]})

    def propose(self, seqs: list[ActiveRequest], capacity: int) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        """Each decoding request's proposal: at most k tokens, one fewer than it may still generate (the step
        always adds a token after them), and no further than every row's cache row holds once the step's rows are
        padded to the widest proposal ([] for a request that cannot speculate); with each its q (c, V), the draft's
        distributions (None: one-hot, or greedy)."""
        room = capacity - 1 - max(len(seq.slot.tokens) for seq in seqs)  # widest proposal all rows can take
        counts = [min(self.k, seq.request.max_new_tokens - seq.generated - 1, room) if self.proposes_for(seq) else 0
                  for seq in seqs]
        if self.draft is None:
            return [self.proposer.lookup(seq.slot.tokens + [seq.pending], count) if count > 0 else []
                    for seq, count in zip(seqs, counts)], [None] * len(seqs)
        proposals: list[list[int]] = [[] for _ in seqs]
        qs: list[torch.Tensor | None] = [None] * len(seqs)
        drafting = [index for index, count in enumerate(counts) if count > 0]
        if not drafting:
            return proposals, qs
        rows = [seqs[index].slot.row for index in drafting]  # slot order (the engine sorts `seqs`): one slice if a run
        sequences = {seqs[index].slot.row: seqs[index].slot.tokens + [seqs[index].pending] for index in drafting}
        drafted, q = self.draft.draft_tokens(rows, sequences, [counts[index] for index in drafting],
                                             request_draw([seqs[index] for index in drafting]))  # q (A, k, V)
        for position, (index, proposal) in enumerate(zip(drafting, drafted)):
            proposals[index] = proposal
            qs[index] = None if q is None else q[position, : len(proposal)]
        return proposals, qs

    def verify(self, seq: ActiveRequest, logits: torch.Tensor, proposal: list[int],
               q: torch.Tensor | None = None) -> list[int]:
        """The tokens one row emits this step: its accepted proposal prefix and the token after it. `logits`
        (c + 1, V) are the raw logits after the pending token and after each proposed token; `q` (c, V) the
        draft's distributions of the proposed tokens (None: a deterministic proposer)."""
        ids = torch.tensor([proposal], device=logits.device)  # (1, c)
        lengths = torch.tensor([len(proposal)], device=logits.device)  # (1,)
        settings = seq.request.sampling
        rows = logits[: len(proposal) + 1].float()[None]  # (1, c + 1, V)
        if settings.greedy:
            n_accepted, token = accept_greedy(rows, ids, lengths)
        else:
            p = process_logits(rows[0], settings).softmax(dim=-1)[None]  # (1, c + 1, V)
            n_accepted, token = accept_sampled(p, ids, lengths, None if q is None else q[None], seq.generator)
        accepted = int(n_accepted[0])
        self.proposed += len(proposal)
        self.accepted += accepted
        self.drafts += 1
        return proposal[:accepted] + [int(token[0])]

    def keep(self, seq: ActiveRequest) -> None:
        """After a verified step: the draft's row keeps only the keys/values of the slot's tokens (the accepted
        ones); what it stored for rejected proposals is written over later."""
        self.proposer.keep(seq.slot.row, len(seq.slot.tokens))
