"""llmkit/nn/decode_kernels.py: the native RMSNorm and one-token attention equal PyTorch's ops (float64 references
for the kernels alone; the decoder's own SDPA path for whole models, padding, sliding windows and bfloat16 caches);
the models take them only where they apply and still decode when they are switched off."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmkit import Config
from llmkit.generate import SamplingSettings, generate_tokens
from llmkit.models.decoder import Decoder
from llmkit.nn import decode_kernels
from llmkit.nn.attention import FAST_HALF_ATTENTION_ON_CPU, Attention

pytestmark = pytest.mark.skipif(not decode_kernels.available(), reason="llmkit's decode kernels did not build here")


def test_rms_norm_matches_float64_reference() -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 3, 576) * 3
    weight = torch.randn(576)
    for offset in (0.0, 1.0):
        expected = (x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5)
                    * (offset + weight.double())).float()
        got = decode_kernels.rms_norm(x, weight, 1e-5, offset)
        assert got.shape == x.shape
        torch.testing.assert_close(got, expected, rtol=2e-6, atol=2e-6)
    odd = torch.randn(2, 37)  # a width that is not a multiple of the vector length
    torch.testing.assert_close(decode_kernels.rms_norm(odd, torch.ones(37), 1e-6, 0.0),
                               F.rms_norm(odd, (37,), eps=1e-6), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize(("rows", "in_features", "out_features"), [(1, 576, 960), (3, 200, 37), (16, 1536, 576),
                                                                     (1, 12, 5)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_linear_matches_float64_reference(rows, in_features, out_features, bias, dtype) -> None:  # noqa: ANN001
    # widths that split unevenly into slabs and rows of 8, outputs that are not a multiple of the vector length;
    # half weights are widened exactly, so the reference is the float64 product of the same half values
    torch.manual_seed(rows)
    weight = torch.randn(out_features, in_features).to(dtype).t().contiguous().t()  # column-major, as kept
    b = torch.randn(out_features) if bias else None
    x = torch.randn(rows, 1, in_features)
    expected = F.linear(x.double(), weight.double(), None if b is None else b.double()).float()
    got = decode_kernels.linear(x, weight, b)
    assert got.shape == (rows, 1, out_features) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * in_features**0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_reads_column_blocks_and_wide_outputs(dtype) -> None:  # noqa: ANN001
    """A fused product's part is a block of columns of a wider column-major matrix (row stride > its width); more
    outputs than one tile (4,096) take several tiles; a narrow matrix fetches its next rows ahead."""
    torch.manual_seed(0)
    fused = torch.randn(4200 + 96, 64).to(dtype).t().contiguous().t()  # (out, in) column-major
    x = torch.randn(2, 1, 64)
    for part in fused.split([4200, 64, 32]):  # column blocks: W^T views with row stride 4,296
        expected = F.linear(x.double(), part.double()).float()
        torch.testing.assert_close(decode_kernels.linear(x, part, None), expected, rtol=1e-5, atol=1e-4)
    narrow = torch.randn(40, 576).to(dtype).t().contiguous().t()  # 8 rows of W^T = 8 x 40 values: fetched ahead
    x = torch.randn(2, 1, 576)
    torch.testing.assert_close(decode_kernels.linear(x, narrow, None), F.linear(x.double(), narrow.double()).float(),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_avx2_and_plain_builds_equal_the_native_one() -> None:
    """`linear` and `decode_attention` compiled for an AVX2-only CPU and for plain x86-64 (a CI machine may lack the
    AVX-512 paths this one takes): linear on narrow and wide outputs and each weight dtype against the float64
    reference the native build meets; attention (GQA, a float32 and a bfloat16 cache, heads of 64 and 48) against
    the native build."""
    from llmkit.extensions import build_ops

    builds = {"llmkit_nn_avx2": ["-O1", "-march=haswell"], "llmkit_nn_plain": ["-O1", "-march=x86-64"]}
    for ops, flags in builds.items():
        build_ops(ops, [decode_kernels.SOURCE], flags=flags, what=f"decode kernels ({ops})")
    torch.manual_seed(0)
    for out_features, in_features in [(576, 1536), (1536, 576), (37, 200), (4200, 64)]:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            weight = torch.randn(out_features, in_features).to(dtype).t().contiguous().t()
            x, b = torch.randn(3, 1, in_features), torch.randn(out_features)
            expected = F.linear(x.double(), weight.double(), b.double()).float()
            for ops in builds:
                got = getattr(torch.ops, ops).linear(x, weight.t(), b)
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * in_features**0.5, msg=ops)
    for dtype in (torch.float32, torch.bfloat16):
        for head_dim in (64, 48):
            q = torch.randn(2, 9, 1, head_dim)
            new = (torch.randn(2, 3, 1, head_dim), torch.randn(2, 3, 1, head_dim))  # the token's key and value
            caches = (torch.randn(2, 3, 300, head_dim).to(dtype), torch.randn(2, 3, 300, head_dim).to(dtype))
            rope = (torch.randn(2, 1, 1, head_dim), torch.randn(2, 1, 1, head_dim))
            outputs = {ops: getattr(torch.ops, ops).decode_attention(q, *new, *(c.clone() for c in caches), 250, None,
                                                                     0, head_dim**-0.5, *rope)
                       for ops in [decode_kernels.OPS, *builds]}
            for ops in builds:
                torch.testing.assert_close(outputs[ops], outputs[decode_kernels.OPS], rtol=1e-5, atol=1e-6,
                                           msg=f"{ops} {dtype} {head_dim}")


def test_linear_refuses_a_row_major_weight() -> None:
    with pytest.raises(RuntimeError, match="unit stride along out"):
        torch.ops.llmkit_nn.linear(torch.randn(1, 64), torch.randn(32, 64).t(), None)  # W^T with stride (1, 64)


def test_linear_takes_decode_steps_of_column_major_weights(monkeypatch) -> None:  # noqa: ANN001
    """A decoder whose weights are column-major (what load_model and load_decoder keep) runs its decode-step
    products on the op, eagerly and inside a compiled step, with the logits of F.linear."""
    from llmkit.generate import compile_decode_step, decode_step
    from llmkit.nn.linear import use_column_major_weights

    torch.manual_seed(4)
    model = use_column_major_weights(Decoder(tiny_config()).eval())
    prompt = torch.randint(0, 97, (2, 6))
    calls = []
    original = decode_kernels.linear
    monkeypatch.setattr(decode_kernels, "linear", lambda *a: calls.append(1) or original(*a))
    native = decode_logits(model, prompt, 4)
    assert len(calls) >= 4 * 3 * 3  # each step: at least q/k/v-or-fused, o and the MLP in every layer
    monkeypatch.setattr(decode_kernels, "applies", lambda x: False)
    reference = decode_logits(model, prompt, 4)
    torch.testing.assert_close(native, reference, rtol=1e-4, atol=1e-4)
    monkeypatch.undo()
    compile_decode_step(model)
    step = decode_step(model)
    cache = model.new_cache(2, 10)
    with torch.inference_mode():
        model(prompt, cache)
        compiled = torch.stack([step(torch.full((2, 1), 3 + i), cache=cache)[:, -1] for i in range(4)], 1)
    torch.testing.assert_close(compiled, native, rtol=1e-4, atol=1e-4)


def reference_attention(q, keys, values, slot, valid, window, scale):  # noqa: ANN001, ANN201
    """float64 softmax(scale q K^T) V over the slots a one-token query may see; q (B, H, 1, D), caches (B, Hkv, S, D)."""
    B, H, _, D = q.shape
    group = H // keys.shape[1]
    k = keys[:, :, : slot + 1].double().repeat_interleave(group, 1)  # (B, H, S', D)
    v = values[:, :, : slot + 1].double().repeat_interleave(group, 1)
    scores = (q.double() @ k.transpose(-1, -2)) * scale  # (B, H, 1, S')
    s = torch.arange(slot + 1)
    seen = torch.ones(B, slot + 1, dtype=torch.bool) if valid is None else valid[:, : slot + 1].clone()
    seen[:, slot] = True
    if window:
        seen &= (slot - s < window)[None]
    scores = scores.masked_fill(~seen[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, 1, H * D)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("heads", "kv_heads", "slot", "window", "padded"),
                         [(9, 3, 200, 0, False), (4, 1, 150, 64, False), (2, 2, 0, 0, False), (6, 2, 70, 0, True),
                          (4, 2, 130, 32, True)])
def test_decode_attention_matches_reference(dtype, heads, kv_heads, slot, window, padded) -> None:  # noqa: ANN001
    torch.manual_seed(slot + heads)
    B, D, S = 2, 64, 256
    keys = torch.randn(B, kv_heads, S, D).to(dtype)
    values = torch.randn(B, kv_heads, S, D).to(dtype)
    q = torch.randn(B, heads, 1, D)
    k_new, v_new = torch.randn(B, kv_heads, 1, D), torch.randn(B, kv_heads, 1, D)
    valid = None
    if padded:
        valid = torch.ones(B, S, dtype=torch.bool)
        valid[1, :40] = False  # row 1 is left-padded
    before_k, before_v = keys.clone(), values.clone()
    out = decode_kernels.decode_attention(q, k_new, v_new, keys, values, slot, valid, window, D**-0.5)
    # the new key and value took their slot, rounded to the cache's dtype; nothing else moved
    assert torch.equal(keys[:, :, slot], k_new[:, :, 0].to(dtype))
    assert torch.equal(values[:, :, slot], v_new[:, :, 0].to(dtype))
    keys[:, :, slot], values[:, :, slot] = before_k[:, :, slot], before_v[:, :, slot]
    assert torch.equal(keys, before_k) and torch.equal(values, before_v)
    keys[:, :, slot], values[:, :, slot] = k_new[:, :, 0].to(dtype), v_new[:, :, 0].to(dtype)
    expected = reference_attention(q, keys, values, slot, valid, window, D**-0.5)
    assert out.shape == (B, 1, heads * D) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rotary", [64, 32])  # 32: partial rotary, the last 32 channels pass through
@pytest.mark.parametrize("rows_of_tables", [2, 1])  # per-row positions (left padding), or one shared table
def test_decode_attention_rotates_query_and_key_as_apply_rope(rotary, rows_of_tables) -> None:  # noqa: ANN001
    """With cos/sin the op rotates q and the new key itself: the same output and cache as rotating them first with
    nn.position.apply_rope and calling the op without tables."""
    from llmkit.nn.position import apply_rope, rope_cos_sin, rope_inverse_frequencies

    torch.manual_seed(rotary + rows_of_tables)
    B, H, Hkv, D, S, slot = 2, 6, 2, 64, 32, 17
    positions = torch.tensor([[slot], [slot - 5]])[:rows_of_tables]  # (rows, 1)
    cos, sin = rope_cos_sin(positions, rope_inverse_frequencies(rotary, 10000.0, None), torch.float32)  # (rows,1,1,R)
    qkv = torch.randn(B, 1, (H + 2 * Hkv) * D)
    q, k, v = qkv.view(B, 1, H + 2 * Hkv, D).transpose(1, 2).split([H, Hkv, Hkv], dim=1)  # strided views
    caches = [torch.randn(B, Hkv, S, D) for _ in range(2)]
    rotated_caches = [c.clone() for c in caches]
    out = decode_kernels.decode_attention(q, k, v, *caches, slot, None, 0, D**-0.5, cos, sin)
    expected = decode_kernels.decode_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, *rotated_caches,
                                               slot, None, 0, D**-0.5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[0], rotated_caches[0], rtol=1e-6, atol=1e-6)  # the stored key is rotated
    assert torch.equal(caches[1], rotated_caches[1])
    with pytest.raises(RuntimeError, match="cos and sin must be float32"):
        decode_kernels.decode_attention(q, k, v, *caches, slot, None, 0, D**-0.5, cos.double(), sin.double())


def test_decode_attention_reads_strided_queries() -> None:
    """q, k and v come out of the fused projection as views with gaps between heads and rows."""
    torch.manual_seed(1)
    qkv = torch.randn(2, 1, 8 * 64)  # (B, T, (H + 2 Hkv) D) with H = 4, Hkv = 2
    q, k, v = qkv.view(2, 1, 8, 64).transpose(1, 2).split([4, 2, 2], dim=1)  # views, not copies
    keys, values = torch.zeros(2, 2, 16, 64), torch.zeros(2, 2, 16, 64)
    out = decode_kernels.decode_attention(q, k, v, keys, values, 0, None, 0, 0.125)
    # a single slot: the output is its value, for every query head of the group
    torch.testing.assert_close(out.view(2, 4, 64), v.repeat_interleave(2, 1)[:, :, 0], rtol=1e-6, atol=1e-6)


def tiny_config(**overrides) -> Config:  # noqa: ANN003
    fields = dict(name="tiny", vocab_size=97, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=96,
                  max_seq_len=128)
    return Config(**{**fields, **overrides})


def decode_logits(model: Decoder, prompt: torch.Tensor, steps: int, attention_mask=None) -> torch.Tensor:  # noqa: ANN001
    """Prefill then `steps` one-token forwards of fixed ids; their logits (B, steps, vocab)."""
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + steps)
    logits = []
    with torch.inference_mode():
        model(prompt, cache, attention_mask=attention_mask)
        mask = attention_mask
        for i in range(steps):
            token = torch.full((prompt.shape[0], 1), 3 + i)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(token)], 1)
            logits.append(model(token, cache, attention_mask=None if mask is None else mask[:, -1:])[:, -1])
    return torch.stack(logits, 1)


GEMMA3_LIKE = {"sliding_window": 8, "layer_types": ("local", "global", "local"), "qk_norm": True, "post_norms": True,
               "rope_local_theta": 10000.0, "norm_offset": 1.0}


@pytest.mark.parametrize("overrides", [{}, GEMMA3_LIKE], ids=["llama", "gemma3-like"])
@pytest.mark.parametrize("kv_dtype", [None, torch.bfloat16, torch.float16])
def test_decoder_steps_equal_pytorch_path(monkeypatch, overrides, kv_dtype) -> None:  # noqa: ANN001
    """A whole decoder's one-token steps (left padding, a sliding window past its length, a bfloat16 or float16
    cache) give the logits of the PyTorch path, which the decode ops replace."""
    torch.manual_seed(0)
    model = Decoder(tiny_config(**overrides)).eval()
    model.kv_dtype = kv_dtype
    prompt = torch.randint(0, 97, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0
    calls = {"attention": 0, "norm": 0}
    for name in ("decode_attention", "rms_norm"):
        original = getattr(decode_kernels, name)

        def counted(*args, _original=original, _key="attention" if "attention" in name else "norm"):  # noqa: ANN002, ANN202
            calls[_key] += 1
            return _original(*args)

        monkeypatch.setattr(decode_kernels, name, counted)
    native = decode_logits(model, prompt, 10, mask)
    assert calls["attention"] == 10 * 3 and calls["norm"] > 0  # every step's every layer took the op
    monkeypatch.setattr(decode_kernels, "applies", lambda x: False)
    reference = decode_logits(model, prompt, 10, mask)
    # both read the half cache's values into float32 arithmetic, except on CPUs with a fast path for its dtype
    # (FAST_HALF_ATTENTION_ON_CPU), where the PyTorch path attends in it (q and the probabilities rounded too): that
    # dtype's rounding, not more
    tolerance = 1e-4 if kv_dtype not in FAST_HALF_ATTENTION_ON_CPU else 2e-3
    torch.testing.assert_close(native, reference, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fast", [False, True])
def test_prefill_attends_in_a_half_cache_dtype_only_where_the_cpu_is_fast_in_it(monkeypatch, kv_dtype, fast) -> None:  # noqa: ANN001
    """A prompt over a half-precision cache attends in the cache's dtype only where FAST_HALF_ATTENTION_ON_CPU lists
    it (bfloat16 with AVX512-BF16/AMX, float16 with AMX-FP16), else in float32 over the values widened."""
    import llmkit.nn.attention as attention

    monkeypatch.setattr(attention, "FAST_HALF_ATTENTION_ON_CPU", frozenset([kv_dtype] if fast else []))
    seen = []
    real = attention.sdpa_attention
    monkeypatch.setattr(attention, "sdpa_attention",
                        lambda q, k, *rest: seen.append((q.dtype, k.dtype)) or real(q, k, *rest))
    model = Decoder(tiny_config()).eval()
    model.kv_dtype = kv_dtype
    with torch.inference_mode():
        model(torch.randint(0, 97, (1, 6)), model.new_cache(1, 8))
    assert seen and set(seen) == {(kv_dtype, kv_dtype) if fast else (torch.float32, torch.float32)}


def test_ops_stay_out_of_training_and_prefill(monkeypatch) -> None:  # noqa: ANN001
    """With autograd on, or several new tokens, the PyTorch path runs (the ops have no backward)."""
    monkeypatch.setattr(decode_kernels, "decode_attention", lambda *a: pytest.fail("decode_attention used"))
    model = Decoder(tiny_config())
    attention = model.blocks[0].attn
    assert isinstance(attention, Attention)
    loss = model(torch.randint(0, 97, (2, 9))).sum()  # training forward: no cache, grad on
    loss.backward()
    assert model.blocks[0].attn_norm.weight.grad is not None
    with torch.inference_mode():
        cache = model.new_cache(1, 16)
        model(torch.randint(0, 97, (1, 5)), cache)  # a prefill of 5 tokens


def test_generation_without_native_ops(monkeypatch) -> None:  # noqa: ANN001
    """LLMKIT_NATIVE_KERNELS=0 (or no compiler) keeps PyTorch's ops: greedy tokens are the same."""
    torch.manual_seed(2)
    model = Decoder(tiny_config()).eval()
    prompt = [[5, 9, 11, 2]]

    def greedy() -> list[int]:
        with torch.inference_mode():
            return [int(step[0]) for step in generate_tokens(model, prompt, max_new_tokens=12,
                                                             settings=SamplingSettings(), stop_ids=set())]

    native = greedy()
    monkeypatch.setattr(decode_kernels, "available", lambda: False)
    assert greedy() == native


def test_full_sequences_and_autocast_keep_pytorch_ops(monkeypatch) -> None:  # noqa: ANN001
    """A full-sequence forward gives bit-identical logits with and without autograd (DPO's cached reference
    log-probabilities and PPO's zero KL at step 0 rest on it), and decode steps under bfloat16 autocast run (the ops
    take float32 projections only)."""
    torch.manual_seed(3)
    model = Decoder(tiny_config()).eval()
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        inference = model(ids)
    assert torch.equal(model(ids).detach(), inference)
    monkeypatch.setattr(decode_kernels, "decode_attention", lambda *a: pytest.fail("decode_attention under autocast"))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        cache = model.new_cache(1, 8)
        model(ids[:1, :4], cache)
        assert model(ids[:1, 4:5], cache).shape == (1, 1, 97)
