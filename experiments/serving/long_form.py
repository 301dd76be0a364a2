"""Long-form transcription: audio of any length, two strategies side by side.

- `whole`: one request per clip; the fork splits it into encoder windows and the LLM sees
  all of them at once (config.json "long_audio", qwen2_audio_vllm/windows.py). Right for a
  model trained on long audio (Qwen2-Audio-7B), and the only way the LLM sees the whole
  context.
- `segments`: the clip is cut at pauses into speech segments no longer than one encoder
  window, each segment is one request (batched), and the transcripts are joined in order.
  Right for a model trained on short utterances (the tiny base: 1-3 s phrases).

    python -m experiments.serving.long_form files=[a.wav,b.wav] [model=DIR] [strategy=segments|whole]
    python -m experiments.serving.long_form demo=true [model=DIR]   # 75 s of known test utterances, both strategies
    python -m experiments.serving.long_form files=[a.wav] timestamps=true [subtitles=srt|vtt]

`demo=true` builds 75 s clips from held-out synthetic test utterances separated by pauses,
transcribes them through vLLM with `model=` or the default tiny base (built by
`experiments.run`'s prepare stage if missing) and reports WER for both strategies, written to
`out_dir` (outputs/long_form/). The
`timestamps=true` also writes each file's word times (<stem>.words.json) and subtitles
(<stem>.srt or .vtt) into the run directory: each transcribed piece is aligned to its own
audio by the checkpoint's alignment head (experiments/timestamps.py). The
same measurement for any aligned variant is the optional `long_form` stage of
`experiments.run` (stages=[...,long_form,report]).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from experiments.data.audio import SAMPLE_RATE, load_audio

FRAME_S = 0.01  # energy frames


def pause_segments(
    audio: np.ndarray,
    sr: int = SAMPLE_RATE,
    max_s: float = 30.0,
    min_pause_s: float = 0.25,
    threshold_db: float = -40.0,
    lead_s: float = 0.0,
    tail_s: float = 0.3,
    min_segment_s: float = 0.1,
) -> list[tuple[int, int]]:
    """(start, end) sample ranges of the speech in `audio`, in order, cut at pauses.

    A frame is speech when its energy is within `threshold_db` of the clip's loudest frame;
    speech runs closer than `min_pause_s` are one segment; each segment starts `lead_s`
    before its speech and ends `tail_s` after it (never past the middle of the pause to its
    neighbour), and a segment longer than `max_s` is cut into equal parts. Bursts shorter
    than `min_segment_s` (clicks; too short for the encoder) are dropped, and silence gives
    no segments. The defaults cut segments the way utterance corpora (and espeak-ng) cut
    files: speech from the start, a pause at the end. They were picked on dev-split clips
    (`demo=true` reports test clips) because the tiny base, trained only on such files, is
    sensitive to where a cut starts: on 3 dev clips of 75 s its WER was 24.8 % with
    lead_s=0, 31.5 % with 0.02 s and 36 % with 0.05 s (tail_s=0.3).
    """
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise ValueError(f"expected mono samples (n,), got shape {audio.shape}; load files with experiments.data.audio.load_audio")
    if not np.isfinite(audio).all():
        raise ValueError("audio contains NaN or infinite samples; send finite PCM samples")
    hop = max(int(FRAME_S * sr), 1)
    n_frames = len(audio) // hop + (len(audio) % hop > 0)
    padded = np.zeros(n_frames * hop, dtype=np.float64)
    padded[: len(audio)] = audio
    energy = (padded.reshape(n_frames, hop) ** 2).mean(axis=1)
    if n_frames == 0 or energy.max() <= 0:
        return []
    speech = 10 * np.log10(energy + 1e-20) > 10 * np.log10(energy.max()) + threshold_db
    runs: list[list[int]] = []  # [first frame, last frame + 1]
    for i in np.flatnonzero(speech):
        if runs and i - runs[-1][1] < min_pause_s / FRAME_S:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    lead, tail = int(lead_s / FRAME_S), int(tail_s / FRAME_S)
    segments = []
    for k, (a, b) in enumerate(runs):
        lo = (runs[k - 1][1] + a) // 2 if k else 0
        hi = (b + runs[k + 1][0]) // 2 if k + 1 < len(runs) else n_frames
        start, end = max(a - lead, lo) * hop, min(min(b + tail, hi) * hop, len(audio))
        parts = int(np.ceil((end - start) / (max_s * sr)))
        edges = np.linspace(start, end, parts + 1).astype(int)
        segments += list(zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True))
    return [(a, b) for a, b in segments if b - a >= min_segment_s * sr]


def transcribe_long(llm, audios: list[np.ndarray], strategy: str = "segments", max_tokens: int = 32, max_s: float = 30.0) -> list[str]:
    """One transcript per clip (16 kHz float arrays) through a `vllm.LLM`. `segments`:
    `max_tokens` per segment, all segments of all clips in one batch; `whole`: `max_tokens`
    for the clip."""
    return [" ".join(t for _, _, t in pieces if t) for pieces in transcribe_pieces(llm, audios, strategy, max_tokens, max_s)]


def transcribe_pieces(llm, audios: list[np.ndarray], strategy: str = "segments", max_tokens: int = 32,
                      max_s: float = 30.0) -> list[list[tuple[int, int, str]]]:
    """Per clip, its transcribed pieces in order: (start sample, end sample, text); one piece
    (the whole clip) for `whole`."""
    from vllm import SamplingParams

    from experiments.serving.engine import audio_request, chat_prompt

    prompt = chat_prompt(llm.get_tokenizer())
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    if strategy == "whole":
        outs = llm.generate([audio_request(prompt, a) for a in audios], params, use_tqdm=False)
        return [[(0, len(a), o.outputs[0].text.strip())] for a, o in zip(audios, outs, strict=True)]
    if strategy != "segments":
        raise ValueError(f"unknown strategy {strategy!r}; expected 'segments' or 'whole'")
    owner, spans, requests = [], [], []
    for i, audio in enumerate(audios):
        for start, end in pause_segments(audio, max_s=max_s):
            owner.append(i)
            spans.append((start, end))
            requests.append(audio_request(prompt, audio[start:end]))
    outs = llm.generate(requests, params, use_tqdm=False) if requests else []
    pieces: list[list[tuple[int, int, str]]] = [[] for _ in audios]
    for i, (start, end), out in zip(owner, spans, outs, strict=True):
        pieces[i].append((start, end, out.outputs[0].text.strip()))
    return pieces


def piece_words(aligner, audio: np.ndarray, pieces: list[tuple[int, int, str]], sr: int = SAMPLE_RATE) -> dict:
    """Word times of a long clip from its transcribed pieces (each aligned to its own audio
    and shifted to the clip's time line); reasons of the pieces that could not be aligned."""
    words, reasons = [], []
    for start, end, text in pieces:
        got = aligner.words(audio[start:end], text, offset_s=start / sr)
        words += got["words"]
        if got["reason"] and text:
            reasons.append(f"{start / sr:.2f}-{end / sr:.2f} s: {got['reason']}")
    return {"words": words, "reason": None if words else "; ".join(reasons) or "no speech transcribed",
            "pieces_not_aligned": reasons}


def demo_clips(rows: list[dict], seconds: float, n_clips: int, seed: int = 0) -> list[tuple[np.ndarray, list[dict]]]:
    """`n_clips` clips of known utterances (manifest rows, each used once) joined with
    0.4-1.0 s pauses and padded to `seconds`: [(audio, their rows in order)]."""
    rng = random.Random(seed)
    pool = rng.sample(rows, len(rows))
    clips = []
    for _ in range(n_clips):
        parts, used, n = [], [], 0
        while pool:
            audio = load_audio(pool[-1]["audio_filepath"])
            gap = np.zeros(int(rng.uniform(0.4, 1.0) * SAMPLE_RATE), dtype=np.float32)
            if n + len(gap) + len(audio) > seconds * SAMPLE_RATE:
                break
            parts += [gap, audio]
            used.append(pool.pop())
            n += len(gap) + len(audio)
        parts.append(np.zeros(int(seconds * SAMPLE_RATE) - n, dtype=np.float32))
        clips.append((np.concatenate(parts), used))
    return clips


def with_windows(ckpt: Path, longest_samples: int, out_root: Path) -> Path:
    """A sibling of `ckpt` (symlinked files, links renewed each call) whose config.json
    takes enough encoder windows (its own window and overlap, windows.py) for
    `longest_samples`; `ckpt` itself when it already does."""
    from transformers import Qwen2AudioConfig, WhisperFeatureExtractor

    from qwen2_audio_vllm import windows
    from qwen2_audio_vllm.adoption import linked_checkpoint

    cfg = json.loads((ckpt / "config.json").read_text())
    w = windows.windowing(Qwen2AudioConfig.from_dict(cfg), WhisperFeatureExtractor.from_pretrained(ckpt))
    needed = 1 + max(0, -(-(longest_samples - w.window) // w.hop))
    if needed <= w.max_windows:
        return ckpt
    cfg["long_audio"] = dict(cfg.get("long_audio") or {}, max_windows=needed)
    return linked_checkpoint(ckpt, out_root, cfg, suffix=f"-windows{needed}")


def engine_len(ckpt: Path, wanted: int = 8192) -> int:
    """`wanted` context tokens, or fewer when the LLM has fewer positions."""
    cfg = json.loads((ckpt / "config.json").read_text())
    return min(wanted, int(cfg["text_config"].get("max_position_embeddings", wanted)))


def long_form_eval(ckpt: Path, rows: list[dict], seconds: float, n_clips: int, out_dir: Path) -> dict:
    """WER of checkpoint `ckpt` on `n_clips` clips of `seconds` built from known utterances
    (`rows`): `segments`, `whole`, and each utterance from its own file (the ceiling for
    `segments`), one engine for all three. Clips and results are written to `out_dir`."""
    import soundfile as sf

    from experiments.metrics import wer_cer
    from experiments.report import write_json_atomic
    from experiments.serving.engine import close_llm, make_llm

    clips = demo_clips(rows, seconds, n_clips)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, (audio, _) in enumerate(clips):
        sf.write(out_dir / f"clip{i}-{int(seconds)}s.wav", audio, SAMPLE_RATE, subtype="FLOAT")
    refs = [" ".join(r["text"] for r in used) for _, used in clips]
    result = {"checkpoint": str(ckpt), "seconds": seconds, "clips": n_clips,
              "utterances": [len(t) for _, t in clips],
              "segments_found": [len(pause_segments(a)) for a, _ in clips], "references": refs}
    windowed = with_windows(ckpt, max(len(a) for a, _ in clips), out_dir)
    llm = make_llm(windowed, max_model_len=engine_len(windowed))
    try:
        for strategy, max_tokens in (("segments", 32), ("whole", 16 * max(result["utterances"]))):
            hyps = transcribe_long(llm, [a for a, _ in clips], strategy, max_tokens)
            result[strategy] = {"hypotheses": hyps, **wer_cer(refs, hyps)}
        own = transcribe_long(llm, [load_audio(r["audio_filepath"]) for _, used in clips for r in used], "whole", 32)
        hyps, i = [], 0
        for n in result["utterances"]:
            hyps.append(" ".join(own[i : i + n]))
            i += n
        result["own_files"] = {"hypotheses": hyps, **wer_cer(refs, hyps)}
    finally:
        close_llm(llm)
    write_json_atomic(out_dir / "long_form.json", result)
    return result


@hydra.main(config_path="../../conf/apps", config_name="long_form", version_base=None)
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from experiments.training.base import default_base, default_manifests

    if cfg.strategy not in ("segments", "whole"):
        raise SystemExit(f"strategy={cfg.strategy}: expected segments (cut at pauses) or whole (encoder windows)")

    if cfg.demo:
        from experiments.data import read_manifest

        ckpt = Path(cfg.model) if cfg.model else default_base()[0]
        test = read_manifest(default_manifests()["test"])  # the corpus's held-out split, whichever model is measured
        r = long_form_eval(ckpt, test, cfg.seconds, cfg.clips, Path(cfg.out_dir))
        print(f"{r['clips']} clips of {r['seconds']:.0f} s: utterances {r['utterances']}, segments found {r['segments_found']}")
        for s in ("own_files", "segments", "whole"):
            print(f"{s:>9}: WER {r[s]['wer']:.1%} [{r[s]['wer_ci_low']:.1%}, {r[s]['wer_ci_high']:.1%}]  "
                  f"CER {r[s]['cer']:.1%}  | {r[s]['hypotheses'][0][:80]}")
        print(f"{'ref':>9}: {r['references'][0][:80]}\n-> {Path(cfg.out_dir) / 'long_form.json'}")
        return
    if not cfg.files:
        raise SystemExit("give audio files (files=[a.wav,b.wav]), or demo=true")
    files = [Path(f) for f in cfg.files]
    from experiments.serving.engine import close_llm, make_llm

    model = Path(cfg.model) if cfg.model else default_base()[0]
    audios = [load_audio(f) for f in files]
    if cfg.strategy == "whole":
        model = with_windows(model, max(len(a) for a in audios), Path(cfg.out_dir))
    aligner = None
    if cfg.timestamps:  # before the engine: a missing alignment head is trained first
        from experiments.timestamps import Aligner, ensure_head

        aligner = Aligner(model, ensure_head(model))
        if cfg.subtitles not in ("srt", "vtt"):
            raise SystemExit(f"subtitles={cfg.subtitles}: expected srt or vtt")
    llm = make_llm(model, max_model_len=engine_len(model))
    try:
        max_tokens = cfg.max_tokens or (32 if cfg.strategy == "segments" else 256)
        transcribed = transcribe_pieces(llm, audios, cfg.strategy, max_tokens)
    finally:
        close_llm(llm)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    for f, audio, pieces in zip(files, audios, transcribed, strict=True):
        print(f"{f}\t{' '.join(t for _, _, t in pieces if t)}")
        if aligner is None:
            continue
        from experiments.report import write_json_atomic
        from experiments.timestamps import subtitles

        got = piece_words(aligner, audio, pieces)
        write_json_atomic(out_dir / f"{f.stem}.words.json", got)
        (out_dir / f"{f.stem}.{cfg.subtitles}").write_text(subtitles(got["words"], cfg.subtitles))
        print(f"  {len(got['words'])} words timed -> {out_dir / f'{f.stem}.{cfg.subtitles}'}"
              + (f" (not aligned: {got['reason'] or got['pieces_not_aligned']})" if got["pieces_not_aligned"] or got["reason"] else ""))

if __name__ == "__main__":
    main()
