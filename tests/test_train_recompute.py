"""Selective activation checkpointing (llmkit/train/recompute.py): each mode gives the plain path's loss and
gradients, and keeps fewer saved activations than plain but (for one branch) more than recomputing whole blocks."""

from __future__ import annotations

import pytest
import torch

from llmkit.config import Config
from llmkit.errors import LlmkitError
from llmkit.models.decoder import Decoder
from llmkit.models.encoder import Encoder
from llmkit.models.seq2seq import Seq2Seq
from llmkit.train.objectives import causal_lm_batch, causal_lm_loss
from llmkit.train.recompute import enable_activation_checkpointing
from llmkit.train.settings import TrainSettings, check_settings, recompute_mode

FAMILIES = ["tiny-llama", "tiny-gpt2"]
MODES = ["full", "attention", "mlp"]
# fp32; recomputation replays the same operations on the same inputs, so only summation order could differ
TOLERANCE = 1e-6


def decoder(preset: str) -> Decoder:
    """The tiny preset (no dropout: llmkit's blocks have none) with weights fixed by the seed, in train mode."""
    torch.manual_seed(0)
    return Decoder(Config.from_name(preset)).train()


def tokens(config: Config, batch_size: int = 2, seq_len: int = 32) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (batch_size, seq_len + 1), generator=torch.Generator().manual_seed(1))


def loss_and_gradients(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = causal_lm_loss(model, causal_lm_batch(tokens(model.config))).mean()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("preset", FAMILIES)
def test_each_mode_gives_the_plain_loss_and_gradients(one_thread, preset, mode):
    plain_loss, plain_grads = loss_and_gradients(decoder(preset))
    model = decoder(preset)
    assert enable_activation_checkpointing(model, mode) == model.config.n_layers
    loss, grads = loss_and_gradients(model)
    torch.testing.assert_close(loss, plain_loss, atol=TOLERANCE, rtol=0)
    assert grads.keys() == plain_grads.keys()  # parameter names unchanged
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], atol=TOLERANCE, rtol=0, msg=name)


def saved_activation_bytes(preset: str, mode: str) -> int:
    """Bytes of every distinct storage autograd saves in one forward of the causal-LM loss, parameters excluded
    (counted by torch.autograd.graph.saved_tensors_hooks: deterministic, unlike RSS)."""
    model = decoder(preset)
    enable_activation_checkpointing(model, mode)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        causal_lm_loss(model, causal_lm_batch(tokens(model.config, 4, 64))).mean()
    return sum(storages.values())


@pytest.mark.parametrize("preset", FAMILIES)
def test_one_branch_saves_less_than_plain_and_more_than_full(one_thread, preset):
    saved = {mode: saved_activation_bytes(preset, mode) for mode in ["none", "attention", "mlp", "full"]}
    assert saved["full"] < saved["attention"] < saved["none"], saved
    assert saved["full"] < saved["mlp"] < saved["none"], saved
    # what each branch frees adds up: recomputing both saves what full does plus each block's residual after
    # attention (the MLP branch's input), one (B, T, d) float32 tensor per block
    config = Config.from_name(preset)
    mid_block = 4 * 64 * config.d_model * 4
    assert saved["attention"] + saved["mlp"] - saved["none"] == saved["full"] + config.n_layers * mid_block


def test_the_gated_mlp_saves_more_than_attention():
    """Llama's MLP saves its normed input, gate, up, act(gate) and their product (~4 x d_ff per token); attention
    its normed input, q, k, v and output (~4 x d_model): recomputing the MLP frees more."""
    saved = {mode: saved_activation_bytes("tiny-llama", mode) for mode in ["none", "attention", "mlp"]}
    assert saved["none"] - saved["mlp"] > saved["none"] - saved["attention"], saved


@pytest.mark.parametrize("mode", MODES)
def test_post_norm_and_cross_attention_blocks_recompute_to_the_same_gradients(one_thread, mode):
    torch.manual_seed(0)
    inputs, targets = torch.randint(0, 100, (2, 12)), torch.randint(0, 100, (2, 6))
    models = {"encoder (post-norm)": (lambda: Encoder(Config.from_name("tiny-bert")), (inputs,)),
              "encoder-decoder": (lambda: Seq2Seq(Config.from_name("mini-t5", n_layers=2, n_decoder_layers=2)),
                                  (inputs, targets))}
    for name, (build, arguments) in models.items():
        torch.manual_seed(0)
        plain = build()
        plain(*arguments).square().mean().backward()
        torch.manual_seed(0)
        recomputed = build()
        assert enable_activation_checkpointing(recomputed, mode) > 0
        recomputed(*arguments).square().mean().backward()
        for (key, before), after in zip(plain.named_parameters(), recomputed.parameters()):
            torch.testing.assert_close(after.grad, before.grad, atol=TOLERANCE, rtol=0, msg=f"{name} {key}")


def test_true_means_full_and_false_none():
    assert recompute_mode(True) == "full" and recompute_mode(False) == "none"
    assert enable_activation_checkpointing(decoder("tiny-llama"), False) == 0


def test_unknown_or_conflicting_modes_are_refused():
    with pytest.raises(LlmkitError, match="--train.activation_checkpointing 'blocks' is unknown; choose one of none"):
        check_settings(TrainSettings(activation_checkpointing="blocks"))
    model = decoder("tiny-llama")
    enable_activation_checkpointing(model, "mlp")
    assert enable_activation_checkpointing(model, "mlp") == 2  # the same mode again: a no-op
    with pytest.raises(LlmkitError, match="already recompute 'mlp'; build the model again"):
        enable_activation_checkpointing(model, "attention")
