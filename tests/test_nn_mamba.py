"""Mamba's selective SSM (llmkit/nn/mamba.py) in pure PyTorch: the chunked parallel scan used for training equals the
token-by-token recurrence used for decoding (outputs, final states, gradients), and the layer decodes through a cache
of constant size."""

from __future__ import annotations

import pytest
import torch
from mixer_checks import LENGTHS, assert_parallel_equals_recurrent, layer_and_input, run_recurrent, tiny_config

from llmkit.nn.mamba import causal_conv, doubling_scan, recurrent_scan, selective_scan


def scan_inputs(T: int, E: int = 7, N: int = 3):  # noqa: ANN201
    torch.manual_seed(T)
    x = torch.randn(2, T, E)
    dt = torch.nn.functional.softplus(torch.randn(2, T, E) - 1)
    A = -torch.exp(torch.randn(E, N))
    B, C = torch.randn(2, T, N), torch.randn(2, T, N)
    D = torch.randn(E)
    return [tensor.requires_grad_() for tensor in (x, dt, A, B, C, D)]


def test_the_doubling_scan_is_the_linear_recurrence():
    torch.manual_seed(0)
    a, b = torch.rand(3, 13, 4), torch.randn(3, 13, 4)
    h, want = torch.zeros(3, 4), []
    for t in range(13):
        h = a[:, t] * h + b[:, t]
        want.append(h)
    torch.testing.assert_close(doubling_scan(a, b), torch.stack(want, 1))


@pytest.mark.parametrize("T", LENGTHS)
def test_chunked_scan_equals_the_recurrence(T):
    """fp32, 1e-5 of the largest value: the doubling scan multiplies the same decays in another order."""
    inputs = scan_inputs(T)
    weights = torch.randn(2, T, 7)
    y_scan, state_scan = selective_scan(*inputs, chunk=8)
    y_step, state_step = recurrent_scan(*inputs)
    torch.testing.assert_close(y_scan, y_step, atol=1e-5 * y_step.abs().max().item(), rtol=0)
    torch.testing.assert_close(state_scan, state_step, atol=1e-5 * state_step.abs().max().item(), rtol=0)
    for got, want in zip(torch.autograd.grad((y_scan * weights).sum(), inputs),
                         torch.autograd.grad((y_step * weights).sum(), inputs)):
        torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=0)


def test_the_causal_conv_carries_its_history():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(2, 9, 6), torch.randn(6, 1, 4), torch.randn(6)
    whole, _ = causal_conv(x, weight, bias, None)
    first, history = causal_conv(x[:, :5], weight, bias, None)
    rest, _ = causal_conv(x[:, 5:], weight, bias, history)
    torch.testing.assert_close(torch.cat([first, rest], 1), whole)
    want = torch.nn.functional.conv1d(x.transpose(1, 2), weight, bias, padding=3, groups=6)[:, :, :9]  # torch's own
    torch.testing.assert_close(whole, want.transpose(1, 2))


@pytest.mark.parametrize("T", LENGTHS)
def test_the_layer_decoding_token_by_token_equals_its_training_forward(T):
    """The whole layer (in_proj, conv, selective scan, gate) through a MixerCache; fp32, 1e-5 of the largest value."""
    assert_parallel_equals_recurrent("mamba", T, atol=1e-5)


def test_the_decoding_state_has_one_fixed_size():
    config = tiny_config("mamba")
    layer, x = layer_and_input(config, 30)
    with torch.no_grad():
        _, cache = run_recurrent(config, layer, x)
    conv_state, ssm_state = cache.states[0]
    E = config.ssm_expand * config.d_model
    assert conv_state.shape == (2, E, config.short_conv_kernel - 1) and ssm_state.shape == (2, E, config.ssm_state_dim)
