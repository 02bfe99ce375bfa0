"""AWQ: activation-aware weight scaling before 4-bit rounding (Lin et al. 2023, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration", arXiv:2306.00978).

A few input channels carry large activations; their weights matter most. For linears y = x W^T that read the same
input x, scale each input channel j by s_j > 0 and undo it on the input, which changes nothing in exact arithmetic:

    y = (x / s) (W diag(s))^T,    quantized:  y_hat = (x / s) Q(W diag(s))^T

A salient channel (large s_j) rounds with a relatively smaller error. The scales come from the activation statistic
s_x = mean |x_j| over the calibration tokens: s = s_x^alpha, normalised by sqrt(max s * min s), with alpha on the grid
{0, 1/20, ..., 19/20} (20 points; alpha = 0 is round-to-nearest) chosen to minimise the MSE of the output of the
module the group feeds (the reference code's "module2inspect"): attention for q/k/v, o_proj itself, the MLP for
gate/up, down_proj itself. The 1/s is folded into the op before the group, so x / s costs nothing at run time:

    q/k/v    input attn_norm(x)        fold into the norm's weight (RMSNorm; Gemma's (1 + w); LayerNorm weight and bias)
    o_proj   input attention output    fold into v_proj's rows, only when n_heads == n_kv_heads (with grouped-query
                                       attention one value channel feeds several heads' columns: skipped, logged)
    gate/up  input mlp_norm(x)         fold into the norm
    down     input act(gate) * up      fold into up_proj's rows (gated MLPs; after a plain GELU/ReLU MLP: skipped)

Then every target linear is rounded to nearest in the int4 format (int4_asym by default, see gptq.py for why).
As the reference (llm-awq), each block's inputs come from the float blocks before it, the searches of a block all
use its float inputs, and the search runs on the first `search_tokens` calibration tokens (the statistic s_x on all).
Left out: AWQ's second step, the search for a clipping range of each weight group (auto_clip).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from llmkit.errors import LlmkitError
from llmkit.nn.block import Block, PostNormBlock
from llmkit.nn.mlp import GeGLU, GeluMLP, ReluMLP, SwiGLU
from llmkit.nn.norm import RMSNorm
from llmkit.quant.calibration import DEFAULT_BATCH_SIZE, block_inputs, check_decoder
from llmkit.quant.formats import get_format
from llmkit.quant.gptq import DEFAULT_FORMAT, DEFAULT_GROUP, check_format
from llmkit.quant.linear import QuantLinear
from llmkit.quant.model import PROVENANCE_ATTRIBUTE, quantized_layers

N_GRID = 20
DEFAULT_SEARCH_TOKENS = 8192  # calibration tokens the alpha search runs its module forwards on
MIN_SCALE = 1e-4
log = logging.getLogger(__name__)


@dataclass
class ScaleGroup:
    """Linears sharing one input, the module whose output judges a scale, and how 1/s folds into the op before."""

    name: str
    linears: list[nn.Linear]
    inspect: Callable[[torch.Tensor, object], torch.Tensor]  # (group input, attention context) -> output
    fold: Callable[[torch.Tensor], None] | None  # divides the previous op's output channels by s; None: cannot fold
    why_not: str = ""


def fold_into_norm(norm: nn.Module, s: torch.Tensor) -> None:
    """norm(x) / s: the norm's scale (and LayerNorm's bias) divided by s."""
    if isinstance(norm, RMSNorm):
        norm.weight.copy_((norm.offset + norm.weight.float()) / s - norm.offset)  # Gemma scales by (1 + w)
    else:
        norm.weight.div_(s)
        if norm.bias is not None:
            norm.bias.div_(s)


def fold_into_rows(linear: nn.Linear, s: torch.Tensor) -> None:
    """linear(x) / s: output rows (and bias) divided by s."""
    linear.weight.div_(s[:, None])
    if linear.bias is not None:
        linear.bias.div_(s)


def scale_groups(block: nn.Module) -> list[ScaleGroup]:
    """The four groups of a pre-norm decoder block (q/k/v, o, gate/up, down), in forward order."""
    if isinstance(block, PostNormBlock) or not isinstance(block, Block):
        raise LlmkitError(f"awq folds scales into the norm before each sublayer: it needs pre-norm decoder blocks; got "
                          f"{type(block).__name__}: use --scheme gptq for this model")
    if not isinstance(block.attn_norm, (RMSNorm, nn.LayerNorm)) or not isinstance(block.mlp_norm, (RMSNorm, nn.LayerNorm)):
        raise LlmkitError(f"awq folds scales into RMSNorm or LayerNorm; this block has {type(block.attn_norm).__name__}: "
                          "use --scheme gptq")
    attn, mlp = block.attn, block.mlp
    if not isinstance(mlp, (SwiGLU, GeGLU, GeluMLP, ReluMLP)):
        raise LlmkitError(f"awq scales dense MLPs; this block has a {type(mlp).__name__}: use --scheme gptq")
    gated = isinstance(mlp, (SwiGLU, GeGLU))
    heads_match = attn.v_proj.out_features == attn.o_proj.in_features
    return [
        ScaleGroup("q/k/v", [attn.q_proj, attn.k_proj, attn.v_proj], lambda x, context: attn(x, context),
                   lambda s: fold_into_norm(block.attn_norm, s)),
        ScaleGroup("o_proj", [attn.o_proj], lambda x, context: attn.o_proj(x),
                   (lambda s: fold_into_rows(attn.v_proj, s)) if heads_match else None,
                   "" if heads_match else "grouped-query attention: one v_proj row feeds several o_proj columns"),
        ScaleGroup("gate/up", [mlp.gate_proj, mlp.up_proj] if gated else [mlp.up_proj], lambda x, context: mlp(x),
                   lambda s: fold_into_norm(block.mlp_norm, s)),
        ScaleGroup("down_proj", [mlp.down_proj], lambda x, context: mlp.down_proj(x),
                   (lambda s: fold_into_rows(mlp.up_proj, s)) if gated else None,
                   "" if gated else "down_proj's input comes through a nonlinearity (no gate to fold into)"),
    ]


def apply_scales(group: ScaleGroup, s: torch.Tensor) -> None:
    """Fold 1/s into the op before the group and s into the group's weight columns: the float network is unchanged."""
    with torch.no_grad():
        group.fold(s)
        for linear in group.linears:
            linear.weight.mul_(s[None, :])


def rtn(weight: torch.Tensor, fmt: str, group_size: int) -> torch.Tensor:
    """Round-to-nearest W_hat of the format (the weight's dtype)."""
    f = get_format(fmt)
    return f.dequantize(f.quantize(weight, group_size), torch.float32).to(weight.dtype)


def search_scale(
    group: ScaleGroup, x_abs_mean: torch.Tensor, inputs: list[tuple[torch.Tensor, object]], fmt: str, group_size: int,
    n_grid: int = N_GRID,
) -> tuple[torch.Tensor, float, list[float]]:
    """(best s, its alpha, the loss at each grid point): s = s_x^alpha / sqrt(max * min) minimising the MSE of the
    inspected module's output with W replaced by Q(W diag(s)) diag(s)^-1; the weights are restored afterwards."""
    originals = [linear.weight.detach().clone() for linear in group.linears]
    with torch.no_grad():
        reference = [group.inspect(x, context) for x, context in inputs]
        losses, best = [], (float("inf"), None, 0.0)
        try:
            for i in range(n_grid):
                alpha = i / n_grid
                s = x_abs_mean.pow(alpha).clamp_min(MIN_SCALE)
                s = s / (s.max() * s.min()).sqrt()
                for linear, weight in zip(group.linears, originals, strict=True):
                    linear.weight.copy_(rtn(weight * s[None, :], fmt, group_size) / s[None, :])
                squared = sum(float((group.inspect(x, c) - ref).float().pow(2).sum())
                              for (x, c), ref in zip(inputs, reference, strict=True))
                loss = squared / sum(ref.numel() for ref in reference)
                losses.append(loss)
                if loss < best[0]:
                    best = (loss, s.clone(), alpha)
        finally:
            for linear, weight in zip(group.linears, originals, strict=True):
                linear.weight.copy_(weight)
    return best[1], best[2], losses


def _collect(block: nn.Module, groups: list[ScaleGroup], batches: list, search_tokens: int):  # noqa: ANN202
    """One float forward of the block over all batches: mean |x| per input channel of each group, the group inputs of
    the first batches (up to `search_tokens` tokens), and the block's outputs (the next block's inputs)."""
    sums = [None] * len(groups)
    counts = [0] * len(groups)
    kept: list[list] = [[] for _ in groups]
    keep = [True]

    def hook(index: int):  # noqa: ANN202
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            flat = x.reshape(-1, x.shape[-1]).float().abs().sum(0)
            sums[index] = flat if sums[index] is None else sums[index] + flat
            counts[index] += x.numel() // x.shape[-1]
            if keep[0]:
                kept[index].append(x)
        return record

    handles = [group.linears[0].register_forward_pre_hook(hook(i)) for i, group in enumerate(groups)]
    outputs, kept_contexts, tokens = [], [], 0
    try:
        with torch.no_grad():
            for x, context in batches:
                keep[0] = tokens < search_tokens
                if keep[0]:
                    kept_contexts.append(context)
                    tokens += x.shape[0] * x.shape[1]
                outputs.append((block(x, context), context))
    finally:
        for handle in handles:
            handle.remove()
    means = [total / count for total, count in zip(sums, counts, strict=True)]
    inputs = [list(zip(xs, kept_contexts, strict=True)) for xs in kept]
    return means, inputs, outputs


def awq(
    model: nn.Module, calibration: torch.Tensor, group_size: int = DEFAULT_GROUP, fmt: str = DEFAULT_FORMAT,
    n_grid: int = N_GRID, search_tokens: int = DEFAULT_SEARCH_TOKENS, batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> nn.Module:
    """AWQ-quantize a decoder's q/k/v/o/gate/up/down linears (in place; returns the model) on calibration ids (N, T),
    e.g. from `calibration_batches`: per block, search and fold the scales, then round each linear to nearest in `fmt`
    (int4_asym or int4, `group_size` inputs per scale). The result saves and loads as any quantized model.

    Raises:
        LlmkitError: not a decoder, already quantized, a block AWQ cannot fold into (post-norm, MoE), a group size
            the format cannot take.
    """
    decoder = check_decoder(model, "awq")
    if quantized_layers(model):
        raise LlmkitError("the model is already quantized; run awq on its float original")
    block_groups = [scale_groups(block) for block in decoder.blocks]
    for groups in block_groups:  # every shape, before changing anything
        for linear in (linear for group in groups for linear in group.linears):
            check_format(fmt, linear.in_features, group_size)
    for reason in sorted({group.why_not for groups in block_groups for group in groups if group.fold is None}):
        log.warning("awq: scales not searched where they cannot fold (%s); those layers are rounded to nearest", reason)
    batches = block_inputs(decoder, calibration, batch_size)
    alphas: list[list[float | None]] = []  # per block, the alpha chosen for each scale group (None: not folded)
    for block, groups in tqdm(list(zip(decoder.blocks, block_groups, strict=True)), desc="awq", unit="block",
                              disable=not progress):
        means, inputs, batches = _collect(block, groups, batches, search_tokens)
        alphas.append([])
        for group, x_abs_mean, group_inputs in zip(groups, means, inputs, strict=True):
            alpha = None
            if group.fold is not None:
                s, alpha, _ = search_scale(group, x_abs_mean, group_inputs, fmt, group_size, n_grid)
                apply_scales(group, s)
            alphas[-1].append(alpha)
        for group in groups:
            for linear in group.linears:
                name = next(n for n, m in block.named_modules() if m is linear)
                parent, _, attribute = name.rpartition(".")
                setattr(block.get_submodule(parent), attribute, QuantLinear.from_linear(linear, fmt, group_size))
    setattr(model, PROVENANCE_ATTRIBUTE, {  # save_quantized writes it to quantization.json
        "method": "awq", "format": fmt, "group_size": group_size, "calibration_sequences": calibration.shape[0],
        "calibration_tokens": calibration.numel(), "search_tokens": search_tokens,
        "alpha_grid": n_grid, "alphas": alphas})
    return model
