"""Reading audio: conversions that should happen and inputs that must be rejected."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from experiments.data.audio import SAMPLE_RATE, AudioError, load_audio, to_model_audio


def tone(seconds: float, sr: int = SAMPLE_RATE, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def test_mono_16k_passes_through():
    x = tone(0.5)
    out = to_model_audio(x, SAMPLE_RATE)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, x)


@pytest.mark.parametrize("layout", ["(T, 2)", "(2, T)"])
def test_stereo_is_downmixed(layout):
    left, right = tone(0.5), 0.25 * tone(0.5, hz=220.0)
    x = np.stack([left, right], axis=1 if layout == "(T, 2)" else 0)
    out = to_model_audio(x, SAMPLE_RATE)
    assert out.shape == (8000,)
    np.testing.assert_allclose(out, (left + right) / 2, atol=1e-7)


def test_stereo_wav_file_is_downmixed(tmp_path):
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([tone(0.5), np.zeros(8000, np.float32)], axis=1), SAMPLE_RATE)
    out = load_audio(path)
    assert out.shape == (8000,)
    np.testing.assert_allclose(out, tone(0.5) / 2, atol=1e-4)  # 16-bit PCM


@pytest.mark.parametrize("sr", [8000, 44100])
def test_other_rates_are_resampled(tmp_path, sr):
    path = tmp_path / f"tone_{sr}.wav"
    sf.write(path, tone(1.0, sr=sr), sr)
    out = load_audio(path)
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(len(out) - SAMPLE_RATE) <= 1  # 1 s at any rate -> 16000 samples
    assert 0.3 < np.abs(out).max() < 0.6  # the tone survives


@pytest.mark.parametrize(
    "samples, sr, message",
    [
        (np.zeros(0, np.float32), SAMPLE_RATE, "empty"),
        (np.full(8000, np.nan, np.float32), SAMPLE_RATE, "NaN"),
        (np.concatenate([tone(0.5), [np.inf]]), SAMPLE_RATE, "infinite"),
        (tone(0.01), SAMPLE_RATE, "too short"),
        (tone(0.01, sr=8000), 8000, "too short"),
        (np.zeros((2, 2, 8000), np.float32), SAMPLE_RATE, "shape"),
    ],
    ids=["empty", "nan", "inf", "10ms", "10ms-8k", "3d"],
)
def test_unusable_samples_raise(samples, sr, message):
    with pytest.raises(AudioError, match=message):
        to_model_audio(samples, sr)


def test_corrupt_file_is_a_value_error_naming_path_and_formats(tmp_path):
    """Callers that turn ValueError into a per-request failure (HTTP 400, a failed
    utterance) catch it; the message says which file and what is readable."""
    path = tmp_path / "not_audio.wav"
    path.write_bytes(b"this is not a wav file at all" * 10)
    with pytest.raises(ValueError, match=rf"{path}: not a readable audio file .*expected WAV/FLAC/OGG"):
        load_audio(path)


def test_short_file_names_the_path(tmp_path):
    path = tmp_path / "click.wav"
    sf.write(path, tone(0.01), SAMPLE_RATE)
    with pytest.raises(AudioError, match="too short") as err:
        load_audio(path)
    assert str(path) in str(err.value)


def test_corrupt_file(tmp_path):
    path = tmp_path / "noise.wav"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(AudioError, match="not a readable audio file"):
        load_audio(path)


def test_truncated_wav_header(tmp_path):
    good = tmp_path / "good.wav"
    sf.write(good, tone(0.5), SAMPLE_RATE)
    path = tmp_path / "truncated.wav"
    path.write_bytes(good.read_bytes()[:30])  # cut inside the 44-byte RIFF header
    with pytest.raises(AudioError, match="not a readable audio file"):
        load_audio(path)


def test_missing_path(tmp_path):
    with pytest.raises(AudioError, match="no such audio file"):
        load_audio(tmp_path / "missing.wav")
    with pytest.raises(AudioError, match="no such audio file"):
        load_audio(tmp_path)  # a directory is not a file
