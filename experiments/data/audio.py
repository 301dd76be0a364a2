"""Reading audio for the model: any file soundfile can decode -> float32 mono at 16 kHz.

Bad input is rejected with a message that says what was expected; odd but usable input
(stereo, other sample rates, clipping) is converted. Every caller (evaluation, client,
tests) reads audio through `load_audio`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16000
MIN_SECONDS = 0.05  # shorter clips give zero encoder frames after the convolutions and pooling


class AudioError(ValueError):
    """An audio input that cannot be used; the message says why and what to do."""


def to_model_audio(samples: np.ndarray, sample_rate: int, source: str = "audio", min_seconds: float = MIN_SECONDS) -> np.ndarray:
    """(T,) or (T, C) / (C, T) samples at any rate -> (T',) float32 mono at 16 kHz, at least
    `min_seconds` long (0 for a stream's chunks, which only the whole stream must reach)."""
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim == 2:  # downmix: channels are the short axis
        x = x.mean(axis=1 if x.shape[0] >= x.shape[1] else 0)
    if x.ndim != 1:
        raise AudioError(f"{source}: expected mono or multi-channel samples, got shape {x.shape}")
    if x.size == 0:
        raise AudioError(f"{source}: the audio is empty (0 samples); send at least {MIN_SECONDS} s")
    if not np.isfinite(x).all():
        raise AudioError(f"{source}: contains NaN or infinite samples; fix or drop the file")
    if sample_rate != SAMPLE_RATE:
        import librosa

        x = librosa.resample(x, orig_sr=sample_rate, target_sr=SAMPLE_RATE).astype(np.float32)
    if x.size < min_seconds * SAMPLE_RATE:
        raise AudioError(
            f"{source}: {x.size / SAMPLE_RATE:.3f} s is too short; the model needs at least {min_seconds} s"
        )
    return x


def load_audio(path: str | Path) -> np.ndarray:
    """Decode a file to (T,) float32 mono at 16 kHz, or raise AudioError."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such audio file")
    try:
        samples, sr = sf.read(str(path), dtype="float32", always_2d=False)
    except Exception as err:  # soundfile raises LibsndfileError/RuntimeError with terse text
        raise AudioError(f"{path}: not a readable audio file ({err}); expected WAV/FLAC/OGG") from err
    return to_model_audio(samples, sr, str(path))
