"""Mixture of experts: routing against a naive per-token loop, the auxiliary losses against their formulas and
transformers, capacity drops, training with the one loop, Mixtral import/export parity, sparse upcycling."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers

from llmkit.checkpoints import load_model
from llmkit.checkpoints.hf import export_hf
from llmkit.checkpoints.hf_config import MIXTRAL, hf_architecture
from llmkit.commands.moe import moe_upcycle
from llmkit.config import Config
from llmkit.errors import LlmkitError
from llmkit.estimate import count_parameters
from llmkit.models.decoder import Decoder
from llmkit.models.upcycle import upcycle_to_moe
from llmkit.nn.mlp import SwiGLU
from llmkit.nn.moe import MoE, expert_utilisation, moe_aux_loss, moe_layers
from llmkit.tokenizer import Tokenizer
from llmkit.train.loop import TrainSettings, train
from llmkit.train.metrics import METRICS_FILE
from llmkit.train.objectives import causal_lm_loss, token_cross_entropy
from tests.train_script import token_source


def tiny_moe_config(**overrides) -> Config:
    return Config.from_name("tiny-moe", **overrides)  # tiny-llama's shape with 4 experts, top-2


def crafted_layer(n_experts: int, **overrides) -> MoE:
    """A layer whose router is the identity (d_model = n_experts), so a token's router logits are the token itself."""
    config = Config(vocab_size=8, n_layers=1, n_heads=1, d_model=n_experts, d_ff=8, n_experts=n_experts, **overrides)
    torch.manual_seed(0)
    layer = MoE(config)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(n_experts))
    return layer


# --------------------------------------------------------------------------- config and parameter count


def test_config_defaults_leave_dense_models_unchanged_and_pick_k():
    assert Config.from_name("tiny-llama").n_experts == 0
    assert not moe_layers(Decoder(Config.from_name("tiny-llama")))
    assert tiny_moe_config().experts_per_token == 2
    assert tiny_moe_config(router="switch").experts_per_token == 1  # Switch routes each token to one expert
    assert Config.from_dict(tiny_moe_config().to_dict()) == tiny_moe_config()


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(experts_per_token=5), "experts_per_token=5 must be between 1 and n_experts=4"),
    (dict(router="switch", experts_per_token=2), "switch router sends each token to one expert"),
    (dict(router="hash"), "router='hash'; choose one of"),
    (dict(capacity_factor=0.0), "capacity_factor=0.0 must be > 0"),
    (dict(router_z_loss_coef=-1.0), "router_z_loss_coef=-1.0 must be >= 0"),
    (dict(n_experts=-2), "n_experts=-2 must be 0"),
])
def test_impossible_expert_settings_are_refused(overrides, message):
    with pytest.raises(LlmkitError, match=message):
        tiny_moe_config(**overrides)


@pytest.mark.parametrize("overrides", [
    dict(), dict(router="switch"), dict(mlp="gelu", mlp_bias=True, norm="layernorm", n_experts=3),
])
def test_count_parameters_is_exact_for_moe_configs(overrides):
    config = tiny_moe_config(**overrides)
    assert count_parameters(config) == Decoder(config).num_parameters()
    dense = Config.from_dict({**config.to_dict(), "n_experts": 0, "router": "topk", "experts_per_token": None})
    dense_ffn = sum(p.numel() for p in Decoder(dense).blocks[0].mlp.parameters())
    # each layer: n_experts - 1 more FFNs and the router's (n_experts, d_model) matrix
    extra = config.n_layers * ((config.n_experts - 1) * dense_ffn + config.n_experts * config.d_model)
    assert count_parameters(config) - count_parameters(dense) == extra


def test_mixtral_preset_has_the_published_size():
    # transformers' MixtralForCausalLM with mistralai/Mixtral-8x7B-v0.1's config.json: 46,702,792,704 parameters
    assert count_parameters(Config.from_name("mixtral-8x7b")) == 46_702_792_704


def test_moe_layer_errors_name_the_fix():
    with pytest.raises(LlmkitError, match="n_experts=0 builds a dense FFN"):
        MoE(Config.from_name("tiny-llama"))
    config = tiny_moe_config()
    with pytest.raises(LlmkitError, match="3 experts given, config 'tiny-moe' has n_experts=4"):
        MoE(config, experts=[SwiGLU(config) for _ in range(3)])
    model = Decoder(config)
    with pytest.raises(LlmkitError, match="has not run a forward yet"):
        moe_aux_loss(model)
    with pytest.raises(LlmkitError, match="has not run a forward yet"):
        expert_utilisation(model)


# --------------------------------------------------------------------------- routing


def test_topk_routing_matches_a_naive_per_token_loop():
    config = tiny_moe_config(n_experts=5, experts_per_token=2)
    torch.manual_seed(3)
    layer = MoE(config)
    torch.nn.init.normal_(layer.router.weight, std=0.5)  # spread the choices over every expert
    x = torch.randn(3, 7, config.d_model)
    with torch.no_grad():
        out = layer(x)
        expected, counts = torch.zeros_like(x), torch.zeros(5, dtype=torch.long)
        for b in range(3):
            for t in range(7):
                probs = torch.softmax(layer.router.weight @ x[b, t], dim=-1)
                top = sorted(range(5), key=lambda e: -probs[e].item())[:2]
                total = sum(probs[e] for e in top)
                for e in top:
                    expected[b, t] += probs[e] / total * layer.experts[e](x[b, t])
                    counts[e] += 1
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)  # same products, other summation order
    assert layer.tokens_per_expert.tolist() == counts.tolist() and counts.sum() == 3 * 7 * 2
    assert layer.dropped_tokens == 0 and layer.routed_tokens == 42


def test_aux_losses_equal_their_formulas_on_a_crafted_router():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    layer = crafted_layer(4)
    # Router logits log(w): probabilities w / 8 and logsumexp(logits) = log 8 for every token
    weights = torch.tensor([[4.0, 2, 1, 1], [1, 4, 2, 1], [1, 1, 2, 4], [4, 2, 1, 1]])
    x = weights.log()[None]  # (1, 4 tokens, 4)
    layer(x)
    # top-2: {0,1}, {1,2}, {3,2}, {0,1} -> tokens per expert 2, 3, 2, 1 of 4 tokens; P = column means of the table
    assert layer.tokens_per_expert.tolist() == [2, 3, 2, 1]
    f = torch.tensor([2, 3, 2, 1]) / 4
    mean_probability = torch.tensor([10, 9, 6, 7]) / 32
    assert layer.load_balancing_loss.item() == pytest.approx(4 * (f * mean_probability).sum().item())  # 2.0625
    assert layer.load_balancing_loss.item() == pytest.approx(264 / 128)
    reference = load_balancing_loss_func((x[0],), num_experts=4, top_k=2)  # transformers' Mixtral loss, one layer
    assert layer.load_balancing_loss.item() == pytest.approx(reference.item(), rel=1e-6)
    assert layer.z_loss.item() == pytest.approx(math.log(8) ** 2, rel=1e-6)
    expected = 0.01 * 264 / 128 + 0.001 * math.log(8) ** 2  # Config's default coefficients
    assert moe_aux_loss(layer).item() == pytest.approx(expected, rel=1e-6)


def test_switch_capacity_drops_tokens_and_counts_them():
    layer = crafted_layer(2, router="switch", capacity_factor=1.0)
    x = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [3.0, 0.0]]])  # argmax: experts 0, 0, 1, 0
    with torch.no_grad():
        out = layer(x)
    # capacity ceil(1.0 * 4 tokens / 2 experts) = 2: expert 0 takes tokens 0 and 1 (token order); token 3 drops
    assert layer.tokens_per_expert.tolist() == [2, 1] and layer.dropped_tokens == 1
    assert torch.equal(out[0, 3], torch.zeros(2))  # a dropped token's FFN output is zero: the residual carries it
    with torch.no_grad():
        for t, expert in ((0, 0), (1, 0), (2, 1)):  # switch gates are the chosen probability, not renormalised
            probability = torch.softmax(x[0, t], dim=-1)[expert]
            torch.testing.assert_close(out[0, t], probability * layer.experts[expert](x[0, t]))
    stats = expert_utilisation(layer)
    assert stats["moe_dropped_tokens"] == 1 and stats["moe_dropped_fraction"] == 0.25
    assert stats["moe_tokens_per_expert"] == [[2, 1]] and stats["moe_unused_experts"] == 0
    # f = (3/4, 1/4) counts the routing before the drop
    probs = torch.softmax(x[0], dim=-1).mean(0)
    assert layer.load_balancing_loss.item() == pytest.approx(2 * (0.75 * probs[0] + 0.25 * probs[1]).item())


# --------------------------------------------------------------------------- training


def test_causal_lm_loss_adds_the_aux_losses_while_training_only():
    torch.manual_seed(0)
    model = Decoder(tiny_moe_config())
    batch = token_source()(0, 2, 0, 1)
    model.train()
    loss = causal_lm_loss(model, batch).mean()
    cross_entropy = token_cross_entropy(model(batch["input_ids"]), batch["labels"])
    torch.testing.assert_close(loss, cross_entropy + moe_aux_loss(model))
    assert moe_aux_loss(model).item() > 0
    model.eval()
    torch.testing.assert_close(causal_lm_loss(model, batch).mean(), cross_entropy)  # validation: cross-entropy alone
    dense = Decoder(Config.from_name("tiny-llama")).train()
    assert moe_aux_loss(dense).item() == 0 and expert_utilisation(dense) == {}
    assert torch.equal(causal_lm_loss(dense, batch).mean(), token_cross_entropy(dense(batch["input_ids"]), batch["labels"]))


def test_training_a_tiny_moe_lowers_the_loss_and_uses_every_expert(tmp_path, one_thread):
    torch.manual_seed(1)
    model = Decoder(tiny_moe_config())
    settings = TrainSettings(max_steps=30, batch_size=4, warmup_steps=2, eval_every=0, log_every=1,
                             checkpoint_every=100, lr=3e-3)
    result = train(model, causal_lm_loss, token_source(), settings, tmp_path)
    # Random tokens over 64 symbols: ln(64) = 4.16 is the floor; the model starts near ln(vocab 256) = 5.55.
    assert result.losses[0] > 5.3 and result.losses[-1] < 4.7
    rows = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    train_rows = [row for row in rows if row["kind"] == "train"]
    assert len(train_rows) == 30
    for row in train_rows:
        assert len(row["moe_tokens_per_expert"]) == 2  # one list per layer
        assert all(sum(layer) == 4 * 32 * 2 for layer in row["moe_tokens_per_expert"])  # every token, twice
    last = train_rows[-1]
    assert last["moe_unused_experts"] == 0 and all(count > 0 for layer in last["moe_tokens_per_expert"] for count in layer)
    assert last["moe_dropped_tokens"] == 0 and last["moe_load_balancing_loss"] >= 2.0 - 1e-6  # k is its minimum
    reloaded = load_model(result.checkpoint)
    assert reloaded.config.n_experts == 4 and len(moe_layers(reloaded)) == 2


# --------------------------------------------------------------------------- Mixtral checkpoints


def tiny_mixtral(n_layers: int = 2):  # noqa: ANN201 (transformers.MixtralForCausalLM)
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=n_layers,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=64, router_aux_loss_coef=0.02, output_router_logits=True)
    torch.manual_seed(0)
    model = MixtralForCausalLM(config).eval()
    with torch.no_grad():  # transformers initialises the router at std 0.02: widen it so routing differs by token
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(std=0.5)
    return model


def test_mixtral_import_matches_transformers_and_exports_back(tmp_path):
    from transformers import MixtralForCausalLM
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    reference = tiny_mixtral()
    reference.save_pretrained(tmp_path / "hf")  # block_sparse_moe.experts.{j}.w1/w2/w3 and .gate, as on the Hub
    model = load_model(tmp_path / "hf")
    assert (model.config.n_experts, model.config.experts_per_token, model.config.router) == (4, 2, "topk")
    assert model.config.router_aux_loss_coef == 0.02 and model.config.hf_architecture == MIXTRAL
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids)
        logits = model(ids)
    # Same fp32 math; HF runs gate and up as one fused matmul and its own attention kernel, so summation order
    # differs (about 1e-7 here); 1e-4 is the bound the issue sets for fp32 logits.
    assert (logits - expected.logits).abs().max().item() <= 1e-4
    for layer, router_logits in zip(moe_layers(model), expected.router_logits):
        per_layer = load_balancing_loss_func((router_logits,), num_experts=4, top_k=2)
        assert layer.load_balancing_loss.item() == pytest.approx(per_layer.item(), rel=1e-5)
    assert all(count > 0 for layer in expert_utilisation(model)["moe_tokens_per_expert"] for count in layer)

    export_hf(model, tmp_path / "export")
    written = json.loads((tmp_path / "export" / "config.json").read_text())
    assert written["architectures"] == [MIXTRAL] and written["num_local_experts"] == 4
    exported = MixtralForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, expected.logits)


def test_moe_configs_export_as_mixtral_only_when_they_fit():
    assert hf_architecture(tiny_moe_config()) == MIXTRAL
    with pytest.raises(LlmkitError, match="fits no Hugging Face architecture.*router='topk'"):
        hf_architecture(tiny_moe_config(router="switch"))


# --------------------------------------------------------------------------- sparse upcycling


def save_tiny_dense(directory) -> Decoder:  # noqa: ANN001 (a path)
    torch.manual_seed(5)
    model = Decoder(Config.from_name("tiny-llama"))
    vocab = {f"t{i}": i for i in range(256)}
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    from llmkit.checkpoints import save_model

    save_model(model, directory, tokenizer=Tokenizer(backend, eos_id=1))
    return model.eval()


def test_upcycled_model_gives_the_dense_logits_and_loads_back(tmp_path, capsys):
    dense = save_tiny_dense(tmp_path / "dense")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense_logits = dense(ids)
    moe_upcycle(str(tmp_path / "dense"), str(tmp_path / "moe"), n_experts=4)
    assert "upcycled to 4 experts" in capsys.readouterr().out
    upcycled = load_model(tmp_path / "moe")
    assert upcycled.config.n_experts == 4 and upcycled.config.experts_per_token == 2
    assert upcycled.num_parameters() == count_parameters(upcycled.config) > dense.num_parameters()
    layer = upcycled.blocks[0].mlp
    assert torch.equal(layer.experts[3].down_proj.weight, dense.blocks[0].mlp.down_proj.weight)
    with torch.no_grad():
        logits = upcycled(ids)
    # The two gates of a token sum to 1 only up to float rounding, and two expert outputs are summed: ~1e-7 apart.
    torch.testing.assert_close(logits, dense_logits, atol=1e-5, rtol=1e-5)
    assert all(count > 0 for layer in expert_utilisation(upcycled)["moe_tokens_per_expert"] for count in layer)
    assert Tokenizer.from_dir(tmp_path / "moe").eos_id == 1


def test_upcycle_errors_name_the_fix(tmp_path):
    model = Decoder(Config.from_name("tiny-llama"))
    with pytest.raises(LlmkitError, match="experts_per_token=3 must be between 1 and n_experts=2"):
        upcycle_to_moe(model, n_experts=2, experts_per_token=3)
    upcycle_to_moe(model, n_experts=2, router="switch")
    assert model.config.router == "switch" and model.config.experts_per_token == 1
    with pytest.raises(LlmkitError, match="already a mixture of 2 experts"):
        upcycle_to_moe(model, n_experts=4)
    with pytest.raises(LlmkitError, match="pass an llmkit Decoder"):
        upcycle_to_moe(torch.nn.Linear(2, 2), n_experts=4)
    with pytest.raises(LlmkitError, match="same as --model"):
        moe_upcycle(str(tmp_path), str(tmp_path))
