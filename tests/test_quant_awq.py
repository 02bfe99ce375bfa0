"""AWQ (llmkit/quant/awq.py): folding the scales leaves the float network unchanged, the alpha search is never worse
than round-to-nearest on the module it judges, the quantized blocks beat RTN's, and the result is an ordinary
quantized checkpoint."""

import copy

import pytest
import torch
from helpers import byte_tokenizer, tiny_decoder

from llmkit import LlmkitError
from llmkit.quant import QuantLinear, load_quantized, quantize, save_quantized
from llmkit.quant.awq import apply_scales, awq, rtn, scale_groups, search_scale
from llmkit.quant.calibration import block_inputs, calibration_batches

pytestmark = pytest.mark.usefixtures("one_thread")


def with_outlier_channels(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Norm scales with a few loud channels, as trained LLMs have (AWQ's premise); random weights have none."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            for norm in (block.attn_norm, block.mlp_norm):
                norm.weight.copy_(torch.rand(norm.weight.shape, generator=g) + 0.5)
                norm.weight[torch.randperm(norm.weight.numel(), generator=g)[:3]] *= 20
    return model


@pytest.fixture(scope="module")
def calibration() -> torch.Tensor:
    return calibration_batches(byte_tokenizer(), n_sequences=8, seq_len=64)


@pytest.mark.parametrize("preset, overrides", [("tiny-llama", {"n_kv_heads": 4}), ("tiny-gpt2", {})])
def test_folding_scales_leaves_the_float_logits_unchanged(preset, overrides, calibration):
    model = tiny_decoder(preset, **overrides)
    ids = calibration[:2]
    with torch.no_grad():
        before = model(ids)
    g = torch.Generator().manual_seed(1)
    folded = []
    for block in model.blocks:
        for group in scale_groups(block):
            if group.fold is not None:
                apply_scales(group, torch.exp(torch.randn(group.linears[0].in_features, generator=g)))
                folded.append(group.name)
    with torch.no_grad():
        after = model(ids)
    # every group folds in the MHA llama; GPT-2's plain GELU MLP leaves down_proj out
    assert len(folded) == (8 if preset == "tiny-llama" else 6)
    assert float((after - before).abs().max()) <= 1e-5  # fp32 rounding of x / s * s


def test_grouped_query_attention_leaves_o_proj_unscaled():
    groups = scale_groups(tiny_decoder().blocks[0])  # tiny-llama: 4 heads, 2 key/value heads
    assert [g.name for g in groups if g.fold is None] == ["o_proj"]


def test_search_at_alpha_zero_is_rtn_and_the_best_is_no_worse(calibration):
    model = with_outlier_channels(tiny_decoder())
    x, context = block_inputs(model, calibration)[0]
    block = model.blocks[0]
    group = scale_groups(block)[2]  # gate/up, judged on the MLP's output
    h = block.mlp_norm(x + block.attn(block.attn_norm(x), context)).detach()
    x_abs_mean = h.reshape(-1, h.shape[-1]).abs().mean(0)
    s, alpha, losses = search_scale(group, x_abs_mean, [(h, context)], "int4_asym", 32)
    assert len(losses) == 20 and min(losses) == losses[int(round(alpha * 20))]
    float_out = block.mlp(h)
    with torch.no_grad():
        saved = [linear.weight.clone() for linear in group.linears]
        for linear in group.linears:
            linear.weight.copy_(rtn(linear.weight, "int4_asym", 32))
        rtn_loss = float((block.mlp(h) - float_out).pow(2).mean())
        for linear, weight in zip(group.linears, saved, strict=True):
            linear.weight.copy_(weight)
    assert losses[0] == pytest.approx(rtn_loss, rel=1e-5)  # alpha = 0: s = 1, plain round-to-nearest
    assert min(losses) < rtn_loss  # the loud channels make scaling pay
    assert torch.equal(block.mlp.up_proj.weight, saved[1])  # the search restores the weights


def test_awq_blocks_beat_rtn_and_round_trip_through_a_checkpoint(tmp_path, calibration):
    float_model = with_outlier_channels(tiny_decoder())
    model, rtn_model = copy.deepcopy(float_model), quantize(copy.deepcopy(float_model), "int4_asym", 32)
    awq(model, calibration, group_size=32, progress=False)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and {(m.scheme, m.group_size) for m in layers} == {("int4_asym", 32)}
    batches = block_inputs(float_model, calibration)
    with torch.no_grad():
        for i in range(len(float_model.blocks)):  # each block on the float model's inputs to it
            mse = {}
            for label, m in (("awq", model), ("rtn", rtn_model)):
                mse[label] = sum(float((m.blocks[i](x, c) - float_model.blocks[i](x, c)).pow(2).mean())
                                 for x, c in batches)
            print(f"block {i} output MSE: RTN {mse['rtn']:.3e}, AWQ {mse['awq']:.3e}")
            assert mse["awq"] <= mse["rtn"]
    save_quantized(model, tmp_path, byte_tokenizer())
    loaded = load_quantized(tmp_path)
    ids = calibration[:2]
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_awq_refuses_what_it_cannot_fold(calibration):
    with pytest.raises(LlmkitError, match="awq scales dense MLPs; this block has a MoE: use --scheme gptq"):
        awq(tiny_decoder("tiny-moe"), calibration, group_size=32, progress=False)
    with pytest.raises(LlmkitError, match="--group_size 128 does not divide in_features 64"):
        awq(tiny_decoder(), calibration, group_size=128, progress=False)
    with pytest.raises(LlmkitError, match="already quantized"):
        awq(quantize(tiny_decoder(), "int8"), calibration, progress=False)
