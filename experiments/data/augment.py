"""Training augmentation and the noisy test condition, with `audiomentations` (pyroomacoustics
for the rooms) rather than hand-written signal processing.

Training copies get a random chain: additive noise at 5-30 dB SNR, white or babble (other
training clips mixed together), speed perturbation (resampling, so tempo and pitch move
together as in Kaldi's 0.9/1.1 recipe), gain, and room reverberation. The noisy test split
adds noise at exactly `snr_db` (10 dB): white for half the clips, babble made from other
test clips for the rest.

Each clip's draw is seeded by its index, so a corpus is reproducible whatever the process
pool's scheduling.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import soundfile as sf

from experiments.data.audio import SAMPLE_RATE

BABBLE_SECONDS = 6.0


def write_babble(clips: list[Path], out_dir: Path, n: int, seed: int, talkers: tuple[int, int] = (4, 7)) -> list[Path]:
    """`n` babble files, each `talkers` clips (drawn from `clips`) overlaid and looped to
    BABBLE_SECONDS; returns their paths."""
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    width = int(BABBLE_SECONDS * SAMPLE_RATE)
    paths = []
    for i in range(n):
        mix = np.zeros(width, np.float32)
        for clip in rng.sample(clips, min(len(clips), rng.randint(*talkers))):
            x, _ = sf.read(clip, dtype="float32")
            offset = rng.randrange(len(x))
            mix += np.resize(np.roll(x, offset), width)
        path = out_dir / f"babble_{i:03d}.wav"
        sf.write(path, mix / max(1e-6, float(np.abs(mix).max())) * 0.5, SAMPLE_RATE, subtype="PCM_16")
        paths.append(path)
    return paths


def training_chain(babble: list[Path]):
    """The training augmentation: an audiomentations Compose over 16 kHz float32 audio."""
    import audiomentations as A

    return A.Compose([
        A.OneOf([
            A.AddGaussianSNR(min_snr_db=5.0, max_snr_db=30.0, p=1.0),
            A.AddBackgroundNoise(sounds_path=babble, min_snr_db=5.0, max_snr_db=30.0, p=1.0),
        ], p=0.8),
        # played back at 16 kHz, a clip resampled to 14.4-17.6 kHz is 0.9-1.1x the speed
        A.Resample(min_sample_rate=14400, max_sample_rate=17600, p=0.3),
        A.Gain(min_gain_db=-12.0, max_gain_db=6.0, p=0.5),
        A.RoomSimulator(leave_length_unchanged=True, p=0.25),
    ])


def noise_chain(kind: str, snr_db: float, babble: list[Path]):
    """Noise at exactly `snr_db`: kind 'white' or 'babble'."""
    import audiomentations as A

    if kind == "white":
        return A.AddGaussianSNR(min_snr_db=snr_db, max_snr_db=snr_db, p=1.0)
    return A.AddBackgroundNoise(sounds_path=babble, min_snr_db=snr_db, max_snr_db=snr_db, p=1.0)


def applied(chain) -> list[str]:
    """Names of the transforms the last call of a Compose/OneOf (or one transform) applied."""
    import audiomentations as A

    if isinstance(chain, A.Compose | A.OneOf):
        return [name for t in chain.transforms for name in applied(t)]
    return [type(chain).__name__] if chain.parameters.get("should_apply") else []


def augment_file(job: tuple[Path, Path, int, str, float, list[Path]]) -> tuple[str, list[str], float]:
    """Process-pool worker: (source, target, seed, kind, snr_db, babble). kind 'train' draws
    the training chain, 'white'/'babble' adds noise at snr_db. Returns (target, transforms,
    duration in seconds)."""
    source, target, seed, kind, snr_db, babble = job
    random.seed(seed)
    np.random.seed(seed % 2**32)
    x, _ = sf.read(source, dtype="float32")
    chain = training_chain(babble) if kind == "train" else noise_chain(kind, snr_db, babble)
    y = chain(x, sample_rate=SAMPLE_RATE)
    peak = float(np.abs(y).max())
    if peak > 0.99:  # reverb and gain can push past full scale; keep the PCM file unclipped
        y = y * (0.99 / peak)
    sf.write(target, y, SAMPLE_RATE, subtype="PCM_16")
    return str(target), applied(chain), round(len(y) / SAMPLE_RATE, 3)
