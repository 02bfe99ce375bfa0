"""Decoder behaviour that needs no reference library: kernels agree, the KV cache is exact, padding
is invisible. Parity with transformers lives in tests/test_checkpoints_hf.py."""

import pytest
import torch

from llmkit import Config, LlmkitError
from llmkit.models.decoder import Decoder

# fp32 kernels differ only in summation order: 1e-5 is far above that noise and far below any bug.
TOLERANCE = 1e-5

VARIANTS = {
    "llama-gqa": dict(n_heads=4, n_kv_heads=2),
    "mqa": dict(n_heads=4, n_kv_heads=1),
    "gpt2-like": dict(norm="layernorm", mlp="gelu", position="learned", qkv_bias=True, out_bias=True, mlp_bias=True,
                      tie_embeddings=True),
    "alibi": dict(position="alibi", n_heads=6, d_model=96),
    "rope-llama3-scaling": dict(rope_scaling=dict(kind="llama3", factor=8.0, original_max_seq_len=32)),
}


def make_model(**fields) -> Decoder:
    torch.manual_seed(0)
    config = Config(**{**dict(vocab_size=97, n_layers=2, n_heads=4, d_model=64, max_seq_len=128), **fields})
    return Decoder(config).eval()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_sdpa_equals_reference_kernel(variant):
    model = make_model(**VARIANTS[variant])
    ids = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        fast = model(ids)
        model.kernel = "reference"
        slow = model(ids)
    assert (fast - slow).abs().max() < TOLERANCE


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_incremental_decoding_equals_full_forward(variant):
    model = make_model(**VARIANTS[variant])
    ids = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(batch_size=2, max_len=40)
        pieces = [model(ids[:, :10], cache=cache), model(ids[:, 10:17], cache=cache)]  # prefill, then a chunk
        pieces += [model(ids[:, t : t + 1], cache=cache) for t in range(17, 30)]  # one token at a time
    assert cache.length == 30
    assert (torch.cat(pieces, dim=1) - full).abs().max() < TOLERANCE


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_left_padding_is_invisible(variant):
    model = make_model(**VARIANTS[variant])
    short = torch.randint(0, 97, (1, 12))
    long = torch.randint(0, 97, (1, 20))
    batch = torch.cat([torch.cat([torch.zeros(1, 8, dtype=torch.long), short], dim=1), long])
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[0, :8] = 0
    with torch.no_grad():
        alone = model(short)
        cache = model.new_cache(batch_size=2, max_len=24)
        padded = model(batch, cache=cache, attention_mask=mask)
        next_ids = torch.randint(0, 97, (2, 1))
        step = model(next_ids, cache=cache, attention_mask=torch.ones(2, 1))
        alone_step = model(torch.cat([short, next_ids[:1]], dim=1))[:, -1]
    assert (padded[0, 8:] - alone[0]).abs().max() < TOLERANCE
    assert (padded[1] - model(long)[0]).abs().max() < TOLERANCE
    assert (step[0, 0] - alone_step[0]).abs().max() < TOLERANCE


def test_last_token_only_matches_full_logits():
    model = make_model()
    ids = torch.randint(0, 97, (3, 9))
    with torch.no_grad():
        assert torch.allclose(model(ids, last_token_only=True)[:, 0], model(ids)[:, -1], atol=TOLERANCE)


def test_logits_at_gives_the_full_logits_of_the_chosen_positions_and_their_gradients():
    model = make_model()
    ids = torch.randint(0, 97, (3, 9))
    chosen = torch.rand(3, 9) < 0.3  # (B, T)
    full = model(ids)
    some = model(ids, logits_at=chosen)
    assert some.shape == (int(chosen.sum()), 97)
    assert torch.allclose(some, full[chosen], atol=TOLERANCE)
    # the same loss, so the same gradients: the head's work at other positions was never needed
    targets = torch.randint(0, 97, (int(chosen.sum()),))
    expected = torch.autograd.grad(torch.nn.functional.cross_entropy(full[chosen], targets), model.embed.weight)[0]
    got = torch.autograd.grad(torch.nn.functional.cross_entropy(some, targets), model.embed.weight)[0]
    assert torch.allclose(got, expected, atol=TOLERANCE)
    with pytest.raises(LlmkitError, match=r"logits_at must be a boolean \(batch, tokens\) = \(3, 9\) mask"):
        model(ids, logits_at=chosen[:, :4])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_inputs_embeds_stand_in_for_the_token_embeddings(variant):
    model = make_model(**VARIANTS[variant])
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        expected = model.hidden_states(ids)
        assert torch.equal(model.hidden_states(None, inputs_embeds=model.embed(ids)), expected)
        shifted = model.embed(ids) + 0.5  # the embeddings given are the ones used (prompt tuning relies on it)
        assert (model.hidden_states(None, inputs_embeds=shifted) - expected).abs().max() > 1e-2


def test_position_tables_are_none_where_the_scheme_has_none():
    assert make_model(position="learned").inv_freq is None and make_model(position="learned").alibi_slopes is None
    alibi = make_model(position="alibi", n_heads=6, d_model=96).to(torch.bfloat16)
    assert alibi.inv_freq is None and alibi.alibi_slopes.dtype == torch.float32
    assert not any(name in alibi.state_dict() for name in ("inv_freq", "alibi_slopes"))  # derived, never saved


def test_bfloat16_stays_close_to_float32():
    model = make_model(n_heads=4, n_kv_heads=2)
    ids = torch.randint(0, 97, (1, 16))
    with torch.no_grad():
        reference = model(ids)
        low = model.to(torch.bfloat16)(ids).float()
    assert model.inv_freq.dtype == torch.float32  # position tables never rounded
    # bf16 keeps ~3 significant digits; logits here are O(0.1), so 2e-2 bounds accumulated rounding.
    assert (low - reference).abs().max() < 2e-2


def test_tied_head_shares_the_embedding():
    model = make_model(tie_embeddings=True)
    assert model.lm_head is None
    with torch.no_grad():
        model.embed.weight[5].fill_(3.0)
        hidden = torch.randn(64)
    assert "lm_head.weight" not in model.state_dict()
    assert torch.allclose(torch.nn.functional.linear(hidden, model.embed.weight)[5], hidden.sum() * 3.0, atol=1e-4)


def test_context_window_and_cache_errors():
    model = make_model(max_seq_len=16)
    with pytest.raises(LlmkitError, match="sequence of 17 tokens exceeds .* context window of 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    cache = model.new_cache(batch_size=1, max_len=8)
    model(torch.zeros(1, 6, dtype=torch.long), cache=cache)
    with pytest.raises(LlmkitError, match="KV cache is full: 6 tokens stored \\+ 3 new > 8 slots"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(LlmkitError, match="made for batch size 1, got a batch of 2"):
        model(torch.zeros(2, 1, dtype=torch.long), cache=cache)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rmsnorm_equals_float32_math_rounded_once(dtype):
    """RMSNorm's short paths (one kernel in fp32; no explicit upcast for bf16/fp16 on CPU) give exactly the numbers
    of the written-out float32 computation, rounded to the input dtype, then times the weight (Llama's order)."""
    from llmkit.nn.norm import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(96, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    norm = norm.to(dtype)
    x = (torch.randn(3, 5, 96) * 4).to(dtype)
    x32 = x.float()
    expected = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype) * norm.weight
    # float32: the fused kernel may order the mean's sum differently (1 ulp); half dtypes round to the same value
    tolerance = 1e-6 if dtype == torch.float32 else 0.0
    torch.testing.assert_close(norm(x), expected, atol=tolerance, rtol=tolerance)
