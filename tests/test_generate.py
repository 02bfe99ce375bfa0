"""Generation: processors equal transformers' LogitsProcessors, the cached decode loop equals a naive
full-forward loop and `transformers` generate, batching with left padding changes nothing, and
stop ids / stop strings / streaming / context errors behave."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from llmkit import LlmkitError
from llmkit.checkpoints import default_model_path, load_model, load_tokenizer
from llmkit.checkpoints.hf import to_hf_state_dict
from llmkit.checkpoints.hf_config import LLAMA
from llmkit.generate import (
    SamplingSettings,
    StopStringFilter,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    generate,
    generate_tokens,
    sample_next,
    seen_tokens,
    stream,
)
from llmkit.models.decoder import Decoder
from tests.helpers import byte_tokenizer, tiny_decoder


def hf_llama_copy(model: Decoder) -> LlamaForCausalLM:
    """A transformers Llama with the same shapes as `model` and its weights copied in."""
    c = model.config
    hf_config = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.d_model,
        intermediate_size=c.d_ff,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads,
        max_position_embeddings=c.max_seq_len,
        rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta,
        tie_word_embeddings=c.tie_embeddings,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    hf = LlamaForCausalLM(hf_config).eval()
    # the importer's own key map, run in the export direction
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(c, model.state_dict(), LLAMA), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # a tied head is the embedding
    return hf


def run(model, prompt_ids, max_new_tokens, settings=None, stop_ids=()) -> list[list[int | None]]:
    return list(generate_tokens(model, prompt_ids, max_new_tokens, settings, stop_ids))


def column(steps: list[list[int | None]], row: int = 0) -> list[int]:
    return [tokens[row] for tokens in steps if tokens[row] is not None]


class CharTokenizer:
    """One character per id; id 0 is EOS and decodes to nothing. Ids above 95 are 2-byte UTF-8 characters."""

    alphabet = [chr(c) for c in range(0x20, 0x7F)] + [chr(c) for c in range(0x400, 0x400 + 160)]  # ids 1..255

    def __init__(self, eos_id: int = 0, stop_ids: tuple[int, ...] = ()) -> None:
        self.eos_id = eos_id
        self.pad_id = None
        self.stop_ids = stop_ids

    def encode(self, text: str) -> list[int]:
        return [self.alphabet.index(char) + 1 for char in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(self.alphabet[i - 1] for i in ids if i != 0)


# --- processors against transformers' LogitsProcessors ------------------------------------------------


def random_logits(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 64, generator=generator) * 3
    logits[0, :8] = logits[0, 8]  # ties at the top-k / top-p boundary
    return logits


def test_temperature_equals_transformers():
    logits = random_logits()
    for temperature in (0.3, 1.0, 2.5):
        expected = TemperatureLogitsWarper(temperature)(None, logits.clone())
        assert torch.equal(apply_temperature(logits, temperature), expected)


def test_top_k_equals_transformers():
    logits = random_logits(1)
    for top_k in (1, 5, 9, 63, 64, 200):
        expected = TopKLogitsWarper(top_k)(None, logits.clone())
        assert torch.equal(apply_top_k(logits, top_k), expected)


def test_top_p_equals_transformers():
    logits = random_logits(2)
    for top_p in (1e-9, 1e-6, 0.1, 0.5, 0.9, 0.999, 1.0):  # 1e-9: 1 - top_p rounds to 1.0 in float32
        expected = TopPLogitsWarper(top_p)(None, logits.clone())
        ours = apply_top_p(logits, top_p)
        assert torch.equal(ours, expected)
        assert (ours > float("-inf")).sum(-1).min() >= 1  # at least one token always survives


def test_repetition_penalty_equals_transformers():
    logits = random_logits(3)
    input_ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(3))
    for penalty in (0.7, 1.0, 1.3, 2.0):
        expected = RepetitionPenaltyLogitsProcessor(penalty)(input_ids, logits.clone())
        ours = apply_repetition_penalty(logits, seen_tokens(input_ids, 64), penalty)
        assert torch.equal(ours, expected)


def test_seen_tokens_ignores_padding():
    ids = torch.tensor([[5, 5, 1, 2], [3, 4, 4, 7]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    seen = seen_tokens(ids, 8, mask)
    assert seen[0].nonzero().flatten().tolist() == [1, 2]
    assert seen[1].nonzero().flatten().tolist() == [3, 4, 7]


def test_sample_next_equals_transformers_pipeline():
    """Same processed logits and the same seeded draw as transformers' sampling step."""
    logits = random_logits(4)
    input_ids = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(4))
    settings = SamplingSettings(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.2, seed=11)
    processors = LogitsProcessorList(
        [RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.8)]
    )
    probs = processors(input_ids, logits.clone()).softmax(dim=-1)
    for seed in range(5):
        expected = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed)).squeeze(-1)
        ours = sample_next(logits, settings, torch.Generator().manual_seed(seed), seen_tokens(input_ids, 64))
        assert torch.equal(ours, expected)


def test_greedy_is_argmax_and_ignores_sampling_filters():
    logits = random_logits(5)
    for settings in (SamplingSettings(), SamplingSettings(top_k=3, top_p=0.5)):
        assert torch.equal(sample_next(logits, settings), logits.argmax(-1))


# --- the decode loop -----------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_greedy_equals_naive_full_forward_loop(preset):
    model = tiny_decoder(preset)
    prompt = torch.randint(0, 256, (11,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = column(run(model, prompt, 24))
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(24):
            next_id = model(ids)[:, -1].argmax(-1, keepdim=True)  # no cache: the whole sequence every step
            ids = torch.cat([ids, next_id], dim=1)
    assert ours == ids[0, len(prompt) :].tolist()


def test_greedy_equals_transformers_generate():
    model = tiny_decoder(seed=2)
    hf = hf_llama_copy(model)
    prompt = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(2))
    expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30, do_sample=False)
    assert column(run(model, prompt[0].tolist(), 30)) == expected[0, 9:].tolist()


def test_greedy_with_repetition_penalty_equals_transformers_generate():
    model = tiny_decoder(seed=3)
    hf = hf_llama_copy(model)
    prompt = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(3))
    expected = hf.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30, do_sample=False, repetition_penalty=1.5
    )
    ours = column(run(model, prompt[0].tolist(), 30, SamplingSettings(repetition_penalty=1.5)))
    assert ours == expected[0, 6:].tolist()
    assert ours != column(run(model, prompt[0].tolist(), 30))  # the penalty changed something


def test_sampling_equals_transformers_generate_under_the_same_global_seed():
    """With seed=None both draw from torch's global generator with identical probabilities."""
    model = tiny_decoder(seed=4)
    hf = hf_llama_copy(model)
    prompt = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(4))
    torch.manual_seed(123)
    expected = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=25,
        do_sample=True,
        temperature=0.9,
        top_k=50,
        top_p=0.95,
    )
    torch.manual_seed(123)
    settings = SamplingSettings(temperature=0.9, top_k=50, top_p=0.95)
    assert column(run(model, prompt[0].tolist(), 25, settings)) == expected[0, 8:].tolist()


def test_seed_reproducibility():
    model = tiny_decoder()
    prompt = [5, 17, 99, 3]
    hot = dict(temperature=2.0)
    first = column(run(model, prompt, 30, SamplingSettings(**hot, seed=7)))
    torch.manual_seed(999)  # the global generator must not matter when a seed is given
    again = column(run(model, prompt, 30, SamplingSettings(**hot, seed=7)))
    other = column(run(model, prompt, 30, SamplingSettings(**hot, seed=8)))
    assert first == again
    assert first != other
    assert len(set(first)) > 5  # really sampling, not stuck on one token


def test_batch_with_left_padding_equals_each_prompt_alone():
    model = tiny_decoder(seed=5)
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (n,), generator=generator).tolist() for n in (3, 12, 7)]
    batch = run(model, prompts, 20)
    for row, prompt in enumerate(prompts):
        assert column(batch, row) == column(run(model, prompt, 20))


def test_stop_ids_finish_rows_and_end_the_loop():
    model = tiny_decoder(seed=6)
    prompts = [[1, 2, 3], [40, 50, 60, 70]]
    free = run(model, prompts, 12)
    stop = free[4][0]  # row 0's fifth token
    steps = run(model, prompts, 12, stop_ids={stop})
    first_hit = column(free, 0).index(stop)
    assert column(steps, 0) == column(free, 0)[: first_hit + 1]  # the stop id is yielded, then the row is done
    assert all(tokens[0] is None for tokens in steps[first_hit + 1 :])
    if stop not in column(free, 1):
        assert column(steps, 1) == column(free, 1)  # the other row runs to max_new_tokens
    both = run(model, [prompts[0], prompts[0]], 12, stop_ids={stop})
    assert len(both) == first_hit + 1  # all rows finished: no more steps


def test_generate_decodes_only_new_tokens_and_stops_at_eos():
    model = tiny_decoder(seed=7)
    settings = SamplingSettings(temperature=1.0, seed=3)
    free_ids = column(run(model, CharTokenizer().encode("Hello"), 16, settings))
    text = generate(model, CharTokenizer(eos_id=255), "Hello", max_new_tokens=16, settings=settings)
    assert text == CharTokenizer().decode(free_ids)
    eos = free_ids[6]
    stopped = generate(model, CharTokenizer(eos_id=eos), "Hello", max_new_tokens=16, settings=settings)
    assert stopped == CharTokenizer().decode(free_ids[: free_ids.index(eos)])
    other_stop = generate(model, CharTokenizer(stop_ids=(eos,)), "Hello", max_new_tokens=16, settings=settings)
    assert other_stop == stopped  # tokenizer.stop_ids (e.g. <|im_end|>) stop like EOS


def test_generate_batch_equals_single_prompts():
    model = tiny_decoder(seed=8)
    tokenizer = CharTokenizer(eos_id=255)
    prompts = ["a", "What is it?", "Привет"]
    batch = generate(model, tokenizer, prompts, max_new_tokens=10)
    assert batch == [generate(model, tokenizer, prompt, max_new_tokens=10) for prompt in prompts]


def test_stop_strings_cut_the_output_and_streaming_matches():
    model = tiny_decoder(seed=9)
    tokenizer = CharTokenizer(eos_id=255)
    settings = SamplingSettings(temperature=1.0, seed=5)
    full = generate(model, tokenizer, "Once", max_new_tokens=40, settings=settings)
    stop = full[12:15]
    expected = full[: full.index(stop)]
    forwards = []
    hook = model.register_forward_hook(lambda *args: forwards.append(1))
    assert generate(model, tokenizer, "Once", 40, settings, stop_strings=[stop]) == expected
    hook.remove()
    free_ids = column(run(model, tokenizer.encode("Once"), 40, settings))
    assert len(forwards) == next(n for n in range(40) if stop in tokenizer.decode(free_ids[:n]))  # stopped at once
    assert generate(model, tokenizer, "Once", 40, settings, stop_strings=["not-in-it", stop]) == expected
    pieces = list(stream(model, tokenizer, "Once", 40, settings, stop_strings=[stop]))
    assert "".join(pieces) == expected
    assert "".join(stream(model, tokenizer, "Once", 40, settings)) == full
    assert len(list(stream(model, tokenizer, "Once", 40, settings))) > 1  # really piece by piece


def test_streaming_stops_at_eos():
    model = tiny_decoder(seed=10)
    settings = SamplingSettings(temperature=1.0, seed=2)
    free_ids = column(run(model, CharTokenizer().encode("Hi"), 20, settings))
    tokenizer = CharTokenizer(eos_id=free_ids[9])
    assert "".join(stream(model, tokenizer, "Hi", 20, settings)) == generate(model, tokenizer, "Hi", 20, settings)


def test_streaming_with_byte_level_tokenizer_never_splits_a_character():
    model = tiny_decoder(seed=1)
    tokenizer = byte_tokenizer(eos_id=0)
    assert tokenizer.encode("é") == [0xC3, 0xA9]
    for seed in range(3):
        settings = SamplingSettings(temperature=1.0, seed=seed)
        text = generate(model, tokenizer, "héllo", 40, settings)
        pieces = list(stream(model, tokenizer, "héllo", 40, settings))
        assert "".join(pieces) == text
        assert any(ord(char) > 127 and char != "\ufffd" for char in text)  # multi-byte characters were generated
        stop = text[5:7]
        assert "".join(stream(model, tokenizer, "héllo", 40, settings, [stop])) == text[: text.index(stop)]


def test_stop_string_filter_holds_back_a_possible_stop_string():
    stop_filter = StopStringFilter(["</s>", "User:"])
    assert stop_filter.push("Hello <") == "Hello "  # "<" may start "</s>"
    assert stop_filter.push("/") == ""
    assert stop_filter.push("b> and Us") == "</b> and "  # it did not: released
    assert stop_filter.push("er") == ""
    assert stop_filter.flush() == "User"  # the stream ended before the stop string completed
    stop_filter = StopStringFilter(["</s>"])
    assert stop_filter.push("done</") == "done"
    assert stop_filter.push("s> more") == ""
    assert stop_filter.stopped and stop_filter.push("x") == "" and stop_filter.flush() == ""


@pytest.mark.slow
def test_smollm2_chat_reply_stops_at_end_of_turn():
    path = default_model_path()
    model, tokenizer = load_model(path), load_tokenizer(path)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    reply = generate(model, tokenizer, prompt, max_new_tokens=40)
    assert "Paris" in reply
    steps = list(generate_tokens(model, tokenizer.encode(prompt), 40, stop_ids=tokenizer.stop_ids))
    assert len(steps) < 40 and steps[-1][0] in tokenizer.stop_ids  # <|im_end|> ended it, not the token limit
    assert "".join(stream(model, tokenizer, prompt, max_new_tokens=40)) == reply
    texts = ["The capital of France is", "1, 2, 3, 4,"]
    assert generate(model, tokenizer, texts, max_new_tokens=8) == [generate(model, tokenizer, t, 8) for t in texts]


# --- errors ----------------------------------------------------------------------------------------------


def test_over_long_prompt_names_counts_and_fix():
    model = tiny_decoder()  # tiny-llama: context 256
    with pytest.raises(
        LlmkitError,
        match=r"prompt has 250 tokens; tiny-llama's context is 256 with 10 new tokens: "
        r"pass truncate_prompt=True \(CLI --truncate_prompt\) to keep the last 246",
    ):
        run(model, [7] * 250, 10)
    tokenizer = CharTokenizer(eos_id=255)
    with pytest.raises(LlmkitError, match="prompt 1 has 300 tokens"):
        generate(model, tokenizer, ["short", "x" * 300], max_new_tokens=10)


def test_truncate_prompt_keeps_the_last_tokens():
    model = tiny_decoder(seed=11)
    prompt = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(11)).tolist()
    truncated = list(generate_tokens(model, prompt, 16, truncate_prompt=True))
    assert column(truncated) == column(run(model, prompt[-240:], 16))  # 256 context - 16 new tokens
    tokenizer = CharTokenizer(eos_id=255)
    text = "ab" * 200
    assert generate(model, tokenizer, text, 16, truncate_prompt=True) == generate(model, tokenizer, text[-240:], 16)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: run(m, [], 5), "prompt is empty"),
        (lambda m: run(m, [[1, 2], []], 5), "prompt 1 is empty"),
        (lambda m: run(m, [1, 2], 0), "max_new_tokens=0 must be >= 1"),
        (lambda m: run(m, [1, 2], 256), "leaves no room for a prompt"),
        (lambda m: run(m, [1, 256], 5), "prompt holds token id 256, outside tiny-llama's vocabulary"),
        (lambda m: generate(m, CharTokenizer(), "", 5), "prompt is empty"),
        (lambda m: generate(m, CharTokenizer(), ["a", ""], 5), "prompt 1 is empty"),
        (lambda m: generate(m, CharTokenizer(), [], 5), "no prompts given"),
        (lambda m: generate(m, CharTokenizer(), "a", 5, stop_strings=[""]), "stop string '' must be a non-empty"),
        (lambda m: stream(m, CharTokenizer(), ["a", "b"], 5), "stream takes one prompt string"),
    ],
)
def test_bad_generation_input(call, message):
    with pytest.raises(LlmkitError, match=message):
        call(tiny_decoder())


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(temperature=-0.5), r"temperature=-0.5 must be a finite number >= 0; use 0 for greedy"),
        (dict(temperature=float("nan")), "temperature=nan"),
        (dict(top_k=0), r"top_k=0 must be an integer >= 1; use e.g. 50, or None"),
        (dict(top_k=2.5), "top_k=2.5"),
        (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]; use e.g. 0.9, or None"),
        (dict(top_p=1.5), "top_p=1.5"),
        (dict(repetition_penalty=0), r"repetition_penalty=0 must be a finite number > 0; use 1.0 for no penalty"),
        (dict(seed="abc"), "seed='abc' must be an integer"),
    ],
)
def test_bad_sampling_settings(fields, message):
    with pytest.raises(LlmkitError, match=message):
        SamplingSettings(**fields)
