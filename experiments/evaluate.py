"""The `evaluate` stage: transcribe a test manifest through vLLM (the exported checkpoint,
served by the plugin) and score WER/CER with 95 % bootstrap intervals.

Every utterance gets a line in `utterances.jsonl` (reference, hypothesis, normalised forms,
or the error that stopped it); a bad clip is recorded and the evaluation goes on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm

from experiments.audio import AudioError, load_audio
from experiments.metrics import normalize_text, wer_cer


def transcribe(llm, rows: list[dict], max_tokens: int = 32, batch: int = 64) -> list[dict]:
    """Greedy transcripts for manifest rows: [{"hyp": str | None, "error": str | None,
    "output_tokens": int}]. A batch that fails is retried clip by clip so one bad request
    costs only itself."""
    from vllm import SamplingParams

    from experiments.engine import audio_request, chat_prompt

    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    prompt = chat_prompt(llm.get_tokenizer())
    results: list[dict] = [{} for _ in rows]
    requests: list[tuple[int, dict]] = []
    for i, row in enumerate(rows):
        try:
            requests.append((i, audio_request(prompt, load_audio(row["audio_filepath"]))))
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


def evaluate(llm, rows: list[dict], out_dir: Path, max_tokens: int = 32) -> dict:
    """Transcribe `rows`, write utterances.jsonl into `out_dir`, return the metrics."""
    t0 = time.perf_counter()
    results = transcribe(llm, rows, max_tokens)
    elapsed = time.perf_counter() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "utterances.jsonl.tmp"
    with open(tmp, "w") as f:
        for row, res in zip(rows, results, strict=True):
            f.write(json.dumps({
                "audio_filepath": row["audio_filepath"], "duration": row["duration"],
                "ref": row["text"], "hyp": res["hyp"], "error": res["error"],
                "ref_norm": normalize_text(row["text"]),
                "hyp_norm": None if res["hyp"] is None else normalize_text(res["hyp"]),
            }) + "\n")
    tmp.replace(out_dir / "utterances.jsonl")
    metrics = wer_cer([r["text"] for r in rows], [r["hyp"] for r in results])
    metrics["eval_seconds"] = elapsed
    metrics["eval_audio_seconds"] = sum(r["duration"] for r in rows)
    return metrics
