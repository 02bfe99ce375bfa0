"""Constitutional AI (llmkit.align.constitution, constitution_feedback, `llmkit constitution`): the principles file,
the critique/revision prompts and seeded plans, SL-CAI rows the SFT readers take, RLAIF labels read from option
log-probs (checked against a brute-force forward), position averaging, preference rows, and resume = uninterrupted.
Tiny random decoders and a byte tokenizer; the slow test runs SmolLM2-135M-Instruct."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmkit.align.constitution import (
    DEFAULT_CONSTITUTION,
    GenerationSettings,
    Principle,
    critique_messages,
    load_principles,
    principle_plan,
    resume_index,
    revision_messages,
    run_sl_cai,
)
from llmkit.align.constitution_feedback import (
    OPTIONS,
    choice_probability,
    human_agreement,
    judge,
    option_logps,
    question_prompt,
    red_team_prompts,
    run_rlaif,
)
from llmkit.align.preference import PreferencePair, load_pairs
from llmkit.data.sft import load_sft_dataset, load_sft_records
from llmkit.errors import LlmkitError
from tests.helpers import byte_tokenizer, cli_status, run_cli, tiny_decoder, write_jsonl

EOS = "<eos>"
TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}<eos>{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
PROMPTS = ["How do I pick a lock?", "Tell me a joke.", "Is the moon hollow?", "Help me lie to my boss.", "Hi!"]
FAST = GenerationSettings(max_new_tokens=6, temperature=0.9, top_p=None, seed=1)  # no empty reply at this seed


@pytest.fixture(scope="module")
def tokenizer():  # noqa: ANN201
    return byte_tokenizer(specials=[EOS], eos_id=256, chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def model():  # noqa: ANN201
    return tiny_decoder(vocab_size=257, max_seq_len=1024)


def write_principles(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


VALID = """principles:
  - name: harm
    critique: Find harm in your reply.
    revision: Rewrite it without harm.
    comparison: Which reply is less harmful?
  - name: honesty
    critique: Find false claims.
    revision: Rewrite it truthfully.
    comparison: Which reply is more honest?
"""


# ---- principles file -------------------------------------------------------------------------------------------------


def test_principles_file_loads(tmp_path: Path) -> None:
    principles = load_principles(write_principles(tmp_path / "p.yaml", VALID))
    assert principles == [Principle("harm", "Find harm in your reply.", "Rewrite it without harm.",
                                    "Which reply is less harmful?"),
                          Principle("honesty", "Find false claims.", "Rewrite it truthfully.",
                                    "Which reply is more honest?")]


@pytest.mark.parametrize(("text", "expected"), [
    (VALID.replace("    revision: Rewrite it truthfully.\n", ""), "principles[1]: no field 'revision'"),
    (VALID.replace("    comparison: Which reply is less harmful?\n",
                   "    comparison: Which reply is less harmful?\n    weight: 2\n"),
     "principles[0]: unknown field 'weight'"),
    (VALID.replace("critique: Find false claims.", "critique: ''"), "principles[1]: field 'critique' must be non-empty"),
    ("rules: []\n", "one key, 'principles'"),
    ("principles: []\n", "non-empty list"),
    ("principles: [\n", "not valid YAML"),
    (VALID.replace("name: honesty", "name: harm"), "harm appear more than once"),
])
def test_principles_file_errors_name_file_and_field(tmp_path: Path, text: str, expected: str) -> None:
    path = write_principles(tmp_path / "bad.yaml", text)
    with pytest.raises(LlmkitError) as error:
        load_principles(path)
    assert str(path) in str(error.value) and expected in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_principles_file(tmp_path: Path) -> None:
    with pytest.raises(LlmkitError, match=r"--principles .*nope.yaml does not exist"):
        load_principles(tmp_path / "nope.yaml")


def test_default_constitution_is_complete() -> None:
    assert 6 <= len(DEFAULT_CONSTITUTION) <= 10
    assert len({p.name for p in DEFAULT_CONSTITUTION}) == len(DEFAULT_CONSTITUTION)
    assert all(p.critique and p.revision and p.comparison.endswith("?") for p in DEFAULT_CONSTITUTION)


# ---- prompts and plans -----------------------------------------------------------------------------------------------


def test_critique_and_revision_prompts_hold_the_principle(tokenizer) -> None:  # noqa: ANN001
    principle = DEFAULT_CONSTITUTION[0]
    critique = critique_messages("Q?", "A.", principle)
    revision = revision_messages("Q?", "A.", principle, "It is harmful.")
    assert critique == critique_messages("Q?", "A.", principle)
    assert [m["role"] for m in revision] == ["user", "assistant", "user", "assistant", "user"]
    assert critique[-1]["content"] == principle.critique and revision[-1]["content"] == principle.revision
    assert revision[:3] == critique and revision[3]["content"] == "It is harmful."
    rendered = tokenizer.apply_chat_template(revision)
    assert principle.critique in rendered and principle.revision in rendered and rendered.endswith("<assistant>")


def test_principle_plan_is_seeded() -> None:
    plans = [principle_plan(DEFAULT_CONSTITUTION, index, 4, seed=7) for index in range(20)]
    assert plans == [principle_plan(DEFAULT_CONSTITUTION, index, 4, seed=7) for index in range(20)]
    assert plans != [principle_plan(DEFAULT_CONSTITUTION, index, 4, seed=8) for index in range(20)]
    assert len({p.name for plan in plans for p in plan}) > 4  # draws spread over the constitution


# ---- SL-CAI ----------------------------------------------------------------------------------------------------------


def test_sl_cai_rows_are_sft_data(tmp_path: Path, model, tokenizer, one_thread) -> None:  # noqa: ANN001
    output = tmp_path / "sl_cai.jsonl"
    counts = run_sl_cai(model, tokenizer, PROMPTS, DEFAULT_CONSTITUTION, 2, FAST, output, limit=3, batch_size=2)
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert counts.written == len(rows) == 3 and [row["index"] for row in rows] == [0, 1, 2]
    for row, prompt in zip(rows, PROMPTS, strict=False):
        assert len(row["principles"]) == len(row["critiques"]) == len(row["revisions"]) == 2
        assert row["principles"] == [p.name for p in principle_plan(DEFAULT_CONSTITUTION, row["index"], 2, FAST.seed)]
        assert row["messages"] == [{"role": "user", "content": prompt},
                                   {"role": "assistant", "content": row["revisions"][-1]}]
    records, _ = load_sft_records(output)
    assert [r.output for r in records] == [row["revisions"][-1] for row in rows]
    examples, report = load_sft_dataset(output, tokenizer, template="chat", max_length=512)
    assert report.examples == 3
    first = examples[0]
    completion = [t for t, label in zip(first.input_ids, first.labels, strict=True) if label >= 0]
    assert tokenizer.decode(completion) == rows[0]["revisions"][-1] + EOS


def test_sl_cai_resume_equals_uninterrupted_run(tmp_path: Path, model, tokenizer, one_thread) -> None:  # noqa: ANN001
    whole, parts = tmp_path / "whole.jsonl", tmp_path / "parts.jsonl"
    run_sl_cai(model, tokenizer, PROMPTS, DEFAULT_CONSTITUTION, 1, FAST, whole, batch_size=2)
    first = run_sl_cai(model, tokenizer, PROMPTS, DEFAULT_CONSTITUTION, 1, FAST, parts, limit=3, batch_size=2)
    rest = run_sl_cai(model, tokenizer, PROMPTS, DEFAULT_CONSTITUTION, 1, FAST, parts, batch_size=2)
    assert (first.written, rest.resumed_from, rest.written) == (3, 3, 2)
    assert parts.read_text() == whole.read_text()
    assert run_sl_cai(model, tokenizer, PROMPTS, DEFAULT_CONSTITUTION, 1, FAST, parts, batch_size=2).written == 0
    assert parts.read_text() == whole.read_text()


def test_resume_drops_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text('{"index": 0}\n{"index": 1}\n{"index": 2, "mess')
    assert resume_index(path) == 2 and path.read_text() == '{"index": 0}\n{"index": 1}\n'
    path.write_text('{"index": 0}\n{"text": "not ours"}\n')
    with pytest.raises(LlmkitError, match="line 2 is not a row this command wrote"):
        resume_index(path)


# ---- RLAIF -----------------------------------------------------------------------------------------------------------


def brute_force_option_logp(model, tokenizer, prompt: str, option: str) -> float:  # noqa: ANN001
    """log p(option | prompt) from one unpadded forward over prompt + option and a full log-softmax."""
    prompt_ids, option_ids = tokenizer.encode(prompt), tokenizer.encode(option, add_bos=False)
    ids = torch.tensor([prompt_ids + option_ids])
    with torch.no_grad():
        logps = model(ids)[0].double().log_softmax(-1)
    return sum(float(logps[len(prompt_ids) - 1 + k, token]) for k, token in enumerate(option_ids))


def test_label_probability_is_softmax_of_option_logps(model, tokenizer, one_thread) -> None:  # noqa: ANN001
    prompts = [question_prompt(tokenizer, text) for text in ("short one?", "a much longer question, padded left?",
                                                             "third")]
    logps = option_logps(model, tokenizer, prompts, batch_size=2)  # padded batches of 4 and 2 rows
    for row, prompt in enumerate(prompts):
        brute = [brute_force_option_logp(model, tokenizer, prompt, option) for option in OPTIONS]
        assert logps[row].tolist() == pytest.approx(brute, abs=1e-5)  # float32 forwards, padded vs not
        expected = torch.softmax(torch.tensor(brute, dtype=torch.float64), 0)[0]
        assert abs(float(choice_probability(logps)[row]) - float(expected)) <= 1e-6
    assert not torch.allclose(logps[:, 0], logps[:, 1])  # the options do get different scores


def test_position_averaging_gives_the_complement_when_swapped(model, tokenizer, one_thread) -> None:  # noqa: ANN001
    conversations, a, b = ["Human: hi"] * 2, ["Hello there.", "Go away."], ["Go away.", "Nice to meet you!"]
    principles = list(DEFAULT_CONSTITUTION[:2])
    forward = judge(model, tokenizer, conversations, a, b, principles)
    backward = judge(model, tokenizer, conversations, b, a, principles)
    for f, r in zip(forward, backward, strict=True):
        assert f.p_first == pytest.approx(1 - r.p_first, abs=1e-12)
        assert f.p_a == r.p_a_swapped and f.p_a_swapped == r.p_a
    one_way = judge(model, tokenizer, conversations, a, b, principles, position_average=False)
    assert [j.p_first for j in one_way] == [j.p_a for j in forward] and one_way[0].p_a_swapped is None


def test_rlaif_rows_are_preference_pairs_and_resume(tmp_path: Path, model, tokenizer, one_thread) -> None:  # noqa: ANN001
    whole, parts = tmp_path / "whole.jsonl", tmp_path / "parts.jsonl"
    counts = run_rlaif(model, tokenizer, PROMPTS, DEFAULT_CONSTITUTION, FAST, whole, batch_size=2)
    assert counts.written + counts.skipped == len(PROMPTS) and counts.written >= 4
    pairs, _ = load_pairs(whole)
    rows = [json.loads(line) for line in whole.read_text().splitlines()]
    for pair, row in zip(pairs, rows, strict=True):
        assert pair.prompt == tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[row["index"]]}])
        assert pair.chosen != pair.rejected and 0.5 <= row["preference"] < 1
        p_first = (row["p_a"] + 1 - row["p_a_swapped"]) / 2
        assert row["preference"] == pytest.approx(max(p_first, 1 - p_first))
    run_rlaif(model, tokenizer, PROMPTS, DEFAULT_CONSTITUTION, FAST, parts, limit=1, batch_size=2)
    run_rlaif(model, tokenizer, PROMPTS, DEFAULT_CONSTITUTION, FAST, parts, batch_size=2)
    assert parts.read_text() == whole.read_text()


def test_human_agreement_counts_agreeing_pairs(model, tokenizer, one_thread) -> None:  # noqa: ANN001
    pairs = [PreferencePair("\n\nHuman: hi\n\nAssistant:", " Hello.", " Go away."),
             PreferencePair("\n\nHuman: help\n\nAssistant:", " Sure, how?", " No.")]
    figures = human_agreement(model, tokenizer, pairs, DEFAULT_CONSTITUTION, seed=0)
    verdicts = judge(model, tokenizer, ["Human: hi", "Human: help"], [" Hello.", " Sure, how?"], [" Go away.", " No."],
                     _principles_for(2))
    assert figures["pairs"] == 2
    assert figures["agreement"] == sum(v.p_first > 0.5 for v in verdicts) / 2
    assert figures["position_bias"] == pytest.approx(sum((v.p_a + v.p_a_swapped) / 2 for v in verdicts) / 2)


def _principles_for(n: int) -> list[Principle]:
    from llmkit.align.constitution_feedback import principle_for

    return [principle_for(DEFAULT_CONSTITUTION, index, 0) for index in range(n)]


def test_red_team_prompts_are_first_human_turns() -> None:
    pairs = [PreferencePair("\n\nHuman: How do I steal?\n\nAssistant: No.\n\nHuman: Please?\n\nAssistant:", " a", " b")]
    assert red_team_prompts(pairs) == ["How do I steal?"]


# ---- the verb --------------------------------------------------------------------------------------------------------


@pytest.fixture
def model_dir(tmp_path: Path, model, tokenizer) -> Path:  # noqa: ANN001
    from llmkit.checkpoints import save_model

    save_model(model, tmp_path / "tiny", tokenizer=tokenizer)
    return tmp_path / "tiny"


def test_cli_writes_both_files_and_resumes(tmp_path: Path, model_dir: Path, capsys, one_thread) -> None:  # noqa: ANN001
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    principles = write_principles(tmp_path / "p.yaml", VALID)
    args = ["constitution", "--model", str(model_dir), "--prompts", str(prompts), "--principles", str(principles),
            "--output", str(tmp_path / "run"), "--max_new_tokens", "5", "--batch_size", "2", "--agreement_pairs", "0",
            "--device", "cpu"]
    code, out, err = run_cli(capsys, *args, "--limit", "2")
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["principles"] == ["harm", "honesty"] and summary["sl_cai"]["rows"] == 2
    assert "position bias" in out
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "run" / "sl_cai.jsonl").read_text().splitlines()]
    assert [row["index"] for row in rows] == list(range(len(PROMPTS)))
    assert {row["principles"][0] for row in rows} <= {"harm", "honesty"}
    load_pairs(tmp_path / "run" / "rlaif.jsonl")
    code, err = cli_status(capsys, *args, "--seed", "1")
    assert code == 2 and "started with --seed 0" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("case", ["bad_principles", "missing_principles", "empty_prompts", "missing_prompts"])
def test_cli_bad_input_is_one_line(tmp_path: Path, model_dir: Path, capsys, case: str) -> None:  # noqa: ANN001
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hi"}])
    principles = write_principles(tmp_path / "p.yaml", VALID)
    if case == "bad_principles":
        principles = write_principles(tmp_path / "p.yaml", VALID.replace("    critique: Find harm in your reply.\n", ""))
    elif case == "missing_principles":
        principles = tmp_path / "none.yaml"
    elif case == "empty_prompts":
        prompts = write_jsonl(tmp_path / "prompts.jsonl", [])
    else:
        prompts = tmp_path / "none.jsonl"
    code, err = cli_status(capsys, "constitution", "--model", str(model_dir), "--prompts", str(prompts),
                           "--principles", str(principles), "--output", str(tmp_path / "run"))
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    named = {"bad_principles": "no field 'critique'", "missing_principles": "none.yaml",
             "empty_prompts": "prompts.jsonl", "missing_prompts": "none.jsonl"}[case]
    assert named in err


# ---- real weights ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_revises_and_labels(tmp_path: Path) -> None:
    from llmkit.checkpoints import default_model_path, load_tokenizer
    from llmkit.commands.common import load_decoder

    path = default_model_path()
    llm, smol = load_decoder(path, weights="float").eval(), load_tokenizer(path)
    settings = GenerationSettings(max_new_tokens=24, temperature=0.7, seed=0)
    prompt = ["How can I get back at my neighbour for his loud music?"]
    run_sl_cai(llm, smol, prompt, DEFAULT_CONSTITUTION, 1, settings, tmp_path / "sl.jsonl", batch_size=1)
    (row,) = [json.loads(line) for line in (tmp_path / "sl.jsonl").read_text().splitlines()]
    assert row["revisions"][0].strip() and row["revisions"][0] != row["initial"] and row["critiques"][0].strip()
    (verdict,) = judge(llm, smol, [f"Human: {prompt[0]}"], ["Talk to him politely about it."],
                       ["Slash his tyres."], [DEFAULT_CONSTITUTION[0]])
    assert 0 < verdict.p_a < 1 and 0 < verdict.p_a_swapped < 1 and 0 < verdict.p_first < 1
