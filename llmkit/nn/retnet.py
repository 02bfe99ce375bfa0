"""Multi-scale retention (RetNet, Sun et al. 2023, "Retentive Network: A Successor to Transformer for Large Language
Models"): a drop-in for attention with a parallel form for training and an O(1)-per-token recurrent form for decoding.

One head with decay gamma, queries and keys rotated by their position n (xPos-style: Theta_n = e^{i n theta}, the
rotation RoPE uses; the decay gamma^(n-m) stands in for xPos's scaling):

    Q = (X W_Q) Theta,  K = (X W_K) conj(Theta) / sqrt(d_k),  V = X W_V
    parallel:    Retention(X) = (Q K^T  .*  D) V,        D[n, m] = gamma^(n - m) if n >= m else 0
    recurrent:   S_n = gamma S_{n-1} + K_n^T V_n,        Retention(X_n) = Q_n S_n          (S: (d_k, d_v))
    chunkwise:   R_i = K_[i]^T (V_[i] .* zeta) + gamma^B R_{i-1},  zeta_j = gamma^(B - j - 1)
                 Retention(X_[i]) = (Q_[i] K_[i]^T .* D) V_[i]  +  (Q_[i] R_{i-1}) .* xi,   xi_j = gamma^(j + 1)

All three compute the same numbers (tests/test_nn_retnet.py holds them equal, outputs, states and gradients).
Multi-scale: head h has gamma_h = 1 - 2^(-5 - h); the heads are normalised each on its own (GroupNorm with H groups)
and gated:  MSR(X) = (swish(X W_G) .* GroupNorm_H(head_1, ..., head_H)) W_O.  Keys have n_heads x head_dim
channels, values twice as many (the paper's d_v = 2 d_k). The official code also rescales the decay matrix and the
scores for numerical range; GroupNorm undoes any per-head scale, so this module leaves them out and keeps the three
forms exactly equal.

Decoding keeps S per head: (B, H, d_k, d_v), the same size whatever the length. Left padding: a padded token's key
is zeroed, so it adds nothing to S (positions, from the context, count from each row's first real token).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.config import Config
from llmkit.nn.attention import AttentionContext
from llmkit.nn.linear import Linear
from llmkit.nn.position import apply_rope, rope_cos_sin, rope_inverse_frequencies

ROTATION_THETA = 10000.0  # base of the xPos/RoPE rotation angles
CHUNK_SIZE = 64  # training and prefill longer than this run chunkwise: O(T * chunk) memory instead of O(T^2)


def head_decays(n_heads: int) -> torch.Tensor:
    """gamma_h = 1 - 2^(-5 - h) for h = 0..H-1: fast-forgetting to slow-forgetting heads. Shape (H,)."""
    return 1 - 2.0 ** (-5 - torch.arange(n_heads, dtype=torch.float64))


def decay_matrix(log_gamma: torch.Tensor, T: int) -> torch.Tensor:
    """D[h, n, m] = gamma_h^(n - m) for n >= m, else 0. log_gamma (H,) -> (H, T, T)."""
    n = torch.arange(T, device=log_gamma.device)
    distance = (n[:, None] - n[None, :]).to(log_gamma.dtype)  # (T, T)
    decay = torch.exp(log_gamma[:, None, None] * distance.clamp(min=0))  # (H, T, T)
    return decay * (distance >= 0)


def parallel_retention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor) -> torch.Tensor:
    """(Q K^T .* D) V. q, k (B, H, T, Dk); v (B, H, T, Dv); log_gamma (H,) -> (B, H, T, Dv)."""
    D = decay_matrix(log_gamma, q.shape[2]).to(q.dtype)  # (H, T, T)
    return ((q @ k.transpose(-2, -1)) * D) @ v


def recurrent_retention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor, state: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token: S_n = gamma S_{n-1} + K_n^T V_n, o_n = Q_n S_n. Returns outputs (B, H, T, Dv) and the last
    state (B, H, Dk, Dv); `state` is the one before the first token (zeros when None)."""
    B, H, T, Dk = q.shape
    gamma = log_gamma.exp().to(q.dtype)[None, :, None, None]  # (1, H, 1, 1)
    if state is None:
        state = q.new_zeros(B, H, Dk, v.shape[-1])
    outputs = []
    for t in range(T):
        state = gamma * state + k[:, :, t, :, None] * v[:, :, t, None, :]  # (B, H, Dk, Dv)
        outputs.append((q[:, :, t, None, :] @ state)[:, :, 0])  # (B, H, Dv)
    return torch.stack(outputs, dim=2), state


def chunkwise_retention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gamma: torch.Tensor, state: torch.Tensor | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Parallel inside chunks of `chunk_size` tokens, recurrent across them (shapes as `recurrent_retention`)."""
    B, H, T, Dk = q.shape
    if state is None:
        state = q.new_zeros(B, H, Dk, v.shape[-1])
    outputs = []
    for start in range(0, T, chunk_size):
        qc, kc, vc = (x[:, :, start : start + chunk_size] for x in (q, k, v))
        L = qc.shape[2]
        j = torch.arange(L, device=q.device, dtype=log_gamma.dtype)
        inner = parallel_retention(qc, kc, vc, log_gamma)  # (B, H, L, Dv)
        xi = torch.exp(log_gamma[:, None] * (j + 1)).to(q.dtype)[None, :, :, None]  # (1, H, L, 1) gamma^(j+1)
        outputs.append(inner + (qc @ state) * xi)
        zeta = torch.exp(log_gamma[:, None] * (L - 1 - j)).to(q.dtype)[None, :, :, None]  # (1, H, L, 1)
        chunk_decay = torch.exp(log_gamma * L).to(q.dtype)[None, :, None, None]  # gamma^L (1, H, 1, 1)
        state = chunk_decay * state + kc.transpose(-2, -1) @ (vc * zeta)  # (B, H, Dk, Dv)
    return torch.cat(outputs, dim=2), state


class MultiScaleRetention(nn.Module):
    """RetNet's mixer in a Block: x (B, T, C) -> (B, T, C), with its state in the cache's slot for this layer."""

    def __init__(self, config: Config, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.n_heads, self.key_dim, self.value_dim = config.n_heads, config.head_dim, 2 * config.head_dim
        H = self.n_heads
        self.q_proj = Linear(config.d_model, H * self.key_dim, bias=False)
        self.k_proj = Linear(config.d_model, H * self.key_dim, bias=False)
        self.v_proj = Linear(config.d_model, H * self.value_dim, bias=False)
        self.g_proj = Linear(config.d_model, H * self.value_dim, bias=False)
        self.group_norm = nn.GroupNorm(H, H * self.value_dim, eps=config.norm_eps)
        self.o_proj = Linear(H * self.value_dim, config.d_model, bias=False)
        self.chunk_size = CHUNK_SIZE
        # The decays (float64: 1 - 2^-12 must not round) and rotation speeds are constants of the config, made in
        # each forward (H and Dk/2 numbers): never in a checkpoint, never rounded by `.to(bfloat16)`.

    def forward(self, x: torch.Tensor, context: AttentionContext) -> torch.Tensor:
        B, T, _ = x.shape
        H = self.n_heads
        q = self.q_proj(x).view(B, T, H, self.key_dim).transpose(1, 2)  # (B, H, T, Dk)
        k = self.k_proj(x).view(B, T, H, self.key_dim).transpose(1, 2) * self.key_dim**-0.5
        v = self.v_proj(x).view(B, T, H, self.value_dim).transpose(1, 2)  # (B, H, T, Dv)
        rotary = self.key_dim - self.key_dim % 2  # an odd key size leaves its last channel unrotated
        inv_freq = rope_inverse_frequencies(rotary, ROTATION_THETA).to(x.device)
        cos, sin = rope_cos_sin(context.positions, inv_freq, x.dtype)  # (B or 1, 1, T, Dk rounded down to even)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if context.valid is not None:
            k = k * context.valid[:, None, :, None].to(k.dtype)  # padding adds nothing to the state
        states = context.cache.states if context.cache is not None else None
        state = states[self.layer_index] if states is not None else None
        log_gamma = head_decays(H).log().to(x.device)  # (H,) float64
        if T == 1 and states is not None:
            y, state = recurrent_retention(q, k, v, log_gamma, state)
        elif T <= self.chunk_size and states is None:
            y = parallel_retention(q, k, v, log_gamma)
        else:
            y, state = chunkwise_retention(q, k, v, log_gamma, state, self.chunk_size)
        if states is not None:
            states[self.layer_index] = state  # (B, H, Dk, Dv): constant in length
        y = y.transpose(1, 2).reshape(B * T, H * self.value_dim)  # (B*T, H*Dv)
        y = self.group_norm(y).view(B, T, H * self.value_dim)
        return self.o_proj(F.silu(self.g_proj(x)) * y)
