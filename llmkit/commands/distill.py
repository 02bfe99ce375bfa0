"""`llmkit distill`: a small student learns from a teacher's outputs through the one training loop. A thin recipe:
load the teacher, build the student (every other layer, a preset or a path), read the text, train, save, compare."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmkit.data.templates import FieldMap
from llmkit.distill.settings import DistillSettings, HiddenLoss, LossName
from llmkit.errors import LlmkitError
from llmkit.train.settings import TrainSettings, check_settings

STUDENT_DIR = "student"
BUILTIN_TEXT = "wiki_vital/summaries_en.jsonl.gz"  # in the shared data: Wikipedia's vital-article summaries
EVERY_OTHER, BLOCK_INFLUENCE = "every_other", "block_influence"  # --student_layers by position or by data
CALIBRATION_WINDOWS = 16  # training windows (of --seq_len tokens) that score the teacher's blocks for block_influence
# A few minutes on a laptop CPU: SmolLM2-135M-Instruct -> its 15 even-numbered layers, 30 steps of 4 x 128 tokens.
DISTILL_DEFAULTS = TrainSettings(max_steps=30, batch_size=4, lr=3e-4, warmup_steps=3, eval_every=15, eval_batches=4,
                                 checkpoint_every=30, log_every=5, weight_decay=0.0)


def distill(
    teacher: str | None = None,
    student: str | None = None,
    student_layers: str = EVERY_OTHER,
    student_n_layers: int | None = None,
    data: list[str] | str | None = None,
    template: str | None = None,
    fields: FieldMap = FieldMap(),  # noqa: B008 (frozen)
    loss: LossName = "kl",
    temperature: float = 2.0,
    alpha: float = 0.5,
    beta: float = 0.5,
    lmbda: float = 0.0,
    prompt_tokens: int | None = None,
    hidden_weight: float = 0.0,
    hidden_loss: HiddenLoss = "cosine",
    embedding_loss: HiddenLoss = "cosine",
    seq_len: int = 128,
    max_tokens: int | None = 200_000,
    held_out_fraction: float = 0.05,
    cache: str | None = None,
    cache_top_k: int | None = 64,
    train: TrainSettings = DISTILL_DEFAULTS,
    output: str = "runs/distill",
) -> dict[str, Any]:
    """Distil a teacher into a smaller student: soft-target KL, reverse KL or GKD for decoders, sentence-embedding
    cosine/MSE for encoders; held-out perplexity (or embedding agreement) before and after.

    Example: llmkit distill          (SmolLM2-135M-Instruct -> its even-numbered 15 layers, 30 steps on Wikipedia text)
             llmkit distill --student_layers block_influence --student_n_layers 20   (drop 10 of 30 blocks, by data)
             llmkit distill --teacher model.gguf --student_layers 0,2,4,6 --loss reverse_kl --temperature 1
             llmkit distill --teacher model/ --student mini --data "[books/]" --loss gkd --beta 0.5 --lmbda 0.5
             llmkit distill --teacher pruned_teacher/ --student pruned_student/ --cache runs/teacher_logits
             llmkit distill --template flan_dialogue_summary     (instruction data: DialogSum, loss on summaries)
             llmkit distill --data "[chat.jsonl]" --template chatml --fields.messages conversation
             llmkit distill --teacher all-MiniLM-L6-v2/ --data wiki.jsonl --embedding_loss mse --output runs/minilm3

    The student is --student (a preset, built with the teacher's vocabulary, or a checkpoint: e.g. a pruned teacher)
    or, by default, the teacher's own layers --student_layers (every_other: 0, 2, 4, ... as DistilBERT did;
    block_influence: the --student_n_layers blocks that turn the hidden state most on the first training windows,
    ShortGPT's Block Influence, decoders only; or a list such as 0,2,5). Per token, the loss is alpha * D + (1 -
    alpha) * cross-entropy on the text, D being T^2 KL(teacher || student) (kl), T^2 KL(student || teacher)
    (reverse_kl) or the generalised JSD(beta) (gkd; with --lmbda, that share of batches is first rewritten by the
    student's own samples: on-policy). An encoder teacher (a BERT / sentence-transformers directory) is distilled on
    pooled sentence embeddings (--embedding_loss), each --data text one sentence. With --template, --data is
    instruction data as `llmkit finetune` reads it (Alpaca, prompt/completion or chat messages; built-in: DialogSum):
    each example is rendered with the template and both losses count only its response tokens; the held-out share is
    the last --held_out_fraction of the examples. --cache DIR keeps the teacher's logits on disk (its top
    --cache_top_k per token; kl only unless null = the full vocabulary). Writes OUTPUT/student/, checkpoints, metrics
    and loss.png; the loop's flags are --train.X (--train.max_steps, --train.lr, --train.device, ...).

    Args:
        teacher: the teacher: .gguf file, Hugging Face or llmkit directory (default: SmolLM2-135M-Instruct).
        student: a preset name or a checkpoint path to train as the student (default: the teacher's layers).
        student_layers: the teacher layers the student keeps when --student is not given: every_other,
            block_influence or 0,2,4.
        student_n_layers: --student_layers block_influence: how many blocks the student keeps (default: half,
            rounded up, as every_other).
        data: .txt/.md/.jsonl(.gz)/.parquet files or folders (default: Wikipedia vital-article summaries; with
            --template: DialogSum's training dialogues and summaries).
        template: decoders: read --data as instruction data rendered with this prompt template (as llmkit finetune
            --template: alpaca, flan_dialogue_summary, chatml, ...); the loss counts response tokens only.
        fields: --template: which column holds each field (--fields.input dialogue, --fields.output summary).
        loss: kl (Hinton et al. 2015), reverse_kl (MiniLLM) or gkd (generalised JSD, Agarwal et al. 2024).
        temperature: softens both distributions (the KLs are multiplied by T^2; gkd is not, as in TRL).
        alpha: weight of the distillation term; 1 - alpha goes to cross-entropy on the text.
        beta: gkd: 0 is forward KL, 1 reverse KL, in between the generalised JSD.
        lmbda: gkd: share of batches on which the student writes the continuation itself (0: supervised only).
        prompt_tokens: on-policy batches keep this many tokens of each window (default: half of it).
        hidden_weight: weight of DistilBERT's hidden-state loss on the last layer (same-width students).
        hidden_loss: cosine or mse, for the hidden-state loss.
        embedding_loss: encoders: cosine or mse between the student's and the teacher's sentence embeddings.
        seq_len: decoders: tokens per training window (with --template: longest example, cut on the left);
            encoders: longest text in tokens.
        max_tokens: decoders: use at most this many tokens of --data (null: all of it; with --template: of the
            rendered examples, whole examples only).
        held_out_fraction: the last share of the text (or of the texts) held out for the before/after comparison.
        cache: a folder keeping the teacher's logits, keyed by teacher and data, for reuse by later runs.
        cache_top_k: logits per token the cache keeps (null: the whole vocabulary).
        train: the training loop's settings.
        output: run directory.
    """
    from llmkit.commands.common import model_path

    settings = DistillSettings(loss=loss, temperature=temperature, alpha=alpha, beta=beta, lmbda=lmbda,
                               prompt_tokens=prompt_tokens, hidden_weight=hidden_weight, hidden_loss=hidden_loss,
                               seed=train.seed)
    settings.validate()
    check_settings(train)
    if not 0 < held_out_fraction < 1:
        raise LlmkitError(f"--held_out_fraction {held_out_fraction} must be between 0 and 1 (0.05 is usual)")
    if student is not None and student_layers != EVERY_OTHER:
        raise LlmkitError(f"--student {student} and --student_layers {student_layers} both name the student; pass one")
    if student_n_layers is not None and student_layers != BLOCK_INFLUENCE:
        raise LlmkitError(f"--student_n_layers {student_n_layers} sizes a --student_layers {BLOCK_INFLUENCE} student; "
                          f"pass --student_layers {BLOCK_INFLUENCE} or drop --student_n_layers")
    if template is not None and lmbda > 0:
        raise LlmkitError(f"--lmbda {lmbda}: on-policy batches rewrite plain text windows with the student's samples; "
                          "with --template (instruction data) pass --lmbda 0")
    teacher_path = model_path(teacher)
    if teacher_arch(teacher_path) == "encoder":
        if template is not None:
            raise LlmkitError(f"--template {template} renders instruction data for a decoder; an encoder teacher is "
                              "distilled on plain sentences: drop --template")
        if student_layers == BLOCK_INFLUENCE:
            raise LlmkitError(f"--student_layers {BLOCK_INFLUENCE} scores a decoder's blocks; for an encoder teacher "
                              f"pass --student_layers {EVERY_OTHER} or layer numbers such as 0,2,4")
        return distill_encoder(teacher_path, student, student_layers, data, settings, embedding_loss, seq_len,
                               held_out_fraction, train, Path(output))
    return distill_decoder(teacher_path, student, (student_layers, student_n_layers), TextSource(data, template, fields),
                           settings, seq_len, max_tokens, held_out_fraction, cache, cache_top_k, train, Path(output))


def teacher_arch(path: Path) -> str:
    """decoder, encoder or seq2seq: what the teacher checkpoint declares (a .gguf always holds a decoder)."""
    from llmkit.checkpoints import detect_format, load_config

    arch = "decoder" if detect_format(path) == "gguf" else load_config(path).arch
    if arch == "seq2seq":
        raise LlmkitError(f"--teacher {path} is an encoder-decoder (T5); distill handles decoders and encoders")
    return arch


def build_student(spec: str | None, layers: str, teacher: Any, seed: int, n_layers: int | None = None,
                  calibration: Any = None) -> Any:
    """The student: --student (preset or path) or the teacher's --student_layers; block_influence scores the
    teacher's blocks on `calibration` ids (N, T) and keeps --student_n_layers of them (default: half, rounded up)."""
    from llmkit.distill.student import (
        block_influence_layer_indices,
        every_other_layer_indices,
        student_from,
        student_from_layers,
    )

    if spec is not None:
        return student_from(spec, teacher, seed)
    if layers == EVERY_OTHER:
        return student_from_layers(teacher, every_other_layer_indices(teacher.config.n_layers))
    if layers == BLOCK_INFLUENCE:
        keep = n_layers if n_layers is not None else len(every_other_layer_indices(teacher.config.n_layers))
        chosen = block_influence_layer_indices(teacher, calibration, keep)
        print(f"block influence keeps teacher layers {','.join(map(str, chosen))}")
        return student_from_layers(teacher, chosen)
    try:
        chosen = [int(layer) for layer in layers.split(",")]
    except ValueError:
        raise LlmkitError(f"--student_layers {layers}: pass every_other, block_influence or teacher layer numbers such "
                          "as 0,2,4") from None
    return student_from_layers(teacher, chosen)


def check_student_tokenizer(student: str | None, tokenizer: Any, teacher: Path) -> None:
    """A student checkpoint with its own tokenizer must read ids as the teacher does (same vocabulary, same ids)."""
    from llmkit.checkpoints import load_tokenizer

    if student is None or not Path(student).exists():
        return
    try:
        own = load_tokenizer(student)
    except LlmkitError:
        return  # no tokenizer saved with it: the vocabulary size is checked on the model
    if own.fingerprint != tokenizer.fingerprint:
        raise LlmkitError(f"--student {student} uses another tokenizer ({own.vocab_size:,} tokens) than --teacher "
                          f"{teacher} ({tokenizer.vocab_size:,} tokens); distillation compares token distributions, "
                          "so both must share one: pick a student made from the teacher")


def documents(data: list[str] | str | None) -> list[str]:
    """The texts of --data, or the built-in Wikipedia summaries."""
    from llmkit.commands.common import as_paths
    from llmkit.data.shared import shared_data_file
    from llmkit.data.sources import read_documents

    paths = as_paths(data) or [shared_data_file(BUILTIN_TEXT)]
    texts = [text for text in read_documents(paths) if text.strip()]
    if not texts:
        raise LlmkitError(f"--data {', '.join(map(str, paths))} holds no text")
    return texts


@dataclass(frozen=True)
class TextSource:
    """What a decoder is distilled on: plain text windows, or instruction examples when `template` is given."""

    data: list[str] | str | None
    template: str | None
    fields: FieldMap


def instruction_batches(source: TextSource, tokenizer: Any, seq_len: int, max_tokens: int | None,
                        held_out_fraction: float, train: TrainSettings) -> tuple[Any, Any, int]:
    """(training batches, held-out eval batches, training tokens) of instruction examples rendered with
    `source.template`; labels cover the responses only (llmkit.data.sft), so the loss and perplexity do too."""
    from llmkit.commands.common import as_paths
    from llmkit.data.packing import sft_batches, sft_validation_batches
    from llmkit.data.sft import SFTReport, builtin_dialogsum, load_sft_records, tokenize_records

    paths = as_paths(source.data)
    if paths:
        records, report = load_sft_records(paths, source.fields)
    else:
        records = builtin_dialogsum("train")
        report = SFTReport(rows=len(records))
    examples, report = tokenize_records(records, tokenizer, source.template, seq_len, seed=train.seed, report=report)
    if max_tokens is not None:
        kept, total = [], 0
        for example in examples:
            total += len(example.input_ids)
            if total > max_tokens:
                break
            kept.append(example)
        examples = kept
    n_held = max(1, round(held_out_fraction * len(examples)))
    if len(examples) - n_held < train.batch_size:
        raise LlmkitError(f"{len(examples)} instruction examples (after --max_tokens {max_tokens}) leave fewer than "
                          f"--train.batch_size {train.batch_size} for training; give more --data or raise --max_tokens")
    print(report.summary())
    training, held_out = examples[:-n_held], examples[-n_held:]
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    evals = sft_validation_batches(held_out[:train.batch_size * train.eval_batches], train.batch_size, pad_id=pad_id)
    tokens = sum(sum(label >= 0 for label in example.labels) for example in training)
    return sft_batches(training, train.batch_size, seed=train.seed, pad_id=pad_id), evals, tokens


def distill_decoder(teacher_path: Path, student_spec: str | None, student_layers: tuple[str, int | None],
                    source: TextSource, settings: DistillSettings, seq_len: int, max_tokens: int | None,
                    held_out_fraction: float, cache: str | None, cache_top_k: int | None, train: TrainSettings,
                    output: Path) -> dict[str, Any]:
    """Token-level distillation of a decoder on text windows; held-out perplexity of teacher and student."""
    import torch

    from llmkit.checkpoints import load_tokenizer, save_model
    from llmkit.commands.common import load_decoder
    from llmkit.device import resolve_device
    from llmkit.distill.cache import TeacherLogitCache
    from llmkit.distill.data import (
        held_out_batches,
        held_out_perplexity,
        split_held_out,
        tokenize_documents,
        window_batches,
    )
    from llmkit.distill.objective import DecoderDistillation, check_same_vocabulary
    from llmkit.train.loop import train as train_loop

    tokenizer = load_tokenizer(teacher_path)
    check_student_tokenizer(student_spec, tokenizer, teacher_path)
    device = str(resolve_device(train.device))
    teacher = load_decoder(teacher_path, weights="float", device=device)  # fp32, fused projections: forward only
    if seq_len + 1 > teacher.config.max_seq_len:
        raise LlmkitError(f"--seq_len {seq_len} exceeds {teacher.config.name}'s context of {teacher.config.max_seq_len}")
    if source.template is None:
        ids = tokenize_documents(tokenizer, documents(source.data), max_tokens)
        training, held_out = split_held_out(ids, held_out_fraction, seq_len)
        evals = held_out_batches(held_out, seq_len, train.batch_size, max_batches=train.eval_batches)
        batches, training_tokens = window_batches(training, seq_len, train.seed), len(training)
    else:
        batches, evals, training_tokens = instruction_batches(source, tokenizer, seq_len, max_tokens,
                                                              held_out_fraction, train)
    layers, n_layers = student_layers
    calibration = batches(0, CALIBRATION_WINDOWS, 0, 1)["input_ids"] if layers == BLOCK_INFLUENCE else None
    torch.manual_seed(train.seed)
    student = build_student(student_spec, layers, teacher, train.seed, n_layers, calibration)
    check_same_vocabulary(student, teacher)
    logit_cache = TeacherLogitCache(cache, teacher, cache_top_k) if cache else None
    objective = DecoderDistillation(teacher, settings, cache=logit_cache, top_k=cache_top_k if cache else None)
    teacher_ppl, before = held_out_perplexity(teacher, evals), held_out_perplexity(student, evals)
    print(f"teacher {teacher.config.name}: {teacher.num_parameters():,} parameters, held-out perplexity "
          f"{teacher_ppl:.2f}; student {student.config.n_layers} layers, {student.num_parameters():,} parameters, "
          f"{before:.2f} before training; {training_tokens:,} training tokens" +
          (" (responses)" if source.template else ""))
    result = train_loop(student, objective, batches, train, output,
                        eval_batches=evals, tokenizer=tokenizer)
    after = held_out_perplexity(student, evals)
    save_model(student, output / STUDENT_DIR, tokenizer=tokenizer)
    print(f"student held-out perplexity {before:.2f} -> {after:.2f} (teacher {teacher_ppl:.2f}); saved to "
          f"{output / STUDENT_DIR}; loss curve {result.plot}")
    return {"teacher_perplexity": teacher_ppl, "student_perplexity_before": before, "student_perplexity": after,
            "steps": result.steps, "tokens": result.tokens, "student": str(output / STUDENT_DIR),
            "on_policy_batches": objective.on_policy_batches,
            "cache": {"hits": logit_cache.hits, "misses": logit_cache.misses} if logit_cache else None}


def distill_encoder(teacher_path: Path, student_spec: str | None, student_layers: str, data: Any,
                    settings: DistillSettings, embedding_loss: HiddenLoss, seq_len: int, held_out_fraction: float,
                    train: TrainSettings, output: Path) -> dict[str, Any]:
    """Sentence-embedding distillation of an encoder; held-out cosine between student and teacher embeddings."""
    from dataclasses import replace

    import torch

    from llmkit.checkpoints import load_model, load_tokenizer, save_model
    from llmkit.checkpoints.hf_bert import sentence_settings
    from llmkit.device import resolve_device
    from llmkit.distill.encoder import SentenceDistillation, sentence_batches
    from llmkit.distill.objective import check_same_vocabulary
    from llmkit.generate.embed import embed_texts, encode_for_encoder
    from llmkit.train.loop import train as train_loop

    if settings.loss != "kl" or settings.lmbda > 0:
        raise LlmkitError(f"--loss {settings.loss} / --lmbda compare token distributions of decoders; an encoder teacher "
                          "is distilled on sentence embeddings: choose --embedding_loss cosine or mse instead")
    tokenizer = load_tokenizer(teacher_path)
    check_student_tokenizer(student_spec, tokenizer, teacher_path)
    teacher = load_model(teacher_path, arch="encoder", device=str(resolve_device(train.device)))
    sentence = replace(sentence_settings(teacher_path), max_tokens=min(seq_len, teacher.config.max_seq_len))
    torch.manual_seed(train.seed)
    student = build_student(student_spec, student_layers, teacher, train.seed)
    check_same_vocabulary(student, teacher)
    texts = documents(data)
    n_held_out = max(1, int(len(texts) * held_out_fraction))
    if len(texts) - n_held_out < train.batch_size:
        raise LlmkitError(f"--data holds {len(texts)} texts: too few for a batch of {train.batch_size} besides "
                          f"{n_held_out} held out; pass more texts or a smaller --train.batch_size")
    training, held_out = texts[:-n_held_out], texts[-n_held_out:]
    targets = embed_texts(teacher, tokenizer, training, sentence)  # (N, C), computed once
    rows = encode_for_encoder(tokenizer, training, sentence.max_tokens)
    pad_id = next((i for i in (tokenizer.pad_id, teacher.config.pad_id) if i is not None), 0)
    objective = SentenceDistillation(teacher if settings.hidden_weight > 0 else None, sentence, embedding_loss,
                                     settings.hidden_weight, settings.hidden_loss)
    reference = embed_texts(teacher, tokenizer, held_out, sentence)

    def agreement() -> float:
        """Mean cosine between the student's and the teacher's embeddings of the held-out texts."""
        vectors = embed_texts(student, tokenizer, held_out, sentence)
        return float(torch.nn.functional.cosine_similarity(vectors, reference, dim=-1).mean())

    before = agreement()
    print(f"teacher {teacher.config.name}: {teacher.num_parameters():,} parameters; student {student.config.n_layers} "
          f"layers, {student.num_parameters():,} parameters; held-out cosine to the teacher {before:.4f} before "
          f"training; {len(training):,} training texts")
    result = train_loop(student, objective, sentence_batches(rows, pad_id, train.seed, targets), train, output,
                        tokenizer=tokenizer)
    after = agreement()
    save_model(student, output / STUDENT_DIR, tokenizer=tokenizer)
    print(f"held-out cosine to the teacher {before:.4f} -> {after:.4f}; saved to {output / STUDENT_DIR}; loss curve "
          f"{result.plot}")
    return {"cosine_before": before, "cosine": after, "steps": result.steps, "student": str(output / STUDENT_DIR)}
