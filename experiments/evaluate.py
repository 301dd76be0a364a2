"""Evaluate any checkpoint on any manifest: transcribe it through vLLM (the plugin serves
the checkpoint's projector) and score WER/CER with 95 % bootstrap intervals. The `evaluate`
stage of experiments.run calls the same function; on its own it is a Hydra app:

    python -m experiments.evaluate checkpoint=DIR data.manifest=FILE [data.limit=N] [max_tokens=32] [timestamps=true]

A manifest is JSONL with audio_filepath, duration, text per line. Results go to the run
directory (outputs/evaluate/<date>/<time>/): metrics.json, and utterances.jsonl with one line
per utterance (reference, hypothesis, normalised forms, or the error that stopped it); a bad
clip is recorded and the evaluation goes on. `timestamps=true` adds each transcript's word
times (`words: [{word, start, end, score}]`, or an empty list and `words_reason`), from the
checkpoint's alignment head (experiments/timestamps.py; trained once per tower if missing).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from experiments.data.audio import AudioError, load_audio
from experiments.metrics import normalize_text, wer_cer

MAX_TOKENS = 64  # open-vocabulary sentences of up to 11 words take ~30 BPE tokens on the tiny tokenizer


def transcribe(llm, rows: list[dict], max_tokens: int = MAX_TOKENS, batch: int = 64) -> list[dict]:
    """Greedy transcripts for manifest rows: [{"hyp": str | None, "error": str | None,
    "output_tokens": int}]. A row's `hotwords` list (if any) goes with its request. A batch
    that fails is retried clip by clip so one bad request costs only itself."""
    from vllm import SamplingParams

    from experiments.serving.engine import audio_request, chat_prompt

    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    prompt = chat_prompt(llm.get_tokenizer())
    results: list[dict] = [{} for _ in rows]
    requests: list[tuple[int, dict]] = []
    for i, row in enumerate(rows):
        try:
            requests.append((i, audio_request(prompt, load_audio(row["audio_filepath"]), row.get("hotwords"))))
        except AudioError as err:
            results[i] = {"hyp": None, "error": str(err), "output_tokens": 0}

    def run(chunk: list[tuple[int, dict]]) -> None:
        try:
            outs = llm.generate([r for _, r in chunk], params, use_tqdm=False)
        except Exception as err:  # one bad request fails the whole generate call
            if len(chunk) == 1:
                results[chunk[0][0]] = {"hyp": None, "error": f"{type(err).__name__}: {err}", "output_tokens": 0}
                return
            for item in chunk:
                run([item])
            return
        for (i, _), out in zip(chunk, outs, strict=True):
            results[i] = {"hyp": out.outputs[0].text.strip(), "error": None, "output_tokens": len(out.outputs[0].token_ids)}

    for start in tqdm(range(0, len(requests), batch), desc="evaluate", unit="batch"):
        run(requests[start : start + batch])
    return results


def wer_by_engine(rows: list[dict], hyps: list[str | None]) -> dict[str, dict]:
    """{synthesis engine: wer_cer of its rows} for rows that name one ({} when none do)."""
    engines = sorted({r["engine"] for r in rows if "engine" in r})
    return {e: wer_cer([r["text"] for r in rows if r.get("engine") == e],
                       [h for r, h in zip(rows, hyps, strict=True) if r.get("engine") == e])
            for e in engines}


def word_times(aligner, rows: list[dict], results: list[dict]) -> dict:
    """Add each result's word times (`words`, `words_reason`) from `aligner`
    (experiments.timestamps.Aligner); return what it did: clips aligned, seconds, reasons."""
    t0 = time.perf_counter()
    reasons: dict[str, int] = {}
    for row, res in zip(tqdm(rows, desc="timestamps", unit="clip"), results, strict=True):
        try:
            got = aligner.words(load_audio(row["audio_filepath"]), res["hyp"])
        except AudioError as err:
            got = {"words": [], "reason": f"audio: {err}"}
        res["words"], res["words_reason"] = got["words"], got["reason"]
        if got["reason"]:
            key = got["reason"].split(":")[0].split(" (")[0]
            reasons[key] = reasons.get(key, 0) + 1
    return {"aligned": sum(1 for r in results if r["words"]), "clips": len(rows), "failed": reasons,
            "seconds": time.perf_counter() - t0}


def evaluate(llm, rows: list[dict], out_dir: Path, max_tokens: int = MAX_TOKENS, aligner=None) -> dict:
    """Transcribe `rows`, write utterances.jsonl into `out_dir`, return the metrics (with a
    per-engine breakdown, `by_engine`, where the rows name their synthesis engine). With an
    `aligner`, each utterance also gets its word times."""
    t0 = time.perf_counter()
    results = transcribe(llm, rows, max_tokens)
    elapsed = time.perf_counter() - t0
    timing = word_times(aligner, rows, results) if aligner is not None else None
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "utterances.jsonl.tmp"
    with open(tmp, "w") as f:
        for row, res in zip(rows, results, strict=True):
            f.write(json.dumps({
                "audio_filepath": row["audio_filepath"], "duration": row["duration"],
                "ref": row["text"], "hyp": res["hyp"], "error": res["error"],
                **{k: row[k] for k in ("engine", "voice", "augment") if k in row},
                "ref_norm": normalize_text(row["text"]),
                "hyp_norm": None if res["hyp"] is None else normalize_text(res["hyp"]),
                **({"words": res["words"], "words_reason": res["words_reason"]} if timing else {}),
            }) + "\n")
    tmp.replace(out_dir / "utterances.jsonl")
    metrics = wer_cer([r["text"] for r in rows], [r["hyp"] for r in results])
    if by_engine := wer_by_engine(rows, [r["hyp"] for r in results]):
        metrics["by_engine"] = by_engine
    metrics["eval_seconds"] = elapsed
    metrics["eval_audio_seconds"] = sum(r["duration"] for r in rows)
    if timing:
        metrics["timestamps"] = timing
    return metrics


def evaluate_checkpoint(ckpt: Path, rows: list[dict], out_dir: Path, engine_overrides: dict[str, Any],
                        max_tokens: int = MAX_TOKENS, more: dict[str, list[dict]] | None = None,
                        timestamps: bool = False) -> dict:
    """Start an engine on `ckpt` (validated first), evaluate `rows`, stop it; metrics.json and
    utterances.jsonl land in `out_dir`. Returns the metrics with the utterances path.

    more: further test sets ({name: rows}, e.g. test_noisy) scored on the same engine into
    out_dir/<name>/; their metrics are returned (and stored) under their names.
    timestamps: word times for every utterance (the checkpoint's alignment head, or the one
    cached for its tower, trained first if there is none)."""
    from experiments.report import write_json_atomic
    from experiments.serving.engine import close_llm, make_llm

    aligner = None
    if timestamps:  # before the engine starts: a missing head is trained without vLLM holding memory
        from experiments.timestamps import Aligner, ensure_head

        aligner = Aligner(ckpt, ensure_head(ckpt))
    llm = make_llm(ckpt, **engine_overrides)
    try:
        metrics = evaluate(llm, rows, out_dir, max_tokens, aligner)
        for name, extra in (more or {}).items():
            metrics[name] = evaluate(llm, extra, out_dir / name, max_tokens, aligner)
            metrics[name]["utterances"] = str(out_dir / name / "utterances.jsonl")
    finally:
        close_llm(llm)
    metrics["utterances"] = str(out_dir / "utterances.jsonl")
    write_json_atomic(out_dir / "metrics.json", metrics)
    return metrics


@hydra.main(config_path="../conf/apps", config_name="evaluate", version_base=None)
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from experiments.data import read_manifest
    from experiments.serving.engine import quiet_vllm

    ckpt, manifest = Path(cfg.checkpoint), Path(cfg.data.manifest)
    if not (ckpt / "config.json").is_file():
        raise SystemExit(f"checkpoint={ckpt} is not a checkpoint directory (no config.json); give an "
                         "exported checkpoint (outputs/artifacts/align/*/checkpoint) or a base model directory")
    if not manifest.is_file():
        raise SystemExit(f"data.manifest={manifest} does not exist; give a JSONL file with audio_filepath, "
                         "duration and text per line (experiments/data writes them)")
    rows = read_manifest(manifest)[: cfg.data.limit or None]
    quiet_vllm(cfg.verbose)
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    m = evaluate_checkpoint(ckpt, rows, out_dir, OmegaConf.to_container(cfg.engine, resolve=True), cfg.max_tokens,
                            timestamps=cfg.timestamps)
    print(f"{ckpt} on {manifest} ({m['n_utts']} utterances, {m['n_failed']} failed): "
          f"WER {m['wer']:.2%} [{m['wer_ci_low']:.2%}, {m['wer_ci_high']:.2%}], "
          f"CER {m['cer']:.2%} [{m['cer_ci_low']:.2%}, {m['cer_ci_high']:.2%}] -> {out_dir}")
    if cfg.timestamps:
        t = m["timestamps"]
        print(f"word times for {t['aligned']} of {t['clips']} utterances (utterances.jsonl: words); "
              f"not aligned: {t['failed'] or 'none'}")


if __name__ == "__main__":
    main()
