"""Memory-light optimizers: block-wise quantized states, AdamW with 8-/4-bit moments, LOMO and AdaLomo (against
torch's SGD and transformers' Adafactor), and each of them through the one training loop (resume included)."""

from __future__ import annotations

import io

import pytest
import torch
from transformers.optimization import Adafactor

from llmkit.commands.estimate import measure_training
from llmkit.config import Config
from llmkit.errors import LlmkitError
from llmkit.estimate import training_memory
from llmkit.train.distributed import Cluster
from llmkit.train.loop import train
from llmkit.train.lowbit import FIRST_MOMENT, SECOND_MOMENT, dequantize, dynamic_map, quantize
from llmkit.train.objectives import causal_lm_loss
from llmkit.train.optimizers import AdaLomo, Lomo, QuantizedAdamW
from llmkit.train.settings import TrainSettings, check_settings
from tests.test_train_loop import quiet_settings, run_losses, tiny_model
from tests.train_script import token_source


def small_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 8))


def regression_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(256, 64, generator=generator)
    return x, torch.tanh(x @ torch.randn(64, 8, generator=generator))


def loss_of(net: torch.nn.Module) -> torch.Tensor:
    x, y = regression_batch()
    return (net(x) - y).pow(2).mean()


def max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


# ---- block-wise quantization -------------------------------------------------------------------------------------


def test_maps_fill_their_codes_and_the_second_moment_never_rounds_to_zero():
    assert [dynamic_map(8, True).numel(), dynamic_map(8, False).numel(), dynamic_map(4, True).numel()] == [256, 256, 16]
    assert dynamic_map(8, False).min() == 0 and dynamic_map(8, True).max() == 1
    values = torch.rand(1000) * torch.logspace(-8, 0, 1000)  # eight decades inside one block
    codes, scales = quantize(values, SECOND_MOMENT[4])
    assert codes.numel() == 500  # two 4-bit codes per byte
    assert (dequantize(codes, scales, SECOND_MOMENT[4], values.shape) > 0).all()


@pytest.mark.parametrize(("bits", "median_error"), [(8, 0.03), (4, 0.25)])
def test_dynamic_quantization_keeps_relative_precision_over_many_decades(bits, median_error):
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * torch.logspace(-6, 0, 10_000)
    spec = FIRST_MOMENT[bits]
    codes, scales = quantize(x, spec)
    assert scales.numel() == -(-10_000 // spec.block)
    restored = dequantize(codes, scales, spec, x.shape)
    relative = (restored - x).abs() / x.abs()
    assert relative.median() < median_error
    assert torch.equal(torch.sign(restored[restored != 0]), torch.sign(x[restored != 0]))
    # a linear 8-bit map would round every value below 1/256 of its block's maximum to zero
    assert (restored == 0).float().mean() < 0.05


# ---- LOMO / AdaLomo ----------------------------------------------------------------------------------------------


def test_lomo_with_zero_learning_rate_leaves_the_weights_unchanged():
    net, before = small_net(), small_net()
    Lomo(net.parameters(), lr=0.0)
    loss_of(net).backward()
    assert max_difference(net, before) == 0
    assert all(p.grad is None for p in net.parameters())  # each gradient is freed once used


def test_a_lomo_step_is_an_sgd_step():
    reference, fused = small_net(), small_net()
    sgd, lomo = torch.optim.SGD(reference.parameters(), lr=0.1), Lomo(fused.parameters(), lr=0.1)
    for _ in range(3):
        sgd.zero_grad()
        loss_of(reference).backward()
        sgd.step()
        loss_of(fused).backward()  # the update happens here
        lomo.step()
    assert max_difference(reference, fused) <= 1e-6


def test_lomo_clips_by_the_global_norm_measured_in_a_first_pass():
    reference, fused = small_net(), small_net()
    sgd, lomo = torch.optim.SGD(reference.parameters(), lr=0.1), Lomo(fused.parameters(), lr=0.1)
    loss_of(reference).backward()
    norm = torch.nn.utils.clip_grad_norm_(list(reference.parameters()), 0.05).item()
    sgd.step()
    with lomo.measure_grad_norm():
        loss_of(fused).backward()
    assert max_difference(reference, small_net()) > 0 and max_difference(fused, small_net()) == 0  # measured only
    assert lomo.grad_norm() == pytest.approx(norm, rel=1e-5)
    lomo.clip_to(0.05, lomo.grad_norm())
    loss_of(fused).backward()
    assert max_difference(reference, fused) <= 1e-6


def test_adalomo_equals_adafactor_with_factored_moments():
    reference, fused = small_net(), small_net()
    adafactor = Adafactor(reference.parameters(), lr=1e-2, scale_parameter=True, relative_step=False,
                          warmup_init=False, weight_decay=0.1)
    adalomo = AdaLomo(fused.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(4):
        adafactor.zero_grad()
        loss_of(reference).backward()
        adafactor.step()
        loss_of(fused).backward()
    assert max_difference(reference, fused) <= 1e-6
    first = fused[0].weight
    assert adalomo.state[first]["exp_avg_sq_row"].shape == (128,)  # n + m numbers for an n x m matrix
    assert torch.allclose(adalomo.state[first]["exp_avg_sq_row"], adafactor.state[reference[0].weight]["exp_avg_sq_row"])


# ---- quantized AdamW ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "tolerance"), [(8, 0.1), (4, 0.6)])
def test_low_bit_adamw_tracks_fp32_adamw(bits, tolerance):
    """Losses along 100 steps stay within `tolerance` (relative) of fp32 AdamW's (4-bit lags more: its second
    moment map has no zero, so tiny moments round up and slow those weights)."""
    curves = {}
    for name in ("fp32", "quantized"):
        net = small_net()
        optimizer = (torch.optim.AdamW(net.parameters(), lr=3e-3) if name == "fp32"
                     else QuantizedAdamW(net.parameters(), lr=3e-3, bits=bits, min_quantized_numel=1))
        curves[name] = []
        for _ in range(100):
            optimizer.zero_grad()
            loss = loss_of(net)
            loss.backward()
            optimizer.step()
            curves[name].append(loss.item())
    for step in (10, 30, 60):
        assert curves["quantized"][step] == pytest.approx(curves["fp32"][step], rel=tolerance)
    assert curves["quantized"][-1] < 0.15 * curves["quantized"][0]


@pytest.mark.parametrize("bits", [8, 4])
def test_low_bit_adamw_resumes_bit_exactly_and_stores_small_states(bits):
    straight, resumed = small_net(), small_net()
    optimizer = QuantizedAdamW(straight.parameters(), lr=3e-3, bits=bits, min_quantized_numel=1)
    for _ in range(6):
        optimizer.zero_grad()
        loss_of(straight).backward()
        optimizer.step()
    first = QuantizedAdamW(resumed.parameters(), lr=3e-3, bits=bits, min_quantized_numel=1)
    for _ in range(3):
        first.zero_grad()
        loss_of(resumed).backward()
        first.step()
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = QuantizedAdamW(resumed.parameters(), lr=3e-3, bits=bits, min_quantized_numel=1)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    state = second.state[resumed[0].weight]
    assert state["exp_avg_codes"].dtype == torch.uint8 and state["exp_avg_scales"].dtype == torch.float32
    assert state["exp_avg_codes"].numel() == resumed[0].weight.numel() * bits // 8
    for _ in range(3):
        second.zero_grad()
        loss_of(resumed).backward()
        second.step()
    assert max_difference(straight, resumed) == 0


# ---- through the training loop -----------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["adamw-8bit", "adamw-4bit", "lomo", "adalomo"])
def test_every_optimizer_trains_through_the_loop(tmp_path, one_thread, optimizer):
    lr = {"lomo": 0.3, "adalomo": 3e-2}.get(optimizer, 3e-3)
    result = train(tiny_model(), causal_lm_loss, token_source(), quiet_settings(max_steps=30, optimizer=optimizer, lr=lr),
                   tmp_path)
    # random tokens over 64 symbols: the model starts near ln(256) = 5.55 and learns the 64-symbol unigram, ln(64) = 4.16
    assert result.losses[0] > 5.3 and result.losses[-1] < 4.9


@pytest.mark.parametrize(("optimizer", "lr"), [("lomo", 0.3), ("adalomo", 3e-2), ("adamw-4bit", 3e-3)])
def test_a_resumed_run_repeats_the_straight_run_exactly(tmp_path, one_thread, optimizer, lr):
    """A run that crashes in step 5 resumes from its step-4 checkpoint and logs the straight run's losses."""
    settings = quiet_settings(optimizer=optimizer, lr=lr, checkpoint_every=4)
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    train(tiny_model(), causal_lm_loss, token_source(), settings, straight)
    source = token_source()

    def crashing(position: int, batch_size: int, rank: int, world_size: int) -> dict[str, torch.Tensor]:
        if position == 4 * batch_size:  # the batch of step 5
            raise RuntimeError("simulated crash")
        return source(position, batch_size, rank, world_size)

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_model(), causal_lm_loss, crashing, settings, crashed)
    train(tiny_model(seed=7), causal_lm_loss, token_source(), settings, crashed)
    assert run_losses(crashed) == run_losses(straight)


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(optimizer="lomo", accumulation_steps=2), "cannot accumulate gradients over 2 micro-batches"),
    (dict(optimizer="adalomo", precision="fp16-mixed"), "cannot unscale fp16 gradients"),
    (dict(optimizer="sgd"), "optimizer='sgd' is unknown; choose one of adamw, adamw-8bit"),
])
def test_impossible_optimizer_settings_are_refused(overrides, message):
    with pytest.raises(LlmkitError, match=message):
        check_settings(TrainSettings(**overrides))


def test_chunked_updates_equal_one_update_of_the_whole_tensor(monkeypatch):
    """Large tensors are updated CHUNK values at a time; with chunks of one 8-bit block the result is the same."""
    results = []
    for chunk in (2**20, 2048):
        monkeypatch.setattr("llmkit.train.optimizers.CHUNK", chunk)
        torch.manual_seed(0)
        weight = torch.nn.Parameter(torch.randn(5000))
        optimizer = QuantizedAdamW([weight], lr=1e-2, bits=8)
        for step in range(3):
            weight.grad = torch.randn(5000, generator=torch.Generator().manual_seed(step))
            optimizer.step()
        results.append(weight.detach().clone())
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("optimizer", ["adamw", "adamw-8bit", "adamw-4bit", "lomo", "adalomo"])
def test_the_planner_estimate_is_within_10_percent_of_the_measured_peak(monkeypatch, optimizer):
    """An 11.5M-parameter model and a small batch, so the optimizer (not the activations) sets the peak:
    AdamW's estimate is ~186 MB, LOMO's ~64 MB."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = Config.from_name("tiny-llama", d_model=256, n_layers=4, vocab_size=16384, d_ff=768, n_heads=4, n_kv_heads=2)
    measured = measure_training(config, 2, 64, "fp32", steps=2, device="cpu", optimizer=optimizer)
    estimated = training_memory(config, 2, 64, "fp32", optimizer).total
    assert measured.peak_bytes is not None
    assert abs(estimated - measured.peak_bytes) / measured.peak_bytes <= 0.10, (estimated, measured.peak_bytes)


def test_small_and_non_contiguous_tensors_get_exact_adamw():
    """Tensors under min_quantized_numel keep fp32 moments: the update is AdamW's exactly, also for a parameter that
    is a transposed view (as some imported weights are)."""
    torch.manual_seed(0)
    data = torch.randn(6, 8)
    ours, reference = torch.nn.Parameter(data.t()), torch.nn.Parameter(data.t().contiguous())
    assert not ours.is_contiguous()
    optimizer = QuantizedAdamW([ours], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), bits=4)
    torch_adamw = torch.optim.AdamW([reference], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), foreach=False)
    for step in range(3):
        gradient = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))
        ours.grad, reference.grad = gradient.clone(), gradient.clone()
        optimizer.step()
        torch_adamw.step()
    assert torch.allclose(ours, reference, atol=1e-6) and "exp_avg" in optimizer.state[ours]


@pytest.mark.parametrize(("optimizer", "strategy", "world_size", "message"), [
    ("adamw-8bit", "fsdp", 2, "adamw-8bit keeps whole-tensor quantization blocks, which FSDP's sharded parameters split"),
    ("lomo", "ddp", 2, "lomo updates each weight during backward, before DDP/FSDP could average its gradient"),
    ("adalomo", "fsdp", 2, "adalomo updates each weight during backward"),
])
def test_optimizers_that_cannot_be_distributed_are_refused_before_any_work(tmp_path, optimizer, strategy, world_size,
                                                                          message):
    cluster = Cluster(rank=0, world_size=world_size, strategy=strategy)
    with pytest.raises(LlmkitError, match=message):
        train(tiny_model(), causal_lm_loss, token_source(), quiet_settings(optimizer=optimizer), tmp_path, cluster=cluster)
    assert not any(tmp_path.iterdir())  # refused before the run directory was touched
