"""The application building blocks: templates, memory, Pipeline (on a scripted model) and LocalModel (on a tiny
random decoder: its completions equal `generate`'s, its JSON completions parse and follow the schema)."""

from __future__ import annotations

import json

import pytest

from llmkit.apps import ConversationMemory, LocalModel, Pipeline
from llmkit.data.templates import PromptTemplate
from llmkit.errors import LlmkitError
from llmkit.generate import SamplingSettings, generate
from llmkit.tokenizer import Tokenizer
from tests.helpers import ScriptedModel, byte_tokenizer, tiny_decoder


def byte_eos_tokenizer() -> Tokenizer:
    """Byte-level ids 0-255 and EOS 256: every JSON document is spellable."""
    return byte_tokenizer(specials=["</s>"], eos_id=256)


def test_template_names_missing_fields_and_keeps_literal_braces():
    template = PromptTemplate("Q: {question}\nContext: {context}\nAnswer as {{\"answer\": ...}}")
    assert template.fields() == {"question", "context"}
    assert template.format(question="why?", context="none", extra=1) == 'Q: why?\nContext: none\nAnswer as {"answer": ...}'
    with pytest.raises(LlmkitError, match="needs context; pass context=..."):
        template.format(question="why?")


def test_memory_keeps_the_last_turns_and_the_system_message():
    memory = ConversationMemory(system="be brief", max_turns=2)
    for index in range(3):
        memory.add(f"u{index}", f"a{index}")
    assert memory.messages("u3") == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"},
        {"role": "user", "content": "u3"}]
    none_kept = ConversationMemory(max_turns=0)
    none_kept.add("u", "a")
    assert none_kept.messages() == []
    with pytest.raises(LlmkitError, match="max_turns=-1"):
        ConversationMemory(max_turns=-1)


def test_pipeline_sends_the_conversation_and_parses_the_reply():
    model = ScriptedModel([" 4 ", "The answer is 8."])
    memory = ConversationMemory()
    ask = Pipeline("What is {a} + {b}?", model, parser=lambda reply: int(reply.split()[-1].rstrip(".")), memory=memory)
    assert ask(a=2, b=2) == 4
    assert ask(a=4, b=4) == 8
    # the second prompt holds the first exchange, then the new question
    assert model.prompts[1] == "User: What is 2 + 2?\nAssistant:  4 \nUser: What is 4 + 4?\nAssistant:"
    assert memory.turns == [("What is 2 + 2?", " 4 "), ("What is 4 + 4?", "The answer is 8.")]


def test_pipeline_reports_an_unparsable_reply_and_sample_marks_it():
    ask = Pipeline("{q}", ScriptedModel(["forty-two", "42", "x"]), parser=int)
    with pytest.raises(LlmkitError, match="could not parse the model's reply 'forty-two'"):
        ask(q="?")
    assert ask.sample(2, q="?") == [("42", 42), ("x", None)]


def test_pipeline_stop_strings_cut_the_reply():
    ask = Pipeline("{q}", ScriptedModel(["Paris\nQ: next question"]), stop=("\nQ:",))
    assert ask(q="capital of France?") == "Paris"


def test_local_model_completes_like_generate(one_thread):
    tokenizer = byte_eos_tokenizer()
    model = tiny_decoder(vocab_size=257)
    local = LocalModel(model, tokenizer, batch_size=2)
    prompts = ["abc", "hello there", "x"]
    settings = SamplingSettings()
    assert local.complete(prompts, 6, settings) == generate(model, tokenizer, prompts, 6, settings)
    assert local.count_tokens("hello") == 5
    with pytest.raises(LlmkitError, match="prompts is one string"):
        local.complete("abc", 4)


def test_local_model_json_follows_the_schema(one_thread):
    schema = {"type": "object", "properties": {"action": {"enum": ["search", "calculator", "finish"]},
                                               "input": {"type": "string", "maxLength": 12}},
              "required": ["action", "input"], "additionalProperties": False}
    local = LocalModel(tiny_decoder(vocab_size=257, seed=1), byte_eos_tokenizer())
    for seed in range(3):
        text = local.complete_json("Act: ", schema, 48, SamplingSettings(temperature=1.0, seed=seed))
        value = json.loads(text)
        assert set(value) == {"action", "input"} and value["action"] in ("search", "calculator", "finish")
        assert len(value["input"]) <= 12


def test_local_model_without_chat_template_says_so():
    with pytest.raises(LlmkitError, match="has no chat template"):
        LocalModel(tiny_decoder(vocab_size=257), byte_eos_tokenizer()).chat_prompt([{"role": "user", "content": "hi"}])


@pytest.mark.slow
def test_smollm2_chat_pipeline_and_json_action(smollm2_local):
    ask = Pipeline("What is the capital of France? Answer with one word.", smollm2_local, chat=True, max_new_tokens=8)
    assert "Paris" in ask()
    schema = {"type": "object", "properties": {"action": {"enum": ["search", "calculator"]},
                                               "input": {"type": "string", "maxLength": 40}},
              "required": ["action", "input"], "additionalProperties": False}
    prompt = smollm2_local.chat_prompt([{"role": "user", "content":
                                         "Which tool computes 17 * 23? Reply as JSON with keys action and input."}])
    value = json.loads(smollm2_local.complete_json(prompt, schema, 40))
    assert value["action"] in ("search", "calculator") and len(value["input"]) <= 40
