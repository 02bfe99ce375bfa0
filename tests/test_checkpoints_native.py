"""llmkit's native checkpoint directory and the format-independent loading in llmkit.checkpoints."""

import pytest
import torch

from llmkit import Config, LlmkitError
from llmkit.checkpoints import build_model, detect_format, load_model, save_model
from llmkit.checkpoints.native import WEIGHTS_FILE, save_native
from llmkit.models.decoder import Decoder


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


def test_encoder_and_seq2seq_checkpoints_name_their_own_loader(tmp_path):
    from llmkit.checkpoints import load_model
    from llmkit.checkpoints.hf_bert import default_encoder_path
    from llmkit.models.seq2seq import Seq2Seq

    model = Seq2Seq(Config.from_name("mini-t5"))
    save_native(model.config, model.state_dict(), tmp_path)
    with pytest.raises(LlmkitError, match="is a seq2seq model, not a decoder-only language model; load it with "
                                          "llmkit.checkpoints.hf_t5.load_seq2seq"):
        load_model(tmp_path)
    with pytest.raises(LlmkitError, match="is a bert model, not a decoder-only language model; load it with "
                                          "llmkit.checkpoints.hf_bert.load_encoder"):
        load_model(default_encoder_path())
