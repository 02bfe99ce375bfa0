"""Structured pruning: remove whole attention heads, MLP neurons or blocks, so the matrices really shrink and a
smaller Config describes the result (it runs faster on a CPU, unlike unstructured sparsity, stored dense).

    heads     query heads within each key/value group: rows of q_proj, the same columns of o_proj. Every group loses
              the same count (GQA needs n_heads / n_kv_heads query heads per group), so n_kv_heads, k_proj, v_proj
              and the KV cache stay as they were; removing whole KV groups would also shrink those, but SmolLM2-135M
              has only 3 groups, so one group is a third of its attention at once.
    neurons   hidden units of the MLP: rows of gate_proj / up_proj (and their biases), the same columns of down_proj.
    layers    whole blocks; the rest are renumbered (and their local/global layer types kept).

Config has one head count and one d_ff for every layer, so heads and neurons are removed uniformly: the same number
from every layer (round(amount * group size) heads per group, round(amount * d_ff) neurons), each layer choosing its
own least important ones.

Importance, per layer:
    head h     sum over its o_proj columns j of |W_o[:, j]| * ||X_j||     X: o_proj's input (the heads' outputs)
    neuron n   sum_i |W_down[i, n]| * ||X_n||                             X: down_proj's input (the activations)
    block      1 - mean over tokens of cos(x_in, x_out)                  ShortGPT's Block Influence (Men et al. 2024,
                                                                         arXiv:2403.03853): a block that barely turns
                                                                         the residual stream does little
With importance="magnitude" ||X_j|| = 1 (weights only, no data); with "activation" the norms come from calibration
ids, collected block by block with gptq.py's hooks (diag of each input's H = 2 X^T X / n). Blocks need calibration.

Removing head h is exactly zeroing W_o's columns of head h (its output then reaches nothing); removing neuron n is
exactly zeroing column n of W_down; removing a block is skipping it. The tests hold each removal to that identity.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from llmkit.checkpoints import build_model
from llmkit.config import Config
from llmkit.errors import LlmkitError
from llmkit.models.decoder import Decoder
from llmkit.quant.calibration import DEFAULT_BATCH_SIZE, block_inputs, check_decoder
from llmkit.quant.gptq import layer_hessians, linear_groups

Structure = Literal["heads", "neurons", "layers"]
Importance = Literal["magnitude", "activation"]
STRUCTURES = ("heads", "neurons", "layers")
HEAD_INPUT, NEURON_INPUT = "attn.o_proj", "mlp.down_proj"


@dataclasses.dataclass
class ActivationStatistics:
    """Per block: squared L2 norms (up to one factor) of o_proj's and down_proj's input channels, Block Influence."""

    head_inputs: list[torch.Tensor]  # (H * D,) per layer
    neuron_inputs: list[torch.Tensor]  # (d_ff,) per layer
    block_influence: torch.Tensor  # (n_layers,)


def activation_statistics(model: Decoder, calibration: torch.Tensor,
                          batch_size: int = DEFAULT_BATCH_SIZE) -> ActivationStatistics:
    """One walk of the calibration ids (N, T) through the unchanged model's blocks."""
    decoder = check_decoder(model, "structured pruning")
    if decoder.config.n_experts:
        raise LlmkitError("structured pruning of mixture-of-experts MLPs is not implemented; prune a dense decoder")
    batches = block_inputs(decoder, calibration, batch_size)
    heads, neurons, influence = [], [], []
    for block in decoder.blocks:
        names = [HEAD_INPUT, NEURON_INPUT]
        hessians = layer_hessians(block, linear_groups(block, names, batches[0]), batches)
        heads.append(hessians[HEAD_INPUT].diagonal().float())
        neurons.append(hessians[NEURON_INPUT].diagonal().float())
        score, batches = _influence_and_outputs(block, batches)
        influence.append(score)
    return ActivationStatistics(heads, neurons, torch.tensor(influence))


def _influence_and_outputs(block: nn.Module, batches: list) -> tuple[float, list]:
    """(Block Influence of `block` over every token of `batches`, the block's outputs: the next block's inputs)."""
    cosines, tokens = 0.0, 0
    with torch.no_grad():
        outputs = [(block(x, context), context) for x, context in batches]
        for (x, _), (y, _) in zip(batches, outputs, strict=True):  # x, y: (B, T, C)
            cosines += float(torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1).sum())
            tokens += x.shape[0] * x.shape[1]
    return 1 - cosines / tokens, outputs


def block_influence(model: Decoder, calibration: torch.Tensor, batch_size: int = DEFAULT_BATCH_SIZE) -> torch.Tensor:
    """(n_layers,) Block Influence BI_i = 1 - mean over the calibration ids' (N, T) tokens of cos(x_i, x_{i+1}),
    x_i the residual stream entering block i: one walk through the unchanged blocks, no Hessians (cheaper than
    `activation_statistics` when only blocks are scored)."""
    decoder = check_decoder(model, "block influence")
    batches = block_inputs(decoder, calibration, batch_size)
    influence = []
    for block in decoder.blocks:
        score, batches = _influence_and_outputs(block, batches)
        influence.append(score)
    return torch.tensor(influence)


def most_influential_blocks(influence: torch.Tensor, keep: int) -> list[int]:
    """The `keep` blocks of highest influence, in model order (ShortGPT drops the rest, lowest BI first)."""
    if not 1 <= keep <= len(influence):
        raise LlmkitError(f"keeping {keep} of {len(influence)} blocks is impossible: keep 1 to {len(influence)}")
    return torch.topk(influence, keep).indices.sort().values.tolist()


def head_importance(model: Decoder, statistics: ActivationStatistics | None = None) -> torch.Tensor:
    """(n_layers, n_heads): sum over each head's o_proj columns of |W_o| * ||X|| (||X|| = 1 without statistics)."""
    config = model.config
    scores = []
    for i, block in enumerate(model.blocks):
        weight = block.attn.o_proj.weight.detach().abs().float()  # (C, H * D)
        norms = statistics.head_inputs[i].clamp_min(0).sqrt() if statistics else torch.ones(weight.shape[1])
        per_column = (weight * norms[None, :].to(weight.device)).sum(0)  # (H * D,)
        scores.append(per_column.reshape(config.n_heads, config.head_dim).sum(1).cpu())
    return torch.stack(scores)


def neuron_importance(model: Decoder, statistics: ActivationStatistics | None = None) -> torch.Tensor:
    """(n_layers, d_ff): sum_i |W_down[i, n]| * ||X_n|| (||X|| = 1 without statistics)."""
    scores = []
    for i, block in enumerate(model.blocks):
        weight = block.mlp.down_proj.weight.detach().abs().float()  # (C, d_ff)
        norms = statistics.neuron_inputs[i].clamp_min(0).sqrt() if statistics else torch.ones(weight.shape[1])
        scores.append((weight * norms[None, :].to(weight.device)).sum(0).cpu())
    return torch.stack(scores)


def _rebuilt(model: Decoder, config: Config, state: dict[str, torch.Tensor]) -> Decoder:
    weight = model.embed.weight
    return build_model(config, state, weight.dtype, weight.device)


def _head_channels(heads: list[int], head_dim: int) -> torch.Tensor:
    """The q_proj rows (= o_proj columns) of `heads`, in order: head h holds h * D .. (h + 1) * D - 1."""
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def remove_heads(model: Decoder, keep: list[list[int]]) -> Decoder:
    """A new, smaller decoder keeping query heads `keep[layer]` (sorted; the same count from every KV group)."""
    config = check_decoder(model, "remove_heads").config
    if config.position == "alibi":
        raise LlmkitError("removing heads of an ALiBi model would shift the kept heads' slopes; prune neurons or "
                          "layers instead")
    group = config.n_heads // config.n_kv_heads
    counts = {len(heads) for heads in keep}
    if len(keep) != config.n_layers or len(counts) != 1:
        raise LlmkitError(f"keep one equal-sized list of heads per layer ({config.n_layers} layers); got sizes {counts}")
    per_group = counts.pop() // config.n_kv_heads
    for heads in keep:
        in_group = [sum(1 for h in heads if h // group == g) for g in range(config.n_kv_heads)]
        if in_group != [per_group] * config.n_kv_heads or per_group == 0 or sorted(set(heads)) != list(heads):
            raise LlmkitError(f"kept heads {heads} must be sorted, distinct and {per_group} (>= 1) from each of the "
                              f"{config.n_kv_heads} key/value groups of {group} heads")
    state = dict(model.state_dict())
    for i, heads in enumerate(keep):
        channels = _head_channels(heads, config.head_dim)
        prefix = f"blocks.{i}.attn."
        state[prefix + "q_proj.weight"] = state[prefix + "q_proj.weight"][channels]
        if prefix + "q_proj.bias" in state:
            state[prefix + "q_proj.bias"] = state[prefix + "q_proj.bias"][channels]
        state[prefix + "o_proj.weight"] = state[prefix + "o_proj.weight"][:, channels]
    smaller = dataclasses.replace(config, n_heads=per_group * config.n_kv_heads, head_dim=config.head_dim)
    return _rebuilt(model, smaller, state)


def remove_neurons(model: Decoder, keep: list[list[int]]) -> Decoder:
    """A new, smaller decoder keeping MLP hidden units `keep[layer]` (the same count in every layer)."""
    config = check_decoder(model, "remove_neurons").config
    if config.n_experts:
        raise LlmkitError("removing neurons of mixture-of-experts MLPs is not implemented; prune a dense decoder")
    counts = {len(units) for units in keep}
    if len(keep) != config.n_layers or len(counts) != 1 or 0 in counts:
        raise LlmkitError(f"keep one equal-sized, non-empty list of neurons per layer ({config.n_layers} layers); got "
                          f"sizes {counts}")
    state = dict(model.state_dict())
    for i, units in enumerate(keep):
        index = torch.tensor(units)
        prefix = f"blocks.{i}.mlp."
        for name in ("gate_proj", "up_proj"):
            for part in ("weight", "bias"):
                if f"{prefix}{name}.{part}" in state:
                    state[f"{prefix}{name}.{part}"] = state[f"{prefix}{name}.{part}"][index]
        state[prefix + "down_proj.weight"] = state[prefix + "down_proj.weight"][:, index]
    return _rebuilt(model, dataclasses.replace(config, d_ff=counts.pop()), state)


def remove_layers(model: Decoder, keep: list[int]) -> Decoder:
    """A new, shallower decoder of blocks `keep` (sorted), renumbered 0.. in that order."""
    config = check_decoder(model, "remove_layers").config
    if not keep or sorted(set(keep)) != list(keep) or not all(0 <= i < config.n_layers for i in keep):
        raise LlmkitError(f"keep a sorted, non-empty list of distinct block indices below {config.n_layers}; got {keep}")
    state = {name: tensor for name, tensor in model.state_dict().items() if not name.startswith("blocks.")}
    for new, old in enumerate(keep):
        prefix = f"blocks.{old}."
        state.update({f"blocks.{new}.{name[len(prefix):]}": tensor
                      for name, tensor in model.state_dict().items() if name.startswith(prefix)})
    layer_types = tuple(config.layer_types[i] for i in keep) if config.layer_types else ()
    smaller = dataclasses.replace(config, n_layers=len(keep), n_decoder_layers=len(keep), layer_types=layer_types)
    return _rebuilt(model, smaller, state)


def removal_count(amount: float, total: int, what: str) -> int:
    """round(amount * total), at least 1 and leaving at least 1."""
    if not 0 < amount < 1:
        raise LlmkitError(f"--amount {amount} is not a fraction; pass a number between 0 and 1 (0.25 removes a quarter "
                          f"of the {what})")
    count = round(amount * total)
    if not 1 <= count < total:
        raise LlmkitError(f"--amount {amount} of {total} {what} removes {count}; pass an amount that removes 1 to "
                          f"{total - 1}")
    return count


def prune_structured(
    model: Decoder, structure: Structure, amount: float, calibration: torch.Tensor | None = None,
    importance: Importance = "activation", batch_size: int = DEFAULT_BATCH_SIZE,
    statistics: ActivationStatistics | None = None,
) -> Decoder:
    """A new, smaller decoder without the least important `amount` (a fraction) of its heads (per KV group),
    neurons or layers; `calibration` ids (N, T) for importance="activation" (blocks always need it), or the
    `statistics` an earlier `activation_statistics` of this model collected (several prunings, one walk).

    Raises:
        LlmkitError: not a decoder, an unknown structure or importance, an amount that removes none or all, or
            missing calibration.
    """
    config = check_decoder(model, "structured pruning").config
    if structure not in STRUCTURES:
        raise LlmkitError(f"--structured {structure!r} is not one of {', '.join(STRUCTURES)}")
    if importance not in ("magnitude", "activation"):
        raise LlmkitError(f"--importance {importance!r}: choose magnitude or activation")
    if structure == "layers" and importance == "magnitude":
        raise LlmkitError("--structured layers scores blocks on calibration text (block influence); drop "
                          "--importance magnitude and pass --data")
    needs_statistics = importance == "activation" or structure == "layers"
    if needs_statistics and calibration is None and statistics is None:
        raise LlmkitError(f"--structured {structure} with activation importance scores on calibration text: pass --data"
                          + ("" if structure == "layers" else " (or --importance magnitude)"))
    if structure == "layers":
        removed = removal_count(amount, config.n_layers, "blocks")
        influence = statistics.block_influence if statistics else block_influence(model, calibration, batch_size)
        return remove_layers(model, most_influential_blocks(influence, config.n_layers - removed))
    if not needs_statistics:
        statistics = None
    elif statistics is None:
        statistics = activation_statistics(model, calibration, batch_size)
    if structure == "heads":
        group = config.n_heads // config.n_kv_heads
        removed = removal_count(amount, group, "query heads of each key/value group")
        scores = head_importance(model, statistics).reshape(config.n_layers, config.n_kv_heads, group)
        kept = torch.topk(scores, group - removed, dim=2).indices.sort(dim=2).values  # (L, Hkv, kept)
        offsets = torch.arange(config.n_kv_heads)[None, :, None] * group
        return remove_heads(model, (kept + offsets).reshape(config.n_layers, -1).tolist())
    removed = removal_count(amount, config.d_ff, "MLP neurons of each layer")
    scores = neuron_importance(model, statistics)
    return remove_neurons(model, torch.topk(scores, config.d_ff - removed, dim=1).indices.sort(dim=1).values.tolist())


def parameter_count(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters) of a model; a tied head counts once."""
    total = nonzero = 0
    for parameter in model.parameters():
        total += parameter.numel()
        nonzero += int((parameter != 0).sum())
    return total, nonzero
