"""One `Config` dataclass describes a transformer (decoder, encoder with its head, or encoder-decoder); every
variant is a field, and every field is checked against its type and range when a Config is made, so a bad value
from a file is one readable error naming the field and the fix.

Named presets live in `llmkit.presets`; `Config.from_name("smollm2-135m")` looks them up.
Reading a checkpoint's config (Hugging Face `config.json`, GGUF metadata) is `llmkit.checkpoints.load_config`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llmkit.config_checks import (  # noqa: F401 (the allowed values are importable from llmkit.config, as before)
    ARCHS,
    ENCODER_HEADS,
    GATED_MLPS,
    LABELLED_HEADS,
    LAYER_TYPES,
    MIXERS,
    MLPS,
    NORMS,
    POSITIONS,
    ROPE_SCALINGS,
    ROUTERS,
    validate_config,
)
from llmkit.config_types import check_field_types
from llmkit.errors import LlmkitError

# config.json files llmkit wrote before these were typed fields kept them in `extra` under these keys
LEGACY_EXTRA_KEYS = {"encoder_task": "encoder_head", "n_labels": "n_labels", "hf_architecture": "hf_architecture",
                     "eos_token_ids": "eos_ids"}
# Fields a native config.json may leave out: the name, free-form notes, and the fields that replaced `extra` keys
# (older files carry those under `extra`, see LEGACY_EXTRA_KEYS). Every other field shapes the network.
OPTIONAL_FILE_FIELDS = ("name", "extra", *LEGACY_EXTRA_KEYS.values())
MIXER_FIELDS = ("mixer", "mixer_pattern", "hyena_order", "hyena_filter_dim", "short_conv_kernel", "ssm_state_dim",
                "ssm_expand")
# Fields added after native config.json files were first written: a file without one ran with its default, which
# leaves the network as it was (full causal attention, no QK-norm, no sandwich norms).
LATER_FIELDS = ("qk_norm", "post_norms", "sliding_window", "layer_types", "rope_local_theta", "n_mels", "n_audio_ctx",
                "feature_norm", "image_size", "patch_size", "n_channels", "patch_bias", *MIXER_FIELDS)


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

    def __post_init__(self) -> None:
        check_field_types(self, "config", prefix="rope_scaling.")
        if self.factor <= 0 or self.original_max_seq_len < 1:
            raise LlmkitError(f"config: rope_scaling.factor={self.factor} and rope_scaling.original_max_seq_len="
                              f"{self.original_max_seq_len} must both be positive; fix rope_scaling")


@dataclass
class Config:
    """Shape and variant choices of a model: decoders (GPT-2, Llama, Mistral, Qwen2...), BERT encoders, T5."""

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
    gelu_approximate: Literal["none", "tanh", "quick"] = "none"  # GPT-2: "tanh"; CLIP: "quick", x * sigmoid(1.702 x)
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

    # --- architecture family: "encoder" is BERT (models/encoder.py), "seq2seq" is T5, "speech" is Whisper
    # (models/speech.py), "vision" is ViT (models/vision.py); decoders keep the defaults
    arch: Literal["decoder", "encoder", "seq2seq", "speech", "vision"] = "decoder"
    # --- encoder (BERT)
    type_vocab_size: int = 0  # segment (token type) embeddings: BERT has 2; 0 = none
    post_norm: bool = False  # BERT: LayerNorm after each residual add (x = norm(x + f(x))) and after the embeddings
    pad_id: int | None = None  # padding token; hidden from attention by the attention_mask

    # --- other decoder families: BLOOM, Gemma, StableLM (the defaults leave every other model unchanged)
    embed_norm: bool = False  # BLOOM: a norm (of kind `norm`) right after the token embedding
    scale_embeddings: bool = False  # Gemma: token embeddings times sqrt(d_model), the factor rounded to their dtype
    norm_offset: float = 0.0  # Gemma: RMSNorm scales by (norm_offset + weight) in float32; weights start at 1 - offset
    rope_fraction: float = 1.0  # StableLM (0.25): RoPE rotates the first int(head_dim * rope_fraction) channels of a head

    # --- attention variants of Gemma 2/3 (the defaults leave every other model unchanged)
    qk_norm: bool = False  # Gemma 3: an RMSNorm (eps, norm_offset) over each head's q and k, before RoPE
    post_norms: bool = False  # Gemma 2/3 "sandwich": a norm also on each sublayer's output, before the residual add
    sliding_window: int | None = None  # "local" layers attend to the last sliding_window tokens (the query's own too)
    # per layer, "global" (full causal) or "local" (sliding window); () = every layer local when sliding_window is
    # set (Mistral), else every layer global. Gemma 3: 5 local then 1 global, repeated
    layer_types: tuple[Literal["global", "local"], ...] = ()
    rope_local_theta: float | None = None  # RoPE base of local layers, unscaled (Gemma 3: 10k); None = as global ones

    # --- encoder-decoder (T5): n_layers counts the encoder's layers; position="relative", mlp "relu" or "geglu"
    n_decoder_layers: int | None = None  # None = n_layers
    relative_attention_num_buckets: int = 32  # relative position bias: buckets (half per direction in the encoder)
    relative_attention_max_distance: int = 128  # distances beyond this share the last bucket
    decoder_start_id: int | None = None  # first decoder input token (T5: the pad id, 0)
    attention_scale: float | None = None  # scores = q.k * scale; None = 1/sqrt(head_dim); T5: 1.0 (folded into its init)
    scale_decoder_outputs: bool = False  # T5 v1.0 (tied head): decoder output * d_model**-0.5 before the LM head

    # --- speech encoder-decoder (Whisper, arch="speech"): log-mel frames in, text out; n_layers counts the encoder's
    # layers, n_decoder_layers and decoder_start_id above apply; max_seq_len is the decoder's learned positions
    n_mels: int = 80  # log-mel channels of the input features (Whisper: 80; large-v3: 128)
    n_audio_ctx: int = 1500  # encoder positions = input frames / 2 (the stem's stride); Whisper: 1500 (30 s of audio)
    # the features as the model reads them (llmkit/data/audio.py): Whisper's log-mel as they are, or each clip's
    # normalised (channel means removed, unit variance: `normalize_utterance`) with statistics over its audio frames
    # ("utterance") or its speech frames only ("speech": an energy gate); transcription applies what this says
    feature_norm: Literal["whisper", "utterance", "speech"] = "whisper"

    # --- mixture of experts (nn/moe.py): every block's FFN becomes n_experts FFNs behind a router; 0 = dense
    n_experts: int = 0
    experts_per_token: int | None = None  # top-k; None = 2 for "topk", 1 for "switch" (Switch is top-1)
    router: Literal["topk", "switch"] = "topk"  # topk: Mixtral (renormalised); switch: top-1, capacity, drops
    capacity_factor: float = 1.25  # switch: an expert takes at most ceil(factor * tokens / n_experts) tokens
    router_aux_loss_coef: float = 0.01  # load-balancing loss weight (Switch's alpha)
    router_z_loss_coef: float = 0.001  # router z-loss weight (ST-MoE)

    # --- where the weights came from; these choose the model class and the export format
    encoder_head: Literal["base", "masked_lm", "sequence_classification", "token_classification"] = "base"  # encoders
    n_labels: int | None = None  # classifier outputs of a sequence/token classification head (a ViT's image classes)
    # --- images (arch="vision", ViT): a square image of n_channels x image_size^2 pixels is cut into
    # (image_size / patch_size)^2 patches; embed_norm=True is CLIP's pre-layernorm of the vision tower
    image_size: int = 224
    patch_size: int = 16
    n_channels: int = 3
    patch_bias: bool = True  # bias of the patch-embedding convolution (ViT: yes; CLIP: no)
    hf_architecture: str | None = None  # HF class imported from ("LlamaForCausalLM"), written back on export
    eos_ids: tuple[int, ...] = ()  # every stop token when there are several (Llama 3 instruct); eos_id is the first

    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes (source, licence); never read by code

    # --- sequence mixers other than attention (decoders; nn/hyena.py, nn/retnet.py, nn/mamba.py). Each block's
    # attention is replaced by the mixer; RetNet uses n_heads and head_dim (its key size; values are 2 x head_dim)
    mixer: Literal["attention", "hyena", "retnet", "mamba"] = "attention"
    mixer_pattern: tuple[Literal["attention", "hyena", "retnet", "mamba"], ...] = ()  # per layer (hybrids); () = all `mixer`
    hyena_order: int = 2  # Hyena's N: N gates and N long convolutions
    hyena_filter_dim: int = 64  # width of the MLP that generates Hyena's implicit long filters
    short_conv_kernel: int = 4  # causal depthwise conv width: Mamba's conv (4) and Hyena's short gating convs
    ssm_state_dim: int = 16  # Mamba's state size N per channel
    ssm_expand: int = 2  # Mamba's inner width = ssm_expand * d_model

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = _rope_scaling_from_dict(self.rope_scaling, self.name)
        if isinstance(self.eos_ids, list):  # JSON has no tuples
            self.eos_ids = tuple(self.eos_ids)
        if isinstance(self.layer_types, list):
            self.layer_types = tuple(self.layer_types)
        if isinstance(self.mixer_pattern, list):
            self.mixer_pattern = tuple(self.mixer_pattern)
        check_field_types(self, f"config {self.name!r}")
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
        """Raise `LlmkitError` naming the field and the fix for an impossible configuration (llmkit/config_checks.py)."""
        validate_config(self)

    # --- derived sizes
    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def n_patches(self) -> int:
        """Patches of one image (arch="vision"): (image_size / patch_size)^2."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def rope_dim(self) -> int:
        """Channels of each head that RoPE rotates (all of them unless `rope_fraction` < 1)."""
        return int(self.head_dim * self.rope_fraction)

    @property
    def local_layers(self) -> tuple[int, ...]:
        """Indices of the layers with sliding-window attention."""
        if self.sliding_window is None:
            return ()
        if not self.layer_types:
            return tuple(range(self.n_layers))
        return tuple(i for i, kind in enumerate(self.layer_types) if kind == "local")

    @property
    def layer_mixers(self) -> tuple[str, ...]:
        """Each layer's sequence mixer: `mixer_pattern`, or `mixer` for every layer."""
        return self.mixer_pattern or (self.mixer,) * self.n_layers

    @property
    def recurrent_layers(self) -> tuple[int, ...]:
        """Indices of the layers whose mixer is not attention (they keep a recurrent state, not keys and values)."""
        return tuple(i for i, kind in enumerate(self.layer_mixers) if kind != "attention")

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
        """A Config from field values; fields left out take their defaults (see `load` for files)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LlmkitError(f"config has unknown fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        """Write every field as JSON, so `load` finds the complete description it requires."""
        from llmkit.io import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Config:
        """Read an llmkit config.json. Every field that shapes the network must be there (a missing one is an
        error, never a silent default); older files' `extra` keys (LEGACY_EXTRA_KEYS) move to their fields."""
        from llmkit.io import read_json_object

        path = Path(path)
        data = _with_legacy_fields(read_json_object(path))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LlmkitError(f"{path}: config has unknown fields {unknown}; remove them (known fields: "
                              f"{sorted(known)})")
        optional = (*OPTIONAL_FILE_FIELDS, *LATER_FIELDS)
        missing = [name for name in _field_names(cls) if name not in data and name not in optional]
        if missing:
            raise LlmkitError(f"{path}: config is missing fields {missing}; an llmkit config.json lists every field "
                              "(re-save it with Config.save, or add them with the values the weights were trained "
                              "with)")
        try:
            return cls(**data)
        except LlmkitError as error:
            raise LlmkitError(f"{path}: {error}") from None


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _with_legacy_fields(data: dict[str, Any]) -> dict[str, Any]:
    """Move the `extra` keys older llmkit files used (encoder_task, n_labels, ...) to their typed fields."""
    extra = data.get("extra")
    if not isinstance(extra, dict) or not set(extra) & set(LEGACY_EXTRA_KEYS):
        return data
    data = dict(data, extra={key: value for key, value in extra.items() if key not in LEGACY_EXTRA_KEYS})
    for key, name in LEGACY_EXTRA_KEYS.items():
        if key in extra and name not in data:
            data[name] = extra[key]
    return data


def _rope_scaling_from_dict(values: dict[str, Any], config_name: str) -> RopeScaling:
    """RopeScaling from a JSON object, refusing keys it does not have (instead of a TypeError)."""
    unknown = sorted(set(values) - set(_field_names(RopeScaling)))
    if unknown:
        raise LlmkitError(f"config {config_name!r}: rope_scaling has unknown keys {unknown}; it takes "
                          f"{_field_names(RopeScaling)}")
    return RopeScaling(**values)
