"""`llmkit perplexity`: score your own text with a model (sliding-window perplexity, bits per byte)."""

from __future__ import annotations

import json
from pathlib import Path

from llmkit.commands.common import Device, Dtype, model_path, with_adapter

DEMO_MAX_TOKENS = 2048  # without --data: the first tokens of the built-in Tiny Shakespeare


def perplexity(
    model: str | None = None,
    data: str | None = None,
    adapter: str | None = None,
    window: int | None = None,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 4,
    output: str | None = None,
    dtype: Dtype = "float32",
    device: Device = "auto",
) -> dict[str, float | int]:
    """Perplexity and bits per byte of a text file under a model, with a sliding window.

    Example: llmkit perplexity                                  (SmolLM2 on 2,048 tokens of Tiny Shakespeare)
             llmkit perplexity --model my_model/ --data notes.txt --window 512 --stride 256
             llmkit perplexity --data book.txt --max_tokens 10000 --output book_perplexity.json

    Windows of WINDOW tokens start every STRIDE tokens and each scores only the tokens the previous window did not,
    so every scored token sees at least WINDOW - STRIDE tokens of context. Bits per byte do not depend on the
    tokenizer, so models with different vocabularies compare on it.

    Args:
        model: .gguf file, Hugging Face directory or llmkit directory (default: SmolLM2-135M-Instruct).
        data: UTF-8 text file to score (default: the built-in Tiny Shakespeare, first 2,048 tokens).
        adapter: fine-tuned adapter directory to apply (llmkit finetune's OUTPUT/adapter, or a PEFT adapter).
        window: tokens per window (default: the model's context length).
        stride: tokens between window starts (default: half the window).
        max_tokens: score only the first tokens of the text (default: all of --data).
        batch_size: windows per forward pass.
        output: also write the figures to this JSON file.
        dtype: weights' dtype.
        device: auto, cpu, cuda or cuda:N.
    """
    from llmkit.checkpoints import load_tokenizer
    from llmkit.commands.common import load_decoder
    from llmkit.data.sources import builtin_corpus_path
    from llmkit.eval.perplexity import file_perplexity
    from llmkit.io import atomic_write_text

    path = model_path(model)
    llm = load_decoder(path, dtype, device)
    if adapter:
        llm = with_adapter(llm, adapter, path)
    if data is None:
        data, max_tokens = str(builtin_corpus_path()), max_tokens or DEMO_MAX_TOKENS
    result = file_perplexity(llm, load_tokenizer(path), data, window=window, stride=stride, batch_size=batch_size,
                             max_tokens=max_tokens, progress=True)
    figures = result.to_dict()
    print(f"{Path(data).name} under {llm.config.name}: {result.n_tokens:,} tokens scored in {result.n_windows:,} "
          f"window(s) of {result.window:,} (stride {result.stride:,})")
    print(f"  perplexity      {result.perplexity:10.3f}\n  bits per byte   {result.bits_per_byte:10.4f}\n"
          f"  mean NLL        {result.mean_nll:10.4f} nats per token")
    if output:
        atomic_write_text(Path(output), json.dumps({"model": str(path), "data": data, **figures}, indent=2) + "\n")
        print(f"wrote {output}")
    return figures
