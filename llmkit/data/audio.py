"""Audio in: WAV files, resampling to 16 kHz, and Whisper's log-mel features computed in torch.

Whisper (Radford et al. 2022) reads 16 kHz audio as an 80-channel (large-v3: 128) log-mel spectrogram, exactly as
transformers' `WhisperFeatureExtractor` computes it (tests/test_data_audio.py holds the two equal):

    pad or cut the samples to n_frames * 160 (30 s = 3000 frames; silence is zeros)
    |STFT|^2 with a 400-sample periodic Hann window, hop 160, centred frames (reflect padding); the last frame dropped
    mel = Slaney-normalised triangular filters on the Slaney mel scale, 0..8 kHz, applied to the power spectrum
    log10(max(mel, 1e-10)), floored at (its maximum - 8), then (x + 4) / 4

Resampling uses `scipy.signal.resample_poly` (scipy comes with scikit-learn, a dependency): a polyphase FIR with a
Kaiser-windowed sinc, the standard exact-ratio resampler (8 kHz -> 16 kHz is up 2, down 1), so no home-made filter
needs its own proof.
"""

from __future__ import annotations

import io
import math
import wave
from pathlib import Path
from typing import BinaryIO

import torch

from llmkit.errors import LlmkitError

SAMPLE_RATE = 16000  # Whisper's input rate
N_FFT = 400  # 25 ms window
HOP_LENGTH = 160  # 10 ms hop: 100 frames per second
CHUNK_FRAMES = 3000  # Whisper's 30-second window
MEL_MAX_HZ = 8000.0


def read_wav(source: str | Path | BinaryIO | bytes, name: str | None = None) -> tuple[torch.Tensor, int]:
    """Samples (N,) float32 in [-1, 1) and the sample rate of a mono 16-bit PCM WAV (a path, an open binary file
    or the file's bytes; `name` names it in errors). Anything else is one error naming the file and the fix."""
    label = name or str(source if isinstance(source, (str, Path)) else "audio")
    if isinstance(source, (str, Path)) and not Path(source).is_file():
        raise LlmkitError(f"{label} does not exist; pass a WAV file")
    try:
        opened = io.BytesIO(source) if isinstance(source, bytes) else str(source) if isinstance(source, Path) else source
        with wave.open(opened, "rb") as reader:
            channels, width, rate = reader.getnchannels(), reader.getsampwidth(), reader.getframerate()
            if channels != 1 or width != 2:
                raise LlmkitError(f"{label} is {channels}-channel {8 * width}-bit audio; llmkit reads mono 16-bit PCM "
                                  "WAV: convert it (e.g. `sox in.wav -c 1 -b 16 out.wav`)")
            frames = reader.readframes(reader.getnframes())
    except (wave.Error, EOFError) as error:
        reason = str(error) or type(error).__name__
        raise LlmkitError(f"{label} is not a PCM WAV file ({reason}); pass a mono 16-bit PCM WAV") from None
    if not frames:
        raise LlmkitError(f"{label} holds no samples; pass a WAV with audio in it")
    samples = torch.frombuffer(bytearray(frames), dtype=torch.int16).float() / 32768.0  # little-endian, as WAV is
    return samples, rate


def resample(samples: torch.Tensor, rate: int, target_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """`samples` (N,) at `rate` Hz resampled to `target_rate` (scipy's polyphase filter; unchanged if equal)."""
    if rate == target_rate:
        return samples
    if rate <= 0:
        raise LlmkitError(f"sample rate {rate} must be positive; the WAV header is damaged")
    from scipy.signal import resample_poly

    divisor = math.gcd(rate, target_rate)
    out = resample_poly(samples.double().numpy(), target_rate // divisor, rate // divisor)
    return torch.from_numpy(out).float()


def change_speed(samples: torch.Tensor, factor: float) -> torch.Tensor:
    """`samples` (N,) played `factor` times faster: pitch, formants and tempo move together (a tape run faster),
    round(N / factor) samples by linear interpolation between neighbours. Training varies each clip's speed so
    (llmkit.data.fsdd.augment); test-time augmentation reads a clip at several speeds (`llmkit speech transcribe
    --speeds`)."""
    if factor <= 0:
        raise LlmkitError(f"speed factor {factor} must be positive, e.g. 0.9 (slower) or 1.1 (faster)")
    length = max(2, round(samples.shape[0] / factor))
    return torch.nn.functional.interpolate(samples[None, None], size=length, mode="linear", align_corners=True)[0, 0]


def load_audio(source: str | Path | BinaryIO | bytes, name: str | None = None) -> torch.Tensor:
    """A mono 16-bit WAV as 16 kHz float samples (N,), what Whisper's features expect."""
    samples, rate = read_wav(source, name)
    return resample(samples, rate)


def hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    """Slaney's mel scale (librosa's default, Whisper's): linear below 1 kHz (3 mels per 200 Hz), log above."""
    linear = 3.0 * hz / 200.0
    logarithmic = 15.0 + torch.log(hz.clamp(min=1e-10) / 1000.0) * (27.0 / math.log(6.4))
    return torch.where(hz >= 1000.0, logarithmic, linear)


def mel_to_hz(mels: torch.Tensor) -> torch.Tensor:
    """The inverse of `hz_to_mel`."""
    linear = 200.0 * mels / 3.0
    logarithmic = 1000.0 * torch.exp(math.log(6.4) / 27.0 * (mels - 15.0))
    return torch.where(mels >= 15.0, logarithmic, linear)


def mel_filters(n_mels: int = 80, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Triangular mel filters (n_fft // 2 + 1, n_mels), Slaney-normalised (each filter's area 1 over its Hz width),
    centres evenly spaced in mels over 0..8 kHz; computed in float64 like transformers' `mel_filter_bank`."""
    fft_hz = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)  # (F,)
    edges_mel = torch.linspace(float(hz_to_mel(torch.tensor(0.0, dtype=torch.float64))),
                               float(hz_to_mel(torch.tensor(MEL_MAX_HZ, dtype=torch.float64))), n_mels + 2,
                               dtype=torch.float64)
    edges = mel_to_hz(edges_mel)  # (M + 2,) left edge, centre, right edge of each filter in turn
    widths = edges.diff()  # (M + 1,)
    slopes = edges[None, :] - fft_hz[:, None]  # (F, M + 2)
    rising = -slopes[:, :-2] / widths[:-1]  # (F, M)
    falling = slopes[:, 2:] / widths[1:]
    filters = torch.clamp(torch.minimum(rising, falling), min=0.0)  # (F, M)
    return (filters * (2.0 / (edges[2:] - edges[:-2]))).float()


def log_mel_spectrogram(samples: torch.Tensor, n_mels: int = 80, n_frames: int = CHUNK_FRAMES) -> torch.Tensor:
    """Whisper's log-mel features (B, n_mels, n_frames) of 16 kHz samples (N,) or a batch (B, N): each clip padded
    with silence or cut to n_frames * 160 samples (3000 frames = Whisper's 30 s; small models use fewer)."""
    if samples.dim() not in (1, 2) or n_frames < 1:
        raise LlmkitError(f"samples of shape {tuple(samples.shape)} with n_frames={n_frames}: pass (samples,) or "
                          "(batch, samples) of 16 kHz audio and n_frames >= 1")
    batch = samples[None] if samples.dim() == 1 else samples
    length = n_frames * HOP_LENGTH
    batch = torch.nn.functional.pad(batch.float(), (0, max(0, length - batch.shape[1])))[:, :length]  # (B, L)
    window = torch.hann_window(N_FFT, device=batch.device)  # periodic, as Whisper's
    stft = torch.stft(batch, N_FFT, HOP_LENGTH, window=window, return_complex=True)  # (B, F, n_frames + 1)
    power = stft[..., :-1].abs() ** 2  # (B, F, n_frames)
    mel = mel_filters(n_mels).to(batch.device).T @ power  # (B, n_mels, n_frames)
    log_spec = mel.clamp(min=1e-10).log10()
    peak = log_spec.amax(dim=(1, 2), keepdim=True)  # (B, 1, 1): per clip
    return (torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0


# Config.feature_norm: Whisper's features as they are, or normalised per clip with statistics over its audio frames
# ("utterance") or over its speech frames only ("speech")
FEATURE_NORMS = ("whisper", "utterance", "speech")
SPEECH_GATE_DB = 30.0  # "speech": a frame is speech when its level is within this many dB of the clip's loudest
DB_PER_FEATURE_UNIT = 40.0  # a unit of Whisper's features is 4 log10 units of power: 40 dB


def audio_frames(features: torch.Tensor) -> torch.Tensor:
    """(B, 1, frames): 1.0 where a frame of log-mel features (B, n_mels, frames) holds audio, 0.0 for digital
    silence (the padding), which sits exactly at the clip's floor in every channel."""
    floor = features.amin(dim=(1, 2), keepdim=True)  # (B, 1, 1)
    return (features.amax(dim=1, keepdim=True) > floor + 1e-6).float()


def frame_levels_db(features: torch.Tensor) -> torch.Tensor:
    """Each frame's level in dB (B, 1, frames) from Whisper log-mel features (B, n_mels, frames): the mean over the
    channels of the log power, i.e. 10 log10 of the geometric mean of the channel powers (MFCC's c0, the classic
    energy term, up to a scale). A gain or a per-channel offset (a microphone's colouring) shifts every frame's
    level by the same amount, so levels relative to the clip's loudest frame do not move."""
    return DB_PER_FEATURE_UNIT * features.mean(dim=1, keepdim=True)


def speech_frames(features: torch.Tensor, gate_db: float | None = None) -> torch.Tensor:
    """(B, 1, frames): 1.0 where a frame of log-mel features (B, n_mels, frames) is speech by an energy gate (a
    simple voice-activity detector): it holds audio and its level (`frame_levels_db`) lies within `gate_db`
    (default SPEECH_GATE_DB) of the clip's loudest frame. Pauses, breaths and room noise between and around the
    words fall below the gate; the loudest frame always passes, so no clip with audio is left empty."""
    gate = SPEECH_GATE_DB if gate_db is None else gate_db
    if gate <= 0:
        raise LlmkitError(f"speech gate {gate} dB must be positive (frames within it of the loudest count as speech)")
    audio = audio_frames(features)  # (B, 1, frames)
    levels = frame_levels_db(features).masked_fill(audio == 0, -math.inf)  # (B, 1, frames)
    return audio * (levels >= levels.amax(dim=-1, keepdim=True) - gate).float()


def normalize_utterance(features: torch.Tensor, statistics_frames: torch.Tensor | None = None) -> torch.Tensor:
    """Per-utterance normalisation of log-mel features (B, n_mels, frames), cepstral-mean-style: each channel minus
    its mean over the clip's `statistics_frames` (B, 1, frames) (default: its audio frames), the clip divided by
    their standard deviation; every audio frame is normalised so, and the padding (frames of digital silence, all at
    the clip's floor) set to 0, the mean.

        x[c, t] <- (x[c, t] - mean_{t in S} x[c, t]) / std_{t in S, c}(x - mean)      (S: the statistics frames)

    A microphone or a vocal tract colours the spectrum by a (nearly) constant gain per frequency, which is a constant
    per channel in the log domain: subtracting each channel's mean removes it (the classic cepstral mean
    normalisation, Atal 1974, done on log-mel channels), and the one scale makes loud and quiet voices alike. The
    statistics leave the padding out, or a short clip's would be mostly silence; with S = `speech_frames` they
    leave the pauses out too, so a speaker with long, quiet pauses gets the same statistics for his words as one who
    pauses little. This leaves Whisper's feature definition, so a model trained on it says so in its config
    (feature_norm="utterance" or "speech")."""
    audio = audio_frames(features)  # (B, 1, frames)
    chosen = audio if statistics_frames is None else statistics_frames * audio  # (B, 1, frames)
    count = chosen.sum(dim=-1, keepdim=True).clamp(min=1)  # (B, 1, 1)
    mean = (features * chosen).sum(dim=-1, keepdim=True) / count  # (B, n_mels, 1)
    variance = ((features - mean) * chosen).pow(2).sum(dim=(1, 2), keepdim=True) / (count * features.shape[1])
    return (features - mean) * audio / variance.sqrt().clamp(min=1e-5)  # (B, n_mels, frames)


def apply_feature_norm(features: torch.Tensor, feature_norm: str) -> torch.Tensor:
    """Log-mel features (B, n_mels, frames) as a model with `feature_norm` (Config.feature_norm) reads them."""
    if feature_norm == "whisper":
        return features
    if feature_norm == "utterance":
        return normalize_utterance(features)
    if feature_norm == "speech":
        return normalize_utterance(features, speech_frames(features))
    raise LlmkitError(f"feature_norm {feature_norm!r} is not one of {list(FEATURE_NORMS)}")


def warp_mel_frequencies(features: torch.Tensor, alphas: torch.Tensor, cutoff: float = 0.8) -> torch.Tensor:
    """Vocal-tract-length perturbation (Jaitly & Hinton 2013) of log-mel features (B, n_mels, frames): clip b's
    spectrum is stretched along frequency by alphas[b] (> 1 moves formants up, as a shorter vocal tract does;
    1 leaves it as it is), tempo and pitch contour untouched.

    Jaitly & Hinton's piecewise-linear warp, applied to the mel channels' centre frequencies f (Hz, Nyquist F):
    the output at f reads the input at
        f / alpha                                          for f <= f0 = cutoff * F * min(alpha, 1) / alpha
        f0 / alpha + (f - f0) * (F - f0 / alpha) / (F - f0)  above (so F maps to F: no channel reads past the top)
    and the input between channels is interpolated linearly in the mel-channel index."""
    B, n_mels, _ = features.shape
    edges = mel_to_hz(torch.linspace(0.0, float(hz_to_mel(torch.tensor(MEL_MAX_HZ))), n_mels + 2))
    centres = edges[1:-1]  # (M,) Hz
    alpha = alphas.float().reshape(B, 1)  # (B, 1)
    knee = cutoff * MEL_MAX_HZ * alpha.clamp(max=1.0) / alpha  # (B, 1)
    below = centres[None] / alpha  # (B, M)
    above = knee / alpha + (centres[None] - knee) * (MEL_MAX_HZ - knee / alpha) / (MEL_MAX_HZ - knee)
    source_hz = torch.where(centres[None] <= knee, below, above)  # (B, M)
    # fractional channel index of each source frequency: channel m sits at centres[m]
    position = torch.cat([torch.zeros(1), torch.arange(n_mels, dtype=torch.float32), torch.full((1,), n_mels - 1.0)])
    index = _interp(source_hz, edges, position).clamp(0, n_mels - 1)  # (B, M)
    low = index.floor().long().clamp(max=n_mels - 2)  # (B, M)
    weight = (index - low)[:, :, None]  # (B, M, 1)
    take = lambda i: features.gather(1, i[:, :, None].expand(-1, -1, features.shape[2]))  # (B, M, frames)
    return take(low) * (1 - weight) + take(low + 1) * weight


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """numpy.interp for increasing `xp` (K,), values `fp` (K,), at any `x`: piecewise linear, clamped at the ends."""
    i = torch.searchsorted(xp, x.contiguous()).clamp(1, xp.shape[0] - 1)
    x0, x1, y0, y1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    return y0 + (y1 - y0) * ((x - x0) / (x1 - x0)).clamp(0.0, 1.0)
