"""JSON-constrained decoding: the byte parser against `json.loads`, every sampled output parses and validates (tiny
random decoder and real SmolLM2), and `pick` draws from the model's distribution restricted to the allowed tokens."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
from scipy.stats import chisquare

from llmkit import LlmkitError
from llmkit.generate import SamplingSettings
from llmkit.generate.constrained import JsonConstraint, constrained_ids, token_table
from llmkit.generate.json_grammar import JsonParser
from llmkit.generate.json_schema import ANY, compile_schema
from llmkit.generate.sampling import process_logits
from tests.helpers import byte_tokenizer, tiny_decoder

EOS = "<|endoftext|>"

VALID = [
    '{}', '[]', '0', '-0', '-12.5e+3', '1E-7', '3.25', 'true', 'false', 'null', '""', '"plain"',
    '"esc \\" \\\\ \\/ \\b \\f \\n \\r \\t \\u00e9 \\uFFFF"', '"é 日本 😀"', '[1, "a", null, true, [], {}]',
    '{"a": {"b": [1, {"c": "d"}]}, "e": -0.5}', '  {"k":\n\t[ 1 , 2 ]\r}', '{"": 0, "x": ""}', '[[[[[]]]]]',
]
INVALID = [  # (text, index of the first byte a JSON parser must refuse)
    ('{,}', 1), ('[1,]', 3), ('01', 1), ('{"a"}', 4), ('{"a":1,}', 7), ('"\x01"', 1), ('[1 2]', 3), ('"\\x"', 2),
    ('1.e5', 2), ('-a', 1), ('tru e', 3), ('[1]]', 3), ("{'a':1}", 1),
    ('"\\u12g4"', 5), ('+1', 0), ('.5', 0), ('[01]', 2), ('{"a" 1}', 5), ('nul', None), ('"abc', None),
    ('[1, 2', None), ('{"a": ', None),
]
STRICTER = [('{"a":1,"a":2}', 9), ('"\\ud800"', 4)]  # json.loads takes repeated keys and lone surrogates; JSON mode not


def feed_all(parser: JsonParser, data: bytes) -> int | None:
    """Index of the first refused byte, or None when every byte is accepted."""
    for index, byte in enumerate(data):
        if not parser.feed(byte):
            return index
    return None


def test_parser_accepts_every_prefix_of_valid_documents():
    for text in VALID:
        json.loads(text)
        data = text.encode()
        parser = JsonParser(ANY)
        for index, byte in enumerate(data):
            assert parser.feed(byte), (text, index)
            json_loads_ok = _loads(data[: index + 1])
            if parser.can_end():  # the parser says "may stop here" only where json.loads agrees
                assert json_loads_ok, (text, index)
        assert parser.can_end(), text


def test_parser_refuses_invalid_documents_at_the_first_bad_byte():
    for text, bad_index in INVALID:
        assert not _loads(text.encode()), text
        parser = JsonParser(ANY)
        assert feed_all(parser, text.encode()) == bad_index, text
        if bad_index is None:
            assert not parser.can_end(), text  # a truncated document is not whole
    for text, bad_index in STRICTER:
        assert feed_all(JsonParser(ANY), text.encode()) == bad_index, text


def test_parser_agrees_with_json_loads_on_random_byte_strings():
    """Random strings of up to 8 bytes over JSON's alphabet: the parser takes every byte and may end exactly when
    json.loads parses them. (The two things JSON mode refuses and json.loads allows, repeated keys and lone
    surrogates, need more bytes or a 'd'; whitespace after a whole document is left out, as the engine stops there.)"""
    generator = torch.Generator().manual_seed(0)
    alphabet = b'{}[]",:0123456789-+.eEtrufalsn \\u'
    agreed = 0
    for _ in range(4000):
        length = int(torch.randint(1, 9, (1,), generator=generator))
        data = bytes(alphabet[int(i)] for i in torch.randint(len(alphabet), (length,), generator=generator))
        if data != data.rstrip():
            continue
        parser = JsonParser(ANY)
        whole = feed_all(parser, data) is None and parser.can_end()
        assert whole == _loads(data), data
        agreed += whole
    assert agreed > 20  # the sample holds a fair number of valid documents


def _loads(data: bytes) -> bool:
    try:
        json.loads(data)
        return True
    except (ValueError, UnicodeDecodeError):
        return False


# ---- schemas -----------------------------------------------------------------------------------------------------


def validate(value: Any, schema: dict[str, Any]) -> list[str]:
    """Errors of `value` against the supported JSON Schema subset, written from the JSON Schema spec (draft 2020-12)
    independently of the parser (jsonschema is not installed here)."""
    errors: list[str] = []
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        ok = any(
            (t == "null" and value is None) or (t == "boolean" and isinstance(value, bool))
            or (not isinstance(value, bool) and (
                (t == "integer" and isinstance(value, int)) or (t == "number" and isinstance(value, (int, float)))
                or (t == "string" and isinstance(value, str)) or (t == "array" and isinstance(value, list))
                or (t == "object" and isinstance(value, dict))))
            for t in types)
        if not ok:
            return [f"{value!r} is not of type {types}"]
    if "const" in schema and value != schema["const"]:
        errors.append(f"{value!r} != const")
    if "enum" in schema and not any(value == option and type(value) is type(option) for option in schema["enum"]):
        errors.append(f"{value!r} not in enum")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", math.inf):
            errors.append(f"length of {value!r}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", math.inf):
            errors.append(f"items of {value!r}")
        for item in value:
            errors += validate(item, schema.get("items", {}))
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        errors += [f"missing {name}" for name in schema.get("required", []) if name not in value]
        for key, item in value.items():
            if key in properties:
                errors += validate(item, properties[key])
            elif schema.get("additionalProperties", True) is False:
                errors.append(f"extra property {key!r}")
    return errors


def test_validator_catches_what_it_should():
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "s": {"type": "string", "maxLength": 2}},
              "required": ["n"], "additionalProperties": False}
    assert validate({"n": 1, "s": "ab"}, schema) == []
    assert validate({"n": True}, schema) and validate({"s": "a"}, schema) and validate({"n": 1, "x": 0}, schema)
    assert validate({"n": 1, "s": "abc"}, schema) and validate({"n": 1.5}, schema)
    assert validate([1, 2, 3], {"type": "array", "maxItems": 2}) and validate("b", {"enum": ["a"]})


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"enum": ["a", "b", 3, None]}, "minItems": 1, "maxItems": 3},
        "ok": {"type": "boolean"},
        "score": {"type": ["number", "null"]},
        "kind": {"const": "person"},
    },
    "required": ["name", "tags", "kind"],
    "additionalProperties": False,
}
NESTED = {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "string", "maxLength": 3}},
                                     "required": ["x"]}, "minItems": 2, "maxItems": 3}


def test_schema_parser_enforces_the_subset():
    person = compile_schema(PERSON)
    accepted = ['{"name":"Al","tags":["a",3],"kind":"person"}',
                '{"kind":"person","age":-3,"ok":true,"score":null,"tags":[null],"name":"Bo"}']
    for text in accepted:
        parser = JsonParser(person)
        assert feed_all(parser, text.encode()) is None and parser.done, text
        assert validate(json.loads(text), PERSON) == []
    refused = [  # (text, first refused byte)
        ('{"name":"","tags":["a"],"kind":"person"}', 9),  # minLength 1
        ('{"name":"abcdefghi"', 17),  # maxLength 8
        ('{"nam":', 5), ('{"name":"A","name"', 13),  # unknown key; repeated key
        ('{"name":"A","tags":[]', 20),  # minItems
        ('{"name":"A","tags":["a","b",3,', 29),  # maxItems
        ('{"name":"A","tags":["c"', 21), ('{"age":1.5', 8), ('{"age":1e3', 8),  # enum; integer
        ('{"name":"A","tags":["a"]}', 24),  # '}' before required "kind"
        ('{"kind":"persons"', 15), ('{"ok":1', 6),
    ]
    for text, index in refused:
        assert feed_all(JsonParser(person), text.encode()) == index, text


def test_unsupported_schema_keywords_name_the_keyword():
    with pytest.raises(LlmkitError, match=r"keyword 'pattern'.*not support"):
        compile_schema({"type": "string", "pattern": "a+"})
    with pytest.raises(LlmkitError, match=r"schema.properties.a uses the keyword 'anyOf'"):
        compile_schema({"type": "object", "properties": {"a": {"anyOf": []}}})
    with pytest.raises(LlmkitError, match=r"schema.type='text' must be one of"):
        compile_schema({"type": "text"})
    with pytest.raises(LlmkitError, match=r"minLength=3 is above maxLength=2"):
        compile_schema({"type": "string", "minLength": 3, "maxLength": 2})


# ---- sampling with a model ---------------------------------------------------------------------------------------


def eos_tokenizer():
    return byte_tokenizer(specials=[EOS], eos_id=256)


def document_text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode([i for i in ids if i not in tokenizer.stop_ids])


@pytest.mark.parametrize("schema", [None, PERSON, NESTED, {"type": "string", "maxLength": 40}],
                         ids=["json_object", "person", "nested", "string"])
def test_every_sampled_output_parses_and_validates(schema, one_thread):
    tokenizer = eos_tokenizer()
    model = tiny_decoder(vocab_size=257)
    settings = SamplingSettings(temperature=1.0)
    budget = 48
    for seed in range(4):
        constraint = JsonConstraint(tokenizer, schema, max_tokens=budget)
        ids = constrained_ids(model, [1, 2, 3], constraint, budget, settings, torch.Generator().manual_seed(seed))
        text = document_text(tokenizer, ids)
        value = json.loads(text)  # the budget forced the document closed in time
        assert len(ids) <= budget and constraint.complete
        assert validate(value, schema or {"type": "object"}) == [], text


FUZZ_SCHEMAS = [
    None, PERSON, NESTED, {"type": "integer"}, {"type": "number"}, {"enum": [1, 12, 123]},
    {"type": ["string", "null", "boolean"]},
    {"type": "array", "items": {"type": "array", "items": {"type": "number"}, "minItems": 2}, "minItems": 2},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"enum": [1, 12, "x"]}},
                                            "required": ["b"]}}, "required": ["a"]},
    {"type": "object", "properties": {"ab": {"type": "null"}, "abc": {"type": "string", "minLength": 3}},
     "required": ["abc"]},
]


@pytest.mark.parametrize("schema", FUZZ_SCHEMAS, ids=[f"schema{i}" for i in range(len(FUZZ_SCHEMAS))])
def test_random_logits_under_a_tight_budget_always_give_valid_documents(schema, one_thread):
    """Without a model: random peaked logits each step, budgets from the schema's shortest document (the tightest
    possible) to 25 tokens more. The budget check (shortest completion <= tokens left) must close every document in
    time, whatever the sampler prefers."""
    tokenizer = eos_tokenizer()
    shortest = JsonParser(compile_schema(schema)).distance()
    for seed in range(6):
        generator = torch.Generator().manual_seed(seed)
        budget = shortest + seed * 5
        constraint = JsonConstraint(tokenizer, schema, max_tokens=budget)
        ids: list[int] = []
        while len(ids) < budget and not constraint.complete:
            token = constraint.pick(torch.randn(257, generator=generator) * 3, SamplingSettings(temperature=1.0),
                                    generator)
            constraint.advance(token)
            ids.append(token)
        text = document_text(tokenizer, ids)
        assert validate(json.loads(text), schema or {"type": "object"}) == [], text


def test_without_a_budget_the_output_is_a_valid_prefix(one_thread):
    """No max_tokens: the length limit can cut the document (OpenAI's finish_reason "length"), but what was written
    is a prefix of a valid document."""
    tokenizer = eos_tokenizer()
    constraint = JsonConstraint(tokenizer)
    ids = constrained_ids(tiny_decoder(vocab_size=257), [1], constraint, 30, SamplingSettings(temperature=1.0),
                          torch.Generator().manual_seed(0))
    parser = JsonParser(compile_schema(None))
    assert feed_all(parser, bytes(ids)) is None


def test_whitespace_runs_are_capped():
    tokenizer = eos_tokenizer()
    constraint = JsonConstraint(tokenizer, max_whitespace=3)
    logits = torch.full((257,), -10.0)
    logits[ord(" ")] = 10.0  # the model wants nothing but spaces
    logits[ord("{")] = 5.0
    picks = []
    for _ in range(6):
        picks.append(constraint.pick(logits, SamplingSettings(), None))
        constraint.advance(picks[-1])
    assert bytes(picks) == b"   {   "[:6]


def test_greedy_pick_is_the_most_likely_allowed_token_and_eos_waits_for_a_whole_document():
    tokenizer = eos_tokenizer()
    constraint = JsonConstraint(tokenizer)
    logits = torch.arange(257, dtype=torch.float32)  # EOS (256) most likely, then byte 255, 254, ...
    assert constraint.pick(logits, SamplingSettings(), None) == ord("{")  # highest byte a document can start with
    for byte in b'{"a":1}':
        constraint.advance(byte)
    assert constraint.complete and constraint.pick(logits, SamplingSettings(), None) == 256
    number = JsonConstraint(tokenizer, {"type": "integer"})
    number.advance(ord("7"))
    assert not number.complete and number.allows(256) and not number.allows(ord("."))


@pytest.mark.parametrize("top_k", [None, 40])
def test_picks_follow_the_renormalised_allowed_distribution(top_k, one_thread):
    """Inside a string (after '{"'), on the byte vocabulary: empirical pick frequencies match
    p_A(i) = p(i) / sum_{j in A} p(j) (chi-square, p-value > 1e-3; the seeds are fixed, so this is deterministic)."""
    tokenizer = eos_tokenizer()
    constraint = JsonConstraint(tokenizer)
    for byte in b'{"':
        constraint.advance(byte)
    logits = torch.randn(257, generator=torch.Generator().manual_seed(1)) * 2.5
    settings = SamplingSettings(temperature=1.0, top_k=top_k)
    probs = process_logits(logits[None], settings)[0].double().softmax(-1)
    allowed = torch.tensor([constraint.allows(i) for i in range(257)])
    assert 100 < int(allowed.sum()) < 257 and not allowed[256] and not allowed[0x80]  # a real restriction
    expected = torch.where(allowed, probs, 0.0)
    expected = expected / expected.sum()
    generator = torch.Generator().manual_seed(2)
    draws = 4000
    counts = torch.bincount(torch.tensor([constraint.pick(logits, settings, generator) for _ in range(draws)]),
                            minlength=257).double()
    assert counts[~allowed].sum() == 0
    assert counts[expected == 0].sum() == 0  # nothing top-k removed is drawn
    big = expected * draws >= 5  # pool the rare tokens into one cell, as a chi-square test needs
    rare = expected[~big].sum()
    observed = torch.cat([counts[big], counts[~big].sum()[None]]) if rare > 0 else counts[big]
    wanted = (torch.cat([expected[big], rare[None]]) if rare > 0 else expected[big]) * draws
    assert chisquare(observed.numpy(), wanted.numpy()).pvalue > 1e-3


def test_seeded_picks_repeat(one_thread):
    tokenizer = eos_tokenizer()
    model = tiny_decoder(vocab_size=257)
    runs = [constrained_ids(model, [5], JsonConstraint(tokenizer, NESTED, max_tokens=40), 40,
                            SamplingSettings(temperature=1.0), torch.Generator().manual_seed(3))
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_multibyte_tokens_and_partial_characters():
    """A byte-level token may end inside a UTF-8 character: allowed in a string while the character can complete."""
    tokenizer = eos_tokenizer()
    constraint = JsonConstraint(tokenizer, {"type": "string", "maxLength": 1})
    constraint.advance(ord('"'))
    assert constraint.allows(0xE6) and not constraint.allows(0x80) and not constraint.allows(0xF8)
    constraint.advance(0xE6)  # first byte of 日 (E6 97 A5)
    assert not constraint.allows(ord('"')) and constraint.allows(0x97)
    constraint.advance(0x97)
    constraint.advance(0xA5)
    assert not constraint.allows(ord("a")) and constraint.allows(ord('"'))  # maxLength 1 counts code points


def test_token_bytes_of_a_sentencepiece_style_vocabulary():
    """Llama-2/Gemma-style vocabularies (▁ for a space, <0xNN> byte tokens, a decoder that strips the text's first
    space): each token's bytes are what it adds after other text; byte tokens are their byte; <unk> is never text."""
    from tokenizers import AddedToken, decoders, pre_tokenizers
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers.models import BPE

    from llmkit.tokenizer import Tokenizer

    vocab = {"<unk>": 0, **{f"<0x{byte:02X}>": 1 + byte for byte in range(256)}, "▁{": 257, '▁"a"': 258, "é": 259}
    backend = BackendTokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens([AddedToken("</s>", special=True)])
    tokenizer = Tokenizer(backend, eos_id=260)
    assert tokenizer.decode([257]) == "{"  # decoded alone, the space is stripped: the table must not do that
    texts = token_table(tokenizer).texts
    assert (texts[257], texts[258], texts[1 + ord("{")], texts[1 + 0xE6], texts[259]) == (
        b" {", b' "a"', b"{", b"\xe6", "é".encode())
    assert texts[0] is None and texts[260] is None  # <unk>, </s>
    constraint = JsonConstraint(tokenizer)
    assert constraint.allows(257) and not constraint.allows(258) and not constraint.allows(260)


def test_budget_too_small_for_the_schema_is_refused():
    with pytest.raises(LlmkitError, match=r"shortest document this schema accepts needs \d+ tokens, over max_tokens=5"):
        JsonConstraint(eos_tokenizer(), PERSON, max_tokens=5)


def test_disallowed_advance_is_an_error():
    constraint = JsonConstraint(eos_tokenizer())
    with pytest.raises(LlmkitError, match="token 97 does not continue the JSON document"):
        constraint.advance(ord("a"))


# ---- real weights ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    from llmkit.checkpoints import default_model_path, load_model, load_tokenizer

    path = default_model_path()
    return load_model(path), load_tokenizer(path)


@pytest.mark.slow
def test_smollm2_json_outputs_parse_and_validate(smollm2):
    model, tokenizer = smollm2
    table = token_table(tokenizer)
    assert table.texts[tokenizer.token_to_id("Ġ{")] == b" {"  # byte-level text, via GPT-2's byte alphabet
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "population": {"type": "integer"}},
              "required": ["city", "population"], "additionalProperties": False}
    cases = [(None, "Describe Paris as a JSON object.", (0, 1)),
             (schema, "Give the largest city of France and its population as JSON with keys city and population.", (0,))]
    for schema_case, question, seeds in cases:  # 3 runs of <= 32 tokens: a few seconds on an idle 2-core machine
        prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": question}]))
        for seed in seeds:
            constraint = JsonConstraint(tokenizer, schema_case, max_tokens=32)
            ids = constrained_ids(model, prompt, constraint, 32, SamplingSettings(temperature=1.0),
                                  torch.Generator().manual_seed(seed))
            value = json.loads(document_text(tokenizer, ids))
            assert validate(value, schema_case or {"type": "object"}) == []
