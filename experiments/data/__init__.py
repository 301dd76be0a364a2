"""Speech data: synthetic espeak-ng speech, LibriSpeech directories and JSONL manifests.

Every dataset ends as JSONL manifests, one per split, of rows
`{"audio_filepath": str, "duration": float (s), "text": str, ...}` (NeMo's schema).

`synthetic` renders short English utterances (digits, numbers, colours, commands, simple
sentences) with espeak-ng at 16 kHz mono. The test split uses voices never heard in
training, so a WER on it measures generalisation to new speakers. Deterministic given the
seed; generated once into the cache and reused.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import soundfile as sf

from experiments.data.audio import SAMPLE_RATE, to_model_audio

DIGITS = "zero one two three four five six seven eight nine".split()
TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
TEENS = "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
COLOURS = "red green blue yellow black white orange purple brown pink grey".split()
OBJECTS = "ball door light window box car book cup chair table phone key bag hat".split()
VERBS = "open close turn stop start move take find show bring".split()
NAMES = "anna peter maria john lucy david sarah tom".split()
PLACES = ["home", "school", "the park", "the office", "the station", "the shop"]
ADVERBS = "now today later again please".split()

TRAIN_VOICES = ("en+m1", "en+m2", "en+m3", "en+f1", "en+f2", "en-us+m1", "en-us+f1", "en+m4")
TEST_VOICES = ("en+m5", "en+f3", "en-us+m3")


def number_words(rng: random.Random) -> str:
    n = rng.randrange(10, 100)
    if n < 20:
        return TEENS[n - 10]
    tens, ones = divmod(n, 10)
    return TENS[tens - 2] + ("" if ones == 0 else " " + DIGITS[ones])


def random_text(rng: random.Random) -> str:
    """One 2-6 word utterance from a small grammar."""
    kind = rng.randrange(6)
    if kind == 0:
        return " ".join(rng.choice(DIGITS) for _ in range(rng.randint(2, 5)))
    if kind == 1:
        return f"{number_words(rng)} {rng.choice(OBJECTS)}s"
    if kind == 2:
        return f"the {rng.choice(COLOURS)} {rng.choice(OBJECTS)}"
    if kind == 3:
        tail = f" {rng.choice(ADVERBS)}" if rng.random() < 0.5 else ""
        return f"{rng.choice(VERBS)} the {rng.choice(OBJECTS)}{tail}"
    if kind == 4:
        return f"{rng.choice(NAMES)} went to {rng.choice(PLACES)}"
    return f"{rng.choice(NAMES)} has a {rng.choice(COLOURS)} {rng.choice(OBJECTS)}"


def tokenizer_corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: every word of the grammar plus prompt words."""
    words = DIGITS + TENS + TEENS + COLOURS + OBJECTS + VERBS + NAMES + PLACES + ADVERBS
    prompt = ["user assistant system Audio 1: Transcribe the audio. Transcribe the speech."]
    rng = random.Random(0)
    return prompt + [" ".join(words)] + [random_text(rng) for _ in range(5000)]


@dataclass(frozen=True)
class SyntheticSpec:
    version: int = 2  # bump when the grammar or rendering changes: new cache key
    seed: int = 0
    train: int = 4000
    dev: int = 200
    test: int = 200
    train_voices: tuple[str, ...] = TRAIN_VOICES
    test_voices: tuple[str, ...] = TEST_VOICES
    speed: tuple[int, int] = (130, 200)
    pitch: tuple[int, int] = (30, 70)
    splits: tuple[str, ...] = field(default=("train", "dev", "test"), repr=False)

    def key(self) -> str:
        import hashlib

        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def render(text: str, path: Path, voice: str, speed: int, pitch: int) -> float:
    """espeak-ng -> 16 kHz mono WAV at `path`; returns the duration in seconds."""
    with tempfile.NamedTemporaryFile(suffix=".wav") as raw:
        subprocess.run(
            ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", raw.name, text],
            check=True,
            capture_output=True,
        )
        samples, sr = sf.read(raw.name, dtype="float32")
    audio = to_model_audio(samples, sr, f"espeak-ng {voice!r}")
    sf.write(path, audio, SAMPLE_RATE, subtype="PCM_16")
    return round(len(audio) / SAMPLE_RATE, 3)


def plan_synthetic(spec: SyntheticSpec) -> Iterator[tuple[str, int, str, str, int, int]]:
    """(split, index, text, voice, speed, pitch) for every utterance, deterministic."""
    rng = random.Random(spec.seed)
    for split in spec.splits:
        voices = spec.test_voices if split == "test" else spec.train_voices
        for i in range(getattr(spec, split)):
            yield split, i, random_text(rng), rng.choice(voices), rng.randint(*spec.speed), rng.randint(*spec.pitch)


def build_synthetic(out_dir: Path, spec: SyntheticSpec = SyntheticSpec(), workers: int = 4) -> dict[str, Path]:
    """Render the dataset into `out_dir` (once: an existing complete dataset is reused) and
    return {split: manifest path}."""
    manifests = {s: out_dir / f"{s}.jsonl" for s in spec.splits}
    done = out_dir / ".complete"
    if done.exists():
        return manifests
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "wav").mkdir(parents=True)
    plan = list(plan_synthetic(spec))

    def one(item: tuple[str, int, str, str, int, int]) -> dict:
        split, i, text, voice, speed, pitch = item
        name = f"{split}_{i:05d}.wav"
        duration = render(text, tmp / "wav" / name, voice, speed, pitch)
        return {
            "audio_filepath": str(out_dir / "wav" / name),
            "duration": duration,
            "text": text,
            "voice": voice,
            "split": split,
        }

    from tqdm import tqdm

    with ThreadPoolExecutor(workers) as pool:
        rows = list(tqdm(pool.map(one, plan), total=len(plan), desc="espeak-ng", unit="clip"))
    for split in spec.splits:
        write_manifest(tmp / f"{split}.jsonl", [r for r in rows if r["split"] == split])
    (tmp / "spec.json").write_text(json.dumps(asdict(spec), indent=1))
    (tmp / ".complete").touch()
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return manifests


def write_manifest(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def read_manifest(path: str | Path) -> list[dict]:
    """Rows of a JSONL manifest, checked for the required keys."""
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = {"audio_filepath", "duration", "text"} - row.keys()
            if missing:
                raise ValueError(f"{path}:{n}: manifest row lacks {sorted(missing)}; expected audio_filepath, duration, text")
            rows.append(row)
    return rows


def librispeech_manifest(root: str | Path, out_path: str | Path) -> Path:
    """Manifest for a LibriSpeech-layout directory (<spk>/<chapter>/<spk>-<chapter>.trans.txt
    + <utt>.flac). Transcripts are lower-cased."""
    root = Path(root)
    rows = []
    for trans in sorted(root.rglob("*.trans.txt")):
        for line in trans.read_text().splitlines():
            if not line.strip():
                continue
            utt, text = line.split(" ", 1)
            audio = trans.parent / f"{utt}.flac"
            if not audio.exists():
                raise FileNotFoundError(f"{trans} names {utt} but {audio} is missing")
            info = sf.info(str(audio))
            rows.append({"audio_filepath": str(audio), "duration": round(info.duration, 3), "text": text.lower(), "speaker": utt.split("-")[0]})
    if not rows:
        raise FileNotFoundError(f"no *.trans.txt under {root}; expected the LibriSpeech layout")
    out_path = Path(out_path)
    write_manifest(out_path, rows)
    return out_path

