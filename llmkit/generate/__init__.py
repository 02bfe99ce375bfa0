"""Text generation: sampling processors and the KV-cached decode loop (`generate`, `stream`)."""

from llmkit.generate.compiled import compile_decode_step, decode_step
from llmkit.generate.decode import (
    DEFAULT_MAX_NEW_TOKENS,
    StopStringFilter,
    cut_at_stop,
    fit_prompt,
    generate,
    generate_tokens,
    stream,
    tokenizer_stop_ids,
)
from llmkit.generate.sampling import (
    SamplingSettings,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    make_generator,
    process_logits,
    sample_next,
    seen_tokens,
)

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "SamplingSettings",
    "StopStringFilter",
    "apply_repetition_penalty",
    "apply_temperature",
    "apply_top_k",
    "apply_top_p",
    "compile_decode_step",
    "cut_at_stop",
    "decode_step",
    "fit_prompt",
    "generate",
    "generate_tokens",
    "make_generator",
    "process_logits",
    "sample_next",
    "seen_tokens",
    "stream",
    "tokenizer_stop_ids",
]
