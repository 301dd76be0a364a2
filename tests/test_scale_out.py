"""Past one process with existing engines only: data-parallel align under torchrun (gloo on
CPU) against a one-process run on the same global batches, and a sweep fanned out by
Hydra's joblib launcher. Both run the real entry point on the hub-shaped tiny model
(`model=qwen2-audio-7b`, QWEN2_AUDIO_7B_DIR pointing at it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
# 8 rows per global batch: 4 per process with 2 processes
COMMON = [
    "model=qwen2-audio-7b", "projector=mlp", "stages=[prepare,align]", "logger=none",
    "data.train=48", "data.dev=8", "data.test=8",
    "train.steps=8", "train.batch_size=8", "train.eval_every=4", "train.warmup=2",
    "trainer.device=cpu", "trainer.precision=fp32",
]
# The stated tolerance: the processes sum gradients in another order than one process
# does, so float32 results agree to rounding, amplified a little by AdamW's normalisation.
DDP_ATOL = 1e-5


def run_module(args: list[str], hub_tiny: Path, tmp: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = os.environ | {"QWEN2_AUDIO_7B_DIR": str(hub_tiny), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return p


def aligned(artifacts: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    (done,) = artifacts.glob("align/*/align.json")
    return json.loads(done.read_text()), load_file(done.parent / "checkpoint" / "model.safetensors")


@pytest.mark.engine
def test_data_parallel_align_matches_one_process(hub_tiny, tmp_path):
    """Both processes align; then process 0 alone evaluates through vLLM (the others have
    left, and torchrun's environment is gone before the engine starts)."""
    one = tmp_path / "one"
    run_module(["-m", "experiments.run", *COMMON, f"artifacts_dir={one}", f"hydra.run.dir={one}/run"], hub_tiny, tmp_path)
    two = tmp_path / "two"
    p = run_module(
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "experiments.run",
         *COMMON, "stages=[prepare,align,export,evaluate]", "model.engine.max_model_len=2048",
         f"artifacts_dir={two}", f"hydra.run.dir={two}/run"], hub_tiny, tmp_path)
    (metrics,) = two.glob("evaluate/*/metrics.json")
    assert json.loads(metrics.read_text())["n_utts"] == 8 and p.stdout.count("[run] stage evaluate") == 1
    r1, w1 = aligned(one)
    r2, w2 = aligned(two)
    assert r1["processes"] == 1 and r2["processes"] == 2
    assert "[align] encoder cache train: 96 clips" in p.stdout  # 48 clean + 48 augmented copies
    proj = [k for k in w1 if k.startswith("multi_modal_projector.")]
    assert proj and sorted(w1) == sorted(w2)
    start = load_file(next(hub_tiny.glob("*.safetensors")))  # the projector moved away from init
    assert any(k not in start or not torch.equal(w1[k], start[k]) for k in proj)
    worst = max(float((w1[k] - w2[k]).abs().max()) for k in proj)
    assert worst <= DDP_ATOL, f"2-process projector differs from 1-process by {worst}"
    for a, b in zip(r1["history"], r2["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["dev_loss"] == pytest.approx(b["dev_loss"], rel=1e-4)


def test_joblib_launcher_runs_a_sweep_in_parallel(hub_tiny, tmp_path):
    sweep = tmp_path / "sweep"
    run_module(
        ["-m", "experiments.run", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
         *[c for c in COMMON if not c.startswith("projector=")], "projector=linear,mlp",
         f"artifacts_dir={tmp_path}/artifacts", f"hydra.sweep.dir={sweep}"], hub_tiny, tmp_path)
    names = sorted(json.loads(p.read_text())["projector"]["name"] for p in (tmp_path / "artifacts").glob("align/*/align.json"))
    assert names == ["linear", "mlp"]
    launcher = (sweep / "multirun.yaml").read_text()
    assert "JoblibLauncher" in launcher
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
