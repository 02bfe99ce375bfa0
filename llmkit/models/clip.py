"""CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision"), read top
to bottom:

    image tower  pixels -> ViT (models/vision.py, with CLIP's pre-layernorm) -> [CLS] final state -> W_i -> e_img
    text tower   token ids -> token + learned position embeddings -> n_layers x causal pre-norm Block
                 -> final norm -> state at the first EOS token -> W_t -> e_txt
    similarity   logits_per_image[i, j] = exp(t) * cos(e_img_i, e_txt_j)      (B_img, B_txt), t learned

Training pulls each image towards its own caption and away from the batch's other captions with the symmetric
InfoNCE loss (`contrastive_loss`): for a batch of N pairs and L = logits_per_image (N, N),

    loss = 1/2 [ CE(L, diag) + CE(L^T, diag) ] = -1/(2N) sum_i [ log softmax_j(L_ij)|_{j=i} + log softmax_j(L_ji)|_{j=i} ]

The temperature is learned as t = log(1 / 0.07) at the start (CLIP's logit_scale). Zero-shot classification
embeds one caption per class ("a photo of a cat") and picks the class whose caption is most similar.

A CLIP model is described by `ClipConfig`: one `Config` per tower (text: arch="decoder", causal, learned
positions; vision: arch="vision"), the shared embedding width and the temperature's start.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.config import Config, check_field_types
from llmkit.errors import LlmkitError
from llmkit.models.vision import ViT
from llmkit.nn.attention import AttentionContext, AttentionKernel
from llmkit.nn.block import build_block
from llmkit.nn.linear import Linear
from llmkit.nn.norm import build_norm

CLIP_ARCH = "clip"  # the `arch` of a ClipConfig's config.json (its towers have their own)
LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP's starting temperature, 2.6592


@dataclass
class ClipConfig:
    """Two towers and what joins them; saved as one config.json {"arch": "clip", "text": {...}, "vision": {...}}."""

    text: Config
    vision: Config
    projection_dim: int = 512  # width of the shared image-text embedding space
    logit_scale_init: float = 2.6592  # log of the starting inverse temperature, log(1 / 0.07)
    name: str = "clip"
    arch: str = CLIP_ARCH
    hf_architecture: str | None = None  # "CLIPModel" when imported from transformers
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes; never read by code

    def __post_init__(self) -> None:
        for tower in ("text", "vision"):
            if isinstance(getattr(self, tower), dict):
                setattr(self, tower, Config.from_dict(getattr(self, tower)))
        check_field_types(self, f"CLIP config {self.name!r}")
        if self.arch != CLIP_ARCH:
            raise LlmkitError(f"CLIP config {self.name!r}: arch={self.arch!r}; a CLIP config has arch='clip'")
        if self.text.arch != "decoder" or self.text.position != "learned":
            raise LlmkitError(f"CLIP config {self.name!r}: the text tower is a causal transformer with learned "
                              f"positions: set text.arch='decoder' and text.position='learned' (got "
                              f"{self.text.arch!r}, {self.text.position!r})")
        if self.vision.arch != "vision" or self.vision.n_labels is not None:
            raise LlmkitError(f"CLIP config {self.name!r}: the vision tower needs arch='vision' and no classifier "
                              "(n_labels null)")
        if self.text.eos_id is None:
            raise LlmkitError(f"CLIP config {self.name!r}: text.eos_id is null; the text tower pools the state at "
                              "the EOS token, so set text.eos_id")
        if self.projection_dim < 1:
            raise LlmkitError(f"CLIP config {self.name!r}: projection_dim={self.projection_dim} must be positive")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write every field (both towers whole) as JSON."""
        from llmkit.io import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ClipConfig:
        """Read a config.json `save` wrote; errors name the file."""
        from llmkit.io import read_json_object

        data = read_json_object(Path(path))
        known = {item.name for item in dataclasses.fields(cls)}
        unknown, missing = sorted(set(data) - known), [key for key in ("text", "vision") if key not in data]
        if unknown or missing:
            raise LlmkitError(f"{path}: a CLIP config.json has fields {sorted(known)}; unknown {unknown}, missing "
                              f"{missing}: re-save it with ClipConfig.save")
        try:
            return cls(**data)
        except (LlmkitError, TypeError) as error:
            raise LlmkitError(f"{path}: {error}") from None


class TextTower(nn.Module):
    """CLIP's text transformer: states (B, T, d) of token ids (B, T) after causal pre-norm blocks and a final norm;
    `pool` takes each row's state at its first EOS token."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_embed = nn.Embedding(config.max_seq_len, config.d_model)
        self.blocks = nn.ModuleList(build_block(config, i) for i in range(config.n_layers))
        self.final_norm = build_norm(config)
        self.kernel: AttentionKernel = "sdpa"

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final states (B, T, d). Each token sees itself and the tokens before it, so right padding after the EOS
        changes nothing the pooling reads."""
        B, T = input_ids.shape
        if T > self.config.max_seq_len:
            raise LlmkitError(f"captions of {T} tokens exceed the text tower's {self.config.max_seq_len} positions; "
                              "shorten them")
        x = self.embed(input_ids) + self.pos_embed(torch.arange(T, device=input_ids.device))  # (B, T, d)
        context = AttentionContext(is_causal=T > 1, kernel=self.kernel)
        for block in self.blocks:
            x = block(x, context)
        return self.final_norm(x)

    def pool(self, states: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Each row's state (B, d) at its first EOS token. transformers' CLIP with the old eos_token_id of 2 takes the
        largest id instead (the EOS of CLIP's own vocabulary), as here."""
        eos = self.config.eos_id
        if eos == 2:  # configs written before transformers PR #24773
            where = input_ids.argmax(dim=-1)
        else:
            is_eos = input_ids == eos  # (B, T)
            if not bool(is_eos.any(dim=1).all()):
                row = int((~is_eos.any(dim=1)).nonzero()[0])
                raise LlmkitError(f"caption {row} has no EOS token (id {eos}); the text tower pools the EOS state: "
                                  "encode captions with the model's tokenizer, which ends each with EOS")
            where = is_eos.int().argmax(dim=-1)  # first EOS of each row
        return states[torch.arange(len(states), device=states.device), where]  # (B, d)


class CLIP(nn.Module):
    """Image and text towers, their projections into one space and the learned temperature."""

    def __init__(self, config: ClipConfig) -> None:
        super().__init__()
        self.config = config
        self.vision = ViT(config.vision)
        self.text = TextTower(config.text)
        self.visual_projection = Linear(config.vision.d_model, config.projection_dim, bias=False)
        self.text_projection = Linear(config.text.d_model, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        if not self.logit_scale.is_meta:
            initialise_clip(self)

    def image_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings (B, projection_dim) of images (B, C, H, W)."""
        cls = self.vision.features(pixels)[:, 0]  # (B, d): CLIP's post_layernorm of the [CLS] state
        return F.normalize(self.visual_projection(cls), dim=-1)

    def text_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embeddings (B, projection_dim) of captions (B, T), each holding an EOS token."""
        pooled = self.text.pool(self.text(input_ids), input_ids)  # (B, d)
        return F.normalize(self.text_projection(pooled), dim=-1)

    def logits_per_image(self, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """exp(t) * cosine similarity (B_img, B_txt) of normalised embeddings; its transpose is logits_per_text."""
        return self.logit_scale.exp() * image_embeddings @ text_embeddings.T

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """logits_per_image (B_img, B_txt) of images and captions."""
        return self.logits_per_image(self.image_embeddings(pixels), self.text_embeddings(input_ids))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def initialise_clip(model: CLIP) -> None:
    """CLIP's initialisation (as transformers' CLIPModel): attention inputs and the MLP's output N(0, d^-1/2 (2L)^-1/2),
    attention outputs N(0, d^-1/2), the MLP's input N(0, (2d)^-1/2), projections N(0, d^-1/2), the [CLS] vector
    N(0, d^-1/2), embeddings N(0, 0.02) (text positions 0.01), zero biases. Each layer keeps the signal's scale, so
    images differ in their embeddings from the first step (GPT-2's 0.02 leaves them almost equal at small widths,
    and the contrastive loss then sits at log(batch) for many steps)."""
    for tower, config in ((model.text, model.config.text), (model.vision, model.config.vision)):
        d, layers = config.d_model, config.n_layers
        for name, child in tower.named_modules():
            if isinstance(child, nn.Linear):
                if name.endswith(("q_proj", "k_proj", "v_proj", "down_proj")):
                    std = d**-0.5 * (2 * layers) ** -0.5
                else:
                    std = d**-0.5 if name.endswith("o_proj") else (2 * d) ** -0.5
                nn.init.normal_(child.weight, std=std)
                if child.bias is not None:
                    nn.init.zeros_(child.bias)
    nn.init.normal_(model.text.embed.weight, std=0.02)
    nn.init.normal_(model.text.pos_embed.weight, std=0.01)
    nn.init.normal_(model.vision.cls_token, std=model.config.vision.d_model**-0.5)
    nn.init.normal_(model.vision.patch_embed.weight, std=0.02)
    nn.init.normal_(model.vision.pos_embed, std=0.02)
    for projection in (model.visual_projection, model.text_projection):
        nn.init.normal_(projection.weight, std=projection.weight.shape[1] ** -0.5)


def contrastive_loss(logits_per_image: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """CLIP's symmetric InfoNCE loss of a square (N, N) logits matrix whose diagonal holds the true pairs:
    the mean (or, with reduction="sum", the sum over the N pairs) of (CE image -> text + CE text -> image) / 2."""
    n = logits_per_image.shape[0]
    if logits_per_image.shape != (n, n):
        raise LlmkitError(f"contrastive loss needs one caption per image (a square logits matrix); got "
                          f"{tuple(logits_per_image.shape)}")
    targets = torch.arange(n, device=logits_per_image.device)
    logits = logits_per_image.float()
    return (F.cross_entropy(logits, targets, reduction=reduction)
            + F.cross_entropy(logits.T, targets, reduction=reduction)) / 2


def clip_text_config(vocab_size: int, eos_id: int, max_seq_len: int = 48, d_model: int = 64, n_layers: int = 2,
                     n_heads: int = 4, name: str = "clip-text", **overrides: Any) -> Config:
    """A CLIP text tower's Config: LayerNorm (eps 1e-5), quick-GELU MLP, biases everywhere, learned positions."""
    fields = dict(name=name, arch="decoder", vocab_size=vocab_size, n_layers=n_layers, n_heads=n_heads,
                  d_model=d_model, max_seq_len=max_seq_len, norm="layernorm", norm_eps=1e-5, mlp="gelu",
                  gelu_approximate="quick", qkv_bias=True, out_bias=True, mlp_bias=True, position="learned",
                  eos_id=eos_id)
    return Config(**{**fields, **overrides})


def clip_vision_config(image_size: int = 8, patch_size: int = 2, n_channels: int = 1, d_model: int = 64,
                       n_layers: int = 2, n_heads: int = 4, name: str = "clip-vision", **overrides: Any) -> Config:
    """A CLIP vision tower's Config: a ViT with pre-layernorm, a bias-free patch embedding, LayerNorm eps 1e-5 and
    quick GELU."""
    from llmkit.models.vision import vit_fields

    fields = vit_fields(image_size=image_size, patch_size=patch_size, n_channels=n_channels, n_labels=None,
                        d_model=d_model, n_layers=n_layers, n_heads=n_heads, name=name, norm_eps=1e-5,
                        gelu_approximate="quick", embed_norm=True, patch_bias=False)
    return Config(**{**fields, **overrides})
