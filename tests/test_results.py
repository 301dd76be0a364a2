"""`make results` (experiments.results): every README figure's command, run in turn, its
output kept, a failure recorded without stopping the others."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from experiments.results import entries, run_all

ROOT = Path(__file__).resolve().parents[1]


def test_run_all_keeps_outputs_and_failures(tmp_path):
    commands = {
        "fast": ("Results: a table", [sys.executable, "-c", "print('| a | 3.2 req/s |')"]),
        "broken": ("Results: another", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]),
        "after": ("Results: still run", [sys.executable, "-c", "print('done')"]),
    }
    md = run_all(commands, tmp_path / "out").read_text()
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert [e["returncode"] for e in index["entries"].values()] == [0, 3, 0]
    assert "| a | 3.2 req/s |" in md and "FAILED (exit 3, see broken.log)" in md and "done" in md
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    assert f"git {head}" in md and "vllm" in md  # machine, code and versions head the file
    assert (tmp_path / "out" / "broken.log").read_text().strip() == "boom"


def test_every_entry_runs_a_module_the_readme_names():
    readme = (ROOT / "README.md").read_text()
    for name, (_, command) in entries().items():
        argv = command(Path("/out"), Path("/base"), {"test": Path("/test.jsonl"), "test_noisy": Path("/noisy.jsonl")})
        module = argv[argv.index("-m") + 1]
        assert f"python -m {module}" in readme, (name, module)
        assert (ROOT / (module.replace(".", "/") + ".py")).exists(), module


def test_cli_lists_and_rejects_unknown_entries():
    listed = subprocess.run([sys.executable, "-m", "experiments.results", "list=true"], capture_output=True, text=True, cwd=ROOT)
    assert listed.returncode == 0 and all(name in listed.stdout for name in entries())
    bad = subprocess.run([sys.executable, "-m", "experiments.results", "names=[nope]"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 1 and "unknown entries ['nope']" in bad.stderr


def test_entries_on_another_model_compose_its_config():
    """The small entries evaluate model=small's base: the name is an entry and composes."""
    from experiments.results import ENTRY_MODELS
    from experiments.training.base import default_config

    assert set(ENTRY_MODELS) <= set(entries())
    for model in set(ENTRY_MODELS.values()):
        cfg = default_config([f"model={model}"])
        assert cfg.model.name == model and cfg.projector.name == "linear"
