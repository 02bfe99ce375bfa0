"""llmkit's native checkpoint directory and the format-independent loading in llmkit.checkpoints."""

import json
import re
from pathlib import Path

import pytest
import torch

from llmkit import Config, LlmkitError
from llmkit.checkpoints import build_model, detect_format, load_config, load_model, save_model
from llmkit.checkpoints.hf_bert import default_encoder_path
from llmkit.checkpoints.native import WEIGHTS_FILE
from llmkit.models.decoder import Decoder
from llmkit.models.encoder import Encoder, MaskedLM, SequenceClassifier, TokenClassifier
from llmkit.models.seq2seq import Seq2Seq
from tests.helpers import cli_status


def test_native_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = Decoder(Config.from_name("tiny-llama")).eval()
    save_model(model, tmp_path / "tiny")
    reloaded = load_model(tmp_path / "tiny")
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(ids), reloaded(ids))


def test_mismatched_checkpoint_names_the_tensor(tmp_path):
    model = Decoder(Config.from_name("tiny-llama"))
    state = model.state_dict()
    state["blocks.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(LlmkitError, match=r"blocks.0.mlp.up_proj.weight has shape \(3, 3\)"):
        build_model(model.config, state)


def test_corrupt_and_incomplete_native_dirs(tmp_path):
    model = Decoder(Config.from_name("tiny-llama"))
    save_model(model, tmp_path / "m")
    assert detect_format(tmp_path / "m") == "native"
    weights = tmp_path / "m" / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated, as by an interrupted copy
    with pytest.raises(LlmkitError, match="model.safetensors is not a readable safetensors file"):
        load_model(tmp_path / "m")
    weights.unlink()
    with pytest.raises(LlmkitError, match="model.safetensors is missing"):
        load_model(tmp_path / "m")


def test_save_leaves_no_temporary_files(tmp_path):
    save_model(Decoder(Config.from_name("tiny-gpt2")), tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]


def test_one_loader_builds_every_family_from_its_declared_architecture(tmp_path):
    torch.manual_seed(0)
    seq2seq = Seq2Seq(Config.from_name("mini-t5"))
    save_model(seq2seq, tmp_path / "t5")
    loaded = load_model(tmp_path / "t5")
    assert type(loaded) is Seq2Seq and not loaded.training
    assert all(torch.equal(loaded.state_dict()[name], t) for name, t in seq2seq.state_dict().items())
    encoder = Encoder(Config.from_name("tiny-bert"))
    save_model(encoder, tmp_path / "bert")
    assert type(load_model(tmp_path / "bert")) is Encoder
    with pytest.raises(LlmkitError, match=r"t5 holds a seq2seq model \(an encoder-decoder, T5\), but this needs a "
                                          r"decoder model"):
        load_model(tmp_path / "t5", arch="decoder")
    with pytest.raises(LlmkitError, match=r"holds an encoder model \(BERT\) \(BertModel\), but this needs a decoder"):
        load_model(default_encoder_path(), arch="decoder")  # refused from config.json, before the weights are read


@pytest.mark.parametrize("head", ["masked_lm", "sequence_classification", "token_classification"])
def test_encoder_heads_round_trip_through_the_native_format(tmp_path, head):
    torch.manual_seed(0)
    config = Config.from_name("tiny-bert")  # encoder_head left at "base": save_model records the model's own head
    model = {"masked_lm": lambda: MaskedLM(config), "sequence_classification": lambda: SequenceClassifier(config, 3),
             "token_classification": lambda: TokenClassifier(config, 5)}[head]().eval()
    save_model(model, tmp_path)
    reloaded = load_model(tmp_path)
    assert type(reloaded) is type(model) and reloaded.config.encoder_head == head
    ids = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        assert torch.equal(reloaded(ids), model(ids))


def test_older_config_files_with_extra_keys_still_load(tmp_path):
    torch.manual_seed(0)
    model = SequenceClassifier(Config.from_name("tiny-bert", encoder_head="sequence_classification", n_labels=4), 4)
    save_model(model, tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    for name in ("encoder_head", "n_labels", "hf_architecture", "eos_ids"):
        data.pop(name)
    data["extra"] = {"encoder_task": "sequence_classification", "n_labels": 4, "source": "a note"}
    (tmp_path / "config.json").write_text(json.dumps(data))
    reloaded = load_model(tmp_path)
    assert type(reloaded) is SequenceClassifier and reloaded.config.n_labels == 4
    assert reloaded.config.extra == {"source": "a note"}


def write_native(directory: Path, **changes) -> Path:
    """A tiny-llama checkpoint whose config.json has `changes` applied (None removes the field)."""
    save_model(Decoder(Config.from_name("tiny-llama")), directory)
    data = json.loads((directory / "config.json").read_text())
    data.update(changes)
    kept = {name: value for name, value in data.items() if name not in changes or changes[name] is not None}
    (directory / "config.json").write_text(json.dumps(kept))
    return directory


@pytest.mark.parametrize(("changes", "message"), [
    (dict(d_model="64"), r"d_model='64' is a string, but d_model must be an integer; fix d_model"),
    (dict(n_layers=2.5), r"n_layers=2.5 is a number, but n_layers must be an integer"),
    (dict(tie_embeddings="yes"), r"tie_embeddings='yes' is a string, but tie_embeddings must be true or false"),
    (dict(rope_scaling="linear"), r"rope_scaling='linear' is a string, but rope_scaling must be an object"),
    (dict(n_kv_heads=3), r"n_heads=4 is not divisible by n_kv_heads=3"),
    (dict(rope_theta=None, n_layers=None), r"config is missing fields \['n_layers', 'rope_theta'\]; an llmkit "
                                           r"config.json lists every field"),
])
def test_native_config_files_are_checked(tmp_path, changes, message):
    directory = write_native(tmp_path / "m", **changes)
    for load in (load_config, load_model):
        with pytest.raises(LlmkitError, match=rf"m/config.json: .*{message}"):
            load(directory)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_at_load(tmp_path, bad):
    model = Decoder(Config.from_name("tiny-llama"))
    with torch.no_grad():
        model.blocks[1].attn.v_proj.weight[3, 2] = bad
    save_model(model, tmp_path / "m")
    with pytest.raises(LlmkitError, match=r"m: tensor blocks.1.attn.v_proj.weight holds NaN or Inf values; the file "
                                          r"is damaged"):
        load_model(tmp_path / "m")


# --------------------------------------------------------------------------- the same errors through the CLI


@pytest.mark.parametrize(("argv", "changes", "message"), [
    (("info", "--model"), dict(rope_theta=None), r"config is missing fields \['rope_theta'\]"),
    (("generate", "--prompt", "[hi]", "--model"), dict(d_model="64"), r"d_model='64' is a string"),
    (("convert", "--output", "OUT", "--model"), dict(n_layers=2.5), r"n_layers=2.5 is a number"),
])
def test_broken_configs_are_one_error_line_in_the_cli(tmp_path, capsys, argv, changes, message):
    directory = write_native(tmp_path / "m", **changes)
    argv = tuple(str(tmp_path / "out") if arg == "OUT" else arg for arg in argv)
    code, err = cli_status(capsys, *argv, str(directory))
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert re.search(message, err)


def test_damaged_weights_are_one_error_line_in_the_cli(tmp_path, capsys):
    model = Decoder(Config.from_name("tiny-llama"))
    with torch.no_grad():
        model.final_norm.weight[0] = float("nan")
    save_model(model, tmp_path / "m")
    code, err = cli_status(capsys, "generate", "--prompt", "[hi]", "--model", str(tmp_path / "m"))
    assert code == 2 and err.strip().splitlines() == [
        f"error: {tmp_path / 'm'}: tensor final_norm.weight holds NaN or Inf values; the file is damaged (or was saved "
        "from a diverged run): re-download, re-convert or re-save it from a good checkpoint"]
