"""`python -m experiments.evaluate checkpoint=DIR data.manifest=FILE`: any checkpoint on any
manifest, WER/CER with bootstrap CIs, one line per utterance, a bad clip recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def evaluate_cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "experiments.evaluate", *overrides, f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=900, cwd=ROOT, env=os.environ | {"WANDB_MODE": "offline"},
    )


@pytest.mark.engine
def test_any_checkpoint_on_any_manifest(tiny_base, speech_clips, tmp_path):
    import jiwer

    manifest = tmp_path / "mine.jsonl"
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\x00\x00")  # a truncated file: recorded as failed, the rest go on
    rows = [{"audio_filepath": str(p), "duration": len(a) / 16000, "text": t} for p, a, t in speech_clips[:4]]
    rows.append({"audio_filepath": str(broken), "duration": 1.0, "text": "lost"})
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = evaluate_cli(tmp_path, f"checkpoint={tiny_base}", f"data.manifest={manifest}", "max_tokens=8")
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    utts = [json.loads(line) for line in (tmp_path / "run" / "utterances.jsonl").read_text().splitlines()]
    assert [u["audio_filepath"] for u in utts] == [r["audio_filepath"] for r in rows]
    assert metrics["n_utts"] == 4 and metrics["n_failed"] == 1 and utts[-1]["error"]
    scored = [u for u in utts if u["error"] is None]
    assert metrics["wer"] == pytest.approx(jiwer.wer([u["ref_norm"] for u in scored], [u["hyp_norm"] for u in scored]))
    assert metrics["wer_ci_low"] <= metrics["wer"] <= metrics["wer_ci_high"]
    assert f"WER {metrics['wer']:.2%}" in run.stdout


def test_missing_manifest_says_what_to_give(tiny_base, tmp_path):
    run = evaluate_cli(tmp_path, f"checkpoint={tiny_base}", f"data.manifest={tmp_path / 'nope.jsonl'}")
    assert run.returncode != 0 and "give a JSONL file with audio_filepath" in run.stderr


def test_not_a_checkpoint_says_what_to_give(tmp_path):
    run = evaluate_cli(tmp_path, f"checkpoint={tmp_path}", f"data.manifest={tmp_path / 'm.jsonl'}")
    assert run.returncode != 0 and "is not a checkpoint directory" in run.stderr
