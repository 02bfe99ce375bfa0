"""Speculative decoding (llmkit.generate.speculative): greedy output equals plain greedy token for token, sampled
output follows the target's own distribution (chi-square against the exact law computed from the target's logits),
and bad inputs are one clear error."""

from __future__ import annotations

import gzip
import itertools
import json
import re

import pytest
import torch
from scipy.stats import chisquare

from llmkit.checkpoints import default_model_path, load_model, load_tokenizer, save_model
from llmkit.errors import LlmkitError
from llmkit.generate import SamplingSettings, generate_tokens, process_logits
from llmkit.generate.proposers import NgramProposer
from llmkit.generate.speculative import SpeculativeStats, speculative_tokens
from tests.helpers import byte_tokenizer, cli_status, run_cli, tiny_decoder

PROMPTS = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7], [1, 2, 3], [9, 9, 9, 9, 9, 9, 9, 1, 9, 9, 4, 4, 9, 9, 9, 9, 1]]
P_VALUE_FLOOR = 1e-3  # a chi-square p-value below this rejects "same distribution" (fixed seeds: deterministic)


@pytest.fixture(scope="module")
def target():
    return tiny_decoder(seed=0)


@pytest.fixture(scope="module")
def drafts(target):
    return {"ngram": "ngram", "draft": tiny_decoder(seed=1, n_layers=1), "self": target}


def plain_greedy(model, prompts, max_new_tokens, stop_ids=()) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in prompts]
    for step in generate_tokens(model, prompts, max_new_tokens, stop_ids=stop_ids):
        for row, token in enumerate(step):
            if token is not None:
                out[row].append(token)
    return out


def speculative(model, prompts, max_new_tokens, **options) -> tuple[list[list[int]], SpeculativeStats]:
    stats = SpeculativeStats()
    out: list[list[int]] = [[] for _ in prompts]
    for step in speculative_tokens(model, prompts, max_new_tokens, stats=stats, **options):
        assert len(step) == len(prompts)
        for row, tokens in enumerate(step):
            out[row].extend(tokens)
    return out, stats


# --------------------------------------------------------------------------- greedy: the same tokens as plain greedy


@pytest.mark.parametrize("method", ["ngram", "draft", "self"])
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_equals_plain_greedy(target, drafts, method, k, batch, one_thread):
    prompts = PROMPTS[:batch] if batch == 1 else PROMPTS
    free = plain_greedy(target, prompts, 40)
    stop_ids = {free[0][12], free[-1][20]}  # tokens the rows do write: the stops cut rows short
    expected = plain_greedy(target, prompts, 40, stop_ids)
    assert any(len(row) < 40 for row in expected)
    for adaptive in (False, True):
        out, stats = speculative(target, prompts, 40, stop_ids=stop_ids, draft=drafts[method],
                                 num_speculative_tokens=k, adaptive=adaptive)
        assert out == expected
        assert stats.emitted == sum(map(len, expected))
        assert stats.proposed > 0 or method == "ngram"  # lookup proposes only once a row repeats itself
        if method == "self":  # the target drafting for itself: every proposal accepted, k + 1 tokens per forward
            assert stats.accepted == stats.proposed
            assert stats.tokens_per_forward > 1 + 0.5 * k / (k + 1)


def test_ngram_lookup_proposes_what_followed_the_earliest_match():
    assert NgramProposer().lookup([7, 2, 9, 4, 2, 9, 8, 3, 9], 3) == []  # by default a match is 3 tokens long
    assert NgramProposer().lookup([1, 2, 3, 4, 5, 1, 2, 3], 2) == [4, 5]
    ngram = NgramProposer(max_ngram=3, min_ngram=1)
    assert ngram.lookup([1, 2, 3, 4, 5, 1, 2, 3], 2) == [4, 5]  # the 3-gram 1 2 3 matched
    assert ngram.lookup([7, 2, 9, 4, 2, 9, 8, 3, 9], 3) == [4, 2, 9]  # only the 1-gram 9: its first occurrence
    assert ngram.lookup([1, 2, 3, 4], 3) == []
    assert ngram.lookup([5, 5, 5], 4) == [5]  # a continuation that runs into the suffix stops at the end


def test_a_row_that_stops_inside_an_accepted_run_ends_there(target, one_thread):
    prompt = [[3, 4, 5, 6, 3, 4, 5, 6, 3, 4, 5, 6, 3]]
    free = plain_greedy(target, prompt, 30)
    stop = free[0][6]
    out, _ = speculative(target, prompt, 30, stop_ids={stop}, draft=target, num_speculative_tokens=8)
    assert out[0] == free[0][: free[0].index(stop) + 1]


def test_text_generation_with_token_steps_matches_plain(target, one_thread):
    from llmkit.generate import generate
    from llmkit.generate.speculative import speculative_steps_with

    tokenizer = byte_tokenizer()
    prompts = ["the cat and the hat and the", "ab"]
    plain = generate(target, tokenizer, prompts, max_new_tokens=20)
    stats = SpeculativeStats()
    assert generate(target, tokenizer, prompts, max_new_tokens=20,
                    token_steps=speculative_steps_with(NgramProposer(min_ngram=1), 3, stats=stats)) == plain
    assert stats.proposed > 0


# --------------------------------------------------------------------------- sampling: the target's distribution

VOCAB = 8
N_TOKENS = 3  # the first 3 tokens: token 1 from the prefill, tokens 2-3 through accept/reject and the bonus
# 4 and then the test model's own greedy continuation: a repeating text whose continuations prompt lookup finds and the
# target often accepts (any prompt is valid; this one makes both branches, accept and reject, frequent).
SAMPLE_PROMPT = [4, 0, 3, 5, 7, 5, 7, 5, 7, 5, 7, 5, 7, 5, 7, 5, 7]
SEEDS = (0, 1, 2, 3)
ROWS_PER_SEED = 5000


def small_vocab_model(seed: int, n_layers: int = 2):
    """A vocab-8 decoder whose next-token distributions are far from uniform (random init gives near-zero logits,
    so the LM head is scaled up)."""
    model = tiny_decoder(seed=seed, vocab_size=VOCAB, n_layers=n_layers, d_model=32, n_heads=2, n_kv_heads=1,
                         d_ff=64, bos_id=None, eos_id=None)
    with torch.no_grad():
        model.lm_head.weight.mul_(12)
    return model


def exact_law(model, settings: SamplingSettings) -> torch.Tensor:
    """P(t1, t2, t3) of plain sampling with `settings`, flattened (VOCAB ** 3,): the model run once on the prompt + every
    prefix (t1, t2); P = p1(t1) p2(t2 | t1) p3(t3 | t1, t2), each p processed as sampling does (penalty on the prompt
    and the tokens before it)."""
    prefixes = torch.tensor(list(itertools.product(range(VOCAB), repeat=N_TOKENS - 1)))  # (64, 2) row = t1 * 8 + t2
    ids = torch.cat([torch.tensor(SAMPLE_PROMPT).expand(len(prefixes), -1), prefixes], dim=1)  # (64, P + 2)
    with torch.no_grad():
        logits = model(ids)[:, -N_TOKENS:]  # (64, 3, V): after the prompt, after t1, after t1 t2
    law = torch.ones(len(prefixes), VOCAB, dtype=torch.float64)
    for position in range(N_TOKENS):
        seen = torch.zeros(len(prefixes), VOCAB, dtype=torch.bool)
        seen[:, SAMPLE_PROMPT] = True
        seen.scatter_(1, prefixes[:, :position], True)
        p = process_logits(logits[:, position], settings, seen).softmax(-1).double()  # (64, V)
        law *= p.gather(1, prefixes[:, position : position + 1]) if position < N_TOKENS - 1 else p
    return law.flatten()  # index t1 * 64 + t2 * 8 + t3


def sampled_counts(target, draft, settings: SamplingSettings, k: int) -> torch.Tensor:
    """How often each (t1, t2, t3) came out of speculative sampling: ROWS_PER_SEED rows of the prompt per seed."""
    counts = torch.zeros(VOCAB**N_TOKENS, dtype=torch.float64)
    for seed in SEEDS:
        settings.seed = seed
        out, stats = speculative(target, [SAMPLE_PROMPT] * ROWS_PER_SEED, N_TOKENS, settings=settings, draft=draft,
                                 num_speculative_tokens=k)
        assert 0 < stats.accepted < stats.proposed  # both branches, accept and reject, ran
        index = torch.tensor(out) @ torch.tensor([VOCAB**2, VOCAB, 1])
        counts += torch.bincount(index, minlength=VOCAB**N_TOKENS).double()
    return counts


def chi_square_p(counts: torch.Tensor, law: torch.Tensor) -> float:
    """Pearson's chi-square p-value of `counts` against `law`: 0 if a cell of probability 0 was drawn; cells expecting
    fewer than 5 draws pooled into one."""
    if counts[law == 0].sum() > 0:
        return 0.0
    expected = law * counts.sum()
    small = (expected < 5) & (law > 0)
    keep = expected >= 5
    observed, expected = counts[keep], expected[keep]
    if small.any():
        observed = torch.cat([observed, counts[small].sum()[None]])
        expected = torch.cat([expected, (law[small].sum() * counts.sum())[None]])
    return float(chisquare(observed.numpy(), expected.numpy() * observed.sum().item() / expected.sum().item()).pvalue)


@pytest.mark.parametrize(("method", "settings"), [
    ("draft", dict(temperature=1.0)),
    ("draft", dict(temperature=0.7, top_k=4)),
    ("draft", dict(temperature=1.3, top_p=0.8, repetition_penalty=1.5)),
    ("ngram", dict(temperature=1.0)),
    ("ngram", dict(temperature=0.8, top_k=5, repetition_penalty=1.3)),
])
def test_sampling_follows_the_target_distribution(method, settings, one_thread):
    target, draft_model = small_vocab_model(seed=0), small_vocab_model(seed=7, n_layers=1)
    settings = SamplingSettings(**settings)
    counts = sampled_counts(target, draft_model if method == "draft" else "ngram", settings, k=2)
    assert chi_square_p(counts, exact_law(target, settings)) > P_VALUE_FLOOR
    if method == "draft":  # the test can tell laws apart: the draft's own law is rejected outright
        assert chi_square_p(counts, exact_law(draft_model, settings)) < 1e-12


# --------------------------------------------------------------------------- errors


def test_bad_speculation_inputs_are_one_clear_error(target):
    with pytest.raises(LlmkitError, match=r"vocabulary of 128 ids, the target .* 256; a draft must share"):
        speculative_tokens(target, [1, 2], 4, draft=tiny_decoder(vocab_size=128))
    with pytest.raises(LlmkitError, match=r"num_speculative_tokens=0 must be an integer >= 1"):
        speculative_tokens(target, [1, 2], 4, num_speculative_tokens=0)
    with pytest.raises(LlmkitError, match=r"the draft model is on meta, the target on cpu; load both on one device"):
        speculative_tokens(target, [1, 2], 4, draft=tiny_decoder(seed=1).to("meta"))
    with pytest.raises(LlmkitError, match=r"speculation method 'lookup' is unknown; use 'ngram'"):
        speculative_tokens(target, [1, 2], 4, draft="lookup")
    with pytest.raises(LlmkitError, match=r"draft model tiny-llama holds 16 tokens of context; this generation needs"):
        next(speculative_tokens(target, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 8, draft=tiny_decoder(max_seq_len=16)))


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, target):
    """The target and a draft as llmkit directories with the byte tokenizer, and a draft with another tokenizer."""
    root = tmp_path_factory.mktemp("speculative")
    save_model(target, root / "target", tokenizer=byte_tokenizer())
    save_model(tiny_decoder(seed=1, n_layers=1), root / "draft", tokenizer=byte_tokenizer())
    save_model(tiny_decoder(seed=1, vocab_size=260), root / "other", tokenizer=byte_tokenizer(specials=[
        "<a>", "<b>", "<c>", "<d>"]))
    return root


def test_cli_speculative_generate_prints_plain_output_and_the_acceptance_rate(capsys, model_dirs, one_thread):
    base = ("generate", "--model", str(model_dirs / "target"), "--max_new_tokens", "24")
    for prompts in (("--prompt", "the cat and the hat and the"), ("--prompt", "[the cat and the, ab ab ab]")):
        code, plain, _ = run_cli(capsys, *base, *prompts)
        assert code == 0
        for extra in (("--speculate", "ngram"), ("--draft", str(model_dirs / "draft"), "--num_speculative_tokens", "3")):
            code, out, err = run_cli(capsys, *base, *prompts, *extra)
            assert code == 0 and out == plain
            assert re.search(r"speculative decoding \((prompt lookup|draft .*)\): [\d,]+/[\d,]+ proposed tokens "
                             r"accepted \(\d+\.\d%\), \d\.\d\d tokens per target forward", err)


@pytest.mark.parametrize(("extra", "message"), [
    (("--speculate", "ngram", "--num_speculative_tokens", "0"), "--num_speculative_tokens=0 must be an integer >= 1"),
    (("--draft", "OTHER"), "has another tokenizer than --model"),
    (("--draft", "DRAFT", "--speculate", "ngram"), "--draft and --speculate ngram are two ways"),
])
def test_cli_speculation_errors_exit_2_with_one_line(capsys, model_dirs, extra, message, one_thread):
    extra = tuple(str(model_dirs / "other") if arg == "OTHER" else str(model_dirs / "draft") if arg == "DRAFT" else arg
                  for arg in extra)
    code, err = cli_status(capsys, "generate", "--model", str(model_dirs / "target"), "--prompt", "hi", *extra)
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and message in err


# --------------------------------------------------------------------------- real weights


@pytest.mark.slow
def test_smollm2_prompt_lookup_equals_plain_greedy_on_a_summary():
    from llmkit.data.shared import shared_data_file
    from llmkit.generate.decode import tokenizer_stop_ids

    path = default_model_path()
    model, tokenizer = load_model(path), load_tokenizer(path)
    with gzip.open(shared_data_file("dialogsum/dialogsum.dev.jsonl.gz"), "rt", encoding="utf-8") as file:
        dialogue = json.loads(file.readlines()[1])["dialogue"]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": f"Summarise this dialogue.\n\n{dialogue}"}])
    ids, stop_ids = tokenizer.encode(prompt), tokenizer_stop_ids(tokenizer)
    expected = plain_greedy(model, [ids], 40, stop_ids)
    out, stats = speculative(model, [ids], 40, stop_ids=stop_ids, draft="ngram", num_speculative_tokens=5)
    assert out == expected
    assert stats.accepted > 0 and stats.tokens_per_forward > 1
