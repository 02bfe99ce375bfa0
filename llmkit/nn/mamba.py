"""Mamba's selective state-space mixer (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State
Spaces"), in pure PyTorch: it trains and decodes on a CPU; on CUDA `mamba_ssm`'s fused scan is used when installed.

    (x, z) = in_proj(u)                           x, z: (B, T, E), E = ssm_expand * d_model
    x = SiLU(causal depthwise conv_K(x))
    (dt, B_t, C_t) = x_proj(x);  dt = softplus(dt_proj(dt) + dt_bias)   input-dependent: the "selective" part
    A = -exp(A_log)                                (E, N), fixed per channel and state
    h_t = exp(dt_t A) .* h_{t-1} + (dt_t B_t) x_t  (E, N) per token: zero-order-hold discretisation of h' = A h + B x
    y_t = C_t h_t + D .* x_t
    out = o_proj(y .* SiLU(z))

Training runs the recurrence as a chunked parallel scan: sequential over chunks of `SCAN_CHUNK` tokens, and inside a
chunk a Hillis-Steele doubling scan over the pairs (a_t, b_t) = (exp(dt_t A), dt_t B_t x_t) with the associative
combine (a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2): log2(chunk) vectorised steps instead of chunk sequential ones, and
only products of decays <= 1 (no exp of positive sums, so no overflow). Decoding runs one step of the recurrence per
token. Its state is (conv state (B, E, K-1): the last K-1 conv inputs, ssm state (B, E, N)), constant in length.
Left padding: a padded token's conv input and dt are zeroed, so it leaves both states as they were.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.config import Config
from llmkit.nn.attention import AttentionContext
from llmkit.nn.linear import Linear

SCAN_CHUNK = 32  # tokens per chunk of the parallel scan
DT_MIN, DT_MAX = 1e-3, 1e-1  # dt starts log-uniform in this range (the paper's init)


def doubling_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """h_t = a_t h_{t-1} + b_t with h_{-1} = 0, for every t, in log2(T) steps. a, b (B, T, ...) -> h (B, T, ...)."""
    T = a.shape[1]
    step = 1
    while step < T:
        b = torch.cat([b[:, :step], b[:, step:] + a[:, step:] * b[:, :-step]], dim=1)
        a = torch.cat([a[:, :step], a[:, step:] * a[:, :-step]], dim=1)
        step *= 2
    return b


def selective_scan(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor,
    state: torch.Tensor | None = None, chunk: int = SCAN_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The selective SSM over a sequence, chunked. x, dt (B, T, E); A (E, N); B, C (B, T, N); D (E,); state (B, E, N)
    before the first token (zeros when None). Returns y (B, T, E) and the state after the last token (B, E, N)."""
    batch, T, E = x.shape
    if state is None:
        state = x.new_zeros(batch, E, A.shape[1])
    outputs = []
    for start in range(0, T, chunk):
        end = min(start + chunk, T)
        dtc = dt[:, start:end, :, None]  # (B, L, E, 1)
        decay = torch.exp(dtc * A)  # (B, L, E, N)
        inputs = dtc * B[:, start:end, None, :] * x[:, start:end, :, None]  # (B, L, E, N)
        inputs = torch.cat([inputs[:, :1] + decay[:, :1] * state[:, None], inputs[:, 1:]], dim=1)  # carry the state in
        h = doubling_scan(decay, inputs)  # (B, L, E, N)
        outputs.append((h * C[:, start:end, None, :]).sum(-1))  # (B, L, E)
        state = h[:, -1]
    return torch.cat(outputs, dim=1) + x * D, state


def recurrent_scan(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same as `selective_scan`, one token at a time (the decoding form)."""
    if state is None:
        state = x.new_zeros(x.shape[0], x.shape[2], A.shape[1])
    outputs = []
    for t in range(x.shape[1]):
        dtt = dt[:, t, :, None]  # (B, E, 1)
        state = torch.exp(dtt * A) * state + dtt * B[:, t, None, :] * x[:, t, :, None]  # (B, E, N)
        outputs.append((state * C[:, t, None, :]).sum(-1) + x[:, t] * D)  # (B, E)
    return torch.stack(outputs, dim=1), state


def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, history: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv over time. x (B, T, E); weight (E, 1, K); history (B, E, K-1): the inputs before x
    (zeros when None). Returns the conv output (B, T, E) and the last K-1 inputs (B, E, K-1), the next history."""
    K = weight.shape[-1]
    xt = x.transpose(1, 2)  # (B, E, T)
    if history is None:
        history = xt.new_zeros(xt.shape[0], xt.shape[1], K - 1)
    padded = torch.cat([history, xt], dim=-1)  # (B, E, K-1+T)
    y = F.conv1d(padded, weight, bias, groups=xt.shape[1])  # (B, E, T)
    return y.transpose(1, 2), padded[:, :, padded.shape[-1] - (K - 1) :]


def fused_scan_available(x: torch.Tensor) -> bool:
    """Whether `mamba_ssm`'s CUDA selective scan can run on x (a CUDA tensor, the package importable)."""
    if not x.is_cuda:
        return False
    try:
        import mamba_ssm.ops.selective_scan_interface  # noqa: F401
    except ImportError:
        return False
    return True


class Mamba(nn.Module):
    """Mamba's mixer in a Block: u (B, T, C) -> (B, T, C); with a cache its (conv, ssm) states sit in this layer's
    slot."""

    def __init__(self, config: Config, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        E, N = config.ssm_expand * config.d_model, config.ssm_state_dim
        self.inner_dim, self.state_dim = E, N
        self.dt_rank = math.ceil(config.d_model / 16)
        self.in_proj = Linear(config.d_model, 2 * E, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(E, 1, config.short_conv_kernel))  # depthwise (E, 1, K)
        self.conv_bias = nn.Parameter(torch.zeros(E))
        self.x_proj = Linear(E, self.dt_rank + 2 * N, bias=False)
        self.dt_proj = Linear(self.dt_rank, E, bias=False)
        self.dt_bias = nn.Parameter(torch.empty(E))  # apart from dt_proj so the decoder's linear init leaves it be
        self.A_log = nn.Parameter(torch.empty(E, N))
        self.D = nn.Parameter(torch.empty(E))
        self.o_proj = Linear(E, config.d_model, bias=False)
        self.reset_mixer_parameters()

    def reset_mixer_parameters(self) -> None:
        """The paper's init: A = -(1..N) per channel (S4D-real), D = 1, dt log-uniform in [DT_MIN, DT_MAX] (dt_bias
        its inverse softplus), the conv like torch's default."""
        with torch.no_grad():
            self.A_log.copy_(torch.log(torch.arange(1, self.state_dim + 1, dtype=torch.float32)).expand_as(self.A_log))
            self.D.fill_(1.0)
            dt = torch.exp(torch.rand(self.inner_dim) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN))
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
            bound = 1 / math.sqrt(self.conv_weight.shape[-1])
            self.conv_weight.uniform_(-bound, bound)

    def forward(self, u: torch.Tensor, context: AttentionContext) -> torch.Tensor:
        E, N, R = self.inner_dim, self.state_dim, self.dt_rank
        x, z = self.in_proj(u).split([E, E], dim=-1)  # (B, T, E) each
        if context.valid is not None:
            x = x * context.valid[..., None].to(x.dtype)  # padding: a zero conv input, as before the first token
        states = context.cache.states if context.cache is not None else None
        conv_state, ssm_state = (states[self.layer_index] or (None, None)) if states is not None else (None, None)
        x, conv_state = causal_conv(x, self.conv_weight, self.conv_bias, conv_state)
        x = F.silu(x)  # (B, T, E)
        dt, B, C = self.x_proj(x).split([R, N, N], dim=-1)  # (B, T, R), (B, T, N), (B, T, N)
        dt = F.softplus(self.dt_proj(dt) + self.dt_bias)  # (B, T, E)
        if context.valid is not None:
            dt = dt * context.valid[..., None].to(dt.dtype)  # dt = 0: the state passes a padded token unchanged
        A = -torch.exp(self.A_log.float())  # (E, N)
        if x.shape[1] == 1 and states is not None:
            y, ssm_state = recurrent_scan(x, dt, A, B, C, self.D, ssm_state)
        elif states is None and fused_scan_available(x):
            y = self._fused_scan(x, dt, A, B, C)
        else:
            y, ssm_state = selective_scan(x, dt, A, B, C, self.D, ssm_state)
        if states is not None:
            states[self.layer_index] = (conv_state, ssm_state)  # (B, E, K-1), (B, E, N): constant in length
        return self.o_proj(y * F.silu(z))

    def _fused_scan(self, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
                    ) -> torch.Tensor:
        """`mamba_ssm`'s CUDA kernel (same math; its layout is channels first)."""
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        y = selective_scan_fn(x.transpose(1, 2).contiguous(), dt.transpose(1, 2).contiguous(), A,
                              B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(), self.D.float())
        return y.transpose(1, 2)  # (B, T, E)
