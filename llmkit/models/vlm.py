"""Vision-language models: a frozen image encoder (models/vision.py's ViT) joined to a frozen decoder (models/decoder.py)
by a few new, trained parts. Two styles, read top to bottom:

Flamingo (Alayrac et al. 2022, "Flamingo: a Visual Language Model for Few-Shot Learning"):

    images (B, M, C, H, W) -> ViT features (B*M, N, d_v) -> Perceiver resampler -> visual tokens (B, M*L, d)
    text with `<image>` markers (B, T) -> embeddings -> [gated cross-attention dense layer, then the frozen block]
                                                        before every k-th block -> frozen final norm and LM head

  Perceiver resampler: L learned latent queries z (L, d) cross-attend to the image's features x, so n layers of

      z = z + attn(q = z, kv = x),    z = z + ffw(z)

  turn any number N of features into exactly L visual tokens. Two measured changes: the paper also puts the latents
  in the keys and values (kv = [x; z]), and llmkit's projection of the features had a bias until 2c47bbc. Both are
  ways to write visual tokens that do not depend on the image, and with a frozen LM and a few hundred steps the
  optimiser takes them (a constant lowers the caption loss at once, by shifting the LM's prior over digits), until
  the tokens are the same for every image (across-image std / rms 0.78 at initialisation, 0.0008 after 300 steps at
  lr 3e-3, 3e-9 after 150 at lr 1e-3) and the model stays at chance. Without them the attention can only pool image
  features (docs/multimodal.md has the runs).
  Gated cross-attention dense layer, before a frozen block, on that block's input y:

      y = y + tanh(alpha_xattn) * xattn(q = y, kv = visual tokens),    y = y + tanh(alpha_dense) * ffw(y)

  with alpha_xattn = alpha_dense = 0 at initialisation, so the untrained model *is* the frozen decoder, exactly.
  The alphas learn at GATE_LR_SCALE x the run's learning rate (train/optim.py's `lr_scale`): Adam moves a parameter
  about lr per step, so at lr 1e-3 a gate could open no further than tanh(0.4) in a 400-step run.
  Interleaved image/text: a text token attends only to the visual tokens of the most recent image at or before it
  (its `<image>` marker); a token before every image sees none (its cross-attention output is zero).

LLaVA (Liu et al. 2023, "Visual Instruction Tuning"): a projector (linear, or 2-layer MLP with GELU as in LLaVA-1.5)
maps each image's N ViT features to N embeddings of the decoder's width, which take the places of N `<image>`
placeholder tokens in the text's embeddings; the decoder then runs on those embeddings (`inputs_embeds`).

The `<image>` marker is token id `image_token_id` = the decoder's vocab_size, one past its vocabulary, so no frozen
embedding is resized: Flamingo gives it a learned embedding (`image_embed`, the paper's new `<image>` token), LLaVA
overwrites it with the projected features. Only the resampler, the gated layers and `image_embed` (Flamingo), or the
projector (LLaVA), train: `__init__` freezes the decoder and the image encoder.

The gated layers ride inside the decoder (Flamingo's "FlamingoLayer" in OpenFlamingo does the same): each wraps a
block as `ConditionedBlock` and reads the visual tokens and media mask the model sets for one forward, so the
decoder's own forward, KV cache and head run unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

from llmkit.config import Config
from llmkit.errors import LlmkitError
from llmkit.models.decoder import Decoder
from llmkit.models.encoder import initialise
from llmkit.models.vision import ViT
from llmkit.nn.attention import Attention, AttentionContext, KVCache
from llmkit.nn.linear import Linear
from llmkit.nn.mlp import MLP_CLASSES
from llmkit.nn.norm import build_norm

Style = Literal["flamingo", "llava"]
Projector = Literal["linear", "mlp"]
GATE_LR_SCALE = 10.0  # the tanh gates' learning rate, x the run's (module docstring)


@dataclass
class VLMConfig:
    """The new parts of a vision-language model; the frozen decoder and image encoder bring their own Configs."""

    style: Style = "flamingo"
    name: str = "vlm"
    # --- Flamingo
    n_latents: int = 8  # visual tokens per image out of the Perceiver resampler (L)
    resampler_layers: int = 2
    cross_attn_every: int = 4  # a gated cross-attention layer before blocks 0, k, 2k, ...
    # --- LLaVA
    projector: Projector = "mlp"

    def __post_init__(self) -> None:
        if self.style not in ("flamingo", "llava"):
            raise LlmkitError(f"VLMConfig.style={self.style!r}: choose 'flamingo' or 'llava'")
        if self.n_latents < 1 or self.resampler_layers < 1 or self.cross_attn_every < 1:
            raise LlmkitError(f"VLMConfig: n_latents={self.n_latents}, resampler_layers={self.resampler_layers} and "
                              f"cross_attn_every={self.cross_attn_every} must each be at least 1")
        if self.projector not in ("linear", "mlp"):
            raise LlmkitError(f"VLMConfig.projector={self.projector!r}: choose 'linear' or 'mlp'")

    def to_dict(self) -> dict:
        return asdict(self)


def image_token_id(decoder: Decoder) -> int:
    """The `<image>` marker's id: one past the decoder's vocabulary."""
    return decoder.config.vocab_size


def freeze_module(module: nn.Module) -> nn.Module:
    """No gradients for any of `module`'s parameters, and eval mode (no dropout): a frozen part."""
    module.requires_grad_(False)
    return module.eval()


# --------------------------------------------------------------------------- Flamingo: Perceiver resampler


class ResamplerLayer(nn.Module):
    """z = z + attn(q = norm(z), kv = norm_media(x)), then z = z + ffw(norm(z))."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.media_norm, self.latent_norm = build_norm(config), build_norm(config)
        self.attn = Attention(config, layer_index=config.n_layers)  # an index no sliding-window layer has
        self.mlp_norm, self.mlp = build_norm(config), MLP_CLASSES[config.mlp](config)

    def forward(self, latents: torch.Tensor, media: torch.Tensor, context: AttentionContext) -> torch.Tensor:
        keys_values = self.attn.project_keys_values(self.media_norm(media))  # (B, Hkv, N, D)
        latents = latents + self.attn(self.latent_norm(latents), context, keys_values)  # (B, L, d)
        return latents + self.mlp(self.mlp_norm(latents))


class PerceiverResampler(nn.Module):
    """Features (B, N, d_vision) of any N -> visual tokens (B, L, d): L learned latents cross-attending to them."""

    def __init__(self, config: Config, vision_width: int, n_latents: int, n_layers: int) -> None:
        super().__init__()
        self.input_proj = Linear(vision_width, config.d_model, bias=False)  # ViT width -> the decoder's; no constant
        self.latents = nn.Parameter(torch.randn(n_latents, config.d_model) * 0.02)
        self.layers = nn.ModuleList(ResamplerLayer(config) for _ in range(n_layers))
        self.final_norm = build_norm(config)
        self.kernel = "sdpa"

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        media = self.input_proj(features)  # (B, N, d)
        latents = self.latents.expand(features.shape[0], -1, -1)  # (B, L, d)
        context = AttentionContext(kernel=self.kernel)  # latents see every feature
        for layer in self.layers:
            latents = layer(latents, media, context)
        return self.final_norm(latents)


# --------------------------------------------------------------------------- Flamingo: gated cross-attention


@dataclass
class Media:
    """What the gated layers of one forward read: visual tokens (B, S, d), S = M images x L tokens; `allowed` (B, 1,
    T, S), the visual tokens each text token may attend to; `has_media` (B, T, 1), 1 where a token follows an image."""

    visual: torch.Tensor
    allowed: torch.Tensor
    has_media: torch.Tensor


class GatedCrossAttention(nn.Module):
    """y = y + tanh(alpha_xattn) * xattn(norm(y), visual), then y = y + tanh(alpha_dense) * ffw(norm(y));
    both alphas start at 0, so the layer starts as the identity."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.attn_norm, self.attn = build_norm(config), Attention(config, layer_index=config.n_layers)
        self.mlp_norm, self.mlp = build_norm(config), MLP_CLASSES[config.mlp](config)
        self.attn_gate = nn.Parameter(torch.zeros(1))  # alpha_xattn
        self.mlp_gate = nn.Parameter(torch.zeros(1))  # alpha_dense
        for gate in (self.attn_gate, self.mlp_gate):
            gate.lr_scale = GATE_LR_SCALE  # read by train/optim.py's parameter_groups (LR_SCALE)

    def forward(self, x: torch.Tensor, media: Media, kernel: str = "sdpa") -> torch.Tensor:
        keys_values = self.attn.project_keys_values(media.visual.to(x.dtype))  # (B, Hkv, S, D)
        context = AttentionContext(mask=media.allowed, kernel=kernel)
        h = self.attn(self.attn_norm(x), context, keys_values) * media.has_media  # (B, T, d); 0 before any image
        x = x + torch.tanh(self.attn_gate).to(x.dtype) * h
        return x + torch.tanh(self.mlp_gate).to(x.dtype) * self.mlp(self.mlp_norm(x))


class ConditionedBlock(nn.Module):
    """A frozen decoder block with a gated cross-attention layer before it; `media` is set for each forward."""

    def __init__(self, gated: GatedCrossAttention, block: nn.Module) -> None:
        super().__init__()
        self.gated, self.block = gated, block
        self.media: Media | None = None

    def forward(self, x: torch.Tensor, context: AttentionContext) -> torch.Tensor:
        if self.media is not None:
            x = self.gated(x, self.media, context.kernel)
        return self.block(x, context)


def latest_image(input_ids: torch.Tensor, marker_id: int, images_before: torch.Tensor | None = None) -> torch.Tensor:
    """Index (B, T) of the most recent image at or before each token (its `<image>` marker counts), -1 before any;
    `images_before` (B,) counts markers already seen (cached decoding)."""
    seen = (input_ids == marker_id).long().cumsum(dim=1)  # (B, T)
    if images_before is not None:
        seen = seen + images_before[:, None]
    return seen - 1


def media_mask(latest: torch.Tensor, n_images: int, tokens_per_image: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flamingo's per-token media mask: `allowed` (B, 1, T, M*L), True where visual token s belongs to the token's
    latest image, and `has_media` (B, T, 1). A token before every image may attend to all (no softmax row is
    empty) and its output is zeroed by `has_media`."""
    if int(latest.max()) >= n_images:
        raise LlmkitError(f"the text marks {int(latest.max()) + 1} images with <image> but {n_images} were given; "
                          "give one image per <image> marker")
    image_of_slot = torch.arange(n_images * tokens_per_image, device=latest.device) // tokens_per_image  # (S,)
    has_media = latest >= 0  # (B, T)
    allowed = (latest[:, :, None] == image_of_slot) | ~has_media[:, :, None]  # (B, T, S)
    return allowed[:, None], has_media[:, :, None].float()


# --------------------------------------------------------------------------- the two models


class FlamingoVLM(nn.Module):
    """A frozen decoder with gated cross-attention layers reading a Perceiver resampler's visual tokens."""

    def __init__(self, decoder: Decoder, vision: ViT, config: VLMConfig) -> None:
        super().__init__()
        self.config = config
        self.decoder, self.vision = freeze_module(decoder), freeze_module(vision)
        lm = decoder.config
        self.resampler = PerceiverResampler(lm, vision.config.d_model, config.n_latents, config.resampler_layers)
        self.image_embed = nn.Parameter(torch.randn(lm.d_model) * 0.02)  # the `<image>` marker's embedding
        for index in range(0, lm.n_layers, config.cross_attn_every):
            gated = GatedCrossAttention(lm)
            initialise(gated.attn, lm.n_layers)
            initialise(gated.mlp, lm.n_layers)
            decoder.blocks[index] = ConditionedBlock(gated, decoder.blocks[index])
        initialise(self.resampler, config.resampler_layers)
        self.to(decoder.activation_dtype_device()[1])

    def gated_layers(self) -> list[ConditionedBlock]:
        return [block for block in self.decoder.blocks if isinstance(block, ConditionedBlock)]

    def visual_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images (B, M, C, H, W) -> visual tokens (B, M*L, d)."""
        B, M = pixel_values.shape[:2]
        features = self.vision.features(pixel_values.flatten(0, 1))  # (B*M, N+1, d_v)
        return self.resampler(features).reshape(B, M * self.config.n_latents, -1)  # (B, M*L, d)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T, d), `<image>` markers taking the learned `image_embed`."""
        return splice_markers(self.decoder, input_ids, self.image_embed)

    def forward(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None, logits_at: torch.Tensor | None = None,
        visual: torch.Tensor | None = None, images_before: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab), or (N, vocab) at `logits_at`'s positions, of text (B, T) with `<image>` markers
        interleaved with images (B, M, C, H, W). `visual` (B, M*L, d) passes visual tokens already computed
        (cached decoding: with `images_before` (B,), the markers in the tokens the cache holds)."""
        if visual is None and pixel_values is not None:
            visual = self.visual_tokens(pixel_values)
        media = None
        if visual is not None:
            latest = latest_image(input_ids, image_token_id(self.decoder), images_before)
            allowed, has_media = media_mask(latest, visual.shape[1] // self.config.n_latents, self.config.n_latents)
            media = Media(visual, allowed, has_media.to(visual.dtype))
        elif bool((input_ids == image_token_id(self.decoder)).any()):
            raise LlmkitError("the text has <image> markers but no images were given; pass pixel_values")
        for layer in self.gated_layers():
            layer.media = media
        try:
            hidden = self.decoder.hidden_states(None, cache, attention_mask, inputs_embeds=self.embed(input_ids))
        finally:
            for layer in self.gated_layers():
                layer.media = None
        return self.decoder.head(hidden if logits_at is None else hidden[logits_at])


class LlavaVLM(nn.Module):
    """A frozen decoder reading projected image features in place of `<image>` placeholder tokens."""

    def __init__(self, decoder: Decoder, vision: ViT, config: VLMConfig) -> None:
        super().__init__()
        self.config = config
        self.decoder, self.vision = freeze_module(decoder), freeze_module(vision)
        d_vision, d = vision.config.d_model, decoder.config.d_model
        if config.projector == "linear":
            self.projector = nn.Sequential(Linear(d_vision, d, bias=True))
        else:  # LLaVA-1.5's two-layer MLP
            self.projector = nn.Sequential(Linear(d_vision, d, bias=True), nn.GELU(), Linear(d, d, bias=True))
        initialise(self.projector, 1)
        self.to(decoder.activation_dtype_device()[1])

    @property
    def tokens_per_image(self) -> int:
        """Placeholders one image fills: the ViT's [CLS] and patch tokens."""
        return self.vision.config.n_patches + 1

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images (B, M, C, H, W) -> embeddings (B, M*N, d), N = tokens_per_image."""
        B, M = pixel_values.shape[:2]
        features = self.vision.features(pixel_values.flatten(0, 1))  # (B*M, N, d_v)
        return self.projector(features).reshape(B, M * features.shape[1], -1)  # (B, M*N, d)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings (B, T, d) with each row's placeholders filled, in order, by its images' embeddings."""
        if pixel_values is None:
            if bool((input_ids == image_token_id(self.decoder)).any()):
                raise LlmkitError("the text has <image> placeholders but no images were given; pass pixel_values")
            return self.decoder.embed(input_ids)
        images = self.image_embeddings(pixel_values)  # (B, M*N, d)
        return splice_markers(self.decoder, input_ids, images)

    def forward(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None, logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab), or (N, vocab) at `logits_at`'s positions, of text (B, T) whose M * N placeholders
        per row stand for images (B, M, C, H, W)."""
        embeds = self.embed(input_ids, pixel_values)
        hidden = self.decoder.hidden_states(None, cache, attention_mask, inputs_embeds=embeds)
        return self.decoder.head(hidden if logits_at is None else hidden[logits_at])


def splice_markers(decoder: Decoder, input_ids: torch.Tensor, replacement: torch.Tensor) -> torch.Tensor:
    """The decoder's embeddings (B, T, d) of `input_ids` with the `<image>` markers' rows replaced: by one vector (d,)
    at every marker, or by a row's own vectors (B, K, d) at its K markers, in order."""
    markers = input_ids == image_token_id(decoder)  # (B, T)
    embeds = decoder.embed(input_ids.masked_fill(markers, 0))  # (B, T, d); marker rows overwritten below
    if replacement.ndim == 1:
        return torch.where(markers[..., None], replacement.to(embeds.dtype), embeds)
    counts = markers.sum(dim=1)
    if bool((counts != replacement.shape[1]).any()):
        raise LlmkitError(f"rows hold {counts.tolist()} <image> placeholders; their images fill {replacement.shape[1]} "
                          "each: expand every <image> marker to tokens_per_image placeholders")
    return embeds.masked_scatter(markers[..., None], replacement.to(embeds.dtype))  # row-major: row b's K in order


def build_vlm(decoder: Decoder, vision: ViT, config: VLMConfig) -> FlamingoVLM | LlavaVLM:
    """The model `config.style` names around a decoder and a ViT (both frozen from here on)."""
    return FlamingoVLM(decoder, vision, config) if config.style == "flamingo" else LlavaVLM(decoder, vision, config)
