"""Vision Transformer (ViT, Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words"), read top to bottom:

    pixels (B, C, H, W) -> patches: conv with kernel = stride = patch_size -> (B, N, d), N = (H / patch)^2
                        -> [CLS] token prepended -> + learned position embeddings (N + 1, d)
                        -> (CLIP only: pre-layernorm, `embed_norm`) -> n_layers x pre-norm Block -> final norm
    heads:  image classifier   linear on the [CLS] token's final state                             (B, n_labels)

An image is a sequence of N patch "words"; every patch attends to every other (no mask: every image has the
same N). The blocks are the decoder's and BERT's (`nn/block.py`): x + attn(LN(x)), then x + MLP(LN(x)), with
bidirectional attention. `ViT.features` gives every token's final state (B, N + 1, d): the classifier reads its
[CLS] row, CLIP's image tower projects that row, and a vision-language model can read the patch rows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from llmkit.config import Config
from llmkit.errors import LlmkitError
from llmkit.models.encoder import initialise
from llmkit.nn.attention import AttentionContext, AttentionKernel
from llmkit.nn.block import build_block
from llmkit.nn.linear import Linear
from llmkit.nn.norm import build_norm


class ViT(nn.Module):
    """The image encoder: the final states (B, N + 1, d) of [CLS] and the N patches of each image."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        if config.arch != "vision" or config.position != "learned":
            raise LlmkitError(f"config {config.name!r}: a ViT needs arch='vision' and position='learned' (learned "
                              f"absolute position embeddings); got arch={config.arch!r}, position={config.position!r}")
        self.config = config
        d = config.d_model
        self.patch_embed = nn.Conv2d(config.n_channels, d, kernel_size=config.patch_size, stride=config.patch_size,
                                     bias=config.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(d))  # learned; its final state summarises the image
        self.pos_embed = nn.Parameter(torch.zeros(config.n_patches + 1, d))  # one row per token, [CLS] first
        self.embed_norm = build_norm(config) if config.embed_norm else None  # CLIP's pre_layrnorm
        self.blocks = nn.ModuleList(build_block(config, i) for i in range(config.n_layers))
        self.final_norm = build_norm(config)
        self.kernel: AttentionKernel = "sdpa"
        if not self.cls_token.is_meta:  # meta = shapes only: checkpoint loading assigns the weights
            initialise(self, config.n_layers)
            for parameter in (self.cls_token, self.pos_embed):
                nn.init.trunc_normal_(parameter, std=0.02)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Token inputs (B, N + 1, d) of images (B, C, H, W): [CLS] and the patch embeddings, plus positions."""
        config = self.config
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (config.n_channels, config.image_size, config.image_size):
            raise LlmkitError(f"images of shape {tuple(pixels.shape)}; {config.name} takes (batch, "
                              f"{config.n_channels}, {config.image_size}, {config.image_size}): preprocess them with "
                              "llmkit.data.images")
        x = self.patch_embed(pixels.to(self.cls_token.dtype))  # (B, d, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, d), patches in row-major order
        cls = self.cls_token.expand(x.shape[0], 1, -1)  # (B, 1, d)
        return torch.cat([cls, x], dim=1) + self.pos_embed  # (B, N + 1, d)

    def hidden_states(self, pixels: torch.Tensor) -> torch.Tensor:
        """The last block's output (B, N + 1, d), before the final norm."""
        x = self.embed(pixels)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        context = AttentionContext(kernel=self.kernel)  # no mask: every token sees every token
        for block in self.blocks:
            x = block(x, context)
        return x

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Final states (B, N + 1, d): row 0 is [CLS], rows 1.. the patches in row-major order."""
        return self.final_norm(self.hidden_states(pixels))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.features(pixels)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class ImageClassifier(nn.Module):
    """ViT + a linear classifier on the [CLS] token's final state: label logits (B, n_labels)."""

    def __init__(self, config: Config, n_labels: int) -> None:
        super().__init__()
        self.config = config
        self.encoder = ViT(config)
        self.classifier = Linear(config.d_model, n_labels, bias=True)
        if not self.encoder.cls_token.is_meta:
            initialise(self.classifier, config.n_layers)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.encoder.features(pixels)[:, 0])  # (B, n_labels)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_vision_model(config: Config) -> nn.Module:
    """A ViT, with a classifier head when the config has `n_labels`."""
    return ImageClassifier(config, config.n_labels) if config.n_labels is not None else ViT(config)


def vit_config(name: str = "vit-digits", **fields: Any) -> Config:
    """A ViT's Config (`vit_fields`); the defaults are the small ViT `llmkit vision train` fits to 8x8 digits."""
    return Config(**vit_fields(name=name, **fields))


def vit_fields(
    image_size: int = 8, patch_size: int = 2, n_channels: int = 1, n_labels: int | None = 10, d_model: int = 64,
    n_layers: int = 4, n_heads: int = 4, d_ff: int | None = None, name: str = "vit-digits", **overrides: Any,
) -> dict[str, Any]:
    """The Config fields of a ViT: LayerNorm (eps 1e-12), exact-GELU MLP, biases everywhere, learned positions (as in
    the paper and transformers' ViTConfig), any other field as an override. max_seq_len is the token count, N + 1;
    vocab_size (unused) is 1."""
    n_tokens = (image_size // max(patch_size, 1)) ** 2 + 1
    fields = dict(name=name, arch="vision", vocab_size=1, n_layers=n_layers, n_heads=n_heads, d_model=d_model,
                  d_ff=d_ff, max_seq_len=n_tokens, norm="layernorm", norm_eps=1e-12, mlp="gelu", qkv_bias=True,
                  out_bias=True, mlp_bias=True, position="learned", image_size=image_size, patch_size=patch_size,
                  n_channels=n_channels, n_labels=n_labels)
    return {**fields, **overrides}
