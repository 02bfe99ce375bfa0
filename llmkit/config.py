"""One `Config` dataclass describes a decoder-only transformer; every variant is a field.

Named presets live in `llmkit.presets`; `Config.from_name("smollm2-135m")` looks them up and
`Config.from_hf_config(path)` reads a Hugging Face `config.json`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llmkit.errors import LlmkitError

NORMS = ("rmsnorm", "layernorm")
MLPS = ("swiglu", "gelu")
POSITIONS = ("rope", "learned", "alibi")
ROPE_SCALINGS = ("linear", "llama3")


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
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    gelu_approximate: Literal["none", "tanh"] = "none"  # GPT-2 uses "tanh"
    qkv_bias: bool = False  # Qwen2 / GPT-2: bias on the q, k, v projections
    out_bias: bool = False  # GPT-2: bias on the attention output projection
    mlp_bias: bool = False  # GPT-2: bias in the MLP linears
    tie_embeddings: bool = False  # LM head shares the token embedding matrix

    # --- positions
    position: Literal["rope", "learned", "alibi"] = "rope"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None

    # --- tokens the model was trained with (the tokenizer holds the authoritative copy)
    bos_id: int | None = None
    eos_id: int | None = None

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
        if self.d_ff is None:
            if self.mlp == "gelu":
                self.d_ff = 4 * self.d_model
            else:
                self.d_ff = 256 * ((int(8 * self.d_model / 3) + 255) // 256)
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
        for name, allowed in (("norm", NORMS), ("mlp", MLPS), ("position", POSITIONS)):
            if getattr(self, name) not in allowed:
                raise LlmkitError(f"config {self.name!r}: {name}={getattr(self, name)!r}; choose one of {allowed}")
        if self.position == "rope":
            if self.head_dim % 2:
                raise LlmkitError(f"config {self.name!r}: RoPE needs an even head_dim, got {self.head_dim}")
            if self.rope_scaling is not None and self.rope_scaling.kind not in ROPE_SCALINGS:
                raise LlmkitError(
                    f"config {self.name!r}: rope_scaling.kind={self.rope_scaling.kind!r}; choose one of {ROPE_SCALINGS}"
                )
        if self.norm_eps <= 0:
            raise LlmkitError(f"config {self.name!r}: norm_eps={self.norm_eps} must be > 0")

    # --- derived sizes
    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    # --- construction
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> Config:
        """A named preset (see `llmkit.presets.PRESETS`), with optional field overrides."""
        from llmkit.presets import PRESETS

        if name not in PRESETS:
            raise LlmkitError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return cls(**{**PRESETS[name], "name": name, **overrides})

    @classmethod
    def from_hf_config(cls, path: str | Path) -> Config:
        """Read a Hugging Face `config.json` (file or directory holding it)."""
        from llmkit.checkpoints.hf_config import config_from_hf

        return config_from_hf(path)

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
