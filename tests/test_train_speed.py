"""Training speed levers: fused q/k/v and gate/up projections in training (same logits and gradients as separate
projections for every decoder family, the same training run, checkpoints transformers loads, LoRA on q_proj alone,
exact resume), and the flags' validation."""

from __future__ import annotations

import json

import pytest
import torch

from llmkit.checkpoints import load_model
from llmkit.checkpoints.hf import export_hf
from llmkit.errors import LlmkitError
from llmkit.nn.fused import fuse_projections, fused_product
from llmkit.peft.lora import apply_lora
from llmkit.peft.settings import LoraSettings
from llmkit.train.checkpoint import list_checkpoints
from llmkit.train.loop import train
from llmkit.train.metrics import METRICS_FILE
from llmkit.train.objectives import causal_lm_batch, causal_lm_loss
from llmkit.train.settings import TrainSettings, check_settings
from tests.helpers import tiny_decoder
from tests.test_nn_fused import VARIANTS, model_pair
from tests.train_script import token_source

# fp32: the fused products sum the same terms per output (forward) and per weight (backward) in other blockings
FP32_TOLERANCE = 1e-5
# bf16 autocast: both paths round the same bf16 operands; what differs is the kernel's blocking, a few bf16 ulps
BF16_TOLERANCE = 2e-2
TRAIN_VARIANTS = dict(VARIANTS, moe=dict(preset="tiny-moe"))  # MoE: attention fused, experts left as they are


def fused_pair(variant: str, column_major: bool = False) -> tuple[torch.nn.Module, torch.nn.Module]:
    if variant == "moe":
        return tiny_decoder("tiny-moe"), fuse_projections(tiny_decoder("tiny-moe"))
    return model_pair(variant, column_major=column_major)


def logits_and_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                     precision: torch.dtype | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=precision or torch.bfloat16, enabled=precision is not None):
        logits = model(batch["input_ids"])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten())
    loss.backward()
    return logits.detach().float(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def a_batch(vocab: int = 256) -> dict[str, torch.Tensor]:
    return causal_lm_batch(torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("column_major", [False, True])  # True: the layout load_model gives loaded weights
@pytest.mark.parametrize("variant", TRAIN_VARIANTS)
def test_fused_training_matches_unfused_logits_and_gradients(variant, column_major, one_thread, monkeypatch):
    plain, fused = fused_pair(variant, column_major)
    batch = a_batch()
    calls: list[str] = []
    import llmkit.nn.attention as attention
    import llmkit.nn.mlp as mlp

    for target in (attention, mlp):  # the fused path must be the one taken, with gradients on
        monkeypatch.setattr(target, "fused_product", _recording(calls))
    expected_logits, expected_grads = logits_and_grads(plain, batch)
    calls.clear()
    got_logits, got_grads = logits_and_grads(fused, batch)
    assert calls and all(call is not None for call in calls), "the fused model ran no fused product"
    torch.testing.assert_close(got_logits, expected_logits, atol=FP32_TOLERANCE, rtol=FP32_TOLERANCE)
    assert sorted(got_grads) == sorted(expected_grads)  # every part's own parameter received its gradient
    for name in expected_grads:
        torch.testing.assert_close(got_grads[name], expected_grads[name], atol=FP32_TOLERANCE, rtol=FP32_TOLERANCE,
                                   msg=lambda message, name=name: f"{name}: {message}")


def _recording(calls: list):  # noqa: ANN202
    from llmkit.nn import fused as fused_module

    def record(module, x):  # noqa: ANN001, ANN202
        out = fused_module.fused_product(module, x)
        calls.append(out if out is None else type(module).__name__)
        return out

    return record


@pytest.mark.parametrize("variant", ["llama", "qwen2-bias"])
def test_fused_training_matches_unfused_under_bf16_autocast(variant, one_thread):
    plain, fused = fused_pair(variant)
    batch = a_batch()
    expected_logits, expected_grads = logits_and_grads(plain, batch, torch.bfloat16)
    got_logits, got_grads = logits_and_grads(fused, batch, torch.bfloat16)
    torch.testing.assert_close(got_logits, expected_logits, atol=BF16_TOLERANCE, rtol=BF16_TOLERANCE)
    for name in expected_grads:
        assert got_grads[name].dtype == torch.float32  # fp32 master weights get fp32 gradients
        scale = expected_grads[name].abs().max().item()
        torch.testing.assert_close(got_grads[name], expected_grads[name], atol=BF16_TOLERANCE * scale,
                                   rtol=BF16_TOLERANCE, msg=lambda message, name=name: f"{name}: {message}")


def quiet_settings(**overrides) -> TrainSettings:
    values = dict(max_steps=4, batch_size=2, warmup_steps=1, eval_every=0, log_every=1, checkpoint_every=100,
                  lr=3e-3, device="cpu")
    values.update(overrides)
    return TrainSettings(**values)


def trained(settings: TrainSettings, run_dir, seed: int = 0, preset: str = "tiny-llama") -> torch.nn.Module:
    extra = {"qkv_bias": True} if preset == "tiny-llama" else {}  # llama with q/k/v biases: Qwen2's shape
    model = tiny_decoder(preset, seed=seed, **extra)
    train(model, causal_lm_loss, token_source(), settings, run_dir)
    return model


def losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    return [row["loss"] for row in rows if row["kind"] == "train"]


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_fused_run_trains_like_unfused_and_its_checkpoint_loads_in_transformers(preset, tmp_path, one_thread):
    import transformers

    plain = trained(quiet_settings(), tmp_path / "plain", preset=preset)
    fused = trained(quiet_settings(fused_projections=True), tmp_path / "fused", preset=preset)
    assert fused.blocks[0].attn.fused_weight is not None  # the loop fused it, and the optimizer kept the views
    assert fused.blocks[0].attn.q_proj.weight.untyped_storage().data_ptr() == \
        fused.blocks[0].attn.fused_weight.untyped_storage().data_ptr()
    assert losses(tmp_path / "fused") == pytest.approx(losses(tmp_path / "plain"), abs=1e-5)
    expected = plain.state_dict()
    for name, tensor in fused.state_dict().items():  # same names, same trained values (AdamW wrote through the views)
        torch.testing.assert_close(tensor, expected[name], atol=1e-5, rtol=1e-5)

    checkpoint = list_checkpoints(tmp_path / "fused")[-1]
    export = export_hf(load_model(checkpoint), tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, plain.eval()(ids), atol=1e-4, rtol=1e-4)


def test_resume_with_fused_projections_gives_the_same_state(tmp_path, one_thread):
    constant = dict(fused_projections=True, schedule="constant", warmup_steps=0)  # lr independent of max_steps
    straight = trained(quiet_settings(**constant), tmp_path / "straight")
    trained(quiet_settings(**constant, max_steps=2), tmp_path / "resumed")
    resumed = trained(quiet_settings(**constant), tmp_path / "resumed", seed=9)  # weights from disk
    assert losses(tmp_path / "resumed") == pytest.approx(losses(tmp_path / "straight"), abs=1e-6)
    expected = straight.state_dict()
    for name, tensor in resumed.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-6, rtol=1e-6)
    attn = resumed.blocks[0].attn  # loading the checkpoint copied into the views: the fused tensor holds the values
    torch.testing.assert_close(attn.fused_weight, torch.cat([attn.q_proj.weight, attn.k_proj.weight,
                                                             attn.v_proj.weight]), atol=0, rtol=0)


def test_lora_on_q_proj_alone_falls_back_to_separate_products(one_thread):
    plain, fused = model_pair("llama", column_major=False)
    settings = LoraSettings(rank=4, alpha=8, targets=["q_proj"], dropout=0.0)
    for model in (plain, fused):
        torch.manual_seed(4)
        apply_lora(model, settings)
        for name, parameter in model.named_parameters():
            if name.endswith("lora_B.weight"):
                torch.nn.init.normal_(parameter)  # B starts at zero: make the adapter count
    batch = a_batch()
    expected_logits, expected_grads = logits_and_grads(plain, batch)
    got_logits, got_grads = logits_and_grads(fused, batch)
    assert fused_product(fused.blocks[0].attn, torch.zeros(1, 64)) is None  # q/k/v: separate products again
    assert fused_product(fused.blocks[0].mlp, torch.zeros(1, 64)) is not None  # gate/up: still one product
    torch.testing.assert_close(got_logits, expected_logits, atol=FP32_TOLERANCE, rtol=FP32_TOLERANCE)
    assert sorted(got_grads) == sorted(expected_grads) and any("lora" in name for name in got_grads)
    for name in expected_grads:
        torch.testing.assert_close(got_grads[name], expected_grads[name], atol=FP32_TOLERANCE, rtol=FP32_TOLERANCE)


def test_fused_projections_with_fsdp_is_refused_naming_the_flag():
    with pytest.raises(LlmkitError, match=r"--train\.fused_projections.*--train\.distributed auto") as error:
        check_settings(TrainSettings(fused_projections=True, distributed="fsdp"))
    assert "\n" not in str(error.value)
    check_settings(TrainSettings(fused_projections=True))  # DDP and one process are fine
