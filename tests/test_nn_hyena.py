"""The Hyena operator (llmkit/nn/hyena.py): the FFT long convolution of training equals the direct sum of decoding
(outputs, final states, gradients), the implicit filter does not depend on the sequence length, and decoding keeps
the input history (O(L) per token, which this test states)."""

from __future__ import annotations

import pytest
import torch
from mixer_checks import LENGTHS, assert_parallel_equals_recurrent, layer_and_input, run_recurrent, tiny_config

from llmkit.nn.hyena import ImplicitFilter, direct_causal_conv, fft_causal_conv


@pytest.mark.parametrize("T", LENGTHS)
def test_fft_convolution_equals_the_direct_causal_sum(T):
    torch.manual_seed(T)
    z = torch.randn(2, T, 5, dtype=torch.float64, requires_grad=True)
    h = torch.randn(T, 5, dtype=torch.float64, requires_grad=True)
    fft = fft_causal_conv(z, h)
    direct = torch.cat([direct_causal_conv(z[:, : t + 1], h) for t in range(T)], dim=1)
    torch.testing.assert_close(fft, direct)
    weights = torch.randn(2, T, 5, dtype=torch.float64)
    for got, want in zip(torch.autograd.grad((fft * weights).sum(), (z, h)),
                         torch.autograd.grad((direct * weights).sum(), (z, h))):
        torch.testing.assert_close(got, want)


def test_the_implicit_filter_depends_on_the_lag_only_and_decays():
    torch.manual_seed(0)
    filters = ImplicitFilter(tiny_config("hyena"))
    short, long = filters(20, torch.device("cpu")), filters(300, torch.device("cpu"))
    assert long.shape == (2, 300, 15)
    torch.testing.assert_close(long[:, :20], short)
    # the exponential window: the fastest channel has fallen to 1% at 30% of max_seq_len (lag 154 of 512)
    window_ratio = (long[:, 200:, -1].abs().max() / long[:, :10, -1].abs().max()).item()
    assert window_ratio < 0.05


@pytest.mark.parametrize("T", LENGTHS)
def test_the_layer_decoding_token_by_token_equals_its_training_forward(T):
    """The whole operator (projections, short convs, order-2 gated long convolutions) through a MixerCache; float64:
    the FFT's rounding (~1e-7 of the largest term in fp32) is summed over 300 lags, so fp32 sits near the 1e-5 bound."""
    assert_parallel_equals_recurrent("hyena", T, atol=1e-5, dtype=torch.float64)


def test_decoding_keeps_the_input_history_of_each_long_convolution():
    config = tiny_config("hyena")
    layer, x = layer_and_input(config, 30)
    with torch.no_grad():
        _, cache = run_recurrent(config, layer, x)
    conv_state, histories, filters = cache.states[0]
    assert filters.shape == (config.hyena_order, 30, 15)  # once, for the cache's 30 slots
    assert conv_state.shape == (2, 3 * 15, config.short_conv_kernel - 1)
    assert [history.shape for history in histories] == [(2, 30, 15)] * config.hyena_order  # grows with the length
