import pytest
import torch

from llmkit import Config, LlmkitError
from llmkit.estimate import count_parameters, kv_cache_bytes
from llmkit.models.decoder import Decoder
from llmkit.presets import PRESETS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_counts_exactly(name):
    config = Config.from_name(name)
    with torch.device("meta"):  # shapes only: no memory for the 7B presets
        model = Decoder(config)
    assert count_parameters(config) == model.num_parameters()


def test_published_sizes():
    # Parameter counts as published for the original checkpoints.
    assert count_parameters(Config.from_name("gpt2")) == 124_439_808
    assert count_parameters(Config.from_name("smollm2-135m")) == 134_515_008
    assert round(count_parameters(Config.from_name("llama-3.2-1b")) / 1e9, 2) == 1.24
    assert round(count_parameters(Config.from_name("mistral-7b")) / 1e9, 2) == 7.25


def test_derived_fields():
    config = Config(d_model=96, n_heads=6, mlp="swiglu")
    assert config.head_dim == 16 and config.n_kv_heads == 6
    assert config.d_ff == 256  # 8/3 * 96 = 256, rounded up to a multiple of 256
    assert Config(d_model=96, n_heads=6, mlp="gelu").d_ff == 384


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(n_heads=6, n_kv_heads=4, d_model=96), "n_heads=6 is not divisible by n_kv_heads=4"),
        (dict(d_model=100, n_heads=3), "d_model=100 is not divisible by n_heads=3"),
        (dict(norm="batchnorm"), "norm='batchnorm'; choose one of"),
        (dict(position="sinusoid"), "position='sinusoid'"),
        (dict(n_layers=0), "n_layers=0 must be a positive integer"),
        (dict(d_model=60, n_heads=4, head_dim=15), "RoPE needs an even head_dim"),
        (dict(rope_scaling=dict(kind="yarn", factor=2.0)), "rope_scaling.kind='yarn'"),
    ],
)
def test_impossible_configs_are_refused_with_the_field_named(fields, message):
    with pytest.raises(LlmkitError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Config(**fields)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(LlmkitError, match="unknown model preset 'gpt5'.*smollm2-135m"):
        Config.from_name("gpt5")


def test_save_load_round_trip(tmp_path):
    config = Config.from_name("llama-3.2-1b")
    config.save(tmp_path / "config.json")
    assert Config.load(tmp_path / "config.json") == config


def test_load_errors(tmp_path):
    with pytest.raises(LlmkitError, match="does not exist"):
        Config.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(LlmkitError, match="is not valid JSON"):
        Config.load(tmp_path / "bad.json")
    (tmp_path / "extra.json").write_text('{"d_model": 64, "n_shared_experts": 8}')
    with pytest.raises(LlmkitError, match=r"unknown fields \['n_shared_experts'\]"):
        Config.load(tmp_path / "extra.json")


def test_kv_cache_bytes():
    config = Config.from_name("smollm2-135m")  # 30 layers x 3 kv heads x 64 dims
    assert kv_cache_bytes(config, batch_size=1, n_tokens=1, bytes_per_value=2) == 2 * 30 * 192 * 2


def test_the_names_split_out_of_config_stay_importable_from_it():
    """config.py's checks live in config_checks.py / config_types.py; every name callers imported stays reachable."""
    import llmkit.config as config
    from llmkit import config_checks, config_types

    for name in ("NORMS", "MLPS", "GATED_MLPS", "POSITIONS", "ROPE_SCALINGS", "ARCHS", "ROUTERS", "ENCODER_HEADS",
                 "LABELLED_HEADS", "MIXERS", "LAYER_TYPES"):
        assert getattr(config, name) is getattr(config_checks, name), name
    assert config.check_field_types is config_types.check_field_types
    with pytest.raises(LlmkitError, match=r"rope_scaling must be an object \(kind, factor, \.\.\.\) or null"):
        Config(rope_scaling=5)
    with pytest.raises(LlmkitError, match=r"n_heads=4 is not divisible by n_kv_heads=3"):
        Config(n_kv_heads=3)
