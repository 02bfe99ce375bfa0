"""Unstructured and N:M pruning: zero the weights that matter least, measured three ways.

For a linear layer y = x W^T (W: out x in) with calibration inputs X (n tokens x in), each method scores every weight
and zeroes the lowest-scored ones:

    magnitude   S_ij = |W_ij|                                   (Han et al. 2015; per layer or over all layers)
    Wanda       S_ij = |W_ij| * ||X_j||_2                       (Sun et al. 2023, "A Simple and Effective Pruning
                                                                 Approach for Large Language Models", arXiv:2306.11695)
    SparseGPT   S_ij = W_ij^2 / [H^-1]_jj, and the kept weights of each row absorb the pruned ones' error
                (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
                arXiv:2301.00774)

Wanda compares weights within one output row (the paper's comparison group: per output, 'per layer' is worse);
magnitude compares within the whole matrix (`scope="layer"`) or across every target matrix of the model
(`scope="global"`). An N:M pattern (2:4, 4:8) keeps N weights of every M consecutive inputs of a row, whatever the
method: NVIDIA's sparse tensor cores run 2:4 (Ampere and later).

SparseGPT is GPTQ's Optimal Brain Surgeon update (llmkit/quant/gptq.py) with "prune" in place of "round": with
H = 2 X^T X / n, pruning weight q of a row w (setting it to 0) and letting the row's remaining weights F absorb it

    w_F <- w_F - (w_q / [H_F^-1]_qq) [H_F^-1]_{F, q}

minimises the row's output error ||X w^T - X w'^T||^2 (OBS, Hassibi & Stork 1993). Columns are taken left to right
with the same Cholesky factor U (H^-1 = U^T U) as GPTQ, in lazy blocks of `block_size` columns; a block's mask is
chosen when the block starts (the paper's adaptive mask selection, with the scores of the weights as updated by the
blocks before): the round(sparsity * out * block) lowest scores of the block; an N:M group's mask is chosen when the
group starts, from the weights as updated by the columns before it (as the paper's reference code does).
Dampening: H += percdamp * mean(diag H) * I.

Calibration: both data-aware methods walk the decoder block by block (`block_inputs`), collect the inputs of each
block's linears with gptq.py's hooks (one H per shared input: q/k/v share one, gate/up another), prune the block, and
feed its pruned output to the next block, as both papers do. Wanda needs only diag H (||X_j||^2 = n H_jj / 2).

Which weights: the blocks' attention and MLP projections (q/k/v/o, gate/up/down; `targets`). The embedding and the LM
head (tied to it in SmolLM2) stay dense, as in both papers. A pruned weight is stored as a zero in the ordinary dense
matrix, so the checkpoint is an ordinary one; `pruned_masks` reads the masks back from the zeros.
Dense storage means no CPU time is saved: only structured pruning (llmkit/quant/prune_structured.py) is faster here.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from tqdm.auto import tqdm

from llmkit.errors import LlmkitError
from llmkit.quant.calibration import DEFAULT_BATCH_SIZE, block_inputs, check_decoder
from llmkit.quant.gptq import BLOCK_SIZE, PERCDAMP, layer_hessians, linear_groups
from llmkit.quant.model import DEFAULT_TARGETS

Method = Literal["magnitude", "wanda", "sparsegpt"]
Scope = Literal["layer", "global"]
METHODS = ("magnitude", "wanda", "sparsegpt")
CALIBRATED_METHODS = ("wanda", "sparsegpt")


def parse_pattern(pattern: str) -> tuple[int, int]:
    """"N:M" -> (N, M): keep N of every M consecutive input weights of a row (2:4 keeps half).

    Raises:
        LlmkitError: not two integers with 0 < N < M.
    """
    parts = pattern.split(":")
    if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
        raise LlmkitError(f"--pattern {pattern!r} is not N:M; pass e.g. 2:4 (keep 2 of every 4 weights) or 4:8")
    n, m = int(parts[0]), int(parts[1])
    if not 0 < n < m:
        raise LlmkitError(f"--pattern {pattern} keeps {n} of every {m} weights; N must be from 1 to M - 1, e.g. 2:4")
    return n, m


def check_sparsity(sparsity: float) -> float:
    if not 0 < sparsity < 1:
        raise LlmkitError(f"--sparsity {sparsity} is not a fraction of weights to zero; pass a number between 0 and 1 "
                          "(0.5 zeroes half)")
    return sparsity


def lowest_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Keep-mask (True = kept) of `scores`' shape that drops exactly the `count` lowest scores (ties by position)."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if count > 0:
        keep[torch.argsort(scores.reshape(-1), stable=True)[:count]] = False
    return keep.reshape(scores.shape)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask (out, in) dropping the round(sparsity * in) lowest scores of every row (Wanda's comparison group)."""
    count = round(sparsity * scores.shape[1])
    order = torch.argsort(scores, dim=1, stable=True)[:, :count]  # (out, count): each row's lowest
    return torch.ones_like(scores, dtype=torch.bool).scatter_(1, order, False)


def n_m_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask (out, in) keeping the n highest scores of every m consecutive inputs of each row."""
    out_features, in_features = scores.shape
    if in_features % m:
        raise LlmkitError(f"an {n}:{m} pattern needs a layer's inputs in whole groups of {m}; a layer has "
                          f"{in_features} inputs: choose M that divides it")
    groups = scores.reshape(out_features, in_features // m, m)  # (out, in / m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, torch.topk(groups, n, dim=2).indices, True)
    return keep.reshape(out_features, in_features)


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 (out, in) from the per-input-channel L2 norms (in,) of the calibration inputs."""
    return weight.abs().float() * input_norms.float()[None, :]


def weight_mask(scores: torch.Tensor, sparsity: float | None, pattern: tuple[int, int] | None,
                per_row: bool) -> torch.Tensor:
    """The keep-mask of one matrix: N:M when a pattern is given, else per row or per matrix at `sparsity`."""
    if pattern is not None:
        return n_m_mask(scores, *pattern)
    if per_row:
        return row_mask(scores, sparsity)
    return lowest_mask(scores, round(sparsity * scores.numel()))


def sparsegpt_prune_weight(
    weight: torch.Tensor, hessian: torch.Tensor, sparsity: float | None = None, pattern: tuple[int, int] | None = None,
    percdamp: float = PERCDAMP, block_size: int = BLOCK_SIZE,
) -> torch.Tensor:
    """SparseGPT of one weight (out, in) with the Hessian H = 2 X^T X / n (in, in) of its inputs (float64 arithmetic):
    the pruned weight, in `weight`'s dtype, with zeros where pruned and the kept weights updated.

    Runs on one CPU thread: the column loop is thousands of small ops, and on a busy 2-core machine each op's
    2-thread parallel region waited for a descheduled thread (1536 x 576: 31 s on 2 threads, 2.9 s on 1, measured
    under load 13)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _sparsegpt(weight, hessian, sparsity, pattern, percdamp, block_size)
    finally:
        torch.set_num_threads(threads)


def _sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float | None, pattern: tuple[int, int] | None,
               percdamp: float, block_size: int) -> torch.Tensor:
    w = weight.detach().double().clone()  # (out, in)
    out_features, columns = w.shape
    if hessian.shape != (columns, columns):
        raise LlmkitError(f"SparseGPT Hessian must be ({columns}, {columns}) for a weight of shape {tuple(w.shape)}; "
                          f"got {tuple(hessian.shape)}")
    if pattern is not None and block_size % pattern[1]:
        raise LlmkitError(f"SparseGPT block_size {block_size} must be a multiple of the pattern's M ({pattern[1]})")
    h = hessian.to(w.device, torch.float64, copy=True)
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h.diagonal().add_(percdamp * h.diagonal().mean())
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)  # H^-1 = U^T U
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        block = w[:, i1:i2].clone()  # (out, count): updated in place as its columns are pruned
        errors = torch.zeros_like(block)
        u_block = u[i1:i2, i1:i2]
        # OBS saliency w_j^2 / [H_F^-1]_jj, F = the columns not yet reached: [H_F^-1]_jj = U_jj^2
        saliency = u_block.diagonal()[None, :] ** 2  # (1, count)
        if pattern is None:  # the block's mask at its start
            keep = lowest_mask(block**2 / saliency, round(sparsity * block.numel()))
        else:
            keep = torch.ones_like(block, dtype=torch.bool)
        for i in range(i2 - i1):
            if pattern is not None and i % pattern[1] == 0:  # each N:M group's mask at its start, from updated weights
                group = slice(i, i + pattern[1])
                keep[:, group] = n_m_mask(block[:, group] ** 2 / saliency[:, group], *pattern)
            pruned = torch.where(keep[:, i], block[:, i], 0)
            errors[:, i] = (block[:, i] - pruned) / u_block[i, i]
            block[:, i:] -= errors[:, i : i + 1] * u_block[i : i + 1, i:]  # (out, 1) x (1, count - i)
            block[:, i] = pruned
        w[:, i1:i2] = block
        w[:, i2:] -= errors @ u[i1:i2, i2:]  # the block's errors reach the later columns at once
    return w.to(weight.dtype)


def target_linears(model: nn.Module, targets: tuple[str, ...] = DEFAULT_TARGETS) -> dict[str, nn.Linear]:
    """The model's prunable linears by full name: those of its blocks whose attribute name is in `targets`."""
    decoder = check_decoder(model, "pruning")
    found = {f"blocks.{i}.{name}": module for i, block in enumerate(decoder.blocks)
             for name, module in block.named_modules()
             if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets}
    if not found:
        raise LlmkitError(f"no linear layer named {list(targets)} in the model's blocks; pass targets that name them")
    return found


def prune(
    model: nn.Module, method: Method = "magnitude", sparsity: float | None = None, pattern: str | None = None,
    calibration: torch.Tensor | None = None, scope: Scope = "layer", targets: tuple[str, ...] = DEFAULT_TARGETS,
    percdamp: float = PERCDAMP, block_size: int = BLOCK_SIZE, batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> nn.Module:
    """Prune a decoder's target linears in place (returns the model): `sparsity` (a fraction) or `pattern` ("2:4"),
    by `method`; wanda and sparsegpt need `calibration` ids (N, T), e.g. from `calibration_batches`. scope="global"
    (magnitude only) ranks every target weight of the model together, so layers end with different sparsities.

    Raises:
        LlmkitError: not a decoder, an unknown method, both or neither of sparsity and pattern, a bad value, missing
            calibration for a data-aware method, or a pattern whose M does not divide a layer's inputs.
    """
    if method not in METHODS:
        raise LlmkitError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    if (sparsity is None) == (pattern is None):
        raise LlmkitError("pass exactly one of --sparsity (e.g. 0.5) and --pattern (e.g. 2:4)")
    n_m = parse_pattern(pattern) if pattern is not None else None
    if sparsity is not None:
        check_sparsity(sparsity)
    if scope not in ("layer", "global"):
        raise LlmkitError(f"--scope {scope!r}: choose layer or global")
    if scope == "global" and (method != "magnitude" or n_m is not None):
        raise LlmkitError("--scope global ranks weights across layers by magnitude: use it with --method magnitude and "
                          "--sparsity (Wanda compares within a row, SparseGPT within a block; N:M within its group)")
    if method in CALIBRATED_METHODS and calibration is None:
        raise LlmkitError(f"--method {method} weighs weights by their inputs: pass calibration text (--data)")
    linears = target_linears(model, targets)
    if n_m is not None:
        for name, linear in linears.items():
            if linear.in_features % n_m[1]:
                raise LlmkitError(f"--pattern {pattern}: {name} has {linear.in_features} inputs, not a multiple of "
                                  f"{n_m[1]}; choose M that divides it")
    if method == "magnitude":
        _prune_by_magnitude(linears, sparsity, n_m, scope)
    else:
        _prune_calibrated(model, method, sparsity, n_m, calibration, targets, percdamp, block_size, batch_size,
                          progress)
    return model


def _prune_by_magnitude(linears: dict[str, nn.Linear], sparsity: float | None, pattern: tuple[int, int] | None,
                        scope: Scope) -> None:
    with torch.no_grad():
        if scope == "global":
            # kth smallest |W| over every target weight, then exactly count zeros: ties at the threshold by layer order
            magnitudes = torch.cat([linear.weight.abs().float().reshape(-1) for linear in linears.values()])
            count = round(sparsity * magnitudes.numel())
            threshold = torch.kthvalue(magnitudes, count).values if count else magnitudes.min() - 1
            at_threshold_left = count - int((magnitudes < threshold).sum())
            del magnitudes
            for linear in linears.values():
                scores = linear.weight.abs().float()
                ties = scores == threshold
                drop = scores < threshold
                taken = min(int(ties.sum()), at_threshold_left)
                if taken:
                    tie_positions = ties.reshape(-1).nonzero().squeeze(1)[:taken]
                    drop.view(-1)[tie_positions] = True
                    at_threshold_left -= taken
                linear.weight.masked_fill_(drop, 0)
            return
        for linear in linears.values():
            keep = weight_mask(linear.weight.abs().float(), sparsity, pattern, per_row=False)
            linear.weight.mul_(keep)


def _prune_calibrated(
    model: nn.Module, method: Method, sparsity: float | None, pattern: tuple[int, int] | None,
    calibration: torch.Tensor, targets: tuple[str, ...], percdamp: float, block_size: int, batch_size: int,
    progress: bool,
) -> None:
    """Block by block: Hessians of each block's linear inputs (through the blocks already pruned), then prune."""
    decoder = check_decoder(model, method)
    batches = block_inputs(decoder, calibration, batch_size)
    for block in tqdm(decoder.blocks, desc=method, unit="block", disable=not progress):
        names = [name for name, m in block.named_modules()
                 if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets]
        if names:
            hessians = layer_hessians(block, linear_groups(block, names, batches[0]), batches)
            with torch.no_grad():
                for name in names:
                    linear = block.get_submodule(name)
                    if method == "wanda":
                        norms = hessians[name].diagonal().clamp_min(0).sqrt()  # proportional to ||X_j||_2
                        keep = weight_mask(wanda_scores(linear.weight, norms), sparsity, pattern, per_row=True)
                        linear.weight.mul_(keep)
                    else:
                        linear.weight.copy_(sparsegpt_prune_weight(linear.weight, hessians[name], sparsity, pattern,
                                                                   percdamp, block_size))
        with torch.no_grad():  # block i + 1 sees what the pruned block i makes of its inputs
            batches = [(block(x, context), context) for x, context in batches]


def pruned_masks(model: nn.Module, targets: tuple[str, ...] = DEFAULT_TARGETS) -> dict[str, torch.Tensor]:
    """Keep-masks (True = kept) of the target linears' weights, read from the zeros a pruned model stores."""
    return {name: linear.weight.detach() != 0 for name, linear in target_linears(model, targets).items()}


def layer_sparsity(model: nn.Module, targets: tuple[str, ...] = DEFAULT_TARGETS) -> dict[str, float]:
    """Fraction of zero weights of each target linear, by full name."""
    return {name: float((linear.weight == 0).float().mean()) for name, linear in target_linears(model, targets).items()}


class MaskKeeper:
    """Re-applies pruning masks after every optimizer step, so a pruned model can be fine-tuned (healed) and stay
    sparse: W <- W * mask once `optimizer.step()` returns.

    It hooks torch's global optimizer-step post-hook (`torch.optim.optimizer.register_optimizer_step_post_hook`), so
    the one training loop (llmkit/train/loop.py) needs no change and any optimizer it builds is covered; only the
    parameters that optimizer updates are masked again. A parametrization (W = W_orig * mask) would also work but
    renames the weights in the state dict and wraps every forward. Gradients of pruned weights are not masked: AdamW
    moves them during the step and the hook sets them back to zero, so kept weights see exactly the dense update.
    Single process and DDP (the parameters stay the same tensors); FSDP2 replaces them with sharded ones: not covered.
    Use as a context manager, or call `remove()`."""

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor] | None = None,
                 targets: tuple[str, ...] = DEFAULT_TARGETS) -> None:
        masks = pruned_masks(model, targets) if masks is None else masks
        linears = target_linears(model, targets)
        unknown = sorted(set(masks) - set(linears))
        if unknown:
            raise LlmkitError(f"masks name layers the model lacks: {unknown[:3]}; build the masks from this model")
        self.pairs = [(linears[name].weight, mask.to(linears[name].weight.device)) for name, mask in masks.items()]
        self.handle = register_optimizer_step_post_hook(self._reapply)

    def _reapply(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        with torch.no_grad():
            for weight, mask in self.pairs:
                if id(weight) in stepped:
                    weight.mul_(mask)

    def remove(self) -> None:
        self.handle.remove()

    def __enter__(self) -> MaskKeeper:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()
