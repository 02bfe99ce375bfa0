"""What the serving engine accepts, checked before any compute: its settings (`check_engine_settings`) and each
request (`check_request`: the prompt's ids, the token budget against the context and the KV budget, log-probs,
penalties, sampling settings, the adapter it names). Every refusal is one line that names the field and the fix."""

from __future__ import annotations

from typing import Any

from llmkit.errors import LlmkitError
from llmkit.serve.request import MAX_TOP_LOGPROBS, Request


def one_line(error: Exception) -> str:
    """An exception as the one-line message a finished-with-error event carries."""
    return " ".join(f"{type(error).__name__}: {error}".split())


def check_engine_settings(config: Any, max_batch_size: int, max_queue: int, prefill_chunk: int) -> None:
    """Raise LlmkitError unless the sizes are integers >= 1 and the model is one the engine can page (attention)."""
    for name, value in (("max_batch_size", max_batch_size), ("max_queue", max_queue),
                        ("prefill_chunk", prefill_chunk)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LlmkitError(f"engine setting {name}={value!r} must be an integer >= 1")
    if config.recurrent_layers:
        raise LlmkitError(f"{config.name} has {config.layer_mixers[config.recurrent_layers[0]]} "
                          "layers; the serving engine pages attention's KV cache only: use `llmkit generate`")


def check_kv_cache_tokens(kv_cache_tokens: Any, given: Any) -> None:
    """Raise LlmkitError unless the KV budget (`given` by the caller, None: derived) is an integer >= 2."""
    if isinstance(kv_cache_tokens, bool) or not isinstance(kv_cache_tokens, int) or kv_cache_tokens < 2:
        raise LlmkitError(f"engine setting kv_cache_tokens={given!r} must be an integer >= 2 "
                          "(prompt + new tokens of the longest request)")


def check_request(request: Request, config: Any, kv_cache_tokens: int, adapters: Any) -> None:
    """Raise LlmkitError when `request` cannot run on this engine (model `config`, `kv_cache_tokens` budget,
    `adapters` an AdapterRegistry or None); UnknownAdapterError when it names an adapter not offered."""
    prompt, vocab, context = request.prompt_ids, config.vocab_size, config.max_seq_len
    if not prompt:
        raise LlmkitError("prompt is empty (0 tokens); give at least one token to continue from")
    if any(isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab for token in prompt):
        bad = next(token for token in prompt if isinstance(token, bool) or not isinstance(token, int)
                   or not 0 <= token < vocab)
        raise LlmkitError(f"prompt holds token id {bad!r}, outside {config.name}'s vocabulary of {vocab:,} "
                          "ids; use the tokenizer that belongs to this model")
    new = request.max_new_tokens
    if isinstance(new, bool) or not isinstance(new, int) or new < 1:
        raise LlmkitError(f"max_new_tokens={new!r} must be an integer >= 1")
    total = len(prompt) + new
    if total > context:
        raise LlmkitError(f"prompt of {len(prompt):,} tokens + max_new_tokens={new:,} is {total:,} tokens, over "
                          f"{config.name}'s context of {context:,}; shorten the prompt or ask for at "
                          f"most {max(context - len(prompt), 0):,} new tokens")
    if total > kv_cache_tokens:
        raise LlmkitError(f"prompt of {len(prompt):,} tokens + max_new_tokens={new:,} is {total:,} tokens, over "
                          f"the engine's kv_cache_tokens={kv_cache_tokens:,}; ask for fewer tokens or "
                          "raise kv_cache_tokens")
    k = request.logprobs
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_TOP_LOGPROBS):
        raise LlmkitError(f"logprobs={k!r} must be an integer from 0 to {MAX_TOP_LOGPROBS} (or None for none)")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(request, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -2.0 <= value <= 2.0:
            raise LlmkitError(f"{name}={value!r} must be a number from -2.0 to 2.0 (OpenAI's range); 0 is off")
    request.sampling.validate()
    if request.adapter is not None:
        if adapters is None:
            raise LlmkitError(f"the request names adapter {request.adapter!r} but this engine serves no adapters; "
                              "give the Engine an AdapterRegistry (llmkit.serve.adapters)")
        adapters.require(request.adapter)
