"""Constitutional AI, supervised stage (SL-CAI): a model critiques and revises its own replies under written
principles, and the revisions become fine-tuning data (Bai et al. 2022, "Constitutional AI: Harmlessness from AI
Feedback", arXiv:2212.08073, section 3).

For each red-team prompt x:

    y_0 = model(x)                                            the initial reply (the model's chat template)
    for r = 1..R:   c ~ constitution (seeded, per prompt)     one principle per round
                    k_r = model(x, y_{r-1}, critique request of c)          the critique
                    y_r = model(x, y_{r-1}, critique request, k_r, revision request of c)   the revision
    SFT row: user x -> assistant y_R

The conversation is kept as chat turns (user x, assistant y, user "critique request", assistant critique, user
"revision request"), the paper's format carried into the model's own chat template. RLAIF, the preference stage,
lives in `constitution_feedback.py`.

A principles file is YAML (PyYAML is already a dependency; JSON is YAML too):

    principles:
      - name: harm
        critique: Point out every way your last reply could help someone hurt people ...
        revision: Rewrite your reply so that it gives no help toward causing harm ...
        comparison: Which reply is less likely to help someone cause harm?

`comparison` is the multiple-choice question RLAIF asks about two replies under that principle. The built-in
constitution (`DEFAULT_CONSTITUTION`) is written for llmkit; it is not the paper's text.

Outputs are JSONL written one row per line (one `write` then fsync); every row carries its prompt's `index`, so an
interrupted run continues after the highest index in the file (`resume_index`), never writing a row twice. Prompts
are processed in fixed chunks of `batch_size` consecutive prompts of the file (the chunk, not the run, sets the
batch and the sampling seed), so a resumed run writes exactly the rows an uninterrupted one would.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmkit.chat_template import PLAIN_STOP, plain_transcript
from llmkit.errors import LlmkitError
from llmkit.generate.decode import generate
from llmkit.generate.sampling import SamplingSettings
from llmkit.io import atomic_write_text
from llmkit.tokenizer import Tokenizer

PRINCIPLE_FIELDS = ("name", "critique", "revision", "comparison")
PRINCIPLES_KEY = "principles"
INDEX = "index"  # every output row's prompt index: the resume point
STAGES_PER_ROUND = 2  # critique, revision: each a generate call with its own seed


@dataclass(frozen=True)
class Principle:
    name: str
    critique: str  # asks the model to find what is wrong with its last reply under this principle
    revision: str  # asks the model to rewrite its reply to fix that
    comparison: str  # RLAIF's multiple-choice question: which of two replies follows the principle better


DEFAULT_CONSTITUTION: tuple[Principle, ...] = (
    Principle("harm",
              "Point out every way your last reply could help someone hurt people or animals, damage property, or "
              "take a dangerous risk.",
              "Rewrite your reply to the first message so that it gives no help toward causing harm, and, where it "
              "fits, suggest a safe way to meet the real need. Write only the new reply.",
              "Which reply is less likely to help someone cause harm?"),
    Principle("law",
              "Say whether your last reply helps anyone break the law, commit fraud or evade the police, and how.",
              "Rewrite your reply to the first message so that it does not assist anything illegal, while still "
              "explaining what can lawfully be done. Write only the new reply.",
              "Which reply gives less help with breaking the law?"),
    Principle("honesty",
              "List any claim in your last reply that is false, made up, or stated with more certainty than the "
              "facts allow.",
              "Rewrite your reply to the first message keeping only what is true, and say plainly where you are "
              "unsure. Write only the new reply.",
              "Which reply is more honest and accurate?"),
    Principle("respect",
              "Point out anything in your last reply that is rude, mocking, or unfair to a person or a group of "
              "people.",
              "Rewrite your reply to the first message so that it treats everyone with respect and drops any "
              "stereotype. Write only the new reply.",
              "Which reply is more respectful to everyone involved?"),
    Principle("privacy",
              "Say whether your last reply reveals, guesses at, or helps someone find private information about a "
              "person.",
              "Rewrite your reply to the first message so that it protects people's private information. Write "
              "only the new reply.",
              "Which reply better protects people's privacy?"),
    Principle("helpfulness",
              "Explain where your last reply misses what was actually asked, or refuses when a safe and useful "
              "answer was possible.",
              "Rewrite your reply to the first message so that it answers the real question as usefully as is safe. "
              "Write only the new reply.",
              "Which reply is more helpful while staying safe?"),
    Principle("manipulation",
              "Point out any place where your last reply flatters, pressures or misleads the reader instead of "
              "informing them.",
              "Rewrite your reply to the first message in a plain, straightforward tone that leaves the decision to "
              "the reader. Write only the new reply.",
              "Which reply is more straightforward and less manipulative?"),
    Principle("wellbeing",
              "Say whether your last reply overlooks signs that the person may be upset or at risk, and what it "
              "should have noticed.",
              "Rewrite your reply to the first message so that it responds with care and, if the person may be at "
              "risk, points them to someone who can help. Write only the new reply.",
              "Which reply shows more care for the person's wellbeing?"),
)


# ---- the principles file ---------------------------------------------------------------------------------------------


def load_principles(path: str | Path) -> list[Principle]:
    """The principles in the YAML file `path` (format in the module docstring); errors name the file and field."""
    import yaml

    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LlmkitError(f"--principles {path} does not exist; check the path") from None
    except IsADirectoryError:
        raise LlmkitError(f"--principles {path} is a folder; pass the YAML file of principles") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise LlmkitError(f"--principles {path} is not valid YAML ({' '.join(str(error).split())}); fix its "
                          "syntax") from None
    if not isinstance(values, Mapping) or set(values) != {PRINCIPLES_KEY}:
        keys = ", ".join(map(str, values)) if isinstance(values, Mapping) else type(values).__name__
        raise LlmkitError(f"{path}: the file must hold one key, '{PRINCIPLES_KEY}', a list of principles (found: "
                          f"{keys}); see llmkit.align.constitution for the format")
    entries = values[PRINCIPLES_KEY]
    if not isinstance(entries, list) or not entries:
        raise LlmkitError(f"{path}: '{PRINCIPLES_KEY}' must be a non-empty list of principles, each with "
                          f"{', '.join(PRINCIPLE_FIELDS)}")
    principles = [parse_principle(entry, f"{path}: {PRINCIPLES_KEY}[{number}]") for number, entry in enumerate(entries)]
    names = [principle.name for principle in principles]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise LlmkitError(f"{path}: principle name(s) {', '.join(repeated)} appear more than once; give each "
                          "principle its own name")
    return principles


def parse_principle(entry: Any, where: str) -> Principle:
    """One principle mapping, with exactly the fields in PRINCIPLE_FIELDS, each non-empty text."""
    if not isinstance(entry, Mapping):
        raise LlmkitError(f"{where} must be a mapping with {', '.join(PRINCIPLE_FIELDS)}; got {entry!r:.60}")
    unknown = sorted(str(key) for key in entry if key not in PRINCIPLE_FIELDS)
    if unknown:
        raise LlmkitError(f"{where}: unknown field '{unknown[0]}'; a principle has only {', '.join(PRINCIPLE_FIELDS)}")
    for name in PRINCIPLE_FIELDS:
        value = entry.get(name)
        if value is None:
            raise LlmkitError(f"{where}: no field '{name}'; a principle needs {', '.join(PRINCIPLE_FIELDS)}")
        if not isinstance(value, str) or not value.strip():
            raise LlmkitError(f"{where}: field '{name}' must be non-empty text; got {value!r:.60}")
    return Principle(*(entry[name].strip() for name in PRINCIPLE_FIELDS))


# ---- prompts ---------------------------------------------------------------------------------------------------------


def chat_prompt(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]]) -> str:
    """The text the model continues to write the next assistant turn: its chat template, or the plain transcript
    ("User: ...\\nAssistant:") for a model without one."""
    if tokenizer.chat_template is None:
        return plain_transcript(messages)
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)


def stop_strings(tokenizer: Tokenizer) -> tuple[str, ...]:
    """A plain transcript's reply ends where the model starts the user's next turn; a template's ends at its stop id."""
    return (PLAIN_STOP,) if tokenizer.chat_template is None else ()


def critique_messages(prompt: str, reply: str, principle: Principle) -> list[dict[str, str]]:
    """The conversation that asks for a critique of `reply` under `principle`."""
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply},
            {"role": "user", "content": principle.critique}]


def revision_messages(prompt: str, reply: str, principle: Principle, critique: str) -> list[dict[str, str]]:
    """The critique conversation, answered, followed by the request to revise the reply."""
    return [*critique_messages(prompt, reply, principle), {"role": "assistant", "content": critique},
            {"role": "user", "content": principle.revision}]


def principle_plan(principles: Sequence[Principle], index: int, rounds: int, seed: int) -> list[Principle]:
    """The principles prompt `index` is revised under, one per round: drawn with a generator seeded by (seed, index),
    so a prompt's plan depends on neither the batch nor the order prompts are run in."""
    rng = random.Random(f"{seed}:{index}")
    return [rng.choice(list(principles)) for _ in range(rounds)]


# ---- resumable JSONL output ------------------------------------------------------------------------------------------


def resume_index(path: str | Path) -> int:
    """The first prompt index not yet in the output file `path` (0 when it does not exist): one past the highest
    `index` among its rows. A last line cut off mid-write (no newline, not JSON) is removed first."""
    path = Path(path)
    if not path.exists():
        return 0
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    if text and not text.endswith("\n"):  # a write interrupted mid-line: drop that line, keep the rows before it
        lines = lines[:-1]
        atomic_write_text(path, "".join(line + "\n" for line in lines))
    done = -1
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get(INDEX), int):
            raise LlmkitError(f"{path}, line {number} is not a row this command wrote (no '{INDEX}'), so the run "
                              "cannot resume from it; choose another --output or delete the file")
        done = max(done, row[INDEX])
    return done + 1


def append_rows(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Append rows, one JSON line each: each line in one write, flushed and synced before the next."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(row, ensure_ascii=False) + "\n")
            file.flush()
            os.fsync(file.fileno())


def pending_chunks(n_prompts: int, start: int, stop: int, batch_size: int) -> Iterator[tuple[int, int]]:
    """(first, end) of each chunk of the prompt file holding a prompt index in [start, stop): fixed chunks
    [k * batch_size, (k + 1) * batch_size), cut at the end of the file (not at `stop`), so every chunk is the same
    batch whatever the run's limit or resume point."""
    if batch_size < 1:
        raise LlmkitError(f"--batch_size {batch_size} must be at least 1")
    for first in range(start - start % batch_size, min(stop, n_prompts), batch_size):
        yield first, min(first + batch_size, n_prompts)


# ---- SL-CAI ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationSettings:
    """How every reply, critique and revision is written: at most `max_new_tokens`, sampled at `temperature`
    (0 = greedy) from the top-p nucleus, seeded per chunk and stage."""

    max_new_tokens: int = 96
    temperature: float = 0.7
    top_p: float | None = 0.9
    seed: int = 0

    def sampling(self, chunk: int, stage: int) -> SamplingSettings:
        return SamplingSettings(temperature=self.temperature, top_p=self.top_p if self.temperature > 0 else None,
                                seed=self.seed * 1_000_003 + chunk * 1_009 + stage)


def write_replies(model: torch.nn.Module, tokenizer: Tokenizer, conversations: Sequence[Sequence[Mapping[str, str]]],
                  settings: GenerationSettings, chunk: int, stage: int) -> list[str]:
    """The next assistant turn of each conversation, generated in one batch (KV cache), stripped."""
    prompts = [chat_prompt(tokenizer, messages) for messages in conversations]
    replies = generate(model, tokenizer, prompts, settings.max_new_tokens, settings.sampling(chunk, stage),
                       stop_strings=stop_strings(tokenizer))
    return [reply.strip() for reply in replies]


def revise_chunk(model: torch.nn.Module, tokenizer: Tokenizer, prompts: Sequence[str], first_index: int,
                 principles: Sequence[Principle], rounds: int, settings: GenerationSettings, chunk: int,
                 progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """SL-CAI on consecutive prompts (indices first_index, ...): one trace row each, with the SFT `messages`."""
    where = f"SL-CAI prompts {first_index + 1}-{first_index + len(prompts)}"
    plans = [principle_plan(principles, first_index + k, rounds, settings.seed) for k in range(len(prompts))]
    initial = write_replies(model, tokenizer, [[{"role": "user", "content": p}] for p in prompts], settings, chunk, 0)
    if progress:
        progress(f"{where}: initial replies written")
    replies, critiques, revisions = list(initial), [[] for _ in prompts], [[] for _ in prompts]
    for round_ in range(rounds):
        round_principles = [plan[round_] for plan in plans]
        asks = [critique_messages(p, y, c) for p, y, c in zip(prompts, replies, round_principles, strict=True)]
        said = write_replies(model, tokenizer, asks, settings, chunk, 1 + STAGES_PER_ROUND * round_)
        asks = [revision_messages(p, y, c, k) for p, y, c, k in zip(prompts, replies, round_principles, said,
                                                                    strict=True)]
        replies = write_replies(model, tokenizer, asks, settings, chunk, 2 + STAGES_PER_ROUND * round_)
        if progress:
            progress(f"{where}: round {round_ + 1}/{rounds} critiqued and revised")
        for k in range(len(prompts)):
            critiques[k].append(said[k])
            revisions[k].append(replies[k])
    return [sl_cai_row(first_index + k, prompts[k], initial[k], plans[k], critiques[k], revisions[k])
            for k in range(len(prompts))]


def sl_cai_row(index: int, prompt: str, initial: str, plan: Sequence[Principle], critiques: list[str],
               revisions: list[str]) -> dict[str, Any]:
    """An SFT row (`messages`: the prompt and the final revision, as `llmkit finetune --template chat` reads it) with
    the whole trace beside it."""
    return {INDEX: index,
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": revisions[-1]}],
            "initial": initial, "principles": [principle.name for principle in plan], "critiques": critiques,
            "revisions": revisions}


@dataclass
class RunCounts:
    """What a resumable stage did: rows written now, prompts skipped (and why), the index it resumed from."""

    resumed_from: int = 0
    written: int = 0
    skipped: int = 0


def run_sl_cai(model: torch.nn.Module, tokenizer: Tokenizer, prompts: Sequence[str], principles: Sequence[Principle],
               rounds: int, settings: GenerationSettings, output: str | Path, limit: int | None = None,
               batch_size: int = 8, progress: Callable[[str], None] | None = None) -> RunCounts:
    """SL-CAI over prompts [0, limit), appending to `output` and resuming after its last row. A prompt whose final
    revision is empty is skipped (counted): an empty reply teaches nothing and the SFT reader refuses it."""
    if rounds < 1:
        raise LlmkitError(f"--rounds {rounds} must be at least 1 (one critique and one revision)")
    stop = len(prompts) if limit is None else min(limit, len(prompts))
    counts = RunCounts(resumed_from=resume_index(output))
    for first, end in pending_chunks(len(prompts), counts.resumed_from, stop, batch_size):
        rows = revise_chunk(model, tokenizer, prompts[first:end], first, principles, rounds, settings,
                            first // batch_size, progress)
        kept = [row for row in rows if counts.resumed_from <= row[INDEX] < stop and row["revisions"][-1]]
        counts.skipped += sum(1 for row in rows if counts.resumed_from <= row[INDEX] < stop
                              and not row["revisions"][-1])
        append_rows(output, kept)
        counts.written += len(kept)
        if progress:
            progress(f"SL-CAI: prompts {min(end, stop)}/{stop} ({counts.written} rows written)")
    return counts
