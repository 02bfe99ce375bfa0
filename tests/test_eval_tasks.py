"""Evaluation tasks: JSONL rows and spec files (with errors naming file, line and field), jinja rendering,
deterministic few-shot sampling, the multiple-choice and loglikelihood decision rules on crafted scores, the
real scorer and generator wired in on a tiny random model, and every built-in task loading its real data."""

import gzip
import json
import math
from dataclasses import dataclass

import pytest
import torch

from llmkit import LlmkitError
from llmkit.data.shared import DATA_ENV
from llmkit.eval.builtin import BUILTIN_TASKS, load_builtin
from llmkit.eval.perplexity import perplexity
from llmkit.eval.runner import generation_metrics, run_task
from llmkit.eval.tasks import (
    Row,
    Task,
    TaskSpec,
    build_context,
    fewshot_examples,
    fewshot_indices,
    load_task,
    random_baseline,
    read_task_rows,
    render_prompt,
    row_choices,
    row_references,
)
from llmkit.generate import generate
from tests.helpers import byte_tokenizer, tiny_decoder, write_jsonl


def make_task(rows, fewshot_rows=None, **spec) -> Task:
    defaults = dict(name="qa", kind="generation", prompt="Q: {{ question }}\nA:", target="answer")
    values = {**defaults, **spec}
    as_rows = [Row(fields, "rows.jsonl", number) for number, fields in enumerate(rows, start=1)]
    pool = None if fewshot_rows is None else [Row(f, "shots.jsonl", n) for n, f in enumerate(fewshot_rows, start=1)]
    return Task(TaskSpec(**values), as_rows, pool)


QA_ROWS = [{"question": f"{n} + 1?", "answer": str(n + 1)} for n in range(10)]


@dataclass
class Score:  # the fields the runner reads from a ContinuationScore
    logprob: float
    is_greedy: bool
    n_tokens: int
    n_bytes: int


def crafted_scorer(table: dict[str, Score], seen: list):
    """A scorer that answers from a table keyed by continuation text and records the requests it got."""

    def scorer(model, tokenizer, requests, batch_size=8, progress=False):
        seen.extend(requests)
        return [table[continuation] for _, continuation in requests]

    return scorer


# --- JSONL rows and spec files -----------------------------------------------------------------------------


def test_read_task_rows_reads_objects_with_their_line_numbers_and_gzip(tmp_path):
    path = tmp_path / "rows.jsonl.gz"
    with gzip.open(path, "wt") as file:
        file.write('{"a": 1}\n\n{"a": 2}\n')
    rows = read_task_rows(path)
    assert [(row.fields["a"], row.line) for row in rows] == [(1, 1), (2, 3)]
    assert rows[1].where() == f"{path}, line 3"


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"a": 1}', '{"a": 2'], r"bad.jsonl, line 2: not valid JSON .*column"),
        (['{"a": 1}', "", "[1, 2]"], r"bad.jsonl, line 3: holds a JSON list, not an object"),
        (["", "  "], r"bad.jsonl holds no rows"),
    ],
)
def test_read_task_rows_errors_name_file_and_line(tmp_path, lines, message):
    with pytest.raises(LlmkitError, match=message):
        read_task_rows(write_jsonl(tmp_path / "bad.jsonl", lines))
    with pytest.raises(LlmkitError, match="missing.jsonl does not exist"):
        read_task_rows(tmp_path / "missing.jsonl")


def test_load_task_from_yaml_and_json_reads_data_beside_the_spec(tmp_path):
    write_jsonl(tmp_path / "rows.jsonl", QA_ROWS[:3])
    write_jsonl(tmp_path / "shots.jsonl", QA_ROWS[5:])
    (tmp_path / "qa.yaml").write_text(
        "name: qa\nkind: generation\nprompt: \"Q: {{ question }}\\nA:\"\ntarget: answer\ndata: rows.jsonl\n"
        "fewshot_data: shots.jsonl\nnum_fewshot: 2\nmetric: exact_match\nstop: [\"\\n\"]\n"
    )
    task = load_task(tmp_path / "qa.yaml")
    assert (task.name, len(task.rows), len(task.fewshot_rows), task.spec.stop) == ("qa", 3, 5, ("\n",))
    assert render_prompt(task, task.rows[0]) == "Q: 0 + 1?\nA:"
    (tmp_path / "mc.json").write_text(json.dumps({"name": "mc", "kind": "multiple_choice", "prompt": "{{ question }}",
                                                  "choices": "['no', 'yes']", "answer": "1", "data": "rows.jsonl"}))
    assert load_task(tmp_path / "mc.json").spec.metric == "acc"
    (tmp_path / "one_stop.yaml").write_text("name: s\nkind: generation\nprompt: p\ntarget: t\ndata: rows.jsonl\nstop: END\n")
    assert load_task(tmp_path / "one_stop.yaml").spec.stop == ("END",)  # one string is one stop string


@pytest.mark.parametrize(
    "content, message",
    [
        ("name: x\nkind: essay\nprompt: p\ntarget: t\ndata: rows.jsonl\n", r"kind 'essay' is not one of generation"),
        ("name: x\nkind: generation\nprompt: p\ntarget: t\nmetric: acc\ndata: rows.jsonl\n",
         r"metric 'acc' is not one a generation task reports"),
        ("name: x\nkind: multiple_choice\nprompt: p\nanswer: label\ndata: rows.jsonl\n", r"needs 'choices'"),
        ("name: x\nkind: generation\nprompt: '{{ question'\ntarget: t\ndata: rows.jsonl\n",
         r"task 'x' 'prompt' is not valid jinja"),
        ("name: x\nkind: generation\nprompt: p\ntarget: t\ndata: rows.jsonl\nshots: 3\n", r"unknown field\(s\) \['shots'\]"),
        ("name: x\nkind: generation\nprompt: p\ntarget: t\n", r"'data' is empty"),
        ("name: x\nkind: generation\nprompt: p\ntarget: t\ndata: rows.jsonl\nrandom_baseline: 1.0\n",
         r"random_baseline=1.0 must lie in \[0, 1\)"),
        ("name: [x\n", r"spec.yaml cannot be parsed"),
        ("name: x\nkind: generation\nprompt: p\ntarget: t\ndata: rows.jsonl\nnum_fewshot: '3'\n",
         r"num_fewshot='3' must be an integer"),
        ("name: x\nkind: generation\nprompt: p\ntarget: t\ndata: rows.jsonl\nstop: ['', 1]\n",
         r"stop \['', 1\] must be a list of non-empty strings"),
    ],
)
def test_bad_spec_files_name_the_field_and_the_fix(tmp_path, content, message):
    write_jsonl(tmp_path / "rows.jsonl", QA_ROWS[:2])
    (tmp_path / "spec.yaml").write_text(content)
    with pytest.raises(LlmkitError, match=message):
        load_task(tmp_path / "spec.yaml")


# --- rendering ---------------------------------------------------------------------------------------------


def test_templates_render_fields_and_expressions_give_lists_and_indices():
    task = make_task([{"question": "Sky colour?", "answer": "blue", "options": ["red", "blue"], "gold": 1}],
                     kind="multiple_choice", prompt="{{ question | upper }} ({{ options | length }} options)",
                     choices="options", answer="gold")
    row = task.rows[0]
    assert render_prompt(task, row) == "SKY COLOUR? (2 options)"
    assert row_choices(task, row) == (["red", "blue"], 1)
    by_text = make_task([{"q": "x", "label": "blue"}], kind="multiple_choice", prompt="{{ q }}",
                        choices="['red', 'blue']", answer="label")
    assert row_choices(by_text, by_text.rows[0]) == (["red", "blue"], 1)
    digits = make_task([{"q": "x", "label": "0"}], kind="multiple_choice", prompt="{{ q }}", choices="['a', 'b']",
                       answer="label")
    assert row_choices(digits, digits.rows[0]) == (["a", "b"], 0)
    multi = make_task([{"question": "q", "refs": ["one", "uno"]}], target="refs")
    assert row_references(multi, multi.rows[0]) == ["one", "uno"]


def test_templates_run_in_a_sandbox():
    task = make_task([{"question": "q", "answer": "a"}], prompt="{{ question.__class__.__mro__ }}")
    with pytest.raises(LlmkitError, match=r"rows.jsonl, line 1: task 'qa' 'prompt'"):
        render_prompt(task, task.rows[0])


@pytest.mark.parametrize(
    "spec, field_name, message",
    [
        (dict(prompt="Q: {{ question }} {{ context }}"), "prompt", r"line 2: task 'qa' 'prompt' .*'context' is undefined"),
        (dict(target="solution"), "target", r"line 2: task 'qa' 'target' .*'solution' is undefined.*fields \['answer'"),
        (dict(target="[answer, hint]"), "target", r"line 2: task 'qa' 'target' .*'hint' is undefined"),
        (dict(target="number"), "target", r"line 2: task 'qa' 'target' gave 7; it must be a non-empty string"),
        (dict(kind="multiple_choice", choices="['yes']", answer="0"), "choices", r"line 2: .*'choices' gave \['yes'\]"),
        (dict(kind="multiple_choice", choices="['no', 'yes']", answer="number"), "answer",
         r"line 2: task 'qa' 'answer' gave 7; it must be a choice index in 0..1"),
        (dict(kind="multiple_choice", choices="['no', 'yes']", answer="answer"), "answer",
         r"line 2: task 'qa' 'answer' gave 'two', which is not one of the choices"),
    ],
)
def test_bad_rows_name_file_line_and_field(spec, field_name, message):
    task = make_task([QA_ROWS[0], {"question": "1 + 1?", "answer": "two", "number": 7}], **spec)
    row = task.rows[1]
    with pytest.raises(LlmkitError, match=message):
        if field_name == "prompt":
            render_prompt(task, row)
        elif field_name == "target":
            row_references(task, row)
        else:
            row_choices(task, row)


# --- few-shot ----------------------------------------------------------------------------------------------


def test_fewshot_sampling_is_deterministic_and_never_uses_the_row_itself():
    task = make_task(QA_ROWS, num_fewshot=3, fewshot_seed=7)
    first = [[row.line for row in fewshot_examples(task, index)] for index in range(10)]
    again = [[row.line for row in fewshot_examples(make_task(QA_ROWS, num_fewshot=3, fewshot_seed=7), index)]
             for index in range(10)]
    assert first == again
    assert all(index + 1 not in lines and len(set(lines)) == 3 for index, lines in enumerate(first))
    assert len({tuple(lines) for lines in first}) > 1  # rows get different examples
    other_seed = [[row.line for row in fewshot_examples(make_task(QA_ROWS, num_fewshot=3, fewshot_seed=8), index)]
                  for index in range(10)]
    assert other_seed != first
    # k = all the other rows: each row gets exactly the other nine
    everyone = make_task(QA_ROWS, num_fewshot=9)
    for index in range(10):
        assert sorted(row.line for row in fewshot_examples(everyone, index)) == [n for n in range(1, 11) if n != index + 1]


def test_fewshot_from_a_separate_split_skips_duplicates_of_the_row():
    pool = [QA_ROWS[0], *QA_ROWS[5:]]  # the pool holds a copy of row 0
    task = make_task(QA_ROWS[:3], fewshot_rows=pool, num_fewshot=5)
    assert {row.source for row in fewshot_examples(task, 0)} == {"shots.jsonl"}
    assert all(row.fields != QA_ROWS[0] for row in fewshot_examples(task, 0))  # all 5 others, never the copy
    assert len(fewshot_examples(task, 1)) == 5
    with pytest.raises(LlmkitError, match=r"6 few-shot examples asked for but the pool holds only 5 usable rows"):
        fewshot_examples(task, 0, k=6)


def test_fewshot_indices_draw_few_from_a_large_pool_stably():
    picked = fewshot_indices(67_349, 4, seed=1234, index=3)
    assert picked == fewshot_indices(67_349, 4, seed=1234, index=3)
    assert len(set(picked)) == 4 and all(0 <= i < 67_349 for i in picked)
    assert picked != fewshot_indices(67_349, 4, seed=1234, index=4)


def test_build_context_joins_description_shots_and_prompt():
    task = make_task(QA_ROWS[:3], num_fewshot=2, description="Add.\n\n", fewshot_separator="\n\n",
                     target_delimiter=" ")
    shots = fewshot_examples(task, 0)
    expected = "Add.\n\n" + "".join(f"Q: {s.fields['question']}\nA: {s.fields['answer']}\n\n" for s in shots)
    assert build_context(task, 0) == expected + "Q: 0 + 1?\nA:"
    assert build_context(task, 0, k=0) == "Add.\n\nQ: 0 + 1?\nA:"
    mc = make_task([{"question": "good?", "label": 1}] * 2 + [{"question": "bad?", "label": 0}], kind="multiple_choice",
                   choices="['no', 'yes']", answer="label", prompt="{{ question }}", num_fewshot=1)
    assert build_context(mc, 2) == "good? yes\n\nbad?"  # the gold choice text follows a shot's prompt


# --- the runner's decision rules, on crafted scores ---------------------------------------------------------


def test_multiple_choice_picks_highest_loglikelihood_raw_per_character_and_per_byte():
    # choice 0: 3 characters / 6 bytes, choice 1: 4 characters / 4 bytes.
    # raw: -3.5 > -4.2 -> 0; per character: -1.17 < -1.05 -> 1; per byte: -0.58 > -1.05 -> 0.
    table = {" ééé": Score(-3.5, False, 3, 7), " abcd": Score(-4.2, True, 2, 5)}
    rows = [{"q": "first", "gold": 0}, {"q": "second", "gold": 1}]
    task = make_task(rows, kind="multiple_choice", prompt="{{ q }}", choices="['ééé', 'abcd']", answer="gold")
    seen = []
    result = run_task(task, None, None, scorer=crafted_scorer(table, seen))
    assert seen == [("first", " ééé"), ("first", " abcd"), ("second", " ééé"), ("second", " abcd")]
    assert result.metrics == {"acc": 0.5, "acc_norm": 0.5, "acc_bytes": 0.5}
    assert [s["prediction"] for s in result.samples] == ["ééé", "ééé"]
    assert [s["correct"] for s in result.samples] == [True, False]
    assert (result.score, result.random_baseline, result.n_rows) == (0.5, 0.5, 2)
    per_char = run_task(make_task(rows, kind="multiple_choice", prompt="{{ q }}", choices="['ééé', 'abcd']",
                                  answer="gold", metric="acc_norm"), None, None, scorer=crafted_scorer(table, []))
    assert per_char.score == 0.5 and per_char.metrics["acc_norm"] == 0.5
    only_second = run_task(task, None, None, limit=1, scorer=crafted_scorer(table, []))
    assert only_second.metrics == {"acc": 1.0, "acc_norm": 0.0, "acc_bytes": 1.0}


def test_multiple_choice_random_baseline_averages_one_over_the_number_of_choices():
    rows = [{"q": "a", "options": ["x", "y"], "gold": 0}, {"q": "b", "options": ["x", "y", "z", "w"], "gold": 0}]
    task = make_task(rows, kind="multiple_choice", prompt="{{ q }}", choices="options", answer="gold")
    assert random_baseline(task, task.rows) == pytest.approx((1 / 2 + 1 / 4) / 2)
    fixed = make_task(rows, kind="multiple_choice", prompt="{{ q }}", choices="options", answer="gold", random_baseline=0.1)
    assert random_baseline(fixed, fixed.rows) == 0.1


def test_loglikelihood_reports_greedy_accuracy_and_mean_logprob():
    table = {" 1": Score(-0.5, True, 1, 2), " 2": Score(-2.5, False, 2, 2)}
    task = make_task(QA_ROWS[:2], kind="loglikelihood")
    result = run_task(task, None, None, scorer=crafted_scorer(table, []))
    assert result.metrics["acc"] == 0.5 and result.score == 0.5 and result.random_baseline == 0
    assert result.metrics["logprob"] == pytest.approx(-1.5)
    assert result.metrics["logprob_per_token"] == pytest.approx(-3.0 / 3)
    assert result.metrics["bits_per_byte"] == pytest.approx(3.0 / (4 * math.log(2)))


def test_generation_passes_the_spec_to_the_generator_in_batches_and_scores_predictions():
    calls = []

    def generator(model, tokenizer, prompts, max_new_tokens, settings, stop_strings, truncate_prompt):
        calls.append((len(prompts), max_new_tokens, settings.temperature, settings.seed, stop_strings, truncate_prompt))
        return [f" {prompt.split()[1]}\n" for prompt in prompts]  # echoes "n" of "Q: n + 1?": right only by accident

    task = make_task(QA_ROWS[:5], max_new_tokens=7, stop=("\n",), temperature=0.5, seed=3)
    result = run_task(task, None, None, batch_size=2, truncate_prompt=True, generator=generator)
    assert calls == [(2, 7, 0.5, 3, ("\n",), True), (2, 7, 0.5, 3, ("\n",), True), (1, 7, 0.5, 3, ("\n",), True)]
    assert [s["prediction"] for s in result.samples] == ["0", "1", "2", "3", "4"]
    assert [s["target"] for s in result.samples] == ["1", "2", "3", "4", "5"]
    assert result.metrics == generation_metrics([str(n) for n in range(5)], [[str(n + 1)] for n in range(5)])
    assert result.metrics["exact_match"] == 0.0 and result.score == 0.0 and result.random_baseline == 0.0


def test_run_task_rejects_bad_limits():
    task = make_task(QA_ROWS, kind="loglikelihood")
    with pytest.raises(LlmkitError, match="limit=0 must be >= 1"):
        run_task(task, None, None, limit=0, scorer=crafted_scorer({}, []))
    with pytest.raises(LlmkitError, match="batch_size=0 must be >= 1"):
        run_task(task, None, None, batch_size=0, scorer=crafted_scorer({}, []))
    with pytest.raises(LlmkitError, match="num_fewshot=-1 must be >= 0"):
        run_task(task, None, None, num_fewshot=-1, scorer=crafted_scorer({}, []))


# --- the real scorer and generator, on a tiny random model ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return tiny_decoder(), byte_tokenizer(eos_id=0)


def continuation_logprob_by_hand(model, tokenizer, context: str, continuation: str) -> float:
    context_ids, continuation_ids = tokenizer.encode(context), tokenizer.encode(continuation)
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids)[0].double(), dim=-1)  # (T, V)
    positions = range(len(context_ids) - 1, ids.shape[1] - 1)
    return sum(logprobs[p, ids[0, p + 1]].item() for p in positions)


def test_multiple_choice_through_the_real_scorer_on_a_tiny_model(tiny):
    model, tokenizer = tiny
    rows = [{"q": "The sky is", "gold": 0}, {"q": "Grass is", "gold": 1}, {"q": "Snow is very", "gold": 1}]
    task = make_task(rows, kind="multiple_choice", prompt="{{ q }}", choices="['blue', 'green and wet']", answer="gold")
    result = run_task(task, model, tokenizer, batch_size=2)
    for sample in result.samples:
        by_hand = [continuation_logprob_by_hand(model, tokenizer, sample["prompt"], " " + c) for c in sample["choices"]]
        assert sample["logprobs"] == pytest.approx(by_hand, abs=1e-4)  # fp32 forward vs fp64 log-softmax of the same
        best = max(range(2), key=lambda i: by_hand[i])
        assert sample["prediction"] == sample["choices"][best]
    assert result.metrics["acc"] == sum(s["correct"] for s in result.samples) / 3


def test_generation_through_the_real_generator_on_a_tiny_model(tiny):
    model, tokenizer = tiny
    task = make_task(QA_ROWS[:5], num_fewshot=1, max_new_tokens=6, stop=("\n",))
    result = run_task(task, model, tokenizer, batch_size=2)
    contexts = [build_context(task, index) for index in range(5)]
    alone = [generate(model, tokenizer, context, max_new_tokens=6, stop_strings=("\n",)).strip() for context in contexts]
    assert [s["prompt"] for s in result.samples] == contexts
    assert [s["prediction"] for s in result.samples] == alone  # batching and reordering change nothing


# --- built-in tasks on the real shared data -----------------------------------------------------------------


@pytest.mark.parametrize("name", [name for name in BUILTIN_TASKS if name != "perplexity"])
def test_every_builtin_task_loads_its_data_and_renders_prompts(name):
    task = load_builtin(name)
    assert task.name == name and task.spec.source
    for index in (0, len(task.rows) // 2, len(task.rows) - 1):
        context = build_context(task, index)
        assert context.endswith(render_prompt(task, task.rows[index])) and len(context) > 20
        if task.spec.kind == "multiple_choice":
            choices, gold = row_choices(task, task.rows[index])
            assert len(choices) >= 2 and 0 <= gold < len(choices)
        else:
            assert row_references(task, task.rows[index])


def test_builtin_tasks_hold_the_documented_subsets():
    sst2 = load_builtin("sst2")
    assert (len(sst2.rows), len(sst2.fewshot_rows)) == (872, 67_349)
    first = sst2.rows[0]  # dev.tsv line 2: "it 's a charming and often affecting journey . <TAB>1"
    assert (first.fields["sentence"], row_choices(sst2, first)) == (
        "it 's a charming and often affecting journey .", (["negative", "positive"], 1))
    assert build_context(sst2, 0).count("Sentiment:") == sst2.spec.num_fewshot + 1
    dialogsum = load_builtin("dialogsum")
    assert len(dialogsum.rows) == 50 and len(dialogsum.fewshot_rows) == 500
    assert len(row_references(dialogsum, dialogsum.rows[0])) == 3
    hh = load_builtin("hh_rlhf_harmless")
    assert len(hh.rows) == 200 and random_baseline(hh, hh.rows) == 0.5
    assert [row_choices(hh, row)[1] for row in hh.rows[:4]] == [0, 1, 0, 1]  # gold position alternates
    assert hh.rows[0].fields["conversation"].startswith("Human:") and hh.rows[0].fields["conversation"].endswith(
        "\n\nAssistant:")


def test_builtin_tasks_name_the_missing_data_folder(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(LlmkitError, match=r"nowhere, which does not exist.*LLMKIT_SHARED_DATA"):
        load_builtin("sst2")
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    with pytest.raises(LlmkitError, match=r"dev.tsv is missing from the shared data"):
        load_builtin("sst2")
    with pytest.raises(LlmkitError, match=r"unknown task 'mmlu'; built-in tasks are sst2"):
        load_builtin("mmlu")


def test_builtin_perplexity_task_equals_perplexity_of_its_text(tiny):
    model, tokenizer = tiny
    task = load_builtin("perplexity")
    assert task.text.startswith("First Citizen:") and (task.window, task.stride, task.max_tokens) == (512, 256, 2048)
    result = run_task(task, model, tokenizer, limit=3, num_fewshot=5)  # both ignored: the text is fixed
    # tiny-llama's context is 256 tokens, shorter than the task's 512-token window: the window shrinks to it
    expected = perplexity(model, tokenizer, task.text, window=256, stride=128, max_tokens=2048)
    assert (result.kind, result.metric, result.random_baseline, result.samples) == ("perplexity", "perplexity", None, [])
    assert result.score == pytest.approx(expected.perplexity, rel=1e-9)
    assert result.metrics["bits_per_byte"] == pytest.approx(expected.bits_per_byte, rel=1e-9)
    assert (result.metrics["window"], result.metrics["n_tokens"]) == (256, expected.n_tokens)
