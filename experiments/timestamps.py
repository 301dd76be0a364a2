"""Word timestamps: an alignment head on the audio tower and a forced alignment of the
transcript to its frames.

The encoder -> LLM design gives no times: the LLM writes words, not where they were said. So
a small CTC head (`CtcHead`: characters a-z, apostrophe and space, plus blank) reads the
frozen tower's pooled frames (25/s, 40 ms each), and CTC segmentation (the
`ctc-segmentation` package, as ESPnet and NeMo use it) aligns the transcript's characters to
the head's posteriors. A word starts where its first character's state is entered and ends
where the blank after it is entered; two constant offsets (start, end), fitted on the
word-times calibration split (a training voice, sentences never trained on), correct CTC's
habit of firing early.

    aligner = Aligner(checkpoint_dir)          # the tower + the checkpoint's head
    aligner.words(audio_16k, "the transcript")  # {"words": [{word, start, end, score}], "reason": None}

The head depends only on the tower, which alignment never trains: it is trained once per
tower (weights hash) on the training split's cached encoder frames and kept under
$Q2AP_CACHE/alignment/tower-<hash>/, and an exported checkpoint carries a copy in its
`alignment/` directory (config.json + head.safetensors; vLLM and transformers read only the
checkpoint's top-level files, so the block changes nothing they load). When alignment cannot
place the words (silence, nothing alignable, more characters than frames, posteriors that do
not match the transcript), the result is an empty list with the reason, never invented times.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from experiments.training.cache import weights_hash

logging.getLogger("ctc_segmentation").setLevel(logging.WARNING)  # not a line per clip

ALPHABET = " 'abcdefghijklmnopqrstuvwxyz"  # normalised transcripts: lower case, no other punctuation
HEAD_DIR = "alignment"
FRAME_S = 0.04  # one pooled tower frame
UPSAMPLE = 2  # the head's outputs per tower frame (20 ms steps)
WINDOW_S = 30.0  # the tower's positions cover one Whisper window; longer audio is encoded window by window
# Mean log posterior of the transcript's characters where the alignment places them, below
# which the transcript is taken not to be in the audio. On the word-times test clips with the
# default tower's head: the reference text scores -2.6 or more, another utterance's text -5.5
# or less, a phrase forced onto low noise about -6; a transcript with some wrong words falls
# in between and keeps its times (each word's own score says how sure it is).
MIN_SCORE = -5.0


class CtcHead(torch.nn.Module):
    """Frames (B, T, d) -> character log-probabilities (B, T, len(ALPHABET) + 1), blank last:
    a per-frame MLP with two 5-frame convolutions (the encoder already gives each frame its
    context; a convolution trains in seconds on 2 cores where a recurrent layer takes minutes)."""

    def __init__(self, d: int, hidden: int = 256, upsample: int = 1) -> None:
        super().__init__()
        self.upsample = upsample
        self.inp = torch.nn.Sequential(torch.nn.LayerNorm(d), torch.nn.Linear(d, hidden), torch.nn.GELU())
        self.conv = torch.nn.Sequential(torch.nn.Conv1d(hidden, hidden, 5, padding=2), torch.nn.GELU(),
                                        torch.nn.Conv1d(hidden, hidden, 5, padding=2), torch.nn.GELU())
        self.out = torch.nn.Linear(hidden, upsample * (len(ALPHABET) + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)  # (B, T, hidden)
        logits = self.out(self.conv(h.transpose(1, 2)).transpose(1, 2))  # (B, T, upsample * C)
        return logits.reshape(x.shape[0], -1, len(ALPHABET) + 1).log_softmax(-1)  # (B, upsample * T, C)


def greedy(log_probs: torch.Tensor, length: int) -> str:
    """Best-path CTC decoding of one clip's (T, C) log-probabilities."""
    ids = log_probs[:length].argmax(-1).tolist()
    blank = len(ALPHABET)
    return "".join(ALPHABET[i] for j, i in enumerate(ids) if i != blank and (j == 0 or ids[j - 1] != i))


def train_ctc_head(frames: list[torch.Tensor], texts: list[str], epochs: int, seed: int, batch: int = 32,
                   lr: float = 2e-3, hidden: int = 256, upsample: int = 1) -> CtcHead:
    """A CtcHead trained with CTC on frames (T_i, d) and their normalised transcripts."""
    from experiments.training.cache import pad_frames

    torch.manual_seed(seed)
    head = CtcHead(frames[0].shape[1], hidden, upsample)
    opt = torch.optim.AdamW(head.parameters(), lr=lr)
    targets = [[ALPHABET.index(c) for c in t if c in ALPHABET] for t in texts]
    order = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc="ctc head", unit="epoch"):
        for idx in torch.randperm(len(frames), generator=order).split(batch):
            x, lengths = pad_frames([frames[i].float() for i in idx])
            lp = head(x).transpose(0, 1)  # (T, B, C)
            flat = torch.tensor([c for i in idx for c in targets[i]])
            loss = torch.nn.functional.ctc_loss(lp, flat, lengths * upsample, torch.tensor([len(targets[i]) for i in idx]),
                                                blank=len(ALPHABET), reduction="mean", zero_infinity=True)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return head.eval()


def spelled(word: str) -> str:
    """The characters of `word` the head can align: lower case letters and apostrophes, a
    number spelled out ("12" -> "twelve"); "" when none (punctuation, symbols)."""
    from experiments.data.text import number_words

    w = word.lower()
    w = re.sub(r"\d+", lambda m: f" {number_words(int(m[0]))} " if int(m[0]) < 1000 else " ".join(m[0]), w)
    w = re.sub(r"\d", lambda m: f" {number_words(int(m[0]))} ", w)  # digits of a long number one by one
    return " ".join("".join(c for c in w if c in ALPHABET[1:] or c == " ").split())


def align_words(log_probs: np.ndarray, transcript: str, frame_s: float = FRAME_S, start_offset: float = 0.0,
                end_offset: float = 0.0, min_score: float = MIN_SCORE) -> dict:
    """Word times of `transcript` in audio whose head posteriors are `log_probs` (T, C),
    blank last. Returns {"words": [{word, start, end, score}], "reason": None}, or an empty
    list and the reason alignment failed. Words with nothing alignable in them (a lone "-")
    are left out and listed under "skipped"."""
    from ctc_segmentation import CtcSegmentationParameters, ctc_segmentation

    words = transcript.split()
    chars = [spelled(w) for w in words]
    kept = [(w, c) for w, c in zip(words, chars, strict=True) if c]
    skipped = [w for w, c in zip(words, chars, strict=True) if not c]
    if not words:
        return {"words": [], "reason": "empty transcript", "skipped": []}
    if not kept:
        return {"words": [], "reason": f"no alignable words in the transcript {transcript!r}", "skipped": skipped}
    # CTC segmentation wants the blank at index 0; the head puts it last
    lpz = np.concatenate([log_probs[:, -1:], log_probs[:, :-1]], axis=1).astype(np.float32)
    ground_truth, first_char, separator, char_at = [-1, 0], [], [], []
    for _, c in kept:
        first_char.append(len(ground_truth))
        char_at.append(list(range(len(ground_truth), len(ground_truth) + len(c))))
        ground_truth += [ALPHABET.index(ch) + 1 for ch in c]
        separator.append(len(ground_truth))
        ground_truth.append(0)  # a blank between words (and after the last)
    if len(ground_truth) > lpz.shape[0]:
        return {"words": [], "reason": f"audio too short for the transcript: {lpz.shape[0]} frames of "
                f"{frame_s * 1000:.0f} ms for {len(ground_truth)} alignment states", "skipped": skipped}
    config = CtcSegmentationParameters(char_list=["<blank>", *ALPHABET], index_duration=frame_s, blank=0)
    timings, _, _ = ctc_segmentation(config, lpz, np.array(ground_truth, dtype=np.int64)[:, None])
    frames = np.minimum(np.rint(np.asarray(timings) / frame_s).astype(int), lpz.shape[0] - 1)
    # each character's log posterior at the frame the alignment enters it
    char_scores = [[float(lpz[frames[p], ground_truth[p]]) for p in positions] for positions in char_at]
    score = float(np.mean([x for word in char_scores for x in word]))
    if score < min_score:
        return {"words": [], "reason": f"the transcript does not match the audio (mean log posterior "
                f"{score:.2f} < {min_score})", "skipped": skipped, "score": score}
    duration = lpz.shape[0] * frame_s
    out = []
    for (word, _), f, s, scores in zip(kept, first_char, separator, char_scores, strict=True):
        start = min(max(0.0, timings[f] + start_offset), duration)
        end = min(max(start + frame_s, timings[s] + end_offset), duration)
        out.append({"word": word, "start": round(float(start), 3), "end": round(float(end), 3),
                    "score": round(float(np.mean(scores)), 3)})
    return {"words": out, "reason": None, "skipped": skipped}


@dataclass
class HeadMeta:
    """What an alignment head block's config.json holds."""

    tower: str  # hash of the tower weights it was trained on (experiments.training.cache.tower_hash)
    d_audio: int
    hidden: int = 256
    upsample: int = 1  # head outputs per tower frame: its time step is FRAME_S / upsample
    alphabet: str = ALPHABET
    frame_s: float = FRAME_S
    start_offset: float = 0.0
    end_offset: float = 0.0
    train: dict = field(default_factory=dict)  # clips, epochs, seconds, dev greedy CER
    calibration: dict = field(default_factory=dict)


def save_head(out_dir: Path, head: CtcHead, meta: HeadMeta) -> Path:
    from safetensors.torch import save_file

    from qwen2_audio_vllm.checkpoint import fresh_tmp_dir

    tmp = fresh_tmp_dir(out_dir)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, tmp / "head.safetensors")
    (tmp / "config.json").write_text(json.dumps(asdict(meta), indent=1))
    import shutil

    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def load_head(head_dir: Path) -> tuple[CtcHead, HeadMeta]:
    from safetensors.torch import load_file

    meta = HeadMeta(**json.loads((head_dir / "config.json").read_text()))
    if meta.alphabet != ALPHABET:
        raise ValueError(f"{head_dir}: alignment head over alphabet {meta.alphabet!r}; this code aligns {ALPHABET!r}")
    head = CtcHead(meta.d_audio, meta.hidden, meta.upsample)
    head.load_state_dict(load_file(head_dir / "head.safetensors"))
    return head.eval(), meta


def load_tower(ckpt: Path):
    """The checkpoint's audio tower alone (transformers' Qwen2AudioEncoder, float32, CPU) and
    its feature extractor: the LLM's weights are never read."""
    from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder

    from qwen2_audio_vllm.checkpoint import load_config, load_processor, read_weights

    config = load_config(ckpt)
    tower = Qwen2AudioEncoder(config.audio_config).float()
    state = {k.removeprefix("audio_tower."): v.float() for k, v in read_weights(ckpt, only_prefix="audio_tower.").items()}
    missing = tower.load_state_dict(state, strict=False).missing_keys
    if missing:
        raise ValueError(f"{ckpt} lacks audio tower weights {missing[:5]}; is it a complete Qwen2-Audio checkpoint?")
    return tower.eval(), load_processor(ckpt).feature_extractor


@torch.no_grad()
def tower_frames(tower, fe, audio: np.ndarray) -> torch.Tensor:
    """Pooled frames (T, d) of one clip of any length: the real-frames encoder over each
    30 s window in turn, concatenated."""
    from qwen2_audio_vllm.encoder import encode, mel_features, pad_mels

    step = int(WINDOW_S * fe.sampling_rate)
    out = []
    for start in range(0, len(audio), step):
        piece = audio[start : start + step]
        if len(piece) < fe.hop_length * 4:  # a tail too short for one pooled frame
            break
        x, n = encode(tower, *pad_mels([mel_features(fe, piece)]), trim=True)
        out.append(x[0, : int(n[0])])
    return torch.cat(out) if out else torch.zeros(0, tower.config.d_model)


class Aligner:
    """A checkpoint's tower and alignment head: word times for (audio, transcript) pairs."""

    def __init__(self, ckpt: str | Path, head_dir: str | Path | None = None) -> None:
        self.ckpt = Path(ckpt)
        self.tower, self.fe = load_tower(self.ckpt)
        head_dir = Path(head_dir) if head_dir else self.ckpt / HEAD_DIR
        if not (head_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"{head_dir} holds no alignment head; build one for this checkpoint's tower with "
                f"`python -m experiments.benchmarks.timestamps checkpoint={self.ckpt} install=true` "
                "(trains it once per tower, minutes on CPU, and copies it into the checkpoint)")
        self.head, self.meta = load_head(head_dir)
        own = weights_hash(self.tower)
        if self.meta.tower != own:
            raise ValueError(f"{head_dir} was trained on tower {self.meta.tower}, but {self.ckpt}'s tower is {own}; "
                             "an alignment head only fits the tower it was trained on: rebuild it with "
                             f"`python -m experiments.benchmarks.timestamps checkpoint={self.ckpt} install=true`")

    @torch.no_grad()
    def log_probs(self, audio: np.ndarray) -> np.ndarray:
        frames = tower_frames(self.tower, self.fe, audio)
        if frames.shape[0] == 0:
            return np.zeros((0, len(ALPHABET) + 1), np.float32)
        return self.head(frames[None].float())[0].numpy()

    def words(self, audio: np.ndarray, transcript: str | None, offset_s: float = 0.0) -> dict:
        """{"words": [{word, start, end, score}], "reason": None | str}; times in seconds from
        the start of `audio`, plus `offset_s`."""
        if transcript is None:
            return {"words": [], "reason": "no transcript (the request failed)", "skipped": []}
        if audio.size == 0 or float(np.abs(audio).max()) < 1e-4:
            return {"words": [], "reason": "silent audio: nothing to align", "skipped": []}
        result = align_words(self.log_probs(audio), transcript, self.meta.frame_s,
                             self.meta.start_offset, self.meta.end_offset)
        for w in result["words"]:
            w["start"], w["end"] = round(w["start"] + offset_s, 3), round(w["end"] + offset_s, 3)
        return result


def matched_boundaries(reference: list[dict], hypothesis: list[dict]) -> dict:
    """Pair hypothesis words with reference words of the same text (an edit alignment of the
    two word sequences, equal words only) and return the signed errors hyp - ref of the
    starts and ends of the pairs, in seconds, with the counts."""
    from difflib import SequenceMatcher

    def key(w: dict) -> str:
        return "".join(c for c in w["word"].lower() if c.isalnum() or c == "'")

    ref, hyp = [key(w) for w in reference], [key(w) for w in hypothesis]
    starts, ends = [], []
    for block in SequenceMatcher(None, ref, hyp, autojunk=False).get_matching_blocks():
        for k in range(block.size):
            r, h = reference[block.a + k], hypothesis[block.b + k]
            starts.append(h["start"] - r["start"])
            ends.append(h["end"] - r["end"])
    return {"start": starts, "end": ends, "matched": len(starts), "reference_words": len(reference),
            "hypothesis_words": len(hypothesis)}


def boundary_summary(errors: list[float]) -> dict:
    """Median and 90th percentile of |error| (ms) and the shares within 50 and 100 ms."""
    a = np.abs(np.asarray(errors, dtype=float)) * 1000
    if a.size == 0:
        return {"boundaries": 0, "median_ms": None, "p90_ms": None, "within_50ms": None, "within_100ms": None}
    return {"boundaries": int(a.size), "median_ms": float(np.median(a)), "p90_ms": float(np.percentile(a, 90)),
            "within_50ms": float(np.mean(a <= 50)), "within_100ms": float(np.mean(a <= 100))}


def subtitles(words: list[dict], fmt: str = "srt", max_words: int = 8, max_gap_s: float = 0.6) -> str:
    """SRT or WebVTT cues from word times: a new cue after `max_words` words or a pause
    longer than `max_gap_s`."""
    if fmt not in ("srt", "vtt"):
        raise ValueError(f"subtitle format {fmt!r}: expected srt or vtt")
    cues: list[list[dict]] = []
    for w in words:
        if not cues or len(cues[-1]) >= max_words or w["start"] - cues[-1][-1]["end"] > max_gap_s:
            cues.append([])
        cues[-1].append(w)

    def stamp(t: float) -> str:
        ms = round(t * 1000)
        h, ms = divmod(ms, 3_600_000)
        m, ms = divmod(ms, 60_000)
        s, ms = divmod(ms, 1000)
        return f"{h:02d}:{m:02d}:{s:02d}{',' if fmt == 'srt' else '.'}{ms:03d}"

    lines = ["WEBVTT", ""] if fmt == "vtt" else []
    for i, cue in enumerate(cues, 1):
        if fmt == "srt":
            lines.append(str(i))
        lines += [f"{stamp(cue[0]['start'])} --> {stamp(cue[-1]['end'])}", " ".join(w["word"] for w in cue), ""]
    return "\n".join(lines)


def calibrate(aligner_log_probs: list[np.ndarray], rows: list[dict], frame_s: float = FRAME_S) -> dict:
    """Constant start and end offsets (seconds) that zero the median signed boundary error of
    the head's alignments of the rows' own texts against their festival word times."""
    starts, ends = [], []
    for lp, row in zip(aligner_log_probs, rows, strict=True):
        got = align_words(lp, row["text"], frame_s)
        m = matched_boundaries(row["words"], got["words"])
        starts += m["start"]
        ends += m["end"]
    if not starts:
        raise ValueError("calibration aligned no word of its clips; the head does not work on this tower")
    return {"start_offset": -float(np.median(starts)), "end_offset": -float(np.median(ends)),
            "boundaries": len(starts) + len(ends), "clips": len(rows)}


def head_cache_dir(tower_weights: str) -> Path:
    from qwen2_audio_vllm.checkpoint import cache_root

    return cache_root() / "alignment" / f"tower-{tower_weights}"


def build_head(ckpt: Path, train_rows: list[dict], calibration_rows: list[dict], out_dir: Path,
               epochs: int = 4, seed: int = 0, upsample: int = UPSAMPLE) -> Path:
    """Train an alignment head on `ckpt`'s tower (the training rows' encoder frames come from
    the shared encoder-output cache: pretraining already built it for the default corpus) and
    fit its offsets on the calibration rows (festival word times); written to `out_dir`."""
    import time

    from experiments.metrics import wer_cer
    from experiments.training.cache import cache_dir_for, load_or_build
    from qwen2_audio_vllm.checkpoint import load_model, load_processor

    model, processor = load_model(ckpt), load_processor(ckpt)
    frames, _ = load_or_build(model, processor, train_rows, cache_dir_for(model, train_rows))
    tower, fe = model.audio_tower.float().eval(), processor.feature_extractor
    t0 = time.perf_counter()
    texts = [" ".join(spelled(w) for w in r["text"].split()) for r in train_rows]
    head = train_ctc_head(frames, texts, epochs, seed, upsample=upsample)
    seconds = time.perf_counter() - t0
    from experiments.data.audio import load_audio

    with torch.no_grad():
        lps = [head(tower_frames(tower, fe, load_audio(r["audio_filepath"]))[None])[0] for r in calibration_rows]
    refs = [" ".join(spelled(w) for w in r["text"].split()) for r in calibration_rows]
    dev = wer_cer(refs, [greedy(lp, lp.shape[0]) for lp in lps])
    meta = HeadMeta(tower=weights_hash(tower), d_audio=frames[0].shape[1], upsample=upsample, frame_s=FRAME_S / upsample,
                    train={"clips": len(train_rows), "epochs": epochs, "seed": seed, "seconds": round(seconds, 1),
                           "calibration_greedy_wer": dev["wer"], "calibration_greedy_cer": dev["cer"]})
    calibration = calibrate([lp.numpy() for lp in lps], calibration_rows, meta.frame_s)
    meta.start_offset, meta.end_offset = calibration["start_offset"], calibration["end_offset"]
    meta.calibration = calibration
    print(f"[timestamps] alignment head: {len(train_rows)} clips x {epochs} epochs in {seconds:.0f} s, greedy CER on "
          f"calibration clips {dev['cer']:.1%}; offsets start {meta.start_offset * 1000:+.0f} ms, "
          f"end {meta.end_offset * 1000:+.0f} ms -> {out_dir}")
    return save_head(out_dir, head, meta)


def ensure_head(ckpt: Path, install: bool = False, epochs: int = 4) -> Path:
    """The alignment head directory for `ckpt`: its own `alignment/` block when that fits its
    tower, else the one cached for its tower (trained on the default corpus if missing).
    install=True copies it into the checkpoint."""
    import shutil

    from experiments.data import prepare, read_manifest
    from experiments.data.word_times import ensure_word_times

    tower, _ = load_tower(ckpt)
    weights = weights_hash(tower)
    own = ckpt / HEAD_DIR
    if (own / "config.json").is_file() and json.loads((own / "config.json").read_text()).get("tower") == weights:
        return own
    cached = head_cache_dir(weights)
    if not (cached / "config.json").is_file():
        train = read_manifest(prepare.ensure_synthetic()["train"])
        calibration = read_manifest(ensure_word_times()["calibration"])
        build_head(ckpt, train, calibration, cached, epochs)
    if not install:
        return cached
    shutil.rmtree(own, ignore_errors=True)
    shutil.copytree(cached, own)
    return own
