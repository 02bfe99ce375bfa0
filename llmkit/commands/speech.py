"""`llmkit speech train|transcribe`: a Whisper-style speech recogniser (llmkit.models.speech) trained on the Free
Spoken Digit Dataset, and transcription of WAV files with it or with an imported Hugging Face Whisper checkpoint."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from llmkit.commands.common import Device
from llmkit.train.settings import TrainSettings

# 2,000 steps of the 1.0M-parameter digit model: ~2.5 minutes on an idle 2-core Zen 4 VM (2 threads), ~15 on an older
# 2-core VM under load (docs/multimodal.md, "## Speech")
SPEECH_DEFAULTS = TrainSettings(max_steps=2000, batch_size=32, lr=2e-3, warmup_steps=50, weight_decay=0.05,
                                eval_every=0, checkpoint_every=400, log_every=50, device="cpu")
# Whisper's task tokens after <|startoftranscript|>: English, transcribe, no timestamps (when the vocabulary has them)
WHISPER_TASK_TOKENS = ("<|en|>", "<|transcribe|>", "<|notimestamps|>")
HELD_OUT_FILE = "heldout.json"


def speech_train(
    output: str = "runs/speech-digits",
    d_model: int = 128,
    n_layers: int = 2,
    n_heads: int = 4,
    n_mels: int = 80,
    n_frames: int = 100,
    feature_norm: Literal["whisper", "utterance", "speech"] = "whisper",
    vtlp: float = 0.0,
    label_smoothing: float = 0.0,
    ensemble: int = 1,
    validation_speaker: str | None = None,
    data: str | None = None,
    train: TrainSettings = SPEECH_DEFAULTS,
) -> Any:
    """Train a small Whisper-style model to transcribe spoken digits; report accuracy on two unheard speakers.

    Example: llmkit speech train                                  (FSDD, 1.0M parameters, 3-15 minutes on a 2-core CPU)
             llmkit speech train --train.max_steps 3000 --d_model 192 --output runs/digits-big
             llmkit speech train --ensemble 5 --output runs/digits-5   (five seeds, transcribed as one: ~5x the time)
             llmkit speech train --validation_speaker nicolas --train.max_steps 800   (choose settings: 3 voices train)

    Trains on 2,000 real recordings by 4 speakers of the Free Spoken Digit Dataset (../shared/data/
    free_spoken_digits), augmented on the fly (speed, gain, shift, noise, SpecAugment), through the one training
    loop with the
    seq2seq cross-entropy; then transcribes the 1,000 recordings of the 2 held-out speakers (lucas, theo) greedily and
    prints the digit accuracy. OUTPUT holds checkpoints/step-N/ (a complete model with its tokenizer: try `llmkit
    speech transcribe --model OUTPUT/checkpoints/step-N --files "[a.wav]"`), metrics, loss.png and heldout.json.

    Args:
        output: run directory (checkpoints, metrics, loss curve, held-out accuracy); an existing run is resumed.
        d_model: width of both transformer stacks.
        n_layers: layers of the encoder and of the decoder each.
        n_heads: attention heads.
        n_mels: log-mel channels (Whisper: 80).
        n_frames: 10 ms feature frames per clip (100 = 1 s; FSDD clips are 0.1-2.3 s, 99% under 1 s).
        feature_norm: whisper (Whisper's log-mel features as they are), utterance (each clip's channel means over
            its audio frames removed and its variance made 1: best on the training voices, worse on lucas) or speech
            (the same with statistics over the clip's speech frames only, those within 30 dB of its loudest: best
            on the training voices; held out 77.4% against whisper's 83.5%); see docs/multimodal.md. Saved in the
            model's config, so transcribe applies it too.
        vtlp: vocal-tract-length perturbation: each training clip's frequency axis stretched by a factor drawn from
            1 - vtlp .. 1 + vtlp (Jaitly & Hinton 2013: 0.1); 0 turns it off.
        label_smoothing: train against (1 - e) one-hot + e uniform over the vocabulary (Szegedy et al. 2016); 0
            turns it off (0.1 lost to 0 on the training-voice screens: docs/multimodal.md).
        ensemble: train this many models, from seeds train.seed, train.seed + 1, ... (OUTPUT/member-K/ each, each
            resumable), and transcribe with all of them at once: the mean of their log-probabilities per token
            (llmkit.generate.seq2seq). Models this small differ by up to 24 points from seed to seed on unheard voices;
            their ensemble beats their mean by 6-12 points (docs/multimodal.md). 1: one model in OUTPUT.
        validation_speaker: one of the four training speakers to hold out and report on instead of lucas and theo
            (trains on the other three): for choosing settings without looking at the held-out speakers.
        data: the FSDD folder (default: free_spoken_digits in the shared data, $LLMKIT_SHARED_DATA).
        train: training settings (steps, batch size, learning rate, device, ...).
    """
    import json
    from pathlib import Path

    from llmkit.config import Config
    from llmkit.data.fsdd import (
        HELD_OUT_SPEAKERS,
        START_OF_TRANSCRIPT,
        TRAIN_SPEAKERS,
        DigitBatches,
        digit_tokenizer,
        load_recordings,
    )
    from llmkit.errors import LlmkitError
    from llmkit.io import atomic_write_text
    from llmkit.models.speech import SpeechModel
    from llmkit.train.loop import train as train_loop
    from llmkit.train.objectives import seq2seq_objective
    from llmkit.train.settings import check_settings

    check_settings(train)
    objective = seq2seq_objective(label_smoothing)  # checks the value before any data is read
    if ensemble < 1:
        raise LlmkitError(f"--ensemble {ensemble} must be at least 1 (1: one model; 5: five seeds transcribing as one)")
    if n_frames < 2 or n_frames % 2:
        raise LlmkitError(f"--n_frames {n_frames} must be an even number >= 2 (the stem halves it)")
    if not 0 <= vtlp < 1:
        raise LlmkitError(f"--vtlp {vtlp} must be in [0, 1) (0.1 warps frequencies by 0.9-1.1; 0 turns it off)")
    if validation_speaker is not None and validation_speaker not in TRAIN_SPEAKERS:
        raise LlmkitError(f"--validation_speaker {validation_speaker} is not a training speaker; pick one of "
                          f"{', '.join(TRAIN_SPEAKERS)}")
    train_speakers = tuple(s for s in TRAIN_SPEAKERS if s != validation_speaker)
    report_speakers = HELD_OUT_SPEAKERS if validation_speaker is None else (validation_speaker,)
    tokenizer = digit_tokenizer()
    try:
        config = Config(name="speech-digits", arch="speech", vocab_size=tokenizer.vocab_size, n_layers=n_layers,
                        n_decoder_layers=n_layers, n_heads=n_heads, d_model=d_model, d_ff=4 * d_model, max_seq_len=8,
                        norm="layernorm", mlp="gelu", qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True,
                        position="learned", n_mels=n_mels, n_audio_ctx=n_frames // 2, feature_norm=feature_norm,
                        decoder_start_id=tokenizer.token_to_id(START_OF_TRANSCRIPT), eos_id=tokenizer.eos_id)
    except LlmkitError as error:
        raise LlmkitError(f"--d_model/--n_heads/--n_layers/--n_mels: {error}") from None
    import dataclasses

    import torch

    kind = "held-out" if validation_speaker is None else "validation"
    print(f"reading FSDD: training speakers {', '.join(train_speakers)}; {kind} {', '.join(report_speakers)}")
    recordings = load_recordings(train_speakers, data)
    members, results = [], []
    for member in range(ensemble):
        seed = train.seed + member
        run_dir = Path(output) if ensemble == 1 else Path(output) / f"member-{member}"
        torch.manual_seed(seed)
        model = SpeechModel(config)
        if ensemble > 1:
            print(f"ensemble member {member + 1}/{ensemble}: seed {seed}, {run_dir}")
        print(f"{config.name}: {model.num_parameters():,} parameters; {len(recordings):,} training recordings")
        batches = DigitBatches(recordings, tokenizer, n_mels, n_frames, seed=seed, max_warp=vtlp,
                               feature_norm=feature_norm)
        results.append(train_loop(model, objective, batches, dataclasses.replace(train, seed=seed), str(run_dir),
                                  tokenizer=tokenizer))
        members.append(model.eval())
    held_out = load_recordings(report_speakers, data)
    accuracy = digit_accuracy(members, tokenizer, held_out)
    report = {"kind": kind, "speakers": list(report_speakers), "recordings": len(held_out),
              "accuracy": accuracy["all"], "per_speaker": {s: accuracy[s] for s in report_speakers},
              "steps": results[0].steps, "checkpoint": str(results[0].checkpoint)}

    def line(scores: dict[str, float]) -> str:  # "84.3%  (lucas 79.6%, theo 89.0%)"
        return f"{scores['all']:.1%}  (" + ", ".join(f"{s} {scores[s]:.1%}" for s in report_speakers) + ")"

    if ensemble > 1:
        report["checkpoint"] = [str(result.checkpoint) for result in results]
        report["members"] = []
        for member, (model, result) in enumerate(zip(members, results, strict=True)):
            alone = digit_accuracy(model, tokenizer, held_out)
            report["members"].append({"seed": train.seed + member, "checkpoint": str(result.checkpoint),
                                      "accuracy": alone["all"], "per_speaker": {s: alone[s] for s in report_speakers}})
            print(f"member {member + 1} (seed {train.seed + member}) alone: {line(alone)}")
    atomic_write_text(Path(output) / HELD_OUT_FILE, json.dumps(report, indent=2) + "\n")
    what = "" if ensemble == 1 else f" of the {ensemble}-model ensemble"
    print(f"{kind} digit accuracy{what} ({' + '.join(report_speakers)}, {len(held_out):,} recordings): {line(accuracy)}")
    models = str(results[0].checkpoint) if ensemble == 1 else "[" + ", ".join(str(r.checkpoint) for r in results) + "]"
    print(f"model: {models}  (llmkit speech transcribe --model \"{models}\" --files \"[a.wav]\")")
    for result in results:
        if result.plot is not None:
            print(f"loss curve: {result.plot}")
    return report


def speech_transcribe(
    files: list[str],
    model: str | list[str],
    max_new_tokens: int = 64,
    speeds: tuple[float, ...] = (1.0,),
    device: Device = "cpu",
) -> Any:
    """Transcribe mono 16-bit WAV files with a speech model (llmkit's, or an imported Hugging Face Whisper).

    Example: llmkit speech transcribe --model runs/speech-digits/checkpoints/step-00002000 --files "[7_theo_0.wav]"
             llmkit speech transcribe --model whisper-tiny.en/ --files "[talk.wav, note.wav]"
             llmkit speech transcribe --model "[runs/d5/member-0/checkpoints/step-00002000, ...]" --files "[a.wav]"
             llmkit speech transcribe --model runs/speech-digits/checkpoints/step-00002000 --files "[a.wav]" \\
                 --speeds "[0.85, 0.925, 1.0, 1.075, 1.15]"

    Audio at any sample rate is resampled to 16 kHz and turned into Whisper's log-mel features over the model's
    window (30 s for Whisper, 1 s for the digit model); longer audio is cut. The decoder starts from
    <|startoftranscript|> (then <|en|><|transcribe|><|notimestamps|> when the tokenizer has them) and decodes greedily
    with a KV cache until <|endoftext|>. Prints one line per file: `FILE<TAB>text`.

    Args:
        files: WAV files to transcribe.
        model: a speech model directory: llmkit (`llmkit speech train`) or Hugging Face WhisperForConditionalGeneration
            with its tokenizer.json; or a list of them (one vocabulary and feature setup), an ensemble transcribing
            with the mean of their log-probabilities (`llmkit speech train --ensemble K` prints the list).
        max_new_tokens: most tokens per transcript.
        speeds: test-time augmentation: each clip is also read at these speeds (pitch and tempo together, as
            training varied them) and every (model, speed) pair decodes as one ensemble. 1.0 alone (the default)
            reads the clip as recorded. Five speeds x0.85-1.15 cost 5x the time and moved the digit model's
            held-out accuracy by +0.3..+3.5 points (docs/multimodal.md, "Test-time speeds").
        device: cpu, cuda, cuda:N or auto.
    """
    from pathlib import Path

    from llmkit.checkpoints import load_model, load_tokenizer
    from llmkit.data.audio import load_audio
    from llmkit.errors import LlmkitError

    if not files:
        raise LlmkitError("--files is empty; pass the WAV files to transcribe, e.g. --files \"[a.wav, b.wav]\"")
    if max_new_tokens < 1:
        raise LlmkitError(f"--max_new_tokens {max_new_tokens} must be at least 1")
    check_speeds(speeds)
    clips = []
    for file in files:
        if not Path(file).is_file():
            raise LlmkitError(f"--files: {file} does not exist; pass WAV files")
        try:
            clips.append(load_audio(file))
        except LlmkitError as error:
            raise LlmkitError(f"--files: {error}") from None
    paths = [model] if isinstance(model, str) else list(model)
    if not paths:
        raise LlmkitError("--model is an empty list; pass a speech model directory, or several for an ensemble")
    networks = []
    for path in paths:
        if not Path(path).exists():
            raise LlmkitError(f"--model {path} does not exist; pass a speech model directory (from `llmkit speech "
                              "train`, or a Hugging Face Whisper folder)")
        try:
            networks.append(load_model(path, device=device, arch="speech"))
        except LlmkitError as error:
            raise LlmkitError(f"--model: {error}") from None
    tokenizer = load_tokenizer(paths[0])
    try:
        texts = transcribe(networks, tokenizer, clips, max_new_tokens, speeds=speeds)  # a list of one: that model
    except LlmkitError as error:
        raise LlmkitError(f"--model: {error}") from None
    for file, text in zip(files, texts, strict=True):
        print(f"{file}\t{text}")
    return texts


def decoder_prompt(tokenizer: Any, config: Any) -> list[int]:
    """The decoder's first inputs: the config's start token (<|startoftranscript|>), then Whisper's English,
    transcribe and no-timestamps tokens where the vocabulary has them (the digit model's has not)."""
    tasks = [tokenizer.token_to_id(token) for token in WHISPER_TASK_TOKENS]
    return [config.decoder_start_id, *(tasks if all(t is not None for t in tasks) else [])]


def transcribe(model: Any, tokenizer: Any, clips: list[Any], max_new_tokens: int = 64,
               batch_size: int = 64, speeds: Sequence[float] = (1.0,)) -> list[str]:
    """Greedy transcripts of 16 kHz clips (each a (N,) tensor) by a SpeechModel, or by a list of them as one ensemble
    (llmkit.generate.seq2seq; they must read the same features), `batch_size` clips per forward. With several
    `speeds`, test-time augmentation: every model reads every clip at each speed (llmkit.data.audio.change_speed),
    and the (model, speed) pairs decode as one ensemble."""
    import torch

    from llmkit.data.audio import change_speed
    from llmkit.data.fsdd import features
    from llmkit.errors import LlmkitError
    from llmkit.generate.seq2seq import generate_seq2seq

    check_speeds(speeds)
    members = model if isinstance(model, list) else [model]
    config = members[0].config
    setups = {(m.config.n_mels, m.config.n_audio_ctx, m.config.feature_norm) for m in members}
    if len(setups) > 1:
        raise LlmkitError(f"an ensemble's models must read the same features, not (n_mels, n_audio_ctx, feature_norm) "
                          f"{' and '.join(map(str, sorted(setups)))}")
    prompt = decoder_prompt(tokenizer, config)
    max_new_tokens = min(max_new_tokens, min(m.config.max_seq_len for m in members) - len(prompt))
    stop_ids = {i for i in (config.eos_id, tokenizer.eos_id) if i is not None}
    device = members[0].embed.weight.device
    texts = []
    for start in range(0, len(clips), batch_size):
        chunk = clips[start : start + batch_size]
        copies = [features([clip if speed == 1.0 else change_speed(clip, speed) for clip in chunk], config.n_mels,
                           2 * config.n_audio_ctx, config.feature_norm).to(device) for speed in speeds]  # (B, M, frames)
        prompts = torch.tensor([prompt] * len(chunk), device=device)  # (B, P)
        new = generate_seq2seq([m for _ in speeds for m in members], [x for x in copies for _ in members],
                               max_new_tokens, stop_ids=stop_ids, decoder_prompt=prompts, pad_id=next(iter(stop_ids)))
        texts += [tokenizer.decode(row.tolist(), skip_special_tokens=True).strip() for row in new]
    return texts


def check_speeds(speeds: Sequence[float]) -> None:
    """Test-time speeds must be a non-empty list of factors in [0.5, 2] (beyond, a digit sounds like another voice
    entirely, or its 1 s window no longer holds it)."""
    from llmkit.errors import LlmkitError

    if not speeds or any(not 0.5 <= speed <= 2.0 for speed in speeds):
        raise LlmkitError(f"--speeds {list(speeds)} must be a non-empty list of factors in [0.5, 2], e.g. "
                          "\"[0.85, 0.925, 1.0, 1.075, 1.15]\" (1.0: the clip as recorded)")


def digit_accuracy(model: Any, tokenizer: Any, recordings: list[Any],
                   speeds: Sequence[float] = (1.0,)) -> dict[str, float]:
    """Share of `recordings` (llmkit.data.fsdd.Recording) whose transcript by `model` (or a list of models: one
    ensemble; with several `speeds`, test-time augmentation as in `transcribe`) is exactly their digit's word: over
    all ("all") and per speaker."""
    from llmkit.data.fsdd import DIGIT_WORDS

    texts = transcribe(model, tokenizer, [r.samples for r in recordings], max_new_tokens=4, speeds=speeds)
    right = [text == DIGIT_WORDS[r.digit] for text, r in zip(texts, recordings, strict=True)]
    accuracy = {"all": sum(right) / len(right)}
    for speaker in sorted({r.speaker for r in recordings}):
        mine = [ok for ok, r in zip(right, recordings, strict=True) if r.speaker == speaker]
        accuracy[speaker] = sum(mine) / len(mine)
    return accuracy
