"""Selective fine-tuning trains exactly the parameters its mode names: after a backward pass and an optimizer step
only those have gradients and only those changed. Error paths check the message names the thing and the fix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmkit.config import Config
from llmkit.errors import LlmkitError
from llmkit.models.decoder import Decoder
from llmkit.peft.core import count_parameters
from llmkit.peft.selective import SelectiveSettings, apply_selective

pytestmark = pytest.mark.usefixtures("one_thread")


def gpt2() -> Decoder:
    """Three blocks, biases everywhere, LayerNorm, tied head."""
    torch.manual_seed(0)
    return Decoder(Config.from_name("tiny-gpt2", n_layers=3))


def names(model: nn.Module, prefix: str, suffixes: tuple[str, ...] = ("",)) -> set[str]:
    return {name for name, _ in model.named_parameters() if name.startswith(prefix) and name.endswith(suffixes)}


def train_one_step(model: Decoder) -> set[str]:
    """One AdamW step on a next-token loss; returns the names whose values changed (and checks grads match)."""
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    F.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    with_grad = {name for name, parameter in model.named_parameters() if parameter.grad is not None}
    assert with_grad == {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    optimizer.step()
    return {name for name, parameter in model.named_parameters() if not torch.equal(parameter, before[name])}


def test_bitfit_trains_only_biases():
    model = apply_selective(gpt2(), SelectiveSettings(mode="bitfit"))
    biases = names(model, "", (".bias",))
    assert len(biases) == 3 * 8 + 1  # per block: 2 norms, q, k, v, o, up, down; and the final norm
    assert train_one_step(model) == biases
    trainable, total = count_parameters(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if n in biases) and trainable < total / 20


def test_last_blocks_train_the_last_blocks_and_final_norm():
    model = apply_selective(gpt2(), SelectiveSettings(mode="last_blocks", n_blocks=2))
    expected = names(model, "blocks.1.") | names(model, "blocks.2.") | names(model, "final_norm.")
    assert train_one_step(model) == expected


def test_modules_by_glob_train_those_modules():
    model = apply_selective(gpt2(), SelectiveSettings(mode="modules", patterns=("blocks.*.mlp", "blocks.0.attn.q_proj")))
    expected = {name for name, _ in model.named_parameters() if ".mlp." in name} | names(model, "blocks.0.attn.q_proj.")
    assert train_one_step(model) == expected


def test_full_trains_everything_and_reapplying_resets():
    model = apply_selective(gpt2(), SelectiveSettings(mode="full"))
    assert train_one_step(model) == names(model, "")
    model.zero_grad(set_to_none=True)
    apply_selective(model, SelectiveSettings(mode="last_blocks", n_blocks=1))  # freezes what full had opened
    assert {n for n, p in model.named_parameters() if p.requires_grad} == names(model, "blocks.2.") | names(
        model, "final_norm.")


@pytest.mark.parametrize("changes, message", [
    ({"mode": "lora"}, r"selective mode='lora' is unknown; choose one of bitfit, last_blocks, modules, full"),
    ({"mode": "modules"}, r"selective mode 'modules' needs patterns naming what to train"),
    ({"mode": "bitfit", "patterns": ("blocks.*",)}, r"patterns \['blocks.\*'\] apply only to mode 'modules', not "
                                                    r"'bitfit'"),
    ({"mode": "last_blocks", "n_blocks": 0}, r"n_blocks=0 must be a positive integer"),
])
def test_bad_settings(changes, message):
    with pytest.raises(LlmkitError, match=message):
        SelectiveSettings(**changes)


def test_model_errors():
    llama = Decoder(Config.from_name("tiny-llama"))
    with pytest.raises(LlmkitError, match=r"BitFit trains only bias terms and tiny-llama has none \(Llama-style "
                                          r"models are bias-free\); choose mode 'last_blocks' or 'modules', or LoRA"):
        apply_selective(llama, SelectiveSettings(mode="bitfit"))
    with pytest.raises(LlmkitError, match=r"n_blocks=3 but the model has 2 blocks; pass at most 2"):
        apply_selective(llama, SelectiveSettings(mode="last_blocks", n_blocks=3))
    with pytest.raises(LlmkitError, match=r"mode 'last_blocks' needs a model with a `blocks` list .* Sequential has "
                                          r"none: use mode 'modules'"):
        apply_selective(nn.Sequential(nn.Linear(2, 2)), SelectiveSettings(mode="last_blocks"))
    with pytest.raises(LlmkitError, match=r"no parameter name matches \['blocks.\*.ffn'"):
        apply_selective(llama, SelectiveSettings(mode="modules", patterns=("blocks.*.ffn",)))
