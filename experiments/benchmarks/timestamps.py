"""Word timestamps against festival's own word times, beside Whisper tiny.en's on the same clips.

    python -m experiments.benchmarks.timestamps [checkpoint=DIR] [install=true] [limit=N]

The clips are festival renderings of held-out test sentences in a voice never heard in
training (experiments/data/word_times.py), clean and with noise; festival reports where each
word starts and ends. The checkpoint (default: the default base) transcribes them through
vLLM, its alignment head aligns each transcript (experiments/timestamps.py; trained once per
tower if missing, `install=true` copies it into the checkpoint), and each hypothesis word
that matches a reference word by text is scored at both boundaries: median and 90th
percentile of |error|, shares within 50 and 100 ms. `oracle` aligns the reference text
instead (the head's accuracy alone, without transcription errors). Whisper tiny.en
(faster-whisper, `word_timestamps=True`: cross-attention DTW, greedy) runs on the same clips
and is scored the same way. Writes timestamps.json, timestamps.md and timestamps.png (the
distribution of |boundary error|, ours against Whisper's).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from experiments.timestamps import boundary_summary, matched_boundaries


def whisper_words(rows: list[dict], threads: int = 0) -> list[dict]:
    """[{"hyp", "words": [{word, start, end}]}] by Whisper tiny.en with word timestamps."""
    import logging

    from faster_whisper import WhisperModel

    from experiments.data.audio import load_audio
    from qwen2_audio_vllm.whisper_weights import model_bin

    logging.getLogger("faster_whisper").setLevel(logging.WARNING)
    model = WhisperModel(str(model_bin("tiny.en").parent), device="cpu", compute_type="float32", cpu_threads=threads)
    out = []
    for row in tqdm(rows, desc="whisper tiny.en words", unit="clip"):
        segments, _ = model.transcribe(load_audio(row["audio_filepath"]), language="en", beam_size=1,
                                       vad_filter=False, word_timestamps=True, condition_on_previous_text=False)
        words = [{"word": w.word.strip(), "start": float(w.start), "end": float(w.end)}
                 for s in segments for w in (s.words or [])]
        out.append({"hyp": " ".join(w["word"] for w in words), "words": words})
    return out


def score(rows: list[dict], hyps: list[list[dict]]) -> dict:
    """Boundary errors of hypothesis words against the rows' festival words."""
    starts, ends, matched, ref_words = [], [], 0, 0
    for row, words in zip(rows, hyps, strict=True):
        m = matched_boundaries(row["words"], words)
        starts += m["start"]
        ends += m["end"]
        matched += m["matched"]
        ref_words += m["reference_words"]
    return {"words_matched": matched, "reference_words": ref_words, **boundary_summary(starts + ends),
            "start": boundary_summary(starts), "end": boundary_summary(ends),
            "errors_ms": [round(1000 * e, 1) for e in starts + ends]}


def oracle(aligner, rows: list[dict]) -> list[list[dict]]:
    from experiments.data.audio import load_audio

    return [aligner.words(load_audio(r["audio_filepath"]), r["text"])["words"] for r in tqdm(rows, desc="oracle")]


def write_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(result["splits"])
    fig, axes = plt.subplots(1, len(splits), figsize=(5.5 * len(splits), 4), squeeze=False)
    for ax, split in zip(axes[0], splits, strict=True):
        for name, style in (("checkpoint", "-"), ("oracle", ":"), ("whisper", "--")):
            r = result["splits"][split].get(name)
            if not r or not r["errors_ms"]:
                continue
            a = np.sort(np.abs(r["errors_ms"]))
            label = {"checkpoint": "this model (its transcript)", "oracle": "this model's head (reference text)",
                     "whisper": "Whisper tiny.en (word_timestamps)"}[name]
            ax.plot(a, np.arange(1, a.size + 1) / a.size, style, label=f"{label}: median {r['median_ms']:.0f} ms")
        for x in (50, 100):
            ax.axvline(x, color="grey", lw=0.5)
        ax.set_xlim(0, 400)
        ax.set_xlabel("|boundary error| (ms), start and end of each matched word")
        ax.set_ylabel("share of boundaries")
        ax.set_title(split)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(result: dict) -> str:
    lines = ["| split | method | words matched / reference | median ms | p90 ms | within 50 ms | within 100 ms |",
             "|---|---|---|---|---|---|---|"]
    names = {"checkpoint": "this model, its own transcript", "oracle": "this model's head, reference text",
             "whisper": "Whisper tiny.en, word_timestamps=True"}
    for split, by in result["splits"].items():
        for name, r in by.items():
            if not isinstance(r, dict) or "median_ms" not in r or r["median_ms"] is None:
                continue
            lines.append(f"| {split} | {names[name]} | {r['words_matched']} / {r['reference_words']} | {r['median_ms']:.0f} | "
                         f"{r['p90_ms']:.0f} | {r['within_50ms']:.0%} | {r['within_100ms']:.0%} |")
    return "\n".join(lines)


@hydra.main(config_path="../../conf/apps", config_name="timestamps", version_base=None)
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from experiments.data import read_manifest
    from experiments.data.word_times import ensure_word_times
    from experiments.evaluate import evaluate_checkpoint
    from experiments.report import write_json_atomic
    from experiments.serving.engine import quiet_vllm
    from experiments.timestamps import Aligner, ensure_head, load_head
    from experiments.training.base import default_base

    ckpt = Path(cfg.checkpoint) if cfg.checkpoint else default_base()[0]
    if not (ckpt / "config.json").is_file():
        raise SystemExit(f"checkpoint={ckpt} is not a checkpoint directory (no config.json)")
    quiet_vllm(cfg.verbose)
    out = Path(HydraConfig.get().runtime.output_dir)
    manifests = ensure_word_times()
    head_dir = ensure_head(ckpt, install=cfg.install)
    rows = {s: read_manifest(manifests[s])[: cfg.limit or None] for s in cfg.splits}
    first, *rest = cfg.splits
    t0 = time.perf_counter()
    metrics = evaluate_checkpoint(ckpt, rows[first], out / "checkpoint", OmegaConf.to_container(cfg.engine, resolve=True),
                                  cfg.max_tokens, more={s: rows[s] for s in rest}, timestamps=True)
    eval_seconds = time.perf_counter() - t0
    aligner = Aligner(ckpt, head_dir)
    result: dict = {"checkpoint": str(ckpt), "head": str(head_dir), "head_meta": load_head(head_dir)[1].__dict__,
                    "eval_seconds": eval_seconds, "splits": {}}
    for split in cfg.splits:
        path = out / "checkpoint" / ("" if split == first else split) / "utterances.jsonl"
        utts = [json.loads(line) for line in path.read_text().splitlines()]
        split_metrics = metrics if split == first else metrics[split]
        by = {"wer": split_metrics["wer"], "alignment": split_metrics["timestamps"],
              "checkpoint": score(rows[split], [u["words"] for u in utts]),
              "oracle": score(rows[split], oracle(aligner, rows[split]))}
        if cfg.whisper:
            w = whisper_words(rows[split], cfg.threads)
            by["whisper"] = score(rows[split], [x["words"] for x in w])
            from experiments.metrics import wer_cer

            by["whisper_wer"] = wer_cer([r["text"] for r in rows[split]], [x["hyp"] for x in w])["wer"]
        result["splits"][split] = by
        for name in ("checkpoint", "oracle", "whisper"):
            if name in by and by[name]["median_ms"] is not None:
                r = by[name]
                print(f"[timestamps] {split} {name}: median {r['median_ms']:.0f} ms, p90 {r['p90_ms']:.0f} ms, "
                      f"within 50 ms {r['within_50ms']:.0%}, within 100 ms {r['within_100ms']:.0%} "
                      f"({r['words_matched']} of {r['reference_words']} words matched)")
    write_json_atomic(out / "timestamps.json", result)
    (out / "timestamps.md").write_text(table(result) + "\n")
    write_plot(result, out / "timestamps.png")
    print(f"[timestamps] -> {out / 'timestamps.json'}, timestamps.md, timestamps.png")


if __name__ == "__main__":
    main()
