"""Planner from a Config alone (no weights): parameters, training and inference memory, FLOPs, Chinchilla tokens.

Training memory of one device: weights, gradients, optimizer states, activations, FSDP / DDP buffers. The peak is
weights + optimizer + buffers + the larger of activations and gradients: with zero_grad(set_to_none=True) no
gradient exists during the forward, and the backward frees activations as it fills gradients. Bytes per parameter
for weights + gradients + AdamW's two moments (m, v):

    fp32        4 + 4 + 8 = 16
    bf16-mixed  4 + 4 + 8 = 16, fp32 master weights under bf16 autocast (fp16-mixed: the same); autocast's bf16 copy
                of every matmul weight (2 bytes) is counted with the activations: the graph keeps it for the backward
    bf16        2 + 2 + 4 = 8 (torch keeps the Adam moments in the parameter dtype)
    adamw-8bit  Adam states of 1 byte per moment + one float32 scale per 2,048-value block (Dettmers et al. 2022);
                tensors under 4,096 values keep 32-bit states, as bitsandbytes does.
    adamw-4bit  half a byte per moment + one float32 scale per 128-value block (Li et al. 2023); small tensors as above.
    lomo        no state; the update runs inside backward, so only one parameter's gradient exists at a time
    adalomo     as lomo, plus Adafactor's factored second moment: rows + columns per matrix, a full one per vector
(llmkit/train/optimizers.py).

FSDP over N devices divides weights, gradients and optimizer states by N and adds the gathered weights of the root
(embedding, head) and of the blocks in flight; activations per device do not change (each device runs its own
micro-batch). DDP keeps full copies on every device and adds its gradient buckets (one more gradient copy).

Activations are derived from what autograd saves in llmkit's Decoder (see `activation_memory`); the test counts the
saved bytes with torch.autograd.graph.saved_tensors_hooks. Training FLOPs: 6 N D (Kaplan et al. 2020), optionally
plus the attention term 12 L H Q T per token (PaLM, Chowdhery et al. 2022, appendix B); compute-optimal data:
about 20 tokens per parameter (Chinchilla, Hoffmann et al. 2022).
"""

from __future__ import annotations

import functools
import operator
import re
from dataclasses import dataclass
from typing import Literal

from llmkit.config import GATED_MLPS, Config
from llmkit.errors import LlmkitError

Precision = Literal["fp32", "bf16-mixed", "bf16", "fp16-mixed"]
OptimizerName = Literal["adamw", "adamw-8bit", "adamw-4bit", "lomo", "adalomo"]
OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw-8bit", "adamw-4bit", "lomo", "adalomo")
FUSED_BACKWARD_OPTIMIZERS = ("lomo", "adalomo")  # update inside backward: no whole gradient, no accumulation
CHINCHILLA_TOKENS_PER_PARAMETER = 20
EIGHT_BIT_BLOCK = 2048  # values per quantization block of an 8-bit optimizer state (one float32 scale each)
FOUR_BIT_BLOCK = 128  # values per block of a 4-bit optimizer state
LOW_BIT_CHUNK = 2**20  # values a low-bit AdamW step dequantizes at once (llmkit.train.optimizers)
LOW_BIT_TEMPORARIES = 6  # float32 temporaries per value of that chunk: m, v, denominator, update, quantizer buffers
EIGHT_BIT_MIN_SIZE = 4096  # bitsandbytes keeps 32-bit states for tensors smaller than this (llmkit's low-bit AdamW too)
INT64, FLOAT32 = 8, 4

# Peak dense (no sparsity) bf16 tensor-core TFLOP/s, from the vendor datasheets:
# NVIDIA H100 Tensor Core GPU datasheet (SXM 989.4, PCIe 756); NVIDIA H200 datasheet (989, same compute as H100 SXM);
# NVIDIA A100 datasheet (312); NVIDIA L4 datasheet (121); NVIDIA Ada Lovelace architecture whitepaper, RTX 4090
# (165.2 with FP32 accumulate); NVIDIA V100 datasheet (125 FP16 tensor; V100 has no bf16).
GPU_PEAK_TFLOPS: dict[str, float] = {
    "H100-SXM": 989.0, "H100-PCIe": 756.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "RTX-4090": 165.0, "V100": 125.0,
}


@dataclass(frozen=True)
class PrecisionModel:
    """Element sizes (bytes) of one training precision."""

    weight: int  # stored parameters (and their gradients)
    weight_copy: int  # low-precision copy autocast makes of each matmul weight (kept for the backward)
    compute: int  # matmul outputs: q/k/v, attention output, MLP intermediates
    residual: int  # the residual stream between blocks
    adam_moment: int  # one Adam moment per parameter (torch keeps them in the parameter dtype)
    autocast: bool


PRECISIONS: dict[str, PrecisionModel] = {
    "fp32": PrecisionModel(weight=4, weight_copy=0, compute=4, residual=4, adam_moment=4, autocast=False),
    "bf16-mixed": PrecisionModel(weight=4, weight_copy=2, compute=2, residual=4, adam_moment=4, autocast=True),
    "fp16-mixed": PrecisionModel(weight=4, weight_copy=2, compute=2, residual=4, adam_moment=4, autocast=True),
    "bf16": PrecisionModel(weight=2, weight_copy=0, compute=2, residual=2, adam_moment=2, autocast=False),
}


@dataclass
class ActivationMemory:
    """Bytes autograd keeps between forward and backward for one micro-batch, and the transient peak on top."""

    per_block: int  # saved by one transformer block
    blocks: int  # all blocks: n_layers x per_block, or n_layers x the block input with checkpointing
    outside_blocks: int  # token ids, labels, position tables, final norm, head input, float32 log-softmax
    weight_copies: int  # autocast's low-precision matmul weights held by the graph (mixed precision only)
    saved: int  # blocks + outside_blocks + weight_copies: what saved_tensors_hooks sees
    transient: int  # extra at the peak: logits, the loss backward's float32 (B, T, V) buffers or a recomputed block
    peak: int  # saved + transient


@dataclass
class MemoryBreakdown:
    """Training memory of one device, in bytes."""

    weights: int  # stored parameters (fp32 master weights in mixed precision)
    gradients: int
    optimizer: int
    activations: int  # ActivationMemory.peak: what autograd keeps, plus the transient at the peak
    weight_copies: int  # part of activations: autocast's bf16/fp16 matmul weights that the graph keeps
    communication: int  # FSDP: gathered weights of the root and of two blocks; DDP: gradient buckets; else 0
    total: int  # the peak: weights + optimizer + communication + the larger of activations and gradients


@dataclass
class InferenceMemory:
    """Inference memory of one device, in bytes."""

    weights: int
    kv_cache: int
    workspace: int  # one layer's intermediates during a one-shot prefill, and the last-token logits
    total: int


@dataclass
class TrainingCompute:
    """FLOPs of a training run and its time on a device at a model FLOPs utilization (MFU)."""

    parameters: int
    tokens: float
    chinchilla_tokens: float  # compute-optimal tokens for this many parameters
    flops_per_token: float
    flops: float
    device: str
    peak_tflops: float  # per device
    mfu: float
    devices: int
    seconds: float


def count_parameters(config: Config) -> int:
    """Exact parameter count of `Decoder(config)`, from the shapes alone."""
    return config.n_layers * sum(block_tensor_sizes(config)) + sum(outside_tensor_sizes(config))


def kv_cache_bytes(config: Config, batch_size: int, n_tokens: int, bytes_per_value: float = 2) -> int:
    """Memory of the keys and values of every layer for `n_tokens` tokens of `batch_size` sequences."""
    return int(2 * config.n_layers * batch_size * n_tokens * config.kv_dim * bytes_per_value)


# --------------------------------------------------------------------------- parameters by tensor


def block_tensor_shapes(config: Config) -> list[tuple[int, ...]]:
    """Shape of each parameter tensor of one block (weights, biases, norm scales), as (out, in) for matrices."""
    d, f, q, kv = config.d_model, config.d_ff, config.q_dim, config.kv_dim
    norms = [(d,), (d,)] * (2 if config.norm == "layernorm" else 1)
    shapes = norms + [(q, d), (kv, d), (kv, d), (d, q)]
    if config.qkv_bias:
        shapes += [(q,), (kv,), (kv,)]
    if config.out_bias:
        shapes.append((d,))
    n_mlp_in = 2 if config.mlp in GATED_MLPS else 1
    mlp = [(f, d)] * n_mlp_in + [(d, f)]
    if config.mlp_bias:
        mlp += [(f,)] * n_mlp_in + [(d,)]
    if config.n_experts:  # mixture of experts: n_experts whole MLPs and the router's (n_experts, d) matrix
        mlp = mlp * config.n_experts + [(config.n_experts, d)]
    return shapes + mlp


def block_tensor_sizes(config: Config) -> list[int]:
    """Number of values in each parameter tensor of one block."""
    return [_numel(shape) for shape in block_tensor_shapes(config)]


def outside_tensor_shapes(config: Config) -> list[tuple[int, ...]]:
    """Parameter tensors outside the blocks: token embedding, its norm (BLOOM), learned positions, final norm,
    untied head."""
    d = config.d_model
    norm = [(d,)] * (2 if config.norm == "layernorm" else 1)
    shapes = [(config.vocab_size, d)] + norm * (2 if config.embed_norm else 1)
    if config.position == "learned":
        shapes.append((config.max_seq_len, d))
    if not config.tie_embeddings:
        shapes.append((config.vocab_size, d))
    return shapes


def outside_tensor_sizes(config: Config) -> list[int]:
    return [_numel(shape) for shape in outside_tensor_shapes(config)]


def _numel(shape: tuple[int, ...]) -> int:
    return functools.reduce(operator.mul, shape, 1)


def matmul_weights(config: Config) -> int:
    """Parameters used as matmul weights (what autocast copies to low precision): block linears and the LM head."""
    d, f, q, kv = config.d_model, config.d_ff, config.q_dim, config.kv_dim
    n_mlp_in = 2 if config.mlp in GATED_MLPS else 1
    return config.n_layers * (2 * d * q + 2 * d * kv + (n_mlp_in + 1) * d * f) + config.vocab_size * d


def optimizer_bytes(sizes: list[int], optimizer: OptimizerName, precision: Precision,
                    shapes: list[tuple[int, ...]] | None = None) -> float:
    """The optimizer's state for parameter tensors of `sizes` values each (AdaLomo's factored state needs their
    `shapes`)."""
    moment = _precision(precision).adam_moment
    if optimizer == "adamw":
        return 2 * moment * sum(sizes)
    if optimizer in ("adamw-8bit", "adamw-4bit"):
        block, code_bytes = (EIGHT_BIT_BLOCK, 1) if optimizer == "adamw-8bit" else (FOUR_BIT_BLOCK, 0.5)
        states = sum(2 * (code_bytes * size + FLOAT32 * -(-size // block)) if size >= EIGHT_BIT_MIN_SIZE else 8 * size
                     for size in sizes)
        return states + LOW_BIT_TEMPORARIES * FLOAT32 * min(max(sizes), LOW_BIT_CHUNK)  # one chunk in flight
    if optimizer == "lomo":
        return 0
    if optimizer == "adalomo":
        if shapes is None:
            raise LlmkitError("adalomo's state size needs the parameter shapes")
        factored = FLOAT32 * sum(shape[-2] + shape[-1] if len(shape) >= 2 else shape[0] for shape in shapes)
        return factored + FLOAT32 * max(sizes)  # plus the one update tensor in flight
    raise LlmkitError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")


# --------------------------------------------------------------------------- activations


def activation_memory(
    config: Config, batch_size: int, seq_len: int, precision: Precision = "fp32", activation_checkpointing: bool = False,
    loss_chunk: int = 0,
) -> ActivationMemory:
    """What autograd saves in one `causal_lm_loss` forward of llmkit's Decoder (fused SDPA kernel), per token:

    norm (RMSNorm)   float32 input, rstd, normed output, normed x weight (autocast: one low-precision copy per consumer
                     linear instead, since autocast casts a non-leaf input again for each linear)
    norm (LayerNorm) input, mean, rstd, output (autocast: one copy per consumer)
    attention        q and k after RoPE, v, the SDPA output and its float32 logsumexp (B, H, T); the output's memory
                     is (B, T, H, D), so the o_proj input is a view of it
    MLP              SwiGLU: gate, silu(gate), up, their product; GELU: up and gelu(up)
    outside blocks   token ids (B, T+1) int64, labels (B, T) int64, positions / rotary tables, final norm,
                     the head input and the float32 log-softmax of the logits (B, T, V) that cross-entropy keeps
    Residual additions and RoPE's multiplications by constant tables save nothing. Checkpointing keeps only each
    block's input and recomputes one block at a time during the backward. With `loss_chunk` (the fused LM head +
    cross-entropy, llmkit/train/chunked_loss.py) the head keeps the gradients it computed in the forward instead of
    the logits: the hidden states' (B, T, C) and the head weight's (V, C); one chunk's logits and softmax, and the
    float32 weight-gradient accumulator, exist only during the forward.
    """
    p = _precision(precision)
    _check_shape(config, batch_size, seq_len)
    tokens = batch_size * seq_len
    d, f, q, kv = config.d_model, config.d_ff, config.q_dim, config.kv_dim
    mlp_inputs = 2 if config.mlp in GATED_MLPS else 1
    block_per_token = (
        _norm_bytes(config, p, consumers=3)
        + p.compute * (2 * q + 2 * kv) + FLOAT32 * config.n_heads
        + _norm_bytes(config, p, consumers=mlp_inputs)
        + p.compute * f * (4 if config.mlp in GATED_MLPS else 2)
    )
    per_block = tokens * block_per_token
    if config.position == "rope":
        positions = 2 * seq_len * config.rope_dim * p.residual  # cos and sin (1, 1, T, D)
    elif config.position == "learned":
        positions = seq_len * INT64
    else:
        positions = batch_size * config.n_heads * seq_len * seq_len * p.residual  # the ALiBi bias (B, H, T, T)
    if loss_chunk:  # the final norm's own tensors (no linear saves its output), dL/dh, dL/dW
        norm_own = _norm_bytes(config, p, consumers=0) - (0 if p.autocast else p.residual * d)
        head = tokens * (norm_own + p.residual * d) + p.weight * config.vocab_size * d
    else:
        head = tokens * (_norm_bytes(config, p, consumers=1) + FLOAT32 * config.vocab_size)
    outside = batch_size * (seq_len + 1) * INT64 + tokens * INT64 + positions + head
    head_copy = 0 if loss_chunk else p.weight_copy * config.vocab_size * d  # the chunked head casts it unsaved
    block_copies = p.weight_copy * (matmul_weights(config) - config.vocab_size * d)
    if activation_checkpointing:
        blocks = config.n_layers * tokens * d * p.residual
        weight_copies = head_copy  # block weights are cast again inside the recomputation, not saved
    else:
        blocks = config.n_layers * per_block
        weight_copies = head_copy + block_copies
    saved = blocks + outside + weight_copies
    # The peak comes at one of three moments:
    # - the end of the forward: the logits and their float32 copy for the loss (fp32 logits need no copy) are still
    #   alive, and with checkpointing so are autocast's copies of the block weights (its cache lives until autocast exits);
    logits = tokens * config.vocab_size * (p.compute + (FLOAT32 if p.compute != FLOAT32 else 0))
    # - the start of the backward: the gradients of the log-softmax output and of its input, float32 (B, T, V) each;
    loss_backward = 2 * tokens * config.vocab_size * FLOAT32
    if loss_chunk:  # one chunk's logits and softmax, the float32 weight-gradient sum; the backward only scales
        logits = min(loss_chunk, tokens) * config.vocab_size * 2 * FLOAT32 + FLOAT32 * config.vocab_size * d
        loss_backward = tokens * d * p.residual + p.weight * config.vocab_size * d
    forward_end = logits + (block_copies if activation_checkpointing else 0)
    transient = max(forward_end, loss_backward)
    if activation_checkpointing:
        # - with checkpointing, recomputing the last block: the head's tensors are gone and its weight gradient exists;
        #   the block's tensors are back (its input was kept anyway) with the gradient flowing into it, and the MLP
        #   backward adds two (SwiGLU) or one (GELU) d_ff-wide gradients.
        mlp_gradients = tokens * p.compute * f * (2 if config.mlp in GATED_MLPS else 1)
        head_gradient = p.weight * config.vocab_size * d
        transient = max(transient, per_block + mlp_gradients + head_gradient - head)
    return ActivationMemory(per_block=per_block, blocks=blocks, outside_blocks=outside, weight_copies=weight_copies,
                            saved=saved, transient=transient, peak=saved + transient)


def _norm_bytes(config: Config, p: PrecisionModel, consumers: int) -> int:
    """Bytes per token a norm and the linears reading its output save (see `activation_memory`)."""
    d = config.d_model
    output = consumers * p.compute * d if p.autocast else p.residual * d
    if config.norm == "rmsnorm":
        # F.rms_norm runs on x.float(): it keeps that float32 input and rstd; `normed * weight` keeps normed.
        return FLOAT32 * d + FLOAT32 + p.residual * d + output
    return p.residual * d + 2 * FLOAT32 + output  # layer_norm keeps input, mean and rstd


# --------------------------------------------------------------------------- training and inference memory


def training_memory(
    config: Config,
    batch_size: int,
    seq_len: int,
    precision: Precision = "bf16-mixed",
    optimizer: OptimizerName = "adamw",
    activation_checkpointing: bool = False,
    devices: int = 1,
    fsdp: bool = False,
    loss_chunk: int = 0,
) -> MemoryBreakdown:
    """Peak memory of one device for training with `batch_size` sequences of `seq_len` tokens per device.
    With FSDP (llmkit.train.distributed: FSDP2 over each block, then the root) mixed precision casts the weights at
    the all-gather instead of autocast, so the blocks compute in bf16 from a bf16 residual stream."""
    p = _precision(precision)
    if devices < 1:
        raise LlmkitError(f"devices={devices} must be at least 1")
    sharded = fsdp and devices > 1
    shards = devices if sharded else 1
    block_sizes, outside_sizes = block_tensor_sizes(config), outside_tensor_sizes(config)
    parameters = count_parameters(config)
    compute_precision = "bf16" if sharded and p.autocast else precision
    activations = activation_memory(config, batch_size, seq_len, compute_precision, activation_checkpointing,
                                    loss_chunk)
    weights = _ceil(p.weight * parameters / shards)
    # LOMO/AdaLomo update each tensor as soon as its gradient is whole and free it: one gradient at a time
    gradients = _ceil(p.weight * (max(block_sizes + outside_sizes) if optimizer in FUSED_BACKWARD_OPTIMIZERS
                                  else parameters) / shards)
    shapes = block_tensor_shapes(config) * config.n_layers + outside_tensor_shapes(config)
    optimizer_states = _ceil(optimizer_bytes(block_sizes * config.n_layers + outside_sizes, optimizer, precision,
                                             shapes) / shards)
    gather = p.weight_copy or p.weight  # FSDP gathers weights in the compute dtype
    if sharded:
        # The root (embedding, final norm, head) stays gathered through the step; two blocks are gathered at once
        # (the running one and the prefetched next), and one block's gradients are unsharded before reduce-scatter.
        communication = gather * (sum(outside_sizes) + 3 * sum(block_sizes))
    elif devices > 1:
        communication = p.weight * parameters  # DDP's gradient buckets: a flat copy of every gradient
    else:
        communication = 0
    # Gradients fill up while the backward frees activations; with set_to_none=True none exist during the forward.
    # So the peak is one of the two ends of the backward, whichever is larger.
    total = weights + optimizer_states + communication + max(activations.peak, gradients)
    return MemoryBreakdown(weights=weights, gradients=gradients, optimizer=optimizer_states,
                           activations=activations.peak, weight_copies=activations.weight_copies,
                           communication=communication, total=total)


def inference_memory(
    config: Config, batch_size: int, context: int, weight_bytes: float = 2, kv_bytes: float = 2
) -> InferenceMemory:
    """Weights, a KV cache of `context` tokens per sequence and the prefill's largest transient (one layer at a time:
    residual, normed input, three d_ff-wide MLP tensors), plus the float32 logits of the last token."""
    _check_shape(config, batch_size, context)
    weights = _ceil(weight_bytes * count_parameters(config))
    kv = kv_cache_bytes(config, batch_size, context, kv_bytes)
    workspace = _ceil(batch_size * context * (2 * config.d_model + 3 * config.d_ff) * weight_bytes)
    workspace += batch_size * config.vocab_size * FLOAT32
    return InferenceMemory(weights=weights, kv_cache=kv, workspace=workspace, total=weights + kv + workspace)


# --------------------------------------------------------------------------- FLOPs, Chinchilla, time


def flops_per_token(config: Config, seq_len: int, attention: bool = False) -> float:
    """Training FLOPs per token: 6 N (forward 2 N + backward 4 N, N = all parameters), plus with `attention` the
    PaLM term 12 L H Q T for the score and value matmuls (counted over the full T x T, as PaLM does)."""
    flops = 6.0 * count_parameters(config)
    if attention:
        flops += 12.0 * config.n_layers * config.n_heads * config.head_dim * seq_len
    return flops


def chinchilla_tokens(parameters: int) -> float:
    """Compute-optimal training tokens for a model of `parameters`: about 20 per parameter (Hoffmann et al. 2022)."""
    return float(CHINCHILLA_TOKENS_PER_PARAMETER * parameters)


def peak_tflops(device: str, tflops: float | None = None) -> tuple[str, float]:
    """(name, peak dense bf16 TFLOP/s) of a GPU from GPU_PEAK_TFLOPS, or of any device (a CPU) given `tflops`."""
    if tflops is not None:
        if tflops <= 0:
            raise LlmkitError(f"tflops={tflops} must be positive (the device's measured peak matmul TFLOP/s)")
        return device, float(tflops)
    wanted = _gpu_key(device)
    for name, value in GPU_PEAK_TFLOPS.items():
        if _gpu_key(name) == wanted:
            return name, value
    if wanted == "cpu":
        raise LlmkitError("a CPU has no datasheet figure here: pass --tflops with its measured matmul TFLOP/s "
                          "(e.g. 0.17 for fp32 on 2 cores)")
    raise LlmkitError(f"unknown GPU {device!r}; known GPUs: {', '.join(GPU_PEAK_TFLOPS)} (or pass --tflops for another "
                      "device, a CPU included)")


def training_compute(
    config: Config,
    tokens: float | None = None,
    seq_len: int | None = None,
    device: str = "H100-SXM",
    mfu: float = 0.4,
    devices: int = 1,
    tflops: float | None = None,
    attention: bool = False,
) -> TrainingCompute:
    """FLOPs for `tokens` (default: Chinchilla's 20 per parameter) and the wall time on `devices` x `device` at `mfu`."""
    if not 0 < mfu <= 1:
        raise LlmkitError(f"mfu={mfu} must be in (0, 1]: the fraction of peak FLOP/s the run achieves (0.3-0.5 is typical)")
    if devices < 1:
        raise LlmkitError(f"devices={devices} must be at least 1")
    if tokens is not None and tokens <= 0:
        raise LlmkitError(f"tokens={tokens} must be positive")
    name, peak = peak_tflops(device, tflops)
    parameters = count_parameters(config)
    optimal = chinchilla_tokens(parameters)
    tokens = optimal if tokens is None else float(tokens)
    per_token = flops_per_token(config, seq_len or config.max_seq_len, attention)
    flops = per_token * tokens
    seconds = flops / (devices * peak * 1e12 * mfu)
    return TrainingCompute(parameters=parameters, tokens=tokens, chinchilla_tokens=optimal, flops_per_token=per_token,
                           flops=flops, device=name, peak_tflops=peak, mfu=mfu, devices=devices, seconds=seconds)


# --------------------------------------------------------------------------- helpers


def _precision(precision: str) -> PrecisionModel:
    if precision not in PRECISIONS:
        raise LlmkitError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def _check_shape(config: Config, batch_size: int, seq_len: int) -> None:
    if batch_size < 1 or seq_len < 1:
        raise LlmkitError(f"batch size {batch_size} and sequence length {seq_len} must both be at least 1")
    if seq_len > config.max_seq_len:
        raise LlmkitError(f"sequence length {seq_len} exceeds {config.name}'s context window of {config.max_seq_len} "
                          "tokens; pass a shorter --seq_len")


def _gpu_key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _ceil(value: float) -> int:
    return int(-(-value // 1))
