"""The LM head and cross-entropy fused and computed in chunks of tokens, so the (tokens x vocab) logits and their
gradient never exist in full.

Why: with SmolLM2's 49,152-token vocabulary, 4 x 256 tokens of float32 logits take 201 MB, their softmax in the
backward as much again, more than any other activation of a 135M model (Liger-Kernel's "fused linear cross entropy",
Hsu et al. 2024, makes the same observation on GPUs). For hidden states h_i (already through the final norm), head
weight W (V, C) and label y_i, the summed loss and its gradients are

    L = sum_i [ logsumexp_v (W h_i)_v - (W h_i)_{y_i} ]
    dL/dh_i = W^T (softmax(W h_i) - onehot(y_i))          dL/dW = sum_i (softmax(W h_i) - onehot(y_i)) h_i^T

so each chunk of K tokens needs only its own (K, V) logits: the forward computes the chunk's loss AND its gradients
right away (no recomputation in the backward, hence no extra FLOPs), keeping dL/dh (N, C) and dL/dW (V, C); the
backward only scales them by the incoming gradient. Peak extra memory: one chunk's logits and log-probabilities,
2 x K x V floats (the softmax for the gradient is computed in place of the log-probabilities).
Positions labelled IGNORE_INDEX add nothing to the loss or the gradients.
"""

from __future__ import annotations

import torch

from llmkit.data.batch import IGNORE_INDEX
from llmkit.errors import LlmkitError


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(W h_i, y_i) over labels that are not IGNORE_INDEX, in chunks of `chunk` tokens (see the module)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:  # noqa: ANN001
        device_type = hidden.device.type
        compute = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        need_hidden, need_weight = hidden.requires_grad, weight.requires_grad
        w = weight.to(compute)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk].to(compute)  # (K, C)
            y = labels[start:start + chunk]  # (K,)
            log_probs = torch.log_softmax((h @ w.T).float(), dim=-1)  # (K, V): with the logits, the chunk's peak
            valid = y != IGNORE_INDEX
            safe = torch.where(valid, y, 0)
            total -= (log_probs.gather(1, safe[:, None]).squeeze(1) * valid).sum()
            if need_hidden or need_weight:
                grad_logits = log_probs.exp_()  # softmax, in place
                grad_logits.scatter_add_(1, safe[:, None], -torch.ones_like(grad_logits[:, :1]))
                grad_logits *= valid[:, None]
                grad_logits = grad_logits.to(compute)
                if need_hidden:
                    grad_hidden[start:start + chunk] = (grad_logits @ w).to(hidden.dtype)  # (K, C)
                if need_weight:
                    grad_weight += (grad_logits.T @ h).float()  # (V, C)
                del grad_logits
            del log_probs  # before the next chunk's logits: two (K, V) tensors at most
        ctx.save_for_backward(grad_hidden if need_hidden else None,
                              grad_weight.to(weight.dtype) if need_weight else None)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # noqa: ANN001, ANN205
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_output.float()
        return (None if grad_hidden is None else grad_hidden * scale.to(grad_hidden.dtype),
                None if grad_weight is None else grad_weight * scale.to(grad_weight.dtype), None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk: int = 1024) -> torch.Tensor:
    """Summed cross-entropy (float32, 0-dim) of logits hidden (N, C) @ weight (V, C)^T against labels (N,), in
    chunks of `chunk` tokens, without materialising the (N, V) logits; the same value and gradients as
    F.cross_entropy(hidden @ weight.T, labels, ignore_index=IGNORE_INDEX, reduction="sum")."""
    if chunk < 1:
        raise LlmkitError(f"--train.loss_chunk {chunk} must be at least 1 (tokens per chunk of the LM head), or 0 "
                          "for the plain LM head")
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1] or weight.shape[1] != hidden.shape[1]:
        raise LlmkitError(f"linear_cross_entropy needs hidden (N, C), weight (V, C), labels (N,); got "
                          f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}")
    return LinearCrossEntropy.apply(hidden, weight, labels, chunk)
