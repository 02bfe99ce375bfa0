"""Fused quantized projections (llmkit/quant/fused.py): one product over q/k/v and gate/up equals the parts run one
by one, the parts' bytes are not held twice, a replaced part is run on its own again, and a fused model saves and
loads as before."""

from __future__ import annotations

import pytest
import torch
from helpers import int8_activation_bound, tiny_decoder

from llmkit.nn.fused import FUSED_CALLABLE
from llmkit.quant import QuantLinear, load_quantized, native, quantize, save_quantized
from llmkit.quant.fused import fuse_quantized_projections, kernel_buffer

pytestmark = pytest.mark.skipif(not native.native_kernels_available(),
                                reason="the GGUF CPU kernels did not build here (no C++ compiler)")


def decode_logits(model: torch.nn.Module, steps: int = 4) -> torch.Tensor:
    """Logits (steps, V) of one-token steps after a prompt (the kernel path: one row per call)."""
    with torch.inference_mode():
        cache = model.new_cache(1, 32)
        model(torch.tensor([[3, 1, 4, 1, 5]]), cache=cache)
        return torch.cat([model(torch.tensor([[t]]), cache=cache)[:, -1] for t in range(9, 9 + steps)])


@pytest.mark.parametrize("scheme", ["q4_0", "q4_1", "q8_0", "f16", "bf16"])
def test_fused_product_equals_the_parts_bit_for_bit(scheme):
    model = quantize(tiny_decoder(), scheme)
    expected = decode_logits(model)
    fuse_quantized_projections(model)
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    assert FUSED_CALLABLE in vars(attn) and FUSED_CALLABLE in vars(mlp)
    # every output row is computed from its own bytes and the same int8 activations: identical numbers
    assert torch.equal(decode_logits(model), expected)
    layer = vars(attn)[FUSED_CALLABLE].layer
    buffer = kernel_buffer(layer)  # the file's blocks, their 8-row regrouping (q4_0, q4_1, q8_0), or a half matrix
    assert buffer == ("weight_x8" if scheme in native.X8_SCHEMES else "weight_weight" if scheme in ("f16", "bf16")
                      else "weight_blocks")
    fused = getattr(layer, buffer)
    for part in (attn.q_proj, attn.k_proj, attn.v_proj):  # views into the concatenation: no byte held twice
        assert getattr(part, buffer).untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()


def test_a_replaced_part_runs_on_its_own_again():
    model = fuse_quantized_projections(quantize(tiny_decoder(), "q8_0"))
    attn = model.blocks[0].attn
    replacement = QuantLinear.from_linear(torch.nn.Linear(attn.k_proj.in_features, attn.k_proj.out_features), "q8_0")
    attn.k_proj = replacement
    assert not vars(attn)[FUSED_CALLABLE].covers(attn)
    reference = quantize(tiny_decoder(), "q8_0")
    reference.blocks[0].attn.k_proj = replacement
    assert torch.equal(decode_logits(model), decode_logits(reference))


def test_a_fused_model_saves_and_loads_unchanged(tmp_path):
    model = fuse_quantized_projections(quantize(tiny_decoder(), "q4_0"))
    save_quantized(model, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q")
    # the quantized layers give the same numbers; the float LM head's one-row product may sum in another order when
    # its reloaded weight sits at another alignment (seen with torch's AVX2 GEMV): a float rounding, no more
    torch.testing.assert_close(decode_logits(loaded), decode_logits(model), rtol=0, atol=1e-6)
    up, loaded_up = model.blocks[1].mlp.up_proj, loaded.blocks[1].mlp.up_proj
    assert torch.equal(loaded_up.packed.tensors["blocks"], up.packed.tensors["blocks"])


def test_parts_given_new_buffers_by_a_move_run_on_their_own():
    model = fuse_quantized_projections(quantize(tiny_decoder(), "q8_0"))
    expected = decode_logits(model)
    model.to(torch.float32)  # buffers stay packed and are re-assigned: the parts no longer live in the fused matrix
    attn = model.blocks[0].attn
    buffer = kernel_buffer(attn.k_proj)
    setattr(attn.k_proj, buffer, getattr(attn.k_proj, buffer).clone())
    assert not vars(attn)[FUSED_CALLABLE].covers(attn)
    assert torch.equal(decode_logits(model), expected)


def test_parts_on_other_kernels_are_left_alone():
    model = fuse_quantized_projections(quantize(tiny_decoder(), "int8"))
    assert FUSED_CALLABLE not in vars(model.blocks[0].attn)


def test_int8_prefill_runs_prompts_on_the_eight_row_kernel_under_inference_mode_only(tmp_path, capsys):
    """set_int8_prefill: a prompt's rows through a q4_0 layer give the 8-row kernel's int8-activation numbers under
    inference mode; without it (and under no_grad alone, as DPO/PPO score) the dequantized float32 product."""
    from llmkit.commands.common import load_decoder
    from llmkit.quant import set_int8_prefill

    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(256, 64), "q4_0")
    x = torch.randn(40, 256)  # more rows than a decode step's kernel path takes
    w_hat = layer.dequantized_weight()
    exact = torch.nn.functional.linear(x, w_hat, layer.bias)
    kernel = native.x8_matmul(x, layer.weight_x8, "q4_0", 64) + layer.bias
    with torch.inference_mode():
        assert torch.allclose(layer(x), exact, rtol=0, atol=1e-5)  # default: float32 prompts
    model = fuse_quantized_projections(quantize(tiny_decoder(), "q4_0"))
    model.lm_head = layer  # one layer outside the blocks, to count
    fused = [vars(m)[FUSED_CALLABLE].layer for m in model.modules() if FUSED_CALLABLE in vars(m)]
    parts = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert set_int8_prefill(model) == len(parts) + len(fused) and all(f.int8_prefill for f in fused)
    with torch.inference_mode():
        y = layer(x)
    assert torch.equal(y, kernel) and not torch.allclose(y, exact, rtol=0, atol=1e-5)
    assert bool(((y - exact).abs() <= int8_activation_bound(x, w_hat) + 1e-5).all())
    with torch.no_grad():
        assert torch.allclose(layer(x), exact, rtol=0, atol=1e-5)
    # a model with no 8-row layers: none set, and load_decoder says so on stderr
    save_quantized(quantize(tiny_decoder(), "int8"), tmp_path / "int8")  # aten's int8 kernel: no 8-row layout
    loaded = load_decoder(tmp_path / "int8", int8_prefill=True)
    assert not any(getattr(m, "int8_prefill", False) for m in loaded.modules())
    assert "--int8_prefill: " in capsys.readouterr().err
