"""Self-attention (causal, or as masked) and cross-attention for MHA / GQA / MQA with a preallocated KV cache.

attention(Q, K, V) = softmax(Q K^T / sqrt(d) + bias) V  (Vaswani et al. 2017). With grouped-query
attention (Ainslie et al. 2023) n_kv_heads < n_heads and each key/value head serves
n_heads / n_kv_heads query heads (n_kv_heads = 1 is multi-query attention).

Two interchangeable kernels: "sdpa" calls `torch.nn.functional.scaled_dot_product_attention`
(FlashAttention / memory-efficient kernels on GPU, a fused kernel on CPU); "reference" writes
the softmax out by hand, for reading and for testing the fast path.

`causal_context` builds what every layer of a causal decoder shares for one forward (positions, rotary tables,
the mask or ALiBi bias, the KV-cache slots) from the caller's padding mask, cache and packed-document ids.
`RowKVCache` keeps rows of different lengths (the serving engine's slots); a forward over some of its rows gets a
per-row mask and per-row positions instead.

Sliding-window ("local") layers (Mistral; Gemma 3 on 5 of every 6 layers) let query slot t see key slots s with
t - window < s <= t, so each token attends to its last `window` tokens, itself included (transformers' and
llama.cpp's convention). The cache keeps every slot; the local mask hides the old ones. Their part of the context,
`AttentionContext.local`, has that mask and, when the model gives local layers their own RoPE base, their rotary
tables. Gemma 3 also normalises each head's q and k (QK-norm, RMSNorm over head_dim) before RoPE.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.config import Config
from llmkit.errors import LlmkitError
from llmkit.nn import decode_kernels
from llmkit.nn.fused import fused_product
from llmkit.nn.linear import Linear
from llmkit.nn.norm import RMSNorm
from llmkit.nn.position import alibi_bias, apply_rope, rope_cos_sin

AttentionKernel = Literal["sdpa", "reference"]


# The half dtypes this CPU runs attention in faster than in float32: bfloat16 with AVX512-BF16 or AMX (2-3x, measured
# on such a Xeon; without them torch's bfloat16 SDPA is ~6x slower than float32's), float16 only with AMX-FP16 (a
# float16 cache's 512-token prefill attending in float16 ran at 490 tok/s against 590 over the values widened to
# float32, SmolLM2 F16 on the Zen 4 VM: AVX512-BF16, no float16 arithmetic). A constant, so torch.compile reads it as
# one.
FAST_HALF_ATTENTION_ON_CPU = frozenset(
    ([torch.bfloat16] if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported() else [])
    + ([torch.float16] if torch.cpu._is_amx_fp16_supported() else []))


class KVCache:
    """Keys and values of every layer in fixed-size buffers (B, n_kv_heads, max_len, head_dim).

    Preallocated once, so decoding writes in place and never reallocates. `valid[b, s]` marks
    which slots hold real tokens (False for left padding), `length` is the number of slots filled.
    """

    def __init__(
        self, config: Config, batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        if max_len > config.max_seq_len and config.position == "learned":
            raise LlmkitError(
                f"KV cache of {max_len} tokens exceeds {config.name}'s {config.max_seq_len} learned positions; "
                "ask for fewer tokens"
            )
        shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.has_padding = False
        self.length = 0
        self.max_len = max_len
        self.batch_size = batch_size

    def reserve(self, n_tokens: int, attention_mask: torch.Tensor | None) -> tuple[int, int]:
        """Claim the next `n_tokens` slots (recording their padding mask); returns (start, end)."""
        start, end = self.length, self.length + n_tokens
        if end > self.max_len:
            raise LlmkitError(
                f"KV cache is full: {start} tokens stored + {n_tokens} new > {self.max_len} slots; "
                "create the cache with a larger max_len or generate fewer tokens"
            )
        if attention_mask is not None:
            self.valid[:, start:end] = attention_mask.bool()
            self.has_padding = self.has_padding or not bool(attention_mask.all())
        self.length = end
        return start, end

    def store(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write keys/values (B, n_kv, T, D) at slots start..start+T; return all filled slots."""
        end = start + keys.shape[2]
        self.keys[layer][:, :, start:end] = keys
        self.values[layer][:, :, start:end] = values
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class RowKVCache:
    """Keys and values of every layer in `n_rows` independent rows (n_rows, n_kv_heads, capacity, head_dim), each row
    its own sequence at its own length: the serving engine's slots (llmkit/serve). Unlike `KVCache`, rows never share
    a length; a forward names the rows it extends and where, through `rows(...)`. Slot s of a row holds position s."""

    def __init__(
        self, config: Config, n_rows: int, capacity: int, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        shape = (n_rows, config.n_kv_heads, capacity, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.n_rows, self.capacity = n_rows, capacity

    def grow(self, capacity: int) -> None:
        """Make every row hold `capacity` slots, keeping what is stored (one copy of the buffers)."""
        if capacity <= self.capacity:
            return
        for buffers in (self.keys, self.values):
            for layer, old in enumerate(buffers):
                new = old.new_zeros(old.shape[0], old.shape[1], capacity, old.shape[3])
                new[:, :, : self.capacity] = old
                buffers[layer] = new
        self.capacity = capacity

    def copy_slots(self, source: int, target: int, start: int, end: int) -> None:
        """Copy slots start..end of row `source` into row `target` (part of a shared prompt prefix)."""
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                buffer[target, :, start:end] = buffer[source, :, start:end]

    def rows(self, rows: list[int], starts: list[int]) -> RowCacheView:
        """The cache a forward of B = len(rows) sequences passes to the model: row b's new tokens take slots
        starts[b].. of row rows[b] and attend to that row's slots before them."""
        return RowCacheView(self, rows, starts)


class RowCacheView:
    """One forward's rows of a `RowKVCache`; `causal_context` reads positions and the mask from it."""

    def __init__(self, cache: RowKVCache, rows: list[int], starts: list[int]) -> None:
        self.cache, self.row_ids, self.starts = cache, rows, starts
        device = cache.keys[0].device
        self.row_index = torch.tensor(rows, device=device)
        self.start_index = torch.tensor(starts, device=device)
        first = rows[0]
        self.contiguous = rows == list(range(first, first + len(rows)))  # a slice of the buffers, no gather

    def store(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write keys/values (B, n_kv, T, D) at each row's own slots (`start` is unused: rows start apart); return
        the rows' slots 0..S (B, n_kv, S, D), S = the furthest row's end (later slots are masked per row)."""
        T = keys.shape[2]
        end = max(self.starts) + T
        if end > self.cache.capacity:
            raise LlmkitError(f"row KV cache holds {self.cache.capacity} slots per row; a forward needs {end}: "
                              "grow it before the forward")
        stored = []
        for buffer, new in ((self.cache.keys[layer], keys), (self.cache.values[layer], values)):
            if T == 1:
                # (B, n_kv, D) at (row, slot) pairs; index_put needs the buffer's dtype (Decoder.kv_dtype may differ)
                buffer[self.row_index, :, self.start_index] = new[:, :, 0].to(buffer.dtype)
            else:
                for b, (row, row_start) in enumerate(zip(self.row_ids, self.starts)):
                    buffer[row, :, row_start : row_start + T] = new[b]
            if self.contiguous:
                stored.append(buffer[self.row_ids[0] : self.row_ids[0] + len(self.row_ids), :, :end])
            else:
                stored.append(buffer[self.row_index, :, :end])  # (B, n_kv, S, D) gathered
        return stored[0], stored[1]


@dataclass
class AttentionContext:
    """Per-forward inputs shared by every layer: rotary tables, mask or bias, cache slots."""

    positions: torch.Tensor | None = None  # (B or 1, T) position of each new token
    cos: torch.Tensor | None = None  # (B, 1, T, D)
    sin: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # bool (B, 1, T, S): True = may attend; or float additive bias (B, H, T, S)
    is_causal: bool = False  # plain causal attention over the T new tokens, no mask tensor needed
    cache: KVCache | RowCacheView | None = None
    start: int = 0  # cache slot of the first new token
    kernel: AttentionKernel = "sdpa"
    local: AttentionContext | None = None  # what sliding-window layers use instead (mask within the window)
    valid: torch.Tensor | None = None  # bool (B, T): the new tokens that are not padding; None = all (recurrent mixers)


def causal_context(
    config: Config,
    batch_size: int,
    n_tokens: int,
    cache: KVCache | RowCacheView | None = None,
    attention_mask: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    *,
    inv_freq: torch.Tensor | None = None,
    local_inv_freq: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    kernel: AttentionKernel = "sdpa",
) -> AttentionContext:
    """The `AttentionContext` of T = `n_tokens` new tokens of a causal decoder, built once per forward.

    `attention_mask` (B, T) marks real tokens 1 and left padding 0: padding keys are hidden and each row counts
    positions from its first real token. With a `cache` the T tokens take its next slots and attend to every slot
    stored before them. `document_ids` (B, T) packs several documents in a row (training, no cache): each run of equal
    ids attends only to itself and restarts its positions. `inv_freq` (RoPE) gives the rotary tables; `alibi_slopes`
    (ALiBi) turns the mask into an additive bias, in `dtype`. A `RowCacheView` cache puts each row's tokens at that
    row's own slots and positions (no padding mask: every row is its own sequence). A config with sliding-window layers
    also gets `context.local` (its window in the mask; `local_inv_freq`'s rotary tables when given).

    Raises:
        LlmkitError: a mask or document ids of the wrong shape, document ids with a cache, a cache made for another
            batch size or too full, or a sequence longer than the config's context window.
    """
    B, T = batch_size, n_tokens
    if isinstance(cache, RowCacheView):
        return _row_context(config, B, T, cache, inv_freq, alibi_slopes, dtype, device, kernel, local_inv_freq)
    start, end, valid, padded = _claim_slots(B, T, cache, attention_mask, document_ids)
    if end > config.max_seq_len:
        raise LlmkitError(
            f"sequence of {end} tokens exceeds {config.name}'s context window of {config.max_seq_len}; "
            "shorten the input"
        )
    if padded:
        # Left padding: each row counts positions from its first real token.
        all_positions = (valid.long().cumsum(-1) - 1).clamp(min=0)  # (B, S)
    else:
        all_positions = torch.arange(end, device=device)[None]  # (1, S)
    documents = None
    if document_ids is not None:
        documents, all_positions = _document_runs(document_ids)  # (B, T) each
    positions = all_positions[:, start:end]  # (B or 1, T)

    context = AttentionContext(positions=positions, cache=cache, start=start, kernel=kernel)
    context.valid = valid[:, start:end] if padded else None
    if config.position == "rope":
        context.cos, context.sin = rope_cos_sin(positions, inv_freq, dtype)
    needs_mask = padded or config.position == "alibi" or (start > 0 and T > 1) or documents is not None
    if not needs_mask:
        context.is_causal = T > 1  # start == 0 here, so queries and keys share slots
    else:
        allowed = _allowed_keys(start, end, valid, documents, device)  # (B or 1, 1, T, S)
        if config.position == "alibi":
            bias = alibi_bias(alibi_slopes, positions.expand(B, T), all_positions.expand(B, end))
            context.mask = bias.masked_fill(~allowed, float("-inf")).to(dtype)  # (B, H, T, S)
        else:
            context.mask = allowed
    if config.local_layers:
        context.local = _local_context(context, config.sliding_window, end, valid, documents, local_inv_freq, dtype)
    return context


def _row_context(
    config: Config, B: int, T: int, view: RowCacheView, inv_freq: torch.Tensor | None,
    alibi_slopes: torch.Tensor | None, dtype: torch.dtype, device: torch.device | str, kernel: AttentionKernel,
    local_inv_freq: torch.Tensor | None = None,
) -> AttentionContext:
    """`causal_context` over rows of a `RowKVCache`: row b's tokens sit at positions starts[b] + 0..T-1 (slot =
    position) and attend to its own slots up to themselves: a (B, 1, T, S) mask, RoPE at each row's positions.
    Sliding-window layers get `context.local`: the same mask limited to each query's last `window` slots."""
    if len(view.row_ids) != B:
        raise LlmkitError(f"row KV cache view names {len(view.row_ids)} rows, got a batch of {B}")
    end = max(view.starts) + T
    if end > config.max_seq_len:
        raise LlmkitError(f"sequence of {end} tokens exceeds {config.name}'s context window of {config.max_seq_len}; "
                          "shorten the input")
    positions = view.start_index.to(device)[:, None] + torch.arange(T, device=device)[None]  # (B, T)
    context = AttentionContext(positions=positions, cache=view, start=0, kernel=kernel)
    if config.position == "rope":
        context.cos, context.sin = rope_cos_sin(positions, inv_freq, dtype)
    key_slots = torch.arange(end, device=device)  # (S,)
    allowed = (key_slots[None, None, None, :] <= positions[:, None, :, None])  # (B, 1, T, S)
    if config.position == "alibi":
        bias = alibi_bias(alibi_slopes, positions, key_slots[None].expand(B, end))
        context.mask = bias.masked_fill(~allowed, float("-inf")).to(dtype)  # (B, H, T, S)
    else:
        context.mask = allowed
    if config.local_layers:
        local = replace(context, mask=allowed & (positions[:, None, :, None] - key_slots < config.sliding_window))
        if local_inv_freq is not None:
            local.cos, local.sin = rope_cos_sin(positions, local_inv_freq, dtype)
        context.local = local
    return context


def _local_context(
    context: AttentionContext, window: int, end: int, valid: torch.Tensor | None, documents: torch.Tensor | None,
    local_inv_freq: torch.Tensor | None, dtype: torch.dtype,
) -> AttentionContext:
    """The global `context` narrowed for sliding-window layers: keys more than `window` - 1 slots before the query are
    hidden (only once some query is that far in: before, the window is the whole causal span)."""
    local = replace(context)
    if local_inv_freq is not None:
        local.cos, local.sin = rope_cos_sin(context.positions, local_inv_freq, dtype)
    if end <= window:
        return local
    device = context.positions.device
    allowed = context.mask if context.mask is not None else _allowed_keys(context.start, end, valid, documents, device)
    query_slots = torch.arange(context.start, end, device=device)[:, None]  # (T, 1)
    key_slots = torch.arange(end, device=device)[None]  # (1, S)
    local.mask = allowed & (query_slots - key_slots < window)  # (B or 1, 1, T, S)
    local.is_causal = False
    return local


def _claim_slots(
    B: int, T: int, cache: KVCache | None, attention_mask: torch.Tensor | None, document_ids: torch.Tensor | None
) -> tuple[int, int, torch.Tensor | None, bool]:
    """Check the inputs' shapes and claim the T tokens' slots: (start, end, valid (B, S) or None, any padding).
    Slots are cache slots with a cache (S = every slot filled so far), else 0..T."""
    if attention_mask is not None and attention_mask.shape != (B, T):
        raise LlmkitError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected (batch, tokens) = {(B, T)}")
    if document_ids is not None and (document_ids.shape != (B, T) or cache is not None):
        raise LlmkitError(f"document_ids must be (batch, tokens) = {(B, T)} without a KV cache (packed training "
                          f"rows); got shape {tuple(document_ids.shape)}" + (" with a cache" if cache else ""))
    if cache is None:
        valid = attention_mask.bool() if attention_mask is not None else None
        return 0, T, valid, valid is not None and not bool(valid.all())
    if cache.batch_size != B:
        raise LlmkitError(f"KV cache was made for batch size {cache.batch_size}, got a batch of {B}")
    start, end = cache.reserve(T, attention_mask)
    return start, end, cache.valid[:, :end], cache.has_padding


def _allowed_keys(
    start: int, end: int, valid: torch.Tensor | None, documents: torch.Tensor | None, device: torch.device | str
) -> torch.Tensor:
    """Which key slots 0..end each query slot start..end may attend to: bool (B or 1, 1, T, S). Causal; padding keys
    (`valid` (B, S) False) hidden; with `documents` (B, T) only keys of the query's own document."""
    query_slots = torch.arange(start, end, device=device)[:, None]  # (T, 1)
    key_slots = torch.arange(end, device=device)[None]  # (1, S)
    allowed = (key_slots <= query_slots)[None, None]  # (1, 1, T, S)
    if valid is not None:
        # Padding keys are hidden; a padding query still sees itself so no softmax row is empty.
        allowed = allowed & (valid[:, None, None, :] | (key_slots == query_slots)[None, None])
    if documents is not None:
        allowed = allowed & (documents[:, None, :, None] == documents[:, None, None, :])  # (B, 1, T, S) block-diagonal
    return allowed


def _document_runs(document_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows: each run of equal ids (B, T) is one document. Returns its run number (B, T), so an id repeated
    later is another document, and each token's position counted from its document's first token (B, T)."""
    slots = torch.arange(document_ids.shape[1], device=document_ids.device)
    first = torch.cat([torch.ones_like(document_ids[:, :1], dtype=torch.bool),
                       document_ids[:, 1:] != document_ids[:, :-1]], dim=1)  # (B, T) a document starts here
    documents = first.long().cumsum(-1)  # (B, T)
    positions = slots - torch.where(first, slots, 0).cummax(-1).values  # (B, T) slot minus its document's start
    return documents, positions


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v/o projections (names match Llama checkpoints);
    `llmkit.nn.fused.fuse_projections` can join q/k/v into one product for inference."""

    FUSED_PROJECTIONS = ("q_proj", "k_proj", "v_proj")

    def __init__(self, config: Config, layer_index: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.layer_index = layer_index
        self.q_proj = Linear(config.d_model, config.q_dim, bias=config.qkv_bias)
        self.k_proj = Linear(config.d_model, config.kv_dim, bias=config.qkv_bias)
        self.v_proj = Linear(config.d_model, config.kv_dim, bias=config.qkv_bias)
        self.o_proj = Linear(config.q_dim, config.d_model, bias=config.out_bias)
        self.scale = config.attention_scale  # None: 1/sqrt(head_dim); Gemma 3: query_pre_attn_scalar**-0.5
        # QK-norm (Gemma 3): one RMSNorm over head_dim shared by every head of q, another for k
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps, config.norm_offset) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.norm_eps, config.norm_offset) if config.qk_norm else None
        self.sliding = layer_index in config.local_layers  # takes the context's sliding-window part
        self.window = config.sliding_window if self.sliding else 0

    def forward(
        self, x: torch.Tensor, context: AttentionContext, keys_values: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Self-attention over x (B, T, C); cross-attention when `keys_values` holds another sequence's keys and
        values (from `project_keys_values`, e.g. of the encoder states; the context then has no rotary tables or cache)."""
        B, T, _ = x.shape
        if self.sliding:
            context = context.local
        if keys_values is None and self.decodes_natively(x, context):
            q, k, v = self.project_qkv(x, context, rotate=False)  # (B, H, 1, D), (B, Hkv, 1, D) x 2
            cache = context.cache
            y = decode_kernels.decode_attention(
                q, k, v, cache.keys[self.layer_index], cache.values[self.layer_index], context.start,
                cache.valid if cache.has_padding else None, self.window,
                self.scale if self.scale is not None else self.head_dim**-0.5,
                context.cos, context.sin)  # (B, 1, H * D), q and k rotated in the op
            return self.o_proj(y)
        if keys_values is None:
            q, k, v = self.project_qkv(x, context)
        else:
            q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
            q = q if self.q_norm is None else self.q_norm(q)
            k, v = keys_values  # (B, Hkv, S, D)
        if context.cache is not None:
            k, v = context.cache.store(self.layer_index, context.start, k, v)  # (B, Hkv, S, D)
        attend = reference_attention if context.kernel == "reference" else sdpa_attention
        if k.dtype == q.dtype:
            y = attend(q, k, v, context.mask, context.is_causal, self.scale)
        elif q.device.type == "cpu" and k.dtype not in FAST_HALF_ATTENTION_ON_CPU:  # a KV cache kept in another
            # dtype (Decoder.kv_dtype) on a CPU with no fast path for attention in it (bfloat16 SDPA over 541 keys:
            # 706 us vs 112 in float32, AVX2): attend in the activations' dtype over the cache's values widened, as
            # the native decode op does
            y = attend(q, k.to(q.dtype), v.to(q.dtype), context.mask, context.is_causal, self.scale)
        else:  # on a GPU, or a CPU with a fast path for the cache's dtype: in that dtype
            mask = context.mask
            mask = mask.to(k.dtype) if mask is not None and mask.is_floating_point() else mask
            y = attend(q.to(k.dtype), k, v, mask, context.is_causal, self.scale).to(q.dtype)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*D)
        return self.o_proj(y)

    def decodes_natively(self, x: torch.Tensor, context: AttentionContext) -> bool:
        """Whether this forward takes `decode_kernels.decode_attention`: one new token per row into a `KVCache`,
        float32 activations (and rotary tables) on the CPU at inference, and a mask that only padding or the sliding
        window makes (the kernel applies both itself; ALiBi's float bias and the reference kernel keep the general
        path)."""
        return (x.shape[1] == 1 and isinstance(context.cache, KVCache) and context.kernel == "sdpa"
                and (context.mask is None or context.mask.dtype == torch.bool)
                and (context.cos is None or context.cos.dtype == torch.float32) and decode_kernels.applies(x))

    def project_qkv(
        self, x: torch.Tensor, context: AttentionContext, rotate: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (B, H, T, D), keys and values (B, Hkv, T, D) of x (B, T, C), queries and keys rotated when the
        context has rotary tables (unless `rotate` is False: the native decode op rotates them itself). Where
        `fuse_projections` joined q/k/v: one product, and one rotation of queries and keys together (they sit side by
        side in its output). QK-norm (Gemma 3) normalises q and k before the rotation."""
        B, T, _ = x.shape
        H, Hkv = self.n_heads, self.n_kv_heads
        qkv = fused_product(self, x)  # (B, T, (H + 2 Hkv) * D) or None
        if qkv is None:
            q = self.q_proj(x).view(B, T, H, self.head_dim).transpose(1, 2)  # (B, H, T, D)
            q = q if self.q_norm is None else self.q_norm(q)
            k, v = self.project_keys_values(x)  # (B, Hkv, T, D), k normalised when QK-norm is on
            if context.cos is not None and rotate:
                q, k = apply_rope(q, context.cos, context.sin), apply_rope(k, context.cos, context.sin)
            return q, k, v
        qkv = qkv.view(B, T, H + 2 * Hkv, self.head_dim).transpose(1, 2)  # (B, H + 2 Hkv, T, D)
        qk, v = qkv[:, : H + Hkv], qkv[:, H + Hkv :]
        if self.q_norm is not None:  # QK-norm: each part its own RMSNorm before the rotation
            qk = torch.cat([self.q_norm(qk[:, :H]), self.k_norm(qk[:, H:])], dim=1)
        if context.cos is not None and rotate:
            qk = apply_rope(qk, context.cos, context.sin)
        return qk[:, :H], qk[:, H:], v

    def project_keys_values(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, Hkv, S, D) of states (B, S, C)."""
        B, S, _ = states.shape
        k = self.k_proj(states).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, D)
        v = self.v_proj(states).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, D)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return k, v


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
    scale: float | None = None,
) -> torch.Tensor:
    """Fused attention; `enable_gqa` lets each key/value head serve its query group without copies.
    q (B, H, T, D); k, v (B, Hkv, S, D) -> (B, H, T, D). `scale` None is 1/sqrt(D)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=k.shape[1] != q.shape[1])


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d) + mask) V written out (Q K^T * scale when a scale is given); same shapes as
    `sdpa_attention`."""
    H, T, D = q.shape[1], q.shape[2], q.shape[3]
    k = k.repeat_interleave(H // k.shape[1], dim=1)  # (B, H, S, D)
    v = v.repeat_interleave(H // v.shape[1], dim=1)
    scores = (q @ k.transpose(-2, -1)).float()  # (B, H, T, S)
    scores = scores / D**0.5 if scale is None else scores * scale
    if is_causal:
        S = k.shape[2]
        causal = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        scores = scores.masked_fill(~causal, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return (scores.softmax(dim=-1).to(v.dtype)) @ v
