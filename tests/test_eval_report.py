"""Aggregate report: rescaling against the random baseline, category and overall averages on hand-computed
numbers, the side-by-side table and the files written; the evaluate verb end to end on tiny models and, slow,
on SmolLM2-135M-Instruct with the built-in sst2 and dialogsum tasks."""

import json

import matplotlib.image
import pytest
import torch

from llmkit import Config, LlmkitError
from llmkit.checkpoints import save_model
from llmkit.commands.evaluate import evaluate, load_tasks, model_labels
from llmkit.eval.report import aggregate, comparison_table, markdown_report, rescale, write_report
from llmkit.eval.runner import TaskResult
from llmkit.models.decoder import Decoder
from tests.helpers import byte_tokenizer


def result(name: str, category: str, score: float, baseline: float) -> TaskResult:
    return TaskResult(name=name, category=category, kind="multiple_choice", metric="acc", score=score,
                      random_baseline=baseline, metrics={"acc": score}, n_rows=10, num_fewshot=0, source=f"{name} data")


RESULTS = [
    result("t1", "reading", 0.75, 0.5),  # (0.75 - 0.5) / 0.5 = 0.5
    result("t2", "reading", 0.4, 0.25),  # (0.4 - 0.25) / 0.75 = 0.2
    result("t3", "safety", 0.3, 0.0),  # 0.3
    result("t4", "safety", 0.2, 0.5),  # below chance: clipped to 0
]


def test_rescale_maps_baseline_to_zero_and_perfect_to_one_and_clips_below_chance():
    assert rescale(0.5, 0.5) == 0.0 and rescale(1.0, 0.25) == 1.0
    assert rescale(0.75, 0.5) == pytest.approx(0.5)
    assert rescale(0.3, 0.0) == pytest.approx(0.3)
    assert rescale(0.2, 0.5) == 0.0
    with pytest.raises(LlmkitError, match=r"random baseline 1.0 must lie in \[0, 1\)"):
        rescale(0.5, 1.0)


def test_aggregate_averages_categories_then_categories_into_overall():
    report = aggregate(RESULTS, model="m")
    assert [task["rescaled"] for task in report["tasks"]] == pytest.approx([0.5, 0.2, 0.3, 0.0])
    assert report["categories"] == pytest.approx({"reading": 0.35, "safety": 0.15})
    assert report["overall"] == pytest.approx(0.25)  # mean of categories, not of tasks (0.25 here too by chance)
    uneven = aggregate(RESULTS[:3], model="m")  # reading 0.35 (2 tasks), safety 0.3 (1 task)
    assert uneven["overall"] == pytest.approx((0.35 + 0.3) / 2)  # 0.325; the task mean would be 0.333
    with pytest.raises(LlmkitError, match="no task results to report"):
        aggregate([])


def test_perplexity_is_reported_but_not_averaged():
    ppl = TaskResult(name="ppl", category="language_modeling", kind="perplexity", metric="perplexity", score=23.736,
                     random_baseline=None, metrics={"perplexity": 23.736}, n_rows=2047, num_fewshot=0)
    report = aggregate([*RESULTS, ppl], model="m")
    assert report["tasks"][-1]["rescaled"] is None
    assert report["categories"] == pytest.approx({"reading": 0.35, "safety": 0.15}) and report["overall"] == 0.25
    cells = [[cell.strip() for cell in line.split("|")[1:-1]] for line in comparison_table([report]).splitlines()]
    assert cells[6] == ["ppl", "language_modeling", "perplexity", "23.74"]
    alone = aggregate([ppl], model="m")
    assert (alone["categories"], alone["overall"]) == ({}, None)
    assert comparison_table([alone]).splitlines()[-1].split("|")[4].strip() == "-"


def test_comparison_table_puts_models_side_by_side():
    reports = [aggregate(RESULTS, model="base"), aggregate(RESULTS[:2], model="tuned")]
    table = comparison_table(reports)
    cells = [[cell.strip() for cell in line.split("|")[1:-1]] for line in table.splitlines()]
    assert cells[0] == ["task", "category", "metric", "base", "tuned"]
    assert len({len(line) for line in table.splitlines()}) == 1  # columns padded to one width
    assert cells[2] == ["t1", "reading", "acc", "0.750 (0.500)", "0.750 (0.500)"]
    assert cells[4] == ["t3", "safety", "acc", "0.300 (0.300)", "-"]  # t3 was not run on tuned
    assert cells[-3:] == [["**reading**", "", "rescaled", "0.350", "0.350"],
                          ["**safety**", "", "rescaled", "0.150", "-"],
                          ["**overall**", "", "rescaled", "0.250", "0.350"]]


def test_write_report_writes_json_markdown_and_a_png_chart(tmp_path):
    reports = [aggregate(RESULTS, model="base"), aggregate(RESULTS[:2], model="tuned")]
    paths = write_report(reports, tmp_path / "out")
    written = json.loads(paths["json"].read_text())
    assert [m["model"] for m in written["models"]] == ["base", "tuned"]
    assert written["models"][0]["categories"] == pytest.approx({"reading": 0.35, "safety": 0.15})
    markdown = paths["markdown"].read_text()
    assert markdown == markdown_report(reports)
    assert comparison_table(reports) in markdown and "![category scores](report.png)" in markdown
    assert "- `t1`: t1 data" in markdown
    image = matplotlib.image.imread(paths["chart"])
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0  # bars were drawn, not a blank canvas


def test_model_labels_are_short_and_unique(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "m.gguf").write_bytes(b"")
    (tmp_path / "b").mkdir()
    labels = model_labels([tmp_path / "a" / "m.gguf", tmp_path / "b", tmp_path / "b"])
    assert labels == ["m", "b#1", "b#2"]


def test_load_tasks_errors():
    with pytest.raises(LlmkitError, match="no tasks given"):
        load_tasks(" , ")
    with pytest.raises(LlmkitError, match=r"task name\(s\) \['sst2'\] appear more than once"):
        load_tasks("sst2,sst2")
    with pytest.raises(LlmkitError, match=r"nope.yaml is not a task spec file"):
        load_tasks("nope.yaml")


# --- the evaluate verb ----------------------------------------------------------------------------------------


def test_evaluate_compares_two_models_and_writes_report_and_prompts(tmp_path, capsys):
    for seed in (0, 1):
        torch.manual_seed(seed)
        save_model(Decoder(Config.from_name("tiny-llama")), tmp_path / f"model{seed}", tokenizer=byte_tokenizer(eos_id=0))
    rows = [{"q": f"Is {n} even?", "label": int(n % 2 == 0), "answer": str(n % 2 == 0)} for n in range(6)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "even.yaml").write_text("name: even\nkind: multiple_choice\nprompt: '{{ q }}'\nchoices: \"['no', 'yes']\"\n"
                                        "answer: label\ndata: rows.jsonl\nnum_fewshot: 1\ncategory: math\n")
    (tmp_path / "say.yaml").write_text("name: say\nkind: generation\nprompt: '{{ q }}'\ntarget: answer\ndata: rows.jsonl\n"
                                       "max_new_tokens: 4\nmetric: f1\n")
    out = tmp_path / "eval_out"
    reports = evaluate(model=[str(tmp_path / "model0"), str(tmp_path / "model1")],
                       tasks=f"{tmp_path / 'even.yaml'},{tmp_path / 'say.yaml'},perplexity", limit=4, batch_size=3,
                       output=str(out), progress=False)
    assert [report["model"] for report in reports] == ["model0", "model1"]
    assert [task["n_rows"] for task in reports[0]["tasks"]] == [4, 4, 2047]  # perplexity: tokens scored
    assert reports[0]["tasks"][0]["random_baseline"] == 0.5
    assert reports[0]["categories"].keys() == {"math", "other"}  # perplexity is not averaged
    assert reports[0]["tasks"][2]["score"] != reports[1]["tasks"][2]["score"]  # two different models
    printed = capsys.readouterr().out
    assert comparison_table(reports) in printed
    assert json.loads((out / "results.json").read_text())["models"] == json.loads(json.dumps(reports))
    assert (out / "report.md").is_file() and (out / "report.png").stat().st_size > 1000
    samples = [json.loads(line) for line in (out / "prompts" / "model1" / "even.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and samples[0]["target"] == "yes" and samples[0]["prompt"].endswith("Is 0 even?")
    assert samples[0]["prompt"].count("even?") == 2  # one solved example, then the row
    assert sorted(p.name for p in (out / "prompts" / "model0").iterdir()) == ["even.jsonl", "say.jsonl"]
    generated = [json.loads(line) for line in (out / "prompts" / "model0" / "say.jsonl").read_text().splitlines()]
    assert [sample["target"] for sample in generated] == ["True", "False", "True", "False"]
    assert all(isinstance(sample["prediction"], str) for sample in generated)


@pytest.mark.slow
def test_evaluate_smollm2_on_sst2_is_above_chance(tmp_path):
    report = evaluate(tasks="sst2", limit=40, output=str(tmp_path), progress=False)[0]
    sst2 = report["tasks"][0]
    # SmolLM2-135M-Instruct gets 33 of the first 40 dev sentences (0.825) zero-shot. Guessing gets 0.5, and a
    # guesser reaches 28 of 40 (0.7) with probability under 1%.
    assert sst2["score"] >= 0.7 and sst2["rescaled"] >= 0.4 and report["overall"] == sst2["rescaled"]
    for name in ("results.json", "report.md", "report.png"):
        assert (tmp_path / name).is_file()
    samples = (tmp_path / "prompts" / "SmolLM2-135M-Instruct.Q4_1" / "sst2.jsonl").read_text().splitlines()
    assert len(samples) == 40 and json.loads(samples[0])["prompt"].endswith("journey .\nSentiment:")


@pytest.mark.slow
def test_evaluate_smollm2_on_dialogsum_writes_summaries(tmp_path):
    summary = evaluate(tasks="dialogsum", limit=2, output=str(tmp_path), progress=False)[0]["tasks"][0]
    # 1-shot, the model writes one-sentence summaries in the #Person1# style (ROUGE-1 about 0.24 on these two);
    # a reply with no word in common with the references would score 0.
    assert summary["metrics"]["rouge1"] > 0.1
    lines = (tmp_path / "prompts" / "SmolLM2-135M-Instruct.Q4_1" / "dialogsum.jsonl").read_text().splitlines()
    predictions = [json.loads(line)["prediction"] for line in lines]
    assert len(predictions) == 2 and all("#Person" in text and "\n" not in text for text in predictions)
    assert (tmp_path / "report.png").is_file()
