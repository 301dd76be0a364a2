import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments.report import (
    append_results_row,
    log_wandb,
    pareto_figure,
    pareto_front,
    plot_pareto,
    run_metadata,
    write_comparison,
    write_json_atomic,
)


def test_write_json_atomic_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "metrics.json"
    write_json_atomic(path, {"wer": 0.25, "path": Path("x")})
    write_json_atomic(path, {"wer": 0.125})
    assert json.loads(path.read_text()) == {"wer": 0.125}
    assert os.listdir(path.parent) == ["metrics.json"]


def test_write_json_atomic_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"wer": 0.25})

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_json_atomic(path, {"wer": 0.5})
    assert json.loads(path.read_text()) == {"wer": 0.25}
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_run_metadata(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")
    meta = run_metadata()
    assert meta["vllm_cpu_env"]["VLLM_CPU_KVCACHE_SPACE"] == "4"
    import subprocess

    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    assert meta["git_sha"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert meta["packages"]["transformers"] is not None
    assert meta["python"] == ".".join(map(str, sys.version_info[:3]))
    assert meta["cpu_count"] == os.cpu_count()
    json.dumps(meta)


def test_append_results_row_unions_columns(tmp_path):
    table = tmp_path / "results.csv"
    append_results_row(table, {"name": "baseline", "wer": 0.05, "rtfx": 10.0})
    rows = append_results_row(table, {"name": "fp8_kv", "wer": 0.06, "kv_dtype": "fp8"})
    with open(table, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["name", "wer", "rtfx", "kv_dtype"]
        assert list(reader) == rows
    assert rows[0] == {"name": "baseline", "wer": "0.05", "rtfx": "10.0", "kv_dtype": ""}
    assert rows[1]["kv_dtype"] == "fp8" and rows[1]["rtfx"] == ""
    md = (tmp_path / "results.md").read_text().splitlines()
    assert md[0] == "| name | wer | rtfx | kv_dtype |"
    assert md[3] == "| fp8_kv | 0.06 | - | fp8 |"
    assert sorted(os.listdir(tmp_path)) == ["results.csv", "results.csv.lock", "results.md"]  # no temp files


def test_pareto_front():
    # (throughput, wer): 1 dominates 0; 3 is dominated by 2; 4 ties 1 and stays.
    points = [(1.0, 0.10), (1.5, 0.08), (3.0, 0.12), (2.0, 0.13), (1.5, 0.08), (0.5, 0.05)]
    assert pareto_front(points) == [1, 2, 4, 5]
    assert pareto_front([]) == []
    # x a cost (audio tokens/s, lower is better): fewer tokens at equal WER dominates
    assert pareto_front([(25.0, 0.10), (6.25, 0.10), (3.1, 0.20), (12.5, 0.09)], higher_x=False) == [1, 2, 3]


def _run_with_hyps(run_dir: Path, refs: list[str], hyps: dict[str, list[str | None]]) -> str:
    """A run directory as experiments.run leaves it: results.json naming the evaluate
    stage's utterances.jsonl files (clean, and test_noisy)."""
    run_dir.mkdir(parents=True)
    paths = {}
    for split, split_hyps in hyps.items():
        path = run_dir / f"{split}.jsonl"
        path.write_text("".join(json.dumps({"audio_filepath": f"clip{i}.wav", "ref": r, "hyp": h}) + "\n"
                                for i, (r, h) in enumerate(zip(refs, split_hyps, strict=True))))
        paths[split] = str(path)
    evaluate = {"utterances": paths["test"]} | ({"test_noisy": {"utterances": paths["test_noisy"]}}
                                                 if "test_noisy" in paths else {})
    (run_dir / "results.json").write_text(json.dumps({"stages": {"evaluate": evaluate}}))
    return str(run_dir)


def test_write_comparison_keeps_each_points_latest_run_and_pairs_it_with_the_baseline(tmp_path):
    """experiment=compression's table and plot: one row per projector and recipe (its latest
    run), most audio tokens first, each WER also as the paired difference to the baseline on
    the same clips (clean and noisy; a failed request is an empty hypothesis)."""
    refs = ["open the red door", "david has a blue car", "the pigs ran"]  # 12 words
    base_dir = _run_with_hyps(tmp_path / "base", refs, {"test": refs, "test_noisy": ["open the red door", None, "the pigs ran"]})
    s4_dir = _run_with_hyps(tmp_path / "s4", refs, {"test": ["open a red door", "david has a blue car", "the pigs"],
                                                    "test_noisy": refs})
    row = lambda name, tps, wer, recipe, run_dir="": {  # noqa: E731
        "name": name, "model": "tiny", "data": "synthetic", "audio_tokens_per_s": tps, "wer": wer,
        "wer_noisy": wer + 0.1, "recipe": recipe, "run_dir": run_dir,
    }
    rows = [row("linear", 25.0, 0.30, "init=base lora=r8", base_dir), row("linear-stack4", 6.25, 0.50, "init=mean_pool lora=r8"),
            row("linear-stack4", 6.25, 0.40, "init=mean_pool lora=r8", s4_dir),
            row("linear-stack4", 6.25, 0.45, "init=mean_pool kd=base(w1,T1) lora=r8"),
            row("attention-q2w8", 6.25, 0.45, "init=window_mean lora=r8")]
    md, png = write_comparison(rows, tmp_path / "compression")
    lines = md.read_text().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:7] == ["name", "recipe", "audio_tokens_per_s", "wer", "wer_ci_low", "wer_ci_high", "wer_delta"]
    table = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[2:]]
    assert [(r["name"], r["recipe"].split()[1]) for r in table] == [
        ("linear", "lora=r8"), ("linear-stack4", "lora=r8"), ("linear-stack4", "kd=base(w1,T1)"), ("attention-q2w8", "lora=r8")]
    assert table[1]["wer"] == "0.4"  # the rerun's WER, not the first run's
    # clean: stack 4 makes 2 errors in 12 words (a substitution, a deletion), the baseline none
    assert float(table[1]["wer_delta"]) == pytest.approx(2 / 12, abs=1e-3)
    assert float(table[1]["wer_delta_ci_low"]) <= 2 / 12 <= float(table[1]["wer_delta_ci_high"])
    # noisy: the baseline's failed request is 5 deleted words, stack 4 has none
    assert float(table[1]["wer_delta_noisy"]) == pytest.approx(-5 / 12, abs=1e-3)
    assert float(table[0]["wer_delta"]) == 0.0 and table[2]["wer_delta"] in ("", "-")  # no utterances: no pair
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_plot_pareto_panels_baseline_and_error_bars(tmp_path):
    rows = [
        {"name": "linear", "model": "tiny", "data": "synthetic", "throughput_ratio_vs_linear": "1.0", "wer": "0.05",
         "wer_ci_low": "0.03", "wer_ci_high": "0.07", "throughput_ratio_min": "0.9", "throughput_ratio_max": "1.1"},
        {"name": "mlp-stack4", "model": "tiny", "data": "synthetic", "throughput_ratio_vs_linear": 2.5, "wer": 0.06},
        {"name": "broken", "model": "tiny", "data": "synthetic", "throughput_ratio_vs_linear": "", "wer": 0.5},
        {"name": "linear", "model": "small", "data": "synthetic", "throughput_ratio_vs_linear": 1.0, "wer": 0.2},
    ]
    fig = pareto_figure(rows)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["tiny / synthetic", "small / synthetic"]  # one panel per base model and data
    tiny = fig.axes[0]
    labels = sorted(t.get_text() for t in tiny.texts)
    assert labels == ["linear (baseline)", "mlp-stack4"]  # the row without a ratio is skipped
    markers = [line.get_marker() for line in tiny.lines if line.get_linestyle() == "None"]
    assert "*" in markers and "o" in markers  # the baseline is a star, the others dots
    bars = [c for c in tiny.collections if c.get_segments()]
    spans = sorted(tuple(float(np.round(np.ptp(seg[:, i]), 3)) for i in (0, 1)) for c in bars for seg in c.get_segments())
    assert (0.2, 0.0) in spans and (0.0, 0.04) in spans  # ratio min-max and WER CI of the baseline
    assert plot_pareto(rows, tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_log_wandb_offline_writes_run_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    image = plot_pareto(
        [{"name": "a", "throughput_ratio_vs_linear": 1.0, "wer": 0.1}], tmp_path / "p.png"
    )
    run_dir = log_wandb(
        "qwen2-audio-test",
        "baseline",
        {"stack": 1},
        {"wer": 0.1, "rtfx": 3.0},
        table_rows=[{"name": "baseline", "wer": 0.1}],
        image=image,
        dir=tmp_path,
    )
    assert run_dir is not None
    assert Path(run_dir).is_dir() and Path(run_dir).parent == tmp_path / "wandb"
    assert Path(run_dir).name.startswith("offline-run-")


def test_log_wandb_failure_returns_none(tmp_path, monkeypatch, capsys):
    # Nothing listens on port 9: init fails after init_timeout_s instead of hanging.
    monkeypatch.setenv("WANDB_API_KEY", "b" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    assert (
        log_wandb("p", "r", {}, {"wer": 0.1}, mode="online", dir=tmp_path, init_timeout_s=1) is None
    )
    err = capsys.readouterr().err
    assert err.startswith("warning: W&B logging skipped") and err.count("\n") == 1


def _append_many(path: str, who: int) -> None:
    from experiments.report import append_results_row

    for i in range(15):
        append_results_row(Path(path), {"name": f"job{who}-{i}", "wer": i})


def test_parallel_jobs_never_lose_a_row(tmp_path):
    """A launcher's jobs append to one table at once (hydra/launcher=joblib)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    jobs = [ctx.Process(target=_append_many, args=(str(tmp_path / "results.csv"), w)) for w in range(3)]
    for j in jobs:
        j.start()
    for j in jobs:
        j.join(60)
    with open(tmp_path / "results.csv", newline="") as f:
        names = [r["name"] for r in csv.DictReader(f)]
    assert sorted(names) == sorted(f"job{w}-{i}" for w in range(3) for i in range(15))


def test_plot_alignment_draws_a_panel_per_phase(tmp_path):
    from PIL import Image

    from experiments.report import plot_alignment

    lm = {"history": [{"step": 100, "train_loss": 3.2, "dev_loss": 3.4}, {"step": 200, "train_loss": 2.8, "dev_loss": 2.4}],
          "train_seconds": 600.0, "seconds_per_step": 2.3}
    one = Image.open(plot_alignment(lm, tmp_path / "lm.png"))
    two = Image.open(plot_alignment(lm | {"prealign": dict(lm)}, tmp_path / "both.png"))
    assert two.size[0] == 2 * one.size[0] and two.size[1] == one.size[1]


def test_plot_alignment_draws_the_dev_wer_where_the_run_recorded_it(tmp_path):
    import numpy as np
    from PIL import Image

    from experiments.report import plot_alignment

    history = [{"step": 100, "train_loss": 3.2, "dev_loss": 3.4}, {"step": 200, "train_loss": 2.8, "dev_loss": 2.4}]
    lm = {"history": history, "train_seconds": 600.0, "seconds_per_step": 2.3}
    with_wer = lm | {"history": [h | {"dev_wer": w} for h, w in zip(history, (0.9, 0.4), strict=True)]}

    def red_pixels(result: dict, name: str) -> int:  # the WER line is tab:red (214, 39, 40)
        rgb = np.asarray(Image.open(plot_alignment(result, tmp_path / name)).convert("RGB")).astype(int)
        return int((np.abs(rgb - [214, 39, 40]).sum(axis=2) < 30).sum())

    assert red_pixels(lm, "plain.png") == 0 and red_pixels(with_wer, "wer.png") > 100
