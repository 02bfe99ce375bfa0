"""Built-in evaluation tasks, read from the real data sets in `shared/data` (beside the repository).

- `sst2`: multiple choice " negative" / " positive" (category language_understanding). All 872 sentences of GLUE
  SST-2 dev, 4-shot from train. No licence stated upstream (research use; cite Socher et al. 2013, Wang et al. 2019).
- `dialogsum`: generation scored by ROUGE-L against 3 human references (category summarization). The first 50
  dialogues of the DialogSum test split (test_0..test_49), 1-shot from dev. Chen et al. 2021, CC BY-NC-SA 4.0.
- `perplexity`: sliding-window perplexity (window 512, stride 256) of the first 2,048 tokens of tinyshakespeare
  (category language_modeling; reported, not rescaled into the averages). Public-domain text, char-rnn repo MIT.
- `hh_rlhf_harmless`: multiple choice between the chosen and the rejected last assistant reply (category safety).
  The first 200 usable pairs of Anthropic HH-RLHF harmless-base test. Bai et al. 2022, MIT.

The data are read in place, not copied into the package: DialogSum's licence is non-commercial share-alike and
SST-2 has none stated, so neither is bundled (HH-RLHF's MIT would allow it; it is read in place too, so every
task finds its data the same way). The folder is `<repo>/../shared/data`, or $LLMKIT_SHARED_DATA when set.
hh_rlhf holds offensive text by design (harm-avoidance data): its prompts files will too.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

from llmkit.data.jsonl import read_jsonl
from llmkit.data.shared import shared_data_file
from llmkit.errors import LlmkitError
from llmkit.eval.runner import PerplexityTask
from llmkit.eval.tasks import Row, Task, TaskSpec

SST2_DIR = "sst2"
SST2_EVAL_FILE = "dev.tsv"
SST2_FEWSHOT_FILE = "train.tsv"
DIALOGSUM_DIR = "dialogsum"
DIALOGSUM_EVAL_FILE = "dialogsum.test.jsonl.gz"
DIALOGSUM_FEWSHOT_FILE = "dialogsum.dev.jsonl.gz"
DIALOGSUM_ROWS = 50
HH_FILE = "hh_rlhf/harmless-base/test.jsonl.gz"
SHAKESPEARE_FILE = "tinyshakespeare/input.txt"
HH_ROWS = 200
ASSISTANT_TURN = "\n\nAssistant:"
RESTORE = "restore the file from its SOURCE.md"


def _read_tsv(path: Path) -> list[Row]:
    """SST-2 rows (sentence, label as int); GLUE's trailing space before the tab is stripped."""
    rows = []
    with path.open(encoding="utf-8", newline="") as file:
        reader = csv.reader(file, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        for number, values in enumerate(reader, start=2):
            fields = dict(zip(header, values))
            if len(values) != len(header) or fields.get("label") not in ("0", "1"):
                raise LlmkitError(f"{path}, line {number}: expected 'sentence<TAB>label' with label 0 or 1, got "
                                  f"{values!r:.80}; restore the file from its SOURCE.md")
            rows.append(Row({"sentence": fields["sentence"].strip(), "label": int(fields["label"])}, str(path), number))
    return rows


def sst2() -> Task:
    spec = TaskSpec(
        name="sst2", kind="multiple_choice", category="language_understanding", metric="acc",
        prompt="Review: {{ sentence }}\nSentiment:", choices="['negative', 'positive']", answer="label",
        num_fewshot=0, description="Is the sentiment of each movie review positive or negative?\n\n",
        source="GLUE SST-2 dev (872 sentences), few-shot from train; shared/data/sst2, no licence stated upstream",
    )  # fmt: skip
    return Task(spec, _read_tsv(shared_data_file(f"{SST2_DIR}/{SST2_EVAL_FILE}")),
                _read_tsv(shared_data_file(f"{SST2_DIR}/{SST2_FEWSHOT_FILE}")))


def dialogsum() -> Task:
    spec = TaskSpec(
        name="dialogsum", kind="generation", category="summarization", metric="rougeL",
        prompt="Dialogue:\n{{ dialogue }}\nSummary:", target="summaries", num_fewshot=1,
        description="Summarize each dialogue in one sentence.\n\n", max_new_tokens=64, stop=("\n",),
        source=f"DialogSum test_0..test_{DIALOGSUM_ROWS - 1} (3 references each), few-shot from dev; "
               "shared/data/dialogsum, CC BY-NC-SA 4.0",
    )  # fmt: skip
    test = _dialogsum_rows(shared_data_file(f"{DIALOGSUM_DIR}/{DIALOGSUM_EVAL_FILE}"))[:DIALOGSUM_ROWS]
    return Task(spec, test, _dialogsum_rows(shared_data_file(f"{DIALOGSUM_DIR}/{DIALOGSUM_FEWSHOT_FILE}")))


def _dialogsum_rows(path: Path) -> list[Row]:
    """Rows with `dialogue` and `summaries` (test has summary1..3, dev a single `summary`)."""
    rows = []
    for number, record in read_jsonl(path):
        summaries = [record[key] for key in ("summary", "summary1", "summary2", "summary3") if record.get(key)]
        if not record.get("dialogue") or not summaries:
            raise LlmkitError(f"{path}, line {number}: needs 'dialogue' and 'summary' (or summary1..3); restore the "
                              "file from its SOURCE.md")
        rows.append(Row({"dialogue": record["dialogue"], "summaries": summaries}, str(path), number))
    return rows


def hh_rlhf_harmless() -> Task:
    spec = TaskSpec(
        name="hh_rlhf_harmless", kind="multiple_choice", category="safety", metric="acc",
        prompt="{{ conversation }}", choices="replies", answer="chosen",
        source=f"Anthropic HH-RLHF harmless-base test, first {HH_ROWS} pairs that differ only in the last reply; "
               "shared/data/hh_rlhf, MIT",
    )  # fmt: skip
    path = shared_data_file(HH_FILE)
    rows = []
    for number, record in read_jsonl(path, ("chosen", "rejected"), RESTORE):
        chosen, rejected = (record[key] for key in ("chosen", "rejected"))
        split_chosen, split_rejected = chosen.rfind(ASSISTANT_TURN), rejected.rfind(ASSISTANT_TURN)
        conversation = chosen[: split_chosen + len(ASSISTANT_TURN)]
        if split_chosen < 0 or conversation != rejected[: split_rejected + len(ASSISTANT_TURN)]:
            continue  # 5 of 2,312 pairs differ before the last reply: not a same-context choice
        replies = [chosen[len(conversation) :].strip(), rejected[len(conversation) :].strip()]
        if not all(replies):
            continue  # an empty reply has no likelihood to compare
        order = len(rows) % 2  # alternate the gold position so a tie-break or position bias cannot help
        rows.append(Row({"conversation": conversation.lstrip("\n"), "replies": replies[::-1] if order else replies,
                         "chosen": order}, str(path), number))
        if len(rows) == HH_ROWS:
            break
    return Task(spec, rows)


def shakespeare_perplexity() -> PerplexityTask:
    return PerplexityTask(
        name="perplexity", text=shared_data_file(SHAKESPEARE_FILE).read_text(encoding="utf-8"), window=512, stride=256,
        max_tokens=2048, source="the first 2,048 tokens of tinyshakespeare (public-domain text; char-rnn repository, MIT)",
    )


BUILTIN_TASKS: dict[str, Callable[[], Task | PerplexityTask]] = {
    "sst2": sst2, "dialogsum": dialogsum, "hh_rlhf_harmless": hh_rlhf_harmless, "perplexity": shakespeare_perplexity,
}  # fmt: skip


def load_builtin(name: str) -> Task | PerplexityTask:
    """A built-in task by name, its rows read from the shared data."""
    if name not in BUILTIN_TASKS:
        raise LlmkitError(f"unknown task {name!r}; built-in tasks are {', '.join(BUILTIN_TASKS)}, or pass a task "
                          "spec file (.json/.yaml)")
    return BUILTIN_TASKS[name]()
