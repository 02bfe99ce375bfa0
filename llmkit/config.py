"""One `Config` dataclass describes a decoder-only transformer; every variant is a field.

Named presets live in `llmkit.presets`; `Config.from_name("smollm2-135m")` looks them up.
Reading a checkpoint's config (Hugging Face `config.json`, GGUF metadata) is `llmkit.checkpoints.load_config`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llmkit.errors import LlmkitError

NORMS = ("rmsnorm", "layernorm")
MLPS = ("swiglu", "gelu", "geglu", "relu")
GATED_MLPS = ("swiglu", "geglu")  # gate_proj, up_proj and down_proj
POSITIONS = ("rope", "learned", "alibi", "relative")
ROPE_SCALINGS = ("linear", "llama3")
ARCHS = ("decoder", "encoder", "seq2seq")
ROUTERS = ("topk", "switch")


@dataclass
class RopeScaling:
    """Stretch RoPE to longer contexts: "linear" divides positions by `factor` (position
    interpolation); "llama3" rescales low frequencies only (Llama 3.1+ recipe)."""

    kind: Literal["linear", "llama3"] = "linear"
    factor: float = 1.0
    # llama3 only
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192


@dataclass
class Config:
    """Shape and variant choices of a decoder-only language model (GPT-2, Llama, Mistral, Qwen2...)."""

    name: str = "custom"

    # --- sizes
    vocab_size: int = 32000
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # None = n_heads (MHA); 1 = MQA; in between = GQA
    d_model: int = 64
    head_dim: int | None = None  # None = d_model // n_heads
    d_ff: int | None = None  # None = 4 * d_model (gelu) or the Llama 8/3 rule rounded to 256 (swiglu)
    max_seq_len: int = 2048

    # --- block variants
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    mlp: Literal["swiglu", "gelu", "geglu", "relu"] = "swiglu"  # geglu: Gemma's gated GELU (gelu_approximate applies)
    gelu_approximate: Literal["none", "tanh"] = "none"  # GPT-2 uses "tanh"
    qkv_bias: bool = False  # Qwen2 / GPT-2: bias on the q, k, v projections
    out_bias: bool = False  # GPT-2: bias on the attention output projection
    mlp_bias: bool = False  # GPT-2: bias in the MLP linears
    tie_embeddings: bool = False  # LM head shares the token embedding matrix

    # --- positions
    position: Literal["rope", "learned", "alibi", "relative"] = "rope"  # relative: T5's bucketed bias (seq2seq)
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None

    # --- tokens the model was trained with (the tokenizer holds the authoritative copy)
    bos_id: int | None = None
    eos_id: int | None = None

    # --- architecture family: "encoder" is BERT (models/encoder.py), "seq2seq" is T5; decoders keep the defaults
    arch: Literal["decoder", "encoder", "seq2seq"] = "decoder"
    # --- encoder (BERT)
    type_vocab_size: int = 0  # segment (token type) embeddings: BERT has 2; 0 = none
    post_norm: bool = False  # BERT: LayerNorm after each residual add (x = norm(x + f(x))) and after the embeddings
    pad_id: int | None = None  # padding token; hidden from attention by the attention_mask

    # --- other decoder families: BLOOM, Gemma, StableLM (the defaults leave every other model unchanged)
    embed_norm: bool = False  # BLOOM: a norm (of kind `norm`) right after the token embedding
    scale_embeddings: bool = False  # Gemma: token embeddings times sqrt(d_model), the factor rounded to their dtype
    norm_offset: float = 0.0  # Gemma: RMSNorm scales by (norm_offset + weight) in float32; weights start at 1 - offset
    rope_fraction: float = 1.0  # StableLM (0.25): RoPE rotates the first int(head_dim * rope_fraction) channels of a head

    # --- encoder-decoder (T5): n_layers counts the encoder's layers; position="relative", mlp "relu" or "geglu"
    n_decoder_layers: int | None = None  # None = n_layers
    relative_attention_num_buckets: int = 32  # relative position bias: buckets (half per direction in the encoder)
    relative_attention_max_distance: int = 128  # distances beyond this share the last bucket
    decoder_start_id: int | None = None  # first decoder input token (T5: the pad id, 0)
    attention_scale: float | None = None  # scores = q.k * scale; None = 1/sqrt(head_dim); T5: 1.0 (folded into its init)
    scale_decoder_outputs: bool = False  # T5 v1.0 (tied head): decoder output * d_model**-0.5 before the LM head

    # --- mixture of experts (nn/moe.py): every block's FFN becomes n_experts FFNs behind a router; 0 = dense
    n_experts: int = 0
    experts_per_token: int | None = None  # top-k; None = 2 for "topk", 1 for "switch" (Switch is top-1)
    router: Literal["topk", "switch"] = "topk"  # topk: Mixtral (renormalised); switch: top-1, capacity, drops
    capacity_factor: float = 1.25  # switch: an expert takes at most ceil(factor * tokens / n_experts) tokens
    router_aux_loss_coef: float = 0.01  # load-balancing loss weight (Switch's alpha)
    router_z_loss_coef: float = 0.001  # router z-loss weight (ST-MoE)

    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes (source, licence)

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.n_heads <= 0 or self.d_model % self.n_heads:
                raise LlmkitError(
                    f"config {self.name!r}: d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                    "set head_dim explicitly or change n_heads"
                )
            self.head_dim = self.d_model // self.n_heads
        if self.n_decoder_layers is None:
            self.n_decoder_layers = self.n_layers
        if self.d_ff is None:
            if self.mlp in ("gelu", "relu"):
                self.d_ff = 4 * self.d_model
            else:
                self.d_ff = 256 * ((int(8 * self.d_model / 3) + 255) // 256)
        if self.experts_per_token is None:
            self.experts_per_token = 1 if self.router == "switch" else 2
        self.validate()

    def validate(self) -> None:
        """Raise `LlmkitError` naming the field and the fix for an impossible configuration."""
        positive = ("vocab_size", "n_layers", "n_heads", "n_kv_heads", "d_model", "head_dim", "d_ff", "max_seq_len")
        for name in positive:
            if getattr(self, name) <= 0:
                raise LlmkitError(f"config {self.name!r}: {name}={getattr(self, name)} must be a positive integer")
        if self.n_heads % self.n_kv_heads:
            raise LlmkitError(
                f"config {self.name!r}: n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}; "
                "each key/value head must serve a whole group of query heads (choose n_kv_heads that divides n_heads)"
            )
        for name, allowed in (("norm", NORMS), ("mlp", MLPS), ("position", POSITIONS), ("arch", ARCHS)):
            if getattr(self, name) not in allowed:
                raise LlmkitError(f"config {self.name!r}: {name}={getattr(self, name)!r}; choose one of {allowed}")
        if self.position == "rope":
            if self.head_dim % 2:
                raise LlmkitError(f"config {self.name!r}: RoPE needs an even head_dim, got {self.head_dim}")
            if not 0 < self.rope_fraction <= 1 or self.rope_dim <= 0 or self.rope_dim % 2:
                raise LlmkitError(f"config {self.name!r}: rope_fraction={self.rope_fraction} rotates "
                                  f"int(head_dim * rope_fraction) = {self.rope_dim} channels; choose a fraction in "
                                  "(0, 1] that gives a positive even number")
            if self.rope_scaling is not None and self.rope_scaling.kind not in ROPE_SCALINGS:
                raise LlmkitError(
                    f"config {self.name!r}: rope_scaling.kind={self.rope_scaling.kind!r}; choose one of {ROPE_SCALINGS}"
                )
        if self.norm_eps <= 0:
            raise LlmkitError(f"config {self.name!r}: norm_eps={self.norm_eps} must be > 0")
        if self.n_experts:
            self._validate_experts()
        if self.norm_offset and self.norm != "rmsnorm":
            raise LlmkitError(f"config {self.name!r}: norm_offset={self.norm_offset} applies to RMSNorm only; set "
                              "norm='rmsnorm' or norm_offset=0.0")
        if (self.arch == "seq2seq") != (self.position == "relative"):
            raise LlmkitError(f"config {self.name!r}: arch={self.arch!r} with position={self.position!r}; the "
                              "encoder-decoder (T5) uses position='relative', and only it does")
        if self.arch == "seq2seq":
            for name in ("n_decoder_layers", "relative_attention_num_buckets", "relative_attention_max_distance"):
                if getattr(self, name) <= 0:
                    raise LlmkitError(f"config {self.name!r}: {name}={getattr(self, name)} must be a positive integer")

    def _validate_experts(self) -> None:
        """The mixture-of-experts fields (checked only when n_experts > 0)."""
        where = f"config {self.name!r}"
        if self.n_experts < 0:
            raise LlmkitError(f"{where}: n_experts={self.n_experts} must be 0 (dense) or a positive number of experts")
        if self.router not in ROUTERS:
            raise LlmkitError(f"{where}: router={self.router!r}; choose one of {ROUTERS}")
        if not 1 <= self.experts_per_token <= self.n_experts:
            raise LlmkitError(f"{where}: experts_per_token={self.experts_per_token} must be between 1 and "
                              f"n_experts={self.n_experts}")
        if self.router == "switch" and self.experts_per_token != 1:
            raise LlmkitError(f"{where}: the switch router sends each token to one expert, but experts_per_token="
                              f"{self.experts_per_token}; set experts_per_token=1 or use router='topk'")
        if self.capacity_factor <= 0:
            raise LlmkitError(f"{where}: capacity_factor={self.capacity_factor} must be > 0 (1.0 = exactly an even "
                              "share of the tokens per expert)")
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            if getattr(self, name) < 0:
                raise LlmkitError(f"{where}: {name}={getattr(self, name)} must be >= 0 (0 turns the loss off)")

    # --- derived sizes
    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def rope_dim(self) -> int:
        """Channels of each head that RoPE rotates (all of them unless `rope_fraction` < 1)."""
        return int(self.head_dim * self.rope_fraction)

    # --- construction
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> Config:
        """A named preset (see `llmkit.presets.PRESETS`), with optional field overrides."""
        from llmkit.presets import PRESETS

        if name not in PRESETS:
            raise LlmkitError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return cls(**{**PRESETS[name], "name": name, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LlmkitError(f"config has unknown fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        from llmkit.io import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Config:
        from llmkit.io import read_json_object

        return cls.from_dict(read_json_object(Path(path)))
