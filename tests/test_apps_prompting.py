"""Few-shot selection, prompt layout within the context window, and self-consistency voting
(llmkit.apps.prompting), on a scripted model."""

import pytest
import torch

from llmkit.apps.prompting import (
    COT_TRIGGER,
    Example,
    FixedSelector,
    RandomSelector,
    SimilaritySelector,
    fewshot_prompt,
    majority_vote,
    self_consistency,
)
from llmkit.errors import LlmkitError
from llmkit.generate import SamplingSettings
from tests.helpers import ScriptedModel

POOL = [f"question number {i} about apples" for i in range(40)]


def test_random_selection_is_seeded_and_never_shows_the_query():
    selector = RandomSelector(POOL, seed=7)
    assert selector.select("new question", 5, index=3) == RandomSelector(POOL, seed=7).select("new question", 5, 3)
    assert selector.select("new question", 5, index=3) != RandomSelector(POOL, seed=8).select("new question", 5, 3)
    for index, query in enumerate(POOL):  # every pool question as the query: it is never its own example
        chosen = selector.select(query, 39, index)
        assert POOL.index(query) not in chosen and len(set(chosen)) == 39
    with pytest.raises(LlmkitError, match="pool holds only 39 usable rows"):
        selector.select(POOL[0], 40)


def test_similarity_selection_returns_the_true_nearest_neighbours():
    """Against a brute-force cosine similarity over a fixed random embedding of each text."""
    generator = torch.Generator().manual_seed(0)
    table = {text: torch.randn(16, generator=generator) for text in [*POOL, "query a", "query b"]}
    calls = []

    def embed(texts):
        calls.append(len(texts))
        return torch.stack([table[text] * (1 + i % 3) for i, text in enumerate(texts)])  # lengths do not matter

    selector = SimilaritySelector(POOL, embed)
    for query in ("query a", "query b"):
        scores = [torch.nn.functional.cosine_similarity(table[query], table[text], dim=0).item() for text in POOL]
        expected = sorted(range(len(POOL)), key=lambda i: -scores[i])[:6]
        assert selector.select(query, 6) == expected
    assert calls == [len(POOL), 1, 1]  # the pool is embedded once
    assert 5 not in selector.select(POOL[5], 6)  # the query itself is left out, even though it is its own nearest


def test_fixed_selection_is_fixed():
    selector = FixedSelector(POOL, [3, 1, 4, 2])
    assert selector.select("a", 3, 0) == selector.select("b", 3, 9) == [3, 1, 4]
    assert selector.select(POOL[1], 3) == [3, 4, 2]  # the query is skipped, the next fixed one takes its place
    with pytest.raises(LlmkitError, match="outside the pool"):
        FixedSelector(POOL, [40])
    with pytest.raises(LlmkitError, match="only 4 fixed ones"):
        selector.select("c", 5)


def test_fewshot_prompt_drops_examples_to_fit_the_context_window():
    examples = [Example(f"q{i} " + "word " * 10, f"a{i} " + "word " * 10) for i in range(5)]  # ~24 tokens each
    model = ScriptedModel([], context_window=100)
    prompt = fewshot_prompt(model, examples, "what is two plus two?", max_new_tokens=20)
    assert prompt.n_examples == 3 and prompt.n_offered == 5
    assert model.count_tokens(prompt.text) + 20 <= model.context_window
    assert "q0 " in prompt.text and "q2 " in prompt.text and "q3 " not in prompt.text  # the last ones are dropped
    assert prompt.text.endswith("Q: what is two plus two?\nA:")
    roomy = fewshot_prompt(ScriptedModel([], context_window=1000), examples, "what?", max_new_tokens=20)
    assert roomy.n_examples == 5
    with pytest.raises(LlmkitError, match="context window of 100"):
        fewshot_prompt(model, examples, "long " * 90, max_new_tokens=20)


def test_chat_layout_and_answer_prefix():
    model = ScriptedModel([])
    prompt = fewshot_prompt(model, [Example("1+1?", "The answer is 2.")], "2+2?", 50, chat=True,
                            answer_prefix=COT_TRIGGER)
    assert prompt.text == f"User: 1+1?\nAssistant: The answer is 2.\nUser: 2+2?\nAssistant: {COT_TRIGGER}"
    plain = fewshot_prompt(model, [], "2+2?", 50, answer_prefix=COT_TRIGGER)
    assert plain.text == f"Q: 2+2?\nA: {COT_TRIGGER}" and plain.n_examples == 0


def test_majority_vote_ties_missing_answers_and_share():
    assert majority_vote([3, 5, 5, None, 3]).answer == 3  # 3 and 5 tie at 2 votes: 3 came first
    assert majority_vote([3, 5, 5, None, 3]).share == pytest.approx(2 / 5)  # share of all chains, missing included
    assert majority_vote([None, 7, None]).answer == 7
    nothing = majority_vote([None, None])
    assert nothing.answer is None and nothing.share == 0.0


def test_self_consistency_votes_per_prompt_over_sampled_chains():
    replies = ["so 4. The answer is 4.", "The answer is 5.", "it is 4", "no idea", "The answer is 9.", "hmm"]
    model = ScriptedModel(replies)
    results = self_consistency(model, ["p1", "p2"], n=3, max_new_tokens=10, settings=SamplingSettings(temperature=0.7),
                               extract=lambda text: int(text.rstrip(".").split()[-1]) if text[-2:-1].isdigit()
                               or text[-1:].isdigit() else None)
    assert model.prompts == ["p1"] * 3 + ["p2"] * 3
    assert [r.vote.answer for r in results] == [4, 9]
    assert results[0].replies == tuple(replies[:3]) and results[1].vote.share == pytest.approx(1 / 3)
    with pytest.raises(LlmkitError, match="temperature=0"):
        self_consistency(model, ["p"], 3, 10, SamplingSettings(), extract=str)


@pytest.mark.slow
def test_similarity_with_minilm_finds_the_paraphrase():
    """The default embedder (all-MiniLM-L6-v2): a reworded pool question is the query's nearest example, and the
    order matches a brute-force cosine over the same embeddings."""
    from llmkit.apps.prompting import default_embedder

    pool = ["Tom has 3 apples and buys 5 more. How many apples does he have?",
            "A train travels 60 miles per hour for 3 hours. How far does it go?",
            "Sara reads 20 pages a day. How many pages does she read in a week?",
            "The recipe needs 2 cups of flour per cake. How much flour for 4 cakes?"]
    embed = default_embedder()
    query = "How far does a train go in 3 hours at 60 miles per hour?"
    chosen = SimilaritySelector(pool, embed).select(query, 4)
    assert chosen[0] == 1
    vectors, target = embed(pool), embed([query])[0]
    scores = torch.nn.functional.cosine_similarity(vectors, target[None], dim=-1)
    assert chosen == torch.argsort(scores, descending=True).tolist()
