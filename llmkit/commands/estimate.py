"""`llmkit estimate`: parameters, training and inference memory, FLOPs and time for a model, from its config alone;
with --measure, a few real training steps report the measured peak memory and speed beside the estimate."""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llmkit.config import Config
from llmkit.errors import LlmkitError
from llmkit.estimate import (
    FUSED_BACKWARD_OPTIMIZERS,
    OptimizerName,
    Precision,
    count_parameters,
    inference_memory,
    training_compute,
    training_memory,
)
from llmkit.memory import PROC_CLEAR_REFS, PROC_STATUS, proc_status_kib, reset_peak_rss

M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
TENSOR_MMAP_THRESHOLD = 128 * 2**10  # glibc's initial threshold, kept fixed while the peak is measured
GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20  # the ceiling glibc's dynamic threshold reaches on 64-bit systems
MiB = 2**20
PROC_MEMINFO = "/proc/meminfo"
MEASURE_MARGIN = 1.25  # --measure needs the estimated peak plus this share: the estimate is within about 20%
MEASURE_PROCESS_BYTES = 1024 * MiB  # on CPU the measuring process also holds torch itself (libraries, thread pools)


@dataclass
class Measurement:
    """Peak memory and speed of a few real training steps."""

    device: str
    peak_bytes: int | None  # None when it could not be measured (see `method`)
    method: str  # how the peak was read
    step_seconds: float  # median over the timed steps after the first (which also allocates the optimizer states)
    tokens_per_second: float


def estimate(
    model: str = "gpt2",
    batch_size: int = 8,
    seq_len: int | None = None,
    precision: Literal["fp32", "bf16-mixed", "bf16", "fp16-mixed"] = "bf16-mixed",
    optimizer: Literal["adamw", "adamw-8bit", "adamw-4bit", "lomo", "adalomo"] = "adamw",
    activation_checkpointing: bool = False,
    loss_chunk: int = 0,
    devices: int = 1,
    fsdp: bool = False,
    tokens: float | None = None,
    gpu: str = "H100-SXM",
    tflops: float | None = None,
    mfu: float = 0.4,
    context: int | None = None,
    measure: bool = False,
    steps: int = 3,
    device: str = "auto",
) -> None:
    """Plan a training run: parameters, memory per device, FLOPs, Chinchilla tokens and time on a GPU at an MFU.

    Example: llmkit estimate                                       (GPT-2, batch 8 x 1,024 tokens, bf16 mixed, H100)
             llmkit estimate --model smollm2-135m --measure --precision fp32 --batch_size 4 --seq_len 256
             llmkit estimate --model mistral-7b --fsdp true --devices 8 --activation_checkpointing true --gpu A100
             llmkit estimate --model my_model/ --gpu cpu --tflops 0.17 --tokens 1e8

    Memory follows llmkit's training loop: bf16-mixed keeps fp32 weights, gradients and Adam states (16 bytes per
    parameter); activations are what autograd saves in the Decoder, autocast's bf16 weight copies included. The
    peak counts the larger of activations and gradients. FLOPs are 6 N D (and PaLM's 6 N + 12 L H Q T per token);
    Chinchilla's compute-optimal data is 20 tokens per parameter. --measure runs real steps (AdamW, causal LM loss
    on random tokens) in a fresh process and prints the measured peak (CUDA: max_memory_allocated; CPU: growth of
    the peak RSS) and tokens/s beside the estimate.

    Args:
        model: a preset name (see llmkit.presets), a .gguf file, a Hugging Face directory or an llmkit directory
            (only the config is read).
        batch_size: sequences per device per step (the micro-batch).
        seq_len: tokens per sequence (default: the model's context window).
        precision: fp32; bf16-mixed / fp16-mixed (fp32 weights, autocast compute); bf16 (weights and states in bf16).
        optimizer: adamw; adamw-8bit or adamw-4bit (1 byte or half a byte per Adam moment, block-wise quantized);
            lomo (no state; one parameter's gradient at a time) or adalomo (lomo + factored second moments).
        activation_checkpointing: recompute each block in the backward instead of keeping its activations.
        loss_chunk: tokens per chunk of the fused LM head + cross-entropy (--train.loss_chunk; 0: the plain head).
        devices: number of GPUs (per-device memory; FLOPs are shared among them).
        fsdp: shard weights, gradients and optimizer states over the devices (FSDP / ZeRO-3).
        tokens: training tokens (default: Chinchilla's 20 per parameter).
        gpu: GPU for the time estimate: one of llmkit.estimate.GPU_PEAK_TFLOPS, or any name with --tflops.
        tflops: peak TFLOP/s of the device, overriding the datasheet figure (use it for a CPU).
        mfu: model FLOPs utilization, the fraction of peak the run achieves, in (0, 1].
        context: tokens per sequence for the inference KV cache (default: the model's context window).
        measure: run `steps` real training steps on `device` and print the measured peak memory and speed.
        steps: training steps for --measure.
        device: for --measure: auto, cpu, cuda or cuda:N.
    """
    config = load_config(model)
    for flag, value in (("--seq_len", seq_len), ("--context", context)):
        if value is not None and value < 1:
            raise LlmkitError(f"{flag} {value} must be at least 1 token; leave it out for the model's context window "
                              f"({config.max_seq_len:,})")
    seq_len = seq_len or config.max_seq_len
    context = context or config.max_seq_len
    if measure and fsdp:
        raise LlmkitError("--measure runs on one device; drop --fsdp to measure (the per-device estimate still covers it)")
    if optimizer in FUSED_BACKWARD_OPTIMIZERS and precision == "fp16-mixed":
        raise LlmkitError(f"--optimizer {optimizer} cannot unscale fp16 gradients before its fused update; use "
                          "--precision bf16-mixed or fp32")
    if steps < 1:
        raise LlmkitError(f"steps={steps} must be at least 1")
    if loss_chunk < 0:
        raise LlmkitError(f"--loss_chunk {loss_chunk} must be 0 (the plain LM head) or a number of tokens per chunk")
    memory = training_memory(config, batch_size, seq_len, precision, optimizer, activation_checkpointing, devices, fsdp,
                             loss_chunk)
    serving_dtype = {"fp32": "fp32", "fp16-mixed": "fp16"}.get(precision, "bf16")
    serving_bytes = 4 if serving_dtype == "fp32" else 2
    serving = inference_memory(config, batch_size, context, weight_bytes=serving_bytes, kv_bytes=serving_bytes)
    compute = training_compute(config, tokens, seq_len, gpu, mfu, devices, tflops)
    with_attention = training_compute(config, tokens, seq_len, gpu, mfu, devices, tflops, attention=True)

    options = [precision, optimizer] + (["activation checkpointing"] if activation_checkpointing else [])
    options += [f"LM head + loss in chunks of {loss_chunk} tokens"] if loss_chunk else []
    if devices > 1:
        options.append(f"{'FSDP' if fsdp else 'DDP'} over {devices} devices")
    rows = [("weights", memory.weights), ("gradients", memory.gradients), ("optimizer", memory.optimizer),
            ("activations", memory.activations)]
    if memory.weight_copies:
        rows.append((f"  of which {serving_dtype} weight copies", memory.weight_copies))
    if devices > 1:
        rows.append(("FSDP all-gather" if fsdp else "DDP buckets", memory.communication))
    lines = [f"model {config.name}: {count_parameters(config):,} parameters", "",
             f"training memory per device (batch {batch_size} x {seq_len:,} tokens, {', '.join(options)})"]
    lines += [f"  {label:<30} {_mib(value)}" for label, value in rows]
    lines += [f"  {'peak':<30} {_mib(memory.total)}  (the larger of activations and gradients: the backward frees one "
              "as it fills the other)", "",
              f"inference memory (batch {batch_size} x {context:,} tokens, weights and KV cache {serving_dtype})"]
    lines += [f"  {label:<30} {_mib(value)}" for label, value in (
        ("weights", serving.weights), ("KV cache", serving.kv_cache), ("prefill workspace", serving.workspace),
        ("total", serving.total))]
    lines += [
        "", "compute",
        f"  {'tokens':<30} {compute.tokens:12.3g}" + ("  (Chinchilla: 20 per parameter)" if tokens is None else ""),
        f"  {'Chinchilla tokens':<30} {compute.chinchilla_tokens:12.3g}",
        f"  {'FLOPs 6ND':<30} {compute.flops:12.3g}",
        f"  {'FLOPs 6ND + attention':<30} {with_attention.flops:12.3g}  (PaLM: 12 L H Q T per token at T={seq_len:,})",
        f"  {'time':<30} {_duration(compute.seconds):>16} on {devices} x {compute.device} "
        f"({compute.peak_tflops:g} TFLOP/s peak) at {mfu:.0%} MFU",
    ]
    print("\n".join(lines), flush=True)
    if measure:
        single = training_memory(config, batch_size, seq_len, precision, optimizer, activation_checkpointing,
                                 loss_chunk=loss_chunk)
        check_memory_for_measuring(single.total, device)
        result = measure_training(config, batch_size, seq_len, precision, activation_checkpointing, steps, device,
                                  optimizer, loss_chunk)
        print(format_measurement(result, memory.total))


def available_memory(device: str) -> tuple[int, str] | None:
    """Bytes free for a new process on `device` and where that figure comes from: torch.cuda.mem_get_info on a GPU,
    MemAvailable of /proc/meminfo on a Linux CPU; None where neither can be read."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free, "free GPU memory (torch.cuda.mem_get_info)"
    try:
        with open(PROC_MEMINFO) as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, f"MemAvailable in {PROC_MEMINFO}"
    except OSError:
        return None
    return None


def check_memory_for_measuring(estimated_peak: int, device: str) -> None:
    """Refuse --measure when the estimated peak (with a margin) does not fit the memory free on the device: running
    out of memory kills the measuring process (or the machine's other work) instead of giving a figure."""
    from llmkit.device import resolve_device

    resolved = str(resolve_device(device))
    available = available_memory(resolved)
    if available is None:
        return
    free, source = available
    needed = estimated_peak * MEASURE_MARGIN + (0 if resolved.startswith("cuda") else MEASURE_PROCESS_BYTES)
    if needed > free:
        raise LlmkitError(
            f"--measure needs about {needed / MiB:,.0f} MiB on {resolved} (estimated peak {estimated_peak / MiB:,.0f} MiB "
            f"+ {MEASURE_MARGIN - 1:.0%}" + ("" if resolved.startswith("cuda") else " + 1 GiB for torch")
            + f") but only {free / MiB:,.0f} MiB is available ({source}): pass a smaller --batch_size or --seq_len, "
            "--activation_checkpointing true or --precision bf16, or leave out --measure (the estimate above stands)"
        )


def format_measurement(result: Measurement, estimated_total: int) -> str:
    """The measured peak beside the estimate, and the measured speed."""
    lines = [f"measured on {result.device} ({result.method})"]
    if result.peak_bytes is None:
        lines.append(f"  {'peak memory':<30} not measured  (estimate {_mib(estimated_total).strip()})")
    else:
        off = (estimated_total - result.peak_bytes) / result.peak_bytes
        lines.append(f"  {'peak memory':<30} {_mib(result.peak_bytes)}  (estimate {_mib(estimated_total).strip()}, "
                     f"{off:+.0%})")
    lines += [f"  {'step time':<30} {result.step_seconds:12.3f} s", f"  {'tokens/s':<30} {result.tokens_per_second:12,.0f}"]
    return "\n".join(lines)


def load_config(model: str) -> Config:
    """The Config of a preset name or of a checkpoint path (config only: no weights are read)."""
    from llmkit.presets import PRESETS

    if model in PRESETS:
        return Config.from_name(model)
    path = Path(model)
    if not path.exists():
        raise LlmkitError(f"{model!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor an existing path; "
                          "pass a preset name, a .gguf file or a model directory")
    from llmkit.checkpoints import load_config as load_checkpoint_config

    return load_checkpoint_config(path)


# --------------------------------------------------------------------------- measurement


def measure_training(
    config: Config,
    batch_size: int,
    seq_len: int,
    precision: Precision = "fp32",
    activation_checkpointing: bool = False,
    steps: int = 3,
    device: str = "auto",
    optimizer: OptimizerName = "adamw",
    loss_chunk: int = 0,
) -> Measurement:
    """Peak memory and speed of real training steps, run in a fresh (spawned) process so that this process's
    allocations do not count: a warm-up step, `steps` steps (two at least) for the peak, then on CPU `steps` + 1
    more for the time (see `_measure_in_this_process`)."""
    from llmkit.device import resolve_device

    resolved = str(resolve_device(device))
    arguments = (config.to_dict(), batch_size, seq_len, precision, activation_checkpointing, steps, resolved, optimizer,
                 loss_chunk)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return Measurement(**pool.apply(_measure_in_this_process, arguments))


def _measure_in_this_process(
    config_fields: dict[str, Any],
    batch_size: int,
    seq_len: int,
    precision: Precision,
    activation_checkpointing: bool,
    steps: int,
    device_name: str,
    optimizer: OptimizerName,
    loss_chunk: int = 0,
) -> dict[str, Any]:
    """Training steps as llmkit's loop runs them; the peak counts everything allocated from the model on."""
    import torch

    device = torch.device(device_name)
    config = Config.from_dict(config_fields)
    cuda = device.type == "cuda"
    readable = cuda or (os.path.exists(PROC_STATUS) and os.access(PROC_CLEAR_REFS, os.W_OK))
    libc = _glibc() if readable and not cuda else None
    if libc is not None:
        # glibc's threshold for giving a block its own mapping grows with the blocks freed (up to 32 MiB), so freed
        # tensors stay in the heap where fragmentation inflates the RSS by 30-60% on these loops. A fixed threshold
        # maps and unmaps each tensor, so the peak RSS follows the live tensors (as max_memory_allocated does on CUDA).
        libc.mallopt(M_MMAP_THRESHOLD, TENSOR_MMAP_THRESHOLD)
    # A warm-up step of the same shapes loads the kernels' code, starts the thread pools and fills the caches made once
    # per shape (oneDNN's compiled bf16 kernels: about 8 MB on CPU; cuBLAS workspaces), so the peak counts training.
    _train(config, batch_size, seq_len, precision, activation_checkpointing, 1, device, optimizer, loss_chunk)
    gc.collect()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        method = "torch.cuda.max_memory_allocated"
    elif readable:
        if libc is not None:
            libc.malloc_trim(0)
        baseline = proc_status_kib("VmRSS") * 1024
        reset_peak_rss()
        method = "growth of the peak RSS (VmHWM) over the RSS before the model was built"
        if libc is None:
            method += "; not glibc: memory the allocator keeps after frees counts too"
    else:
        baseline = 0
        method = "/proc is unavailable here, so the CPU peak memory could not be read"

    # Two steps at least: the first step's backward runs before its optimizer.step() creates the Adam states.
    seconds = _train(config, batch_size, seq_len, precision, activation_checkpointing, max(steps, 2), device,
                     optimizer, loss_chunk)
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) - baseline
    elif readable:
        peak = proc_status_kib("VmHWM") * 1024 - baseline
    else:
        peak = None
    if libc is not None:
        # Time further steps with the allocator as glibc settles by itself (blocks under 32 MiB reused from the heap):
        # mapping every tensor afresh costs page faults the usual run does not pay.
        libc.mallopt(M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD_MAX)
        seconds = _train(config, batch_size, seq_len, precision, activation_checkpointing, steps + 1, device,
                         optimizer, loss_chunk)
    step_seconds = statistics.median(seconds[1:] or seconds)
    return dict(device=str(device), peak_bytes=peak, method=method, step_seconds=step_seconds,
                tokens_per_second=batch_size * seq_len / step_seconds)


def _train(
    config: Config,
    batch_size: int,
    seq_len: int,
    precision: Precision,
    activation_checkpointing: bool,
    steps: int,
    device: Any,  # torch.device (torch is imported lazily)
    optimizer_name: OptimizerName = "adamw",
    loss_chunk: int = 0,
) -> list[float]:
    """Build a Decoder and the optimizer and run `steps` steps on random tokens; returns each step's seconds (LOMO
    and AdaLomo update inside backward: their step() has nothing left to do)."""
    import torch

    from llmkit.models.decoder import Decoder
    from llmkit.train.objectives import causal_lm_batch, causal_lm_objective
    from llmkit.train.optim import build_optimizer
    from llmkit.train.precision import autocast, grad_scaler
    from llmkit.train.recompute import enable_activation_checkpointing

    torch.manual_seed(0)
    with device:
        model = Decoder(config)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    optimizer = build_optimizer(model, lr=1e-4, optimizer=optimizer_name)
    mixed = "fp32" if precision == "bf16" else precision  # pure bf16 runs without autocast
    scaler = grad_scaler(mixed, device)
    tokens = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1), device=device)  # (B, T+1)
    objective = causal_lm_objective(loss_chunk)
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        with autocast(mixed, device):
            loss = objective(model, causal_lm_batch(tokens)).mean()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def _glibc() -> Any:
    """glibc's C library (for mallopt / malloc_trim), or None on another C library."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def _mib(value: float) -> str:
    return f"{value / MiB:12,.1f} MiB"


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{seconds / size:,.1f} {unit}"
    return f"{seconds:.1f} s"
