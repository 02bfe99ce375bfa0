"""A Decoder built with Hyena, RetNet or Mamba blocks (Config.mixer / mixer_pattern): decoding through the cache equals
the full forward, generation's greedy tokens equal the full forward's, RetNet's and Mamba's decoding state keeps one
size, checkpoints round-trip, `llmkit pretrain --mixer` trains, resumes and is evaluated, and what does not support
them (HF/GGUF export, the serving engine, packed rows, attention-only options) refuses in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import byte_tokenizer

from llmkit.checkpoints import load_model, save_model
from llmkit.cli import main
from llmkit.config import Config
from llmkit.errors import LlmkitError
from llmkit.generate.decode import generate_tokens
from llmkit.models.decoder import Decoder
from llmkit.nn.mixers import MixerCache

MIXERS = ("hyena", "retnet", "mamba")
PATTERNS = {"retnet+attention": ("retnet", "attention", "mamba")}  # a hybrid: one layer of each of three kinds


def tiny(mixer: str = "retnet", pattern: tuple[str, ...] = (), seed: int = 0, **overrides) -> Decoder:  # noqa: ANN003
    torch.manual_seed(seed)
    config = Config(vocab_size=64, n_layers=len(pattern) or 2, n_heads=2, d_model=32, d_ff=64, max_seq_len=256,
                    mixer=mixer, mixer_pattern=pattern, **overrides)
    return Decoder(config).eval()


@pytest.mark.parametrize("mixer,pattern", [*[(m, ()) for m in MIXERS], ("attention", PATTERNS["retnet+attention"])])
def test_prefill_then_steps_through_the_cache_equals_the_full_forward(mixer, pattern):
    """fp32; 1e-5 of the largest logit (the recurrent forms sum the same terms in another order)."""
    model = tiny(mixer, pattern)
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 40)
        steps = [model(ids[:, :17], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(17, 40)]
    assert isinstance(cache, MixerCache)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5 * full.abs().max().item(), rtol=0)


@pytest.mark.parametrize("mixer", MIXERS)
def test_greedy_generation_equals_the_full_forward_tokens_in_a_padded_batch(mixer):
    model = tiny(mixer)
    prompts = [[5, 9, 2, 33, 7, 1, 8], [40, 41, 3]]  # the second row is left-padded in the batch
    batch = list(generate_tokens(model, prompts, 12))
    for row, prompt in enumerate(prompts):
        sequence = list(prompt)
        with torch.no_grad():
            for _ in range(12):
                sequence.append(int(model(torch.tensor([sequence]))[0, -1].argmax()))
        assert [step[row] for step in batch] == sequence[len(prompt) :]


def state_sizes(model: Decoder, n_steps: int) -> list[int]:
    """Elements each layer's cache holds after a 5-token prompt and `n_steps` decode steps."""
    cache = model.new_cache(1, 5 + n_steps)
    with torch.no_grad():
        model(torch.arange(5)[None], cache=cache)
        for step in range(n_steps):
            model(torch.tensor([[step % 64]]), cache=cache)
    return [cache.state_numel(layer) for layer in range(model.config.n_layers)]


@pytest.mark.parametrize("mixer", ["retnet", "mamba"])
def test_retnet_and_mamba_decoding_state_does_not_grow_with_the_length(mixer):
    model = tiny(mixer)
    short, long = state_sizes(model, 3), state_sizes(model, 120)
    assert short == long and all(size > 0 for size in short)
    config = model.config
    per_layer = {"retnet": config.n_heads * config.head_dim * 2 * config.head_dim,  # (H, Dk, Dv) per row
                 "mamba": 2 * config.d_model * (config.ssm_state_dim + config.short_conv_kernel - 1)}[mixer]
    assert short == [per_layer] * config.n_layers


def test_hyena_decoding_state_grows_with_the_length_as_its_docstring_says():
    model = tiny("hyena")
    short, long = state_sizes(model, 3), state_sizes(model, 120)
    per_token = model.config.hyena_order * model.config.d_model  # one input per long convolution per token, and as
    assert [b - a for a, b in zip(short, long)] == [2 * 117 * per_token] * 2  # many filter taps (one per cache slot)


def test_a_native_checkpoint_round_trips(tmp_path):
    model = tiny("attention", PATTERNS["retnet+attention"], hyena_order=3)
    save_model(model, tmp_path / "model")
    loaded = load_model(tmp_path / "model")
    assert loaded.config.layer_mixers == ("retnet", "attention", "mamba")
    ids = torch.randint(0, 64, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


def test_an_older_config_file_without_the_mixer_fields_loads_as_attention(tmp_path):
    data = Config(vocab_size=64).to_dict()
    for name in ("mixer", "mixer_pattern", "hyena_order", "hyena_filter_dim", "short_conv_kernel", "ssm_state_dim",
                 "ssm_expand"):
        del data[name]
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert Config.load(tmp_path / "config.json").layer_mixers == ("attention", "attention")


@pytest.mark.parametrize("overrides,words", [
    (dict(mixer_pattern=("retnet",)), "mixer_pattern lists 1 layers but n_layers=2"),
    (dict(mixer="retnet", position="alibi"), "position='alibi' is an attention bias"),
    (dict(mixer="mamba", sliding_window=8), "sliding_window=8 is an attention window"),
    (dict(mixer="hyena", hyena_order=0), "hyena_order=0 must be a positive integer"),
    (dict(mixer="lstm"), "mixer='lstm'; choose one of"),
])
def test_bad_mixer_configs_are_refused_by_name(overrides, words):
    with pytest.raises(LlmkitError, match=words):
        Config(n_layers=2, **overrides)


def test_what_only_attention_models_support_refuses_in_one_line(tmp_path):
    from llmkit.checkpoints.gguf_export import export_gguf
    from llmkit.checkpoints.hf import export_hf
    from llmkit.serve.engine import Engine

    model = tiny("mamba")
    for refuse in (lambda: export_hf(model, tmp_path / "hf"), lambda: export_gguf(model, tmp_path / "m.gguf",
                                                                                   byte_tokenizer()),
                   lambda: Engine(model)):
        with pytest.raises(LlmkitError, match="mamba layers") as error:
            refuse()
        assert "\n" not in str(error.value)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "m.gguf").exists()
    with pytest.raises(LlmkitError, match="packed rows"):
        model(torch.zeros(1, 4, dtype=torch.long), document_ids=torch.zeros(1, 4, dtype=torch.long))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Tiny Shakespeare prepared once (a 512-token BPE) by a 2-step attention run; the mixer runs reuse its data."""
    run_dir = tmp_path_factory.mktemp("prepare")
    main(["pretrain", "--model", "tiny-llama", "--vocab_size", "512", "--seq_len", "32", "--output", str(run_dir),
          "--train.max_steps", "2", "--train.batch_size", "4", "--train.warmup_steps", "0", "--train.eval_every", "0",
          "--train.checkpoint_every", "2", "--sample.max_new_tokens", "0"])
    return run_dir / "data"


@pytest.mark.slow  # ~15 s per mixer on 2 loaded cores
@pytest.mark.parametrize("mixer", MIXERS)
def test_pretrain_with_a_mixer_trains_resumes_and_evaluates(mixer, corpus, tmp_path, capsys):
    run = ["pretrain", "--model", "tiny-llama", "--mixer", mixer, "--data", str(corpus), "--seq_len", "32",
           "--output", str(tmp_path), "--train.batch_size", "8", "--train.lr", "0.01", "--train.warmup_steps", "2",
           "--train.eval_every", "6", "--train.eval_batches", "2", "--train.checkpoint_every", "6",
           "--sample.max_new_tokens", "4"]
    main([*run, "--train.max_steps", "6"])
    main([*run, "--train.max_steps", "12"])  # the same command with more steps resumes from step 6
    out = capsys.readouterr().out
    assert "resuming from" in out
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if row["kind"] == "train"]
    evals = [row["val_loss"] for row in rows if row["kind"] == "eval"]
    assert [row["step"] for row in rows if row["kind"] == "eval"] == [6, 12]
    assert evals[-1] < evals[0] < 6.3  # ln(512) = 6.24: it learns, and keeps learning after the resume
    assert train[-1]["step"] == 12
    checkpoint = tmp_path / "checkpoints" / "step-00000012"
    assert load_model(checkpoint).config.mixer == mixer
    main(["perplexity", "--model", str(checkpoint), "--max_tokens", "200", "--window", "32"])
    assert "perplexity" in capsys.readouterr().out
