"""Audio input: WAV reading, resampling, Whisper's log-mel features (against transformers' WhisperFeatureExtractor on
a real recording) and the Free Spoken Digit Dataset loader."""

import math
import struct
import tarfile
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from llmkit.data.audio import load_audio, log_mel_spectrogram, mel_filters, read_wav, resample
from llmkit.data.fsdd import (
    ARCHIVE,
    DIGIT_WORDS,
    HELD_OUT_SPEAKERS,
    TRAIN_SPEAKERS,
    DigitBatches,
    digit_tokenizer,
    fsdd_dir,
    load_recordings,
)
from llmkit.errors import LlmkitError


@pytest.fixture(scope="module")
def recording() -> bytes:
    """A real FSDD recording: theo saying "seven" (8 kHz mono 16-bit)."""
    with tarfile.open(fsdd_dir() / ARCHIVE) as archive:
        return archive.extractfile("recordings/7_theo_3.wav").read()


def write_wav(path: Path, samples: list[int], rate: int = 8000, channels: int = 1, width: int = 2) -> Path:
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(channels)
        writer.setsampwidth(width)
        writer.setframerate(rate)
        fmt = {1: "B", 2: "h"}[width]
        writer.writeframes(struct.pack(f"<{len(samples)}{fmt}", *samples))
    return path


@pytest.mark.parametrize(("n_mels", "n_frames"), [(80, 3000), (80, 100), (128, 3000)])
def test_log_mel_matches_whisper_feature_extractor_on_a_real_recording(recording, n_mels, n_frames):
    from transformers import WhisperFeatureExtractor

    samples = load_audio(recording)
    extractor = WhisperFeatureExtractor(feature_size=n_mels)
    expected = extractor(samples.numpy(), sampling_rate=16000, max_length=n_frames * 160,
                         return_tensors="pt").input_features  # (1, n_mels, n_frames)
    ours = log_mel_spectrogram(samples, n_mels=n_mels, n_frames=n_frames)
    assert ours.shape == expected.shape == (1, n_mels, n_frames)
    assert (ours - expected).abs().max() <= 1e-4  # same float32 STFT and filters: differences are rounding only


def test_mel_filters_match_transformers():
    from transformers.audio_utils import mel_filter_bank

    expected = mel_filter_bank(num_frequency_bins=201, num_mel_filters=80, min_frequency=0.0, max_frequency=8000.0,
                               sampling_rate=16000, norm="slaney", mel_scale="slaney")
    np.testing.assert_allclose(mel_filters(80).numpy(), expected, atol=1e-7)


def test_a_batch_is_featurised_clip_by_clip(recording):
    """Each clip's floor (max - 8) is its own, so a clip's features do not depend on its batch-mates."""
    a = load_audio(recording)
    b = 0.01 * a.flip(0)
    batch = log_mel_spectrogram(torch.stack([a, b]), n_frames=100)
    torch.testing.assert_close(batch[1:], log_mel_spectrogram(b, n_frames=100))


def test_read_wav_returns_samples_and_rate(tmp_path):
    samples, rate = read_wav(write_wav(tmp_path / "a.wav", [0, 16384, -32768, 32767], rate=8000))
    assert rate == 8000
    torch.testing.assert_close(samples, torch.tensor([0.0, 0.5, -1.0, 32767 / 32768]))


def test_resampling_8k_to_16k_keeps_a_tone(tmp_path):
    """A 440 Hz tone at 8 kHz comes out as the same tone sampled at 16 kHz (the polyphase filter's edges aside)."""
    t = np.arange(8000) / 8000
    up = resample(torch.tensor(0.5 * np.sin(2 * math.pi * 440 * t), dtype=torch.float32), 8000)
    assert up.shape == (16000,)
    expected = 0.5 * np.sin(2 * math.pi * 440 * np.arange(16000) / 16000)
    assert np.abs(up.numpy()[400:-400] - expected[400:-400]).max() < 1e-3


@pytest.mark.parametrize(("kwargs", "words"), [
    (dict(channels=2), "2-channel 16-bit"),
    (dict(width=1), "1-channel 8-bit"),
])
def test_wavs_other_than_mono_16_bit_are_refused(tmp_path, kwargs, words):
    path = write_wav(tmp_path / "x.wav", [1, 2, 3, 4], **kwargs)
    with pytest.raises(LlmkitError, match=f"x.wav is {words} audio; llmkit reads mono 16-bit"):
        read_wav(path)


def test_a_file_that_is_not_a_wav_is_refused(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("not audio at all")
    with pytest.raises(LlmkitError, match="notes.wav is not a PCM WAV file"):
        read_wav(path)
    with pytest.raises(LlmkitError, match="missing.wav does not exist"):
        read_wav(tmp_path / "missing.wav")


def test_fsdd_split_is_by_speaker_and_loads_16k_recordings():
    assert not set(TRAIN_SPEAKERS) & set(HELD_OUT_SPEAKERS) and len(TRAIN_SPEAKERS) == 4
    recordings = load_recordings(("theo",), max_per_speaker=20)
    assert len(recordings) == 20 and {r.speaker for r in recordings} == {"theo"}
    assert sorted(r.digit for r in recordings) == sorted(list(range(10)) * 2)
    assert all(0.1 * 16000 < r.samples.shape[0] < 2.5 * 16000 for r in recordings)  # FSDD clips are 0.1-2.3 s
    with pytest.raises(LlmkitError, match=r"unknown FSDD speakers \['alice'\]"):
        load_recordings(("alice",))


def test_digit_batches_are_reproducible_by_position():
    tokenizer = digit_tokenizer()
    batches = DigitBatches(load_recordings(("george",), max_per_speaker=10), tokenizer, n_mels=80, n_frames=100)
    first, again, other = batches(0, 4), batches(0, 4), batches(4, 4)
    assert first["input_features"].shape == (4, 80, 100) and first["labels"].shape == (4, 2)
    torch.testing.assert_close(first["input_features"], again["input_features"])
    assert not torch.equal(first["input_features"], other["input_features"])
    words = [tokenizer.decode(row[:1].tolist()) for row in first["labels"]]
    assert set(words) <= set(DIGIT_WORDS) and set(first["labels"][:, 1].tolist()) == {tokenizer.eos_id}
