"""A KV cache in another dtype than the activations (Decoder.kv_dtype): half the bytes in bfloat16, attention in the
cache's dtype, the same tokens through the serving engine's per-row cache as through the plain decode loop."""

from __future__ import annotations

import pytest
import torch
from helpers import byte_tokenizer, run_cli, tiny_decoder

from llmkit.generate import generate_tokens
from llmkit.nn.attention import causal_context, reference_attention
from llmkit.serve import Engine, Request

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bfloat16_cache_holds_half_the_bytes_and_fp32_model_keeps_fp32_activations() -> None:
    model = tiny_decoder()
    fp32_bytes = sum(t.nbytes for t in model.new_cache(2, 64).keys)
    model.kv_dtype = torch.bfloat16
    cache = model.new_cache(2, 64)
    assert cache.keys[0].dtype == cache.values[0].dtype == torch.bfloat16
    assert sum(t.nbytes for t in cache.keys) * 2 == fp32_bytes
    with torch.inference_mode():
        logits = model(torch.tensor([[1, 2, 3], [4, 5, 6]]), cache=cache)
    assert logits.dtype == torch.float32


def test_attention_over_a_bfloat16_cache_is_attention_over_rounded_keys_and_values() -> None:
    """The first layer's attention output with the cache in bf16 equals the float32 reference attention of
    bf16-rounded q, k and v, up to bf16 arithmetic inside the kernel."""
    model = tiny_decoder()
    block = model.blocks[0]
    captured = {}
    hook = block.attn.o_proj.register_forward_hook(lambda module, args, out: captured.__setitem__("attended", args[0]))
    ids = torch.tensor([[5, 17, 3, 99, 42, 7, 8, 200]])
    try:
        with torch.inference_mode():
            model.kv_dtype = torch.bfloat16
            model(ids, cache=model.new_cache(1, 16))
    finally:
        hook.remove()
    with torch.inference_mode():
        context = causal_context(model.config, 1, ids.shape[1], None, None, None, inv_freq=model.inv_freq,
                                 local_inv_freq=model.local_inv_freq, alibi_slopes=model.alibi_slopes,
                                 dtype=torch.float32, device=ids.device, kernel="reference")
        q, k, v = block.attn.project_qkv(block.attn_norm(model.embed(ids)), context)
        rounded = [t.to(torch.bfloat16).float() for t in (q, k, v)]
        reference = reference_attention(*rounded, context.mask, context.is_causal, block.attn.scale)
    reference = reference.transpose(1, 2).reshape(captured["attended"].shape)  # (B, T, H*D)
    torch.testing.assert_close(captured["attended"], reference, atol=2e-2, rtol=2e-2)


def test_engine_rows_with_a_bfloat16_cache_give_the_plain_loops_tokens() -> None:
    model = tiny_decoder()
    model.kv_dtype = torch.bfloat16
    prompts = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(70 + n)).tolist() for n in (4, 19, 33)]
    engine = Engine(model)
    handles = [engine.submit(Request(prompt, 10)) for prompt in prompts]
    while engine.stats().running or engine.stats().waiting:
        engine.step()
    assert engine.slots.cache.keys[0].dtype == torch.bfloat16
    expected = [[s[0] for s in generate_tokens(model, prompt, 10) if s[0] is not None] for prompt in prompts]
    got = [[e.token_id for e in handle.events_ready() if e.token_id is not None] for handle in handles]
    assert got == expected


def test_cli_generate_takes_kv_cache_dtype(tmp_path, capsys: pytest.CaptureFixture) -> None:
    from llmkit.checkpoints import save_model

    save_model(tiny_decoder(), tmp_path / "tiny", tokenizer=byte_tokenizer())
    code, out, err = run_cli(capsys, "generate", "--model", str(tmp_path / "tiny"), "--prompt", "abc",
                             "--max_new_tokens", "4", "--kv_cache_dtype", "bfloat16")
    assert code == 0, err
    code, _, err = run_cli(capsys, "generate", "--model", str(tmp_path / "tiny"), "--prompt", "abc",
                           "--kv_cache_dtype", "int8")
    assert code == 2 and "kv_cache_dtype" in err
