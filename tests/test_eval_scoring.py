"""Continuation scoring against hand-written log-softmax loops on a tiny random Decoder with a tiny trained BPE."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from llmkit.config import Config
from llmkit.errors import LlmkitError
from llmkit.eval.scoring import (
    ContinuationScore,
    continuation_logprobs,
    encode_pairs,
    rolling_loglikelihood,
    score_token_pairs,
)
from llmkit.models.decoder import Decoder
from llmkit.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

CORPUS = [
    "Review: a charming and often affecting journey.\nSentiment: positive",
    "Review: unflinchingly bleak and desperate.\nSentiment: negative",
    "hello hello hello world, the quick brown fox jumps over the lazy dog.",
] * 30
END_OF_TEXT = "<|endoftext|>"
REQUESTS = [
    ("Review: a charming journey.\nSentiment:", " positive"),
    ("Review: a charming journey.\nSentiment:", " negative"),
    ("Review: bleak and desperate.\nSentiment: ", "negative"),  # trailing space moves to the continuation
    ("the quick brown", " fox jumps over the lazy dog."),
    ("hello", " world, hello world"),
    ("", "hello world"),  # empty context: conditioned on the prefix token (EOS here)
    ("Review:", " ü 日本 🤖"),  # multi-byte characters split over byte-level tokens
]


def tiny_tokenizer(with_eos: bool = True) -> Tokenizer:
    """A byte-level BPE trained in the test (about 350 tokens), wrapped as an llmkit Tokenizer with no BOS rule."""
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=350, special_tokens=[END_OF_TEXT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(CORPUS, trainer)
    return Tokenizer(backend, eos_id=backend.token_to_id(END_OF_TEXT) if with_eos else None)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return tiny_tokenizer()


def tiny_model(tokenizer: Tokenizer, max_seq_len: int = 256) -> Decoder:
    torch.manual_seed(0)
    model = Decoder(Config.from_name("tiny-llama", vocab_size=tokenizer.vocab_size, max_seq_len=max_seq_len)).eval()
    with torch.no_grad():  # larger weights give peaked distributions, so argmax and log-probs are far from uniform
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.mul_(25)
    return model


@pytest.fixture(scope="module")
def model(tokenizer: Tokenizer) -> Decoder:
    return tiny_model(tokenizer)


def hand_logprob(model: Decoder, context_ids: list[int], continuation_ids: list[int]) -> tuple[float, bool]:
    """One unbatched forward over context + continuation (but its last token, which predicts nothing scored);
    explicit loop over the continuation's positions."""
    ids = context_ids + continuation_ids
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].double(), dim=-1)  # (T - 1, V)
    total, greedy = 0.0, True
    for offset, token in enumerate(continuation_ids):
        position = len(context_ids) + offset - 1  # the logits that predict this token
        total += logprobs[position, token].item()
        greedy = greedy and int(logprobs[position].argmax()) == token
    return total, greedy


def lm_eval_split(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval-harness's LM._encode_pair / loglikelihood for a causal model, written out."""
    if not context:
        return [tokenizer.eos_id], tokenizer.encode(continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, context_ids = tokenizer.encode(context + continuation), tokenizer.encode(context)
    return context_ids, whole[len(context_ids) :]


def test_scores_equal_hand_computed_log_softmax_sums(model: Decoder, tokenizer: Tokenizer) -> None:
    scores = continuation_logprobs(model, tokenizer, REQUESTS, batch_size=3)
    for (context, continuation), score in zip(REQUESTS, scores):
        context_ids, continuation_ids = lm_eval_split(tokenizer, context, continuation)
        expected, greedy = hand_logprob(model, context_ids, continuation_ids)
        # float32 model, batched vs single forward: sums of a few log-probs agree to ~1e-5 relative.
        assert score.logprob == pytest.approx(expected, rel=1e-4, abs=1e-4)
        assert score.is_greedy == greedy
        assert score.n_tokens == len(continuation_ids)
        assert score.n_bytes == len(continuation.encode("utf-8"))
    assert scores[6].n_bytes == len(" ü 日本 🤖".encode()) > len(" ü 日本 🤖")


def test_encode_pairs_follows_lm_eval(tokenizer: Tokenizer) -> None:
    pairs = encode_pairs(tokenizer, REQUESTS)
    assert pairs == [lm_eval_split(tokenizer, context, continuation) for context, continuation in REQUESTS]
    # The context's trailing space is scored with the continuation, as lm-eval does.
    assert encode_pairs(tokenizer, [("Sentiment: ", "negative")]) == encode_pairs(tokenizer, [("Sentiment:", " negative")])
    # The continuation gets the tokens of the joined text: " positive" is not re-tokenized on its own.
    assert tokenizer.decode(pairs[0][1]) == " positive"


def test_batching_and_order_do_not_change_scores(model: Decoder, tokenizer: Tokenizer) -> None:
    one_at_a_time = [continuation_logprobs(model, tokenizer, [request], batch_size=1)[0] for request in REQUESTS]
    for batch_size in (1, 2, 4, 16):
        batched = continuation_logprobs(model, tokenizer, REQUESTS, batch_size=batch_size)
        reversed_order = continuation_logprobs(model, tokenizer, REQUESTS[::-1], batch_size=batch_size)[::-1]
        for single, first, second in zip(one_at_a_time, batched, reversed_order):
            # Padding changes matmul shapes only: float32 sums agree to ~1e-5.
            assert first.logprob == pytest.approx(single.logprob, rel=1e-4, abs=1e-4)
            assert second.logprob == pytest.approx(single.logprob, rel=1e-4, abs=1e-4)
            assert first.is_greedy == second.is_greedy == single.is_greedy
            assert (first.n_tokens, first.n_bytes) == (second.n_tokens, second.n_bytes) == (single.n_tokens, single.n_bytes)


def test_is_greedy_on_a_crafted_case(model: Decoder, tokenizer: Tokenizer) -> None:
    context_ids = tokenizer.encode("the quick brown")
    greedy_ids = []
    with torch.no_grad():
        for _ in range(4):  # greedy decoding, written out
            greedy_ids.append(int(model(torch.tensor([context_ids + greedy_ids]))[0, -1].argmax()))
    logits = model(torch.tensor([context_ids + greedy_ids[:3]]))[0, -1]
    runner_up = int(logits.topk(2).indices[1])
    (greedy_logprob, greedy), (other_logprob, other_greedy) = score_token_pairs(
        model, [(context_ids, greedy_ids), (context_ids, greedy_ids[:3] + [runner_up])]
    )
    assert greedy and not other_greedy
    assert greedy_logprob > other_logprob
    # Through text too, when the greedy tokens re-tokenize to themselves.
    text = tokenizer.decode(greedy_ids)
    if encode_pairs(tokenizer, [("the quick brown", text)])[0][1] == greedy_ids:
        assert continuation_logprobs(model, tokenizer, [("the quick brown", text)])[0].is_greedy


def test_identical_inputs_share_a_row_and_keep_their_own_scores(model: Decoder, tokenizer: Tokenizer) -> None:
    context = tokenizer.encode("Review: a charming journey.\nSentiment:")
    pairs = [(context, [token]) for token in range(10, 20)]  # ten one-token continuations of one context
    scores = score_token_pairs(model, pairs, batch_size=2)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([context]))[0, -1].double(), dim=-1)
    assert [logprob for logprob, _ in scores] == pytest.approx(logprobs[10:20].tolist(), rel=1e-4, abs=1e-4)
    assert [greedy for _, greedy in scores] == [int(logprobs.argmax()) == token for token in range(10, 20)]


def test_long_context_keeps_its_last_tokens(tokenizer: Tokenizer) -> None:
    model = tiny_model(tokenizer, max_seq_len=16)
    context, continuation = " ".join(["hello world"] * 20), " the quick brown fox"
    context_ids, continuation_ids = lm_eval_split(tokenizer, context, continuation)
    assert len(context_ids) + len(continuation_ids) > 17
    kept = (context_ids + continuation_ids)[-17:][: -len(continuation_ids)]  # 16 inputs + the last scored token
    expected, greedy = hand_logprob(model, kept, continuation_ids)
    [score] = continuation_logprobs(model, tokenizer, [(context, continuation)])
    assert score.logprob == pytest.approx(expected, rel=1e-4, abs=1e-4) and score.is_greedy == greedy


def test_continuation_longer_than_the_context_window_is_an_error(tokenizer: Tokenizer) -> None:
    model = tiny_model(tokenizer, max_seq_len=16)
    long = " ".join(["the quick brown fox"] * 10)
    n_tokens = len(lm_eval_split(tokenizer, "hello", long)[1])
    with pytest.raises(LlmkitError, match=rf"request 1: its continuation has {n_tokens} tokens .* window is 16 tokens"):
        continuation_logprobs(model, tokenizer, [("hello", " world"), ("hello", long)])


def test_continuation_merged_into_the_context_is_an_error(model: Decoder, tokenizer: Tokenizer) -> None:
    # "hello" is one token, "hel" two: the joined text leaves the continuation no token past the context's.
    assert len(tokenizer.encode("hello")) == 1 < len(tokenizer.encode("hel"))
    with pytest.raises(LlmkitError, match=r"request 0: the continuation 'lo' has no tokens of its own"):
        continuation_logprobs(model, tokenizer, [("hel", "lo")])


def test_empty_context_without_bos_or_eos_is_an_error(model: Decoder) -> None:
    with pytest.raises(LlmkitError, match="neither BOS nor EOS"):
        continuation_logprobs(model, tiny_tokenizer(with_eos=False), [("", "hello")])


def test_bad_batch_size_and_empty_pairs_are_errors(model: Decoder, tokenizer: Tokenizer) -> None:
    with pytest.raises(LlmkitError, match="batch_size is 0"):
        continuation_logprobs(model, tokenizer, REQUESTS, batch_size=0)
    with pytest.raises(LlmkitError, match="request 0 has 0 context and 1 continuation tokens"):
        score_token_pairs(model, [([], [5])])


def test_rolling_loglikelihood_equals_lm_eval_windows(model: Decoder, tokenizer: Tokenizer) -> None:
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    text = "hello world, the quick brown fox jumps over the lazy dog. " * 3
    ids = tokenizer.encode(text)
    for window in (7, 16, 256):
        expected = 0.0
        for context, scored in map(make_disjoint_window, get_rolling_token_windows(ids, tokenizer.eos_id, window, 1)):
            inputs = (context + scored)[:-1]
            assert len(inputs) <= window
            expected += hand_logprob(model, inputs[: len(inputs) - len(scored) + 1], scored)[0]
        result = rolling_loglikelihood(model, tokenizer, text, window=window, batch_size=3)
        assert result == pytest.approx(expected, rel=1e-4)


def test_rolling_loglikelihood_errors(model: Decoder, tokenizer: Tokenizer) -> None:
    with pytest.raises(LlmkitError, match="empty text"):
        rolling_loglikelihood(model, tokenizer, "")
    with pytest.raises(LlmkitError, match="window is 300; pass 1 to 256"):
        rolling_loglikelihood(model, tokenizer, "hello", window=300)
    with pytest.raises(LlmkitError, match="window is 0; pass 1 to 256"):
        rolling_loglikelihood(model, tokenizer, "hello", window=0)


def test_progress_bar_and_result_type(model: Decoder, tokenizer: Tokenizer, capsys: pytest.CaptureFixture) -> None:
    scores = continuation_logprobs(model, tokenizer, REQUESTS, progress=True)
    assert all(isinstance(score, ContinuationScore) for score in scores)
    assert "scoring continuations" in capsys.readouterr().err
