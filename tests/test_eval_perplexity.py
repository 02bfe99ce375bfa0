"""Sliding-window perplexity against hand-written loops on a tiny random Decoder; SmolLM2 against transformers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from llmkit.config import Config
from llmkit.errors import LlmkitError
from llmkit.eval.perplexity import PerplexityResult, file_perplexity, perplexity, sliding_windows
from llmkit.models.decoder import Decoder
from llmkit.tokenizer import Tokenizer
from tests.helpers import byte_tokenizer, shakespeare_text

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 3  # 258 bytes
BOS = "<s>"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return byte_tokenizer((BOS,), bos_id=256)


@pytest.fixture(scope="module")
def model() -> Decoder:
    torch.manual_seed(0)
    model = Decoder(Config.from_name("tiny-llama", vocab_size=257, max_seq_len=64)).eval()
    with torch.no_grad():  # larger weights: log-probs far from uniform, so a wrong window shows
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.mul_(10)
    return model


def token_nlls(model: Decoder, ids: list[int]) -> list[float]:
    """-log p(ids[t] | ids[:t]) for t = 1..len-1 from one forward, as an explicit loop."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids]))[0].double(), dim=-1)  # (T, V)
    return [-logprobs[t - 1, ids[t]].item() for t in range(1, len(ids))]


def hf_sliding_window_nlls(model: Decoder, ids: list[int], window: int, stride: int) -> list[float]:
    """The loop of Hugging Face's "Perplexity of fixed-length models" guide, one window at a time."""
    nlls, previous_end = [], 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        target_length = end - previous_end  # only tokens the previous window did not score
        window_nlls = token_nlls(model, ids[begin:end])  # predicts ids[begin + 1 : end]
        nlls += window_nlls[len(window_nlls) - min(target_length, len(window_nlls)) :]
        previous_end = end
        if end == len(ids):
            break
    return nlls


def test_single_window_perplexity_is_exp_mean_nll(model: Decoder, tokenizer: Tokenizer) -> None:
    text = TEXT[:60]
    ids = tokenizer.encode(text)
    nlls = token_nlls(model, ids)
    result = perplexity(model, tokenizer, text, window=64, stride=64)
    assert result.n_tokens == len(ids) - 1 == 59 and result.n_windows == 1
    # float32 logits vs the float64 log-softmax of the hand loop: 1e-5 relative.
    assert result.mean_nll == pytest.approx(sum(nlls) / len(nlls), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)
    assert result.perplexity > 2  # the scaled random model is far from certain


@pytest.mark.parametrize(("window", "stride"), [(16, 5), (16, 8), (16, 15), (32, 1), (64, 40)])
def test_sliding_window_equals_the_hugging_face_loop(model: Decoder, tokenizer: Tokenizer, window: int, stride: int) -> None:
    ids = tokenizer.encode(TEXT[:120])
    expected = hf_sliding_window_nlls(model, ids, window, stride)
    assert len(expected) == len(ids) - 1  # every token but the first is scored once
    for batch_size in (1, 3):
        result = perplexity(model, tokenizer, TEXT[:120], window=window, stride=stride, batch_size=batch_size)
        assert result.n_tokens == len(expected)
        assert result.nll_sum == pytest.approx(sum(expected), rel=1e-5)


def test_stride_equal_to_window_scores_non_overlapping_chunks(model: Decoder, tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(TEXT)
    window = 32
    chunks = [ids[start : start + window] for start in range(0, len(ids), window)]
    nlls = [nll for chunk in chunks for nll in token_nlls(model, chunk)]  # each chunk on its own, first token unscored
    result = perplexity(model, tokenizer, TEXT, window=window, stride=window, batch_size=4)
    assert result.n_windows == len(chunks) == 9 and result.n_tokens == len(ids) - len(chunks)
    assert result.perplexity == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)


def test_bits_per_byte_and_byte_perplexity(model: Decoder, tokenizer: Tokenizer) -> None:
    text = "naïve café: 日本 🤖 " * 4  # multi-byte characters: bytes != characters
    result = perplexity(model, tokenizer, text, window=32, stride=16)
    n_bytes = len(text.encode("utf-8")) - 1  # the first byte-token is only context
    assert result.n_bytes == n_bytes and result.n_tokens == n_bytes  # one token per byte here
    assert result.bits_per_byte == pytest.approx(result.nll_sum / (n_bytes * math.log(2)), rel=1e-12)
    assert result.byte_perplexity == pytest.approx(math.exp(result.nll_sum / n_bytes), rel=1e-12)
    assert result.to_dict() == {
        "n_tokens": n_bytes, "n_bytes": n_bytes, "nll_sum": result.nll_sum, "mean_nll": result.mean_nll,
        "perplexity": result.perplexity, "bits_per_byte": result.bits_per_byte,
        "byte_perplexity": result.byte_perplexity, "window": 32, "stride": 16, "n_windows": result.n_windows,
    }  # fmt: skip


def test_bos_tokenizer_scores_every_text_byte(model: Decoder) -> None:
    tokenizer = byte_tokenizer((BOS,), bos_id=256, add_bos=True)
    text = TEXT[:50]
    result = perplexity(model, tokenizer, text, window=64)
    assert result.n_tokens == result.n_bytes == 50  # BOS is the unscored first token
    assert result.nll_sum == pytest.approx(sum(token_nlls(model, tokenizer.encode(text))), rel=1e-5)


def test_max_tokens_keeps_the_first_tokens(model: Decoder, tokenizer: Tokenizer) -> None:
    result = perplexity(model, tokenizer, TEXT, window=16, stride=16, max_tokens=40)
    expected = perplexity(model, tokenizer, TEXT[:40], window=16, stride=16)
    assert result.n_bytes == 39 and result.to_dict() == pytest.approx(expected.to_dict(), rel=1e-6)


def test_sliding_windows_cover_each_token_once() -> None:
    assert sliding_windows(10, 4, 4) == [(0, 1, 4), (4, 5, 8), (8, 9, 10)]
    assert sliding_windows(10, 4, 2) == [(0, 1, 4), (2, 4, 6), (4, 6, 8), (6, 8, 10)]
    assert sliding_windows(9, 4, 4) == [(0, 1, 4), (4, 5, 8)]  # a last 1-token chunk has nothing to score
    for n, window, stride in [(100, 16, 5), (37, 8, 8), (50, 64, 3)]:
        scored = [t for _, first, end in sliding_windows(n, window, stride) for t in range(first, end)]
        assert len(scored) == len(set(scored))


def test_file_perplexity_equals_text_perplexity(model: Decoder, tokenizer: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    assert file_perplexity(model, tokenizer, path, window=32, stride=16) == perplexity(model, tokenizer, TEXT, 32, 16)


def test_errors(model: Decoder, tokenizer: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(LlmkitError, match=r"the text has 0 token\(s\)"):
        perplexity(model, tokenizer, "", window=16)
    with pytest.raises(LlmkitError, match=r"the text has 1 token\(s\)"):
        perplexity(model, tokenizer, "a", window=16)
    with pytest.raises(LlmkitError, match="window is 65 tokens but tiny-llama's context is 64"):
        perplexity(model, tokenizer, TEXT, window=65)
    with pytest.raises(LlmkitError, match="window is 1 tokens"):
        perplexity(model, tokenizer, TEXT, window=1)
    with pytest.raises(LlmkitError, match=r"stride is 17; pass a stride from 1 to the window \(16\)"):
        perplexity(model, tokenizer, TEXT, window=16, stride=17)
    with pytest.raises(LlmkitError, match="stride is 0"):
        perplexity(model, tokenizer, TEXT, window=16, stride=0)
    with pytest.raises(LlmkitError, match="batch_size is 0"):
        perplexity(model, tokenizer, TEXT, window=16, batch_size=0)
    with pytest.raises(LlmkitError, match="max_tokens is 1"):
        perplexity(model, tokenizer, TEXT, window=16, max_tokens=1)
    with pytest.raises(LlmkitError, match="text file not found: .*missing.txt"):
        file_perplexity(model, tokenizer, tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(LlmkitError, match="empty.txt is empty"):
        file_perplexity(model, tokenizer, tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(LlmkitError, match="latin1.txt is not UTF-8"):
        file_perplexity(model, tokenizer, tmp_path / "latin1.txt")


def test_progress_bar(model: Decoder, tokenizer: Tokenizer, capsys: pytest.CaptureFixture) -> None:
    assert isinstance(perplexity(model, tokenizer, TEXT, window=32, progress=True), PerplexityResult)
    assert "perplexity" in capsys.readouterr().err


# ---- a file in pieces ------------------------------------------------------------------------------------------------


# tinyshakespeare with multi-byte characters (2, 3 and 4 UTF-8 bytes) sprinkled in, so piece boundaries fall inside
# words and inside characters
PIECES_TEXT = shakespeare_text()[:5000].replace("e", "é", 40).replace("the", "th— ", 30).replace("ing", "ing 🎭", 9)


def trained_tokenizer(style: str) -> Tokenizer:
    """A 400-token BPE trained here on PIECES_TEXT, with BOS: GPT-2's byte-level scheme, or SentencePiece's "▁"
    words with the text's start marked (Metaspace, prepend "first"), which a naive per-piece encode gets wrong."""
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = BackendTokenizer(models.BPE())
    if style == "byte-level":
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        backend.decoder = decoders.Metaspace(prepend_scheme="first")
        alphabet = []
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[BOS], initial_alphabet=alphabet, show_progress=False)
    backend.train_from_iterator([PIECES_TEXT], trainer)
    return Tokenizer(backend, bos_id=backend.token_to_id(BOS), add_bos=True)


@pytest.mark.parametrize("style", ["byte-level", "metaspace"])
def test_file_in_pieces_equals_the_whole_text(style: str, tmp_path: Path) -> None:
    from llmkit.eval.text_stream import file_pieces, text_tokens

    tokenizer = trained_tokenizer(style)
    path = tmp_path / "text.txt"
    path.write_text(PIECES_TEXT, encoding="utf-8")
    whole = tokenizer.backend.encode(PIECES_TEXT, add_special_tokens=False)
    pieces = list(file_pieces(path, 61))
    assert "".join(pieces) == PIECES_TEXT and len(pieces) > 80
    assert any(not piece[-1].isspace() and not piece[-1].isascii() for piece in pieces)  # cut next to a character...
    assert any(len(piece.encode()) != 61 for piece in pieces[:-1])  # ... and inside one (its bytes went on)
    naive = [token for piece in pieces for token in tokenizer.backend.encode(piece, add_special_tokens=False).ids]
    assert naive != whole.ids  # the pieces split words: encoding each piece alone is wrong
    runs = list(text_tokens(tokenizer, file_pieces(path, 61), margin=64))
    assert len(runs) > 10
    assert [token for run in runs for token in run.ids] == whole.ids
    assert [span for run in runs for span in run.spans] == whole.offsets
    assert "".join(run.text for run in runs) == PIECES_TEXT

    torch.manual_seed(0)
    model = Decoder(Config.from_name("tiny-llama", vocab_size=400, max_seq_len=64)).eval()
    for max_tokens in (None, 1001):
        expected = perplexity(model, tokenizer, PIECES_TEXT, 32, 24, batch_size=3, max_tokens=max_tokens)
        got = file_perplexity(model, tokenizer, path, window=32, stride=24, batch_size=3, max_tokens=max_tokens,
                              piece_bytes=61)
        assert got == expected  # the same ids, windows and batches: the same floats
    assert expected.n_tokens == 1000 and got.n_bytes < len(PIECES_TEXT.encode())


def test_scorer_keeps_only_the_ids_later_windows_read(model: Decoder) -> None:
    from llmkit.eval.perplexity import WindowScorer

    ids = [int(token) for token in torch.randint(0, 257, (500,), generator=torch.Generator().manual_seed(0))]
    scorer, held = WindowScorer(model, 32, 16, 2, progress=False), []
    for start in range(0, len(ids), 7):
        scorer.add(ids[start : start + 7])
        held.append(len(scorer.ids))
    nll_sum, n_tokens, n_windows = scorer.finish()
    assert max(held) <= 32 + 16 * 2 + 7  # a batch of windows plus one run, never the whole text
    assert n_windows == len(sliding_windows(500, 32, 16)) and n_tokens == 499
    assert nll_sum == pytest.approx(sum(hf_sliding_window_nlls(model, ids, 32, 16)), rel=1e-5)


# ---- real weights ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_perplexity_matches_transformers(smollm2_float, smollm2_tokenizer) -> None:
    """SmolLM2-135M-Instruct on the first ~2,048 tokens of tinyshakespeare, context 512, stride 512: llmkit vs the
    transformers model's own logits on the same ids and the same windows."""
    from transformers import AutoModelForCausalLM

    from llmkit.checkpoints import default_model_path

    path = default_model_path()
    tokenizer = smollm2_tokenizer
    text = shakespeare_text()[:8000]
    ids = tokenizer.encode(text)[:2048]
    assert len(ids) == 2048
    result = perplexity(smollm2_float, tokenizer, text, window=512, stride=512, batch_size=2, max_tokens=2048)

    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    nll_sum, n_tokens = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids), 512):
            window = torch.tensor([ids[start : start + 512]])
            logprobs = torch.log_softmax(reference(window).logits[0, :-1], dim=-1)  # (511, V)
            nll_sum -= logprobs.gather(-1, window[0, 1:, None]).double().sum().item()
            n_tokens += window.shape[1] - 1
    expected = math.exp(nll_sum / n_tokens)
    assert result.n_tokens == n_tokens == 2044
    assert result.perplexity == pytest.approx(expected, rel=5e-3)  # the bar: within 0.5%
    print(f"SmolLM2-135M-Instruct tinyshakespeare[:2048 tokens] ppl: llmkit {result.perplexity:.4f}, "
          f"transformers {expected:.4f}, bits/byte {result.bits_per_byte:.4f}")


@pytest.mark.slow
def test_smollm2_tokenizer_in_pieces_equals_the_whole_text(tmp_path: Path, smollm2_tokenizer) -> None:
    """SmolLM2's real tokenizer (GPT-2-style byte-level BPE, 49k merges) over 40,000 characters of tinyshakespeare
    read in 997-byte pieces gives the ids and spans of one encode of the whole text."""
    from llmkit.eval.text_stream import file_pieces, text_tokens

    tokenizer = smollm2_tokenizer
    text = shakespeare_text()[:40000] + " naïve café — 日本語 🎭"
    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8")
    whole = tokenizer.backend.encode(text, add_special_tokens=False)
    runs = list(text_tokens(tokenizer, file_pieces(path, 997)))
    assert len(runs) > 30
    assert [token for run in runs for token in run.ids] == whole.ids
    assert [span for run in runs for span in run.spans] == whole.offsets
