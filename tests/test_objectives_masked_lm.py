"""BERT's masked-LM corruption (statistics on a large sample), its loss, and `llmkit pretrain --arch encoder`."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chi2

from llmkit.checkpoints import load_model, load_tokenizer
from llmkit.checkpoints.native import save_native
from llmkit.commands.pretrain import pretrain
from llmkit.config import Config
from llmkit.data.batch import IGNORE_INDEX
from llmkit.errors import LlmkitError
from llmkit.models.encoder import Encoder, MaskedLM
from llmkit.tokenizer import Tokenizer
from llmkit.train.objectives import masked_lm_batch, masked_lm_loss
from llmkit.train.settings import TrainSettings

VOCAB = 50
SPECIAL = {0, 1}  # e.g. <|endoftext|> and [PAD]
MASK_ID = 2  # [MASK] is special too: never chosen, never a random replacement
ORDINARY = VOCAB - 3


@pytest.fixture(scope="module")
def large_sample():
    """1,000,000 tokens uniform over the vocabulary, corrupted once."""
    tokens = torch.randint(0, VOCAB, (1000, 1000), generator=torch.Generator().manual_seed(0))
    batch = masked_lm_batch(tokens, MASK_ID, VOCAB, SPECIAL, torch.Generator().manual_seed(1))
    return tokens, batch


def test_fifteen_percent_of_the_ordinary_tokens_are_chosen(large_sample):
    tokens, batch = large_sample
    chosen = batch["labels"] != IGNORE_INDEX
    ordinary = tokens >= 3
    # ~940,000 candidates: the standard error of the fraction is 0.0004, so 0.003 is over 7 standard errors
    assert abs(chosen[ordinary].float().mean().item() - 0.15) < 0.003
    assert not chosen[~ordinary].any()  # special tokens (and [MASK]) are never targets
    assert torch.equal(batch["labels"][chosen], tokens[chosen])
    assert torch.equal(batch["input_ids"][~chosen], tokens[~chosen])  # unchosen tokens are untouched


def test_chosen_tokens_are_masked_replaced_or_kept_eighty_ten_ten(large_sample):
    tokens, batch = large_sample
    chosen = batch["labels"] != IGNORE_INDEX
    inputs, originals = batch["input_ids"][chosen], tokens[chosen]
    masked = (inputs == MASK_ID).float().mean().item()
    replaced = ((inputs != MASK_ID) & (inputs != originals)).float().mean().item()
    kept = (inputs == originals).float().mean().item()
    # A random replacement draws the original token again with probability 1/ORDINARY, which then counts as kept.
    # ~141,000 chosen tokens: standard errors are below 0.0011, so 0.006 is over 5 of them.
    assert abs(masked - 0.8) < 0.006
    assert abs(replaced - 0.1 * (1 - 1 / ORDINARY)) < 0.006
    assert abs(kept - (0.1 + 0.1 / ORDINARY)) < 0.006


def test_random_replacements_are_uniform_over_the_ordinary_vocabulary(large_sample):
    tokens, batch = large_sample
    chosen = batch["labels"] != IGNORE_INDEX
    inputs = batch["input_ids"][chosen]
    replacements = inputs[(inputs != MASK_ID) & (inputs != tokens[chosen])]
    counts = torch.bincount(replacements, minlength=VOCAB)
    assert counts[:3].sum() == 0  # never a special token or [MASK]
    # Pearson's chi-square against uniform over the 47 ordinary ids, each excluding the token it replaces:
    # with uniform tokens every id is still equally likely. Refuse only at the 0.1% tail.
    expected = len(replacements) / ORDINARY
    statistic = ((counts[3:].float() - expected) ** 2 / expected).sum().item()
    assert statistic < chi2.ppf(0.999, df=ORDINARY - 1)


def test_the_same_generator_seed_gives_the_same_batch():
    tokens = torch.randint(3, VOCAB, (4, 64), generator=torch.Generator().manual_seed(0))
    first, again, other = (masked_lm_batch(tokens, MASK_ID, VOCAB, SPECIAL, torch.Generator().manual_seed(seed))
                           for seed in (5, 5, 6))
    assert torch.equal(first["input_ids"], again["input_ids"]) and torch.equal(first["labels"], again["labels"])
    assert not torch.equal(first["labels"], other["labels"])


def test_masked_lm_loss_is_cross_entropy_at_the_chosen_tokens():
    torch.manual_seed(0)
    model = MaskedLM(Config.from_name("tiny-bert", encoder_head="masked_lm"))
    tokens = torch.randint(3, 256, (2, 32))
    batch = masked_lm_batch(tokens, MASK_ID, 256, SPECIAL, torch.Generator().manual_seed(0))
    logits = model(batch["input_ids"])  # (B, T, V)
    expected = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)
    assert torch.allclose(masked_lm_loss(model, batch).mean(), expected, atol=1e-6)


@pytest.mark.parametrize(("call", "message"), [
    (lambda t: masked_lm_batch(t, MASK_ID, VOCAB, SPECIAL, mask_probability=0.0), "mask_probability=0.0"),
    (lambda t: masked_lm_batch(t, MASK_ID, VOCAB, {60}), "special token id 60 is outside the vocabulary of 50"),
    (lambda t: masked_lm_batch(t, MASK_ID, 3, SPECIAL), "every one of the 3 token ids is special"),
])
def test_bad_masking_arguments_are_refused(call, message):
    with pytest.raises(LlmkitError, match=message):
        call(torch.randint(0, 3, (2, 8)))


def test_a_batch_without_targets_is_refused():
    model = MaskedLM(Config.from_name("tiny-bert"))
    batch = {"input_ids": torch.ones(1, 4, dtype=torch.long), "labels": torch.full((1, 4), IGNORE_INDEX)}
    with pytest.raises(LlmkitError, match="no chosen token to predict"):
        masked_lm_loss(model, batch)


# --------------------------------------------------------------------------- llmkit pretrain --arch encoder


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory):
    """40 masked-LM steps of tiny-bert on the built-in Tiny Shakespeare with a 512-token BPE that has [MASK]."""
    run_dir = tmp_path_factory.mktemp("pretrain-encoder")
    settings = TrainSettings(max_steps=40, batch_size=8, lr=0.01, warmup_steps=4, eval_every=20, eval_batches=4,
                             checkpoint_every=20)
    result = pretrain(arch="encoder", model="tiny-bert", vocab_size=512, seq_len=64, output=str(run_dir),
                      train=settings)
    return run_dir, result


def test_pretrain_encoder_learns_to_fill_in_masked_tokens(encoder_run):
    run_dir, result = encoder_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [row["loss"] for row in rows if row["kind"] == "train"]
    evals = [row["val_loss"] for row in rows if row["kind"] == "eval"]
    # A uniform guess over 512 tokens is ln(512) = 6.24 nats; 40 steps bring tiny-bert to ~5.4 (seen here).
    assert train[0] > math.log(512) - 0.3
    assert evals[-1] < 5.8 and evals[-1] < evals[0] + 0.05
    assert result.steps == 40


def test_pretrain_encoder_checkpoints_load_as_a_masked_lm(encoder_run):
    run_dir, result = encoder_run
    model, tokenizer = load_model(result.checkpoint), load_tokenizer(result.checkpoint)
    assert isinstance(model, MaskedLM) and model.config.arch == "encoder"
    mask_id = tokenizer.token_to_id("[MASK]")
    assert mask_id is not None and mask_id in tokenizer.special_ids
    ids = torch.tensor([tokenizer.encode("ROMEO: I will go to the") + [mask_id]])
    with torch.no_grad():
        assert model(ids).shape == (1, ids.shape[1], tokenizer.vocab_size)


def test_pretrain_encoder_refuses_models_that_do_not_fit(encoder_run, tmp_path):
    run_dir, _ = encoder_run
    with pytest.raises(LlmkitError, match="--model tiny-llama is a decoder"):
        pretrain(arch="encoder", model="tiny-llama", data=str(run_dir / "data"), output=str(tmp_path / "run"))
    with pytest.raises(LlmkitError, match="seq_len=512 exceeds tiny-bert's 256 positions"):
        pretrain(arch="encoder", model="tiny-bert", seq_len=512, data=str(run_dir / "data"), output=str(tmp_path / "b"))
    bare = tmp_path / "bare-encoder"  # an encoder without the masked-LM head cannot continue masked-LM pretraining
    config = Config.from_name("tiny-bert", vocab_size=512)
    save_native(config, Encoder(config).state_dict(), bare)
    Tokenizer.from_dir(run_dir / "data" / "tokenizer").save(bare)
    with pytest.raises(LlmkitError, match="is not a masked-LM encoder"):
        pretrain(arch="encoder", init=str(bare), data=str(run_dir / "data"), output=str(tmp_path / "c"))


def test_pretrain_encoder_refuses_a_tokenizer_without_mask(tmp_path):
    from llmkit.commands.prepare import prepare_data

    text = tmp_path / "text.txt"
    text.write_text("to be or not to be, that is the question. " * 200)
    prepare_data(data=[str(text)], output=str(tmp_path / "data"), vocab_size=300, progress=False)  # no [MASK]
    with pytest.raises(LlmkitError, match=r"the tokenizer has no \[MASK\] token"):
        pretrain(arch="encoder", model="tiny-bert", data=str(tmp_path / "data"), seq_len=16, output=str(tmp_path / "run"))
