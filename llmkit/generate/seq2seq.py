"""Generation with an encoder-decoder (T5 over token ids, Whisper over log-mel features): the encoder runs once,
every decoder layer's cross-attention keys/values are projected once, then the shared decode loop (`sample_steps`)
adds one target token per step through the decoder's self-attention KV cache.

An ensemble (several models with one vocabulary, e.g. the same recipe trained from different seeds) decodes as one
model whose next-token scores are the mean of its members' log-probabilities, each member with its own encoder
states and cache: log p(y_t) = mean_m log p_m(y_t | y_<t, x) up to a constant (a product of experts; greedy takes its
argmax). Small models trained on few voices differ a lot from seed to seed, and their average errs far less than a
typical one of them (docs/multimodal.md, "Speech"). Each member may also read its own input: the same model over
copies of a clip at several speeds (test-time augmentation) is an ensemble of (model, copy) pairs."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from llmkit.errors import LlmkitError
from llmkit.generate.decode import sample_steps
from llmkit.generate.sampling import SamplingSettings
from llmkit.models.seq2seq import Seq2Seq
from llmkit.models.speech import SpeechModel


def generate_seq2seq(
    model: Seq2Seq | SpeechModel | Sequence[Seq2Seq | SpeechModel],
    input_ids: torch.Tensor | Sequence[torch.Tensor],
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    settings: SamplingSettings | None = None,
    stop_ids: Iterable[int] = (),
    pad_id: int | None = None,
    decoder_prompt: torch.Tensor | None = None,
) -> torch.Tensor:
    """New tokens (B, N) for source ids (B, S) (a SpeechModel: log-mel features (B, n_mels, frames)), N <=
    max_new_tokens: greedy (default) or sampled (`settings`). `model` may be a list of models sharing a vocabulary
    and decoder start id: an ensemble scored by the mean of their log-probabilities (module docstring); `input_ids`
    may then be a list too, one input per model (same batch size; e.g. one clip's speed copies, the model repeated).

    The decoder starts from `config.decoder_start_id`, or from `decoder_prompt` (B, P) when given (Whisper:
    <|startoftranscript|><|en|><|transcribe|><|notimestamps|>), which is not part of the result. A row that produced
    one of `stop_ids` is filled with `pad_id` (default: the decoder start id) afterwards; generation ends when every
    row has stopped, as transformers' `generate` does.
    """
    models = list(model) if isinstance(model, Sequence) else [model]
    if not models:
        raise LlmkitError("generate_seq2seq got an empty list of models; pass one model or several")
    config = models[0].config
    for member in models[1:]:
        if (member.config.vocab_size, member.config.decoder_start_id) != (config.vocab_size, config.decoder_start_id):
            raise LlmkitError(f"an ensemble's models must share one vocabulary and decoder start id: {config.name!r} "
                              f"has {config.vocab_size:,} ids starting at {config.decoder_start_id}, "
                              f"{member.config.name!r} {member.config.vocab_size:,} at {member.config.decoder_start_id}")
    inputs = list(input_ids) if isinstance(input_ids, Sequence) else [input_ids] * len(models)
    if len(inputs) != len(models) or len({x.shape[0] for x in inputs}) != 1:
        raise LlmkitError(f"generate_seq2seq got {len(inputs)} inputs with batch sizes "
                          f"{sorted({x.shape[0] for x in inputs})} for {len(models)} models; pass one input, or one "
                          "per model with the same batch size")
    input_ids = inputs[0]
    settings = settings or SamplingSettings()
    settings.validate()
    if max_new_tokens < 1:
        raise LlmkitError(f"max_new_tokens={max_new_tokens} must be >= 1; ask for at least one new token")
    if config.decoder_start_id is None:
        raise LlmkitError(f"config {config.name!r} has no decoder_start_id, the first decoder input; set it (T5 uses "
                          "its pad id, 0)")
    for x in inputs:  # T5's source ids (Whisper's features are floats)
        if not x.is_floating_point() and x.numel() and not (0 <= int(x.min()) and int(x.max()) < config.vocab_size):
            raise LlmkitError(f"input_ids hold ids outside {config.name}'s vocabulary of {config.vocab_size:,}; use "
                              "the tokenizer that belongs to this model")
    pad_id = config.decoder_start_id if pad_id is None else pad_id
    batch_size = input_ids.shape[0]
    with torch.inference_mode():
        start = decoder_prompt
        if start is None:
            start = torch.full((batch_size, 1), config.decoder_start_id, dtype=torch.long, device=input_ids.device)
        elif start.dim() != 2 or start.shape[0] != batch_size or start.shape[1] == 0:
            raise LlmkitError(f"decoder_prompt has shape {tuple(start.shape)}; expected (batch, tokens) = "
                              f"({batch_size}, at least 1)")
        # per member: every decoder layer's cross-attention keys/values of its encoder states (once), its own cache
        states = [(member.encoder_keys_values(member.encode(x, attention_mask)),
                   member.new_cache(batch_size, start.shape[1] + max_new_tokens))
                  for member, x in zip(models, inputs, strict=True)]
        seen = None
        if settings.repetition_penalty != 1.0:
            seen = torch.zeros(batch_size, config.vocab_size, dtype=torch.bool, device=input_ids.device)  # (B, V)
            seen.scatter_(1, start, True)

    def decode(tokens: torch.Tensor) -> torch.Tensor:  # (B, 1) -> scores (B, V) of the next token
        logits = [member.decode(tokens, keys_values, attention_mask, cache)[:, -1]
                  for member, (keys_values, cache) in zip(models, states, strict=True)]
        if len(logits) == 1:
            return logits[0]  # one model: its own logits
        return torch.stack([x.float().log_softmax(-1) for x in logits]).mean(0)  # (B, V) mean log-probabilities

    steps = sample_steps(lambda: decode(start), lambda ids: decode(ids[:, None]), max_new_tokens, settings,
                         frozenset(stop_ids), seen, input_ids.device)
    columns = [[pad_id if token is None else token for token in tokens] for tokens in steps]  # N lists of B ids
    return torch.tensor(columns, dtype=torch.long, device=input_ids.device).T  # (B, N)
