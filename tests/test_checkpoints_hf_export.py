"""Hugging Face export of every family beyond decoders: BERT encoders (each head) and T5 (v1.0 / v1.1 layouts).

A tiny random `transformers` model built here is saved, imported by llmkit, exported again and loaded back by
`transformers.from_pretrained`: the tensors must come back equal one by one, the logits equal the original's, the
config.json carry the same fields, and importing the export give llmkit's config back (import(export(x)) == x).
Models llmkit builds itself go through `llmkit convert --to hf` and are held against transformers' forward pass.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from llmkit.checkpoints import load_config, load_model, load_tokenizer, load_weights, save_model
from llmkit.checkpoints.hf import export_hf
from llmkit.checkpoints.hf_bert import default_encoder_path
from llmkit.config import Config
from llmkit.errors import LlmkitError
from llmkit.models.encoder import MaskedLM, SequenceClassifier, build_encoder_model
from llmkit.models.seq2seq import Seq2Seq
from llmkit.tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, Tokenizer
from tests.helpers import run_cli

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

# The export holds the very tensors the original held and transformers runs the same code on both, so the logits
# agree to float32 rounding at most (in practice exactly); 1e-5 leaves room only for rounding.
ROUND_TRIP_TOLERANCE = 1e-5
# llmkit's forward against transformers' on the same fp32 weights: summation order differs over 2 tiny layers
# (~1e-6), while a wrong key, a transposed matrix or a missing rescale moves logits by 1e-2 or more.
PARITY_TOLERANCE = 1e-5
VOCAB = 97
# transformers' BERT fields llmkit reads, each of which must come back from the export unchanged
BERT_FIELDS = ("architectures", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "intermediate_size", "max_position_embeddings", "hidden_act", "layer_norm_eps", "type_vocab_size",
               "pad_token_id", "tie_word_embeddings", "num_labels", "is_decoder")
T5_FIELDS = ("architectures", "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
             "relative_attention_num_buckets", "relative_attention_max_distance", "feed_forward_proj", "dense_act_fn",
             "is_gated_act", "layer_norm_epsilon", "scale_decoder_outputs", "pad_token_id", "eos_token_id",
             "decoder_start_token_id")


def exported(source: Path, directory: Path) -> Path:
    """llmkit imports `source` (a transformers directory) and exports it to `directory`."""
    export_hf(load_model(source), directory)
    return directory


def assert_state_dicts_equal(expected: torch.nn.Module, actual: torch.nn.Module, skip: tuple[str, ...] = ()) -> None:
    """Same parameter names and every tensor bit-for-bit equal (names starting with `skip` left out)."""
    ours = {name: tensor for name, tensor in expected.state_dict().items() if not name.startswith(skip)}
    theirs = {name: tensor for name, tensor in actual.state_dict().items() if not name.startswith(skip)}
    assert sorted(ours) == sorted(theirs)
    unequal = [name for name in ours if not torch.equal(ours[name], theirs[name])]
    assert not unequal, f"tensors differ after the round trip: {unequal[:5]}"


def assert_import_is_inverse(source: Path, export: Path) -> None:
    """Importing the export gives the config and tensors importing the original gave (the name is the folder's)."""
    (config, state), (again, state_again) = load_weights(source), load_weights(export)
    assert dataclasses.replace(again, name=config.name) == config
    assert sorted(state) == sorted(state_again) and all(torch.equal(state[name], state_again[name]) for name in state)


# --------------------------------------------------------------------------- BERT: transformers -> llmkit -> transformers


def tiny_bert(model_class: type, **overrides) -> torch.nn.Module:
    """A tiny random transformers BERT with noise on every parameter (biases and norms are not 0 and 1)."""
    settings = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                    max_position_embeddings=40, type_vocab_size=2, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0, pad_token_id=0)
    torch.manual_seed(0)
    model = model_class(transformers.BertConfig(**{**settings, **overrides}))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
        if hasattr(model, "cls") and not model.config.tie_word_embeddings:
            # an untied head holds the output bias twice; forward uses the decoder's, checkpoints store them equal
            model.cls.predictions.bias.copy_(model.cls.predictions.decoder.bias)
    return model.eval()


def bert_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ids, attention mask (rows of 12, 7 and 3 tokens, right-padded) and two segments in the first row."""
    generator = torch.Generator().manual_seed(0)
    mask = (torch.arange(12)[None] < torch.tensor([12, 7, 3])[:, None]).long()
    ids = torch.randint(1, VOCAB, (3, 12), generator=generator) * mask
    types = torch.zeros_like(ids)
    types[0, 6:] = 1
    return ids, mask, types


def bert_output(model: torch.nn.Module) -> torch.Tensor:
    """Logits of a task model, the last hidden state of a BertModel, on `bert_batch`."""
    ids, mask, types = bert_batch()
    with torch.no_grad():
        output = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


BERT_CASES = {
    "masked-lm-tied": ("BertForMaskedLM", {}),
    "masked-lm-untied": ("BertForMaskedLM", dict(tie_word_embeddings=False)),
    "sequence-classification": ("BertForSequenceClassification", dict(num_labels=3)),
    "token-classification-tanh-gelu": ("BertForTokenClassification", dict(hidden_act="gelu_new", num_labels=5)),
    "bert-model": ("BertModel", {}),
}


@pytest.mark.parametrize("case", BERT_CASES)
def test_bert_round_trips_through_llmkit_to_transformers(tmp_path: Path, case: str) -> None:
    class_name, overrides = BERT_CASES[case]
    reference = tiny_bert(getattr(transformers, class_name), **overrides)
    reference.save_pretrained(tmp_path / "hf")
    export = exported(tmp_path / "hf", tmp_path / "export")
    again = getattr(transformers, class_name).from_pretrained(export).eval()
    # llmkit's Encoder has no pooler (embeddings pool the hidden states), so a BertModel comes back without one
    skip = ("pooler.",) if class_name == "BertModel" else ()
    assert_state_dicts_equal(reference, again, skip)
    assert (bert_output(again) - bert_output(reference)).abs().max() <= ROUND_TRIP_TOLERANCE
    written = transformers.AutoConfig.from_pretrained(export)
    assert {field: getattr(written, field) for field in BERT_FIELDS} == {
        field: getattr(reference.config, field) for field in BERT_FIELDS}
    assert_import_is_inverse(tmp_path / "hf", export)


# --------------------------------------------------------------------------- T5: transformers -> llmkit -> transformers


T5_LAYOUTS = {"v1.0": ("relu", True), "v1.1": ("gated-gelu", False), "gated-silu": ("gated-silu", False)}


def tiny_t5(layout: str) -> torch.nn.Module:
    """A tiny random T5ForConditionalGeneration of `layout` (feed_forward_proj, tied head); 8 buckets over distance
    20 so exact and logarithmic buckets both occur, and a decoder one layer deeper than the encoder."""
    feed_forward, tied = T5_LAYOUTS[layout]
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
        feed_forward_proj=feed_forward, tie_word_embeddings=tied, dropout_rate=0.0, relative_attention_num_buckets=8,
        relative_attention_max_distance=20, decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    if not tied:  # transformers 5 builds every T5 tied; a v1.1 checkpoint stores its own head
        model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 32) * 0.2)
    with torch.no_grad():  # a livelier relative bias than the init's, so the buckets matter in the comparison
        for stack in (model.encoder, model.decoder):
            stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight.normal_(0.0, 1.0)
    return model


def t5_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source ids (3, 30) with left and right padding, and decoder ids (3, 25) starting at the start token 0."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (3, 30), generator=generator)
    mask = torch.ones(3, 30, dtype=torch.long)
    mask[1, :7], mask[2, 21:] = 0, 0
    decoder_ids = torch.randint(2, VOCAB, (3, 25), generator=generator)
    decoder_ids[:, 0] = 0
    return ids, mask, decoder_ids


def t5_logits(model: torch.nn.Module) -> torch.Tensor:
    ids, mask, decoder_ids = t5_batch()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits


@pytest.mark.parametrize("layout", T5_LAYOUTS)
def test_t5_round_trips_through_llmkit_to_transformers(tmp_path: Path, layout: str) -> None:
    reference = tiny_t5(layout)
    reference.save_pretrained(tmp_path / "hf")
    export = exported(tmp_path / "hf", tmp_path / "export")
    again = transformers.T5ForConditionalGeneration.from_pretrained(export).eval()
    tied = T5_LAYOUTS[layout][1]
    assert (again.lm_head.weight.data_ptr() == again.shared.weight.data_ptr()) == tied
    assert ("lm_head.weight" in json.dumps(list_tensors(export))) != tied  # a tied head is not stored twice
    assert_state_dicts_equal(reference, again)
    assert (t5_logits(again) - t5_logits(reference)).abs().max() <= ROUND_TRIP_TOLERANCE
    written = transformers.AutoConfig.from_pretrained(export)
    assert {field: getattr(written, field) for field in T5_FIELDS} == {
        field: getattr(reference.config, field) for field in T5_FIELDS}
    assert_import_is_inverse(tmp_path / "hf", export)


def list_tensors(directory: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
        return list(handle.keys())


# --------------------------------------------------------------------------- llmkit-built models -> `llmkit convert --to hf`


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Noise on every parameter, so norms and biases are not their init's ones and zeros."""
    torch.manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.eval()


def convert_to_hf(capsys: pytest.CaptureFixture, native: Path, out: Path) -> str:
    code, stdout, stderr = run_cli(capsys, "convert", "--model", str(native), "--output", str(out), "--to", "hf")
    assert code == 0, stderr
    return stdout


def test_an_llmkit_masked_lm_converts_to_hf_with_its_tokenizer(tmp_path: Path, capsys) -> None:
    config = Config.from_name("tiny-bert", vocab_size=VOCAB, encoder_head="masked_lm", pad_id=0, eos_id=2)
    model = randomised(build_encoder_model(config))
    assert isinstance(model, MaskedLM)
    save_model(model, tmp_path / "native", tokenizer=Tokenizer.from_dir(default_encoder_path()))
    convert_to_hf(capsys, tmp_path / "native", tmp_path / "hf")
    reference = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    assert type(reference).__name__ == "BertForMaskedLM"
    ids, mask, types = bert_batch()
    with torch.no_grad():
        assert (model(ids, mask, types) - reference(ids, attention_mask=mask, token_type_ids=types).logits
                ).abs().max() <= PARITY_TOLERANCE
    assert dataclasses.replace(load_config(tmp_path / "hf"), name=config.name, hf_architecture=None) == config
    assert (tmp_path / "hf" / TOKENIZER_FILE).is_file() and (tmp_path / "hf" / TOKENIZER_CONFIG_FILE).is_file()
    assert load_tokenizer(tmp_path / "hf").encode("hello") == [7592]


def test_an_llmkit_sequence_classifier_converts_to_hf(tmp_path: Path, capsys) -> None:
    config = Config.from_name("tiny-bert", vocab_size=VOCAB, encoder_head="sequence_classification", n_labels=4)
    model = randomised(build_encoder_model(config))
    assert isinstance(model, SequenceClassifier)
    save_model(model, tmp_path / "native")
    out = convert_to_hf(capsys, tmp_path / "native", tmp_path / "hf")
    assert f"has no {TOKENIZER_FILE}" in out and not (tmp_path / "hf" / TOKENIZER_FILE).exists()
    reference = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert reference.config.num_labels == 4
    ids, mask, types = bert_batch()
    with torch.no_grad():
        assert (model(ids, mask, types) - reference(ids, attention_mask=mask, token_type_ids=types).logits
                ).abs().max() <= PARITY_TOLERANCE


# llmkit's own T5 v1.1 (mini-t5: no pad token, eos 0) and a T5 v1.0 (ReLU, tied and rescaled head), both shrunk
LLMKIT_T5 = {
    "mini-t5": Config.from_name("mini-t5", vocab_size=VOCAB, n_layers=2, n_decoder_layers=3, n_heads=4, d_model=32,
                                head_dim=8, d_ff=48, relative_attention_num_buckets=8,
                                relative_attention_max_distance=20),
    "t5-small": Config.from_name("t5-small", vocab_size=VOCAB, n_layers=2, n_heads=4, d_model=32, head_dim=8, d_ff=48),
}


@pytest.mark.parametrize("name", LLMKIT_T5)
def test_an_llmkit_seq2seq_converts_to_hf(tmp_path: Path, capsys, name: str) -> None:
    config = LLMKIT_T5[name]
    model = randomised(Seq2Seq(config))
    save_model(model, tmp_path / "native")
    convert_to_hf(capsys, tmp_path / "native", tmp_path / "hf")
    reference = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf").eval()
    assert reference.config.scale_decoder_outputs == config.scale_decoder_outputs
    ids, mask, decoder_ids = t5_batch()
    with torch.no_grad():
        theirs = reference(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        assert (model(ids, decoder_ids, attention_mask=mask) - theirs).abs().max() <= PARITY_TOLERANCE
    assert dataclasses.replace(load_config(tmp_path / "hf"), name=config.name, hf_architecture=None) == config


# --------------------------------------------------------------------------- refusals


REFUSED = {
    "t5-grouped-query": (Config.from_name("mini-t5", n_kv_heads=2), r"cannot be exported as "
                         r"T5ForConditionalGeneration: its config.json has no way to say n_kv_heads=2"),
    "t5-plain-gelu": (Config.from_name("mini-t5", mlp="gelu"), r"mlp='gelu' with gelu_approximate='tanh', which "
                      r"T5's feed_forward_proj cannot express"),
    "t5-scaled-attention": (Config.from_name("mini-t5", attention_scale=None), r"no way to say attention_scale=None"),
    "bert-pre-norm": (Config.from_name("tiny-bert", post_norm=False), r"cannot be exported as BertModel: .* "
                      r"post_norm=False \(it would load back as True\)"),
    "bert-without-segments": (Config.from_name("tiny-bert", type_vocab_size=0), r"type_vocab_size=0, but a BERT "
                              r"always has segment"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_configs_the_family_cannot_express_are_refused_before_writing(tmp_path: Path, case: str) -> None:
    config, message = REFUSED[case]
    with torch.device("meta"):
        model = Seq2Seq(config) if config.arch == "seq2seq" else build_encoder_model(config)
    state = {name: torch.zeros(tensor.shape) for name, tensor in model.state_dict().items()}
    with pytest.raises(LlmkitError, match=message) as error:
        export_hf((config, state), tmp_path / "out")
    assert "\n" not in str(error.value) and "--to native" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_an_encoder_state_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    model = build_encoder_model(Config.from_name("tiny-bert", encoder_head="masked_lm"))
    state = model.state_dict()
    state.pop("mlm_head.dense.weight")
    with pytest.raises(LlmkitError, match=r"tensor mlm_head\.dense\.weight is missing"):
        export_hf((model.config, state), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- real weights


@pytest.mark.slow
def test_minilm_converted_to_native_and_back_embeds_like_the_original(tmp_path: Path, capsys) -> None:
    """all-MiniLM-L6-v2 -> llmkit native -> Hugging Face: transformers and sentence-transformers read the export
    and embed exactly as the original directory does."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    source = default_encoder_path()
    code, _, err = run_cli(capsys, "convert", "--model", str(source), "--output", str(tmp_path / "native"))
    assert code == 0, err
    convert_to_hf(capsys, tmp_path / "native", tmp_path / "hf")
    sentences = ["The cat sits on the mat.", "Paris is the capital of France.", "Quantum computers use qubits."]
    tokens = transformers.AutoTokenizer.from_pretrained(source)(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        original = transformers.AutoModel.from_pretrained(source).eval()(**tokens).last_hidden_state
        again = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()(**tokens).last_hidden_state
    assert (again - original).abs().max() <= ROUND_TRIP_TOLERANCE
    # the plain export has no modules.json: sentence-transformers mean-pools (as the original does) and the
    # original's Normalize step is asked for here
    reference = sentence_transformers.SentenceTransformer(str(source), device="cpu")
    ours = sentence_transformers.SentenceTransformer(str(tmp_path / "hf"), device="cpu")
    expected = reference.encode(sentences, convert_to_tensor=True)
    actual = ours.encode(sentences, convert_to_tensor=True, normalize_embeddings=True)
    assert (actual - expected).abs().max() <= ROUND_TRIP_TOLERANCE
    shutil.rmtree(tmp_path / "native")
