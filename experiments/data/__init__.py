"""Speech data: synthetic espeak-ng speech, LibriSpeech directories and JSONL manifests.

Every dataset ends as JSONL manifests, one per split, of rows
`{"audio_filepath": str, "duration": float (s), "text": str, ...}` (NeMo's schema).

`synthetic` renders open-vocabulary English sentences (experiments.data.text: thousands of
distinct words, names and numbers; no dev or test sentence occurs in training) with three
synthesis engines (experiments.data.voices: espeak-ng, festival, flite) at 16 kHz mono.
Splits: train (clean clips plus augmented copies, experiments.data.augment), dev, test
(voices of every engine never heard in training) and test_noisy (the test clips with noise
at 10 dB SNR). Deterministic given the spec; rendered once into the cache, in parallel, and
reused.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from experiments.data.audio import SAMPLE_RATE
from experiments.data.voices import ENGINES, TEST_VOICES, TRAIN_VOICES

TEST_SPLITS = ("test", "test_noisy")


def tokenizer_corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: prompt words, the lexicon and training sentences."""
    from experiments.data.text import NAMES, lexicon, sentences_for_splits

    prompt = ["user assistant system Audio 1: Transcribe the audio. Transcribe the speech."]
    words = [w for words, _ in lexicon().values() for w in words] + NAMES
    return prompt + [" ".join(words)] + sentences_for_splits(0, {"train": 5000})["train"]


@dataclass(frozen=True)
class SyntheticSpec:
    version: int = 3  # bump when the text, voices, rendering or augmentation change: new cache key
    seed: int = 0
    train: int = 4000
    dev: int = 200
    test: int = 300
    engines: tuple[str, ...] = ENGINES
    augment: float = 1.0  # augmented copies of the training clips, as a fraction of them
    noisy_snr_db: float = 10.0  # the test_noisy split: each test clip with noise at this SNR

    def key(self) -> str:
        import hashlib

        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def plan_synthetic(spec: SyntheticSpec) -> list[dict]:
    """Every clean utterance as a manifest row without audio: split, name, text, engine,
    voice, speed, pitch. Engines take turns; train and dev use training voices, test never
    does. Deterministic given the spec."""
    from experiments.data.text import sentences_for_splits

    rng = random.Random(spec.seed)
    texts = sentences_for_splits(spec.seed, {"train": spec.train, "dev": spec.dev, "test": spec.test})
    return [row for split, sentences in texts.items()
            for row in voiced_rows(split, split, sentences, TEST_VOICES if split == "test" else TRAIN_VOICES, spec.engines, rng)]


def voiced_rows(split: str, prefix: str, sentences: list[str], voices: dict[str, list[str]],
                engines: tuple[str, ...], rng: random.Random) -> list[dict]:
    """A manifest row without audio per sentence, named `<prefix>_<i>`: engines in turn, a
    voice of `voices` for the engine, a speed and a pitch drawn from `rng` (in that order)."""
    rows = []
    for i, text in enumerate(sentences):
        engine = engines[i % len(engines)]
        rows.append({"split": split, "name": f"{prefix}_{i:05d}", "text": text, "engine": engine,
                     "voice": rng.choice(voices[engine]), "speed": round(rng.random(), 3), "pitch": round(rng.random(), 3)})
    return rows


def usable_clip(path: Path) -> tuple[np.ndarray | None, str | None]:
    """A rendered clip as 16 kHz mono audio, or None and why it cannot be used: missing,
    unreadable, too short or silent."""
    from experiments.data.audio import AudioError, load_audio

    try:
        x = load_audio(path)
    except AudioError as err:
        return None, "unreadable" if "readable" in str(err) or "no such" in str(err) else "too short or empty"
    if float(np.abs(x).max()) < 1e-3:
        return None, "silent"
    return x, None


def build_synthetic(out_dir: Path, spec: SyntheticSpec = SyntheticSpec(), workers: int | None = None) -> dict[str, Path]:
    """Render the corpus into `out_dir` (once: an existing complete corpus is reused) and return
    {split: manifest}: train (clean + augmented copies), dev, test and test_noisy.

    A clip that comes out corrupt or silent is dropped here with a count in `report.json`
    and never reaches a manifest."""
    splits = ("train", "dev", *TEST_SPLITS)
    manifests = {s: out_dir / f"{s}.jsonl" for s in splits}
    if (out_dir / ".complete").exists():
        return manifests
    workers = workers or os.cpu_count() or 2
    tmp, rows, dropped = render_fresh(out_dir, plan_synthetic(spec), spec.engines, workers)
    by_split = {s: [r for r in rows if r["split"] == s] for s in ("train", "dev", "test")}
    by_split["train"] += _augmented(tmp, by_split["train"], "train", spec, workers)
    by_split["test_noisy"] = _augmented(tmp, by_split["test"], "test_noisy", spec, workers)
    from experiments.data.text import vocabulary

    (tmp / "spec.json").write_text(json.dumps(asdict(spec), indent=1))
    publish_splits(tmp, out_dir, by_split, dropped, vocabulary=len(vocabulary([r["text"] for r in rows])),
                   train_vocabulary=len(vocabulary([r["text"] for r in by_split["train"]])))
    return manifests


def render_fresh(out_dir: Path, plan: list[dict], engines: tuple[str, ...], workers: int) -> tuple[Path, list[dict], dict[str, int]]:
    """Render `plan` into a fresh `<out_dir>.tmp` (render_rows), after checking the engines
    are installed; (tmp, usable rows, dropped counts). publish_splits finishes it."""
    from experiments.data.voices import check_engines

    check_engines(engines)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    return (tmp, *render_rows(tmp, plan, engines, workers))


def publish_splits(tmp: Path, out_dir: Path, by_split: dict[str, list[dict]], dropped: dict[str, int], **report) -> None:
    """Finish a corpus rendered into `tmp`: each split's manifest (audio paths already at
    `out_dir`), report.json (clips per split, dropped clips, `report`) and the completion
    marker, then `tmp` replaces `out_dir` in one rename, so a half-built corpus is never read."""
    for split, split_rows in by_split.items():
        for r in split_rows:
            r["audio_filepath"] = str(out_dir / "wav" / f"{r['name']}.wav")
        write_manifest(tmp / f"{split}.jsonl", split_rows)
    if dropped:
        print(f"[data] dropped {sum(dropped.values())} rendered clips: {dropped}")
    report = {"clips": {s: len(v) for s, v in by_split.items()}, "dropped": dropped, **report}
    (tmp / "report.json").write_text(json.dumps(report, indent=1))
    (tmp / ".complete").touch()
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def render_rows(tmp: Path, plan: list[dict], engines: tuple[str, ...], workers: int) -> tuple[list[dict], dict[str, int]]:
    """Synthesise every planned row into tmp/wav (16 kHz mono PCM) and return the rows that
    came out usable, with their durations, and {problem: count} of those dropped."""
    from experiments.data.voices import Rendering, render_batch

    for sub in ("raw", "wav", "babble"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    jobs = [Rendering(r["text"], r["engine"], r["voice"], r["speed"], r["pitch"], tmp / "raw" / f"{r['name']}.wav") for r in plan]
    per_engine = [[j for j in jobs if j.engine == e] for e in engines]
    batches = [js[i : i + 50] for js in per_engine for i in range(0, len(js), 50)]
    from tqdm import tqdm

    with ThreadPoolExecutor(workers) as pool:
        list(tqdm(pool.map(render_batch, batches), total=len(batches), desc="synthesise", unit="batch"))
    dropped: dict[str, int] = {}

    def keep(row: dict, raw: Path) -> bool:
        audio, problem = usable_clip(raw)
        if problem:
            dropped[problem] = dropped.get(problem, 0) + 1
            return False
        sf.write(tmp / "wav" / f"{row['name']}.wav", audio, SAMPLE_RATE, subtype="PCM_16")
        row["duration"] = round(len(audio) / SAMPLE_RATE, 3)
        return True

    with ThreadPoolExecutor(workers) as pool:
        kept = list(pool.map(lambda r: keep(r, tmp / "raw" / f"{r['name']}.wav"), plan))
    shutil.rmtree(tmp / "raw")
    return [r for r, ok in zip(plan, kept, strict=True) if ok], dropped


def _augmented(tmp: Path, rows: list[dict], split: str, spec: SyntheticSpec, workers: int) -> list[dict]:
    """Augmented copies of `rows` (written under tmp/wav): the training chain for split
    'train' (a spec.augment fraction of the clips), noise at spec.noisy_snr_db for
    'test_noisy' (white and babble in turn). Babble is made from other clips of the same split."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from experiments.data.augment import augment_file, write_babble

    if not rows:
        return []
    wav = tmp / "wav"
    rng = random.Random(spec.seed + len(split))
    babble = write_babble([wav / f"{r['name']}.wav" for r in rows], tmp / "babble" / split, 24, spec.seed)
    if split == "train":
        chosen = rng.sample(rows, round(spec.augment * len(rows)))
        kinds = ["train"] * len(chosen)
    else:
        chosen, kinds = rows, ["white" if i % 2 == 0 else "babble" for i in range(len(rows))]
    jobs = [(wav / f"{r['name']}.wav", wav / f"{split}_{r['name']}.wav", spec.seed * 100003 + i, kind,
             spec.noisy_snr_db, babble) for i, (r, kind) in enumerate(zip(chosen, kinds, strict=True))]
    from tqdm import tqdm

    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        done = list(tqdm(pool.map(augment_file, jobs, chunksize=16), total=len(jobs), desc=f"augment {split}", unit="clip"))
    out = []
    for r, kind, (target, transforms, duration) in zip(chosen, kinds, done, strict=True):
        augmentation = ",".join(transforms) if kind == "train" else f"{kind}@{spec.noisy_snr_db:g}dB"
        out.append(r | {"split": split, "name": Path(target).stem, "duration": duration, "augment": augmentation,
                        "source": r["name"]})
    return out


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

