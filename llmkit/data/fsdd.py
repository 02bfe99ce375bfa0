"""The Free Spoken Digit Dataset (../shared/data/free_spoken_digits): 3,000 real 8 kHz recordings of the words
"zero".."nine", 6 speakers x 10 digits x 50 takes, named `recordings/{digit}_{speaker}_{index}.wav` inside
recordings.tar.gz (read straight from the archive, no extraction).

The split is by speaker, so accuracy measures recognising voices the model never heard: it trains on george,
jackson, nicolas and yweweler and holds out lucas (German accent) and theo (US English) -- one of each accent group
the training set also has.

Training batches (`DigitBatches`) are drawn at random from the position the loop gives, so a resumed run sees the
same batches; each recording is augmented (speed 0.8-1.25x, gain, a shift in time, light noise) before its log-mel
features, which are then warped along frequency (vocal-tract-length perturbation), tilted and masked in bands and
spans (SpecAugment): four voices are few, and these are the variations a new voice brings. A model with
feature_norm="utterance" or "speech" reads every clip's features normalised (llmkit.data.audio.normalize_utterance,
with statistics over its audio or its speech frames), in training and in transcription alike.
"""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch

from llmkit.data.audio import (
    SAMPLE_RATE,
    apply_feature_norm,
    change_speed,
    load_audio,
    log_mel_spectrogram,
    warp_mel_frequencies,
)
from llmkit.data.batch import Batch
from llmkit.errors import LlmkitError
from llmkit.tokenizer import Tokenizer

FSDD_DIR = "free_spoken_digits"
ARCHIVE = "recordings.tar.gz"
SPEAKERS_FILE = "speakers.json"
MEMBER = re.compile(r"recordings/(\d)_([a-z]+)_(\d+)\.wav")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
HELD_OUT_SPEAKERS = ("lucas", "theo")
TRAIN_SPEAKERS = ("george", "jackson", "nicolas", "yweweler")
END_OF_TEXT, START_OF_TRANSCRIPT = "<|endoftext|>", "<|startoftranscript|>"  # Whisper's names for the two


@dataclass
class Recording:
    digit: int
    speaker: str
    index: int
    samples: torch.Tensor  # (N,) 16 kHz


def fsdd_dir(data_dir: str | Path | None = None) -> Path:
    """The dataset folder: `data_dir`, else free_spoken_digits in the shared data ($LLMKIT_SHARED_DATA)."""
    from llmkit.data.shared import shared_data_dir

    path = Path(data_dir) if data_dir is not None else shared_data_dir() / FSDD_DIR
    if not (path / ARCHIVE).is_file():
        raise LlmkitError(f"{path / ARCHIVE} is missing; restore the Free Spoken Digit Dataset (see its SOURCE.md)")
    return path


def load_recordings(speakers: tuple[str, ...], data_dir: str | Path | None = None,
                    max_per_speaker: int | None = None) -> list[Recording]:
    """The recordings of `speakers` (resampled to 16 kHz), ordered by name; `max_per_speaker` takes the first
    takes of every digit evenly (a quick subset for tests)."""
    from llmkit.io import read_json_object

    path = fsdd_dir(data_dir)
    known = read_json_object(path / SPEAKERS_FILE)
    unknown = sorted(set(speakers) - set(known))
    if unknown:
        raise LlmkitError(f"unknown FSDD speakers {unknown}; the dataset has {sorted(known)}")
    per_digit = None if max_per_speaker is None else max(1, max_per_speaker // len(DIGIT_WORDS))
    recordings = []
    with tarfile.open(path / ARCHIVE) as archive:
        for member in archive:
            match = MEMBER.fullmatch(member.name)
            if not match or match[2] not in speakers or (per_digit is not None and int(match[3]) >= per_digit):
                continue
            data = archive.extractfile(member).read()
            recordings.append(Recording(int(match[1]), match[2], int(match[3]), load_audio(data, member.name)))
    return recordings


def digit_tokenizer() -> Tokenizer:
    """A word-level tokenizer of the ten digit words plus <|endoftext|> (id 0, EOS) and <|startoftranscript|> (id 1,
    the decoder's first input), as a Hugging Face `tokenizers` model wrapped in llmkit's Tokenizer."""
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate((END_OF_TEXT, START_OF_TRANSCRIPT, *DIGIT_WORDS))}
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    backend.add_special_tokens([END_OF_TEXT, START_OF_TRANSCRIPT])
    return Tokenizer(backend, bos_id=None, eos_id=vocab[END_OF_TEXT], pad_id=None, add_bos=False)


def augment(samples: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random variant of 16 kHz `samples` (N,): speed x0.8-1.25 (pitch and tempo, linear interpolation), gain
    -20..+6 dB, up to 0.15 s of leading silence, on half the clips Gaussian noise 40-60 dB below full scale."""
    uniform = lambda low, high: low + (high - low) * float(torch.rand((), generator=generator))
    x = change_speed(samples, uniform(0.8, 1.25))
    x = x * 10 ** (uniform(-20.0, 6.0) / 20)  # FSDD voices lie 22-44 dB below full scale
    x = torch.cat([torch.zeros(int(uniform(0.0, 0.15) * SAMPLE_RATE)), x])
    if uniform(0.0, 1.0) < 0.5:  # half the clips stay clean, as the recordings to transcribe are
        x = x + torch.randn(x.shape, generator=generator) * 10 ** (-uniform(40.0, 60.0) / 20)
    return x


def spec_augment(features: torch.Tensor, generator: torch.Generator, n_masks: int = 2, max_mels: int = 10,
                 max_frames: int = 10, tilt: bool = True) -> torch.Tensor:
    """SpecAugment (Park et al. 2019) of log-mel features (B, n_mels, frames), after a random spectral tilt (random
    equalisation; `tilt` False leaves it out): each clip gets `n_masks` bands of up to
    `max_mels` channels and `n_masks` spans of up to `max_frames` frames set to its mean, so the model cannot lean on
    one formant region or one instant -- what differs most between voices."""
    B, n_mels, n_frames = features.shape
    # a random tilt and bow across the mel channels, up to +-10 dB at the ends (log10 power / 4: 0.25): another
    # microphone or vocal tract colours the spectrum so
    channels = torch.linspace(-1.0, 1.0, n_mels)
    slope, bow = (torch.rand(2, B, 1, generator=generator) * 2 - 1) * 0.25 * tilt
    out = features + (slope * channels + bow * (channels**2 - 1 / 3))[:, :, None]  # (B, n_mels, 1) broadcast
    draw = lambda high: int(torch.randint(high, (), generator=generator))
    for b in range(B):
        mean = out[b].mean()
        for _ in range(n_masks):
            width, start = draw(max_mels + 1), draw(n_mels)
            out[b, start : start + width] = mean
            width, start = draw(max_frames + 1), draw(n_frames)
            out[b, :, start : start + width] = mean
    return out


def features(recordings: list[torch.Tensor], n_mels: int, n_frames: int, feature_norm: str = "whisper") -> torch.Tensor:
    """Log-mel features (B, n_mels, n_frames) of 16 kHz clips of any lengths (each padded or cut to n_frames), as a
    model with `feature_norm` (Config.feature_norm) reads them."""
    return apply_feature_norm(whisper_features(recordings, n_mels, n_frames), feature_norm)


def whisper_features(recordings: list[torch.Tensor], n_mels: int, n_frames: int) -> torch.Tensor:
    """Whisper's log-mel features (B, n_mels, n_frames) of 16 kHz clips, each padded or cut to n_frames."""
    length = n_frames * 160
    padded = torch.stack([torch.nn.functional.pad(x[:length], (0, max(0, length - x.shape[0]))) for x in recordings])
    return log_mel_spectrogram(padded, n_mels, n_frames)


def vocal_tract_warp(features: torch.Tensor, generator: torch.Generator, max_warp: float) -> torch.Tensor:
    """Vocal-tract-length perturbation of features (B, n_mels, frames): each clip's frequency axis stretched by a
    factor drawn uniformly from 1 - max_warp .. 1 + max_warp (Jaitly & Hinton 2013 draw 0.9-1.1); 0 is a no-op."""
    if max_warp == 0:
        return features
    alphas = 1 + (torch.rand(features.shape[0], generator=generator) * 2 - 1) * max_warp  # (B,)
    return warp_mel_frequencies(features, alphas)


def digit_labels(digits: list[int], tokenizer: Tokenizer) -> torch.Tensor:
    """Decoder targets (B, 2): the digit's word, then <|endoftext|>."""
    return torch.tensor([[*tokenizer.encode(DIGIT_WORDS[d]), tokenizer.eos_id] for d in digits])


class DigitBatches:
    """The training loop's batch source over `recordings`: batch(position, batch_size, rank, world) draws
    batch_size recordings with a generator seeded by (seed, position, rank), augments them and returns
    {"input_features": (B, n_mels, n_frames), "labels": (B, 2)}. `max_warp` bounds the vocal-tract warp (0: none);
    `feature_norm` is the model's (Config.feature_norm): "utterance" and "speech" normalise each clip after the warp and
    before SpecAugment's masks, without the spectral tilt (the normalisation removes any tilt: that is its point)."""

    def __init__(self, recordings: list[Recording], tokenizer: Tokenizer, n_mels: int, n_frames: int,
                 seed: int = 0, augmented: bool = True, max_warp: float = 0.0, feature_norm: str = "whisper") -> None:
        if not recordings:
            raise LlmkitError("no recordings to train on; check the FSDD speakers")
        self.recordings, self.tokenizer = recordings, tokenizer
        self.n_mels, self.n_frames, self.seed, self.augmented = n_mels, n_frames, seed, augmented
        self.max_warp, self.feature_norm = max_warp, feature_norm

    def __call__(self, position: int, batch_size: int, rank: int = 0, world_size: int = 1) -> Batch:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + position * 101 + rank)
        picks = torch.randint(len(self.recordings), (batch_size,), generator=generator).tolist()
        chosen = [self.recordings[i] for i in picks]
        clips = [augment(r.samples, generator) if self.augmented else r.samples for r in chosen]
        inputs = whisper_features(clips, self.n_mels, self.n_frames)  # (B, n_mels, n_frames)
        if self.augmented:
            inputs = vocal_tract_warp(inputs, generator, self.max_warp)
        inputs = apply_feature_norm(inputs, self.feature_norm)
        if self.augmented:
            inputs = spec_augment(inputs, generator, tilt=self.feature_norm == "whisper")
        return {"input_features": inputs,
                "labels": digit_labels([r.digit for r in chosen], self.tokenizer)}
