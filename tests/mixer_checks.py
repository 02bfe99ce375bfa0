"""Shared checks of the mixer tests (test_nn_hyena/retnet/mamba.py): a tiny config per mixer, and a layer's output
over a whole sequence (its parallel form) against the same layer fed token by token through a `MixerCache` (its
recurrent decoding form): outputs, the state left in the cache, and gradients."""

from __future__ import annotations

import torch

from llmkit.config import Config
from llmkit.nn.attention import causal_context
from llmkit.nn.mixers import MixerCache, build_mixer
from llmkit.nn.position import position_inputs

LENGTHS = (1, 15, 63, 300)


def tiny_config(mixer: str, **overrides) -> Config:  # noqa: ANN003
    """3 heads of an odd size (5): d_model 15, one layer, a context of 512."""
    return Config(**{"vocab_size": 32, "n_layers": 1, "n_heads": 3, "head_dim": 5, "d_model": 15, "max_seq_len": 512,
                     "mixer": mixer, **overrides})


def layer_and_input(config: Config, T: int, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    layer = build_mixer(config, 0)
    x = torch.randn(2, T, config.d_model, requires_grad=True)
    return layer, x


def run_parallel(config: Config, layer: torch.nn.Module, x: torch.Tensor, cache: MixerCache | None = None) -> torch.Tensor:
    """One forward over all of x (B, T, C): training's form (with `cache`, a prefill that leaves the state in it)."""
    inv_freq = position_inputs(config).get("inv_freq")
    return layer(x, causal_context(config, x.shape[0], x.shape[1], cache, inv_freq=inv_freq))


def run_recurrent(config: Config, layer: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, MixerCache]:
    """x fed one token per forward through a cache: decoding's form. Returns the outputs and the cache."""
    cache = MixerCache(config, x.shape[0], x.shape[1], x.dtype, x.device)
    outputs = [run_parallel(config, layer, x[:, t : t + 1], cache) for t in range(x.shape[1])]
    return torch.cat(outputs, dim=1), cache


def gradients(layer: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> list[torch.Tensor]:
    """d(sum(y * weights))/d(x and every parameter)."""
    inputs = [x, *layer.parameters()]
    return list(torch.autograd.grad((y * weights).sum(), inputs))


def assert_parallel_equals_recurrent(mixer: str, T: int, atol: float, dtype: torch.dtype = torch.float32) -> None:
    """Outputs, final states and gradients of the two forms agree within `atol` (relative to the values' scale)."""
    config = tiny_config(mixer)
    layer, x = layer_and_input(config, T)
    layer, x = layer.to(dtype), x.detach().to(dtype).requires_grad_()
    weights = torch.randn(2, T, config.d_model, dtype=dtype)
    parallel = run_parallel(config, layer, x)
    recurrent, cache = run_recurrent(config, layer, x)
    scale = parallel.abs().max().item()
    torch.testing.assert_close(recurrent, parallel, atol=atol * scale, rtol=0)
    prefill_cache = MixerCache(config, 2, T, dtype, x.device)
    run_parallel(config, layer, x, prefill_cache)  # the parallel form leaves the same final state
    for prefilled, stepped in zip(flatten(prefill_cache.states[0]), flatten(cache.states[0])):
        torch.testing.assert_close(prefilled, stepped, atol=atol * max(stepped.abs().max().item(), 1e-30), rtol=0)
    for got, want in zip(gradients(layer, x, recurrent, weights), gradients(layer, x, parallel, weights)):
        torch.testing.assert_close(got, want, atol=atol * max(want.abs().max().item(), 1e-30), rtol=0)


def flatten(state) -> list[torch.Tensor]:  # noqa: ANN001
    if isinstance(state, torch.Tensor):
        return [state]
    return [tensor for part in state for tensor in flatten(part)]
