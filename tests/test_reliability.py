"""Bad audio offline and through the server, load with bad inputs mixed in, interrupted runs."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from experiments.serving.client import online_summary, request, served_model, simulate

pytestmark = pytest.mark.engine
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def odd_audio(speech_clips, tmp_path_factory) -> dict[str, tuple[Path, str | None]]:
    """name -> (file, None if it must transcribe, else a phrase its error must contain)."""
    import librosa

    d = tmp_path_factory.mktemp("odd")
    speech = speech_clips[0][1]
    files: dict[str, tuple[Path, str | None]] = {}

    def wav(name, data, sr=16000, subtype="FLOAT", expect=None):
        sf.write(d / f"{name}.wav", data, sr, subtype=subtype)
        files[name] = (d / f"{name}.wav", expect)

    wav("empty", np.zeros(0, np.float32), expect="empty")
    wav("10ms", speech[:160], expect="too short")
    wav("silence", np.zeros(16000, np.float32))
    nan = speech.copy()
    nan[100] = np.nan
    wav("nan", nan, expect="NaN")
    wav("clipped", np.clip(speech * 20, -1, 1), subtype="PCM_16")
    wav("stereo", np.stack([speech, speech * 0.5], axis=1))
    wav("8khz", librosa.resample(speech, orig_sr=16000, target_sr=8000), sr=8000, subtype="PCM_16")
    wav("44khz", librosa.resample(speech, orig_sr=16000, target_sr=44100), sr=44100, subtype="PCM_16")
    wav("45s", np.resize(speech, 45 * 16000), subtype="PCM_16", expect="window")
    good = (d / "stereo.wav").read_bytes()
    (d / "truncated.wav").write_bytes(good[:30])  # cut inside the header
    files["truncated"] = (d / "truncated.wav", "rror")
    (d / "not_audio.wav").write_text("this is a text file, not audio\n" * 20)
    files["not_audio"] = (d / "not_audio.wav", "rror")
    return files


def test_offline_evaluation_records_bad_clips_and_goes_on(odd_audio, tiny_llm, tmp_path):
    from experiments.evaluate import evaluate

    rows = [{"audio_filepath": str(p), "duration": 1.0, "text": "open the red door"} for p, _ in odd_audio.values()]
    metrics = evaluate(tiny_llm, rows, tmp_path, max_tokens=8)
    import json

    utts = [json.loads(line) for line in (tmp_path / "utterances.jsonl").read_text().splitlines()]
    assert len(utts) == len(odd_audio)
    for (name, (_, expect)), u in zip(odd_audio.items(), utts, strict=True):
        if expect is None:
            assert u["error"] is None and u["hyp"] is not None, (name, u["error"])
        else:
            assert u["hyp"] is None and expect in u["error"], (name, u["error"])
    n_bad = sum(e is not None for _, e in odd_audio.values())
    assert metrics["n_failed"] == n_bad and metrics["n_utts"] == len(odd_audio) - n_bad


@pytest.fixture(scope="module")
def server(tiny_server):
    return tiny_server


def test_server_answers_bad_audio_with_400_and_keeps_serving(server, odd_audio):
    from openai import AsyncOpenAI

    async def go():
        model = await served_model(server.base_url)
        async with AsyncOpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0) as client:
            return {name: await request(client, model, str(p), max_tokens=4) for name, (p, _) in odd_audio.items()}

    results = asyncio.run(go())
    for name, (_, expect) in odd_audio.items():
        record, _ = results[name]
        if expect is None:
            assert record.ok, (name, record.error)
        else:
            assert not record.ok and " 400" in record.error, (name, record.error)
    assert server.proc.poll() is None


def test_load_200_requests_concurrency_32_with_bad_inputs(server, odd_audio, speech_clips):
    good = [str(p) for p, _, _ in speech_clips]
    bad = [str(p) for p, e in odd_audio.values() if e is not None]
    sources = [bad[i // 10 % len(bad)] if i % 10 == 0 else good[i % len(good)] for i in range(200)]
    pid = server.proc.pid

    async def go():
        model = await served_model(server.base_url)
        return await simulate(server.base_url, model, sources, n=200, concurrency=32, max_tokens=8, timeout_s=120)

    t0 = time.monotonic()
    records, duration = asyncio.run(go())
    assert time.monotonic() - t0 < 600
    for source, record in zip(sources, records, strict=True):
        if source in bad:
            assert not record.ok and " 400" in record.error, (source, record.error)
        else:
            assert record.ok, (source, record.error)
    s = online_summary(records, duration, 32)
    assert s["failed_requests"] == 20 and s["successful_requests"] == 180
    assert server.proc.poll() is None and server.proc.pid == pid  # never restarted


def test_interrupted_run_leaves_no_half_results_and_resumes(tmp_path):
    """Kill experiments.run in the middle of align; nothing half-written is left, a rerun
    finishes the stage; an unreachable W&B never costs the local results."""
    args = [sys.executable, "-m", "experiments.run", "experiment=smoke", "projector=mlp",
            "train.steps=400", "train.eval_every=10", "stages=[prepare,align]",
            f"artifacts_dir={tmp_path}/a", f"results_dir={tmp_path}/r", f"hydra.run.dir={tmp_path}/run1"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    for line in proc.stdout:
        if "[align mlp] step 20" in line:  # under way, two dev evaluations done, 380 steps to go
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    align_root = tmp_path / "a" / "align"
    assert not list(align_root.glob("*/align.json"))  # the stage is not marked done
    assert not list(align_root.glob("*/checkpoint"))  # the best weights are written only at the end
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]  # nothing half-written

    env = os.environ | {"WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_API_KEY": "x" * 40}
    rerun = args[:-4] + ["train.steps=20", "train.eval_every=10", "stages=[prepare,align,report]",
                         "logger.mode=online", "logger.init_timeout_s=3",
                         f"artifacts_dir={tmp_path}/a", f"results_dir={tmp_path}/r", f"hydra.run.dir={tmp_path}/run2"]
    out = subprocess.run(rerun, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (tmp_path / "run2" / "results.json").exists()
    assert len(list(align_root.glob("*/checkpoint/config.json"))) == 1 and list(align_root.glob("*/align.json"))
    assert (tmp_path / "r" / "results.csv").exists()
    assert "warning: W&B logging skipped" in out.stdout + out.stderr  # reported in one line, results kept
