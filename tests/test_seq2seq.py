"""The encoder-decoder (T5) held against `transformers`' T5ForConditionalGeneration: tiny random models of both
layouts (v1.0: ReLU, tied and rescaled head; v1.1: gated GELU, untied head) are saved here, imported by
llmkit's key map and compared logit by logit on padded batches, then token by token in greedy generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration
from transformers.models.t5.modeling_t5 import T5Attention

from llmkit.checkpoints import load_config, load_model, save_model
from llmkit.checkpoints.hf_t5 import load_hf_t5
from llmkit.checkpoints.native import save_native
from llmkit.config import Config
from llmkit.errors import LlmkitError
from llmkit.generate import SamplingSettings
from llmkit.generate.seq2seq import generate_seq2seq
from llmkit.models.seq2seq import Seq2Seq
from llmkit.nn.position import relative_position_buckets

VOCAB = 97
# fp32 on both sides: only the summation order of matmuls and softmax differs (~1e-6 here), while a wrong key,
# a missing rescale, a 1/sqrt(d) scaling or a bucket off by one moves the logits by 1e-2 or more.
TOLERANCE = 1e-4
LAYOUTS = {"v1.0": ("relu", True), "v1.1": ("gated-gelu", False)}  # feed_forward_proj, tied head

pytestmark = pytest.mark.usefixtures("one_thread")


def hf_t5(layout: str, n_decoder_layers: int = 3, seed: int = 0) -> T5ForConditionalGeneration:
    """A tiny random T5 of `layout`; small bucket settings so both exact and logarithmic buckets occur."""
    feed_forward, tied = LAYOUTS[layout]
    torch.manual_seed(seed)
    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=n_decoder_layers,
                      num_heads=4, feed_forward_proj=feed_forward, tie_word_embeddings=tied, dropout_rate=0.0,
                      relative_attention_num_buckets=8, relative_attention_max_distance=20, decoder_start_token_id=0)
    model = T5ForConditionalGeneration(config).eval()
    if not tied:  # transformers 5 builds every T5 tied; a v1.1 checkpoint stores its own head
        model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 32) * 0.2)
    with torch.no_grad():  # a livelier relative bias than the init's, so positions matter in the comparison
        for stack in (model.encoder, model.decoder):
            stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight.normal_(0.0, 1.0)
        for name, parameter in model.named_parameters():
            if name.endswith((".o.weight", ".wo.weight")):  # layers that outweigh the (std 1) embedding in the residual,
                parameter.mul_(4.0)  # so greedy decoding does not just repeat its input token
    return model


def saved(model: T5ForConditionalGeneration, directory: Path) -> Path:
    model.save_pretrained(directory)
    return directory


def padded_batch(generator_seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Source ids (3, 30) with left padding in row 1 and right padding in row 2; padding holds random ids."""
    generator = torch.Generator().manual_seed(generator_seed)
    ids = torch.randint(2, VOCAB, (3, 30), generator=generator)
    mask = torch.ones(3, 30, dtype=torch.long)
    mask[1, :7] = 0
    mask[2, 21:] = 0
    return ids, mask


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kernel", ["sdpa", "reference"])
def test_logits_match_transformers_on_padded_batches(tmp_path: Path, layout: str, kernel: str) -> None:
    reference = hf_t5(layout)
    model = load_model(saved(reference, tmp_path))
    assert model.config.tie_embeddings == (layout == "v1.0") and model.config.scale_decoder_outputs == (layout == "v1.0")
    assert (model.lm_head is None) == (layout == "v1.0")
    model.kernel = kernel
    ids, mask = padded_batch()
    decoder_ids = torch.randint(2, VOCAB, (3, 25), generator=torch.Generator().manual_seed(2))
    decoder_ids[:, 0] = 0
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        logits = model(ids, decoder_ids, attention_mask=mask)
    assert (logits - expected).abs().max().item() <= TOLERANCE
    # the padding really is hidden: other ids under the mask change nothing
    with torch.no_grad():
        other = model(torch.where(mask.bool(), ids, 5), decoder_ids, attention_mask=mask)
    assert (other - logits).abs().max().item() <= 1e-5


def test_v11_config_written_by_older_transformers_loads_untied_and_unscaled(tmp_path: Path) -> None:
    """google/t5-v1_1-* and FLAN-T5 config.json files say tie_word_embeddings=false and nothing about scaling."""
    reference = hf_t5("v1.1")
    directory = saved(reference, tmp_path)
    data = json.loads((directory / "config.json").read_text())
    data.pop("scale_decoder_outputs")
    data["tie_word_embeddings"] = False
    (directory / "config.json").write_text(json.dumps(data))
    model = load_model(directory)
    assert not model.config.scale_decoder_outputs and not model.config.tie_embeddings
    ids, mask = padded_batch()
    decoder_ids = torch.tensor([[0, 5, 9, 13]] * 3)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        assert (model(ids, decoder_ids, mask) - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("layout", LAYOUTS)
def test_greedy_generation_matches_transformers(tmp_path: Path, layout: str) -> None:
    # equal encoder and decoder depths: transformers 5.24's generate sizes its cache by the encoder's depth
    reference = hf_t5(layout, n_decoder_layers=2, seed=3)
    model = load_model(saved(reference, tmp_path))
    ids, mask = padded_batch()
    steps = 8
    expected = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                                  num_beams=1)[:, 1:]  # drop the decoder start token
    tokens = generate_seq2seq(model, ids, steps, attention_mask=mask, stop_ids=[reference.config.eos_token_id],
                              pad_id=reference.config.pad_token_id)
    assert tokens.tolist() == expected.tolist()
    assert len(set(tokens.flatten().tolist())) > 2  # a real sequence of choices, not one token repeated


def test_cached_decoding_equals_teacher_forcing(tmp_path: Path) -> None:
    """Token-by-token decoding through the KV cache (cross keys/values projected once) gives the full pass's logits."""
    model = load_model(saved(hf_t5("v1.1"), tmp_path))
    ids, mask = padded_batch()
    decoder_ids = torch.randint(2, VOCAB, (3, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids, decoder_ids, mask)  # (3, 12, V)
        keys_values = model.encoder_keys_values(model.encode(ids, mask))
        cache = model.new_cache(3, 12)
        first = model.decode(decoder_ids[:, :5], keys_values, mask, cache)  # a 5-token chunk, then one at a time
        steps = [model.decode(decoder_ids[:, t : t + 1], keys_values, mask, cache) for t in range(5, 12)]
    assert (torch.cat([first, *steps], dim=1) - full).abs().max().item() <= 1e-5
    with pytest.raises(LlmkitError, match="KV cache is full"):
        model.decode(decoder_ids[:, :1], keys_values, mask, cache)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_buckets_match_transformers(bidirectional: bool) -> None:
    relative = torch.arange(-300, 301)[None, :]  # (1, 601) key - query distances
    for buckets, distance in ((32, 128), (8, 20), (16, 64)):
        expected = T5Attention._relative_position_bucket(relative, bidirectional, buckets, distance)
        assert torch.equal(relative_position_buckets(relative, bidirectional, buckets, distance), expected)


def test_sampling_is_seeded_and_rows_stop_at_their_stop_id(tmp_path: Path) -> None:
    model = load_model(saved(hf_t5("v1.1", seed=5), tmp_path))
    ids, mask = padded_batch()
    settings = SamplingSettings(temperature=1.5, seed=7)
    first = generate_seq2seq(model, ids, 12, mask, settings=settings)
    assert torch.equal(first, generate_seq2seq(model, ids, 12, mask, settings=settings))
    assert not torch.equal(first, generate_seq2seq(model, ids, 12, mask, settings=SamplingSettings(temperature=1.5,
                                                                                                   seed=8)))
    stop = int(first[0, 2])  # make row 0 stop at its third token
    stopped = generate_seq2seq(model, ids, 12, mask, settings=settings, stop_ids=[stop], pad_id=1)
    end = first[0].tolist().index(stop)
    assert stopped[0, : end + 1].tolist() == first[0, : end + 1].tolist()
    assert set(stopped[0, end + 1 :].tolist()) <= {1}


def test_native_checkpoint_round_trip(tmp_path: Path) -> None:
    model = Seq2Seq(Config.from_name("mini-t5", vocab_size=VOCAB))
    save_model(model, tmp_path / "native")
    loaded = load_model(tmp_path / "native")
    assert type(loaded) is Seq2Seq
    ids, mask = padded_batch()
    decoder_ids = torch.tensor([[0, 3, 4]] * 3)
    with torch.no_grad():
        assert torch.equal(loaded(ids, decoder_ids, mask), model.eval()(ids, decoder_ids, mask))


def test_t5_presets_have_the_published_parameter_counts() -> None:
    for name, parameters in (("t5-small", 60_506_624), ("flan-t5-small", 76_961_152)):
        with torch.device("meta"):
            assert Seq2Seq(Config.from_name(name)).num_parameters() == parameters


def test_training_step_lowers_the_loss() -> None:
    """The model learns: a few AdamW steps on one batch of span corruption lower seq2seq_loss (from T5's init)."""
    from llmkit.train.objectives import seq2seq_loss, span_corruption_batch

    torch.manual_seed(0)
    model = Seq2Seq(Config.from_name("mini-t5", vocab_size=VOCAB, n_layers=2, n_decoder_layers=2, d_model=64, d_ff=96))
    tokens = torch.randint(20, VOCAB, (4, 40), generator=torch.Generator().manual_seed(0))
    batch = span_corruption_batch(tokens, list(range(1, 20)), torch.Generator().manual_seed(1), eos_id=0,
                                  decoder_start_id=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        loss = seq2seq_loss(model, batch).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_pretrain_seq2seq_on_a_small_corpus(tmp_path: Path) -> None:
    """`llmkit pretrain --arch seq2seq`: a tokenizer with sentinels, span corruption, checkpoints that load back."""
    from dataclasses import replace

    from llmkit.checkpoints import load_tokenizer
    from llmkit.commands.pretrain import PRETRAIN_DEFAULTS, SampleSettings, pretrain

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"Line {i}: the quick brown fox jumps over the lazy dog number {i % 17}.\n"
                              for i in range(600)))
    settings = replace(PRETRAIN_DEFAULTS, max_steps=3, batch_size=2, eval_every=3, eval_batches=1, log_every=1,
                       device="cpu", warmup_steps=1)
    result = pretrain(arch="seq2seq", data=[str(corpus)], vocab_size=400, seq_len=32, output=str(tmp_path / "run"),
                      train=settings, sample=SampleSettings(prompt="Line 3:", max_new_tokens=4))
    assert result.steps == 3 and result.val_loss is not None
    model = load_model(result.checkpoint)
    assert model.config.arch == "seq2seq" and model.config.name == "mini-t5"
    tokenizer = load_tokenizer(result.checkpoint)
    assert tokenizer.token_to_id("<extra_id_99>") is not None
    with pytest.raises(LlmkitError, match="--arch seq2seq needs an encoder-decoder preset"):
        pretrain(model="mini", arch="seq2seq", data=str(tmp_path / "run" / "data"), output=str(tmp_path / "run2"),
                 train=settings)


# --------------------------------------------------------------------------- error paths


def test_config_errors_name_the_field() -> None:
    with pytest.raises(LlmkitError, match="uses position='relative'"):
        Config(arch="seq2seq")
    with pytest.raises(LlmkitError, match="uses position='relative'"):
        Config(position="relative")
    with pytest.raises(LlmkitError, match="n_decoder_layers=0 must be a positive integer"):
        Config.from_name("mini-t5", n_decoder_layers=0)
    with pytest.raises(LlmkitError, match="Seq2Seq needs arch='seq2seq'"):
        Seq2Seq(Config.from_name("tiny-llama"))


def test_input_errors() -> None:
    model = Seq2Seq(Config.from_name("mini-t5", vocab_size=VOCAB, n_layers=1, n_decoder_layers=1))
    ids, mask = padded_batch()
    mask[0] = 0
    with pytest.raises(LlmkitError, match="a row of attention_mask is all zeros"):
        model(ids, ids[:, :2], mask)
    with pytest.raises(LlmkitError, match="expected the shape of input_ids"):
        model(ids, ids[:, :2], mask[:, :3])
    with pytest.raises(LlmkitError, match="max_new_tokens=0 must be >= 1"):
        generate_seq2seq(model, ids, 0)
    with pytest.raises(LlmkitError, match="outside mini-t5's vocabulary"):
        generate_seq2seq(model, ids + VOCAB, 2)
    model.config.decoder_start_id = None
    with pytest.raises(LlmkitError, match="has no decoder_start_id"):
        generate_seq2seq(model, ids, 2)


def test_import_errors_name_the_file_and_fix(tmp_path: Path) -> None:
    llama = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(llama)
    with pytest.raises(LlmkitError, match="declares LlamaForCausalLM, not T5ForConditionalGeneration"):
        load_hf_t5(llama)
    save_native(Config.from_name("tiny-llama"), {}, tmp_path / "native-decoder")
    with pytest.raises(LlmkitError, match="holds a decoder model"):
        load_model(tmp_path / "native-decoder", arch="seq2seq")

    directory = saved(hf_t5("v1.0"), tmp_path / "t5")
    data = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**data, "feed_forward_proj": "gated-tanh"}))
    with pytest.raises(LlmkitError, match="feed_forward_proj='gated-tanh' is not supported"):
        load_hf_t5(directory)
    (directory / "config.json").write_text(json.dumps(data))
    weights = load_file(directory / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "layer.1.layer_norm" not in k}, directory / "model.safetensors")
    with pytest.raises(LlmkitError, match=r"layer\.1\.layer_norm\.weight \(and 4 more\) missing from"):
        load_hf_t5(directory)
    save_file({**weights, "encoder.block.9.layer.0.layer_norm.weight": torch.ones(32)}, directory / "model.safetensors")
    with pytest.raises(LlmkitError, match=r"unexpected tensor encoder\.block\.9.*use the config\.json"):
        load_hf_t5(directory)
    (directory / "config.json").write_text(json.dumps({**data, "d_ff": 64}))
    save_file(weights, directory / "model.safetensors")
    with pytest.raises(LlmkitError, match=r"has shape \((48, 32|32, 48)\).*config expects"):
        load_hf_t5(directory)


@pytest.mark.parametrize(("changes", "message"), [
    (dict(d_kv="8"), r"d_kv='8' is a string, but it must be an integer; fix d_kv in the file"),
    (dict(num_layers=2.5), r"num_layers=2.5 is a fractional number, but it must be an integer"),
    (dict(layer_norm_epsilon=[1e-6]), r"layer_norm_epsilon=\[1e-06\] is a list, but it must be a number"),
    (dict(num_heads=0), r"config '[^']+': num_heads=0 must be a positive integer"),  # Config's check, T5's names
])
def test_t5_config_json_of_the_wrong_type_names_the_key(tmp_path: Path, changes: dict, message: str) -> None:
    directory = saved(hf_t5("v1.0"), tmp_path / "t5")
    data = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**data, **changes}))
    for load in (load_config, load_model):  # `llmkit info` and every loading verb
        with pytest.raises(LlmkitError, match=rf"t5/config.json: {message}"):
            load(directory)
