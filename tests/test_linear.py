import pytest
import torch
import torch.nn.functional as F

from llmkit import Config
from llmkit.models.decoder import Decoder
from llmkit.nn.linear import linear, use_column_major_weights


@pytest.mark.parametrize("threads", [2, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_slab_path_equals_f_linear(threads, bias, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    torch.manual_seed(0)
    weight = torch.randn(96, 64).t().contiguous().t()  # column-major (96, 64)
    b = torch.randn(96) if bias else None
    x = torch.randn(1, 1, 64)
    with torch.inference_mode():
        y = linear(x, weight, b)
    assert y.shape == (1, 1, 96)
    # fp32 sums of 64 products in another order: differences stay near 1e-6
    assert (y - F.linear(x, weight, b)).abs().max() < 1e-5


def test_column_major_model_gives_the_same_logits():
    torch.manual_seed(0)
    model = Decoder(Config.from_name("tiny-llama")).eval()
    ids = torch.randint(0, 256, (1, 12))
    with torch.inference_mode():
        reference = model(ids)
        cache = model.new_cache(1, 12)
        use_column_major_weights(model)
        assert model.blocks[0].attn.q_proj.weight.stride() == (1, 64)
        steps = [model(ids[:, :4], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(4, 12)]
    assert (torch.cat(steps, dim=1) - reference).abs().max() < 1e-5
    assert all(t.is_contiguous() or t.t().is_contiguous() for t in model.state_dict().values())


def test_gradients_flow_through_the_ordinary_path():
    weight = torch.randn(8, 4).t().contiguous().t().requires_grad_()
    linear(torch.randn(1, 4), weight).sum().backward()
    assert weight.grad is not None and weight.grad.shape == (8, 4)


ONEDNN = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@ONEDNN
@pytest.mark.parametrize("layout", ["row-major", "column-major"])
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_prompt_product_equals_f_linear(layout, bias, monkeypatch):
    """Many float32 rows under inference mode with onednn_prompts: oneDNN's product, F.linear's numbers up to the
    order of the sums (sums of 64 unit products: ~1e-5)."""
    import llmkit.nn.linear as linear_module

    calls = []
    real = linear_module.prompt_product
    monkeypatch.setattr(linear_module, "prompt_product", lambda *args: calls.append(1) or real(*args))
    torch.manual_seed(0)
    weight = torch.randn(96, 64)
    weight = weight.t().contiguous().t() if layout == "column-major" else weight
    b = torch.randn(96) if bias else None
    x = torch.randn(2, 17, 64)
    with torch.inference_mode():
        y = linear(x, weight, b, onednn_prompts=True)
        plain = linear(x, weight, b)  # the flag off: F.linear
    assert calls == [1] and y.shape == (2, 17, 96)
    torch.testing.assert_close(y, F.linear(x, weight, b), atol=1e-4, rtol=1e-5)
    assert torch.equal(plain, F.linear(x, weight, b))


@ONEDNN
def test_onednn_prompt_product_is_inference_mode_only(monkeypatch):
    """Under no_grad alone or with autograd the flag changes nothing (bit for bit F.linear): a sequence scored with
    and without autograd (DPO's reference, PPO's first KL) must give the same numbers."""
    import llmkit.nn.linear as linear_module

    monkeypatch.setattr(linear_module, "prompt_product", lambda *args: pytest.fail("oneDNN outside inference mode"))
    torch.manual_seed(0)
    weight, x = torch.randn(32, 64, requires_grad=True), torch.randn(20, 64)
    with torch.no_grad():
        assert torch.equal(linear(x, weight, onednn_prompts=True), F.linear(x, weight))
    y = linear(x, weight, onednn_prompts=True)
    assert y.requires_grad and torch.equal(y, F.linear(x, weight))
    with torch.inference_mode():  # one row is a decode step's business, never oneDNN's prompt product
        assert torch.equal(linear(x[:1], weight.detach(), onednn_prompts=True), F.linear(x[:1], weight.detach()))
