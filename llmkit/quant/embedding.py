"""`QuantEmbedding`: a token embedding whose table stays packed. A lookup dequantizes only the rows it reads
(`QuantLinear.dequantized_rows`), so the table costs its packed size in RAM, not 4 bytes per value. With a tied LM
head (SmolLM2: the head is the embedding table, Q8_0 in its GGUF) the table *is* the head's QuantLinear, one set of
packed bytes serving both: `model.lm_head is model.embed.table`.

The Decoder reads the activations' dtype and device off its embedding: a float table has them as `weight.dtype`;
this module, which has no float table, declares them as `dtype` and `device` (llmkit/models/decoder.py)."""

from __future__ import annotations

import torch
from torch import nn

from llmkit.quant.linear import QuantLinear


class QuantEmbedding(nn.Module):
    """Embedding lookup x = W_hat[ids] (..., C) in `dtype` from a packed (vocab, C) table."""

    def __init__(self, table: QuantLinear, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.table = table
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features

    @property
    def device(self) -> torch.device:
        return next(self.table.buffers()).device

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.table.dequantized_rows(ids.reshape(-1), self.dtype)  # (n, C), only the rows looked up
        return rows.view(*ids.shape, self.embedding_dim)

    def _apply(self, fn, recurse=True):  # noqa: ANN001 (torch's signature)
        # model.to(dtype) changes the dtype of the activations the lookup produces (the table stays packed)
        probe = fn(torch.empty(0, dtype=self.dtype))
        if probe.is_floating_point():
            self.dtype = probe.dtype
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, dtype={self.dtype}, scheme={self.table.scheme}"
