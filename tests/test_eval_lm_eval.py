"""lm-eval adapter: its three request kinds equal llmkit's own scoring / a hand computation / llmkit's generate,
and lm-eval runs a local JSONL task on it (Python API and command line) with the accuracy llmkit's scores give.
Everything is offline: a tiny random model and a byte-level tokenizer are saved here, the task reads a local file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance

from llmkit import Config, LlmkitError
from llmkit.checkpoints import default_model_path, load_model, load_tokenizer, save_model
from llmkit.checkpoints.hf import to_hf_state_dict
from llmkit.checkpoints.hf_config import LLAMA
from llmkit.eval.lm_eval_adapter import LlmkitLM
from llmkit.eval.scoring import continuation_logprobs, rolling_loglikelihood
from llmkit.generate import SamplingSettings, generate, generate_tokens
from llmkit.models.decoder import Decoder
from llmkit.tokenizer import Tokenizer
from tests.helpers import byte_tokenizer

EOS = "<|endoftext|>"
TASK_NAME = "llmkit_tiny_mc"
GEN_TASK_NAME = "llmkit_tiny_gen"
MC_ROWS = [
    {"question": "What colour is the clear sky?", "choices": ["blue", "green", "red"], "answer": 0},
    {"question": "Two plus two?", "choices": ["three", "four"], "answer": 1},
    {"question": "What does a cat say?", "choices": ["woof", "moo", "meow", "quack"], "answer": 2},
    {"question": "Opposite of hot?", "choices": ["cold", "warm"], "answer": 0},
    {"question": "Which is a fruit?", "choices": ["carrot", "apple", "potato"], "answer": 1},
    {"question": "Largest planet?", "choices": ["Mars", "Venus", "Jupiter"], "answer": 2},
]
GEN_ROWS = [{"prompt": "Once upon a time"}, {"prompt": "Q: hello\nA:"}, {"prompt": "abc"}]
CONTEXT = "Question: {{question}}\nAnswer:"
@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory):
    """No hub access anywhere, and datasets' cache kept out of the home directory."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "datasets-cache"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = Decoder(Config.from_name("tiny-llama", vocab_size=257)).eval()
    path = tmp_path_factory.mktemp("tiny-model")
    save_model(model, path, byte_tokenizer((EOS,), eos_id=256))
    return path


@pytest.fixture(scope="module")
def lm(model_dir) -> LlmkitLM:
    return LlmkitLM(pretrained=str(model_dir), device="cpu", batch_size=3)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """A multiple-choice and a generation task in lm-eval's YAML format over local JSONL files."""
    path = tmp_path_factory.mktemp("tasks")
    for name, rows in (("mc.jsonl", MC_ROWS), ("gen.jsonl", GEN_ROWS)):
        (path / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    (path / f"{TASK_NAME}.yaml").write_text(
        f"task: {TASK_NAME}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path / 'mc.jsonl'}\n"
        f"output_type: multiple_choice\ntest_split: test\ndoc_to_text: {json.dumps(CONTEXT)}\n"
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (path / f"{GEN_TASK_NAME}.yaml").write_text(
        f"task: {GEN_TASK_NAME}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path / 'gen.jsonl'}\n"
        'output_type: generate_until\ntest_split: test\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "x"\n'
        'generation_kwargs:\n  until: ["\\n", "e"]\n  max_gen_toks: 6\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    return path


def requests(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=args, idx=0) for args in arguments]


def token_logprob(model: Decoder, context: list[int], token: int) -> float:
    """log p(token | context) from one forward over the context alone."""
    with torch.no_grad():
        logits = model(torch.tensor([context]))[0, -1]  # (V,)
    return logits.log_softmax(-1)[token].item()


# ---- the three request kinds ---------------------------------------------------------------------------------------


def test_loglikelihood_equals_llmkit_scoring(lm):
    pairs = [("Question: Two plus two?\nAnswer:", " four"), ("The cat", " sat on the mat"), ("abc", "d"),
             ("A longer context so the batch holds rows of different lengths.", " ok")]  # fmt: skip
    expected = continuation_logprobs(lm.model, lm.tokenizer, pairs, batch_size=3)
    results = lm.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    assert results == [(score.logprob, score.is_greedy) for score in expected]
    # and one of them by hand: the continuation's tokens scored one at a time
    context, continuation = lm.tokenizer.encode("The cat"), lm.tokenizer.encode(" sat on the mat")
    by_hand = sum(token_logprob(lm.model, context + continuation[:i], token) for i, token in enumerate(continuation))
    assert results[1][0] == pytest.approx(by_hand, abs=1e-4)  # float32 sums over different batch shapes
    assert all(not greedy for _, greedy in results[:2])


def test_loglikelihood_is_greedy_for_the_greedy_continuation(lm):
    # A random byte model often picks bytes >= 128 that do not decode alone: take a context whose greedy
    # 2-token continuation is printable ASCII, so the text round-trips to the same ids.
    for context in (first + second for first in "abcdefghij" for second in "xyz"):
        ids = [step[0] for step in generate_tokens(lm.model, lm.tokenizer.encode(context), 2)]
        if all(32 <= token < 127 for token in ids):
            break
    else:
        pytest.fail("no context with an ASCII greedy continuation")
    greedy = lm.tokenizer.decode(ids)
    other = greedy[:-1] + chr(ord(greedy[-1]) ^ 1)  # the last byte changed
    (logprob, is_greedy), (other_logprob, other_greedy) = lm.loglikelihood(
        requests("loglikelihood", [(context, greedy), (context, other)]), disable_tqdm=True
    )
    assert is_greedy and not other_greedy and logprob > other_logprob


def test_loglikelihood_rolling_equals_hand_computation(model_dir):
    """Windows of max_length tokens, each token scored once; later windows condition on the max_length tokens
    before their last token (lm-eval's disjoint rolling windows, context_len=1)."""
    lm = LlmkitLM(pretrained=str(model_dir), device="cpu", batch_size=2, max_length=8)
    texts = ["short", "Twenty-seven bytes of text.", ""]
    results = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,) for text in texts]), True)
    prefix = lm.tokenizer.eos_id  # no BOS: the first token is conditioned on EOS
    for text, result in zip(texts, results):
        ids, total, length = lm.tokenizer.encode(text), 0.0, 8
        for i, token in enumerate(ids):
            if i < length:  # first window: [EOS] + the tokens before
                context = [prefix] + ids[:i]
            else:  # window of tokens [start, end): input is the max_length tokens ending just before `end`
                start = i - i % length
                end = min(start + length, len(ids))
                context = ids[end - length - 1 : i]
            total += token_logprob(lm.model, context, token)
        assert result == pytest.approx(total, abs=1e-4)  # float32 sums over different batch shapes
        if text:  # llmkit's own perplexity path windows the text the same way
            assert result == pytest.approx(rolling_loglikelihood(lm.model, lm.tokenizer, text, window=8), abs=1e-4)
    assert len(lm.tokenizer.encode(texts[1])) == 27 and results[2] == 0.0  # 4 windows, the last one short


def test_generate_until_honours_until_and_max_gen_toks(lm):
    prompts = ["Once upon a time", "Q: hello\nA:", "abc", "A much longer prompt than the others"]
    free = generate(lm.model, lm.tokenizer, prompts, max_new_tokens=24)
    stops = [text[3:5] for text in free]  # a stop string that occurs in the free-running output
    assert all(len(text) >= 8 for text in free)
    greedy = {"until": None, "max_gen_toks": 24, "do_sample": False}
    arguments = [(prompt, {**greedy, "until": [stop]}) for prompt, stop in zip(prompts, stops)]
    arguments += [(prompts[0], {"max_gen_toks": 5, "until": ["\x00never"]}), (prompts[1], {**greedy, "until": []})]
    outputs = lm.generate_until(requests("generate_until", arguments), disable_tqdm=True)
    for text, stop, output in zip(free, stops, outputs):
        assert output == text[: text.index(stop)] and stop not in output
    assert outputs[4] == generate(lm.model, lm.tokenizer, prompts[0], max_new_tokens=5)
    assert outputs[5] == free[1]


def test_generate_until_sampling_settings_and_token_limit_aliases(lm):
    sampled = {"until": "", "max_new_tokens": 7, "do_sample": True, "temperature": 0.8, "top_k": 20, "seed": 3}
    greedy_despite_temperature = {"max_tokens": 4, "do_sample": False, "temperature": 0.8}
    outputs = lm.generate_until(
        requests("generate_until", [("abc", sampled), ("abc", greedy_despite_temperature)]), disable_tqdm=True
    )
    settings = SamplingSettings(temperature=0.8, top_k=20, seed=3)
    assert outputs[0] == generate(lm.model, lm.tokenizer, "abc", 7, settings)
    assert outputs[0] != generate(lm.model, lm.tokenizer, "abc", 7)  # it did sample
    assert outputs[1] == generate(lm.model, lm.tokenizer, "abc", 4)


def test_generate_until_rejects_unsupported_settings(lm):
    with pytest.raises(LlmkitError, match=r"generation_kwargs \['num_beams'\] are not supported"):
        lm.generate_until(requests("generate_until", [("abc", {"until": ["\n"], "num_beams": 4})]), True)
    with pytest.raises(LlmkitError, match="do_sample=True with temperature=0; set temperature > 0"):
        lm.generate_until(requests("generate_until", [("abc", {"do_sample": True, "temperature": 0})]), True)
    with pytest.raises(LlmkitError, match="max_gen_toks=0 must be a positive integer"):
        lm.generate_until(requests("generate_until", [("abc", {"max_gen_toks": 0})]), True)


# ---- lm-eval itself running local tasks ----------------------------------------------------------------------------


def test_lm_eval_multiple_choice_accuracy_equals_llmkit_scores(model_dir, task_dir):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(
        model="llmkit",  # resolved through lm-eval's registry, built from the model_args string
        model_args=f"pretrained={model_dir},device=cpu,batch_size=4",
        tasks=[TASK_NAME, GEN_TASK_NAME],
        task_manager=TaskManager(include_path=str(task_dir)),
        log_samples=True,
    )
    correct, correct_norm, pairs_by_question = 0, 0, {}
    lm = LlmkitLM(pretrained=str(model_dir), device="cpu")
    for row in MC_ROWS:
        pairs = [(f"Question: {row['question']}\nAnswer:", " " + choice) for choice in row["choices"]]
        logprobs = [score.logprob for score in continuation_logprobs(lm.model, lm.tokenizer, pairs)]
        normalised = [logprob / len(choice) for logprob, choice in zip(logprobs, row["choices"])]  # lm-eval's acc_norm
        correct += logprobs.index(max(logprobs)) == row["answer"]
        correct_norm += normalised.index(max(normalised)) == row["answer"]
        pairs_by_question[row["question"]] = pairs
    metrics = results["results"][TASK_NAME]
    assert metrics["acc,none"] == pytest.approx(correct / len(MC_ROWS), abs=1e-12)
    assert metrics["acc_norm,none"] == pytest.approx(correct_norm / len(MC_ROWS), abs=1e-12)
    assert 0 < correct < len(MC_ROWS) or 0 < correct_norm < len(MC_ROWS)  # the figures say something
    for sample in results["samples"][TASK_NAME]:  # lm-eval asked for exactly the pairs scored above
        assert [tuple(pair) for pair in sample["arguments"]] == pairs_by_question[sample["doc"]["question"]]
    # the generation task: lm-eval's responses are llmkit's greedy outputs cut at the first "\n" or "e"
    responses = {sample["doc"]["prompt"]: sample["resps"][0][0] for sample in results["samples"][GEN_TASK_NAME]}
    for row in GEN_ROWS:
        assert responses[row["prompt"]] == generate(lm.model, lm.tokenizer, row["prompt"], 6, stop_strings=["\n", "e"])


def test_lm_eval_command_line_runs_the_local_task(model_dir, task_dir, tmp_path):
    command = [
        sys.executable, "-m", "llmkit.eval.lm_eval_adapter", "--model", "llmkit",
        "--model_args", f"pretrained={model_dir},device=cpu", "--tasks", TASK_NAME, "--include_path", str(task_dir),
        "--limit", "2", "--batch_size", "2", "--output_path", str(tmp_path / "out"),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert TASK_NAME in done.stdout and "acc" in done.stdout
    (result_file,) = (tmp_path / "out").rglob("results_*.json")
    saved = json.loads(result_file.read_text())
    assert saved["config"]["model"] == "llmkit" and saved["config"]["batch_size"] == "2"
    assert saved["config"]["model_name"] == "tiny-llama" and saved["config"]["model_dtype"] == "torch.float32"
    assert saved["results"][TASK_NAME]["acc,none"] in (0.0, 0.5, 1.0)  # two rows


# ---- bad arguments -------------------------------------------------------------------------------------------------


def test_bad_model_args(model_dir, lm):
    with pytest.raises(LlmkitError, match=r"unknown llmkit model_args \['temprature'\]"):
        LlmkitLM.create_from_arg_string(f"pretrained={model_dir},temprature=0.5")
    with pytest.raises(LlmkitError, match=r"batch_size='auto' must be a positive integer \(llmkit has no batch_size"):
        LlmkitLM.create_from_arg_string(f"pretrained={model_dir},device=cpu", {"batch_size": "auto"})
    with pytest.raises(LlmkitError, match="max_length=300 is longer than tiny-llama's context of 256"):
        LlmkitLM(pretrained=str(model_dir), device="cpu", max_length=300)
    with pytest.raises(LlmkitError, match="pass either pretrained=PATH, or both model= and tokenizer="):
        LlmkitLM(model=lm.model)
    with pytest.raises(LlmkitError, match="max_batch_size=4 only applies to batch_size=auto"):
        LlmkitLM.create_from_arg_obj({"pretrained": str(model_dir)}, {"max_batch_size": 4})


def test_model_args_batch_size_wins_over_the_cli_default(model_dir):
    lm = LlmkitLM.create_from_arg_string(f"pretrained={model_dir},device=cpu,batch_size=5", {"batch_size": 1})
    assert lm.batch_size == 5 and lm.max_length == 256 and lm.device.type == "cpu"


def test_rolling_needs_bos_or_eos(lm):
    tokenizer = Tokenizer(lm.tokenizer.backend)  # neither BOS nor EOS
    bare = LlmkitLM(model=lm.model, tokenizer=tokenizer, batch_size=1)
    with pytest.raises(LlmkitError, match="has neither BOS nor EOS"):
        bare.loglikelihood_rolling(requests("loglikelihood_rolling", [("abc",)]), True)


# ---- the real SmolLM2 weights against lm-eval's own Hugging Face model -----------------------------------------------


def hf_llama_copy(model: Decoder):
    """transformers' Llama with `model`'s shapes and weights (a straight key map): the reference forward pass."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, max_position_embeddings=c.max_seq_len,
        rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=c.tie_embeddings,
    )).eval()  # fmt: skip
    # the importer's own key map, run in the export direction
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(c, model.state_dict(), LLAMA), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # a tied head is the embedding
    return hf


@pytest.mark.slow
def test_matches_lm_eval_hflm_on_smollm2(tmp_path):
    """On SmolLM2-135M-Instruct, the adapter answers all three request kinds as lm-eval's own HFLM does over a
    transformers Llama holding the same weights and the same tokenizer.json (texts without digit runs)."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    path = default_model_path()
    model, tokenizer = load_model(path), load_tokenizer(path)
    tokenizer.save(tmp_path)
    reference = HFLM(pretrained=hf_llama_copy(model), tokenizer=AutoTokenizer.from_pretrained(tmp_path), batch_size=4,
                     max_length=64, device="cpu")  # fmt: skip
    ours = LlmkitLM(model=model, tokenizer=tokenizer, batch_size=4, max_length=64)
    pairs = [("Question: What colour is the clear sky?\nAnswer:", " blue"), ("The cat sat on the", " mat"),
             ("", "Hello world"), ("Paris is the capital of ", "France")]  # fmt: skip
    text = "The quick brown fox jumps over the lazy dog. " * 12  # several 64-token windows
    prompt = ("The capital of France is", {"until": ["."], "max_gen_toks": 12, "do_sample": False})
    for lm_kind, arguments in (("loglikelihood", pairs), ("loglikelihood_rolling", [(text,)])):
        expected = getattr(reference, lm_kind)(requests(lm_kind, arguments), disable_tqdm=True)
        results = getattr(ours, lm_kind)(requests(lm_kind, arguments), disable_tqdm=True)
        for result, reference_result in zip(results, expected):
            if lm_kind == "loglikelihood":
                assert result[1] == reference_result[1]
                result, reference_result = result[0], reference_result[0]
            # float32 logits summed in a different order (transformers vs llmkit kernels): ~1e-6 relative seen
            assert result == pytest.approx(reference_result, rel=1e-4)
    generated = ours.generate_until(requests("generate_until", [prompt]), disable_tqdm=True)
    assert generated == reference.generate_until(requests("generate_until", [prompt]), disable_tqdm=True)
    assert generated[0].strip()  # the model said something before the stop string
