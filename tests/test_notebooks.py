"""The notebooks run top to bottom (nbclient, this interpreter's kernel) and show what they claim."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from experiments.data.audio import load_audio
from experiments.report import append_results_row

pytestmark = pytest.mark.slow  # each test starts a Jupyter kernel and runs a notebook
REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO_ROOT / "notebooks"


@pytest.fixture
def kernel_env(tmp_path, monkeypatch) -> Path:
    """A `python3` kernelspec that starts this interpreter (whatever `python` is on PATH), found
    first through JUPYTER_PATH; returns a scratch working directory outside the repo."""
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "Python 3 (test)", "language": "python"})
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.delenv("QWEN2_AUDIO_7B_DIR", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    return cwd


def execute(name: str, cwd: Path) -> nbformat.NotebookNode:
    """Run every cell; any cell error raises (nbclient's CellExecutionError)."""
    path = NOTEBOOKS / name
    nb = nbformat.read(path, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
        f"{path} is stored with outputs; clear them before committing"
    )
    client = NotebookClient(
        nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()
    return nb


def outputs(nb: nbformat.NotebookNode) -> tuple[str, list[str]]:
    """(all text the notebook printed or displayed, MIME types of its display outputs)."""
    texts, mimes = [], []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                texts.append(out.text)
            elif out.output_type in ("display_data", "execute_result"):
                mimes += list(out.data)
                texts += [out.data[m] for m in ("text/plain", "text/markdown") if m in out.data]
    return "\n".join(texts), mimes


def test_shapes_notebook(kernel_env, tiny_base):
    from qwen2_audio_vllm.checkpoint import load_processor

    nb = execute("shapes.ipynb", kernel_env)
    text, mimes = outputs(nb)
    assert "image/png" in mimes
    for needle in ("tokens / 30 s", "(1, 80, 3000)", "inputs_embeds", "audio rows equal the projector output: True"):
        assert needle in text
    # extra modalities: 9 rows of m1 through a 2x-stacking MLP -> 5; m2 rows through a linear -> 4 and 6
    assert "m1 inputs [(9, 768)] -> projected [(5, 128)]" in text
    assert "m2 inputs [(4, 512), (6, 512)] -> projected [(4, 128), (6, 128)]" in text
    assert "m1 rows equal the m1 projector output: True" in text

    # The same code path, computed here: mel mask -> conv (stride 2) -> avg-pool -> linear stack 1.
    fe = load_processor(tiny_base).feature_extractor
    wav = load_audio(REPO_ROOT / "experiments" / "assets" / "open_the_red_door.wav")
    mask = fe([wav], sampling_rate=fe.sampling_rate, padding="max_length",
              return_attention_mask=True, return_tensors="pt")["attention_mask"]
    mel_frames = int(mask.sum())
    expected = ((mel_frames - 1) // 2 + 1 - 2) // 2 + 1
    shown = re.search(r"audio tokens \(linear, stack 1\) for this clip: (\d+)", text)
    assert shown is not None and int(shown.group(1)) == expected
    # The table: 750 pooled frames per 30 s window -> ceil(750 / stack) tokens.
    assert f"| linear | 1 | 25 | 750 | {expected} |" in text
    assert "| mlp | 2 | 12.5 | 375 | " in text
    assert "| mlp | 4 | 6.267 | 188 | " in text


def test_results_notebook(kernel_env, tmp_path, monkeypatch):
    table = tmp_path / "results" / "results.csv"
    common = {"model": "tiny", "data": "synthetic", "n_utts": 64}
    runs = [
        ("linear", 0.20, 5.0, 1.0),
        ("mlp", 0.15, 4.8, 0.96),
        ("attention", 0.12, 4.0, 0.8),
    ]
    for name, wer, rps, ratio in runs:
        append_results_row(table, {"name": name, **common, "wer": wer, "request_throughput": rps,
                                   "throughput_ratio_vs_linear": ratio})
    monkeypatch.setenv("Q2AP_RESULTS_CSV", str(table))

    nb = execute("results.ipynb", kernel_env)
    text, mimes = outputs(nb)
    assert "3 runs in" in text
    assert "image/png" in mimes
    for name, *_ in runs:
        assert f"| {name} |" in text
    # attention vs linear: 12% - 20% WER = -8 points, 4.0 / 5.0 requests/s.
    assert re.search(r"\| attention \| tiny \| synthetic \| 0\.12 \| -8\.000 \| 0\.8 \| 0\.8 \|", text)


def test_results_notebook_without_table(kernel_env, tmp_path, monkeypatch):
    monkeypatch.setenv("Q2AP_RESULTS_CSV", str(tmp_path / "missing.csv"))
    text, mimes = outputs(execute("results.ipynb", kernel_env))
    assert "No results table at" in text and "make run" in text
    assert "image/png" not in mimes
