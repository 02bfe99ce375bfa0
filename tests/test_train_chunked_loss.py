"""The chunked LM head + cross-entropy equals the plain path (value and gradients) and saves no (tokens x vocab)
tensor for the backward."""

import copy

import pytest
import torch
import torch.nn.functional as F

from llmkit.data.batch import IGNORE_INDEX
from llmkit.errors import LlmkitError
from llmkit.train.chunked_loss import linear_cross_entropy
from llmkit.train.objectives import causal_lm_loss, causal_lm_objective, plain_head_weight
from tests.helpers import tiny_decoder


def labels_with_ignored(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(vocab, (n,), generator=generator)
    labels[torch.rand(n, generator=generator) < 0.3] = IGNORE_INDEX
    return labels


@pytest.mark.parametrize("chunk", [1, 3, 16, 17, 1000])
def test_value_and_gradients_equal_the_plain_cross_entropy(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(17, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    labels = labels_with_ignored(17, 50)
    plain = F.cross_entropy(hidden @ weight.T, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    plain_grads = torch.autograd.grad(plain * 0.37, (hidden, weight))
    chunked = linear_cross_entropy(hidden, weight, labels, chunk)
    chunked_grads = torch.autograd.grad(chunked * 0.37, (hidden, weight))
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)
    for ours, reference in zip(chunked_grads, plain_grads):
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)


def test_frozen_inputs_get_no_gradient_and_all_ignored_is_zero():
    hidden, weight = torch.randn(4, 8, requires_grad=True), torch.randn(20, 8)  # a frozen head (LoRA training)
    (grad,) = torch.autograd.grad(linear_cross_entropy(hidden, weight, torch.tensor([1, 2, 3, 4])), (hidden,))
    assert grad.shape == hidden.shape and grad.abs().sum() > 0
    ignored = torch.full((4,), IGNORE_INDEX)
    assert linear_cross_entropy(hidden, weight, ignored).item() == 0.0
    with pytest.raises(LlmkitError, match="loss_chunk 0 must be at least 1"):
        linear_cross_entropy(hidden, weight, ignored, chunk=0)
    with pytest.raises(LlmkitError, match="loss_chunk -1 must be 0"):
        causal_lm_objective(-1)


@pytest.mark.parametrize("tied", [True, False])
def test_objective_matches_causal_lm_loss_on_a_decoder(tied):
    model = tiny_decoder(tie_embeddings=tied, vocab_size=97)
    twin = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(97, (3, 12), generator=generator)
    labels = torch.randint(97, (3, 12), generator=generator)
    labels[:, :5] = IGNORE_INDEX  # a prompt, as in fine-tuning
    batch = {"input_ids": input_ids, "labels": labels}
    assert plain_head_weight(model) is (model.embed.weight if tied else model.lm_head.weight)
    plain = causal_lm_loss(model, batch)
    chunked = causal_lm_objective(loss_chunk=4)(twin, batch)
    torch.testing.assert_close(chunked.total, plain.total, rtol=1e-6, atol=1e-6)
    assert chunked.tokens == plain.tokens == 21
    plain.mean().backward()
    chunked.mean().backward()
    for (name, ours), theirs in zip(twin.named_parameters(), model.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=1e-6, msg=name)


def test_no_vocab_wide_tensor_is_saved_for_the_backward():
    model = tiny_decoder(vocab_size=4096)
    tokens = torch.randint(4096, (2, 33))
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}

    def saved_bytes(objective) -> int:
        total = 0

        def pack(tensor):
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            objective(model, batch).mean()
        return total

    logits_bytes = 64 * 4096 * 4
    assert saved_bytes(causal_lm_loss) - saved_bytes(causal_lm_objective(16)) > 0.9 * logits_bytes


def test_models_without_a_plain_head_keep_the_plain_path():
    from llmkit.peft.lora import apply_lora
    from llmkit.peft.settings import LoraSettings

    model = apply_lora(tiny_decoder(tie_embeddings=False), LoraSettings(targets=["lm_head"]))
    assert plain_head_weight(model) is None
    tokens = torch.randint(model.config.vocab_size, (2, 9))
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    torch.testing.assert_close(causal_lm_objective(8)(model, batch).total, causal_lm_loss(model, batch).total)


def test_bf16_autocast_stays_close_to_the_plain_path():
    model = tiny_decoder(vocab_size=97)
    tokens = torch.randint(97, (2, 17))
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = causal_lm_loss(model, batch).total
        chunked = causal_lm_objective(5)(model, batch).total
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, plain, rtol=2e-2, atol=0)
