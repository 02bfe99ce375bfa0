"""Constitutional AI, preference stage (RLAIF): the model itself labels which of two replies better follows a
principle, and the labels become preference pairs for a reward model or DPO (Bai et al. 2022, section 4).

For a conversation x and two replies y_1, y_2 (two samples of the model, seeded), a principle c is drawn and the
model is asked a multiple-choice question in its chat template, the assistant turn started for it:

    user:      <x> ... (A) <y_1> ... (B) <y_2> ... <c's comparison question> ...
    assistant: The better reply is

The answer is read from the log-probabilities of the option tokens, not from generated text (as in the paper):
with l_A = log p(" (A)" | question), l_B = log p(" (B)" | question) (each summed over its tokens),

    P(A) = exp(l_A) / (exp(l_A) + exp(l_B)) = sigmoid(l_A - l_B).

A model may favour a position whatever the content. With position averaging the question is also asked with the
replies swapped, P'(A) of that order, and P(y_1 better) = (P(A) + 1 - P'(A)) / 2, which is exactly the complement
of the same figure computed with the pair swapped. The position bias is the mean of (P(A) + P'(A)) / 2: 0.5 for an
unbiased judge, 1.0 for one that always answers (A).

Rows (`{"prompt", "chosen", "rejected"}` as llmkit.align.preference reads them, so `llmkit reward train --data` and
`llmkit dpo --data` take the file) carry `preference` = P(chosen better) >= 0.5, the principle and both orders'
P(A). The prompt is the model's chat-template prompt, so prompt + reply is exactly the text the model wrote.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmkit.align.constitution import (
    INDEX,
    GenerationSettings,
    Principle,
    RunCounts,
    append_rows,
    chat_prompt,
    pending_chunks,
    resume_index,
    write_replies,
)
from llmkit.align.ppo import response_logps_of
from llmkit.align.preference import ASSISTANT_MARKER, PreferencePair
from llmkit.align.rollout import batch_tensors
from llmkit.align.runs import pad_id_of
from llmkit.tokenizer import Tokenizer

OPTIONS = (" (A)", " (B)")  # appended to ANSWER_LEAD; their log-probs are the answer
ANSWER_LEAD = "The better reply is"
HUMAN_MARKER = "\n\nHuman:"


@dataclass(frozen=True)
class Judgement:
    """The AI label of one pair (first, second): P(A) with the pair in order, with it swapped (None when position
    averaging is off), and the resulting P(first is better)."""

    p_a: float
    p_a_swapped: float | None
    p_first: float


def comparison_question(conversation: str, reply_a: str, reply_b: str, principle: Principle) -> str:
    """The multiple-choice question (the user turn) asking which reply follows `principle` better."""
    return ("Below is a conversation between a person and an AI assistant, then two possible next replies from the "
            f"assistant.\n\nConversation:\n{conversation.strip()}\n\n(A) {reply_a.strip()}\n\n(B) {reply_b.strip()}"
            f"\n\n{principle.comparison} Answer (A) or (B).")


def question_prompt(tokenizer: Tokenizer, question: str) -> str:
    """The question in the model's chat template with the assistant's answer begun (ANSWER_LEAD)."""
    return chat_prompt(tokenizer, [{"role": "user", "content": question}]) + ANSWER_LEAD


@torch.no_grad()
def option_logps(model: torch.nn.Module, tokenizer: Tokenizer, prompts: Sequence[str], batch_size: int = 8
                 ) -> torch.Tensor:
    """(N, 2): log p(option | prompt) for OPTIONS[0] and OPTIONS[1] after each prompt text, summed over the option's
    tokens (prompt and option tokenized apart, as preference pairs are)."""
    options = [tokenizer.encode(option, add_bos=False) for option in OPTIONS]
    sequences = [(tokenizer.encode(prompt), option) for prompt in prompts for option in options]
    device = next(model.parameters()).device
    sums = []
    for start in range(0, len(sequences), 2 * batch_size):
        part = sequences[start:start + 2 * batch_size]
        ids, attention, mask, prompt_len = batch_tensors([p for p, _ in part], [o for _, o in part],
                                                         pad_id_of(tokenizer), device)
        logps = response_logps_of(model, ids, attention, prompt_len)  # (rows, L) per option token
        sums.append((logps.float() * mask).sum(dim=1).cpu())
    return torch.cat(sums).view(len(prompts), len(OPTIONS)).double()


def choice_probability(logps: torch.Tensor) -> torch.Tensor:
    """(N,) P(first option) = softmax over the two options' log-probs (N, 2)."""
    return torch.softmax(logps, dim=-1)[:, 0]


def judge(model: torch.nn.Module, tokenizer: Tokenizer, conversations: Sequence[str], firsts: Sequence[str],
          seconds: Sequence[str], principles: Sequence[Principle], position_average: bool = True,
          batch_size: int = 8) -> list[Judgement]:
    """The AI label of each pair (first, second) under its principle; with `position_average`, asked both ways."""
    items = list(zip(conversations, firsts, seconds, principles, strict=True))
    if not items:
        return []
    in_order = [question_prompt(tokenizer, comparison_question(x, a, b, c)) for x, a, b, c in items]
    p_a = choice_probability(option_logps(model, tokenizer, in_order, batch_size)).tolist()
    if not position_average:
        return [Judgement(p, None, p) for p in p_a]
    swapped = [question_prompt(tokenizer, comparison_question(x, b, a, c)) for x, a, b, c in items]
    p_swapped = choice_probability(option_logps(model, tokenizer, swapped, batch_size)).tolist()
    return [Judgement(p, q, (p + 1 - q) / 2) for p, q in zip(p_a, p_swapped, strict=True)]


def principle_for(principles: Sequence[Principle], index: int, seed: int) -> Principle:
    """The principle item `index` is judged under: seeded by (seed, index), independent of batching."""
    return random.Random(f"rlaif:{seed}:{index}").choice(list(principles))


# ---- labelling the model's own samples -------------------------------------------------------------------------------


def label_chunk(model: torch.nn.Module, tokenizer: Tokenizer, prompts: Sequence[str], first_index: int,
                principles: Sequence[Principle], settings: GenerationSettings, chunk: int, position_average: bool,
                batch_size: int, progress: Callable[[str], None] | None = None) -> list[dict[str, Any] | None]:
    """Two sampled replies per prompt, labelled by the model: one preference row each (None where the two replies
    are the same text or one is empty: such a pair teaches nothing, and the preference reader refuses it)."""
    asks = [[{"role": "user", "content": prompt}] for prompt in prompts for _ in range(2)]
    replies = write_replies(model, tokenizer, asks, settings, chunk, 0)  # rows 2k, 2k + 1: prompt k's two samples
    if progress:
        progress(f"RLAIF prompts {first_index + 1}-{first_index + len(prompts)}: two replies each sampled")
    usable = [k for k in range(len(prompts)) if replies[2 * k] and replies[2 * k + 1]
              and replies[2 * k] != replies[2 * k + 1]]
    chosen_principles = [principle_for(principles, first_index + k, settings.seed) for k in usable]
    judgements = judge(model, tokenizer, [f"Human: {prompts[k]}" for k in usable], [replies[2 * k] for k in usable],
                       [replies[2 * k + 1] for k in usable], chosen_principles, position_average, batch_size)
    rows: list[dict[str, Any] | None] = [None] * len(prompts)
    for k, principle, verdict in zip(usable, chosen_principles, judgements, strict=True):
        first_wins = verdict.p_first >= 0.5
        chosen, rejected = (replies[2 * k], replies[2 * k + 1]) if first_wins else (replies[2 * k + 1], replies[2 * k])
        rows[k] = {INDEX: first_index + k, "prompt": chat_prompt(tokenizer, asks[2 * k]), "chosen": chosen,
                   "rejected": rejected, "preference": max(verdict.p_first, 1 - verdict.p_first),
                   "principle": principle.name, "p_a": verdict.p_a, "p_a_swapped": verdict.p_a_swapped}
    return rows


def run_rlaif(model: torch.nn.Module, tokenizer: Tokenizer, prompts: Sequence[str], principles: Sequence[Principle],
              settings: GenerationSettings, output: str | Path, limit: int | None = None, batch_size: int = 8,
              position_average: bool = True, progress: Callable[[str], None] | None = None) -> RunCounts:
    """RLAIF labels for prompts [0, limit), appended to `output`, resuming after its last row (fixed chunks, as
    llmkit.align.constitution.run_sl_cai)."""
    stop = len(prompts) if limit is None else min(limit, len(prompts))
    counts = RunCounts(resumed_from=resume_index(output))
    for first, end in pending_chunks(len(prompts), counts.resumed_from, stop, batch_size):
        rows = label_chunk(model, tokenizer, prompts[first:end], first, principles, settings, first // batch_size,
                           position_average, batch_size, progress)
        wanted = range(max(first, counts.resumed_from) - first, min(end, stop) - first)
        kept = [rows[k] for k in wanted if rows[k] is not None]
        counts.skipped += len(wanted) - len(kept)
        append_rows(output, kept)
        counts.written += len(kept)
        if progress:
            progress(f"RLAIF: prompts {min(end, stop)}/{stop} ({counts.written} pairs written)")
    return counts


def position_bias(rows: Sequence[Mapping[str, Any]]) -> float | None:
    """Mean P(A) over both orders of every row asked both ways (0.5: no preference for a position)."""
    values = [(row["p_a"] + row["p_a_swapped"]) / 2 for row in rows if row.get("p_a_swapped") is not None]
    return sum(values) / len(values) if values else None


# ---- agreement with human labels -------------------------------------------------------------------------------------


def conversation_of(pair: PreferencePair) -> str:
    """An HH-RLHF prompt ("\\n\\nHuman: ...\\n\\nAssistant:") as the conversation so far, without the final marker."""
    text = pair.prompt[:-len(ASSISTANT_MARKER)] if pair.prompt.endswith(ASSISTANT_MARKER) else pair.prompt
    return text.strip()


def human_agreement(model: torch.nn.Module, tokenizer: Tokenizer, pairs: Sequence[PreferencePair],
                    principles: Sequence[Principle], seed: int = 0, batch_size: int = 8) -> dict[str, float]:
    """How often the AI label agrees with the human one on pairs people labelled (chosen = the human's pick):
    `agreement` (position-averaged P(chosen better) > 0.5), `agreement_one_order` (chosen shown as (A) only),
    `position_bias` (mean P(A)), `mean_p_chosen`, and `pairs`."""
    chosen_principles = [principle_for(principles, index, seed) for index in range(len(pairs))]
    verdicts = judge(model, tokenizer, [conversation_of(pair) for pair in pairs], [pair.chosen for pair in pairs],
                     [pair.rejected for pair in pairs], chosen_principles, True, batch_size)
    n = len(verdicts)
    return {"pairs": n,
            "agreement": sum(v.p_first > 0.5 for v in verdicts) / n,
            "agreement_one_order": sum(v.p_a > 0.5 for v in verdicts) / n,
            "position_bias": sum((v.p_a + v.p_a_swapped) / 2 for v in verdicts) / n,
            "mean_p_chosen": sum(v.p_first for v in verdicts) / n}


def short_pairs(pairs: Sequence[PreferencePair], n: int, max_chars: int) -> list[PreferencePair]:
    """The first `n` pairs whose prompt and both responses total at most `max_chars` characters (a short question
    keeps a CPU demo short; it also leans the sample toward short conversations)."""
    short = [pair for pair in pairs if len(pair.prompt) + len(pair.chosen) + len(pair.rejected) <= max_chars]
    return short[:n]


def red_team_prompts(pairs: Sequence[PreferencePair]) -> list[str]:
    """The first human turn of each HH-RLHF (harmless-base) conversation: red-team requests, one per pair."""
    prompts = []
    for pair in pairs:
        text = pair.prompt.split(HUMAN_MARKER, 1)[-1]
        prompts.append(text.split(ASSISTANT_MARKER, 1)[0].strip())
    return [prompt for prompt in prompts if prompt]
