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

from llmkit.data.audio import (
    apply_feature_norm,
    change_speed,
    load_audio,
    log_mel_spectrogram,
    mel_filters,
    normalize_utterance,
    read_wav,
    resample,
    speech_frames,
    warp_mel_frequencies,
)
from llmkit.data.fsdd import (
    ARCHIVE,
    DIGIT_WORDS,
    HELD_OUT_SPEAKERS,
    TRAIN_SPEAKERS,
    DigitBatches,
    digit_tokenizer,
    features,
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


def test_a_speed_change_scales_length_and_pitch_together():
    """x1.2 plays a 500 Hz tone as a 600 Hz one in 1/1.2 of the samples, x0.8 as a 400 Hz one in 1/0.8; x1 leaves
    the samples as they are; a factor that is not positive is refused by name."""
    from llmkit.errors import LlmkitError

    tone = torch.sin(2 * math.pi * 500 * torch.arange(16000) / 16000)
    assert torch.equal(change_speed(tone, 1.0), tone)
    for factor in (1.2, 0.8):
        out = change_speed(tone, factor)
        assert out.shape == (round(16000 / factor),)
        spectrum = torch.fft.rfft(out * torch.hann_window(out.shape[0])).abs()
        peak_hz = float(spectrum.argmax()) * 16000 / out.shape[0]
        assert abs(peak_hz - 500 * factor) < 2, (factor, peak_hz)
    with pytest.raises(LlmkitError, match="speed factor 0 must be positive"):
        change_speed(tone, 0)


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


def tone(hz: float, seconds: float = 1.0) -> torch.Tensor:
    t = torch.arange(int(16000 * seconds)) / 16000
    return 0.3 * torch.sin(2 * math.pi * hz * t)


def test_vocal_tract_warp_keeps_shape_is_identity_at_one_and_moves_a_tone_the_right_way():
    """Warping by alpha moves a 1 kHz tone's energy to the mel channel a (1 kHz x alpha) tone has: up for alpha > 1,
    down for alpha < 1 (below the warp's knee, f -> alpha f exactly); alpha 1 changes nothing."""
    features = log_mel_spectrogram(torch.stack([tone(1000.0)] * 3), n_frames=100)  # (3, 80, 100)
    alphas = torch.tensor([0.9, 1.0, 1.15])
    warped = warp_mel_frequencies(features, alphas)
    assert warped.shape == features.shape
    torch.testing.assert_close(warped[1], features[1], rtol=0, atol=1e-6)
    peak = lambda x: int(x.mean(dim=-1).argmax())  # noqa: E731  the loudest mel channel
    for b, alpha in enumerate(alphas.tolist()):
        expected = peak(log_mel_spectrogram(tone(1000.0 * alpha), n_frames=100)[0])
        assert abs(peak(warped[b]) - expected) <= 1, (alpha, peak(warped[b]), expected)
    assert peak(warped[0]) < peak(features[0]) < peak(warped[2])
    # the warp is monotone and maps 8 kHz to 8 kHz, so no channel reads past the spectrum's edge
    ramp = torch.arange(80.0)[None, :, None].expand(2, 80, 3)  # each channel holds its own index
    read = warp_mel_frequencies(ramp, torch.tensor([0.85, 1.2]))[:, :, 0]  # (2, 80): the index each channel reads
    assert (read.diff(dim=1) >= 0).all() and read.min() >= 0 and read.max() <= 79
    assert read[0, -1] > 78.9 and read[1, -1] > 78  # near the top both warps read the top channels


def test_utterance_normalisation_removes_channel_colouring_and_gain(recording):
    """Over the frames with audio, each channel's mean is 0 and the clip's deviation 1, and padding is 0; a constant
    per-channel offset (another microphone's colouring, in the log domain) or a scale leaves the result unchanged.
    Whisper's features stay as they are by default."""
    samples = load_audio(recording)
    audio_frames = samples.shape[0] // 160 - 1
    features = log_mel_spectrogram(samples, n_frames=audio_frames + 40)  # (1, 80, frames): 40 frames of padding
    normal = normalize_utterance(features)
    padding = normal[..., audio_frames + 3 :]  # (the STFT windows of the last 3 frames straddle the end)
    assert padding.abs().max() == 0  # frames of digital silence (the padding, and any inside the WAV) become 0
    has_audio = normal.abs().amax(dim=1, keepdim=True) > 0  # (1, 1, frames)
    assert has_audio.sum() > 0.9 * audio_frames
    assert (normal.sum(dim=-1) / has_audio.sum()).abs().max() < 1e-5  # channel means over the audio frames
    assert abs((normal.pow(2).sum() / (80 * has_audio.sum())).sqrt().item() - 1) < 1e-4
    unpadded = features[..., has_audio[0, 0]]  # (1, 80, frames with audio)
    coloured = 1.7 * unpadded + torch.linspace(-0.5, 0.5, 80)[None, :, None]
    torch.testing.assert_close(normalize_utterance(coloured), normalize_utterance(unpadded), rtol=0, atol=1e-4)
    assert (normalize_utterance(unpadded) - normal[..., has_audio[0, 0]]).abs().max() < 1e-4  # padding is left out
    assert apply_feature_norm(features, "whisper") is features
    with pytest.raises(LlmkitError, match="feature_norm 'cmvn' is not one of"):
        apply_feature_norm(features, "cmvn")


def test_speech_gate_leaves_out_a_quiet_pause_so_the_statistics_ignore_it(recording):
    """A real recording followed by 0.5 s of quiet noise (60 dB below its peak amplitude, a pause with room noise):
    the energy gate keeps the word's frames and none of the pause's, so the word's normalised features are what they
    are without the pause ("speech"), while statistics over all audio frames ("utterance") move by whole units."""
    samples = load_audio(recording)
    words = samples.shape[0] // 160 - 3  # frames whose STFT window lies inside the recording
    pause = torch.randn(8000, generator=torch.Generator().manual_seed(0)) * samples.abs().max() * 10 ** (-60 / 20)
    alone = log_mel_spectrogram(samples, n_frames=words + 70)  # (1, 80, frames)
    paused = log_mel_spectrogram(torch.cat([samples, pause]), n_frames=words + 70)
    gate = speech_frames(paused)  # (1, 1, frames)
    assert gate[0, 0, words + 5 :].sum() == 0  # the pause: audio, not speech
    assert normal_audio_frames(paused) > words + 50 and gate.sum() > 0.8 * words
    assert gate[0, 0, paused.mean(dim=1)[0].argmax()] == 1  # the loudest frame always passes
    torch.testing.assert_close(gate[..., :words], speech_frames(alone)[..., :words], rtol=0, atol=0)
    speech = lambda x: apply_feature_norm(x, "speech")[..., :words]  # noqa: E731
    utterance = lambda x: apply_feature_norm(x, "utterance")[..., :words]  # noqa: E731
    assert (speech(paused) - speech(alone)).abs().max() < 0.1
    assert (utterance(paused) - utterance(alone)).abs().max() > 1.0
    with pytest.raises(LlmkitError, match="speech gate 0 dB must be positive"):
        speech_frames(paused, gate_db=0)


def normal_audio_frames(features: torch.Tensor) -> int:
    """Frames of one clip's features (1, n_mels, frames) above its floor (not padding)."""
    return int((features.amax(dim=1) > features.amin() + 1e-6).sum())


def test_speech_normalisation_ignores_channel_colouring_and_gain(recording):
    """A per-channel offset (a microphone's colouring in the log domain) plus a gain moves every frame's level
    alike, so the gate keeps the same frames and the normalised features stay as they are; over the speech frames
    each channel's mean is 0 and the deviation 1."""
    samples = load_audio(recording)
    features = log_mel_spectrogram(samples, n_frames=samples.shape[0] // 160 - 3)  # (1, 80, frames): no padding
    coloured = features + 0.3 + torch.linspace(-0.5, 0.5, 80)[None, :, None]  # +12 dB gain and a +-20 dB tilt
    torch.testing.assert_close(apply_feature_norm(coloured, "speech"), apply_feature_norm(features, "speech"),
                               rtol=0, atol=1e-4)
    gate = speech_frames(features, gate_db=10.0)  # a narrow gate, so that this clear recording has frames left out
    assert torch.equal(speech_frames(coloured, gate_db=10.0), gate) and 0 < gate.sum() < features.shape[-1] - 5
    normal = normalize_utterance(features, gate)
    torch.testing.assert_close(normalize_utterance(coloured, gate), normal, rtol=0, atol=1e-4)
    chosen = normal * gate  # (1, 80, frames): the speech frames only
    assert (chosen.sum(dim=-1) / gate.sum()).abs().max() < 1e-5
    assert abs((chosen.pow(2).sum() / (80 * gate.sum())).sqrt().item() - 1) < 1e-4


def test_digit_batches_apply_the_feature_norm_last_and_warp_only_when_asked():
    recordings = load_recordings(("george",), max_per_speaker=10)
    tokenizer = digit_tokenizer()
    plain = DigitBatches(recordings, tokenizer, 80, 100)(0, 4)["input_features"]
    torch.testing.assert_close(DigitBatches(recordings, tokenizer, 80, 100, max_warp=0.0)(0, 4)["input_features"],
                               plain)
    assert not torch.equal(DigitBatches(recordings, tokenizer, 80, 100, max_warp=0.1)(0, 4)["input_features"], plain)
    clean = DigitBatches(recordings, tokenizer, 80, 100, augmented=False, feature_norm="utterance")(0, 4)
    picks = torch.randint(len(recordings), (4,), generator=torch.Generator().manual_seed(0)).tolist()
    expected = normalize_utterance(features([recordings[i].samples for i in picks], 80, 100))
    torch.testing.assert_close(clean["input_features"], expected)
    augmented = DigitBatches(recordings, tokenizer, 80, 100, feature_norm="utterance", max_warp=0.1)(0, 4)
    assert augmented["input_features"].shape == (4, 80, 100)  # normalised, then masked (no tilt: it would undo it)
    assert augmented["input_features"].abs().amax().item() < 20
