"""Checking a `Config` (llmkit/config.py) as a whole once its derived fields are filled in: the allowed values of
each choice field, and the combinations a network cannot be built from (heads that do not divide, RoPE on an odd
head, a sliding window on an encoder, ...). Each refusal is one `LlmkitError` that names the field and the fix."""

from __future__ import annotations

from typing import Any

from llmkit.errors import LlmkitError

NORMS = ("rmsnorm", "layernorm")
MLPS = ("swiglu", "gelu", "geglu", "relu")
GATED_MLPS = ("swiglu", "geglu")  # gate_proj, up_proj and down_proj
POSITIONS = ("rope", "learned", "alibi", "relative")
ROPE_SCALINGS = ("linear", "llama3")
ARCHS = ("decoder", "encoder", "seq2seq", "speech", "vision")
ROUTERS = ("topk", "switch")
ENCODER_HEADS = ("base", "masked_lm", "sequence_classification", "token_classification")
LABELLED_HEADS = ("sequence_classification", "token_classification")  # these need n_labels
MIXERS = ("attention", "hyena", "retnet", "mamba")  # a block's sequence mixer (nn/mixers.py builds it)
LAYER_TYPES = ("global", "local")


def validate_config(config: Any) -> None:
    """Raise `LlmkitError` naming the field and the fix for an impossible `config` (a llmkit.config.Config, its
    derived fields filled in)."""
    positive = ("vocab_size", "n_layers", "n_heads", "n_kv_heads", "d_model", "head_dim", "d_ff", "max_seq_len")
    for name in positive:
        if getattr(config, name) <= 0:
            raise LlmkitError(f"config {config.name!r}: {name}={getattr(config, name)} must be a positive integer")
    if config.type_vocab_size < 0:
        raise LlmkitError(f"config {config.name!r}: type_vocab_size={config.type_vocab_size} must be >= 0 (0 = no "
                          "segment embeddings)")
    _validate_head(config)
    if config.n_heads % config.n_kv_heads:
        raise LlmkitError(
            f"config {config.name!r}: n_heads={config.n_heads} is not divisible by n_kv_heads={config.n_kv_heads}; "
            "each key/value head must serve a whole group of query heads (choose n_kv_heads that divides n_heads)"
        )
    for name, allowed in (("norm", NORMS), ("mlp", MLPS), ("position", POSITIONS), ("arch", ARCHS)):
        if getattr(config, name) not in allowed:
            raise LlmkitError(f"config {config.name!r}: {name}={getattr(config, name)!r}; choose one of {allowed}")
    if config.position == "rope" and len(config.recurrent_layers) < config.n_layers:  # some attention layer rotates
        if config.head_dim % 2:
            raise LlmkitError(f"config {config.name!r}: RoPE needs an even head_dim, got {config.head_dim}")
        if not 0 < config.rope_fraction <= 1 or config.rope_dim <= 0 or config.rope_dim % 2:
            raise LlmkitError(f"config {config.name!r}: rope_fraction={config.rope_fraction} rotates "
                              f"int(head_dim * rope_fraction) = {config.rope_dim} channels; choose a fraction in "
                              "(0, 1] that gives a positive even number")
        if config.rope_scaling is not None and config.rope_scaling.kind not in ROPE_SCALINGS:
            raise LlmkitError(
                f"config {config.name!r}: rope_scaling.kind={config.rope_scaling.kind!r}; choose one of {ROPE_SCALINGS}"
            )
    if config.norm_eps <= 0:
        raise LlmkitError(f"config {config.name!r}: norm_eps={config.norm_eps} must be > 0")
    if config.n_experts:
        _validate_experts(config)
    _validate_attention_variants(config)
    _validate_mixers(config)
    if config.norm_offset and config.norm != "rmsnorm":
        raise LlmkitError(f"config {config.name!r}: norm_offset={config.norm_offset} applies to RMSNorm only; set "
                          "norm='rmsnorm' or norm_offset=0.0")
    if (config.arch == "seq2seq") != (config.position == "relative"):
        raise LlmkitError(f"config {config.name!r}: arch={config.arch!r} with position={config.position!r}; the "
                          "encoder-decoder (T5) uses position='relative', and only it does")
    if config.arch == "speech":
        _validate_speech(config)
    if config.arch == "seq2seq":
        for name in ("n_decoder_layers", "relative_attention_num_buckets", "relative_attention_max_distance"):
            if getattr(config, name) <= 0:
                raise LlmkitError(f"config {config.name!r}: {name}={getattr(config, name)} must be a positive integer")


def _validate_speech(config: Any) -> None:
    """The Whisper-style model: learned decoder positions (the encoder's are sinusoidal), positive sizes."""
    where = f"config {config.name!r}"
    if config.position != "learned":
        raise LlmkitError(f"{where}: arch='speech' (Whisper) uses learned decoder positions; set position='learned'")
    for name in ("n_mels", "n_audio_ctx", "n_decoder_layers"):
        if getattr(config, name) <= 0:
            raise LlmkitError(f"{where}: {name}={getattr(config, name)} must be a positive integer")
    if config.d_model % 2:
        raise LlmkitError(f"{where}: d_model={config.d_model} must be even for the encoder's sinusoidal positions")


def _validate_attention_variants(config: Any) -> None:
    """QK-norm, sandwich norms, sliding-window layers and their RoPE base (Gemma 3)."""
    where = f"config {config.name!r}"
    if config.qk_norm and config.norm != "rmsnorm":
        raise LlmkitError(f"{where}: qk_norm=True normalises q and k with RMSNorm; set norm='rmsnorm' or qk_norm=False")
    if config.post_norms and config.post_norm:
        raise LlmkitError(f"{where}: post_norms=True (Gemma's sandwich norms) is for pre-norm blocks, but post_norm="
                          "True; set one of them to False")
    if config.sliding_window is not None and config.sliding_window < 1:
        raise LlmkitError(f"{where}: sliding_window={config.sliding_window} must be a positive number of tokens "
                          "(or null for full attention)")
    if config.layer_types and len(config.layer_types) != config.n_layers:
        raise LlmkitError(f"{where}: layer_types lists {len(config.layer_types)} layers but n_layers="
                          f"{config.n_layers}; give one of {LAYER_TYPES} per layer")
    if "local" in config.layer_types and config.sliding_window is None:
        raise LlmkitError(f"{where}: layer_types has 'local' layers but sliding_window is null; set "
                          "sliding_window (the local layers' span in tokens)")
    if config.local_layers and (config.arch != "decoder" or config.position != "rope"):
        raise LlmkitError(f"{where}: sliding-window layers are implemented for RoPE decoders only (this is "
                          f"arch={config.arch!r}, position={config.position!r}); set sliding_window to null")
    if config.rope_local_theta is not None and config.rope_local_theta <= 0:
        raise LlmkitError(f"{where}: rope_local_theta={config.rope_local_theta} must be > 0 (or null: local "
                          "layers use rope_theta)")


def _validate_mixers(config: Any) -> None:
    """mixer / mixer_pattern and the mixers' sizes: non-attention mixers are built for causal decoders, carry
    their own notion of order (RetNet's xPos and decay, Hyena's filters, Mamba's recurrence) and have no
    attention bias or window to apply."""
    where = f"config {config.name!r}"
    if config.mixer_pattern and len(config.mixer_pattern) != config.n_layers:
        raise LlmkitError(f"{where}: mixer_pattern lists {len(config.mixer_pattern)} layers but n_layers="
                          f"{config.n_layers}; give one of {MIXERS} per layer (or [] for all `mixer`)")
    for name in ("hyena_order", "hyena_filter_dim", "short_conv_kernel", "ssm_state_dim", "ssm_expand"):
        if getattr(config, name) < 1:
            raise LlmkitError(f"{where}: {name}={getattr(config, name)} must be a positive integer")
    if not config.recurrent_layers:
        return
    kinds = sorted({config.layer_mixers[i] for i in config.recurrent_layers})
    if config.arch != "decoder":
        raise LlmkitError(f"{where}: mixer {kinds[0]!r} is for causal decoders, but arch={config.arch!r}; set "
                          "mixer='attention'")
    if config.position not in ("rope", "learned"):
        raise LlmkitError(f"{where}: position={config.position!r} is an attention bias that mixer {kinds[0]!r} "
                          "cannot apply; use position='rope' (attention layers only) or 'learned'")
    if config.sliding_window is not None:
        raise LlmkitError(f"{where}: sliding_window={config.sliding_window} is an attention window; mixer "
                          f"{kinds[0]!r} has none: set sliding_window to null")


def _validate_head(config: Any) -> None:
    """encoder_head and n_labels: a classifier head needs its number of labels, and only encoders have heads."""
    where = f"config {config.name!r}"
    if config.arch == "vision" and (config.image_size < 1 or config.patch_size < 1 or config.n_channels < 1
                                  or config.image_size % config.patch_size):
        raise LlmkitError(f"{where}: image_size={config.image_size} must be a positive multiple of patch_size="
                          f"{config.patch_size} and n_channels={config.n_channels} positive; fix them")
    if config.encoder_head != "base" and config.arch != "encoder":
        raise LlmkitError(f"{where}: encoder_head={config.encoder_head!r} applies to arch='encoder' only (this is "
                          f"arch={config.arch!r}); set encoder_head='base'")
    if config.encoder_head in LABELLED_HEADS and config.n_labels is None:
        raise LlmkitError(f"{where}: a {config.encoder_head} head needs n_labels, its number of labels; set n_labels")
    if config.n_labels is not None and config.n_labels < 1:
        raise LlmkitError(f"{where}: n_labels={config.n_labels} must be a positive number of labels")


def _validate_experts(config: Any) -> None:
    """The mixture-of-experts fields (checked only when n_experts > 0)."""
    where = f"config {config.name!r}"
    if config.n_experts < 0:
        raise LlmkitError(f"{where}: n_experts={config.n_experts} must be 0 (dense) or a positive number of experts")
    if config.router not in ROUTERS:
        raise LlmkitError(f"{where}: router={config.router!r}; choose one of {ROUTERS}")
    if not 1 <= config.experts_per_token <= config.n_experts:
        raise LlmkitError(f"{where}: experts_per_token={config.experts_per_token} must be between 1 and "
                          f"n_experts={config.n_experts}")
    if config.router == "switch" and config.experts_per_token != 1:
        raise LlmkitError(f"{where}: the switch router sends each token to one expert, but experts_per_token="
                          f"{config.experts_per_token}; set experts_per_token=1 or use router='topk'")
    if config.capacity_factor <= 0:
        raise LlmkitError(f"{where}: capacity_factor={config.capacity_factor} must be > 0 (1.0 = exactly an even "
                          "share of the tokens per expert)")
    for name in ("router_aux_loss_coef", "router_z_loss_coef"):
        if getattr(config, name) < 0:
            raise LlmkitError(f"{where}: {name}={getattr(config, name)} must be >= 0 (0 turns the loss off)")
