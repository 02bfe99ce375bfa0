"""RetNet's multi-scale retention (llmkit/nn/retnet.py): its parallel, recurrent and chunkwise forms give the same
outputs, final states and gradients (the paper's definitions; flash-linear-attention's equivalence suite is the model)."""

from __future__ import annotations

import pytest
import torch
from mixer_checks import LENGTHS, assert_parallel_equals_recurrent

from llmkit.nn.retnet import chunkwise_retention, head_decays, parallel_retention, recurrent_retention


def qkv(T: int, H: int = 3, Dk: int = 5, Dv: int = 10, dtype: torch.dtype = torch.float32):  # noqa: ANN201
    torch.manual_seed(T)
    return [torch.randn(2, H, T, D, dtype=dtype, requires_grad=True) / D**0.5 for D in (Dk, Dk, Dv)]


def test_the_decays_are_the_papers():
    assert head_decays(4).tolist() == [1 - 2**-5, 1 - 2**-6, 1 - 2**-7, 1 - 2**-8]


@pytest.mark.parametrize("T", LENGTHS)
def test_parallel_recurrent_and_chunkwise_forms_agree(T):
    """fp32, tolerance 1e-5 of the largest value: the three forms sum the same terms in another order."""
    q, k, v = qkv(T)
    log_gamma = head_decays(3).log()
    weights = torch.randn(2, 3, T, 10)
    parallel = parallel_retention(q, k, v, log_gamma)
    recurrent, recurrent_state = recurrent_retention(q, k, v, log_gamma)
    chunkwise, chunkwise_state = chunkwise_retention(q, k, v, log_gamma, chunk_size=16)
    scale = parallel.abs().max().item()
    torch.testing.assert_close(recurrent, parallel, atol=1e-5 * scale, rtol=0)
    torch.testing.assert_close(chunkwise, parallel, atol=1e-5 * scale, rtol=0)
    torch.testing.assert_close(chunkwise_state, recurrent_state, atol=1e-5 * recurrent_state.abs().max().item(), rtol=0)
    grads = [torch.autograd.grad((out * weights).sum(), (q, k, v)) for out in (parallel, recurrent, chunkwise)]
    for form in grads[1:]:
        for got, want in zip(form, grads[0]):
            torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=0)


def test_a_state_carried_in_continues_the_sequence():
    """Chunkwise over the second half from the first half's state == the second half of one pass."""
    q, k, v = qkv(40)
    log_gamma = head_decays(3).log()
    whole = parallel_retention(q, k, v, log_gamma)
    _, state = recurrent_retention(q[:, :, :25], k[:, :, :25], v[:, :, :25], log_gamma)
    rest, _ = chunkwise_retention(q[:, :, 25:], k[:, :, 25:], v[:, :, 25:], log_gamma, state, chunk_size=6)
    torch.testing.assert_close(rest, whole[:, :, 25:], atol=1e-5 * whole.abs().max().item(), rtol=0)


@pytest.mark.parametrize("T", LENGTHS)
def test_the_layer_decoding_token_by_token_equals_its_training_forward(T):
    """The whole layer (projections, xPos rotation at each position, group norm, gate) through a MixerCache; fp32, 1e-5
    of the largest value (group norm divides by a per-token deviation, so float64 would only tighten it)."""
    assert_parallel_equals_recurrent("retnet", T, atol=1e-5)


def test_the_decoding_state_has_one_fixed_size():
    from mixer_checks import layer_and_input, run_recurrent, tiny_config

    config = tiny_config("retnet")
    layer, x = layer_and_input(config, 30)
    with torch.no_grad():
        _, cache = run_recurrent(config, layer, x)
    assert cache.states[0].shape == (2, 3, 5, 10)  # (B, H, Dk, Dv) after 30 tokens, as after 1
    assert cache.keys == [None] and cache.values == [None]
