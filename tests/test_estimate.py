"""The planner: bytes per parameter, FSDP sharding, FLOPs and Chinchilla arithmetic; the activation model against the
bytes autograd really saves; the whole estimate against the measured peak of real training steps; the CLI verb."""

import json

import pytest
import torch

from llmkit.checkpoints import default_model_path
from llmkit.commands.estimate import _measure_in_this_process, estimate, format_measurement, load_config, measure_training
from llmkit.config import Config
from llmkit.errors import LlmkitError
from llmkit.estimate import (
    GPU_PEAK_TFLOPS,
    LOW_BIT_CHUNK,
    LOW_BIT_TEMPORARIES,
    activation_memory,
    chinchilla_tokens,
    count_parameters,
    flops_per_token,
    inference_memory,
    kv_cache_bytes,
    matmul_weights,
    peak_tflops,
    training_compute,
    training_memory,
)
from llmkit.models.decoder import Decoder
from llmkit.train.objectives import causal_lm_batch, causal_lm_objective
from llmkit.train.recompute import enable_activation_checkpointing
from tests.helpers import cli_status

GPT2 = Config.from_name("gpt2")
P = count_parameters(GPT2)


def state_bytes(memory) -> int:  # noqa: ANN001 (MemoryBreakdown)
    return memory.weights + memory.gradients + memory.optimizer


# --------------------------------------------------------------------------- bytes per parameter, sharding


def test_bytes_per_parameter_by_precision():
    assert state_bytes(training_memory(GPT2, 1, 128, "fp32")) == 16 * P  # 4 weights + 4 gradients + 8 Adam
    # fp32 master weights, gradients and Adam; the bf16 copy autocast makes of every matmul weight is kept by the graph
    mixed = training_memory(GPT2, 1, 128, "bf16-mixed")
    assert state_bytes(mixed) == 16 * P and mixed.weight_copies == 2 * matmul_weights(GPT2)
    assert mixed.activations > mixed.weight_copies
    assert state_bytes(training_memory(GPT2, 1, 128, "fp16-mixed")) == state_bytes(mixed)
    assert state_bytes(training_memory(GPT2, 1, 128, "bf16")) == 8 * P  # 2 + 2 + 2 x 2 (states in bf16)
    eight_bit = training_memory(GPT2, 1, 128, "fp32", optimizer="adamw-8bit").optimizer
    # 1 byte per moment + block scales + 32-bit states of small tensors, and the fp32 temporaries of one chunk
    chunk_temporaries = LOW_BIT_TEMPORARIES * 4 * LOW_BIT_CHUNK
    assert 2 * P < eight_bit - chunk_temporaries < 2.01 * P


def test_peak_counts_the_larger_of_activations_and_gradients():
    small_batch = training_memory(GPT2, 1, 8, "fp32")  # gradients (4 bytes per parameter) outweigh the activations
    assert small_batch.gradients > small_batch.activations
    assert small_batch.total == small_batch.weights + small_batch.optimizer + small_batch.gradients
    large_batch = training_memory(GPT2, 8, 1024, "fp32")
    assert large_batch.activations > large_batch.gradients
    assert large_batch.total == large_batch.weights + large_batch.optimizer + large_batch.activations


def test_matmul_weights_are_the_linear_weights_of_a_real_decoder():
    for name in ("tiny-llama", "tiny-gpt2"):
        config = Config.from_name(name)
        model = Decoder(config)
        linears = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        head = 0 if model.lm_head is not None else model.embed.weight.numel()  # a tied head multiplies by embed.weight
        assert matmul_weights(config) == linears + head


def test_fsdp_divides_weights_gradients_and_states_but_not_activations():
    single = training_memory(GPT2, 4, 512, "fp32")
    sharded = training_memory(GPT2, 4, 512, "fp32", devices=8, fsdp=True)
    for part in ("weights", "gradients", "optimizer"):
        assert abs(getattr(sharded, part) * 8 - getattr(single, part)) <= 8  # rounded up to whole bytes per device
    assert sharded.activations == single.activations
    assert sharded.communication > 0 and single.communication == 0
    replicated = training_memory(GPT2, 4, 512, "fp32", devices=8)  # DDP: full copies plus gradient buckets
    assert state_bytes(replicated) == state_bytes(single) and replicated.communication == 4 * P


def test_activation_checkpointing_and_batch_scale_activations():
    plain = activation_memory(GPT2, 4, 512, "bf16-mixed")
    recomputed = activation_memory(GPT2, 4, 512, "bf16-mixed", activation_checkpointing=True)
    assert recomputed.blocks == 12 * (4 * 512 * 768) * 4  # each block keeps only its float32 input
    assert recomputed.blocks < plain.blocks / 8 and recomputed.peak < plain.peak
    double = activation_memory(GPT2, 8, 512, "bf16-mixed")
    assert double.blocks == 2 * plain.blocks
    with pytest.raises(LlmkitError, match="exceeds gpt2's context window of 1024"):
        activation_memory(GPT2, 1, 2048)


def test_inference_memory_is_weights_plus_kv_cache_plus_workspace():
    config = Config.from_name("smollm2-135m")
    memory = inference_memory(config, batch_size=4, context=2048, weight_bytes=2, kv_bytes=2)
    assert memory.weights == 2 * count_parameters(config)
    assert memory.kv_cache == kv_cache_bytes(config, 4, 2048, 2)
    assert memory.total == memory.weights + memory.kv_cache + memory.workspace


# --------------------------------------------------------------------------- FLOPs, Chinchilla, time


def test_chinchilla_flops_and_time():
    assert chinchilla_tokens(P) == 20 * P
    plan = training_compute(GPT2, seq_len=1024, device="A100", mfu=0.5, devices=4)
    assert plan.tokens == 20 * P and plan.flops == 6 * P * plan.tokens
    assert plan.seconds == pytest.approx(plan.flops / (4 * 312e12 * 0.5))
    palm = flops_per_token(GPT2, 1024, attention=True) - flops_per_token(GPT2, 1024)
    assert palm == 12 * 12 * 12 * 64 * 1024  # 12 L H Q T
    cpu = training_compute(GPT2, tokens=1e6, device="cpu", tflops=0.17)
    assert cpu.flops == 6 * P * 1e6 and cpu.seconds == pytest.approx(cpu.flops / (0.17e12 * 0.4))


def test_gpu_names():
    assert peak_tflops("h100 sxm") == ("H100-SXM", 989.0)
    assert peak_tflops("rtx4090") == ("RTX-4090", 165.0)
    assert set(GPU_PEAK_TFLOPS) >= {"H100-SXM", "H100-PCIe", "H200", "A100", "L4", "RTX-4090", "V100"}


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(device="B300"), r"unknown GPU 'B300'; known GPUs: H100-SXM, H100-PCIe, H200, A100, L4, RTX-4090, V100"),
        (dict(device="cpu"), "pass --tflops"),
        (dict(mfu=0.0), r"mfu=0.0 must be in \(0, 1\]"),
        (dict(mfu=1.5), r"mfu=1.5 must be in \(0, 1\]"),
        (dict(devices=0), "devices=0 must be at least 1"),
        (dict(tokens=-5), "tokens=-5 must be positive"),
        (dict(device="cpu", tflops=0), "tflops=0 must be positive"),
    ],
)
def test_bad_compute_inputs(arguments, message):
    with pytest.raises(LlmkitError, match=message):
        training_compute(GPT2, **arguments)


# --------------------------------------------------------------------------- activations vs what autograd saves


def saved_bytes(config: Config, batch_size: int, seq_len: int, precision: str, checkpointing: bool,
                loss_chunk: int = 0) -> int:
    """Bytes of every distinct storage autograd saves in one causal-LM forward, parameters excluded."""
    torch.manual_seed(0)
    model = Decoder(config)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    if checkpointing:
        enable_activation_checkpointing(model)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    tokens = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            causal_lm_objective(loss_chunk)(model, causal_lm_batch(tokens)).mean()
    return sum(storages.values())


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("precision, checkpointing", [("fp32", False), ("fp32", True), ("bf16-mixed", False),
                                                      ("bf16", False)])
def test_activation_model_matches_saved_tensors(one_thread, name, precision, checkpointing):
    config = Config.from_name(name)
    counted = saved_bytes(config, 4, 64, precision, checkpointing)
    estimated = activation_memory(config, 4, 64, precision, checkpointing).saved
    # 10%: the model counts tensor by tensor (it matches to a few bytes here); with checkpointing the rotary tables
    # live in the blocks' recomputation closures, which the hooks do not see, but which do take memory.
    assert abs(estimated - counted) / counted <= 0.10, (estimated, counted)


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_activation_model_with_the_chunked_loss(one_thread, precision):
    config = Config.from_name("tiny-llama", vocab_size=4096)
    counted = saved_bytes(config, 4, 64, precision, False, loss_chunk=32)
    estimated = activation_memory(config, 4, 64, precision, loss_chunk=32).saved
    assert abs(estimated - counted) / counted <= 0.10, (estimated, counted)
    assert estimated < activation_memory(config, 4, 64, precision).saved  # the (tokens x vocab) logits are gone


# --------------------------------------------------------------------------- estimate vs measured training steps


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_estimate_within_20_percent_of_measured_peak(monkeypatch, name, checkpointing):
    """Batch 32 x 256 tokens puts the peak at about 50 MB (checkpointing) to 100 MB, well above allocator noise."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the spawned child inherits it: one thread on this shared box
    config = Config.from_name(name)
    measured = measure_training(config, 32, 256, "fp32", checkpointing, steps=2, device="cpu")
    estimated = training_memory(config, 32, 256, "fp32", activation_checkpointing=checkpointing).total
    assert measured.peak_bytes is not None and measured.peak_bytes > 40 * 2**20
    assert abs(estimated - measured.peak_bytes) / measured.peak_bytes <= 0.20, (estimated, measured.peak_bytes)
    assert measured.step_seconds > 0 and measured.tokens_per_second == pytest.approx(32 * 256 / measured.step_seconds)


def test_chunked_loss_estimate_within_20_percent_of_measured_peak(monkeypatch):
    """A 16k vocabulary makes the logits (32 x 256 x 16,384 float32: 512 MB) the largest activation of the plain
    path; the chunked loss's peak is a fraction of it, and the estimate follows."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = Config.from_name("tiny-llama", vocab_size=16384)
    measured = measure_training(config, 32, 256, "fp32", False, steps=2, device="cpu", loss_chunk=1024)
    estimated = training_memory(config, 32, 256, "fp32", loss_chunk=1024).total
    assert measured.peak_bytes is not None and measured.peak_bytes > 40 * 2**20
    assert abs(estimated - measured.peak_bytes) / measured.peak_bytes <= 0.20, (estimated, measured.peak_bytes)
    assert estimated < 0.5 * training_memory(config, 32, 256, "fp32").total


def test_measurement_says_when_proc_is_unavailable(monkeypatch, one_thread):
    monkeypatch.setattr("llmkit.commands.estimate.PROC_STATUS", "/no/such/proc/status")
    config = Config.from_name("tiny-llama")
    result = _measure_in_this_process(config.to_dict(), 2, 16, "fp32", False, 1, "cpu", "adamw")
    assert result["peak_bytes"] is None and "/proc is unavailable" in result["method"]
    from llmkit.commands.estimate import Measurement

    assert "not measured" in format_measurement(Measurement(**result), estimated_total=10 * 2**20)


# --------------------------------------------------------------------------- the verb


def test_cli_prints_every_table(capsys):
    estimate(model="smollm2-135m", batch_size=4, seq_len=512, precision="bf16-mixed", devices=8, fsdp=True,
             activation_checkpointing=True, gpu="A100", mfu=0.5, context=1024)
    out = capsys.readouterr().out
    assert "smollm2-135m: 134,515,008 parameters" in out
    for row in ("weights", "gradients", "optimizer", "activations", "FSDP all-gather", "peak", "KV cache",
                "Chinchilla tokens", "2.69e+09", "FLOPs 6ND", "FLOPs 6ND + attention", "8 x A100", "50% MFU"):
        assert row in out, row
    assert "FSDP over 8 devices" in out and "activation checkpointing" in out


def test_cli_measure_prints_measured_beside_estimate(capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    estimate(model="tiny-llama", batch_size=4, seq_len=64, precision="fp32", measure=True, steps=1, device="cpu")
    out = capsys.readouterr().out
    assert "measured on cpu" in out and "peak memory" in out and "(estimate" in out and "tokens/s" in out


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(gpu="TPUv5"), "unknown GPU 'TPUv5'; known GPUs: H100-SXM"),
        (dict(mfu=0), r"mfu=0 must be in \(0, 1\]"),
        (dict(devices=0), "devices=0 must be at least 1"),
        (dict(model="no-such-model"), "'no-such-model' is neither a preset"),
        (dict(measure=True, fsdp=True, devices=2), "--measure runs on one device; drop --fsdp"),
        (dict(optimizer="lomo", precision="fp16-mixed"), "--optimizer lomo cannot unscale fp16 gradients"),
        (dict(seq_len=4096), "exceeds gpt2's context window of 1024"),
        (dict(precision="fp8"), "unknown precision 'fp8'"),
    ],
)
def test_cli_errors(arguments, message):
    with pytest.raises(LlmkitError, match=message):
        estimate(**arguments)


def test_config_only_from_checkpoint_paths(tmp_path):
    native = tmp_path / "native"
    native.mkdir()
    Config.from_name("tiny-llama").save(native / "config.json")
    assert count_parameters(load_config(str(native))) == count_parameters(Config.from_name("tiny-llama"))
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    }))
    assert count_parameters(load_config(str(hf))) == count_parameters(Config.from_name("tiny-llama"))
    gguf = load_config(str(default_model_path()))  # metadata only: no tensor is read
    assert count_parameters(gguf) == count_parameters(Config.from_name("smollm2-135m"))


@pytest.mark.parametrize("flag", ["--seq_len", "--context"])
@pytest.mark.parametrize("value", ["0", "-5"])
def test_cli_zero_or_negative_length_is_an_error(capsys, flag, value):
    """--seq_len 0 silently meant the whole context window; only leaving the flag out means that."""
    code, err = cli_status(capsys, "estimate", "--model", "gpt2", flag, value)
    assert code == 2 and f"error: {flag} {value} must be at least 1 token" in err and "(1,024)" in err
    assert err.count("\n") == 1


def test_measure_refuses_a_model_that_does_not_fit_this_machine(capsys, monkeypatch):
    """A 7B model's fp32 AdamW training needs about 16 bytes per parameter (112 GB): --measure used to start it and
    be killed when the memory ran out. On a machine with the memory for it, the test reports a 24 GiB box's."""
    from llmkit.commands import estimate as command

    free, source = command.available_memory("cpu")
    assert free > 0
    if free > 300 * 2**30:
        monkeypatch.setattr(command, "available_memory", lambda device: (24 * 2**30, source))
    code, err = cli_status(capsys, "estimate", "--model", "mistral-7b", "--measure", "true", "--precision", "fp32",
                        "--batch_size", "1", "--seq_len", "128", "--device", "cpu")
    assert code == 2 and err.count("\n") == 1
    assert "--measure needs about" in err and "MemAvailable in /proc/meminfo" in err and "--batch_size" in err


def test_measure_checks_the_gpu_memory_on_cuda(monkeypatch):
    from llmkit.commands import estimate as command

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2 * 2**30, 80 * 2**30))
    monkeypatch.setattr("llmkit.device.resolve_device", lambda device: torch.device("cuda:0"))
    with pytest.raises(LlmkitError, match=r"needs about 2,560 MiB on cuda:0 .* only 2,048 MiB is available \(free GPU"):
        command.check_memory_for_measuring(2048 * 2**20, "cuda")
    command.check_memory_for_measuring(1024 * 2**20, "cuda")  # fits: no error
