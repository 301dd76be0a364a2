"""The real Hydra config, composed as the entry point composes it, and the pipeline end to end."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import projectors

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
PROJECTORS = sorted(p.stem for p in (CONF / "projector").glob("*.yaml"))


def smoke_overrides(tmp_path: Path, *extra: str) -> list[str]:
    """The one-minute smoke experiment with every output under `tmp_path`."""
    return ["experiment=smoke", *extra,
            f"artifacts_dir={tmp_path}/artifacts", f"results_dir={tmp_path}/results", f"run_dir={tmp_path}/run"]


def composed(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    cfg = composed([f"experiment={experiment}", "run_dir=/tmp/x"])
    OmegaConf.resolve(cfg)
    assert set(cfg.stages) <= {"prepare", "align", "export", "evaluate", "bench", "report"}
    assert cfg.train.steps > 0 and cfg.bench.requests > 0


@pytest.mark.parametrize("name", PROJECTORS)
@pytest.mark.parametrize("stack", [1, 4])
def test_every_projector_config_builds(name, stack):
    cfg = composed([f"projector={name}", f"projector.stack={stack}"])
    node = OmegaConf.to_container(cfg.projector, resolve=True)
    p = projectors.build_projector(node, in_dim=128, out_dim=128)
    assert p.stack == stack
    block = projectors.projector_block(p)
    assert projectors.build_projector(block, 128, 128).hparams == p.hparams


def test_unknown_stage_rejected(tmp_path):
    from experiments.run import run

    cfg = composed(["stages=[evaluate,oops]", f"run_dir={tmp_path}"])
    with pytest.raises(ValueError, match="unknown stages"):
        run(cfg)


def test_vllm_logging_quiet_unless_verbose(tmp_path, monkeypatch):
    from experiments.run import run

    for verbose, level in (("false", "WARNING"), ("true", "INFO")):
        monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
        with pytest.raises(ValueError, match="unknown stages"):
            run(composed(["stages=[oops]", f"verbose={verbose}", f"run_dir={tmp_path}"]))
        assert os.environ["VLLM_LOGGING_LEVEL"] == level


@pytest.mark.engine
def test_pipeline_end_to_end(tmp_path):
    """prepare -> align -> export -> evaluate -> bench -> report on the smoke experiment,
    then a rerun reuses every stage output."""
    from experiments.run import run

    overrides = smoke_overrides(tmp_path, "projector=attention", "projector.width=64", "projector.heads=1")
    state = run(composed(overrides))
    r = state["stage_results"]
    assert list(r) == ["prepare", "align", "export", "evaluate", "bench", "report"]
    ev, be = r["evaluate"], r["bench"]
    assert ev["n_utts"] == 16 and ev["n_failed"] == 0 and ev["wer_ci_low"] <= ev["wer"] <= ev["wer_ci_high"]
    assert be["variant"]["successful_requests"] == be["baseline"]["successful_requests"] == 8
    per_round = [v / b for v, b in zip(be["per_round"]["variant"], be["per_round"]["baseline"], strict=True)]
    assert be["rounds"] == len(per_round) == 5  # alternating rounds, the ratio is their median
    assert be["ratio_vs_linear"]["request_throughput"] == pytest.approx(statistics.median(per_round))
    assert be["ratio_vs_linear_min"]["request_throughput"] == pytest.approx(min(per_round))
    assert be["variant"]["request_throughput"] in be["per_round"]["variant"]  # the median round's summary
    utts = [json.loads(line) for line in Path(ev["utterances"]).read_text().splitlines()]
    assert len(utts) == 16 and all(u["error"] is None for u in utts)
    # the reported WER is the corpus WER of the written transcripts (jiwer, independently)
    import jiwer

    assert ev["wer"] == pytest.approx(jiwer.wer([u["ref_norm"] for u in utts], [u["hyp_norm"] for u in utts]))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["config"]["projector"]["name"] == "attention"
    assert results["metadata"]["packages"]["torch"]
    assert (tmp_path / "results" / "results.csv").read_text().count("\n") == 2  # header + 1 row
    assert (tmp_path / "results" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert r["report"]["wandb"] and Path(r["report"]["wandb"]).exists()

    again = run(composed(overrides + ["stages=[align,evaluate,bench]"]))
    assert all(again["stage_results"][s].get("reused") for s in ("align", "evaluate", "bench"))

    # the optional long_form stage on the same aligned checkpoint: one 20 s clip of test
    # utterances, segments vs whole vs the utterances' own files
    lf = run(composed(overrides + ["stages=[long_form]", "long_form.seconds=20", "long_form.clips=1"]))
    lf = lf["stage_results"]["long_form"]
    assert lf["checkpoint"] == r["export"]["checkpoint"] and lf["utterances"][0] >= 5
    assert lf["segments_found"] == lf["utterances"]  # the pauses between utterances were found
    for strategy in ("segments", "whole", "own_files"):
        assert lf[strategy]["n_utts"] == 1 and lf[strategy]["n_failed"] == 0
        assert lf[strategy]["wer_ci_low"] <= lf[strategy]["wer"] <= lf[strategy]["wer_ci_high"]
    assert len(lf["references"][0].split()) >= 10


@pytest.mark.parametrize(("launcher", "target"), [("joblib", "JoblibLauncher"), ("slurm_gpu", "SlurmLauncher")])
def test_sweep_launchers_compose(launcher, target):
    """Sweeps fan out through Hydra launchers: joblib locally (run in tests/test_scale_out.py),
    submitit on SLURM with this repo's one-GPU-per-job config."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    if launcher == "slurm_gpu":
        assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.tasks_per_node == 1
