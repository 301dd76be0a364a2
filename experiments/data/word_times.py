"""Speech with known word times: festival renders each sentence and reports where every word
of it starts and ends in the audio it wrote (its Word relation: the first segment's start,
`word_end`). The test set for word timestamps (experiments.benchmarks.timestamps):

  calibration  dev sentences (never trained on) in kal, a training voice: where a timestamp
               method may fit its constant offsets
  test         test sentences (never trained on) in slt (HTS), a voice never heard in training
  test_noisy   the test clips with white or babble noise (in turn) at `noisy_snr_db`

Rows are manifest rows (audio_filepath, duration, text, engine, voice) plus
`words: [{word, start, end}]` in seconds, words lower case as festival tokenised them
(numbers spelled out: "12" is two words, "twelve" in one and "one two" never). Built once per
spec under $Q2AP_CACHE/data/word-times-<key>/.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

SPLITS = ("calibration", "test", "test_noisy")
VOICES = {"calibration": "kal_diphone", "test": "cmu_us_slt_arctic_hts"}


@dataclass(frozen=True)
class WordTimesSpec:
    version: int = 1  # bump when rendering or noise change: new cache key
    seed: int = 0
    calibration: int = 200
    test: int = 300
    noisy_snr_db: float = 10.0

    def key(self) -> str:
        import hashlib

        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def festival_word_times(jobs: list[tuple[str, str, float, Path]]) -> list[list[dict] | None]:
    """Render (text, voice, duration stretch, wav path) jobs in one festival process and
    return each one's words [{word, start, end}] (None where festival wrote no audio)."""
    from experiments.data.voices import run_festival

    lines = []
    for i, (text, voice, stretch, path) in enumerate(jobs):
        text = text.replace("\\", " ").replace('"', " ")
        lines += [f"(voice_{voice})", f"(Parameter.set 'Duration_Stretch {stretch:.3f})",
                  f'(set! utt{i} (utt.synth (Utterance Text "{text}")))',
                  f'(utt.save.wave utt{i} "{path}" \'riff)',
                  f"(mapcar (lambda (w) (format t \"W\\t{i}\\t%s\\t%s\\t%s\\n\" (item.name w) "
                  f"(item.feat w \"R:SylStructure.daughter1.daughter1.R:Segment.p.end\") (item.feat w \"word_end\"))) "
                  f"(utt.relation.items utt{i} 'Word))"]
    words: list[list[dict]] = [[] for _ in jobs]
    for line in run_festival(lines).splitlines():
        parts = line.split("\t")
        if len(parts) == 5 and parts[0] == "W":
            words[int(parts[1])].append({"word": parts[2].lower(), "start": round(float(parts[3]), 4),
                                         "end": round(float(parts[4]), 4)})
    return [w if path.exists() and w else None for w, (_, _, _, path) in zip(words, jobs, strict=True)]


def build_word_times(out_dir: Path, spec: WordTimesSpec = WordTimesSpec()) -> dict[str, Path]:
    """Render the set into `out_dir` once and return {split: manifest}."""
    import soundfile as sf

    from experiments.data import SAMPLE_RATE, SyntheticSpec, _augmented, usable_clip, write_manifest
    from experiments.data.text import sentences_for_splits
    from experiments.data.voices import check_engines

    manifests = {s: out_dir / f"{s}.jsonl" for s in SPLITS}
    if (out_dir / ".complete").exists():
        return manifests
    check_engines(("festival",))
    corpus = SyntheticSpec()  # the default corpus's splits: these sentences are never trained on
    texts = sentences_for_splits(corpus.seed, {"train": corpus.train, "dev": corpus.dev, "test": corpus.test})
    chosen = {"calibration": texts["dev"][: spec.calibration], "test": texts["test"][: spec.test]}
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "raw").mkdir(parents=True)
    (tmp / "wav").mkdir()
    rng = random.Random(spec.seed)
    rows: dict[str, list[dict]] = {}
    for split, sentences in chosen.items():
        plan = [{"split": split, "name": f"{split}_{i:05d}", "text": t, "engine": "festival", "voice": VOICES[split],
                 "speed": round(rng.random(), 3)} for i, t in enumerate(sentences)]
        jobs = [(r["text"], r["voice"], 1.25 - 0.45 * r["speed"], tmp / "raw" / f"{r['name']}.wav") for r in plan]
        words = [w for i in range(0, len(jobs), 50) for w in festival_word_times(jobs[i : i + 50])]
        rows[split] = []
        for r, w in zip(plan, words, strict=True):
            audio, problem = usable_clip(tmp / "raw" / f"{r['name']}.wav") if w else (None, "no words")
            if problem:
                continue
            sf.write(tmp / "wav" / f"{r['name']}.wav", audio, SAMPLE_RATE, subtype="PCM_16")
            rows[split].append(r | {"duration": round(len(audio) / SAMPLE_RATE, 3), "words": w})
    noisy_spec = SyntheticSpec(seed=spec.seed, noisy_snr_db=spec.noisy_snr_db)
    rows["test_noisy"] = _augmented(tmp, rows["test"], "test_noisy", noisy_spec, workers=2)
    shutil.rmtree(tmp / "raw")
    for split, split_rows in rows.items():
        for r in split_rows:
            r["audio_filepath"] = str(out_dir / "wav" / f"{r['name']}.wav")
        write_manifest(tmp / f"{split}.jsonl", split_rows)
    (tmp / "spec.json").write_text(json.dumps(asdict(spec), indent=1))
    (tmp / ".complete").touch()
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return manifests


def ensure_word_times(spec: WordTimesSpec = WordTimesSpec()) -> dict[str, Path]:
    from qwen2_audio_vllm.checkpoint import cache_root

    return build_word_times(cache_root() / "data" / f"word-times-{spec.key()}", spec)
