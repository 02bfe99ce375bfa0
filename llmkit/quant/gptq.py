"""GPTQ: 4-bit weights that compensate their own rounding (Frantar et al. 2022, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers", arXiv:2210.17323).

Per linear layer y = x W^T with calibration inputs X (n, in), GPTQ minimises the layer-output error
||X W^T - X W_hat^T||^2 = tr((W - W_hat) H (W - W_hat)^T) / 2 with H = 2 X^T X, one input column at a time (the
Optimal Brain Surgeon update, OBS, with the same column order for every row):

    quantize column j:        q_j = Q(w_j)                               (the format's grid, this group's scale)
    spread its error:         W[:, F] -= ((w_j - q_j) / [H_F^-1]_jj) [H_F^-1]_{j, F}       F = columns after j
    drop j from H_F^-1:       H_F^-1 <- H_F^-1 - H_F^-1[:, j] H_F^-1[j, :] / [H_F^-1]_jj

The rows [H_F^-1]_{j, F} / sqrt([H_F^-1]_jj) of all those downdates are the rows of U, the upper Cholesky factor of
H^-1 (H^-1 = U^T U), so with U computed once the update is W[:, j+1:] -= err_j U[j, j+1:], err_j = (w_j - q_j) / U_jj.
Lazy batches: columns are taken in blocks of `block_size` (128); inside a block the update touches only the block's
columns, and the rest of W gets the block's errors at once, W[:, i2:] -= Err U[i1:i2, i2:] (one matmul).
Damping: H += percdamp * mean(diag H) * I (percdamp 0.01) keeps the Cholesky stable; a column no input ever
touches (diag H = 0) gets H_jj = 1 and weight 0.

Group-wise scales are recomputed at each group start from the columns as they are then, with the updates of the
columns before already applied (the reference code reads the group from W, which misses the updates made inside the
current block; here it is read from the block, so the lazy and the direct forms agree). act_order (off by default)
takes columns by decreasing diag H; llmkit's formats need contiguous groups, so with act_order the scales are fixed
up front from W before any update ("static groups", as AutoGPTQ does) and only the order changes.

Output format: int4_asym by default. Both int4 formats run through the same aten int4pack kernel, which reads one
(scale, offset) pair per group either way, so neither is faster in QuantLinear (measured on this 2-core VM: equal
within noise, 1 and 512 rows); the zero point uses all 16 levels over [min, max] of each group, so it rounds finer,
at 8 / group_size more bits per weight (0.125 at group 64). Both papers' defaults have a zero point too.

Model level (`gptq`): blocks in order; block i's Hessians come from inputs that went through the already quantized
blocks < i, as in the paper. Layers sharing an input (q/k/v; gate/up) share one H. true_sequential=True also
quantizes inside a block in call order (q/k/v, then o with inputs through the quantized q/k/v, ...) at the cost of
one forward per group.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from llmkit.errors import LlmkitError
from llmkit.quant.calibration import DEFAULT_BATCH_SIZE, block_inputs, check_decoder
from llmkit.quant.integer import INT4_GROUPS
from llmkit.quant.linear import QuantLinear
from llmkit.quant.model import DEFAULT_TARGETS, PROVENANCE_ATTRIBUTE, quantized_layers
from llmkit.quant.packed import QuantizedWeight, check_group, check_weight, pack_nibbles

CALIBRATED_FORMATS = ("int4_asym", "int4")
DEFAULT_FORMAT = "int4_asym"
DEFAULT_GROUP = 128  # GPTQ's and AWQ's papers
BLOCK_SIZE = 128  # columns per lazy batch (the paper's B)
PERCDAMP = 0.01
_TINY = torch.finfo(torch.float32).tiny


def check_format(fmt: str, in_features: int, group_size: int) -> None:
    if fmt not in CALIBRATED_FORMATS:
        raise LlmkitError(f"calibrated 4-bit writes {' or '.join(CALIBRATED_FORMATS)}; got format {fmt!r}")
    check_group(fmt, in_features, group_size, INT4_GROUPS)


def group_params(columns: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (fp32) and zero (fp32, integer-valued) per row of a group of columns (out, g), as the int4 formats
    (llmkit/quant/integer.py) compute them: symmetric s = absmax / 7, z = 8; asymmetric s = range / 15 with the range
    holding 0, z = round(-lo / s)."""
    columns = columns.float()
    if symmetric:
        scale = columns.abs().amax(dim=1) / 7
        return scale, torch.full_like(scale, 8)
    low, high = columns.amin(dim=1).clamp_max(0), columns.amax(dim=1).clamp_min(0)
    scale = (high - low) / 15
    return scale, torch.round(-low / scale.clamp_min(_TINY)).clamp(0, 15)


def round_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes 0..15, W_hat = s (code - z) in w's dtype) of one column w (out,) on a group's grid; the division in
    fp32 as the formats do it, so an untouched column rounds exactly as round-to-nearest would."""
    codes = (torch.round(w.float() / scale.clamp_min(_TINY)) + zero).clamp(0, 15)
    return codes, (scale * (codes - zero)).to(w.dtype)


def gptq_quantize_weight(
    weight: torch.Tensor, hessian: torch.Tensor, group_size: int = DEFAULT_GROUP, fmt: str = DEFAULT_FORMAT,
    percdamp: float = PERCDAMP, block_size: int = BLOCK_SIZE, act_order: bool = False,
) -> QuantizedWeight:
    """GPTQ of one weight (out, in) with the Hessian H = 2 X^T X / n (in, in) of its inputs; float64 arithmetic.
    Returns the packed weight in `fmt` (int4_asym or int4) with `group_size` inputs per scale."""
    w = check_weight(weight, fmt).double()  # (out, in)
    out_features, columns = w.shape
    check_format(fmt, columns, group_size)
    if hessian.shape != (columns, columns):
        raise LlmkitError(f"GPTQ Hessian must be ({columns}, {columns}) for a weight of shape {tuple(w.shape)}; got "
                          f"{tuple(hessian.shape)}")
    if block_size % group_size:
        raise LlmkitError(f"GPTQ block_size {block_size} must be a multiple of --group_size {group_size}")
    symmetric = fmt == "int4"
    h = hessian.to(w.device, torch.float64, copy=True)
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    n_groups = columns // group_size
    scale = torch.zeros(out_features, n_groups, device=w.device)
    zero = torch.zeros(out_features, n_groups, device=w.device)
    order = torch.arange(columns, device=w.device)
    if act_order:  # static groups: every group's grid from W before any update, then columns by decreasing H_jj
        for g in range(n_groups):
            scale[:, g], zero[:, g] = group_params(w[:, g * group_size : (g + 1) * group_size], symmetric)
        order = torch.argsort(h.diagonal(), descending=True)
        w, h = w[:, order], h[order][:, order]
    h.diagonal().add_(percdamp * h.diagonal().mean())
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)  # H^-1 = U^T U
    codes = torch.zeros_like(w)
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        block = w[:, i1:i2].clone()  # (out, count): updated in place as its columns are quantized
        errors = torch.zeros_like(block)
        u_block = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if not act_order and j % group_size == 0:  # the group's grid from its columns as they are now
                scale[:, j // group_size], zero[:, j // group_size] = group_params(block[:, i : i + group_size],
                                                                                   symmetric)
            g = order[j] // group_size
            codes[:, j], q = round_column(block[:, i], scale[:, g], zero[:, g])
            errors[:, i] = (block[:, i] - q) / u_block[i, i]
            block[:, i:] -= errors[:, i : i + 1] * u_block[i : i + 1, i:]  # (out, 1) x (1, count - i)
        w[:, i2:] -= errors @ u[i1:i2, i2:]  # the block's errors reach the later columns at once
    if act_order:
        codes = codes[:, torch.argsort(order)]
    tensors = {"codes": pack_nibbles(codes.to(torch.uint8)), "scale": scale}
    if not symmetric:
        tensors["zero"] = zero.to(torch.uint8)
    return QuantizedWeight(fmt, (out_features, columns), group_size, tensors)


def linear_groups(block: nn.Module, names: list[str], batch: tuple) -> list[list[str]]:
    """`names` of a block's linears grouped by shared input tensor, in call order (one forward of one batch)."""
    seen: list[tuple[torch.Tensor, list[str]]] = []

    def hook(name: str):  # noqa: ANN202
        def record(module: nn.Module, args: tuple) -> None:
            for x, group in seen:
                if x is args[0]:
                    group.append(name)
                    return
            seen.append((args[0], [name]))
        return record

    handles = [block.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            block(*batch)
    finally:
        for handle in handles:
            handle.remove()
    return [group for _, group in seen]


def layer_hessians(block: nn.Module, groups: list[list[str]], batches: list[tuple]) -> dict[str, torch.Tensor]:
    """H = 2 X^T X / n (float64; each batch's product in fp32) of each group's input, over all batches."""
    sums = {group[0]: None for group in groups}
    counts = dict.fromkeys(sums, 0)

    def hook(name: str):  # noqa: ANN202
        def accumulate(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (tokens, in)
            product = (x.t() @ x).double()
            sums[name] = product if sums[name] is None else sums[name] + product
            counts[name] += x.shape[0]
        return accumulate

    handles = [block.get_submodule(name).register_forward_pre_hook(hook(name)) for name in sums]
    try:
        with torch.no_grad():
            for batch in batches:
                block(*batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: 2 * sums[group[0]] / counts[group[0]] for group in groups for name in group}


def gptq(
    model: nn.Module, calibration: torch.Tensor, group_size: int = DEFAULT_GROUP, fmt: str = DEFAULT_FORMAT,
    targets: tuple[str, ...] = DEFAULT_TARGETS, percdamp: float = PERCDAMP, block_size: int = BLOCK_SIZE,
    act_order: bool = False, true_sequential: bool = False, batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> nn.Module:
    """GPTQ-quantize a decoder's target linears (in place; returns the model) on calibration ids (N, T), e.g. from
    `calibration_batches`. The result is an ordinary quantized model: QuantLinear layers of `fmt` (int4_asym or
    int4) with `group_size` inputs per scale, which save_quantized / load_quantized / dequantize take as they are.

    Raises:
        LlmkitError: not a decoder, already quantized, no target linear, or a group size the format cannot take.
    """
    decoder = check_decoder(model, "gptq")
    if quantized_layers(model):
        raise LlmkitError("the model is already quantized; run gptq on its float original")
    names = [[name for name, m in block.named_modules() if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1]
              in targets] for block in decoder.blocks]
    if not any(names):
        raise LlmkitError(f"no linear layer named {list(targets)} in the model's blocks; pass targets that name them")
    for block, block_names in zip(decoder.blocks, names, strict=True):  # every shape, before changing anything
        for name in block_names:
            check_format(fmt, block.get_submodule(name).in_features, group_size)
    batches = block_inputs(decoder, calibration, batch_size)
    for block, block_names in tqdm(list(zip(decoder.blocks, names, strict=True)), desc="gptq", unit="block",
                                   disable=not progress):
        groups = linear_groups(block, block_names, batches[0]) if block_names else []
        steps = [[group] for group in groups] if true_sequential else [groups]
        for step in steps:
            hessians = layer_hessians(block, step, batches)
            for name in (name for group in step for name in group):
                linear = block.get_submodule(name)
                packed = gptq_quantize_weight(linear.weight, hessians[name], group_size, fmt, percdamp, block_size,
                                              act_order)
                parent, _, attribute = name.rpartition(".")
                layer = QuantLinear(packed, linear.bias).to(linear.weight.device)
                setattr(block.get_submodule(parent) if parent else block, attribute, layer)
        with torch.no_grad():  # block i + 1 sees what the quantized block i makes of its inputs
            batches = [(block(x, context), context) for x, context in batches]
    setattr(model, PROVENANCE_ATTRIBUTE, {  # save_quantized writes it to quantization.json
        "method": "gptq", "format": fmt, "group_size": group_size, "calibration_sequences": calibration.shape[0],
        "calibration_tokens": calibration.numel(), "damp": percdamp, "act_order": act_order,
        "true_sequential": true_sequential})
    return model
