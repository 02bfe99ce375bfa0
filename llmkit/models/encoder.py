"""Bidirectional encoder (BERT, Devlin et al. 2019; MiniLM / sentence-transformers), read top to bottom:

    tokens -> word + token-type + position embeddings -> LayerNorm -> n_layers x post-norm Block -> hidden states
    heads:  masked LM             dense -> gelu -> LayerNorm -> decoder tied to the word embeddings + bias  (B, T, V)
            sequence classifier   [CLS] hidden -> pooler dense -> tanh -> linear                           (B, labels)
            token classifier      linear on every token (NER)                                          (B, T, labels)
            sentence embedding    mean over the real tokens, optionally L2-normalised                      (B, C)

Every token attends to every real token of its sequence (no causal mask); padding keys are hidden by the
attention_mask. Positions count 0..T-1 from the left, as in BERT: pad on the right. Post-norm (BERT) puts a
LayerNorm after each residual add: x = norm(x + f(x)); with `post_norm=False` the blocks are pre-norm and a final
norm follows them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.config import Config
from llmkit.errors import LlmkitError
from llmkit.nn.attention import AttentionContext, AttentionKernel
from llmkit.nn.block import build_block
from llmkit.nn.linear import Linear, linear
from llmkit.nn.mlp import gelu
from llmkit.nn.norm import build_norm


class Encoder(nn.Module):
    """The BERT body: contextual hidden states (B, T, C) of every token."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        if config.position != "learned":
            raise LlmkitError(f"config {config.name!r}: the encoder uses learned absolute positions (BERT); "
                              f"got position={config.position!r}: set position='learned'")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.type_embed = nn.Embedding(config.type_vocab_size, config.d_model) if config.type_vocab_size else None
        self.pos_embed = nn.Embedding(config.max_seq_len, config.d_model)
        self.embed_norm = build_norm(config) if config.post_norm else None
        self.blocks = nn.ModuleList(build_block(config, i) for i in range(config.n_layers))
        self.final_norm = None if config.post_norm else build_norm(config)  # pre-norm leaves the stream unnormalised
        self.kernel: AttentionKernel = "sdpa"
        if not self.embed.weight.is_meta:  # meta = shapes only: checkpoint loading assigns the weights
            initialise(self, config.n_layers)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states (B, T, C) of token ids (B, T); `attention_mask` (B, T) is 1 for real tokens, 0 for padding."""
        B, T = input_ids.shape
        if T > self.config.max_seq_len:
            raise LlmkitError(f"sequence of {T} tokens exceeds {self.config.name}'s {self.config.max_seq_len} "
                              "positions; truncate the input")
        context = AttentionContext(mask=padding_mask(attention_mask, B, T), kernel=self.kernel)
        x = self.embed(input_ids)  # (B, T, C)
        if token_type_ids is not None and self.type_embed is None:
            raise LlmkitError(f"token_type_ids given but config {self.config.name!r} has type_vocab_size=0; "
                              "drop them or use a model with segment embeddings")
        if self.type_embed is not None:
            types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
            x = x + self.type_embed(types)
        x = x + self.pos_embed(torch.arange(T, device=input_ids.device))  # (T, C) broadcast over the batch
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        for block in self.blocks:
            x = block(x, context)
        return self.final_norm(x) if self.final_norm is not None else x

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def padding_mask(attention_mask: torch.Tensor | None, B: int, T: int) -> torch.Tensor | None:
    """Boolean (B, 1, 1, T) mask, True where a key is a real token; None when nothing is padded (full attention)."""
    if attention_mask is None:
        return None
    if attention_mask.shape != (B, T):
        raise LlmkitError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected (batch, tokens) = {(B, T)}")
    valid = attention_mask.bool()
    if valid.all():
        return None
    empty = (~valid.any(dim=1)).nonzero()
    if len(empty):
        raise LlmkitError(f"row {empty[0].item()} of attention_mask has no real token (all padding); "
                          "remove empty sequences from the batch")
    return valid[:, None, None, :]  # (B, 1, 1, T): broadcast over heads and queries


def initialise(module: nn.Module, n_layers: int) -> None:
    """normal(0, 0.02) linears and embeddings and zero biases (BERT); residual projections scaled by
    1/sqrt(2 * n_layers) as in the decoder (GPT-2), so the residual stream does not grow with depth."""
    for name, child in module.named_modules():
        if isinstance(child, (nn.Linear, nn.Embedding)):
            std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("o_proj", "down_proj")) else 0.02
            nn.init.normal_(child.weight, mean=0.0, std=std)
        if isinstance(child, nn.Linear) and child.bias is not None:
            nn.init.zeros_(child.bias)


# --------------------------------------------------------------------------- heads


class MaskedLMHead(nn.Module):
    """BERT's prediction head: dense -> gelu -> LayerNorm, then the decoder (the word embeddings when tied) + bias.
    The GELU is the config's (`gelu_approximate`: exact, tanh or quick), the same one the blocks' MLPs use, as
    transformers' BertPredictionHeadTransform applies `hidden_act`."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.dense = Linear(config.d_model, config.d_model, bias=True)
        self.norm = build_norm(config)
        self.decoder = None if config.tie_embeddings else Linear(config.d_model, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))  # an output-only bias per token, even when tied
        self.approximate = config.gelu_approximate

    def forward(self, x: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        x = self.norm(gelu(self.dense(x), self.approximate))
        weight = self.decoder.weight if self.decoder is not None else word_embeddings
        return linear(x, weight, self.bias)  # (..., V)


class Pooler(nn.Module):
    """BERT's pooler: tanh(dense(hidden state of the first token, [CLS]))."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.dense = Linear(config.d_model, config.d_model, bias=True)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))  # (B, T, C) -> (B, C)


class MaskedLM(nn.Module):
    """Encoder + masked-LM head: logits (B, T, V), or (N, V) at the `selected` positions only (the loss needs
    just the masked ~15%, which skips most of the vocabulary projection)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.mlm_head = MaskedLMHead(config)
        if not self.encoder.embed.weight.is_meta:
            initialise(self.mlm_head, config.n_layers)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        selected: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.encoder(input_ids, attention_mask, token_type_ids)  # (B, T, C)
        if selected is not None:
            x = x[selected]  # (N, C) for a boolean (B, T) selection
        return self.mlm_head(x, self.encoder.embed.weight)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class SequenceClassifier(nn.Module):
    """Encoder + pooler + linear classifier: one row of label logits (B, n_labels) per sequence."""

    def __init__(self, config: Config, n_labels: int) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.pooler = Pooler(config)
        self.classifier = Linear(config.d_model, n_labels, bias=True)
        if not self.encoder.embed.weight.is_meta:
            initialise(self.pooler, config.n_layers)
            initialise(self.classifier, config.n_layers)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.classifier(self.pooler(self.encoder(input_ids, attention_mask, token_type_ids)))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class TokenClassifier(nn.Module):
    """Encoder + linear classifier on every token (named entities, tags): logits (B, T, n_labels)."""

    def __init__(self, config: Config, n_labels: int) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.classifier = Linear(config.d_model, n_labels, bias=True)
        if not self.encoder.embed.weight.is_meta:
            initialise(self.classifier, config.n_layers)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.classifier(self.encoder(input_ids, attention_mask, token_type_ids))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_encoder_model(config: Config) -> nn.Module:
    """The encoder with the head `config.encoder_head` names (Config checked that a classifier has n_labels)."""
    if config.arch != "encoder":
        raise LlmkitError(f"config {config.name!r} has arch={config.arch!r}; an encoder needs arch='encoder'")
    if config.encoder_head == "base":
        return Encoder(config)
    if config.encoder_head == "masked_lm":
        return MaskedLM(config)
    head = SequenceClassifier if config.encoder_head == "sequence_classification" else TokenClassifier
    return head(config, config.n_labels)


def encoder_head_of(model: nn.Module) -> str:
    """The `Config.encoder_head` value that rebuilds `model`'s class (what a checkpoint of it must declare)."""
    heads = {Encoder: "base", MaskedLM: "masked_lm", SequenceClassifier: "sequence_classification",
             TokenClassifier: "token_classification"}
    if type(model) not in heads:
        known = ", ".join(model_class.__name__ for model_class in heads)
        raise LlmkitError(f"{type(model).__name__} is not one of llmkit's encoder models ({known})")
    return heads[type(model)]


# --------------------------------------------------------------------------- sentence embeddings


@dataclass(frozen=True)
class SentenceSettings:
    """How texts become one vector each (sentence-transformers' Pooling and Normalize modules)."""

    pooling: Literal["mean", "cls"] = "mean"  # mean over real tokens, or the first ([CLS]) token's hidden state
    normalize: bool = False  # L2-normalise, so a dot product is the cosine similarity
    max_tokens: int | None = None  # truncate longer texts (special tokens included); None = the model's context
    batch_size: int = 32


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of hidden states (B, T, C) over the real tokens of each row (attention_mask (B, T) = 1) -> (B, C)."""
    weights = attention_mask[..., None].to(hidden.dtype)  # (B, T, 1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, settings: SentenceSettings) -> torch.Tensor:
    """One vector (B, C) per sequence from hidden states (B, T, C), pooled and optionally normalised."""
    pooled = mean_pool(hidden, attention_mask) if settings.pooling == "mean" else hidden[:, 0]
    return F.normalize(pooled, p=2, dim=-1) if settings.normalize else pooled
